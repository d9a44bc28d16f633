"""A single-node torchrun run listens on loopback only (`defs/launchers.torchrun_command`,
`jobs/loopback_torchrun`): while its ranks are joined, every listening socket of the agent and
of the ranks is on 127.0.0.1 / ::1, so nobody on the network can join the rendezvous and feed
the ranks tensors. The command is the one the launcher builds, with the training module
replaced by a probe that joins the process group as a rank does (`Ranks.from_env`) and waits.
The ranks' environment names this machine's other interface for gloo (GLOO_SOCKET_IFNAME), as a
cluster's profile may, or as a host name that resolves to the LAN address makes gloo choose.
Several nodes keep the command they had (master_addr as configured)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from ft_assets.defs.launchers import torchrun_command
from ft_assets.config.recipe import ComputeSpec

PROBE = """
import sys, time
from pathlib import Path
from ft_assets.training.distributed import Ranks
out = Path(sys.argv[1])
ranks = Ranks.from_env("cpu")
assert ranks.sum([1.0]) == [2.0]
(out / f"ready-{ranks.rank}").write_text("")
deadline = time.time() + 120
while not (out / "release").exists() and time.time() < deadline:
    time.sleep(0.05)
ranks.close()
"""


def other_interface() -> str | None:
    """A network interface with an IPv4 address other than loopback, if this machine has one."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback for a in addrs):
            return name
    return None


def listening(root: psutil.Process) -> list[tuple[int, str, int]]:
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.pid in pids and c.status == psutil.CONN_LISTEN]


def test_a_single_node_run_listens_on_loopback_only(tmp_path):
    compute = ComputeSpec(launcher="torchrun", nproc_per_node=2, device="cpu")
    command = torchrun_command(tmp_path / "job.json", compute)
    at = command.index("ft_assets.jobs.train")
    assert command[at - 1] == "-m" and command[at + 1] == str(tmp_path / "job.json")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    command = command[:at - 1] + [str(probe), str(tmp_path)]
    env = {**os.environ, **({"GLOO_SOCKET_IFNAME": other_interface()} if other_interface() else {})}
    agent = subprocess.Popen(command, env=env, start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.time() + 180
        while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
            assert agent.poll() is None, f"torchrun exited ({agent.returncode}) before its ranks joined"
            assert time.time() < deadline, "the ranks never joined"
            time.sleep(0.1)
        sockets = listening(psutil.Process(agent.pid))
        (tmp_path / "release").write_text("")
        assert agent.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=30)
    assert sockets, "nothing listened: the check would see nothing"
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening beyond loopback (pid, address, port): {exposed}"


def test_several_nodes_keep_their_configured_rendezvous():
    compute = ComputeSpec(launcher="torchrun", nproc_per_node=4, nnodes=2, master_addr="10.0.0.1")
    assert torchrun_command(Path("/x/job.json"), compute, python="py") == [
        "py", "-m", "torch.distributed.run", "--nnodes=2", "--node-rank=0", "--master-addr=10.0.0.1",
        "--master-port=29500", "--nproc-per-node=4", "-m", "ft_assets.jobs.train", "/x/job.json"]
