"""GPU leases: which of this machine's GPUs a step uses, so that concurrent steps never share one.

    hold_for_process(log)                   an in-process step: one GPU, made current, kept until
                                            the process ends (`ComputeResource.resolve`)
    with lease_gpus(2, log=log) as names:   a torchrun step: e.g. ["3", "5"] (this process's own
        CUDA_VISIBLE_DEVICES="3,5"          GPU first), its ranks see them as cuda:0 and cuda:1

Contract:
- Devices: the ones this process sees (`CUDA_VISIBLE_DEVICES` when set, else every device torch
  counts), named as the driver names them, so a child's CUDA_VISIBLE_DEVICES names the same GPUs.
- A lease is an exclusive `flock` on `<lease dir>/gpu-<device>.lock` (`FT_GPU_LEASES`, default
  `/tmp/ft_assets-gpu-leases-<uid>`: one directory per user and machine, whatever FT_HOME or the
  instance; steps of different users do not see each other's leases unless FT_GPU_LEASES names
  one shared directory). The kernel drops it when the holder's process ends, however it ends
  (kill -9, the OOM killer): no stale lease, nothing to reap, no timing involved. Leases do not
  count runs: the `gpu` pool does.
- Nothing another local user plants can turn a lease into a write elsewhere (`UnsafeLeases`,
  naming the path and what to do, otherwise): the directory is created 0700 and used only when
  it is a real directory (not a symbolic link) owned by this user, or by root with the sticky bit,
  and writable by others only with the sticky bit (a shared directory, as /tmp is); lease files
  are opened through the directory's descriptor without following links or blocking, and used
  only when they are regular files with one name. The holder's pid is written (after the flock
  is ours) only into a file this user owns; a file another user created in a shared directory is
  locked read-only and left as it is.
- All or nothing: a step takes free devices in order and, if it cannot get all it needs, gives
  them back and retries every `poll_s` (two steps never each hold half of what they need). It
  logs who holds them (the pid in each file) once a minute while it waits, and fails after
  `timeout_s` naming them. Asking for more devices than the machine has fails at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

DEFAULT_DIR = "/tmp/ft_assets-gpu-leases-{uid}"  # one per user: nobody else can plant or hold its files
# never through a symbolic link, never waiting on a FIFO someone planted, never inherited by a child
_NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PROCESS_LEASE: dict[str, int] = {}  # hold_for_process: device name -> open, flocked descriptor


class LeaseError(RuntimeError):
    """The GPUs could not be leased; the message says why and what to do."""


class NotEnoughGpus(LeaseError):
    """More devices asked for than the machine has, or none freed in time; the message says which."""


class UnsafeLeases(LeaseError):
    """The lease directory or a lease file is one another user could control; the message names it."""


def visible_devices() -> list[str]:
    """The GPUs this process may use, as the names a child's CUDA_VISIBLE_DEVICES takes."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def lease_dir() -> Path:
    return Path(os.environ.get("FT_GPU_LEASES") or DEFAULT_DIR.format(uid=os.geteuid()))


def _directory_problem(info: os.stat_result) -> str | None:
    """Why a directory with these attributes could let another user control its files (None: it cannot)."""
    me, sticky = os.geteuid(), bool(info.st_mode & stat.S_ISVTX)
    if info.st_uid != me and not (info.st_uid == 0 and sticky):  # root's sticky /tmp-like directory is fine
        return f"is owned by uid {info.st_uid}, not by you (uid {me})"
    if info.st_mode & 0o022 and not sticky:
        return "is writable by other users and has no sticky bit (they could replace its files)"
    return None


def open_lease_dir(where: Path) -> int:
    """A descriptor of the lease directory (created 0700 when missing), once it is verified safe."""
    try:
        where.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    advice = "remove it (a private one is made again) or set FT_GPU_LEASES to a directory only you can write"
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLeases(f"GPU lease directory {where} is a symbolic link or not a directory; {advice}") from None
        raise
    problem = _directory_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise UnsafeLeases(f"GPU lease directory {where} {problem}; {advice}")
    return fd


def _open_lease_file(dir_fd: int, name: str, where: Path) -> int:
    """The lease file `name` (created 0644 when missing), opened without following a link; refused
    unless it is a regular file with one name (a hard link would write into another file)."""
    path = where / name
    try:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _NO_SURPRISES, 0o644, dir_fd=dir_fd)
        except PermissionError:  # another user's lease in a shared directory: a read-only descriptor locks too
            fd = os.open(name, os.O_RDONLY | _NO_SURPRISES, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeLeases(f"GPU lease file {path} is a symbolic link (a lease never writes through one); "
                               "remove it, it is made again") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise UnsafeLeases(f"GPU lease file {path} is not a regular file; remove it, it is made again") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
               f"has {info.st_nlink} names (a hard link to another file)" if info.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise UnsafeLeases(f"GPU lease file {path} {problem}; a lease never writes into it: "
                           "remove it, it is made again")
    return fd


def _try_lock(dir_fd: int, name: str, where: Path) -> int | None:
    fd = _open_lease_file(dir_fd, name, where)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    if writable and os.fstat(fd).st_uid == os.geteuid():  # only our own file, and only once the lock is ours
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _holder(dir_fd: int, name: str) -> str:
    """The pid the lease file names (the last of this file's owner to hold it), or "?"."""
    try:
        fd = os.open(name, os.O_RDONLY | _NO_SURPRISES, dir_fd=dir_fd)
    except OSError:
        return "?"
    try:
        said = os.read(fd, 32).decode(errors="replace").strip() if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)
    return said or "?"


def acquire(count: int, devices: Sequence[str] | None = None, *, log: Callable[[str], None] = print,
            timeout_s: float = 24 * 3600, poll_s: float = 1.0, directory: Path | None = None,
            own: Sequence[str] = ()) -> dict[str, int]:
    """`count` devices, `own` (already held by this process) first: {name: descriptor} of the new ones."""
    devices = list(visible_devices() if devices is None else devices)
    if count > len(devices):
        raise NotEnoughGpus(f"{count} GPUs asked for, this machine shows {len(devices)} ({','.join(devices) or 'none'})")
    where = directory or lease_dir()
    dir_fd = open_lease_dir(where)
    try:
        return _acquire_in(dir_fd, where, count, devices, log, timeout_s, poll_s, own)
    finally:
        os.close(dir_fd)


def _acquire_in(dir_fd: int, where: Path, count: int, devices: list[str], log: Callable[[str], None],
                timeout_s: float, poll_s: float, own: Sequence[str]) -> dict[str, int]:
    need = count - len(own)
    deadline, said = time.monotonic() + timeout_s, float("-inf")
    while True:
        held: dict[str, int] = {}
        try:
            for d in devices:
                if len(held) >= need:
                    break
                if d not in own and (fd := _try_lock(dir_fd, f"gpu-{d}.lock", where)) is not None:
                    held[d] = fd
        except BaseException:
            release(held)
            raise
        if len(held) >= need:
            return held
        release(held)
        busy = [f"{d} (pid {_holder(dir_fd, f'gpu-{d}.lock')})" for d in devices if d not in held and d not in own]
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
