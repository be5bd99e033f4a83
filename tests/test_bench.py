"""`bench serve` bookkeeping: CPU accounting of a server's process tree, failed requests, the
pooled percentiles and the ratio table (the loads themselves run against real servers in
`safeserve bench serve`); the servers' shared settings; the kernel bench's DRAM pool and
bound; and `bench leak` against the real engine."""

from __future__ import annotations

import asyncio
import json
import math
import os
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
    # (a delta may carry several tokens: the usage chunk counts them, max_tokens of them)
    good = _sse(_delta("a"), _delta("b"), _delta("c"),
                {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}, "[DONE]")
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
    assert r.output_tokens == 4 * 16 and len(r.ttfts) == 4 and len(r.itls) == 8
    assert r.req_per_s == pytest.approx(4 / r.seconds)
    assert any("error event: boom" in e for e in r.errors)
    assert any("HTTP 500: overloaded" in e for e in r.errors)
    assert any("ReadError" in e for e in r.errors)
    assert any("without [DONE]" in e for e in r.errors)
    report = _failure_report([r, _result("plain", 50, 1.0)])
    assert report.startswith("FAILED: 4 of 24 requests") and "ours-on c=4: 4 / 8 failed" in report
    assert _failure_report([_result("plain", 50, 1.0)]) is None


def _short_streams(request: httpx.Request) -> httpx.Response:
    """A server that ends some streams early ([DONE] and all) or leaves out their usage."""
    body = json.loads(request.content)
    prompt, n = body["messages"][0]["content"], body["max_tokens"]
    usage = {"choices": [], "usage": {"completion_tokens": n}}
    if prompt == PROMPTS[1]:  # the model's end of sequence, ignore_eos or not
        usage["usage"]["completion_tokens"] = 2
    if prompt == PROMPTS[2]:  # no usage chunk: how many tokens is unknown
        return httpx.Response(200, content=_sse(_delta("a"), _delta("b"), "[DONE]"))
    return httpx.Response(200, content=_sse(_delta("a"), _delta("b"), usage, "[DONE]"))


def test_under_ignore_eos_a_short_stream_or_one_without_usage_is_a_failure():
    r = asyncio.run(run_load("http://fake", "bench", "ours-on", 2, 4, 16, {},
                             transport=httpx.MockTransport(_short_streams)))
    assert (r.requests, r.failed, r.completed, r.output_tokens) == (4, 2, 2, 2 * 16)
    assert "2 of 16 tokens under ignore_eos" in r.errors
    assert "stream without a usage chunk" in r.errors


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


def test_a_server_is_not_started_on_a_port_that_is_taken(tmp_path):
    """A server left from an earlier run would answer the readiness check in the new one's
    place: the port is checked before anything starts."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} is in use"):
            _Proc([sys.executable, "-c", "raise SystemExit('started')"], port,
                  tmp_path / "taken.log")
    assert not (tmp_path / "taken.log").exists()  # nothing was started


def test_a_ready_answer_from_another_process_is_not_our_server(tmp_path, monkeypatch):
    """The port answers, but the server started there has exited (it lost the port to
    another process): not ready, an error."""
    import safeserve.server.bench_servers as bs

    proc = _Proc([sys.executable, "-c", "import time; time.sleep(60)"], free_port(),
                 tmp_path / "lost.log")

    def answered_by_another(url, timeout):
        proc.proc.kill()  # ours is gone by the time the answer comes
        proc.proc.wait()
        return httpx.Response(200)

    monkeypatch.setattr(bs.httpx, "get", answered_by_another)
    try:
        with pytest.raises(RuntimeError, match="has exited"):
            proc.wait("/ready", timeout=30)
    finally:
        proc.stop()


def test_stop_ends_the_servers_whole_process_group(tmp_path):
    """A server's engine processes (its children, which may outlive a SIGTERM to it alone)
    are stopped with it."""
    import psutil

    pid_file = tmp_path / "child.pid"
    tree = ("import signal, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(60)\n")
    proc = _Proc([sys.executable, "-c", tree], 0, tmp_path / "group.log")
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and proc.proc.poll() is None
        time.sleep(0.1)
    child = psutil.Process(int(pid_file.read_text()))
    assert os.getpgid(child.pid) == proc.proc.pid  # in the server's own group
    proc.stop(grace=1)  # the child ignores SIGTERM: SIGKILL after the grace
    try:
        assert child.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        pass


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
    """Four configs (answer, refuse at " Paris", stop at the prompt, annotate) on two prompts,
    the eight pairs shuffled over 16 concurrent requests: each request matches its pair's solo
    reference in every field."""
    from safeserve.server.bench_leak import _run, default_configs

    configs = default_configs(["violence", "weapons"])
    res = asyncio.run(_run(server.url, server.model, "What is the capital of France?", configs,
                           16, 12, None, seed=3,
                           benign_prompt="List three colors of the rainbow."))
    assert [r["action"] for r in res["references"]] == ["none", "refuse", "stop", "annotate"]
    assert res["alike_configs"] == []  # a leak between any two would show
    assert len(res["benign_references"]) == 4  # (the test head flags every prompt: no matter)
    assert (res["failed"], res["leaks"], res["text_mismatches"]) == (0, 0, 0)
    assert res["identical_text_rate"] == 1.0 and res["max_prompt_score_drift"] < 1e-4
    assert sorted(res["requests_per_config"]) == [4, 4, 4, 4]
    assert res["requests_per_pair"] == {"main": [2, 2, 2, 2], "benign": [2, 2, 2, 2]}


# A stand-in server for `bench serve`: it logs its start, its stop and each request's max_tokens,
# answers readiness, and streams `max_tokens` tokens at a fixed pace (argv: name, port, log,
# seconds per token).
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
        note(f"post {body['max_tokens']}")
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


def _fake_bench(tmp_path, monkeypatch, *args: str):
    """`bench serve` with `args` against three stand-in servers (safety on: ten times slower per
    token), each on a port of its own; (the CLI's result, the servers' event log)."""
    from typer.testing import CliRunner

    import safeserve.server.bench as bench

    script, events = tmp_path / "fake_server.py", tmp_path / "events.log"
    script.write_text(_FAKE_SERVER)
    paces = {"plain": 0.001, "ours-off": 0.001, "ours-on": 0.01}
    ports = [free_port() for _ in paces]  # each one free on its own, not port + 1, port + 2

    def fake_servers(base, safe, port, control=False):
        return [(name, [sys.executable, str(script), name, str(p), str(events), str(pace),
                        "--port", str(p)], "/ready", {}, {})
                for p, (name, pace) in zip(ports, paces.items())]

    monkeypatch.setattr(bench, "_servers", fake_servers)
    app = bench.typer.Typer()
    bench.register(app)
    out = CliRunner().invoke(app, [
        "serve", *args, "--model", str(tmp_path), "--safe-model", str(tmp_path),
        "--out", str(tmp_path / "o")])
    return out, events.read_text().split("\n")[:-1]


def _ratio_row(output: str, ratio: str, c: int) -> list[str]:
    line = next(x for x in output.splitlines() if x.startswith(f"| {ratio} | {c} |"))
    return [cell.strip() for cell in line.split("|")]


def test_fresh_instances_run_one_server_at_a_time_and_report_an_interval(tmp_path,
                                                                          monkeypatch):
    out, log = _fake_bench(tmp_path, monkeypatch, "--instances", "3", "--passes", "1",
                           "--concurrency", "1,2", "--requests-per-level", "2",
                           "--max-tokens", "6")
    assert out.exit_code == 0, out.output
    # each server up and down before the next starts; the order turns round every round
    order = ["plain", "ours-off", "ours-on"]
    expected = [f"{e} {n}" for r in range(3) for n in (order if r % 2 == 0 else order[::-1])
                for e in ("up", "down")]
    assert [x for x in log if not x.startswith("post")] == expected
    results = json.loads((tmp_path / "o" / "passes.json").read_text())
    assert len(results) == 3 * 2 * 3  # one combined result per server, level and instance
    row = _ratio_row(out.output, "ours-on / ours-off", 2)
    # ten times slower per token: below 1 whatever the per-request overhead of a busy
    # machine (a unit test checks the ratio's direction and plumbing, not a timing)
    assert float(row[3]) < 0.9 and row[5].endswith("(n=3)")
    assert "geo-mean [95% CI] |" in out.output and "pass-to-pass" not in out.output


def test_kept_servers_are_warmed_up_and_their_interval_is_pass_to_pass(tmp_path, monkeypatch):
    """Without --instances: every server gets an unmeasured load (16-token requests) once
    started, before any measured one; the pairs are passes on the same instances, and their
    interval says so."""
    out, log = _fake_bench(tmp_path, monkeypatch, "--passes", "2", "--concurrency", "2",
                           "--requests-per-level", "2", "--max-tokens", "6")
    assert out.exit_code == 0, out.output
    for name in ("plain", "ours-off", "ours-on"):
        posts = [x.split()[1] for x in log if x.startswith("post") and x.endswith(f" {name}")]
        # a load opens with a 4-token request; the warm-up load is 6 requests of 16 tokens
        assert posts[:8] == ["4"] + ["16"] * 6 + ["4"], (name, posts)
        assert posts[8:] == ["6", "6", "4", "6", "6"], (name, posts)  # the two passes
    assert float(_ratio_row(out.output, "ours-on / ours-off", 2)[3]) < 0.9
    assert "geo-mean [95% CI, pass-to-pass] |" in out.output
    assert "instance spread not included" in out.output
