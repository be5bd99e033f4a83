"""Wire types of the OpenAI-compatible API (requests, responses, stream chunks, the safety report).

Requests forbid unknown fields: a parameter we do not implement (``tools``, ``functions``, ...)
is a 400 that names it, never a silent no-op.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# ----------------------------------------------------------------------------- input hygiene

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE_MSG = "contains invalid unicode (lone surrogate)"
# vLLM's own OpenAI server bounds ``seed`` to int64 (its engine serialises and seeds with it).
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
INT32_MAX = (1 << 31) - 1
MIN_REPETITION_PENALTY = 0.01


def has_lone_surrogate(text: str) -> bool:
    """JSON can carry ``"\\ud800"``: a str Python holds but cannot encode, tokenize or echo."""
    return _LONE_SURROGATE.search(text) is not None


def find_lone_surrogate(value: Any, path: tuple = ()) -> tuple | None:
    """Path of the first string in ``value`` with a lone surrogate; for a key, the path of the
    object holding it. Iterative: a body nested as deep as the JSON parser allows must get
    its 400, not a RecursionError."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if has_lone_surrogate(value):
                return path
        elif isinstance(value, dict):
            for k in value:
                if isinstance(k, str) and has_lone_surrogate(k):
                    return (*path, KEY)
            stack.extend(((v, (*path, k)) for k, v in reversed(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend(((v, (*path, i)) for i, v in reversed(list(enumerate(value)))))
    return None


def scrub(text: str) -> str:
    """``text`` made encodable as UTF-8 (lone surrogates become U+FFFD): for echoing what a
    client sent in an error message."""
    if not has_lone_surrogate(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class _Key:
    """Marks, at the end of a path, that the bad string is a key of the object there."""


KEY = _Key()


def surrogate_error(path: tuple, prefix: str = "") -> tuple[str | None, str]:
    """(param, message) for a lone surrogate found at ``path``."""
    if path and path[-1] is KEY:
        param = param_of(((prefix,) if prefix else ()) + path[:-1]) or None
        where = f"a key of {param}" if param else "a key of the request"
        return param, f"{where} {LONE_SURROGATE_MSG}"
    param = param_of(((prefix,) if prefix else ()) + path)
    return param, f"{param}: {LONE_SURROGATE_MSG}"


def param_of(path: tuple) -> str:
    return scrub(".".join(str(p) for p in path))


def invalid(param: str, message: str, type: str = "invalid_value") -> PydanticCustomError:
    """A validation error that names its field even when raised by a model-level validator
    (the error handler reads ``ctx.param``)."""
    return PydanticCustomError(type, scrub(message), {"param": scrub(param or "")})


def _no_lone_surrogate(v: str) -> str:
    if has_lone_surrogate(v):
        raise PydanticCustomError("invalid_string", LONE_SURROGATE_MSG)
    return v


# A str that can be encoded as UTF-8 (used by types that are not checked as a whole).
SafeStr = Annotated[str, AfterValidator(_no_lone_surrogate)]


def shown_score(x: float) -> float:
    """A score or threshold as reported: the shortest decimal that reads back as the same
    float32, the precision the decision kernel compares in. The same for both, so a score
    shown at or over its threshold is exactly one the kernel flagged (rounding each to 8
    decimals instead could put a flagged score just under its shown threshold)."""
    return float(str(np.float32(x)))


MAX_TOP_LOGPROBS = 20  # as OpenAI; the engine is started with at least this many
# Messages per chat request, and text parts per request (all messages, or one moderation
# input): far beyond any real use, and a bound on the work a body does on the event loop
# while it is validated (a million tiny items fit in 8 MiB). Checked before anything walks them.
MAX_MESSAGES = 4096
MAX_TEXT_PARTS = 4096
# logit_bias entries per request: OpenAI's range of values; the count is ours (a bound on the
# work a request's bias costs every engine step).
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_RANGE = 100.0
MAX_STOP_CHARS = 1000  # per stop string


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Strict):
    """A request body (the top-level model of a route)."""

    # Top-level lists capped before anything walks them (field -> most items).
    _MAX_ITEMS: ClassVar[dict[str, int]] = {}

    @classmethod
    def _check_sizes(cls, data: dict) -> None:
        """Further size checks on the raw body, before anything walks it."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data):
        """Every string of the request (keys included) must be valid Unicode: checked once
        here, so nothing downstream (tokenizer, engine, error echo) meets a lone surrogate."""
        if isinstance(data, dict):
            for name, cap in cls._MAX_ITEMS.items():
                items = data.get(name)
                if isinstance(items, list) and len(items) > cap:
                    raise invalid(name, f"give at most {cap} {name}, not {len(items)}",
                                  "too_long")
            cls._check_sizes(data)
            # Unknown fields are a 400 anyway (extra="forbid"), naming the field: their
            # values are not walked, so a large one costs the event loop nothing here.
            path = find_lone_surrogate(dict.fromkeys(data))  # the keys themselves
            if path is None:
                path = find_lone_surrogate({k: v for k, v in data.items()
                                            if k in cls.model_fields})
            if path is not None:
                param, message = surrogate_error(path)
                raise invalid(param, message, "invalid_string")
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


# OpenAI fields this server does not implement, dropped when a client sends them empty: the
# official client's `message.model_dump()` writes `refusal: null`, `tool_calls: null`, ...
# into a conversation it sends back, and SDKs fill request defaults. Any real value stays
# unknown, so it is a 400 naming it.
_NOOP_MESSAGE_FIELDS = {"refusal": (None,), "annotations": (None, []), "audio": (None,),
                        "function_call": (None,), "tool_calls": (None, [])}
_NOOP_REQUEST_FIELDS = {"tools": (None, []), "tool_choice": (None, "none"),
                        "functions": (None, []), "function_call": (None, "none"),
                        "parallel_tool_calls": (None,), "metadata": (None, {}),
                        "store": (None, False), "modalities": (None, ["text"]),
                        "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
                        "web_search_options": (None,),
                        "service_tier": (None, "auto", "default")}


def _drop_noop(data, fields: dict) -> Any:
    if not isinstance(data, dict):
        return data
    drop = {k for k, noops in fields.items() if k in data and any(
        data[k] == v and type(data[k]) is type(v) for v in noops)}
    return {k: v for k, v in data.items() if k not in drop} if drop else data


# A schema becomes a grammar in the request's path (here, and in vLLM's one-thread request
# renderer, once per choice), so its cost is bounded. Counted repetitions are what grow it:
# measured, a regex's `a{N}` takes 0.04 s at N = 1000 and 23 s at 20000 (quadratic in N); a
# string's maxLength 2 s from about 200 on, per distinct bound (integer ranges, formats and
# array item counts: milliseconds).
MAX_JSON_SCHEMA_BYTES = 32 << 10
MAX_PATTERN_REPEAT = 1000  # largest bound of one regex repetition, {m,n}
MAX_PATTERN_REPEATS = 4000  # those bounds summed over the schema's patterns
# String length bounds compile to counted repetitions too, at up to ~2 s each (distinct ones
# add up): their cost (``_length_bound_cost``) is budgeted over the schema.
MAX_LENGTH_BOUND_UNITS = 256
MAX_LENGTH_BOUNDS_COST = 512
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


_SCHEMA_DATA_KEYS = ("const", "enum", "default", "examples")  # values, not schemas
# Deeper schemas are refused before anything walks them recursively (json.dumps, the grammar
# compiler): one nested as deep as the body parser allows would overflow the stack there.
MAX_SCHEMA_DEPTH = 64


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` is 1). Iterative, as
    ``find_lone_surrogate``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        else:
            continue
        deepest = max(deepest, depth + 1)
    return deepest


def _schema_nodes(node) -> list[dict]:
    """Every object of a JSON schema that is schema, not data (``default``, ``enum``, ...)."""
    out, todo = [], [node]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            out.append(item)
            todo.extend(v for k, v in item.items() if k not in _SCHEMA_DATA_KEYS)
        elif isinstance(item, list):
            todo.extend(item)
    return out


def _schema_patterns(node) -> list[str]:
    """Every regex of a JSON schema: ``pattern`` values and ``patternProperties`` keys."""
    out = []
    for item in _schema_nodes(node):
        if isinstance(item.get("pattern"), str):
            out.append(item["pattern"])
        if isinstance(item.get("patternProperties"), dict):
            out.extend(item["patternProperties"])
    return out


def _length_bound_cost(node) -> int:
    """The grammar cost of a schema's string length bounds, in units of about 10 ms: each
    distinct (minLength, maxLength) pair costs its larger bound, counted up to 256 (measured
    with this tokenizer's xgrammar: maxLength 16 0.11 s, 64 0.9 s, 200 2.0 s, 20000 2.8 s;
    identical pairs compile once)."""
    def bound(item, key) -> int:
        value = item.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    pairs = {(bound(item, "minLength"), bound(item, "maxLength")) for item in _schema_nodes(node)}
    return sum(min(max(pair), MAX_LENGTH_BOUND_UNITS) for pair in pairs)


def _pattern_repeats(pattern: str) -> list[int]:
    """Bounds of the repetitions ``{m}``, ``{m,}``, ``{m,n}`` in a regex (an open one: m)."""
    def escaped(i: int) -> bool:  # pattern[i] follows an odd run of backslashes
        return (i - len(pattern[:i].rstrip("\\"))) % 2 == 1

    out = []
    for m in _REPEAT.finditer(pattern):
        start = m.start()
        if escaped(start):  # "\{" is a literal brace; "\\{" a backslash, then a repetition
            continue
        if start and pattern[start - 1] in "uxpPN" and escaped(start - 1):
            continue  # "\u{10000}", "\x{41}": a code point, not a repetition
        lo, hi = m.groups()
        out.append(int(hi) if hi else int(lo))
    return out


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # The grammar always holds the output to the schema, so strict or not decodes the same.
    strict: StrictBool | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, v):
        if json_depth(v) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if len(json.dumps(v)) > MAX_JSON_SCHEMA_BYTES:
            raise ValueError(f"the schema is over {MAX_JSON_SCHEMA_BYTES} bytes of JSON")
        repeats = [n for p in _schema_patterns(v) for n in _pattern_repeats(p)]
        if repeats and max(repeats) > MAX_PATTERN_REPEAT:
            raise ValueError(f"a pattern repeats up to {max(repeats)} times; at most "
                             f"{MAX_PATTERN_REPEAT} per repetition (its grammar grows with it)")
        if sum(repeats) > MAX_PATTERN_REPEATS:
            raise ValueError(f"the schema's patterns repeat {sum(repeats)} times in all; at most "
                             f"{MAX_PATTERN_REPEATS}")
        if (cost := _length_bound_cost(v)) > MAX_LENGTH_BOUNDS_COST:
            raise ValueError(
                f"the schema's string length bounds cost {cost} units to compile; at most "
                f"{MAX_LENGTH_BOUNDS_COST} (each distinct minLength/maxLength pair costs its "
                f"larger bound, up to {MAX_LENGTH_BOUND_UNITS})")
        return v


class ResponseFormat(_Strict):
    """Structured output: ``text`` (the default), any JSON object, or JSON that matches a
    schema; decoded under a grammar (vLLM's structured outputs)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given_for_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise invalid("response_format.json_schema",
                          "json_schema is required with type json_schema, and only then")
        return self

    @property
    def structured(self) -> bool:
        return self.type != "text"


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    # Only an assistant turn may come without content (there are no tool calls to carry).
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    # OpenAI's participant name (it allows 64 characters): bounded, since the guideline-header
    # check reads it whole even when the template does not render it.
    name: str | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _noop_fields(cls, data):
        return _drop_noop(data, _NOOP_MESSAGE_FIELDS)

    @field_validator("content")
    @classmethod
    def _content_required(cls, v, info):
        if v is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"content is required for a {info.data['role']} message")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    # vLLM extension: usage (so far) in every chunk; needs include_usage.
    continuous_usage_stats: StrictBool = False

    @field_validator("include_usage", "continuous_usage_stats", mode="before")
    @classmethod
    def _null_is_default(cls, v):
        return False if v is None else v  # as for the request's own fields


class ChatCompletionRequest(_Request):
    """Numbers and booleans are strict: ``"2"`` is not an int, ``true`` is not a number."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    _MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES}

    @classmethod
    def _check_sizes(cls, data: dict) -> None:
        messages = data.get("messages")
        if isinstance(messages, list):
            parts = sum(len(m["content"]) for m in messages
                        if isinstance(m, dict) and isinstance(m.get("content"), list))
            if parts > MAX_TEXT_PARTS:
                raise invalid("messages", f"give at most {MAX_TEXT_PARTS} content parts over "
                              f"all messages, not {parts}", "too_long")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)  # 0: greedy, as OpenAI takes it
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's sampling extensions (clients send them in `extra_body`). A token the safety
    # strategy forces is its step's only finite logit, so none of them can move it.
    top_k: StrictInt | None = Field(None, ge=-1, le=INT32_MAX)  # 0 or -1: off
    min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
    # 1: off. Bounded below: vLLM divides positive logits by it and multiplies the others, in
    # float32, where 1e-300 is 0 and -inf * 0 is NaN, which would unforce a forced token.
    repetition_penalty: StrictFloat | None = Field(None, ge=MIN_REPETITION_PENALTY, le=2.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: StrictInt = Field(1, ge=1, le=8)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's successor of `user`: accepted, as it is
    response_format: ResponseFormat | None = None
    # token id (a decimal string, as OpenAI's) -> bias added to its logit, in [-100, 100]
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None
    # vLLM extension, for benchmarks: keep generating past end-of-sequence up to max_tokens.
    ignore_eos: StrictBool = False
    # vLLM's prefill extensions: continue the last (assistant) message instead of opening a new one.
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool = True
    # Per-request safety config (object, or a preset name); validated by the safety config module.
    safety_config: dict[str, Any] | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _noop_fields(cls, data):
        return _drop_noop(data, _NOOP_REQUEST_FIELDS)

    @field_validator("stream", "n", "ignore_eos", "continue_final_message",
                     "add_generation_prompt", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        # OpenAI's schema marks stream and n nullable, and some clients send an explicit null
        # (vLLM's switches likewise): null means the default everywhere.
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_size(cls, v):
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, not {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids (decimal strings), not {key[:40]!r}")
            if len(key) > 10:  # int() refuses over 4300 digits; no vocabulary reaches 10
                raise ValueError(f"token id {key[:40]}... is out of range")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return v

    @property
    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif v == "":
            raise ValueError("stop sequence must be non-empty")
        # a stop string's length, less one, is held back from a stream (it could begin there)
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _combinations(self):
        if not self.add_generation_prompt and not self.continue_final_message:
            # The prompt verdict is read where the answer starts, and a prefilled answer gets
            # its query verdict only through continue_final_message.
            raise invalid("add_generation_prompt", "add_generation_prompt=false is only "
                          "supported with continue_final_message=true (a prefilled assistant "
                          "turn the model continues)")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise invalid("continue_final_message",
                              "continue_final_message requires add_generation_prompt=false")
            if self.messages[-1].role != "assistant":
                raise invalid("continue_final_message", "continue_final_message requires the "
                              "last message to be 'assistant'")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs requires logprobs=true")
        if self.stream_options is not None:
            if not self.stream:
                raise invalid("stream_options", "stream_options is only allowed with stream=true")
            if self.stream_options.continuous_usage_stats and not self.stream_options.include_usage:
                raise invalid("stream_options.continuous_usage_stats",
                              "continuous_usage_stats requires include_usage=true")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def structured(self) -> bool:
        """The output is decoded under a grammar (response_format json_object / json_schema)."""
        return self.response_format is not None and self.response_format.structured

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ----------------------------------------------------------------------------- moderations

MAX_MODERATION_INPUTS = 32


class ModerationRequest(_Request):
    """``POST /v1/moderations`` (OpenAI's shape): a text, a list of texts (one result each),
    or a list of text parts (one input, the parts joined as a chat message's are), each judged
    as a user turn by the safety head's prompt verdict under the request's safety config."""

    input: str | list[str] | list[TextPart]
    model: str | None = None
    safety_config: dict[str, Any] | str | None = None

    @classmethod
    def _check_sizes(cls, data: dict) -> None:
        items = data.get("input")
        if not isinstance(items, list):
            return
        parts = bool(items) and all(isinstance(p, dict) for p in items)
        cap = MAX_TEXT_PARTS if parts else MAX_MODERATION_INPUTS
        if len(items) > cap:
            raise invalid("input", f"give at most {cap} {'text parts' if parts else 'inputs'}, "
                          f"not {len(items)}", "too_long")
        for i, p in enumerate(items):  # the official client sends image parts for omni models
            if isinstance(p, dict) and p.get("type") != "text":
                raise invalid(f"input.{i}", "only text content parts are supported, not "
                              f"{str(p.get('type'))[:40]!r}")

    @field_validator("input")
    @classmethod
    def _count(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, TextPart) for p in v):
            return v  # a list of text parts is one input
        if isinstance(v, list) and not 1 <= len(v) <= MAX_MODERATION_INPUTS:
            raise ValueError(f"give 1 to {MAX_MODERATION_INPUTS} inputs, not {len(v)}")
        return v

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(p, str) for p in self.input):
            return list(self.input)
        return ["".join(p.text for p in self.input)]


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]  # per head output (taxonomy ids, then "unsafe"): did it flag
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]  # always ["text"]
    alert: bool = False  # the verdict fell in the head's alert band (not flagged)
    # The categories the topic gate flagged (under an allow-list; see CategoryScores.gated).
    gated: list[str] = Field(default_factory=list)


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]
    safety: dict[str, Any]  # the effective config and thresholds the verdicts ran with


# ----------------------------------------------------------------------------- safety report

class CategoryScores(BaseModel):
    flagged: bool
    scores: dict[str, float]
    categories: list[str] = Field(default_factory=list)
    # Not flagged, but within the head's alert band: the response rule watches more closely.
    alert: bool = False
    # The categories the topic gate flagged (a request about a category its allow-list
    # leaves out); ``scores`` are the harm head's, which may sit far below their thresholds.
    gated: list[str] = Field(default_factory=list)


class ResponseVerdict(BaseModel):
    flagged: bool = False
    token_index: int | None = None  # first flagged output token (0-based)
    categories: list[str] = Field(default_factory=list)
    max_scores: dict[str, float] = Field(default_factory=dict)
    # A refusal's bounded explanation read over a threshold somewhere: it was cut off and
    # withheld, so the response is the refusal alone.
    explanation_withheld: bool = False
    # The request's `withhold_answer`: the answer before the response rule acted was withheld whole.
    answer_withheld: bool = False


class TracePoint(BaseModel):
    token_index: int  # the score read the text through output token token_index - 1
    scores: list[float]
    event: int


class SafetyReport(BaseModel):
    enabled: bool
    model_has_head: bool
    action: Literal["none", "refuse", "stop", "annotate"] = "none"
    prompt: CategoryScores | None = None
    # Prefilled requests (the conversation ends with an assistant message to continue): the
    # verdict on the conversation without that prefill. Flagged -> acted on at token 0.
    query: CategoryScores | None = None
    response: ResponseVerdict = Field(default_factory=ResponseVerdict)
    config: dict[str, Any] = Field(default_factory=dict)
    score_names: list[str] | None = None
    # What each output was compared against for this request: the config's thresholds or the
    # head's calibrated ones, the overall output's allow-list shift included; `thresholds`
    # for generated tokens (the config's threshold_shift included), `prompt_thresholds` for
    # the prompt (and query) verdict.
    # (None for a per-category output the prompt verdict did not compare: an allow-listed
    # prompt under a head whose topic gate judges the categories there, format 9.)
    thresholds: dict[str, float] | None = None
    prompt_thresholds: dict[str, float | None] | None = None
    trace: list[TracePoint] | None = None
    telemetry_complete: bool = True


# ----------------------------------------------------------------------------- responses

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Per output token the client receives (tokens the safety strategy withheld have none):
    the model's own log-probability, before any token was forced (vLLM's raw logprobs)."""

    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    safety: SafetyReport | list[SafetyReport] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    safety: SafetyReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "safeserve"
    root: str
    max_model_len: int
    safety: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
