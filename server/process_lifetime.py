"""The engine's processes end with the server that started them.

vLLM runs its engine core in a child process. When the server goes without shutting the engine
down — SIGKILL, the out-of-memory killer, or SIGTERM while the model still loads (the build's
thread cannot be cancelled, and uvicorn ends the process by re-raising the signal) — that child
was left running, reparented to init, holding the model's memory (on a GPU, memory the
restarted server needs) and ignoring SIGTERM (measured on vLLM 0.32's CPU build). The server
marks its children with its pid; each one that finds itself the server's direct child asks
Linux to SIGKILL it when the server's thread that spawned it ends. That thread is the engine
build's worker of the event loop's default executor, which lives until the loop closes, after
the orderly shutdown. A spawned child (vLLM's CPU build) asks from the SafeServe vLLM plugin,
which vLLM runs in every new process; a forked one (vLLM's default on CUDA) inherits the
parent's loaded plugins and does not run them again, so it asks from an at-fork hook.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# Set by the server in its own environment before vLLM spawns the engine: children inherit it.
SERVER_PID_ENV = "SAFESERVE_SERVER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


_fork_hook_registered = False
_prctl = None  # libc's, resolved before any fork: a forked child of a threaded process should
# not take the dynamic loader's lock (another thread may have held it at the fork)


def _libc_prctl():
    global _prctl
    if _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def mark_children() -> None:
    """In the server, before the engine is built."""
    global _fork_hook_registered
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    if not _fork_hook_registered and sys.platform.startswith("linux"):
        _libc_prctl()
        os.register_at_fork(after_in_child=die_with_the_server)
        _fork_hook_registered = True


def die_with_the_server() -> bool:
    """In every vLLM process (the plugin runs this): True when this is a direct child of a
    SafeServe server and will now be killed when it goes. Elsewhere (plain vLLM, vLLM's own
    worker grandchildren, which follow their engine core) nothing changes."""
    server = os.environ.get(SERVER_PID_ENV, "")
    if not server.isdigit() or not sys.platform.startswith("linux"):
        return False
    if os.getppid() != int(server):
        if not _exists(int(server)):  # it went while this process was starting
            os._exit(1)
        return False  # a grandchild (vLLM's own workers follow their engine core)
    if _libc_prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != int(server):  # the server went before the request took effect
        os._exit(1)
    return True


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (the pid was reused): not ours to judge
        return True
    return True
