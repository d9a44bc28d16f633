"""GPU leases in a directory other local users may reach (`models/gpu_leases.py`): nothing planted
there can make a lease write to someone's file, and a directory others control is refused.

- the default directory is this user's own (`/tmp/ft_assets-gpu-leases-<uid>`, mode 0700);
- a symbolic link, a hard link or a FIFO planted at a lease path is refused with an error naming
  it, and the file it points at keeps its bytes;
- a lease directory that is a symbolic link, is owned by another user, or that others may write
  without the sticky bit is refused; a sticky shared one (as /tmp is) is used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ft_assets.models import gpu_leases
from ft_assets.models.gpu_leases import acquire

PRECIOUS = "the victim's own file\n"


def lease_attempt(directory: Path, devices: list[str]) -> Exception | None:
    """Lease `devices` in `directory` and give them back; the error it raised, if any."""
    try:
        held = acquire(len(devices), devices, directory=directory, timeout_s=0.2, poll_s=0.05, log=lambda m: None)
    except Exception as exc:  # noqa: BLE001 - the test judges which error it is
        return exc
    gpu_leases.release(held)
    return None


@pytest.fixture
def leases(tmp_path) -> Path:
    directory = tmp_path / "leases"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(PRECIOUS)
    return path


def test_the_default_lease_directory_is_this_users_own_and_private(monkeypatch):
    monkeypatch.delenv("FT_GPU_LEASES", raising=False)
    expected = Path(f"/tmp/ft_assets-gpu-leases-{os.getuid()}")
    assert gpu_leases.lease_dir() == expected
    device = f"test-{os.getpid()}"  # a name no real step leases
    assert lease_attempt(gpu_leases.lease_dir(), [device]) is None
    info = os.lstat(expected)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) & 0o077 == 0, oct(info.st_mode)
    (expected / f"gpu-{device}.lock").unlink()


def test_a_symlink_planted_at_a_lease_path_is_refused_and_its_target_keeps_its_bytes(leases, victim):
    (leases / "gpu-0.lock").symlink_to(victim)
    error = lease_attempt(leases, ["0"])
    assert victim.read_text() == PRECIOUS
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert str(leases / "gpu-0.lock") in str(error) and "symbolic link" in str(error)


def test_a_hard_link_planted_at_a_lease_path_is_refused_and_its_target_keeps_its_bytes(leases, victim):
    os.link(victim, leases / "gpu-0.lock")
    error = lease_attempt(leases, ["0"])
    assert victim.read_text() == PRECIOUS
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert str(leases / "gpu-0.lock") in str(error) and "2 names" in str(error)


def test_a_fifo_planted_at_a_lease_path_is_refused(leases):
    os.mkfifo(leases / "gpu-0.lock")
    error = lease_attempt(leases, ["0"])
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert "not a regular file" in str(error)


def test_a_lease_directory_others_may_write_without_the_sticky_bit_is_refused(leases):
    leases.chmod(0o777)
    error = lease_attempt(leases, ["0"])
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert str(leases) in str(error) and "writable by other users" in str(error) and "FT_GPU_LEASES" in str(error)
    assert not (leases / "gpu-0.lock").exists()
    leases.chmod(0o1777)  # a shared, sticky directory (as /tmp is): nobody can replace another's file
    assert lease_attempt(leases, ["0"]) is None


def test_a_lease_directory_that_is_a_symlink_is_refused(leases, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(leases)
    error = lease_attempt(link, ["0"])
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert "symbolic link" in str(error)


def test_a_lease_directory_owned_by_another_user_is_refused(leases):
    if os.geteuid() == 0:
        os.chown(leases, 65534, 65534)  # nobody's
        other = leases
    else:  # a directory root owns without the sticky bit (/usr): not ours, not a shared one
        other = Path("/usr")
    error = lease_attempt(other, ["0"])
    assert isinstance(error, gpu_leases.UnsafeLeases), repr(error)
    assert f"owned by uid {os.lstat(other).st_uid}" in str(error)
    assert not (other / "gpu-0.lock").exists()
