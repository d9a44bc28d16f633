"""Stopping training without losing it: signals become a checkpoint, and one writer per checkpoint dir.

Contract.
- `stop_requests()`: while training, the first SIGTERM (what Kubernetes, Slurm and spot
  reclaimers send before killing) or SIGINT (Ctrl-C) only sets a flag; the loop finishes the
  step it is in, writes a checkpoint at that step and raises `Preempted`, whose message starts
  with "preempted at step N" and says how to resume. A second signal is delivered to whatever
  handler was there before (Ctrl-C twice stops at once). Handlers are installed only in the main
  thread (Python's rule) and always restored on exit.
- `checkpoint_lock(dir)`: an exclusive `flock` on `dir/.lock` for as long as a run trains into
  `dir`; a second process asking for it fails at once with `CheckpointBusy`, naming the holder.
  The kernel drops the lock when its process dies (kill -9 included), so a dead run never
  leaves a stale lock, and a live one is never resumed under.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PREEMPTED = "preempted at step"  # every Preempted message starts with this (launchers look for it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """Training stopped on a signal after checkpointing `step` (None: no checkpoint dir)."""

    def __init__(self, step: int, signal_name: str, checkpoint: Path | None):
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        if checkpoint is not None:
            then = f"checkpoint written at {checkpoint}; materialize again to resume from step {step}"
        else:
            then = "this trainer keeps no checkpoints, so materializing again starts over"
        super().__init__(f"{PREEMPTED} {step} by {signal_name}: {then}")


class CheckpointBusy(RuntimeError):
    """Another live process trains into the same checkpoint directory."""


class StopRequest:
    """The signal that asked training to stop, if any (set by the handler, read by the loop)."""

    def __init__(self):
        self.signal_name: str | None = None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals reach the main thread only; nothing to install here
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum, frame):
        if request.signal_name is not None:  # the second signal: the previous behaviour, now
            for s, h in previous.items():
                signal.signal(s, h)
            signal.raise_signal(signum)
            return
        request.signal_name = signal.Signals(signum).name

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def checkpoint_lock(ckpt_dir: Path | None) -> Iterator[None]:
    if ckpt_dir is None:
        yield
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            raise CheckpointBusy(
                f"{ckpt_dir} is being trained into by {holder}: another run is training this same "
                "derivation now. Wait for it to finish (its result will be reused), or stop it; "
                "`python -m ft_assets runs` lists the runs and their processes") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"process {h['pid']} on {h['host']}"
    except (OSError, ValueError, KeyError):
        return "another process"
