"""Worker side: each engine step's safety records, sent to the HTTP process (in step order,
never stalling the step on the GPU). The processor (safety_processor.py) builds what a step
decided; this sends it."""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading

import torch
from safeserve.server import safety_wire as W

# This runs in vLLM's engine process, where only vLLM's loggers are configured: a child of
# its logger is what reaches the server's log there.
log = logging.getLogger("vllm.safeserve.worker_telemetry")


def step_records(packed: list[list[float]], rows: list[tuple[int, str, int]],
                 k: int) -> list[W.StepRecord]:
    """Records of one step from its packed host copy; ``rows``: (row, request id, output
    length) of the rows that belong to a request, taken when the step ran."""
    out = []
    for i, rid, length in rows:
        row = packed[i]
        flags = int(row[k + 5])  # bit 0: alert; bit 1: clear (safety_processor.apply)
        out.append(W.StepRecord(rid, length, row[:k], int(row[k]), int(row[k + 1]),
                                int(row[k + 2]), int(row[k + 3]), int(row[k + 4]),
                                flags & 1,
                                # a step that consulted the topic gate has its bits last
                                int(row[k + 6]) if len(row) > k + 6 else 0,
                                clear=(flags >> 1) & 1))
    return out


class StepTelemetry:
    """Pushes each step's records to the HTTP side, in step order.

    Off-GPU a step's records are built and sent at once (the copy is free). On CUDA the step
    only queues an asynchronous copy into pinned memory and an event; a sender thread waits
    for the event and sends, so the engine's step never waits for the GPU (vLLM overlaps the
    next step's scheduling with this one). One thread, one FIFO: records leave in step order,
    and the ZMQ socket is used by that thread alone once it exists."""

    def __init__(self):
        self.sock = None
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        addr = os.environ.get(W.TELEMETRY_ENV)
        if addr:
            import zmq

            self.sock = zmq.Context.instance().socket(zmq.PUSH)
            self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop: the HTTP side waits for these
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.connect(addr)

    def send(self, records: list[W.StepRecord], seconds: float | None) -> None:
        if self._queue is not None:  # keep the order of the steps already queued
            self._queue.put((None, records, None, 0, seconds))
        elif self.sock is not None and records:
            self._push(records, seconds)

    def send_later(self, ready, host: torch.Tensor, rows: list[tuple[int, str, int]], k: int,
                   seconds: float, device: torch.device | None = None) -> None:
        """Send the records in ``host`` once ``ready`` (a CUDA event) has completed."""
        if self._queue is None:
            self._queue = queue.SimpleQueue()
        if self._thread is None or not self._thread.is_alive():  # (re)started: never stalls
            self._thread = threading.Thread(target=self._drain, args=(device,), daemon=True,
                                            name="safeserve-telemetry")
            self._thread.start()
        self._queue.put((ready, host, rows, k, seconds))

    def _push(self, records: list[W.StepRecord], seconds: float | None) -> None:
        if records:
            self.sock.send(pickle.dumps((records, seconds), protocol=pickle.HIGHEST_PROTOCOL))

    def _drain(self, device: torch.device | None = None) -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread starts on GPU 0: stay on the worker's
        while True:
            ready, payload, rows, k, seconds = self._queue.get()
            try:
                if ready is None:  # records built already (send())
                    self._push(payload, seconds)
                    continue
                ready.synchronize()
                self._push(step_records(payload.tolist(), rows, k), seconds)
            except Exception:  # one bad step must not end the telemetry of every later one
                log.exception("safety telemetry step not sent")
