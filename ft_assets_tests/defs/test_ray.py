"""`compute.launcher: ray`: adapter training as a job on a real Ray cluster (a local head on
loopback, started and stopped here by its own process ids), submitted by dagster-ray's
`PipesRayJobClient`; Ray Train's TorchTrainer runs 2 CPU workers (gloo).

- Ray's 2 workers x batch 4 equal 1 process x batch 8 on the same rows, within the spread of
  two single-process runs that are one computation in two summation orders (as under torchrun).
- the Pipes side: the driver forwards rank 0's step log and result; they reach the step's log
  and the materialization (steps, final loss, tokens/s), with the launcher's facts.
- kill -9 of one Ray worker mid-run: the step fails naming that rank, nothing is stored, and the
  message says which checkpoint a rerun resumes from (the resume itself is torchrun's test: the
  same loop and checkpoint files).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from ft_assets import demo
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.defs.test_failures import failure_message
from ft_assets_tests.defs.test_scale_out import (  # noqa: F401  (project: the shared fixture)
    adapter_of, largest_difference, materialize, materialize_killing_rank_1, project, recipe_file)

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


RAY_LOGS = ("ray_process_exit.log", "dashboard.log", "dashboard.err", "dashboard_JobHead.log", "gcs_server.err",
            "gcs_server.out", "raylet.err", "raylet.out")


def ray_logs(temp_dir: Path) -> str:
    """The head's console and the tails of the Ray logs that say why a part of it stopped."""
    parts = [f"--- head.log\n{(temp_dir / 'head.log').read_text()[-2000:]}"]
    for name in RAY_LOGS:
        path = temp_dir / "session_latest" / "logs" / name
        if path.is_file() and path.stat().st_size:
            parts.append(f"--- {name}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)


def head_problem(head: subprocess.Popen, address: str) -> str | None:
    """Why the head cannot take a job now (stopped, or its Jobs API does not answer), or None."""
    if head.poll() is not None:
        return f"the Ray head exited with {head.returncode}"
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=10).read()
    except OSError as exc:
        return f"the Ray head's Jobs API ({address}) does not answer: {exc}"
    return None


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` on 127.0.0.1 with 3 CPUs: (its process, Jobs API address, temp
    dir). Stopped by the process ids it started (never `ray stop`, which stops every Ray on the machine)."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics, env_agent = _free_ports(7)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = loopback, servers bind 127.0.0.1
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv
           "RAY_USAGE_STATS_ENABLED": "0",
           # the dashboard's modules are processes that must answer within 30 s of (re)starting, or
           # the dashboard gives up on them: not always so on 2 cores shared with two test workers
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300"}
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=3", "--num-gpus=0",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine (two test workers) starts Ray's dashboard slowly
        while (problem := head_problem(head, address)) is not None:
            assert head.poll() is None and time.time() < deadline, f"{problem}:\n{ray_logs(temp_dir)}"
            time.sleep(0.5)
        yield head, address, temp_dir
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head(ray_cluster):
    """The Jobs API address of a head that answers; a test after which it no longer does fails
    with Ray's own account of what stopped (the tests' failures would only say "connection refused")."""
    head, address, temp_dir = ray_cluster
    problem = head_problem(head, address)
    assert problem is None, f"before the test: {problem}:\n{ray_logs(temp_dir)}"
    yield address
    problem = head_problem(head, address)
    assert problem is None, f"during the test: {problem}:\n{ray_logs(temp_dir)}"


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's own pid and 3 s of grace (stopping cleanly takes Ray ~20 s, which
    nothing here needs), then SIGKILL to its process group (the session it leads: Ray's servers
    and workers) and to every descendant seen before (Ray's job drivers run in sessions of their own)."""
    try:
        procs = [psutil.Process(head.pid)] + psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is empty: everything stopped within the grace
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    head.wait(timeout=10)
    psutil.wait_procs(procs, timeout=10)


def test_ray_workers_train_what_one_process_trains_and_report_through_pipes(project, ray_head, tmp_path):
    root, model_dir = project
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)  # the user's instance: persistent, gpu pool limited to 1
    ray = {"launcher": "ray", "ray": {"address": ray_head, "num_workers": 2}}
    try:
        one = materialize(recipe_file(root, model_dir, "one", {"batch_size": 8}, {}), home, instance)
        accum = materialize(recipe_file(root, model_dir, "accum", {"batch_size": 4, "grad_accum": 2}, {}), home, instance)
        on_ray = materialize(recipe_file(root, model_dir, "ray", {"batch_size": 4}, ray), home, instance)
        logs = [e.message for e in instance.all_logs(on_ray.run_id) if e.user_message]
    finally:
        instance.dispose()
    (m_one, w_one), (m_acc, w_acc), (m_ray, w_ray) = (adapter_of(r, home) for r in (one, accum, on_ray))

    assert (m_ray["tokens_trained"], m_ray["tokens_seen"], m_ray["steps"]) == \
        (m_one["tokens_trained"], m_one["tokens_seen"], m_one["steps"]) == (m_acc["tokens_trained"], m_acc["tokens_seen"], 12)
    spread = largest_difference(w_one, w_acc)
    assert largest_difference(w_one, w_ray) <= max(4 * spread, 1e-6), (largest_difference(w_one, w_ray), spread)
    loss_spread = max(abs(a[1] - b[1]) for a, b in zip(m_one["losses"], m_acc["losses"]))
    for (s1, l1), (s2, l2) in zip(m_one["losses"], m_ray["losses"]):
        assert s1 == s2 and abs(l1 - l2) <= max(4 * loss_spread, 1e-5), (s1, l1, l2)
    assert m_one["losses"][0][1] - m_one["losses"][-1][1] > 100 * max(4 * loss_spread, 1e-5)  # rank 1's rows count

    # what Pipes carried from the Ray job's driver: rank 0's step log, the result as metadata
    assert any(line.startswith("step 12: loss") for line in logs), logs[-20:]
    assert any("x 2 processes" in line for line in logs), logs[-20:]
    assert any("Ray job" in line for line in logs)
    assert (m_ray["launcher"], m_ray["processes"], m_ray["ray_address"]) == ("ray", 2, ray_head)
    for key in ("final_loss", "tokens_per_s", "wall_time_s", "trainable_parameters"):
        assert m_ray[key] and m_ray[key] > 0, key
    assert m_ray["data_version"] not in (m_one["data_version"], m_acc["data_version"])


def test_kill_9_of_a_ray_worker_fails_the_asset_naming_it_and_nothing_is_stored(project, ray_head, tmp_path):
    root, model_dir = project
    path = recipe_file(root, model_dir, "ray_long", {"batch_size": 4, "max_steps": 60, "checkpoint_every": 5},
                       {"launcher": "ray", "ray": {"address": ray_head, "num_workers": 2}})
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)
    try:
        failed, killed = materialize_killing_rank_1(path, home, instance)
    finally:
        instance.dispose()
    assert killed and not failed.success
    message = failure_message(failed)
    assert f"rank 1 (pid {killed['pid']}) of 2 was killed" in message, message
    assert "Nothing was stored. Materialize again to resume from the checkpoint of step" in message, message
    assert ArtifactStore(home).latest("adapter", "lora") is None
