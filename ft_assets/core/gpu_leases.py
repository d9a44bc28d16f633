"""GPU leases: which of this machine's GPUs a step uses, so that concurrent steps never share one.

    hold_for_process(log)                   an in-process step: one GPU, made current, kept until
                                            the process ends (`ComputeResource.resolve`)
    with lease_gpus(2, log=log) as names:   a torchrun step: e.g. ["3", "5"] (this process's own
        CUDA_VISIBLE_DEVICES="3,5"          GPU first), its ranks see them as cuda:0 and cuda:1

Contract:
- Devices: the ones this process sees (`CUDA_VISIBLE_DEVICES` when set, else every device torch
  counts), named as the driver names them, so a child's CUDA_VISIBLE_DEVICES names the same GPUs.
- A lease is an exclusive `flock` on `<lease dir>/gpu-<device>.lock` (`FT_GPU_LEASES`, default
  `/tmp/ft_assets-gpu-leases`: one directory per machine, whatever FT_HOME or the instance). The
  kernel drops it when the holder's process ends, however it ends (kill -9, the OOM killer): no
  stale lease, nothing to reap, no timing involved. Leases do not count runs: the `gpu` pool does.
- All or nothing: a step takes free devices in order and, if it cannot get all it needs, gives
  them back and retries every `poll_s` (two steps never each hold half of what they need). It
  logs who holds them (the pid in each file) once a minute while it waits, and fails after
  `timeout_s` naming them. Asking for more devices than the machine has fails at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

DEFAULT_DIR = "/tmp/ft_assets-gpu-leases"
_PROCESS_LEASE: dict[str, int] = {}  # hold_for_process: device name -> open, flocked descriptor


class NotEnoughGpus(RuntimeError):
    """More devices asked for than the machine has, or none freed in time; the message says which."""


def visible_devices() -> list[str]:
    """The GPUs this process may use, as the names a child's CUDA_VISIBLE_DEVICES takes."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def lease_dir() -> Path:
    return Path(os.environ.get("FT_GPU_LEASES", DEFAULT_DIR))


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def acquire(count: int, devices: Sequence[str] | None = None, *, log: Callable[[str], None] = print,
            timeout_s: float = 24 * 3600, poll_s: float = 1.0, directory: Path | None = None,
            own: Sequence[str] = ()) -> dict[str, int]:
    """`count` devices, `own` (already held by this process) first: {name: descriptor} of the new ones."""
    devices = list(visible_devices() if devices is None else devices)
    if count > len(devices):
        raise NotEnoughGpus(f"{count} GPUs asked for, this machine shows {len(devices)} ({','.join(devices) or 'none'})")
    need = count - len(own)
    where = directory or lease_dir()
    where.mkdir(parents=True, exist_ok=True)
    deadline, said = time.monotonic() + timeout_s, float("-inf")
    while True:
        held: dict[str, int] = {}
        for d in devices:
            if len(held) >= need:
                break
            if d not in own and (fd := _try_lock(where / f"gpu-{d}.lock")) is not None:
                held[d] = fd
        if len(held) >= need:
            return held
        release(held)
        busy = [f"{d} (pid {_holder(where / f'gpu-{d}.lock')})" for d in devices if d not in held and d not in own]
        now = time.monotonic()
        if now >= deadline:
            raise NotEnoughGpus(f"{count} GPUs needed, none freed in {timeout_s:.0f} s; held: {', '.join(busy)}")
        if now - said >= 60:
            log(f"waiting for {count} free GPUs of {len(devices)}; held: {', '.join(busy)}")
            said = now
        time.sleep(poll_s)


def release(held: dict[str, int]) -> None:
    for fd in held.values():
        os.close(fd)  # closing the descriptor drops the flock
    held.clear()


@contextmanager
def lease_gpus(count: int, devices: Sequence[str] | None = None, own: Sequence[str] | None = None,
               **kwargs) -> Iterator[list[str]]:
    """`count` GPUs held exclusively inside the block: `own` (default: the GPU this process holds
    for itself, if any; it idles while its children train) first, then free ones. kwargs: as `acquire`."""
    own = list(_PROCESS_LEASE if own is None else own)[:count]
    held = acquire(count, devices, own=own, **kwargs)
    try:
        yield own + list(held)
    finally:
        release(held)


def hold_for_process(log: Callable[[str], None] = print) -> int:
    """One GPU for this process's own work, leased on first use and kept until the process ends;
    made torch's current device. Returns its index as torch counts it."""
    import torch

    devices = visible_devices()
    if not _PROCESS_LEASE:
        _PROCESS_LEASE.update(acquire(1, devices, log=log))
    index = devices.index(next(iter(_PROCESS_LEASE)))
    torch.cuda.set_device(index)
    return index
