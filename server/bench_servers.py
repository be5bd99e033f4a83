"""The servers that ``safeserve bench serve`` compares: their command lines (plain vLLM, ours
without and with the safety head), the engine settings they all share, their environment
(without the operator's ``SAFESERVE_*`` settings) and their processes (start, readiness, CPU
time, stop).
"""

from __future__ import annotations

import os
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


class _Proc:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=_child_env(env))

    def wait(self, path: str, timeout: float = 1200) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
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

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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
