"""A chat request turned into what the engine needs: the conversation rendered through the
model's chat template (with the config's guideline; control tokens and the guideline header
refused), its length checked against the context, and vLLM's sampling parameters."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

from safeserve.server.engine import Engine
from safeserve.server.errors import bad_request, engine_request_error
from safeserve.server.protocol import ChatCompletionRequest, new_completion_id
from safeserve.server.safety_service import (RequestSafety, carries_guideline_header,
                                             guideline_message)


@dataclass
class PreparedRequest:
    """A validated request turned into what the engine needs."""

    body: ChatCompletionRequest
    prompt_ids: list[int]
    max_tokens: int
    safety: RequestSafety | None  # None: served without a safety head (--allow-unsafe)
    query_ids: list[int] | None = None  # prefilled requests: the prompt without the prefill
    completion_id: str = field(default_factory=new_completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.perf_counter)
    first_token_seen: bool = False  # TTFT is observed once per request, at its first token
    cache_salt: str | None = None  # the API key's (auth.Principal)


def engine_prompt(prompt_ids: list[int], cache_salt: str | None) -> dict:
    """What ``AsyncLLM.generate`` takes: the token ids, and the key's prefix-cache salt."""
    prompt: dict = {"prompt_token_ids": list(prompt_ids)}
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


def is_prefilled(body: ChatCompletionRequest) -> bool:
    """The conversation ends with an assistant message the model is asked to continue."""
    return bool(body.continue_final_message) and body.messages[-1].role == "assistant"


def render_prompt(engine: Engine, body: ChatCompletionRequest,
                  safety: RequestSafety | None = None, without_prefill: bool = False) -> list[int]:
    """Token ids of the conversation (``without_prefill``: minus the final assistant message,
    ending where the assistant's answer would start)."""
    messages = [
        # `name` goes to the template as vLLM passes it (SmolLM2's ignores it; others use it)
        {"role": "system" if m.role == "developer" else m.role, "content": m.text(),
         **({"name": m.name} if m.name else {})}
        for m in (body.messages[:-1] if without_prefill else body.messages)
    ]
    if without_prefill and not messages:
        # A conversation that is only the prefill: the query is its empty assistant turn,
        # continued (a template renders no conversation at all; the prompt's own default
        # system turn is kept this way too).
        return render_messages(engine, [{"role": "assistant", "content": ""}], safety,
                               add_generation_prompt=False, continue_final_message=True)
    return render_messages(
        engine, messages, safety,
        add_generation_prompt=True if without_prefill else body.add_generation_prompt,
        continue_final_message=False if without_prefill else body.continue_final_message)


def render_messages(engine: Engine, messages: list[dict], safety: RequestSafety | None, *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    param: str = "messages", message_params: list[str] | None = None,
                    refuse_guideline_header: bool = True) -> list[int]:
    """Token ids of ``messages`` (role / content dicts) through the model's chat template,
    with the config's guideline in the system prompt. Errors name ``param``, or a message's
    field as ``<param>.<i>.<field>`` (``message_params[i]`` when given). Text that imitates
    the guideline's header is refused unless ``refuse_guideline_header`` is false (text to
    be judged, not answered: moderation)."""
    tok = engine.tokenizer
    client_messages, messages = list(messages), list(messages)

    def texts():  # the client's own (not the guideline); a template may render `name` too
        for i, m in enumerate(client_messages):
            for key in ("content", "name"):
                if isinstance(m.get(key), str):
                    yield m[key], message_params[i] if message_params else f"{param}.{i}.{key}"

    control = control_tokens(tok)
    for text, where in texts():
        # The rendered text is tokenized whole, so a control token typed into a message would
        # be read as one: a client could close its turn and forge others (an assistant turn
        # that the prefill check never sees as a prefill, a system turn).
        found = control.search(text) if control else None
        if found:
            raise bad_request(f"a message may not contain the model's control token "
                              f"{found.group(0)!r}", param=where, code="invalid_value")
    guideline = guideline_message(safety.config) if safety else None
    found = control.search(guideline) if guideline and control else None
    if found:  # a granted client's own guideline, or a preset's
        raise bad_request(f"a guideline may not contain the model's control token "
                          f"{found.group(0)!r}", param="safety_config.guideline",
                          code="invalid_value")
    if guideline:  # CoSAlign places the config in the system prompt
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{guideline}\n\n{messages[0]['content']}"}
        else:
            messages.insert(0, {"role": "system", "content": guideline})
    try:
        text = tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message)
    except Exception as e:  # template rejects the conversation shape (e.g. roles out of order)
        raise bad_request(f"messages cannot be rendered by the model's chat template: {e}",
                          param=param) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Checked once the conversation is known to fit the context (a longer one is refused for
    # its length by the caller): the check normalises the text (NFKD), which can multiply a
    # message's length, so an unbounded message would hold the interpreter for seconds.
    if refuse_guideline_header and len(ids) < engine.max_model_len:
        for text, where in texts():
            if carries_guideline_header(text):
                raise bad_request("a message may not contain the safety guideline header; "
                                  "send the guideline as the safety config's `guideline` field",
                                  param=where, code="invalid_value")
    return ids


def check_preset_guidelines(tok, presets: dict) -> None:
    """A preset whose guideline holds a control token would make every request that uses it
    a 400 (render_messages refuses it): a startup error instead, naming the preset."""
    control = control_tokens(tok)
    for name, cfg in sorted(presets.items()):
        guideline = guideline_message(cfg)
        found = control.search(guideline) if guideline and control else None
        if found:
            raise ValueError(f"preset {name}: its guideline contains the model's control "
                             f"token {found.group(0)!r}, which would forge a turn of the "
                             f"conversation; every request using the preset would be refused")


def as_plain_text(tok, text: str) -> str:
    """``text`` with every control token broken by a word joiner (U+2060) after its first
    character: read as the characters it shows, never as a turn marker."""
    control = control_tokens(tok)
    return control.sub(lambda m: m.group(0)[0] + "\u2060" + m.group(0)[1:], text) if control \
        else text


def control_tokens(tok) -> re.Pattern | None:
    """The special tokens that mark a conversation's structure, as one pattern (None: none):
    those the chat template writes around turns, and the tokenizer's BOS and EOS. Other special
    tokens (SmolLM2's ``<filename>``, ``<|endoftext|>``) forge no turn and stay text a client
    may send, tokenized as before. Kept on the tokenizer (built once)."""
    cached = getattr(tok, "_safeserve_control_tokens", False)
    if cached is not False:
        return cached
    special = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    special |= set(getattr(tok, "all_special_tokens", ()))
    rendered = ""
    for turns in (["system", "user", "assistant"], ["user", "assistant"]):
        try:  # (some templates refuse a system turn)
            rendered = tok.apply_chat_template([{"role": r, "content": f"x{r}"} for r in turns],
                                               tokenize=False)
            break
        except Exception:  # noqa: BLE001 - no template, or one that refuses this shape
            continue
    names = {t for t in special if t and t in rendered}
    names |= {t for t in (getattr(tok, "bos_token", None), getattr(tok, "eos_token", None)) if t}
    pattern = (re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))
               if names else None)
    try:
        tok._safeserve_control_tokens = pattern
    except AttributeError:  # a tokenizer that takes no attributes: built each time
        pass
    return pattern


async def prepare(engine: Engine, body: ChatCompletionRequest,
                  safety: RequestSafety | None) -> PreparedRequest:
    """Render and tokenize in a worker thread: a long conversation takes seconds to tokenize,
    which must not stall the event loop (other requests, /health) meanwhile. The request's
    clock (TTFT, end-to-end latency) starts here, so that time and the wait for a thread count."""
    arrival = time.perf_counter()
    prep = await asyncio.to_thread(prepare_sync, engine, body, safety)
    prep.arrival = arrival
    return prep


def prepare_sync(engine: Engine, body: ChatCompletionRequest,
                 safety: RequestSafety | None) -> PreparedRequest:
    prompt_ids = render_prompt(engine, body, safety)
    limit = engine.max_model_len
    if len(prompt_ids) >= limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{len(prompt_ids)} tokens.", param="messages", code="context_length_exceeded")
    room = limit - len(prompt_ids)
    wanted = body.requested_max_tokens
    if wanted is not None and wanted > room:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise bad_request(
            f"This model's maximum context length is {limit} tokens; the prompt has "
            f"{len(prompt_ids)} tokens, so at most {room} can be generated, but {wanted} were "
            f"requested.", param=param, code="context_length_exceeded")
    query_ids = None
    if safety is not None and is_prefilled(body):
        query_ids = render_prompt(engine, body, safety, without_prefill=True)
    bias = body.logit_bias_ids
    if bias:
        vocab = _vocab_size(engine)
        beyond = max(bias)
        if beyond >= vocab:  # vLLM would fail the request in the engine
            raise bad_request(f"logit_bias names token {beyond}, beyond this model's "
                              f"vocabulary (ids 0 to {vocab - 1})", param="logit_bias",
                              code="invalid_value")
    prep = PreparedRequest(body, prompt_ids, wanted or room, safety, query_ids)
    _check_sampling(prep)
    _check_grammar(engine, prep)
    return prep


def _check_sampling(prep: PreparedRequest) -> None:
    """vLLM's own checks of the sampling parameters, before anything is sent (a stream's 200
    included), so that what it rejects is a 400 here."""
    try:
        for index in {0, prep.body.n - 1}:
            sampling_params(prep, index)
    except Exception as e:
        if not isinstance(e, (TypeError, OverflowError)) and engine_request_error(e) is None:
            raise
        raise bad_request(f"invalid sampling parameters: {e}") from None


def _vocab_size(engine: Engine) -> int:
    """Token ids a request may name: the tokenizer's and the model's, whichever is fewer (vLLM
    checks ids against the model's; a tokenizer may have more, or fewer)."""
    checks = getattr(engine.llm, "input_processor", None)
    model = checks.model_config.get_vocab_size() if checks is not None else None
    return min(len(engine.tokenizer), model or len(engine.tokenizer))


def _check_grammar(engine: Engine, prep: PreparedRequest) -> None:
    """A ``response_format`` checked here (in a worker thread) as the engine will check it
    (converted into a grammar; the protocol has bounded its cost): a schema vLLM cannot
    convert is a 400 naming it, before a stream's 200."""
    checks = getattr(engine.llm, "input_processor", None)
    if not prep.body.structured or checks is None:
        return
    try:
        sampling_params(prep, 0).verify(checks.model_config, checks.speculative_config,
                                        checks.structured_outputs_config, checks.tokenizer)
    except Exception as e:
        if engine_request_error(e) is None:
            raise
        raise bad_request(f"response_format cannot be decoded: {e}", param="response_format",
                          code="invalid_value") from None


def _structured_outputs(body: ChatCompletionRequest):
    if not body.structured:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    fmt = body.response_format
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=fmt.json_schema.json_schema)


def sampling_temperature(body: ChatCompletionRequest) -> float:
    """The temperature the engine samples with: 0 for greedy (temperature 0, or top_p 0,
    which OpenAI accepts and which keeps only the likeliest token), OpenAI's 1 when unset."""
    if body.top_p == 0.0:
        return 0.0
    return 1.0 if body.temperature is None else float(body.temperature)


GREEDY_TEMPERATURE = 1e-5  # vLLM's own greedy cut-off (it raises the others under 0.01 to 0.01)


def shift_temperature(body: ChatCompletionRequest) -> float:
    """The temperature a head's sampled-decoding shift is looked up at: the sampling
    temperature when the request samples from the whole distribution (the setting the
    shift was calibrated on), else 0. A truncated distribution (top_p < 1, top_k > 0,
    min_p > 0) writes text closer to greedy; top_k 1 or min_p 1 is greedy outright, and would
    otherwise buy a greedy answer the sampled, less sensitive rule."""
    t = sampling_temperature(body)
    truncated = ((body.top_p is not None and body.top_p < 1.0)
                 or (body.top_k is not None and body.top_k > 0)
                 or (body.min_p is not None and body.min_p > 0.0))
    return 0.0 if t < GREEDY_TEMPERATURE or truncated else t


def sampling_params(prep: PreparedRequest, index: int, extra_args: dict | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    b = prep.body
    seed = None if b.seed is None else b.seed + index
    if seed == -1:  # vLLM reads -1 as "no seed"; torch seeds -1 as 2**64 - 1: the same seed
        seed = (1 << 64) - 1
    greedy = b.top_p == 0.0  # vLLM wants top_p in (0, 1]
    return SamplingParams(
        n=1,
        max_tokens=prep.max_tokens,
        temperature=sampling_temperature(b),
        top_p=1.0 if b.top_p is None or greedy else b.top_p,
        presence_penalty=b.presence_penalty or 0.0,
        frequency_penalty=b.frequency_penalty or 0.0,
        top_k=0 if b.top_k is None else b.top_k,
        min_p=b.min_p or 0.0,
        repetition_penalty=1.0 if b.repetition_penalty is None else b.repetition_penalty,
        stop=b.stop_list or None,
        # With safety on, each output's text must be its own tokens' text, for withholding
        # token by token. Excluding stop strings makes vLLM hold back the text's last
        # characters and release them with a later output (a withheld run's text could ride
        # out with the next clean piece): so keep them, and cut them here (ChoiceState).
        include_stop_str_in_output=bool(b.stop_list) and extra_args is not None,
        seed=seed,
        ignore_eos=b.ignore_eos,
        logprobs=(b.top_logprobs or 0) if b.logprobs else None,
        # A forced token (the refusal, end-of-sequence) is the only finite logit its step has:
        # no bias moves it (tested).
        logit_bias=b.logit_bias_ids,
        structured_outputs=_structured_outputs(b),
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )
