"""The engine's processes end with the server, however it ends (server/process_lifetime.py).
Before, SIGTERM while the model loaded, or SIGKILL at any time, left vLLM's engine core running
with init as its parent, holding the model's memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import SAFESERVE, free_port, server_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal is Linux's")


def _engine_children(pid: int) -> list[int]:
    """vLLM's engine processes whose parent is ``pid`` (spawned from any of its threads)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"EngineCore" in title:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (dead, not yet reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # reaped meanwhile
        return False
    return state != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_a_marked_child_dies_with_its_server_and_nothing_else_changes(tmp_path, start):
    """A stand-in server marks its children and starts one from a thread that lives on, as
    the engine build does: spawned, the child asks itself (as vLLM's plugin does in a new
    process); forked (vLLM's default on CUDA), the at-fork hook asks for it. SIGKILL on the
    server takes the child with it. A process whose parent is not the marked server (plain
    vLLM, vLLM's grandchildren) is left alone."""
    said = tmp_path / "said"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import pathlib, time
        from safeserve.server.process_lifetime import die_with_the_server
        pathlib.Path({str(said)!r}).write_text(str(die_with_the_server()))
        time.sleep(120)
    """))
    server = tmp_path / "server.py"
    server.write_text(textwrap.dedent(f"""
        import os, pathlib, subprocess, sys, threading, time
        from safeserve.server.process_lifetime import mark_children
        mark_children()
        def start():
            if {start!r} == "spawn":
                pid = subprocess.Popen([sys.executable, {str(child)!r}]).pid
            else:
                pid = os.fork()
                if pid == 0:  # nothing of ours runs here: the hook has run already
                    pathlib.Path({str(said)!r}).write_text("forked")
                    time.sleep(120)
                    os._exit(0)
            print(pid, flush=True)
            time.sleep(120)  # the starting thread lives on, as the executor's worker does
        threading.Thread(target=start).start()
        time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(server)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        deadline = time.time() + 60
        while not said.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        assert said.read_text() == {"spawn": "True", "fork": "forked"}[start]
        assert _alive(pid)  # not killed while the server runs
        proc.kill()
        proc.wait(10)
        assert _gone_within(pid, 10), "the child outlived the server"
    finally:
        proc.kill()
    # not the server's child, the server alive: nothing set, nothing ends
    env = {**os.environ, "SAFESERVE_SERVER_PID": str(os.getpid())}
    out = subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.run("
                          "[sys.executable, '-c', 'from safeserve.server.process_lifetime import "
                          "die_with_the_server as d; print(d())'], capture_output=True, "
                          "text=True).stdout.strip())"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_a_child_whose_server_went_while_it_started_ends():
    """The server died before its child got as far as asking (vLLM takes seconds to import
    in a spawned process): the child ends instead of running on under init."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = {**os.environ, "SAFESERVE_SERVER_PID": str(gone.pid)}
    out = subprocess.run([sys.executable, "-c", "from safeserve.server.process_lifetime import "
                          "die_with_the_server as d; d(); print('ran on')"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "ran on" not in out.stdout, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_engine_core_goes_when_the_server_is_stopped_while_loading(tmp_path, sig):
    """The real server, stopped while vLLM still loads the model: its engine core process
    must not outlive it."""
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(SAFESERVE), "serve", "--port", str(free_port())],
                                stdout=out, stderr=subprocess.STDOUT, env=server_env(),
                                start_new_session=True)
    cores: list[int] = []
    try:
        deadline = time.time() + 600
        while not (cores := _engine_children(proc.pid)) and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert cores, "no engine process was started"
        time.sleep(2)  # inside the engine's start (its plugins loaded, the model loading)
        proc.send_signal(sig)
        proc.wait(60)
        for core in cores:
            assert _gone_within(core, 60), f"engine process {core} outlived the server\n" + \
                log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for core in cores:  # what a failure left behind
            if _alive(core):
                os.kill(core, signal.SIGKILL)
