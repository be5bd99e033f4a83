"""`bench serve` bookkeeping: CPU accounting of a server's process tree, failed requests, the
pooled percentiles and the ratio table (the loads themselves run against real servers in
`safeserve bench serve`); the servers' shared settings; the kernel bench's DRAM pool and
bound; and `bench leak` against the real engine."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from safeserve.server.bench import _safe_model
from safeserve.server.bench_load import PROMPTS, LoadResult, _mean, _pct, run_load
from safeserve.server.bench_report import _failure_report, _table, geometric_interval
from safeserve.server.bench_servers import ENGINE_ENV, _Proc, _servers

# A parent that idles while its child burns about a second of CPU, then idles too.
_TREE = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', "
    "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 1.0: pass\\n"
    "time.sleep(60)'])\n"
    "time.sleep(60)\n"
)


def test_cpu_seconds_split_http_process_and_engine_children(tmp_path):
    proc = _Proc([sys.executable, "-c", _TREE], 0, tmp_path / "tree.log")
    try:
        deadline = time.time() + 30
        http, engine = proc.cpu_seconds()
        while engine < 0.9 and time.time() < deadline:
            time.sleep(0.2)
            http, engine = proc.cpu_seconds()
        assert engine >= 0.9  # the child's busy second, counted as the engine's
        assert http < 0.5  # the parent only slept
    finally:
        proc.stop()


def _result(server: str, tok_s: float, cpu_s: float) -> LoadResult:
    """One pass: 16 requests, 1000 tokens, ``cpu_s`` CPU seconds (a fifth of it HTTP); TTFT
    p50 1 s and p99 2 s, ITL p50 100 ms and p99 200 ms, with the samples behind them."""
    ttfts, itls = [1.0] * 15 + [2.0], [0.1] * 15 + [0.2]
    return LoadResult(server, 8, 16, 1000 / tok_s, 1000, 1.0, 2.0, 0.1, 0.2,
                      cpu_s * 0.2, cpu_s * 0.8, ttfts=ttfts, itls=itls)


def test_table_reports_cpu_per_token_and_its_ratio():
    off = _mean([_result("ours-off", 50, 4.0)] * 2)
    on = _mean([_result("ours-on", 40, 5.0)] * 2)  # passes are summed, not averaged
    assert (on.requests, on.output_tokens, on.seconds) == (32, 2000, 50.0)
    assert abs(on.cpu_ms_per_tok - 5.0) < 1e-9
    table = _table([off, on])
    assert ("| ours-on | 8 | 0.64 | 40.0 | 1000 | 2000 | 100.0 | 200.0 | 5.0 (1.0 + 4.0) "
            "| 0 / 32 |") in table
    assert "| ours-on / ours-off | 8 | 0.800 | - | - | 1.000 | 1.000 | 1.250 |" in table


def test_table_shows_the_spread_of_per_pass_ratios():
    raw = {("ours-off", 8): [_result("ours-off", 50, 4.0), _result("ours-off", 40, 4.0)],
           ("ours-on", 8): [_result("ours-on", 45, 4.0), _result("ours-on", 42, 4.0)]}
    table = _table([_mean(raw[("ours-off", 8)]), _mean(raw[("ours-on", 8)])], raw)
    assert ("| ours-on / ours-off | 8 | 0.978 | 0.900-1.050 | 0.972 [0.365, 2.588] (n=2) |"
            in table)


def test_pair_ratios_get_a_geometric_mean_and_a_t_interval_on_their_logs():
    mean, lo, hi = geometric_interval([0.95, 0.97, 0.99, 1.01])
    assert (round(mean, 4), round(lo, 4), round(hi, 4)) == (0.9797, 0.9395, 1.0217)
    mean, lo, hi = geometric_interval([2.0, 0.5])  # a ratio and its inverse: centred on 1
    assert mean == pytest.approx(1.0) and lo * hi == pytest.approx(1.0)
    assert geometric_interval([1.0] * 40) == (1.0, 1.0, 1.0)  # past the table: 1.96
    mean, lo, hi = geometric_interval([1.2])
    assert mean == pytest.approx(1.2) and math.isnan(lo) and math.isnan(hi)


def test_passes_combine_into_percentiles_of_the_pooled_samples():
    """A p99 over two passes is the p99 of all their samples, not the mean of two p99s."""
    calm = LoadResult("ours-on", 8, 100, 10.0, 1000, 1.0, 1.0, 0.1, 0.1, ttfts=[1.0] * 100,
                      itls=[0.1] * 100)
    spiky = LoadResult("ours-on", 8, 100, 10.0, 1000, 1.0, 5.0, 0.1, 0.1,
                       ttfts=[1.0] * 90 + [5.0] * 10, itls=[0.1] * 100)
    both = _mean([calm, spiky])
    assert both.ttft_p99 == 5.0  # the mean of the passes' p99s would say 3.0
    assert both.ttft_p50 == 1.0 and len(both.ttfts) == 200 and both.itl_p99 == 0.1


def test_percentiles_skip_nan_and_ratios_of_nothing_are_nan():
    assert _pct([float("nan"), 3.0, 1.0, float("nan")], 0.99) == 3.0
    assert math.isnan(_pct([float("nan")], 0.5))
    nothing = LoadResult("plain", 8, 4, 2.0, 0, *[float("nan")] * 4, failed=4, errors=["x"])
    ours = LoadResult("ours-off", 8, 4, 2.0, 100, 0.5, 0.6, 0.01, 0.02)
    assert nothing.tok_per_s == 0 and nothing.req_per_s == 0
    table = _table([nothing, ours])  # no ZeroDivisionError
    assert "| ours-off / plain | 8 | nan | - | - | nan | nan | nan |" in table
    assert "| 4 / 4 |" in table


def _sse(*events) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n"
                   for e in events).encode()


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def _fake_stream(request: httpx.Request) -> httpx.Response:
    """A streaming server that fails in each way a real one can, one prompt per way."""
    body = json.loads(request.content)
    prompt = body["messages"][0]["content"]
    good = _sse(_delta("a"), _delta("b"), _delta("c"),
                {"choices": [], "usage": {"completion_tokens": 3}}, "[DONE]")
    if body["max_tokens"] == 4 or prompt not in PROMPTS[1:5]:  # the warm-up, and the rest
        return httpx.Response(200, content=good)
    if prompt == PROMPTS[1]:  # the engine failed after the 200: an error event ends it
        return httpx.Response(200, content=_sse(_delta("a"), {"error": {
            "message": "boom", "type": "server_error"}}, "[DONE]"))
    if prompt == PROMPTS[2]:
        return httpx.Response(500, json={"error": {"message": "overloaded"}})
    if prompt == PROMPTS[3]:
        raise httpx.ReadError("connection reset", request=request)
    return httpx.Response(200, content=_sse(_delta("a"), _delta("b")))  # cut short


def test_failed_requests_are_counted_as_failures_not_successes():
    r = asyncio.run(run_load("http://fake", "bench", "ours-on", 4, 8, 16, {},
                             transport=httpx.MockTransport(_fake_stream)))
    assert (r.requests, r.failed, r.completed) == (8, 4, 4)
    assert r.output_tokens == 12 and len(r.ttfts) == 4 and len(r.itls) == 8
    assert r.req_per_s == pytest.approx(4 / r.seconds)
    assert any("error event: boom" in e for e in r.errors)
    assert any("HTTP 500: overloaded" in e for e in r.errors)
    assert any("ReadError" in e for e in r.errors)
    assert any("without [DONE]" in e for e in r.errors)
    report = _failure_report([r, _result("plain", 50, 1.0)])
    assert report.startswith("FAILED: 4 of 24 requests") and "ours-on c=4: 4 / 8 failed" in report
    assert _failure_report([_result("plain", 50, 1.0)]) is None


def test_every_server_gets_the_same_engine_settings_and_environment():
    import typer

    from safeserve.server.cli import app

    def opt(cmd, flag):
        return cmd[cmd.index(flag) + 1]

    servers = _servers(Path("/m"), Path("/s"), 9000, control=True)
    assert [s[0] for s in servers] == ["plain", "ours-off-b", "ours-off", "ours-on"]
    assert [opt(s[1], "--port") for s in servers] == ["9000", "9001", "9002", "9003"]
    plain, ours = servers[0][1], servers[2][1]
    for _, cmd, _, _, env in servers:
        assert env == ENGINE_ENV and env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
        assert (opt(cmd, "--dtype"), opt(cmd, "--max-model-len"), opt(cmd, "--max-num-seqs")) \
            == ("float32", "2048", "64")
    # the same KV-cache bytes, in each CLI's unit (ours: GiB, as the engine converts it)
    assert int(opt(plain, "--kv-cache-memory-bytes")) == int(float(opt(ours, "--kv-cache-gib"))
                                                             * (1 << 30))
    serve = typer.main.get_command(app).commands["serve"]
    known = {o for p in serve.params for o in p.opts}
    assert {a for a in ours if a.startswith("--")} <= known  # ours' flags all exist


def test_servers_run_without_the_operators_safeserve_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFESERVE_SAFETY_HEAD", "strict")  # would put a head on ours-off
    monkeypatch.setenv("SAFESERVE_CACHE_DIR", str(tmp_path))  # a location: kept
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    show = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
            "if k.startswith(('SAFESERVE_', 'VLLM_USE_V2'))}))")
    proc = _Proc([sys.executable, "-c", show], 0, tmp_path / "env.log", ENGINE_ENV)
    proc.proc.wait(60)
    seen = json.loads((tmp_path / "env.log").read_text())
    assert seen == {"SAFESERVE_CACHE_DIR": str(tmp_path), "VLLM_USE_V2_MODEL_RUNNER": "0"}


def test_skip_safety_wins_over_a_given_safe_model():
    assert _safe_model(Path("/m"), Path("/s"), skip_safety=True) is None
    assert _safe_model(Path("/m"), Path("/s"), skip_safety=False) == Path("/s")


def test_kernel_bench_cycles_a_pool_of_hidden_buffers_and_reports_the_bound(monkeypatch):
    from safeserve.kernels import bench as kb

    seen = set()
    real = kb.safety_scores

    def recording(hidden, *a, **kw):
        seen.add(hidden.data_ptr())
        return real(hidden, *a, **kw)

    monkeypatch.setattr(kb, "safety_scores", recording)
    res = kb.run_benchmark(batch=4, hidden=64, categories=2, dtype="float32", iters=30,
                           peak_gbs=10.0, pool_mib=0.01)
    assert res["hidden_buffers"] == math.ceil(0.01 * (1 << 20) / (4 * 64 * 4)) == 11
    assert len(seen) == 11  # every buffer of the pool was read
    assert res["bound_us"] == pytest.approx(res["head_bytes"] / 10e9 * 1e6)
    assert res["head_over_bound"] == pytest.approx(res["head_us"] / res["bound_us"])
    plain = kb.run_benchmark(batch=4, hidden=64, categories=2, dtype="float32", iters=3)
    assert plain["hidden_buffers"] == 1 and "bound_us" not in plain  # CPU: no guess
    assert kb.guess_peak_gbs("NVIDIA H200") == 4800
    assert kb.guess_peak_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert kb.guess_peak_gbs("NVIDIA A100-SXM4-80GB") == 2039
    assert kb.guess_peak_gbs("Tesla T4") is None
    with pytest.raises(ValueError):
        kb.run_benchmark(batch=4, hidden=64, iters=3, peak_gbs=0)


def test_bench_leak_on_the_real_engine_mixes_four_configs_without_a_leak(server):
    """Four configs (answer, refuse at " Paris", stop at the prompt, annotate), shuffled over
    16 concurrent requests: each request matches its config's solo reference in every field."""
    from safeserve.server.bench_leak import _run, default_configs

    configs = default_configs(["violence", "weapons"])
    res = asyncio.run(_run(server.url, server.model, "What is the capital of France?", configs,
                           16, 12, None, seed=3))
    assert [r["action"] for r in res["references"]] == ["none", "refuse", "stop", "annotate"]
    assert res["alike_configs"] == []  # a leak between any two would show
    assert (res["failed"], res["leaks"], res["text_mismatches"]) == (0, 0, 0)
    assert res["identical_text_rate"] == 1.0 and res["max_prompt_score_drift"] < 1e-4
    assert sorted(res["requests_per_config"]) == [4, 4, 4, 4]


# A stand-in server for `bench serve --instances`: it logs its start and its stop, answers
# readiness, and streams `max_tokens` tokens at a fixed pace (argv: name, port, log, seconds
# per token).
_FAKE_SERVER = r'''
import json, signal, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port, log, pace = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])

def note(event):
    with open(log, "a") as f:
        f.write(f"{event} {name}\n")

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for _ in range(body["max_tokens"]):
            time.sleep(pace)
            chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

def stop(*_):
    note("down"); sys.exit(0)

signal.signal(signal.SIGTERM, stop)
note("up")
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_fresh_instances_run_one_server_at_a_time_and_report_an_interval(tmp_path,
                                                                          monkeypatch):
    from typer.testing import CliRunner

    import safeserve.server.bench as bench

    script, events = tmp_path / "fake_server.py", tmp_path / "events.log"
    script.write_text(_FAKE_SERVER)
    paces = {"plain": 0.004, "ours-off": 0.004, "ours-on": 0.008}  # safety on: half the speed

    def fake_servers(base, safe, port, control=False):
        return [(name, [sys.executable, str(script), name, str(port + i), str(events),
                        str(pace), "--port", str(port + i)], "/ready", {}, {})
                for i, (name, pace) in enumerate(paces.items())]

    monkeypatch.setattr(bench, "_servers", fake_servers)
    app = bench.typer.Typer()
    bench.register(app)
    port = free_port()  # the three servers take port, port + 1, port + 2
    out = CliRunner().invoke(app, [
        "serve", "--instances", "3", "--passes", "1", "--concurrency", "1,2",
        "--requests-per-level", "2", "--max-tokens", "6", "--model", str(tmp_path),
        "--safe-model", str(tmp_path), "--port", str(port), "--out", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    log = events.read_text().split("\n")[:-1]
    # each server up and down before the next starts; the order turns round every round
    order = ["plain", "ours-off", "ours-on"]
    expected = [f"{e} {n}" for r in range(3) for n in (order if r % 2 == 0 else order[::-1])
                for e in ("up", "down")]
    assert log == expected
    results = json.loads((tmp_path / "o" / "passes.json").read_text())
    assert len(results) == 3 * 2 * 3  # one combined result per server, level and instance
    line = next(x for x in out.output.splitlines() if x.startswith("| ours-on / ours-off | 2 |"))
    mean, interval = line.split("|")[3], line.split("|")[5]
    # paced at half the speed: about 0.5, pulled toward 1 by per-token overhead on a busy
    # machine (a unit test checks the ratio's direction and plumbing, not a timing)
    assert 0.35 < float(mean) < 0.8 and interval.strip().endswith("(n=3)")
