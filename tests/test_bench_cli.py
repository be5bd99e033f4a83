"""`safeserve bench` commands end to end without an engine: `bench config`, the options every
command validates, and `bench leak` against a fake SafeServe (over real loopback HTTP, or an
httpx mock transport where a leak is planted on purpose)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import typer
from typer.testing import CliRunner

from safeserve.server.bench import register
from safeserve.server.bench_config import config_timings
from safeserve.server.bench_leak import (DEFAULT_BENIGN_PROMPT, LeakBenchError, _plan, _run,
                                         default_configs)

CONFIGS = default_configs(["violence", "weapons"])
BENIGN = DEFAULT_BENIGN_PROMPT
REFERENCES = 2 * len(CONFIGS)  # one per (prompt, config) pair


def _cli(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------ bench config

def test_bench_config_times_every_case_with_a_key_that_allows_them():
    rows = config_timings(3)
    assert [name for name, _ in rows] == ["no config (default preset)", "preset in header",
                                          "JSON object in header", "object in body"]
    assert all(math.isfinite(us) and us > 0 for _, us in rows)
    out = _cli("config", "--iterations", "2")
    assert out.exit_code == 0, out.output
    assert out.output.count("\n| ") == 4 and "| object in body |" in out.output


# ------------------------------------------------------------------------- option validation

@pytest.mark.parametrize("args", [
    ["serve", "--concurrency", "0"],
    ["serve", "--concurrency", "1,-8"],
    ["serve", "--concurrency", "x"],
    ["serve", "--requests-per-level", "-1"],
    ["serve", "--max-tokens", "0"],
    ["serve", "--passes", "0"],
    ["serve", "--instances", "-1"],
    ["serve", "--no-plain", "--skip-safety"],  # one server: nothing to compare
    ["config", "--iterations", "0"],
    ["leak", "--requests", "0"],
    ["leak", "--max-tokens", "0"],
])
def test_options_out_of_range_are_usage_errors(args):
    out = _cli(*args)
    assert out.exit_code == 2, out.output  # before any server is started or contacted
    assert "Traceback" not in out.output


# ------------------------------------------------------------------- a fake SafeServe server

def fake_completion(cfg: dict, safety: bool = True, prompt: str = "p") -> dict:
    """A fake server's answer: the benign prompt reads as safe, any other as violence and
    weapons; every setting of the config shows in the outcome (action, first flagged token =
    tau, thresholds, text), and the prompt in the scores and text."""
    benign = prompt == BENIGN
    refused = [] if benign else [c for c in ("violence", "weapons")
                                 if c not in cfg.get("allow", [])]
    action = cfg.get("on_violation", "refuse") if refused else "none"
    token = cfg.get("tau", 3) if refused else None
    text = ("I'm sorry." if action in ("refuse", "stop")
            else "Paris." if benign else f"Here goes ({len(refused)}).")
    scores = {"violence": 0.01, "weapons": 0.02} if benign else {"violence": 0.9, "weapons": 0.8}
    report = {"enabled": True, "model_has_head": True, "action": action,
              "prompt": {"flagged": bool(refused), "categories": refused, "scores": scores},
              "response": {"flagged": token is not None, "token_index": token,
                           "categories": refused},
              "config": cfg, "thresholds": {"violence": cfg.get("threshold", 0.5)}}
    if not safety:  # a server started with --allow-unsafe on a model without a head
        report = {"enabled": False, "model_has_head": False, "action": "none", "prompt": None}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "content_filter" if action == "stop" else "length"}],
            "safety": report}


def _answer(request: httpx.Request) -> dict:
    """The fake's answer to a mock transport's request."""
    body = json.loads(request.content)
    return fake_completion(body["safety_config"], prompt=body["messages"][0]["content"])


class FakeSafeServe(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # every test request may connect at once

    def __init__(self, key: str | None = None, safety: bool = True, hold: int = 0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.key, self.safety = key, safety
        # hold: the first `hold` requests after the references wait until all have arrived
        self.barrier = threading.Barrier(hold, timeout=20) if hold else None
        self.lock = threading.Lock()
        self.chat_calls, self.in_flight, self.max_in_flight, self.models = 0, 0, 0, set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeSafeServe

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._send(401, {"error": {"message": "missing or invalid API key",
                                       "type": "authentication_error"}})
            return False
        return True

    def do_GET(self):
        if self._authorized():
            self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        s = self.server
        with s.lock:
            s.chat_calls += 1
            batched = s.chat_calls > REFERENCES
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            s.models.add(body["model"])
        try:
            if s.barrier is not None and batched:
                s.barrier.wait()  # BrokenBarrierError (a 500) unless all arrive together
            self._send(200, fake_completion(body["safety_config"], s.safety,
                                            body["messages"][0]["content"]))
        except threading.BrokenBarrierError:
            self._send(500, {"error": {"message": "not all requests were in flight"}})
        finally:
            with s.lock:
                s.in_flight -= 1


@pytest.fixture()
def fake_server(request):
    server = FakeSafeServe(**getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------- bench leak

@pytest.mark.parametrize("fake_server", [{"key": "k-123"}], indirect=True)
def test_leak_with_an_api_key_and_no_model_asks_models_with_the_key(fake_server, tmp_path):
    out = _cli("leak", "--url", fake_server.url, "--api-key", "k-123", "--requests", "8",
               "--out", str(tmp_path / "leak.json"))
    assert out.exit_code == 0, out.output
    assert fake_server.models == {"fake"}  # found in /v1/models, with the key
    res = json.loads((tmp_path / "leak.json").read_text())
    assert (res["requests"], res["failed"], res["leaks"], res["text_mismatches"]) == (8, 0, 0, 0)
    assert [r["action"] for r in res["references"]] == ["none", "refuse", "stop", "annotate"]
    assert [r["action"] for r in res["benign_references"]] == ["none"] * 4
    assert res["requests_per_pair"] == {"main": [1, 1, 1, 1], "benign": [1, 1, 1, 1]}
    assert res["requests_per_config"] == [2, 2, 2, 2]
    assert res["prompts"]["benign"] == BENIGN
    assert "| 8 | 0 |" in out.output
    # the configs, then one row per (prompt, config) pair
    assert 'config 2: {"allow": [], "tau": 1, "on_violation": "stop", "threshold_shift": -2}' \
        in out.output
    assert "| main | 0 | 1 | none | length | - | - |" in out.output
    assert "| main | 2 | 1 | stop | content_filter | violence, weapons | 1 |" in out.output
    assert "| benign | 2 | 1 | none | length | - | - |" in out.output
    assert out.output.count("\n| benign | ") == 4 and "note: the benign" not in out.output


def test_leak_without_a_benign_prompt_sends_the_main_one_only(fake_server, tmp_path):
    out = _cli("leak", "--url", fake_server.url, "--requests", "8", "--benign-prompt", "",
               "--out", str(tmp_path / "leak.json"))
    assert out.exit_code == 0, out.output
    res = json.loads((tmp_path / "leak.json").read_text())
    assert res["requests_per_pair"] == {"main": [2, 2, 2, 2]} and res["benign_references"] == []
    assert "| benign |" not in out.output and out.output.count("\n| main | ") == 4
    assert fake_server.chat_calls == len(CONFIGS) + 8  # references, then the batch
    same = _cli("leak", "--url", fake_server.url, "--prompt", BENIGN)  # its default benign
    assert same.exit_code == 2 and "the benign prompt is the main prompt" in same.output


def test_a_benign_prompt_flagged_by_the_head_is_noted(fake_server):
    out = _cli("leak", "--url", fake_server.url, "--requests", "8", "--benign-prompt", "q")
    assert out.exit_code == 0, out.output  # the fake flags every prompt but its benign one
    assert "note: the benign prompt is flagged or acted on under config 1, 2, 3" in out.output


@pytest.mark.parametrize("fake_server", [{"key": "k-123"}], indirect=True)
def test_leak_without_the_key_is_a_one_line_error(fake_server):
    out = _cli("leak", "--url", fake_server.url, "--requests", "4")
    assert out.exit_code == 2
    assert "HTTP 401: missing or invalid API key (pass --api-key)" in out.output
    assert "Traceback" not in out.output and out.output.strip().count("\n") == 0


@pytest.mark.parametrize("fake_server", [{"safety": False}], indirect=True)
def test_leak_against_a_server_without_safety_is_a_one_line_error(fake_server):
    out = _cli("leak", "--url", fake_server.url, "--requests", "4")
    assert out.exit_code == 2
    assert "carries no safety report" in out.output
    assert "Traceback" not in out.output and out.output.strip().count("\n") == 0


@pytest.mark.parametrize("fake_server", [{"hold": 120}], indirect=True)
def test_leak_has_every_request_in_flight_at_once(fake_server):
    """More requests than httpx's default pool of 100 connections: all 120 must be at the
    server together (each waits until the last has arrived)."""
    res = asyncio.run(_run(fake_server.url, "fake", "p", CONFIGS, 120, 8, None,
                           benign_prompt=BENIGN))
    assert res["failed"] == 0, res["failure_examples"]
    assert fake_server.max_in_flight == 120 and res["leaks"] == 0


def _slot_leaking_server(leak_field: str, clean_calls: int):
    """A mock server with two batch slots (request j runs in slot j % 2) that leaks one field
    from the config of the slot's previous occupant: invisible when two configs alternate."""
    calls, slots = [0], {}

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        cfg, prompt = body["safety_config"], body["messages"][0]["content"]
        j, calls[0] = calls[0], calls[0] + 1
        answer = fake_completion(cfg, prompt=prompt)
        if j >= clean_calls:
            previous = slots.get(j % 2)
            slots[j % 2] = (cfg, prompt)
            if previous is not None:
                stale = fake_completion(*previous[:1], prompt=previous[1])
                answer["safety"]["response"][leak_field] = stale["safety"]["response"][leak_field]
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


def test_a_slot_reuse_leak_two_rows_apart_is_caught():
    """The permissive and the annotating config have the same text length and finish, but a
    different first flagged token: a leak of that token alone is a leak."""
    pair = [CONFIGS[0], CONFIGS[3]]
    assert _plan(24, 2, 0) != [i % 2 for i in range(24)]  # not alternating
    res = asyncio.run(_run("http://fake", "fake", "p", pair, 24, 8, None,
                           transport=_slot_leaking_server("token_index", clean_calls=4),
                           benign_prompt=BENIGN))
    assert res["leaks"] > 0 and res["failed"] == 0
    assert all(e["fields"] == ["response_token_index"] for e in res["leak_examples"])
    assert res["identical_text_rate"] == 1.0  # the text alone would not have shown it


def _prompt_swapping_server():
    """A mock server that answers each batched row on the previous row's prompt (hidden
    states swapped between rows), with the row's own config."""
    calls, last = [0], [None]

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = body["messages"][0]["content"]
        calls[0] += 1
        seen = prompt
        if calls[0] > REFERENCES:
            seen, last[0] = last[0] or prompt, prompt
        return httpx.Response(200, json=fake_completion(body["safety_config"], prompt=seen))

    return httpx.MockTransport(handle)


def test_rows_swapped_between_prompts_show_only_with_the_benign_prompt():
    """One prompt for every row hides a swap of hidden states between rows; the benign one
    mixed in shows it, in the prompt verdict."""
    one = asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 16, 8, None,
                           transport=_prompt_swapping_server()))
    assert (one["leaks"], one["text_mismatches"]) == (0, 0)  # seen as identical
    two = asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 16, 8, None,
                           transport=_prompt_swapping_server(), benign_prompt=BENIGN))
    assert two["leaks"] > 0 and two["failed"] == 0
    assert all("prompt_flagged" in e["fields"] for e in two["leak_examples"])
    assert {e["prompt"] for e in two["leak_examples"]} <= {"main", "benign"}
    assert two["max_prompt_score_drift"] > 0.5


def test_with_text_allowed_to_differ_only_what_precedes_generation_is_a_leak():
    """A batched text unlike its reference (tokens that batching changed) carries its own
    response verdicts: that is a text mismatch, not a leak; a prompt verdict that differs
    still is one."""
    from safeserve.server.bench_leak import _mismatches, _problems

    ref = {"text": "a b c", "action": "annotate", "prompt_flagged": False, "prompt_categories": [],
           "response_flagged": True, "response_token_index": 2, "response_categories": ["x"],
           "finish_reason": "length", "config": {"tau": 2, "on_violation": "annotate"},
           "thresholds": {"x": 0.4}}
    other_text = {**ref, "text": "a b d", "response_token_index": 3}
    assert _mismatches(ref, other_text) == []
    assert _mismatches(ref, {**other_text, "action": "none"}) == []  # the new text is clean
    assert _mismatches(ref, {**other_text, "prompt_flagged": True}) == ["prompt_flagged"]
    assert _mismatches(ref, {**ref, "response_token_index": 3}) == ["response_token_index"]
    res = {"failed": 0, "requests": 1, "leaks": 0, "text_mismatches": 1}
    assert _problems(res, text_may_differ=True) == []
    assert "texts differ" in _problems(res, text_may_differ=False)[0]


def test_with_text_allowed_to_differ_an_action_of_another_config_is_still_a_leak():
    """Whatever its text, a row acts only as its own (echoed, effective) config can: none or
    its on_violation (a refusal also ends in a stop when its unbounded explanation violates
    again), and a content_filter finish comes only with a stop."""
    from safeserve.server.bench_leak import _mismatches

    def ref(on_violation):
        return {"text": "a b c", "action": on_violation, "prompt_flagged": True,
                "prompt_categories": ["x"], "response_flagged": True,
                "response_token_index": 2, "response_categories": ["x"],
                "finish_reason": "length", "config": {"on_violation": on_violation},
                "thresholds": {"x": 0.4}}

    def got(r, action, finish="length"):
        return {**r, "text": "a b d", "action": action, "finish_reason": finish}

    annotate, refuse, stop = ref("annotate"), ref("refuse"), ref("stop")
    assert _mismatches(annotate, got(annotate, "refuse")) == ["action"]  # a neighbour's
    assert _mismatches(annotate, got(annotate, "stop", "content_filter")) == ["action"]
    assert _mismatches(annotate, got(annotate, "annotate", "content_filter")) == \
        ["finish_reason"]
    assert _mismatches(stop, got(stop, "refuse")) == ["action"]
    assert _mismatches(stop, got(stop, "stop", "content_filter")) == []
    assert _mismatches(stop, got(stop, "none")) == []
    assert _mismatches(refuse, got(refuse, "stop", "content_filter")) == []  # (no echo of
    # explain_sentences: perhaps unbounded)
    unbounded = {**refuse, "config": {"on_violation": "refuse", "explain_sentences": -1}}
    assert _mismatches(unbounded, got(unbounded, "stop", "content_filter")) == []
    bounded = {**refuse, "config": {"on_violation": "refuse", "explain_sentences": 1}}
    assert _mismatches(bounded, got(bounded, "stop", "content_filter")) == ["action"]
    assert _mismatches(bounded, got(bounded, "refuse")) == []
    assert _mismatches(refuse, got(refuse, "annotate")) == ["action"]
    assert _mismatches(refuse, got(refuse, "refuse", "content_filter")) == ["finish_reason"]
    default = {**refuse, "config": {}}  # an echo without on_violation: the default, refuse
    assert _mismatches(default, got(default, "annotate")) == ["action"]


def test_a_row_that_follows_a_neighbours_config_is_caught_when_texts_may_differ():
    """An annotating row refused (its text changed with it) is a leak, not only a text
    mismatch that --text-may-differ would let pass."""
    calls = [0]

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls[0] += 1
        answer = _answer(request)
        if calls[0] > REFERENCES and body["safety_config"].get("on_violation") == "annotate" \
                and body["messages"][0]["content"] != BENIGN:
            answer["safety"]["action"] = "refuse"  # config 1's action
            answer["choices"][0]["message"]["content"] = "I'm sorry."
        return httpx.Response(200, json=answer)

    res = asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 16, 8, None,
                           transport=httpx.MockTransport(handle), benign_prompt=BENIGN))
    assert res["leaks"] == res["text_mismatches"] == res["requests_per_pair"]["main"][3] == 2
    assert all(e["fields"] == ["action"] and e["config"] == CONFIGS[3]
               for e in res["leak_examples"])


def test_one_failed_request_is_reported_and_the_rest_still_compared():
    calls = [0]

    def handle(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] == REFERENCES + 3:
            return httpx.Response(503, json={"error": {"message": "engine busy"}})
        return httpx.Response(200, json=_answer(request))

    res = asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 12, 8, None,
                           transport=httpx.MockTransport(handle), benign_prompt=BENIGN))
    assert (res["requests"], res["completed"], res["failed"], res["leaks"]) == (12, 11, 1, 0)
    assert "HTTP 503: engine busy" in res["failure_examples"][0]["error"]
    assert res["identical_text_rate"] == 1.0


def test_a_missing_safety_report_stops_the_run_with_a_clear_error():
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=fake_completion(
        json.loads(r.content)["safety_config"], safety=False)))
    with pytest.raises(LeakBenchError, match="no safety report"):
        asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 4, 8, None, transport=transport))
    with pytest.raises(ValueError):
        asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 0, 8, None, transport=transport))


def test_the_default_configs_differ_in_several_settings_and_all_outcomes():
    keys = [set(c) for c in CONFIGS]
    assert len(CONFIGS) >= 3 and all(len(k) >= 2 for k in keys[1:])
    assert {c.get("on_violation", "refuse") for c in CONFIGS} == {"refuse", "stop", "annotate"}
    outcomes = [json.dumps(fake_completion(c)["choices"]) + str(fake_completion(c)["safety"]
                ["response"]) for c in CONFIGS]
    assert len(set(outcomes)) == len(CONFIGS)
    plan = _plan(10, 4, 1)
    assert sorted(plan) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3] and plan == _plan(10, 4, 1)
