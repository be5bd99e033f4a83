"""The servers that ``safeserve bench serve`` compares: their command lines (plain vLLM, ours
without and with the safety head), the engine settings they all share, their environment
(without the operator's ``SAFESERVE_*`` settings) and their processes (start, readiness, CPU
time, stop). A server starts on a port nothing else holds (a server left from an earlier run
would answer its readiness check and be measured in its place), in a session of its own, and
is stopped with its whole process group (vLLM's engine-core processes with it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# The engine settings every server runs with, on its command line: plain vLLM's CLI and ours
# have different defaults, and the comparison is of the servers, not of their defaults.
ENGINE_DTYPE = "float32"
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = 1
MAX_NUM_SEQS = 64
# Ours pins vLLM's V1 model runner (server/engine.py); plain vLLM must run the same one.
ENGINE_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
# A location, not a setting: kept in the servers' environment.
KEPT_SAFESERVE_ENV = {"SAFESERVE_CACHE_DIR"}


def _child_env(extra: dict | None = None) -> dict:
    """A server's environment: the bench's, less the operator's ``SAFESERVE_*`` settings
    (they would configure ours and not plain, e.g. SAFESERVE_SAFETY_HEAD would put a head
    on ours-off), plus ``extra`` (the engine settings every server shares)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SAFESERVE_") or k in KEPT_SAFESERVE_ENV}
    return {**env, **(extra or {})}


def _check_port_free(port: int) -> None:
    """Raise unless ``port`` can be bound on every interface (as a server binds it: with
    SO_REUSEADDR, so a closed connection's TIME_WAIT does not count as taken). Port 0 (any
    free port) always can."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise RuntimeError(
                f"port {port} is in use ({e.strerror}): a server left from an earlier run? "
                f"Stop it (e.g. `ss -ltnp 'sport = :{port}'` shows its process) or pass "
                "another --port") from None


class _Proc:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        _check_port_free(port)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        # a session (and process group) of its own: stop() ends the engine processes too
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=_child_env(env), start_new_session=True)

    def wait(self, path: str, timeout: float = 1200) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                ready = httpx.get(self.url + path, timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                if self.proc.poll() is not None:  # whoever answered, it was not this server
                    raise RuntimeError(
                        f"{self.url} answered, but the server started there has exited (another "
                        f"process holds the port?):\n{self.log.read_text()[-3000:]}")
                return
            time.sleep(0.25)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def cpu_seconds(self) -> tuple[float, float]:
        """(HTTP process, engine processes) user + system CPU seconds so far."""
        import psutil

        def used(p: psutil.Process) -> float:
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.NoSuchProcess:
                return 0.0

        top = psutil.Process(self.proc.pid)
        return used(top), sum(used(c) for c in top.children(recursive=True))

    def _signal_group(self, sig: int) -> None:
        """Send ``sig`` to the server's process group (it and its engine processes)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # none of the group is left
            pass

    def stop(self, timeout: float = 60, grace: float = 10) -> None:
        """SIGTERM to the whole process group (the server and its engine processes); SIGKILL
        to the server after ``timeout`` seconds, and to what is left of the group once its
        processes ended, or ``grace`` seconds after the server did."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []

        def running() -> list:
            out = []
            for p in tree:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except psutil.NoSuchProcess:
                    pass
            return out

        self._signal_group(signal.SIGTERM)  # (the group outlives a server that died)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
        deadline = time.time() + grace
        while running() and time.time() < deadline:
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)  # what is left of the group
        for p in running():  # a process that left the group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        deadline = time.time() + 10  # a SIGKILL takes effect soon, not at once
        while running() and time.time() < deadline:
            time.sleep(0.05)


def _servers(base: Path, safe: Path | None, port: int,
             control: bool = False) -> list[tuple[str, list[str], str, dict, dict]]:
    """(name, command, readiness path, request body extras, environment) of each server, in
    load order; server i listens on port + i."""
    py = sys.executable
    safeserve = str(Path(py).with_name("safeserve"))
    plain = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
             "--served-model-name", "bench", "--dtype", ENGINE_DTYPE,
             "--max-model-len", str(MAX_MODEL_LEN),
             "--kv-cache-memory-bytes", str(KV_CACHE_GIB << 30),
             "--max-num-seqs", str(MAX_NUM_SEQS)]
    ours = [safeserve, "serve", "--served-model-name", "bench", "--dtype", ENGINE_DTYPE,
            "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", str(KV_CACHE_GIB),
            "--max-num-seqs", str(MAX_NUM_SEQS)]
    out = [("plain", plain, "/health", {}, ENGINE_ENV),
           ("ours-off", ours + ["--model", str(base), "--allow-unsafe"], "/ready", {},
            ENGINE_ENV)]
    if safe is not None:
        out.append(("ours-on", ours + ["--model", str(safe)], "/ready",
                    {"safety_config": {"on_violation": "annotate"}}, ENGINE_ENV))
    if control:  # next to ours-off in the load order, as ours-on is on its other side
        out.insert(1, ("ours-off-b", ours + ["--model", str(base), "--allow-unsafe"], "/ready",
                       {}, ENGINE_ENV))
    return [(name, cmd + ["--port", str(port + i)], ready, extra, env)
            for i, (name, cmd, ready, extra, env) in enumerate(out)]
