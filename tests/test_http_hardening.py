"""Hardening of the HTTP layer: bad input is a clear OpenAI-style 4xx naming the field (never a
500, a dropped connection or lost state), large bodies are bounded and never stall the event
loop, streams end cleanly on failure, and every request is counted once with its status.

Most cases run in-process (no engine, or a scripted fake engine); the rest use the session's
shared real server (conftest ``server``)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from safeserve.models.taxonomy import Taxonomy
from safeserve.server import completions, prepare
from safeserve.server.app import create_app
from safeserve.server.engine import Engine, EngineSpec
from safeserve.server.errors import APIError
from safeserve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
)
from safeserve.server.safety_config import SafetyConfig, SafetyPolicy
from safeserve.server.safety_service import disabled_report
from safeserve.server.safety_tracker import TelemetryHub
from safeserve.server.settings import Settings

BENIGN = [{"role": "user", "content": "Say hi."}]
LIMIT = 4096


def requests_total(status: str, stream: str) -> float:
    return REGISTRY.get_sample_value("safeserve_requests_total",
                                     {"status": status, "stream": stream}) or 0.0


def stream_errors(kind: str) -> float:
    return REGISTRY.get_sample_value("safeserve_stream_errors_total", {"type": kind}) or 0.0


def _error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- in-process app

@pytest.fixture()
def client(tmp_path):
    """The app with a safety policy and no started engine: a request that passes validation,
    authentication and safety authorization stops at 503 (engine not ready)."""
    settings = Settings(max_request_body_bytes=LIMIT)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    app = create_app(Engine(settings, spec), (SafetyPolicy(Taxonomy.load()), TelemetryHub()))
    return TestClient(app)


def post_raw(client, raw: bytes, **headers):
    return client.post("/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json", **headers})


def body(**extra) -> dict:
    return {"model": "m", "messages": BENIGN, **extra}


S = "\\ud800"  # a lone surrogate, as JSON escapes it


@pytest.mark.parametrize("raw,param", [
    ('{"model":"m","messages":[{"role":"user","content":"%s hi"}]}' % S, "messages.0.content"),
    ('{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"%s"}]}]}' % S,
     "messages.0.content.0.text"),
    ('{"model":"m","stream":true,"messages":[{"role":"user","content":"%s"}]}' % S,
     "messages.0.content"),
    ('{"model":"%s","messages":[{"role":"user","content":"hi"}]}' % S, "model"),
    ('{"model":"m","stop":["%s"],"messages":[{"role":"user","content":"hi"}]}' % S, "stop.0"),
    ('{"model":"m","stop":"%s","messages":[{"role":"user","content":"hi"}]}' % S, "stop"),
    ('{"model":"m","safety_config":{"allow":["%s"]},"messages":[{"role":"user","content":"hi"}]}'
     % S, "safety_config.allow.0"),
    ('{"model":"m","safety_config":{"%s":1},"messages":[{"role":"user","content":"hi"}]}' % S,
     "safety_config"),
    ('{"model":"m","%s":1,"messages":[{"role":"user","content":"hi"}]}' % S, None),
])
def test_lone_surrogates_are_a_400_naming_the_field(client, raw, param):
    err = _error(post_raw(client, raw.encode()), 400, code="invalid_string")
    assert err["param"] == param
    assert "lone surrogate" in err["message"]


def test_lone_surrogate_in_the_safety_header_is_a_400(client):
    r = client.post("/v1/chat/completions", json=body(),
                    headers={"X-Safety-Config": '{"allow": ["%s"]}' % S})
    _error(r, 400, "X-Safety-Config.allow.0", "invalid_string")


def test_error_responses_survive_unencodable_text():
    e = APIError(404, "The model `\ud800` does not exist.", param="\udfff")
    payload = json.loads(e.response().body)
    assert payload["error"]["message"] == "The model `\ufffd` does not exist."
    assert payload["error"]["param"] == "\ufffd"
    ok = APIError(400, "emoji \U0001F3AE stays")  # a valid pair is untouched
    assert json.loads(ok.response().body)["error"]["message"] == "emoji \U0001F3AE stays"


@pytest.mark.parametrize("seed,ok", [(2 ** 64, False), (2 ** 80, False), (-2 ** 63 - 1, False),
                                     (2 ** 63 - 1, True), (-2 ** 63, True), (7, True)])
def test_seed_is_bounded_to_int64(client, seed, ok):
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json=body(seed=seed, stream=stream))
        if ok:
            assert r.status_code == 503, r.text  # valid: stopped only by the missing engine
        else:
            _error(r, 400, "seed")


@pytest.mark.parametrize("extra,param", [
    ({"n": "2"}, "n"), ({"n": True}, "n"), ({"n": 2.0}, "n"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"stream": "true"}, "stream"),
    ({"max_tokens": "8"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": "1"}, "top_p"), ({"seed": "7"}, "seed"), ({"seed": False}, "seed"),
    ({"ignore_eos": "no"}, "ignore_eos"), ({"add_generation_prompt": 0}, "add_generation_prompt"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_request_types_are_strict(client, extra, param):
    err = _error(client.post("/v1/chat/completions", json=body(**extra)), 400, param)
    assert err["message"].startswith(f"{param}: "), err  # the message names it too


def test_unparsable_bodies_are_invalid_json_errors(client):
    for raw in (b'{"model": "\xff\xfe"}', b"[" * 1800 + b"]" * 1800):
        r = client.post("/v1/chat/completions", content=raw,
                        headers={"Content-Type": "application/json"})
        _error(r, 400, code="invalid_json")


def test_json_numbers_still_pass(client):
    # an int where a float is expected is a number, not a coercion
    r = client.post("/v1/chat/completions", json=body(temperature=1, top_p=1, n=2, max_tokens=4))
    assert r.status_code == 503, r.text


def test_nulls_newer_openai_fields_and_stop_string_lengths(client):
    # null is the default inside stream_options too; safety_identifier is `user`'s successor
    for extra in ({"stream": True, "stream_options": {"include_usage": None,
                                                      "continuous_usage_stats": None}},
                  {"safety_identifier": "user-123"}, {"stop": "x" * 1000}):
        r = client.post("/v1/chat/completions", json=body(**extra))
        assert r.status_code == 503, (extra, r.text)  # valid: stopped by the missing engine
    # a stop string's length is held back from a stream: bounded
    for stop in ("x" * 1001, ["ok", "y" * 1001]):
        err = _error(client.post("/v1/chat/completions", json=body(stop=stop)), 400, "stop")
        assert "1000 characters" in err["message"]


@pytest.mark.parametrize("cfg,param", [
    ({"tau": "3"}, "tau"), ({"tau": True}, "tau"), ({"tau": 2.0}, "tau"),
    ({"threshold": "0.5"}, "threshold"), ({"threshold": True}, "threshold"),
    ({"threshold": {"violence": "0.4"}}, "threshold"), ({"holdback": "yes"}, "holdback"),
    ({"trace": 1}, "trace"), ({"explain_sentences": "1"}, "explain_sentences"),
    ({"explain_sentences": -1}, "explain_sentences"), ({"explain_sentences": 17}, "explain_sentences"),
    ({"threshold_shift": 1}, "threshold_shift"), ({"threshold_shift": "-1"}, "threshold_shift"),
    ({"threshold_shift": -8.5}, "threshold_shift"), ({"guideline": "x" * 2001}, "guideline"),
])
def test_safety_config_types_are_strict(client, cfg, param):
    r = client.post("/v1/chat/completions", json=body(safety_config=cfg))
    _error(r, 400, f"safety_config.{param}", "invalid_safety_config")
    r = client.post("/v1/chat/completions", json=body(),
                    headers={"X-Safety-Config": json.dumps(cfg)})
    _error(r, 400, f"X-Safety-Config.{param}", "invalid_safety_config")
    with pytest.raises(ValueError):
        SafetyConfig(**cfg)


def test_safety_config_numbers_still_pass():
    assert SafetyConfig(threshold=0.5, tau=3).tau == 3
    assert SafetyConfig(threshold={"violence": 0.25, "unsafe": 0.5}).threshold["violence"] == 0.25


@pytest.mark.parametrize("extra,param,words", [
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    ({"continue_final_message": True}, "continue_final_message", "add_generation_prompt=false"),
    ({"add_generation_prompt": False}, "add_generation_prompt", "continue_final_message=true"),
    ({"continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message", "'assistant'"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats", "include_usage"),
])
def test_combination_errors_say_what_is_wrong(client, extra, param, words):
    err = _error(client.post("/v1/chat/completions", json=body(**extra)), 400, param)
    assert words in err["message"] and "JSON object" not in err["message"]


def test_body_that_is_not_an_object_is_still_said_so(client):
    for raw in (b"[1, 2]", b'"hi"', b""):
        err = _error(post_raw(client, raw), 400, code="invalid_json")
        assert "JSON object" in err["message"]


def test_oversized_body_is_a_413(client):
    big = json.dumps(body(messages=[{"role": "user", "content": "x" * (LIMIT + 10)}])).encode()
    before = requests_total("413", "invalid")
    err = _error(post_raw(client, big), 413, code="request_too_large")
    assert str(LIMIT) in err["message"]

    def chunked():  # no Content-Length: caught while the body is read
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    _error(client.post("/v1/chat/completions", content=chunked(),
                       headers={"content-type": "application/json"}), 413, code="request_too_large")
    assert requests_total("413", "invalid") == before + 2
    # a body under the limit is served as before
    assert client.post("/v1/chat/completions", json=body()).status_code == 503


def test_edge_inputs_found_in_review_are_4xx_not_500(tmp_path):
    """A non-ASCII key (Starlette decodes headers as latin-1), a safety config nested past
    the JSON parser's recursion limit, a repeated safety header, OpenAI's nullable fields sent
    as null, and an unknown field that reads like a type tag."""
    settings = Settings(api_keys=["k"], max_request_body_bytes=4 * LIMIT)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    app = create_app(Engine(settings, spec), (SafetyPolicy(Taxonomy.load()), TelemetryHub()))
    client = TestClient(app, raise_server_exceptions=False)
    auth = {"Authorization": "Bearer k"}
    r = client.post("/v1/chat/completions", json=body(),
                    headers=[("Authorization", "Bearer \xe9t\xe9".encode("latin-1"))])
    _error(r, 401, code="invalid_api_key")
    # non-ASCII keys, sent as their UTF-8 bytes, authenticate (à ends in \xa0, Å in \x85:
    # bytes str.strip() would take)
    keys = ["cl\u00e9", "pass\u00e0", "\u00c5ngstr\u00f6m\u00c5"]
    utf8 = TestClient(create_app(Engine(Settings(api_keys=keys), spec),
                                 (SafetyPolicy(Taxonomy.load()), TelemetryHub())))
    for key in keys:
        r = utf8.post("/v1/chat/completions", json=body(),
                      headers=[("Authorization", f"Bearer {key}".encode("utf-8"))])
        _error(r, 503, code="engine_not_ready")
    deep = '{"allow":' + "[" * 3000 + "]" * 3000 + "}"
    for path in ("/v1/chat/completions", "/v1/moderations"):
        payload = body() if path.endswith("completions") else {"input": "hi"}
        r = client.post(path, json=payload, headers={**auth, "X-Safety-Config": deep})
        _error(r, 400, param="X-Safety-Config", code="invalid_safety_config")
        r = client.post(path, json={**payload, "safety_config": deep}, headers=auth)
        _error(r, 400, param="safety_config", code="invalid_safety_config")
    r = client.post("/v1/chat/completions", json=body(),
                    headers=[("Authorization", "Bearer k"), ("X-Safety-Config", "strict"),
                             ("X-Safety-Config", "annotate_only")])
    _error(r, 400, param="X-Safety-Config", code="invalid_header")
    r = client.post("/v1/chat/completions", json=body(stream=None, n=None), headers=auth)
    _error(r, 503, code="engine_not_ready")  # valid: null is the default
    for key in ("str", "a[b]"):
        r = client.post("/v1/chat/completions", json=body(**{key: 1}), headers=auth)
        _error(r, 400, param=key, code="unsupported_parameter")


def test_body_limit_setting_defaults_to_8_mib():
    assert Settings().max_request_body_bytes == 8 * 1024 * 1024
    assert Settings(max_request_body_bytes=1 << 20).max_request_body_bytes == 1 << 20


def test_each_request_is_counted_once_with_its_final_status(tmp_path):
    settings = Settings(api_keys=["k"])
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    c = TestClient(create_app(Engine(settings, spec),
                              (SafetyPolicy(Taxonomy.load()), TelemetryHub())))
    auth = {"Authorization": "Bearer k"}
    cases = [  # (request, status, stream label)
        (dict(json=body()), "401", "invalid"),
        (dict(json=body(n="2"), headers=auth), "400", "invalid"),
        (dict(json=body(model="nope"), headers=auth), "404", "unary"),
        (dict(json=body(safety_config={"allow": ["dragons"]}), headers=auth), "400", "unary"),
        (dict(json=body(stream=True), headers=auth), "503", "stream"),
    ]
    for kw, status, mode in cases:
        before = {s: requests_total(s, mode) for s in ("200", status)}
        r = c.post("/v1/chat/completions", **kw)
        assert str(r.status_code) == status, r.text
        assert requests_total(status, mode) == before[status] + 1, (kw, status, mode)
        if status != "200":
            assert requests_total("200", mode) == before["200"]


# ----------------------------------------------------------------------------- a fake engine

class FakeLLM:
    """An engine that produces ``tokens`` outputs, then fails with ``fail`` (if any)."""

    errored = False

    def __init__(self, tokens: int = 2, fail: BaseException | None = None):
        self.tokens, self.fail = tokens, fail

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace

        for i in range(self.tokens):
            await asyncio.sleep(0)
            out = SimpleNamespace(text=f"t{i} ", token_ids=[i], finish_reason=None,
                                  stop_reason=None, logprobs=None)
            yield SimpleNamespace(outputs=[out], finished=False)
        if self.fail is not None:
            raise self.fail
        out = SimpleNamespace(text="", token_ids=[], finish_reason="stop", stop_reason=None,
                              logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=True)

    async def abort(self, request_id):
        pass


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir))


def fake_engine(tokenizer, tmp_path, llm: FakeLLM) -> Engine:
    spec = EngineSpec(model_dir=tmp_path, served_name="m")  # served without a head
    engine = Engine(Settings(), spec)
    engine.llm, engine.tokenizer = llm, tokenizer
    engine.ready.set()
    return engine


def sse_events(text: str) -> list[str]:
    return [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]


def test_a_stream_that_fails_after_its_start_ends_with_an_error_event(tokenizer, tmp_path):
    engine = fake_engine(tokenizer, tmp_path, FakeLLM(fail=RuntimeError("engine died")))
    c = TestClient(create_app(engine), raise_server_exceptions=False)
    errors_before = stream_errors("server_error")
    ok_before = requests_total("200", "stream")
    r = c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and set(err) == {"message", "type", "param", "code"}
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert stream_errors("server_error") == errors_before + 1
    assert requests_total("200", "stream") == ok_before + 1
    assert REGISTRY.get_sample_value("safeserve_in_flight_requests") == 0


def test_an_input_error_from_the_engine_is_a_400_before_the_stream_and_an_event_after(
        tokenizer, tmp_path):
    engine = fake_engine(tokenizer, tmp_path, FakeLLM(tokens=0, fail=ValueError("bad params")))
    c = TestClient(create_app(engine))
    before = requests_total("400", "stream")
    err = _error(c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8)), 400)
    assert "bad params" in err["message"]
    assert requests_total("400", "stream") == before + 1
    assert REGISTRY.get_sample_value("safeserve_in_flight_requests") == 0
    engine.llm = FakeLLM(tokens=2, fail=ValueError("bad params"))
    r = c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "invalid_request_error" and "bad params" in err["message"]


def test_unexpected_engine_failure_is_a_clean_json_500(tokenizer, tmp_path):
    engine = fake_engine(tokenizer, tmp_path, FakeLLM(fail=RuntimeError("engine died")))
    c = TestClient(create_app(engine), raise_server_exceptions=False)
    before = requests_total("500", "unary")
    r = c.post("/v1/chat/completions", json=body(max_tokens=8))
    err = _error(r, 500)
    assert err["type"] == "server_error" and "engine died" not in err["message"]
    assert requests_total("500", "unary") == before + 1
    # and an input error the engine finds is a 400
    engine.llm = FakeLLM(tokens=0, fail=ValueError("bad params"))
    _error(c.post("/v1/chat/completions", json=body(max_tokens=8)), 400)
    # the app is still fine
    engine.llm = FakeLLM()
    r = c.post("/v1/chat/completions", json=body(max_tokens=8))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "t0 t1 "


def _engine_errors():
    from vllm.exceptions import QueueOverflowError, VLLMNotFoundError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    return [(VLLMValidationError("too many logprobs", parameter="logprobs"), 400, "logprobs"),
            (VLLMNotFoundError("no such adapter"), 404, None),
            (QueueOverflowError(), 503, "engine_busy"),
            (EngineDeadError(), 503, "engine_dead")]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("n", [1, 2])  # one choice, and the several-choices path
def test_what_vllm_rejects_is_the_clients_error_not_a_500(tokenizer, tmp_path, case, n):
    """vLLM's validation errors are no ValueError (they were caught as one: a 500), and its
    admission and dead-engine errors have their own status, streamed or not."""
    fail, status, detail = _engine_errors()[case]
    engine = fake_engine(tokenizer, tmp_path, FakeLLM(tokens=0, fail=fail))
    c = TestClient(create_app(engine), raise_server_exceptions=False)
    err = _error(c.post("/v1/chat/completions", json=body(max_tokens=8, n=n)), status)
    assert err["type"] == ("server_error" if status >= 500 else
                           "not_found_error" if status == 404 else "invalid_request_error")
    assert detail in (None, err["param"], err["code"]), err
    # streamed, the rejection is an HTTP error too: the response starts at the first output
    streamed = _error(c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8, n=n)),
                      status)
    assert streamed == err


def test_a_seed_of_minus_one_still_seeds(tokenizer, tmp_path):
    """vLLM reads seed -1 as "no seed": a client's -1 (or -2 with n = 2, whose second choice
    gets -1) goes to the engine as torch's own reading of -1."""
    prep = prepare.prepare_sync(fake_engine(tokenizer, tmp_path, FakeLLM()),
                                ChatCompletionRequest(**body(seed=-2, n=2)), None)
    seeds = [prepare.sampling_params(prep, i).seed for i in range(2)]
    assert seeds == [-2, (1 << 64) - 1]


def test_an_engine_that_dies_after_it_was_ready_stops_the_server(tokenizer, tmp_path,
                                                                monkeypatch):
    """Its core process killed (the out-of-memory killer): /ready says failed, requests get
    a 503 that says so, and the watchdog stops the server so a supervisor restarts it (it
    answered 503 "not ready yet" forever)."""
    from safeserve.server import engine as engine_mod

    monkeypatch.setattr(engine_mod, "WATCH_PERIOD_S", 0.01)
    llm = FakeLLM()
    llm.shutdown = lambda: None
    engine = Engine(Settings(), EngineSpec(model_dir=tmp_path, served_name="m"))
    monkeypatch.setattr(engine, "_build", lambda: llm)
    stopped = []
    engine.on_failure = lambda: stopped.append(True)

    async def run():
        await engine.start()
        engine.tokenizer = tokenizer
        assert engine.is_ready and not engine.failed
        await asyncio.sleep(0.05)
        assert not stopped  # alive: the watchdog lets it be
        llm.errored = True
        c = TestClient(create_app(engine))
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        _error(c.post("/v1/chat/completions", json=body(max_tokens=2)), 503, code="engine_dead")
        deadline = time.monotonic() + 10  # the watchdog's next period, on a loaded machine
        while not stopped and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert stopped == [True] and engine.error is not None
        engine.shutdown()
    asyncio.run(run())


def test_continuous_usage_stats_puts_usage_in_every_chunk(tokenizer, tmp_path):
    engine = fake_engine(tokenizer, tmp_path, FakeLLM(tokens=3))
    c = TestClient(create_app(engine))
    opts = {"include_usage": True, "continuous_usage_stats": True}
    r = c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8, stream_options=opts))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all("usage" in ch for ch in chunks)
    counts = [ch["usage"]["completion_tokens"] for ch in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 3
    assert chunks[-1]["choices"] == []
    # without it, only the final chunk has usage
    r = c.post("/v1/chat/completions", json=body(stream=True, max_tokens=8,
                                                  stream_options={"include_usage": True}))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert [("usage" in ch) for ch in chunks] == [False] * (len(chunks) - 1) + [True]


def test_streamed_safety_report_keeps_its_nulls_and_chunks_stay_lean():
    report = disabled_report(True)
    ch = ChatCompletionChunk(id="x", created=1, model="m",
                             choices=[ChunkChoice(index=0, delta=Delta(content="a"),
                                                  finish_reason="stop")], safety=report)
    data = json.loads(completions._sse(ch)[6:])
    assert data["safety"] == report.model_dump(mode="json")
    assert "query" in data["safety"] and data["safety"]["query"] is None
    assert "token_index" in data["safety"]["response"]
    assert "usage" not in data and "role" not in data["choices"][0]["delta"]
    lean = ChatCompletionChunk(id="x", created=1, model="m",
                               choices=[ChunkChoice(index=0, delta=Delta(content="a"))])
    plain = json.loads(completions._sse(lean)[6:])
    assert set(plain) == {"id", "object", "created", "model", "choices"}


def test_tokenization_runs_off_the_event_loop(tokenizer, tmp_path, monkeypatch):
    engine = fake_engine(tokenizer, tmp_path, FakeLLM())
    req = ChatCompletionRequest(model="m", messages=BENIGN)
    seen = []
    real = prepare.render_prompt

    def spy(*a, **kw):
        seen.append(threading.get_ident())
        return real(*a, **kw)

    monkeypatch.setattr(prepare, "render_prompt", spy)
    prep = asyncio.run(prepare.prepare(engine, req, None))
    assert prep.prompt_ids and seen and threading.get_ident() not in seen


class BlockingLLM(FakeLLM):
    """An engine whose request takes ``seconds`` to finish (then answers), recording the ids
    it was given and those it was asked to abort."""

    def __init__(self, seconds: float = 5.0):
        super().__init__()
        self.seconds, self.started, self.aborted = seconds, [], []

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace

        self.started.append(request_id)
        await asyncio.sleep(self.seconds)
        out = SimpleNamespace(text="late", token_ids=[1, 2], finish_reason="stop",
                              stop_reason=None, logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=True)

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.mark.parametrize("path,payload,with_head", [
    ("/v1/chat/completions", body(max_tokens=8), False),
    ("/v1/chat/completions", body(max_tokens=8, stream=True), False),  # before its first output
    ("/v1/moderations", {"input": "hello"}, True),
])
def test_a_client_gone_while_the_engine_works_is_a_499_and_aborts_it(tokenizer, tmp_path,
                                                                      monkeypatch, path,
                                                                      payload, with_head):
    """Chat (a stream while it waits for its first output) and moderations watch the
    connection: once the client is gone the engine request is aborted (not left to finish for nobody) and the in-flight gauge drops."""
    from starlette.requests import Request

    llm = BlockingLLM()
    engine = fake_engine(tokenizer, tmp_path, llm)
    safety = None
    if with_head:
        engine.spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True,
                                 safety_enabled=True)
        safety = (SafetyPolicy(Taxonomy.load()), TelemetryHub())

    async def gone_once_started(self):  # connected until the engine holds the request
        return bool(llm.started)

    monkeypatch.setattr(Request, "is_disconnected", gone_once_started)
    c = TestClient(create_app(engine, safety))
    r = c.post(path, json=payload)
    assert r.status_code == 499, r.text  # cancelled, not waited out (that answers 200)
    assert llm.started and llm.aborted == llm.started
    assert REGISTRY.get_sample_value("safeserve_in_flight_requests") == 0


def test_a_handler_the_server_cancels_is_not_counted_as_a_client_gone():
    """uvicorn cancels handlers still running when its graceful-shutdown timeout ends: that is
    the server's doing (counted 500, what uvicorn answers), not a client's 499; a cancellation
    after the client's disconnect is a 499. The non-streaming watcher re-raises a cancellation
    it did not cause instead of turning it into a 499 response."""
    from starlette.requests import Request

    from safeserve.server.app import _unless_disconnected
    from safeserve.server.middleware import RequestAccounting

    def counted(status: str) -> float:
        return REGISTRY.get_sample_value("safeserve_requests_total",
                                         {"status": status, "stream": "invalid"}) or 0.0

    async def stuck(scope, receive, send):
        await asyncio.sleep(3600)

    async def waits_for_disconnect(scope, receive, send):
        while (await receive())["type"] != "http.disconnect":
            pass
        await asyncio.sleep(3600)

    async def run(app, messages):
        queue = asyncio.Queue()
        for m in messages:
            queue.put_nowait(m)
        accounting = RequestAccounting(app, path="/v1/chat/completions")
        scope = {"type": "http", "path": "/v1/chat/completions"}
        task = asyncio.create_task(accounting(scope, queue.get, None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = {s: counted(s) for s in ("499", "500")}
    asyncio.run(run(stuck, [{"type": "http.request", "body": b""}]))
    assert counted("500") == before["500"] + 1 and counted("499") == before["499"]
    asyncio.run(run(waits_for_disconnect, [{"type": "http.request", "body": b""},
                                           {"type": "http.disconnect"}]))
    assert counted("499") == before["499"] + 1 and counted("500") == before["500"] + 1

    async def watched():
        async def connected():
            return False

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
        request.is_disconnected = connected
        task = asyncio.create_task(_unless_disconnected(request, asyncio.sleep(3600)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # before: returned Response(499), swallowing the cancellation

    asyncio.run(watched())


# ----------------------------------------------------------------------------- the real server

def test_surrogates_leave_the_connection_usable(http, server):
    for raw in ('{"model":"%s","messages":[{"role":"user","content":"%s"}],"max_tokens":2}',
                '{"model":"%s","stream":true,"messages":[{"role":"user","content":"%s"}]}',
                '{"model":"%s","%s":1,"messages":[{"role":"user","content":"hi"}]}'):
        r = http.post("/v1/chat/completions", content=(raw % (server.model, S)).encode(),
                      headers={"content-type": "application/json"})
        _error(r, 400, code="invalid_string")
    # the same keep-alive connection serves the next request
    ok = http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN,
                                                 "max_tokens": 2})
    assert ok.status_code == 200


def test_huge_seed_in_a_stream_is_a_400_not_a_cut_stream(http, server):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN,
                                                "stream": True, "seed": 2 ** 64, "max_tokens": 2})
    _error(r, 400, "seed")
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN,
                                                "seed": 2 ** 63 - 1, "n": 2, "temperature": 1.0,
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_large_bodies_neither_stall_the_server_nor_get_parsed(http, server):
    # ~6 MB: under the 8 MiB limit, far over the context: tokenized off the event loop
    content = "hello " * 1_000_000
    big = json.dumps({"model": server.model, "messages": [{"role": "user", "content": content}]})
    result = {}

    def send():
        result["r"] = httpx.post(f"{server.url}/v1/chat/completions", content=big,
                                 headers={"content-type": "application/json"}, timeout=300)

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    answered = 0  # probes answered while the large request was still in flight
    while t.is_alive():
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        answered += t.is_alive()
        time.sleep(0.05)
    t.join()
    _error(result["r"], 400, "messages", "context_length_exceeded")
    assert answered >= 1, "no /health probe was answered while the large request was read"
    # generous for a loaded machine: an event loop held by the read or the tokenization
    # would hold every probe sent meanwhile until it is done
    assert worst < 10.0, f"/health took {worst:.2f}s while a large prompt was tokenized"

    # over the limit: refused from Content-Length, before anything is read or parsed
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (50 << 20),
                   headers={"content-type": "application/json"}, timeout=120)
    _error(r, 413, code="request_too_large")
    assert time.perf_counter() - t0 < 20


def test_chunked_oversized_body_is_a_413(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (1 << 20)
        try:
            for _ in range(12):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer before we are done
        reply = b""
        while b"\r\n\r\n" not in reply:
            got = s.recv(65536)
            if not got:
                break
            reply += got
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_safety_header_is_decoded_as_utf8(http, server):
    guideline = "Ünïcødé guideline 🎮 — keep it friendly"
    cfg = json.dumps({"guideline": guideline}, ensure_ascii=False).encode()
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN,
                                                "max_tokens": 2},
                  headers={"X-Safety-Config": cfg})
    assert r.status_code == 200, r.text
    assert r.json()["safety"]["config"]["guideline"] == guideline
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN},
                  headers={"X-Safety-Config": b'{"guideline": "\xff\xfe"}'})
    _error(r, 400, "X-Safety-Config", "invalid_header")


def _keys(report: dict) -> tuple:
    return sorted(report), sorted(report["response"])


@pytest.mark.parametrize("headers", [{}, {"X-Safety-Trace": "1"}])
def test_streamed_and_unary_safety_objects_have_the_same_keys(http, server, headers):
    req = {"model": server.model, "messages": BENIGN, "max_tokens": 4, "temperature": 0}
    unary = http.post("/v1/chat/completions", json=req, headers=headers).json()["safety"]
    final = None
    with http.stream("POST", "/v1/chat/completions", json={**req, "stream": True},
                     headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                d = json.loads(line[6:])
                if d.get("safety"):
                    final = d
                assert "usage" not in d  # nulls are kept in the safety object only
                for ch in d["choices"]:
                    assert "logprobs" not in ch
    assert final is not None
    assert _keys(final["safety"]) == _keys(unary)
    assert "query" in final["safety"] and "token_index" in final["safety"]["response"]
    assert ("trace" in final["safety"]) and (final["safety"]["trace"] is None) == (not headers)


def test_streamed_request_is_counted_once_when_done(http, server):
    from test_server import metric

    before = metric(http, "safeserve_requests_total", status="200", stream="stream")
    invalid = metric(http, "safeserve_requests_total", status="400", stream="invalid")
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": server.model, "messages": BENIGN, "max_tokens": 3,
                           "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert metric(http, "safeserve_requests_total", status="200", stream="stream") == before + 1
    http.post("/v1/chat/completions", json={"model": server.model, "messages": BENIGN, "n": "2"})
    assert metric(http, "safeserve_requests_total", status="400", stream="invalid") == invalid + 1


def test_moderations_and_models_are_counted_by_path_and_status(client):
    def api_total(path: str, status: int) -> float:
        return REGISTRY.get_sample_value("safeserve_api_requests_total",
                                         {"path": path, "status": str(status)}) or 0.0

    for method, path, label, kwargs in (
            ("get", "/v1/models", "/v1/models", {}),
            ("get", "/v1/models/no-such-model", "/v1/models/{id}", {}),
            ("post", "/v1/moderations", "/v1/moderations", {"content": b"{not json"}),
            ("post", "/v1/moderations", "/v1/moderations", {"json": {"input": "hi"}})):
        before = {s: api_total(label, s) for s in (200, 400, 404, 503)}
        status = getattr(client, method)(path, **kwargs).status_code
        assert status in before, status
        assert api_total(label, status) == before[status] + 1, (path, status)
    client.get("/health")
    assert REGISTRY.get_sample_value("safeserve_api_requests_total",
                                     {"path": "/health", "status": "200"}) is None


def test_empty_openai_fields_are_accepted_and_real_ones_named(client):
    # the official client's `message.model_dump()` sends these back as null; SDKs fill defaults
    echoed = {"role": "assistant", "content": "Hello.", "refusal": None, "annotations": None,
              "audio": None, "function_call": None, "tool_calls": None}
    ok = body(messages=[{"role": "user", "content": "hi"}, echoed,
                        {"role": "user", "content": "more"}],
              tools=None, logit_bias={}, response_format={"type": "text"}, tool_choice="none",
              top_p=0, audio=None, service_tier="auto", reasoning_effort=None, prediction=None,
              ignore_eos=None, add_generation_prompt=None, continue_final_message=None)
    r = client.post("/v1/chat/completions", json=ok)
    _error(r, 503, code="engine_not_ready")  # validated: only the engine is missing
    for extra, param in (({"response_format": {"type": "json"}}, "response_format.type"),
                         ({"response_format": {"type": "json_schema"}},
                          "response_format.json_schema"),
                         ({"response_format": {"type": "json_object", "json_schema": {
                             "name": "x", "schema": {}}}}, "response_format.json_schema"),
                         ({"response_format": {"type": "json_schema", "json_schema": {
                             "name": "no spaces", "schema": {}}}},
                          "response_format.json_schema.name"),
                         ({"tools": [{"type": "function"}]}, "tools"),
                         ({"logit_bias": {"the": -100}}, "logit_bias"),
                         ({"logit_bias": {"-5": 1}}, "logit_bias"),
                         ({"logit_bias": {"5": 100.5}}, "logit_bias"),
                         ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
                         ({"logit_bias": {"12345678901": 1}}, "logit_bias"),
                         ({"response_format": {"type": "json_schema", "json_schema": {
                             "name": "x", "schema": _nested(65)}}},
                          "response_format.json_schema.schema"),
                         ({"service_tier": "flex"}, "service_tier"),
                         ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"),
                         ({"top_k": 1 << 31}, "top_k"), ({"min_p": 1.5}, "min_p"),
                         ({"repetition_penalty": 0}, "repetition_penalty"),
                         ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                         ({"repetition_penalty": 1e-40}, "repetition_penalty"),
                         ({"repetition_penalty": "1.1"}, "repetition_penalty")):
        _error(client.post("/v1/chat/completions", json=body(**extra)), 400, param=param)
    # a bias in range passes validation (here only the engine is missing)
    r = client.post("/v1/chat/completions", json=body(logit_bias={"5": -100, "7": 2.5}))
    _error(r, 503, code="engine_not_ready")
    r = client.post("/v1/chat/completions", json=body(top_k=-1, min_p=0.05, repetition_penalty=1))
    _error(r, 503, code="engine_not_ready")
    with pytest.raises(ValueError, match="over 32768 bytes"):
        ChatCompletionRequest.model_validate(body(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["x" * 40000]}}}))
    # over this client's body limit: int() refuses over 4300 digits (a 500 later, once), and
    # a schema as deep as the parser allows would overflow the stack when re-encoded
    with pytest.raises(ValueError, match="out of range"):
        ChatCompletionRequest.model_validate(body(logit_bias={"9" * 4301: 1}))
    with pytest.raises(ValueError, match="deeper than 64 levels"):
        ChatCompletionRequest.model_validate(body(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": _nested(900)}}))
    ChatCompletionRequest.model_validate(body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": _nested(63)}}))
    with pytest.raises(ValueError, match="at most 1024 entries"):  # over the client's body limit
        ChatCompletionRequest.model_validate(body(logit_bias={str(i): 1 for i in range(1025)}))
    bad = dict(echoed, tool_calls=[{"id": "x"}])
    r = client.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": "hi"}, bad]))
    _error(r, 400)


def _nested(depth: int) -> dict:
    schema = {}
    for _ in range(depth):
        schema = {"not": schema}
    return schema


def test_the_trace_header_is_a_switch_and_anything_else_is_named(client):
    for value in ("1", "true", "YES", "0", "false", "no", ""):
        r = client.post("/v1/chat/completions", json=body(), headers={"X-Safety-Trace": value})
        _error(r, 503, code="engine_not_ready")  # validated: only the engine is missing
    for value in ("2", "on", "tru"):  # misread as off, a trace would silently not come
        r = client.post("/v1/chat/completions", json=body(), headers={"X-Safety-Trace": value})
        _error(r, 400, param="X-Safety-Trace")


def test_engine_endings_outside_openai_are_errors_or_stop():
    def ending(reason):
        c = completions.ChoiceState(0, "r-0")
        c.finish_reason = reason
        try:
            completions._raise_engine_failure(c)
        except APIError as e:
            return e.status, e.code
        return c.finish_reason

    assert ending("error") == (500, "engine_error")
    assert ending("abort") == (503, "engine_aborted")
    assert ending("repetition") == "stop"
    assert ending("length") == "length" and ending("stop") == "stop"


def test_a_request_the_engine_failed_counts_as_aborted_not_as_a_latency():
    """`error` / `abort` endings from the engine are failures: the aborted-requests counter
    takes them (once per request) and the end-to-end latency histogram does not."""
    from types import SimpleNamespace

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    prep = SimpleNamespace(prompt_ids=[1, 2, 3], arrival=time.perf_counter())
    for reasons, aborted, latencies in ((["stop"], 0, 1), (["error"], 1, 0),
                                        (["length", "abort"], 1, 0), (["stop", None], 0, 0)):
        choices = [completions.ChoiceState(i, f"r{i}") for i in range(len(reasons))]
        for c, r in zip(choices, reasons):
            c.finish_reason = r
        before = (sample("safeserve_aborted_requests_total"),
                  sample("safeserve_e2e_request_latency_seconds_count"))
        completions._close(None, prep, choices)
        assert sample("safeserve_aborted_requests_total") == before[0] + aborted, reasons
        assert sample("safeserve_e2e_request_latency_seconds_count") == before[1] + latencies


def test_bodies_that_would_cost_the_event_loop_are_refused_early(client):
    """A body nested as deep as the JSON parser allows is a 400, not a RecursionError's 500;
    a conversation of more than MAX_MESSAGES messages is refused before its messages are
    validated one by one; text parts sent to moderation are one input, however many."""
    from pydantic import ValidationError

    from safeserve.server.protocol import MAX_MESSAGES

    def quickest(validate, tries: int = 3) -> float:
        """The fastest of a few timings: a loaded machine's pauses are not the code's."""
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            validate()
            best = min(best, time.perf_counter() - t0)
        return best

    def refused(model, data):
        with pytest.raises(ValidationError) as e:
            model.model_validate(data)
        return e.value

    def refused_before_walking(model, data, accepted) -> bool:
        """Whether refusing ``data`` (50 or more times the cap) takes less than 5 times
        validating ``accepted`` (the largest body of its shape under the cap) does, with a
        0.5 s floor: walking it one item at a time would take 50 times that or more."""
        bound = max(0.5, 5 * quickest(lambda: model.model_validate(accepted)))
        return quickest(lambda: refused(model, data)) < bound

    for depth in (200, 900, 960, 1000, 1900):
        raw = ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
               '"safety_config": {"a": ' + "[" * depth + "]" * depth + "}}").encode()
        r = post_raw(client, raw)
        assert r.status_code == 400, (depth, r.status_code)
    from safeserve.server.protocol import ChatCompletionRequest

    many = [{"role": "user", "content": ""}] * (MAX_MESSAGES * 50)
    (error,) = refused(ChatCompletionRequest, body(messages=many)).errors()
    assert error["ctx"]["param"] == "messages" and str(MAX_MESSAGES) in error["msg"]
    ChatCompletionRequest.model_validate(body(messages=many[:MAX_MESSAGES]))
    # checked before the messages are walked
    assert refused_before_walking(ChatCompletionRequest, body(messages=many),
                                  body(messages=many[:MAX_MESSAGES]))
    parts = [{"type": "text", "text": "a"}] * 40
    r = client.post("/v1/moderations", json={"input": parts})
    assert r.status_code == 503, r.text  # past validation: the engine is not started here
    # text parts over all messages, and moderation inputs, are capped before they are walked
    from safeserve.server.protocol import MAX_TEXT_PARTS, ModerationRequest

    one = {"role": "user", "content": [{"type": "text", "text": "a"}] * (MAX_TEXT_PARTS * 50)}
    capped = one["content"][:MAX_TEXT_PARTS]
    for model, data, accepted, param in (
            (ChatCompletionRequest, body(messages=[one]),
             body(messages=[{**one, "content": capped}]), "messages"),
            (ModerationRequest, {"input": [""] * 10**6}, {"input": [""] * 32}, "input"),
            (ModerationRequest, {"input": one["content"]}, {"input": capped}, "input")):
        assert refused(model, data).errors()[0]["ctx"]["param"] == param
        assert refused_before_walking(model, data, accepted), param


def test_a_body_of_millions_of_tiny_values_is_refused_before_anything_walks_them(tmp_path):
    """Found in review: 8 MiB of ``[0,0,...]`` under any field (safety_config, a schema's enum,
    an unknown key of a message, stop) was walked value by value on the event loop before
    its 400, holding every other request, /health included, for 4-24 s. The body's values
    are now counted first, stopping at the bound (server/body_json.py)."""
    from safeserve.server.body_json import MAX_JSON_VALUES, values_over

    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    client = TestClient(create_app(Engine(Settings(), spec),  # the default 8 MiB body limit
                                   (SafetyPolicy(Taxonomy.load()), TelemetryHub())))
    zeros = "[" + ",".join(["0"] * 3_000_000) + "]"
    for where in ('"safety_config": {"x": %s}', '"stop": %s',
                  '"response_format": {"type": "json_schema", "json_schema": {"name": "a", '
                  '"schema": {"enum": %s}}}',
                  '"messages": [{"role": "user", "content": "hi", "junk": %s}]'):
        messages = ('' if where.startswith('"messages"')
                    else '"messages": [{"role": "user", "content": "hi"}], ')
        raw = ('{"model": "m", ' + messages + (where % zeros) + "}").encode()
        t0 = time.perf_counter()
        r = post_raw(client, raw)
        took = time.perf_counter() - t0
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_long", r.text[:300]
        assert str(MAX_JSON_VALUES) in r.json()["error"]["message"]
        assert took < 3.0, (where, took)  # ~0.3 s of native parsing; walking it took 4-24 s
    # the same in the header's JSON
    r = post_raw(client, json.dumps(body()).encode(),
                 **{"X-Safety-Config": '{"x": ' + zeros[:400_000] + "]}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Safety-Config", r.text
    # the bound is far above any real request: the largest conversation the caps allow
    big = body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}]
               * 1024, logit_bias={str(i): 1 for i in range(1024)}, stop=["a", "b", "c", "d"])
    assert not values_over(big, MAX_JSON_VALUES)
    assert post_raw(client, json.dumps(big).encode()).status_code == 503  # past validation


@pytest.mark.parametrize("raw,key", [
    ('{"model": "m", "model": "x", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
     '"messages": [{"role": "user", "content": "How do I build a bomb?"}]}', "messages"),
    ('{"model": "m", "messages": [{"role": "user", "role": "system", "content": "hi"}]}',
     "role"),
    ('{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
     '"safety_config": {"tau": 4, "tau": 2}}', "tau"),
])
def test_a_key_repeated_in_the_body_is_a_400(client, raw, key):
    """Found in review: a repeated key silently took its last value, while a gateway or audit
    log reading the first would see another conversation or config (the X-Safety-Config
    header already refused them)."""
    for path in ("/v1/chat/completions", "/v1/moderations"):
        r = client.post(path, content=raw.replace('"messages"', '"input"' if path.endswith(
            "moderations") else '"messages"').encode(),
            headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        named = "input" if key == "messages" and path.endswith("moderations") else key
        assert err["code"] == "repeated_key" and f"'{named}'" in err["message"], err


def test_a_wrong_method_is_a_405_that_says_which_are_allowed(client):
    err = _error(client.put("/v1/chat/completions", json=body()), 405)
    assert err["type"] == "invalid_request_error"
    assert client.put("/v1/chat/completions", json=body()).headers["allow"] == "POST"


def test_with_keys_a_request_without_one_is_refused_before_its_body_is_read(tmp_path):
    """Invalid JSON, or an oversized body, from a client without a key is a 401 (counted),
    not a 400 or 413 from parsing it."""
    settings = Settings(api_keys=["k"], max_request_body_bytes=LIMIT)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    client = TestClient(create_app(Engine(settings, spec),
                                   (SafetyPolicy(Taxonomy.load()), TelemetryHub())))
    before = REGISTRY.get_sample_value("safeserve_requests_total",
                                       {"status": "401", "stream": "invalid"}) or 0.0
    for raw in (b"{bad", b"x" * (LIMIT + 10)):
        _error(post_raw(client, raw), 401, code="invalid_api_key")
    assert REGISTRY.get_sample_value("safeserve_requests_total",
                                     {"status": "401", "stream": "invalid"}) == before + 2
    _error(client.post("/v1/moderations", content=b"{bad",
                       headers={"content-type": "application/json"}), 401)
    _error(post_raw(client, b"{bad", Authorization="Bearer k"), 400, code="invalid_json")


def test_errors_say_what_is_wrong_with_nan_and_non_text_parts(client):
    raw = json.dumps(body(temperature=float("nan"))).encode()  # json.dumps writes NaN
    err = _error(post_raw(client, raw), 400, "temperature")
    assert "finite" in err["message"]
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    err = _error(client.post("/v1/chat/completions", json=body(messages=[
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "see"}, image]}])),
        400, "messages.1.content")
    assert "only text content parts" in err["message"] and "image_url" in err["message"]


def test_a_telemetry_socket_that_cannot_bind_leaves_no_directory_behind(tmp_path, monkeypatch):
    from pathlib import Path

    from safeserve.server import safety_wire as W

    monkeypatch.setenv(W.TELEMETRY_ENV, "unset")  # restored after: export_address sets it
    hub = TelemetryHub()

    async def cannot_bind():
        raise OSError("address too long")

    monkeypatch.setattr(hub, "start", cannot_bind)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    app = create_app(Engine(Settings(), spec), (SafetyPolicy(Taxonomy.load()), hub))
    with pytest.raises(OSError, match="address too long"):
        with TestClient(app):
            pass
    assert hub._dir is not None and not Path(hub._dir).exists()


def test_a_stream_whose_client_left_before_its_first_write_is_closed():
    """Starlette cancels a streaming response whose client is gone; a body it never iterated
    does not close what it wraps, so the response closes the event stream itself (it holds
    the engine request, the tracker and the in-flight count)."""
    import asyncio

    from safeserve.server.app import ClosingStreamingResponse

    closed = []

    async def events():
        try:
            yield "data: 1\n\n"
            await asyncio.sleep(10)
        finally:
            closed.append("events")

    async def body(stream):
        async for item in stream:
            yield item

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(10)  # the client is gone: the write never completes

    async def run():
        stream = events()
        await stream.__anext__()  # as the app does: the first event before the response
        response = ClosingStreamingResponse(body(stream), events=stream,
                                            media_type="text/event-stream")
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST",
                 "path": "/", "headers": []}
        await asyncio.wait_for(response(scope, receive, send), 5)
        assert closed == ["events"]  # now, not when the loop shuts down its generators

    asyncio.run(run())


def test_a_schema_whose_patterns_would_take_seconds_to_compile_is_refused():
    """A regex repetition makes the schema's grammar cost grow with its square (a{20000}:
    23 s, in the request's path): bounded per repetition and over the schema."""
    from safeserve.server.protocol import _pattern_repeats

    def fmt(schema):
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}

    ok = body(response_format=fmt({"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
        "email": {"type": "string", "pattern": "[a-z]{1,64}@[a-z]{1,255}"}}}))
    ChatCompletionRequest.model_validate(ok)
    for schema, why in (({"type": "string", "pattern": "[a-z]{1,20000}"}, "up to 20000"),
                        ({"type": "object", "patternProperties": {"^k{5000,}$": {}}},
                         "up to 5000"),
                        ({"type": "array", "items": [{"type": "string", "pattern": "a{900}"}] * 5},
                         "4500 times in all")):
        with pytest.raises(ValueError, match=why):
            ChatCompletionRequest.model_validate(body(response_format=fmt(schema)))
    # a literal brace is no repetition; an escaped backslash before one is
    assert _pattern_repeats(r"\{9999\}a{2,7}") == [7]
    assert _pattern_repeats("\\\\{77}") == [77]
    assert _pattern_repeats(r"\u{10000}\x{41}b{3}") == [3]  # code points, then a repetition
    data = {"type": "string", "default": {"pattern": "a{5000}"}, "enum": [{"pattern": "a{9999}"}]}
    ChatCompletionRequest.model_validate(body(response_format=fmt(data)))  # values, not regexes
    # string length bounds: ~2 s each from maxLength 200 on, distinct ones adding up (measured:
    # ten of them took 23 s); two long ones pass, as do many copies of one
    def strings(*bounds):
        return {"type": "object", "properties": {
            f"p{i}": {"type": "string", "maxLength": b} for i, b in enumerate(bounds)}}

    for fine in (strings(500, 400), strings(*[1000] * 40), strings(*range(1, 30))):
        ChatCompletionRequest.model_validate(body(response_format=fmt(fine)))
    with pytest.raises(ValueError, match="length bounds cost 768 units"):
        ChatCompletionRequest.model_validate(body(response_format=fmt(strings(1000, 1001, 1002))))
    data = {"type": "string", "default": {"maxLength": 5000}, "examples": [{"minLength": 9999}]}
    ChatCompletionRequest.model_validate(body(response_format=fmt(data)))  # data, not bounds


def test_each_api_key_has_its_own_prefix_cache_salt(tokenizer, tmp_path):
    """vLLM's prefix cache is shared by every request, so one key could time its requests
    against prompts another key's requests left in it; with keys, each key's requests carry a
    salt of its own (measured on the real engine: a second key's first request over the same
    800-token prompt hit 0 cached tokens, against 1408 for the first key's repeat). An open
    server, one tenant, adds none."""
    class RecordingLLM(FakeLLM):
        def __init__(self):
            super().__init__()
            self.prompts = []

        async def generate(self, prompt, params, request_id):
            self.prompts.append(prompt)
            async for out in super().generate(prompt, params, request_id):
                yield out

    def salts(keys: tuple[str, ...], sent: list[str | None]) -> list[str | None]:
        llm = RecordingLLM()
        engine = fake_engine(tokenizer, tmp_path, llm)
        engine.settings = Settings(api_keys=keys)
        c = TestClient(create_app(engine))
        for key in sent:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = c.post("/v1/chat/completions", json=body(max_tokens=2), headers=headers)
            assert r.status_code == 200, r.text
        assert all(p["prompt_token_ids"] == llm.prompts[0]["prompt_token_ids"]
                   for p in llm.prompts)
        return [p.get("cache_salt") for p in llm.prompts]

    a1, a2, b = salts(("key-a", "key-b"), ["key-a", "key-a", "key-b"])
    assert a1 == a2 and a1 != b and a1 and b
    assert "key-a" not in a1  # derived from the key, not the key
    assert salts((), [None]) == [None]
