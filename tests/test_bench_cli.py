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
from safeserve.server.bench_leak import LeakBenchError, _plan, _run, default_configs

CONFIGS = default_configs(["violence", "weapons"])


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

def fake_completion(cfg: dict, safety: bool = True) -> dict:
    """A fake server's answer: the prompt reads as violence and weapons; every setting of the
    config shows in the outcome (action, first flagged token = tau, thresholds, text)."""
    refused = [c for c in ("violence", "weapons") if c not in cfg.get("allow", [])]
    action = cfg.get("on_violation", "refuse") if refused else "none"
    token = cfg.get("tau", 3) if refused else None
    text = "I'm sorry." if action in ("refuse", "stop") else f"Here goes ({len(refused)})."
    report = {"enabled": True, "model_has_head": True, "action": action,
              "prompt": {"flagged": bool(refused), "categories": refused,
                         "scores": {"violence": 0.9, "weapons": 0.8}},
              "response": {"flagged": token is not None, "token_index": token,
                           "categories": refused},
              "config": cfg, "thresholds": {"violence": cfg.get("threshold", 0.5)}}
    if not safety:  # a server started with --allow-unsafe on a model without a head
        report = {"enabled": False, "model_has_head": False, "action": "none", "prompt": None}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "content_filter" if action == "stop" else "length"}],
            "safety": report}


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
            batched = s.chat_calls > len(CONFIGS)
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            s.models.add(body["model"])
        try:
            if s.barrier is not None and batched:
                s.barrier.wait()  # BrokenBarrierError (a 500) unless all arrive together
            self._send(200, fake_completion(body["safety_config"], s.safety))
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
    assert "| 8 | 0 |" in out.output


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
    res = asyncio.run(_run(fake_server.url, "fake", "p", CONFIGS, 120, 8, None))
    assert res["failed"] == 0, res["failure_examples"]
    assert fake_server.max_in_flight == 120 and res["leaks"] == 0


def _slot_leaking_server(leak_field: str, clean_calls: int):
    """A mock server with two batch slots (request j runs in slot j % 2) that leaks one field
    from the config of the slot's previous occupant: invisible when two configs alternate."""
    calls, slots = [0], {}

    def handle(request: httpx.Request) -> httpx.Response:
        cfg = json.loads(request.content)["safety_config"]
        j, calls[0] = calls[0], calls[0] + 1
        body = fake_completion(cfg)
        if j >= clean_calls:
            previous = slots.get(j % 2)
            slots[j % 2] = cfg
            if previous is not None:
                stale = fake_completion(previous)["safety"]["response"][leak_field]
                body["safety"]["response"][leak_field] = stale
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handle)


def test_a_slot_reuse_leak_two_rows_apart_is_caught():
    """The permissive and the annotating config have the same text length and finish, but a
    different first flagged token: a leak of that token alone is a leak."""
    pair = [CONFIGS[0], CONFIGS[3]]
    assert _plan(24, 2, 0) != [i % 2 for i in range(24)]  # not alternating
    res = asyncio.run(_run("http://fake", "fake", "p", pair, 24, 8, None,
                           transport=_slot_leaking_server("token_index", clean_calls=2)))
    assert res["leaks"] > 0 and res["failed"] == 0
    assert all(e["fields"] == ["response_token_index"] for e in res["leak_examples"])
    assert res["identical_text_rate"] == 1.0  # the text alone would not have shown it


def test_with_text_allowed_to_differ_only_what_precedes_generation_is_a_leak():
    """A batched text unlike its reference (tokens that batching changed) carries its own
    response verdicts: that is a text mismatch, not a leak; a prompt verdict that differs
    still is one."""
    from safeserve.server.bench_leak import _mismatches, _problems

    ref = {"text": "a b c", "action": "annotate", "prompt_flagged": False, "prompt_categories": [],
           "response_flagged": True, "response_token_index": 2, "response_categories": ["x"],
           "finish_reason": "length", "config": {"tau": 2}, "thresholds": {"x": 0.4}}
    other_text = {**ref, "text": "a b d", "response_token_index": 3}
    assert _mismatches(ref, other_text) == []
    assert _mismatches(ref, {**other_text, "prompt_flagged": True}) == ["prompt_flagged"]
    assert _mismatches(ref, {**ref, "response_token_index": 3}) == ["response_token_index"]
    res = {"failed": 0, "requests": 1, "leaks": 0, "text_mismatches": 1}
    assert _problems(res, text_may_differ=True) == []
    assert "texts differ" in _problems(res, text_may_differ=False)[0]


def test_one_failed_request_is_reported_and_the_rest_still_compared():
    calls = [0]

    def handle(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] == len(CONFIGS) + 3:
            return httpx.Response(503, json={"error": {"message": "engine busy"}})
        return httpx.Response(200, json=fake_completion(json.loads(request.content)
                                                        ["safety_config"]))

    res = asyncio.run(_run("http://fake", "fake", "p", CONFIGS, 12, 8, None,
                           transport=httpx.MockTransport(handle)))
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
