"""GPU leases (`models/gpu_leases.py`) between real processes, on named devices in a temporary
lease directory: the logic needs no GPU (the names are what CUDA_VISIBLE_DEVICES would carry).

- two runs asking for 2 of 4 devices get disjoint pairs; a third waits and gets the pair the
  first gives back when it ends;
- kill -9 of a holder frees its devices at once (the kernel drops the flock);
- all or nothing: a run that needs 3 while 2 are held holds none while it waits, so a run that
  needs 2 is not blocked behind it;
- more devices than the machine has, or none freed in time: a clear error;
- a step that holds a GPU for itself hands it to the torchrun it starts (first in the list).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft_assets.models import gpu_leases
from ft_assets.models.gpu_leases import NotEnoughGpus, acquire, lease_gpus, visible_devices

DEVICES = ["0", "1", "2", "3"]
HOLDER = """
import json, sys, time
from pathlib import Path
from ft_assets.models.gpu_leases import lease_gpus
count, directory, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with lease_gpus(count, ["0", "1", "2", "3"], directory=directory, poll_s=0.05, log=lambda m: None) as got:
    out.write_text(json.dumps(got))
    while not out.with_suffix(".release").exists():
        time.sleep(0.05)
"""


def hold(count: int, directory: Path, name: str) -> tuple[subprocess.Popen, Path]:
    out = directory.parent / f"{name}.json"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(count), str(directory), str(out)])
    return proc, out


def leased(out: Path, proc: subprocess.Popen, timeout: float = 30) -> list[str] | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out.exists():
            return json.loads(out.read_text())
        assert proc.poll() is None, "the holder exited"
        time.sleep(0.05)
    return None


def release(out: Path, proc: subprocess.Popen) -> None:
    out.with_suffix(".release").write_text("")
    proc.wait(timeout=30)


def test_runs_get_disjoint_devices_and_a_waiting_run_gets_what_one_gives_back(tmp_path):
    leases = tmp_path / "leases"
    a, a_out = hold(2, leases, "a")
    first = leased(a_out, a)
    b, b_out = hold(2, leases, "b")
    second = leased(b_out, b)
    c, c_out = hold(2, leases, "c")
    try:
        assert first and second and not set(first) & set(second) and set(first) | set(second) == set(DEVICES)
        assert leased(c_out, c, timeout=1.5) is None  # every device is held: c waits
        release(a_out, a)
        assert sorted(leased(c_out, c)) == sorted(first)
    finally:
        for p, o in ((b, b_out), (c, c_out)):
            release(o, p)


def test_kill_9_of_a_holder_frees_its_devices_at_once(tmp_path):
    leases = tmp_path / "leases"
    a, a_out = hold(4, leases, "a")
    assert leased(a_out, a) == DEVICES
    b, b_out = hold(4, leases, "b")
    assert leased(b_out, b, timeout=1.0) is None
    os.kill(a.pid, signal.SIGKILL)
    a.wait(timeout=10)
    started = time.time()
    assert leased(b_out, b) == DEVICES
    assert time.time() - started < 5  # no timeout, no reaper: the kernel dropped the lock
    release(b_out, b)


def test_a_run_that_waits_holds_nothing_so_a_smaller_run_is_not_blocked_behind_it(tmp_path):
    leases = tmp_path / "leases"
    a, a_out = hold(2, leases, "a")
    assert leased(a_out, a)
    big, big_out = hold(3, leases, "big")  # needs 3, only 2 free: waits holding none
    small, small_out = hold(2, leases, "small")
    try:
        assert len(leased(small_out, small)) == 2
        assert leased(big_out, big, timeout=1.0) is None
    finally:
        release(small_out, small)
        release(a_out, a)
        assert len(leased(big_out, big)) == 3
        release(big_out, big)


def test_asking_too_much_or_waiting_too_long_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(NotEnoughGpus, match="5 GPUs asked for, this machine shows 4"):
        with lease_gpus(5, DEVICES, directory=tmp_path):
            pass
    said: list[str] = []
    with lease_gpus(3, DEVICES, directory=tmp_path) as mine:
        with pytest.raises(NotEnoughGpus, match=r"2 GPUs needed, none freed in 0 s; held: .*\(pid %d\)" % os.getpid()):
            with lease_gpus(2, DEVICES, directory=tmp_path, timeout_s=0.3, poll_s=0.05, log=said.append):
                pass
    assert len(mine) == 3 and said and "waiting for 2 free GPUs of 4" in said[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_devices() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices() == []


def test_a_step_hands_its_own_gpu_to_the_processes_it_starts_and_keeps_it(tmp_path):
    mine = acquire(1, DEVICES, directory=tmp_path)  # the step's own GPU (in-process work)
    try:
        with lease_gpus(3, DEVICES, own=list(mine), directory=tmp_path) as names:
            assert names[0] == next(iter(mine)) and len(set(names)) == 3  # its own first, not locked twice
        with lease_gpus(3, DEVICES, own=[], directory=tmp_path) as names:  # without it: the 3 others
            assert next(iter(mine)) not in names and len(names) == 3
    finally:
        gpu_leases.release(mine)
