"""`bench serve` bookkeeping: CPU accounting of a server's process tree and the ratio table
(the loads themselves run against real servers in `safeserve bench serve`)."""

from __future__ import annotations

import sys
import time

from safeserve.server.bench import LoadResult, _mean, _Proc, _table

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
    """One pass: 16 requests, 1000 tokens, ``cpu_s`` CPU seconds (a fifth of it HTTP)."""
    return LoadResult(server, 8, 16, 1000 / tok_s, 1000, 1.0, 2.0, 0.1, 0.2,
                      cpu_s * 0.2, cpu_s * 0.8)


def test_table_reports_cpu_per_token_and_its_ratio():
    off = _mean([_result("ours-off", 50, 4.0)] * 2)
    on = _mean([_result("ours-on", 40, 5.0)] * 2)  # passes are summed, not averaged
    assert (on.requests, on.output_tokens, on.seconds) == (32, 2000, 50.0)
    assert abs(on.cpu_ms_per_tok - 5.0) < 1e-9
    table = _table([off, on])
    assert "| ours-on | 8 | 0.64 | 40.0 | 1000 | 2000 | 100.0 | 200.0 | 5.0 (1.0 + 4.0) |" in table
    assert "| ours-on / ours-off | 8 | 0.800 | - | 1.000 | 1.000 | 1.250 |" in table


def test_table_shows_the_spread_of_per_pass_ratios():
    raw = {("ours-off", 8): [_result("ours-off", 50, 4.0), _result("ours-off", 40, 4.0)],
           ("ours-on", 8): [_result("ours-on", 45, 4.0), _result("ours-on", 42, 4.0)]}
    table = _table([_mean(raw[("ours-off", 8)]), _mean(raw[("ours-on", 8)])], raw)
    assert "| ours-on / ours-off | 8 | 0.978 | 0.900-1.050 |" in table


def test_control_server_is_a_second_ours_off_and_its_ratio_is_reported():
    from pathlib import Path

    from safeserve.server.bench import _servers

    plain = _servers(Path("/m"), Path("/s"), 9000, [])
    both = _servers(Path("/m"), Path("/s"), 9000, [], control=True)
    assert [s[0] for s in plain] == ["plain", "ours-off", "ours-on"]
    assert [s[0] for s in both] == ["plain", "ours-off-b", "ours-off", "ours-on"]
    assert both[1][1:] == both[2][1:]  # the same command, readiness path and request body
    raw = {("ours-off", 8): [_result("ours-off", 50, 4.0), _result("ours-off", 40, 4.0)],
           ("ours-off-b", 8): [_result("ours-off-b", 45, 4.0), _result("ours-off-b", 48, 4.0)]}
    table = _table([_mean(raw[("ours-off", 8)]), _mean(raw[("ours-off-b", 8)])], raw)
    assert "| ours-off-b / ours-off | 8 | 1.045 | 0.900-1.200 |" in table
