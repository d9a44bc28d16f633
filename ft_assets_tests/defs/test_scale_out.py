"""`compute.launcher: torchrun`: adapter training in torchrun processes (gloo, 2 ranks on CPU),
launched through Dagster Pipes by the asset, on the persistent instance with its gpu pool.

The lora run on 2 torchrun ranks x batch 4 (`ddp_run`) is materialized once for the module; the
comparisons below read it.
- DDP equals one process: 2 ranks x batch 4 against 1 process x batch 8 on the same rows, the
  loss curve and the adapter's weights within the spread of two single-process runs that are
  the same computation in another summation order (batch 8, and batch 4 x grad_accum 2).
- the Pipes side: the step log lines and the training facts reach the materialization.
- two nodes (two torchrun agents over loopback, the second started from the step's join.sh)
  train what one node with two processes trains, bit for bit.
- GPU placement (on CPU, with named devices): a torchrun step leases GPUs no other step holds
  and starts its ranks with them as CUDA_VISIBLE_DEVICES.
- kill -9 of the Dagster step's process: its ranks stop themselves with a checkpoint.
- kill -9 of rank 1 mid-run: the step fails naming rank 1, nothing is stored; the rerun
  resumes from the checkpoint and ends with the adapter the uninterrupted `ddp_run` made.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import dagster as dg
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_assets import demo
from ft_assets.models import gpu_leases
from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl
from ft_assets_tests.defs.test_failures import failure_message

pytestmark = pytest.mark.slow

METHODS = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "qlora": {"r": 4, "alpha": 8, "dropout": 0.0}, "full": {}}
TRAINING = {"max_steps": 12, "epochs": 100, "lr": 2e-2, "warmup_ratio": 0.0, "checkpoint_every": 4}


def recipe_file(root: Path, model_dir: Path, label: str, training: dict, compute: dict, method: str = "lora") -> Path:
    recipe = make_recipe(model_dir, quantization={"method": "nf4" if method == "qlora" else "none"},
                         training={**TRAINING, **training}, methods={method: METHODS[method]},
                         compute={"device": "cpu", **compute})
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("scale_out")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    return root, tiny_model_dir


# lora on one node's 2 torchrun ranks, one thread each (torchrun's own default for several ranks
# per node, stated so that two nodes x 1 process compute the same sums)
DDP = {"launcher": "torchrun", "nproc_per_node": 2, "threads": 1}


@pytest.fixture(scope="module")
def ddp_run(project, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """The lora adapter trained on 2 torchrun ranks x batch 4 (TRAINING: 12 steps, a checkpoint every
    4), through the asset on the user's instance, in a home of its own, once for the module: (the
    materialization's metadata, the adapter's weights, the step's log lines). A torchrun launch is
    three processes importing torch and ft_assets; the tests that compare against this run read it."""
    root, model_dir = project
    home = tmp_path_factory.mktemp("ddp") / "ft_home"
    instance = demo.ensure_instance(home)
    try:
        result = materialize(recipe_file(root, model_dir, "ddp", {"batch_size": 4}, DDP), home, instance)
        logs = [e.message for e in instance.all_logs(result.run_id) if e.user_message]
    finally:
        instance.dispose()
    return (*adapter_of(result, home), logs)


def materialize(path: Path, home: Path, instance: dg.DagsterInstance, raise_on_error: bool = True,
                run_config: dict | None = None, method: str = "lora") -> dg.ExecuteInJobResult:
    defs = build_definitions(load_recipe(path), home=str(home))
    upstream = ["base_model", "sft_dataset"] + (["base_eval", "quantized_base"] if method == "qlora" else [])
    dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=upstream)
    return dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key=method,
                          selection=["adapter"], raise_on_error=raise_on_error, run_config=run_config)


def adapter_of(result: dg.ExecuteInJobResult, home: Path, method: str = "lora", weights: str = "adapter_model.safetensors"
               ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(materialization metadata, adapter weights) of the run's adapter."""
    mat = result.asset_materializations_for_node("adapter")[0]
    meta = {k: v.value for k, v in mat.metadata.items()}
    art = ArtifactStore(home).get("adapter", method, meta["data_version"])
    return meta, load_file(str(art.dir / weights))


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_train_what_one_process_trains_and_report_through_pipes(project, ddp_run, tmp_path):
    root, model_dir = project
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)  # the user's instance: persistent, gpu pool limited to 1
    try:
        one = materialize(recipe_file(root, model_dir, "one", {"batch_size": 8}, {}), home, instance)
        accum = materialize(recipe_file(root, model_dir, "accum", {"batch_size": 4, "grad_accum": 2}, {}), home, instance)
    finally:
        instance.dispose()
    (m_one, w_one), (m_acc, w_acc) = (adapter_of(r, home) for r in (one, accum))
    m_ddp, w_ddp, logs = ddp_run

    # the same rows per step: as many label tokens and input tokens, step by step
    assert (m_ddp["tokens_trained"], m_ddp["tokens_seen"], m_ddp["steps"]) == \
        (m_one["tokens_trained"], m_one["tokens_seen"], m_one["steps"]) == (m_acc["tokens_trained"], m_acc["tokens_seen"], 12)
    spread = largest_difference(w_one, w_acc)  # one computation, two summation orders
    tolerance = max(4 * spread, 1e-6)
    assert largest_difference(w_one, w_ddp) <= tolerance, (largest_difference(w_one, w_ddp), spread)
    loss_spread = max(abs(a[1] - b[1]) for a, b in zip(m_one["losses"], m_acc["losses"]))
    for (s1, l1), (s2, l2) in zip(m_one["losses"], m_ddp["losses"]):
        assert s1 == s2 and abs(l1 - l2) <= max(4 * loss_spread, 1e-5), (s1, l1, l2)
    # a rank that did nothing (or trained rank 0's rows again) would not match: the rows differ
    # and the adapter moved (the first and last losses differ by far more than the tolerance)
    assert m_one["losses"][0][1] - m_one["losses"][-1][1] > 100 * max(4 * loss_spread, 1e-5)
    assert largest_difference(w_one, {k: torch.zeros_like(v) for k, v in w_one.items()}) > 100 * tolerance

    # what Pipes carried: rank 0's log lines in the step's log, the facts on the materialization
    assert any(line.startswith("step 12: loss") for line in logs), logs[-20:]
    assert any("x 2 processes" in line for line in logs)
    assert (m_ddp["launcher"], m_ddp["processes"]) == ("torchrun", 2)
    for key in ("final_loss", "tokens_per_s", "peak_memory_bytes", "wall_time_s", "trainable_parameters"):
        assert m_ddp[key] and m_ddp[key] > 0, key
    assert m_ddp["data_version"] not in (m_one["data_version"], m_acc["data_version"])


def test_qlora_trains_on_its_nf4_base_under_two_ranks_as_in_one_process(project, tmp_path):
    root, model_dir = project
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)
    runs = {}
    try:
        for label, training, compute in (("one", {"batch_size": 8}, {}), ("accum", {"batch_size": 4, "grad_accum": 2}, {}),
                                         ("ddp", {"batch_size": 4}, {"launcher": "torchrun", "nproc_per_node": 2})):
            path = recipe_file(root, model_dir, f"q{label}", training, compute, method="qlora")
            runs[label] = adapter_of(materialize(path, home, instance, method="qlora"), home, "qlora")
    finally:
        instance.dispose()
    (m_one, w_one), (_, w_acc), (m_ddp, w_ddp) = runs["one"], runs["accum"], runs["ddp"]
    spread = largest_difference(w_one, w_acc)
    assert m_ddp["tokens_trained"] == m_one["tokens_trained"] and m_ddp["processes"] == 2
    assert largest_difference(w_one, w_ddp) <= max(4 * spread, 1e-6), (largest_difference(w_one, w_ddp), spread)
    assert m_one["losses"][0][1] - m_one["losses"][-1][1] > 0.01  # it trained


def one_accum_and_fsdp(root: Path, model_dir: Path, home: Path, prefix: str, method: str, weights: str,
                       training: dict) -> tuple[dict, list[str], dg.ExecuteInJobResult]:
    """`method` trained through the asset as 1 process x batch 8, 1 x batch 4 x grad_accum 2 and
    FSDP2 2 torchrun ranks x batch 4 (`training` added: a sharded model's loss runs through the
    model's own forward, so `loss: plain`), then merged_model of the last: ((metadata, weights)
    by label, the step log's FSDP2 lines, the merge's result)."""
    instance = demo.ensure_instance(home)
    runs = {}
    try:
        for label, batch, compute in (
                ("one", {"batch_size": 8}, {}), ("accum", {"batch_size": 4, "grad_accum": 2}, {}),
                ("fsdp", {"batch_size": 4}, {"launcher": "torchrun", "nproc_per_node": 2, "parallel": "fsdp"})):
            path = recipe_file(root, model_dir, f"{prefix}{label}", {**training, **batch}, compute, method=method)
            result = materialize(path, home, instance, method=method)
            runs[label] = adapter_of(result, home, method, weights)
        sharded = [e.message for e in instance.all_logs(result.run_id) if "FSDP2: weights sharded" in e.message]
        defs = build_definitions(load_recipe(path), home=str(home))
        merged = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key=method,
                                selection=["merged_model"])
    finally:
        instance.dispose()
    return runs, sharded, merged


def test_fsdp2_full_fine_tuning_under_two_ranks_as_in_one_process_and_merged_downstream(project, tmp_path):
    """`parallel: fsdp`: the full model's weights, gradients and optimizer state sharded over 2
    torchrun ranks; the stored model equals one process's within the batch 8 / batch 4 x 2 spread,
    and merged_model reads it like any full fine-tune (its check passes)."""
    root, model_dir = project
    runs, sharded, merged = one_accum_and_fsdp(root, model_dir, tmp_path / "ft_home", "f", "full", "model.safetensors",
                                               {"loss": "plain", "lr": 1e-3})
    (m_one, w_one), (_, w_acc), (m_fsdp, w_fsdp) = runs["one"], runs["accum"], runs["fsdp"]
    spread = largest_difference(w_one, w_acc)
    assert sharded and m_fsdp["tokens_trained"] == m_one["tokens_trained"] and m_fsdp["processes"] == 2
    assert largest_difference(w_one, w_fsdp) <= max(4 * spread, 1e-6), (largest_difference(w_one, w_fsdp), spread)
    check = merged.get_asset_check_evaluations()[0]
    assert check.check_name == "matches_adapter" and check.passed


def test_fsdp2_lora_shards_its_frozen_base_and_trains_as_one_process_through_the_asset(project, tmp_path):
    """`parallel: fsdp` with LoRA: the base and the adapter sharded over 2 torchrun ranks; the stored
    adapter (peft's format, from the gathered tensors) equals one process's within the batch 8 /
    batch 4 x 2 spread, and merged_model reads it (its check passes)."""
    root, model_dir = project
    runs, sharded, merged = one_accum_and_fsdp(root, model_dir, tmp_path / "ft_home", "lf", "lora",
                                               "adapter_model.safetensors", {"loss": "plain"})
    (m_one, w_one), (_, w_acc), (m_fsdp, w_fsdp) = runs["one"], runs["accum"], runs["fsdp"]
    spread = largest_difference(w_one, w_acc)
    assert sharded and m_fsdp["tokens_trained"] == m_one["tokens_trained"] and m_fsdp["processes"] == 2
    assert largest_difference(w_one, w_fsdp) <= max(4 * spread, 1e-6), (largest_difference(w_one, w_fsdp), spread)
    assert largest_difference(w_one, {k: torch.zeros_like(v) for k, v in w_one.items()}) > 100 * max(4 * spread, 1e-6)
    check = merged.get_asset_check_evaluations()[0]
    assert check.check_name == "matches_adapter" and check.passed


def materialize_killing_rank_1(path: Path, home: Path, instance: dg.DagsterInstance
                               ) -> tuple[dg.ExecuteInJobResult, dict]:
    """The lora adapter materialized while a thread kill -9s rank 1 as soon as it has started and
    a checkpoint exists: (the run's result, {"pid": the pid killed} or {} if it never came)."""
    return killing_rank_1(lambda: materialize(path, home, instance, raise_on_error=False),
                          home / "checkpoints" / "adapter" / "lora")


def killing_rank_1(materialize_it: Callable[[], dg.ExecuteInJobResult], ckpts: Path
                   ) -> tuple[dg.ExecuteInJobResult, dict]:
    """`materialize_it()` while a thread kill -9s rank 1 as soon as it has started and a checkpoint
    exists under `ckpts` (the asset partition's checkpoint root): (the run's result, {"pid": the
    pid killed} or {} if it never came)."""
    killed: dict = {}
    ended = threading.Event()  # the run ended first (it failed before rank 1 started): stop looking

    def kill_rank_1_after_a_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not ended.is_set():
            status = next(ckpts.glob("*/ranks/rank-1.json"), None)
            if status is not None and next(ckpts.glob("*/step-*"), None) is not None:
                pid = json.loads(status.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_after_a_checkpoint)
    killer.start()
    try:
        failed = materialize_it()
    finally:
        ended.set()
        killer.join()
    return failed, killed


def test_kill_9_of_one_rank_fails_clearly_and_the_rerun_resumes_to_the_same_adapter(project, ddp_run, tmp_path):
    """`ddp_run`'s recipe: rank 1 dies once the step-4 checkpoint exists (8 steps still to run), the
    rerun resumes from a checkpoint and ends bit for bit where the uninterrupted `ddp_run` ended."""
    root, model_dir = project
    steps = TRAINING["max_steps"]
    path = recipe_file(root, model_dir, "killed", {"batch_size": 4}, DDP)
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)
    try:
        failed, killed = materialize_killing_rank_1(path, home, instance)
        assert killed and not failed.success
        message = failure_message(failed)
        assert f"rank 1 (pid {killed['pid']}) of 2 was killed" in message, message
        assert "Nothing was stored. Materialize again to resume from the checkpoint of step" in message, message
        assert ArtifactStore(home).latest("adapter", "lora") is None  # nothing stored

        resumed = materialize(path, home, instance)
        m_resumed, w_resumed = adapter_of(resumed, home)
        assert m_resumed["steps"] == steps
    finally:
        instance.dispose()
    m_fresh, w_fresh, _ = ddp_run
    manifest = ArtifactStore(home).get("adapter", "lora", m_resumed["data_version"]).manifest()
    assert TRAINING["checkpoint_every"] <= manifest["train"]["resumed_from_step"] < steps
    assert m_resumed["data_version"] == m_fresh["data_version"]
    assert m_fresh["losses"] == m_resumed["losses"]
    assert largest_difference(w_fresh, w_resumed) == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_what_one_node_with_two_processes_trains(project, ddp_run, tmp_path):
    """`nnodes: 2` on loopback: the step starts node 0 (torchrun, static rendezvous on
    master_addr:master_port); the test plays the second machine and runs the step's `join.sh 1`
    once it appears. Two nodes x 1 process are the world of one node x 2 processes (`ddp_run`): the
    same version, and the same adapter bit for bit (same ranks' rows, same sums; one thread each)."""
    root, model_dir = project
    port = _free_port()
    nodes = recipe_file(root, model_dir, "nodes", {"batch_size": 4}, {
        "launcher": "torchrun", "nnodes": 2, "master_addr": "127.0.0.1", "master_port": port, "threads": 1})
    home_a = tmp_path / "a"
    joined: dict = {}

    def join_as_node_1() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and "proc" not in joined:
            script = next((home_a / "checkpoints" / "adapter" / "lora").glob("*/ranks/join.sh"), None)
            if script is not None:
                joined["proc"] = subprocess.Popen(["sh", str(script), "1"], start_new_session=True,
                                                  env={**os.environ, "PYTHON": sys.executable})
                joined["rc"] = joined["proc"].wait(timeout=600)
                return
            time.sleep(0.1)

    instance = demo.ensure_instance(home_a)
    other = threading.Thread(target=join_as_node_1)
    other.start()
    try:
        two = materialize(nodes, home_a, instance)
        logs = [e.message for e in instance.all_logs(two.run_id) if e.user_message]
    finally:
        other.join(timeout=60)
        if "proc" in joined and joined["proc"].poll() is None:
            os.killpg(joined["proc"].pid, signal.SIGKILL)
        instance.dispose()
    assert joined.get("rc") == 0  # node 1's torchrun trained its rank and ended cleanly
    (m_two, w_two), (m_one, w_one, _) = adapter_of(two, home_a), ddp_run
    assert any("on each other node run `sh " in line and "join.sh <node rank>`" in line for line in logs), logs[-20:]
    assert m_two["processes"] == m_one["processes"] == 2 and m_two["steps"] == 12
    assert m_two["data_version"] == m_one["data_version"]  # the world size is the version's, not its split
    assert m_two["losses"] == m_one["losses"]
    assert largest_difference(w_one, w_two) == 0.0


def test_a_torchrun_step_trains_on_gpus_no_other_step_holds(project, tmp_path, monkeypatch):
    """GPU placement, checked on CPU: this "machine" has the GPUs CUDA_VISIBLE_DEVICES names (0..3,
    as on a 4-GPU machine; no CUDA here, so the ranks train on the CPU). Another process holds
    0 and 1; the torchrun step leases 2 and 3, its ranks are started with
    CUDA_VISIBLE_DEVICES=2,3 (rank 0 says so through Pipes), and the lease is free again after."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("FT_GPU_LEASES", str(tmp_path / "leases"))
    root, model_dir = project
    path = recipe_file(root, model_dir, "placed", {"batch_size": 4},
                       {"launcher": "torchrun", "nproc_per_node": 2, "device": "auto"})
    other = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ft_assets.models.gpu_leases import acquire\n"
         "print(','.join(acquire(2)), flush=True)\ntime.sleep(600)"], stdout=subprocess.PIPE, text=True)
    home = tmp_path / "ft_home"
    instance = demo.ensure_instance(home)
    try:
        assert other.stdout.readline().strip() == "0,1"
        result = materialize(path, home, instance)
        logs = [e.message for e in instance.all_logs(result.run_id) if e.user_message]
    finally:
        other.kill()
        other.wait(timeout=30)
        instance.dispose()
    assert any("GPUs 2,3 of this machine, leased for this run" in line for line in logs), logs[-20:]
    assert any(line.endswith("rank 0 of 2: CUDA_VISIBLE_DEVICES=2,3") for line in logs), logs[-20:]
    with gpu_leases.lease_gpus(4, timeout_s=5, own=[]) as names:  # the step gave its two back
        assert names == ["0", "1", "2", "3"]


STEP = """
import sys
import dagster as dg
from ft_assets import demo
from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from pathlib import Path
home = Path(sys.argv[2])
instance = demo.ensure_instance(home)
defs = build_definitions(load_recipe(sys.argv[1]), home=str(home))
dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=["base_model", "sft_dataset"])
dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key="lora", selection=["adapter"])
"""


def test_ranks_whose_dagster_step_died_stop_with_a_checkpoint_and_free_the_lock(project, tmp_path):
    """kill -9 of the Dagster step's process only (as the OOM killer does): torchrun's ranks run in
    sessions of their own, so they watch the step; they stop within seconds, after a checkpoint
    that all ranks agree on, and the checkpoint directory's lock is free for the rerun."""
    from ft_assets.training.preemption import checkpoint_lock

    root, model_dir = project
    path = recipe_file(root, model_dir, "orphan", {"batch_size": 4, "max_steps": 5000, "epochs": 10000, "checkpoint_every": 5},
                       {"launcher": "torchrun", "nproc_per_node": 2})
    home = tmp_path / "ft_home"
    step = subprocess.Popen([sys.executable, "-c", STEP, str(path), str(home)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DAGSTER_HOME": str(home / "dagster")})
    ckpts = home / "checkpoints" / "adapter" / "lora"
    try:
        deadline = time.time() + 300
        while not (len(list(ckpts.glob("*/ranks/rank-*.json"))) == 2 and next(ckpts.glob("*/step-*"), None)):
            assert step.poll() is None and time.time() < deadline, "the step ended before its first checkpoint"
            time.sleep(0.1)
        ranks = [json.loads(p.read_text())["pid"] for p in sorted(ckpts.glob("*/ranks/rank-*.json"))]
        os.kill(step.pid, signal.SIGKILL)  # the step's process only: torchrun's agent and ranks live on
        step.wait(timeout=30)
        killed_at = time.time()
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in ranks):
            assert time.time() - killed_at < 60, "the ranks kept training without their step"
            time.sleep(0.2)
        stopped_in = time.time() - killed_at
    finally:
        if step.poll() is None:
            os.killpg(step.pid, signal.SIGKILL)
        for pid in locals().get("ranks", []):
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    statuses = [json.loads(p.read_text()) for p in sorted(ckpts.glob("*/ranks/rank-*.json"))]
    assert [s["status"] for s in statuses] == ["failed", "failed"], statuses
    assert all(s["error"].startswith("Preempted: preempted at step ") for s in statuses), statuses
    assert any("by SIGTERM" in s["error"] for s in statuses), statuses  # a watcher's own signal
    assert len({s["error"].split(" by ")[0] for s in statuses}) == 1  # the same step on both ranks
    assert stopped_in < 30
    ckpt_dir = next(ckpts.glob("*/step-*")).parent
    with checkpoint_lock(ckpt_dir):  # free: no orphan holds it
        pass
