"""Crashes and faults: kill -9 mid-distillation resumes exactly, NaN stops early with no merged
model, out-of-memory says what to change, two partitions trained at once never collide. (kill -9
and signals during adapter training, on the pool-limited instance: test_dead_runs.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_assets.training import loop as train, prepared
from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.defs.test_failures import instance_of

# Two of these at once are two deployments sharing one FT_HOME (each its own instance): what the
# store must keep apart. (One instance would run them one after the other: its gpu pool.)
RUNNER = textwrap.dedent("""
    import sys, dagster as dg
    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    recipe_path, home, method = sys.argv[1:4]
    defs = build_definitions(load_recipe(recipe_path), home=home)
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance,
                   selection=["base_model", "sft_dataset"])
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance,
                   partition_key=method, selection=["adapter"])
""")


# The teacher (adapter[lora] -> merged_model[lora]), then the student distilled from it, launched as
# `make demo` does: into the persistent instance (gpu pool limit 1) of that FT_HOME.
STUDENT_RUNNER = textwrap.dedent("""
    import sys, dagster as dg
    from ft_assets.demo import ensure_instance, materialize_graph
    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    recipe_path, home = sys.argv[1:3]
    defs = build_definitions(load_recipe(recipe_path), home=home)
    targets = {(dg.AssetKey(k), p) for k, p in (("base_model", None), ("sft_dataset", None), ("adapter", "lora"),
                                                ("merged_model", "lora"), ("student", None))}
    sys.exit(1 if materialize_graph(defs, ensure_instance(), targets) else 0)
""")


def long_recipe(project: Path, **training) -> Path:
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": recipe["methods"]["lora"], "lora_b": {**recipe["methods"]["lora"], "type": "lora"}}
    recipe["training"].update({"epochs": 100, **training})
    path = project / "long.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start(recipe: Path, home: Path, method: str = "lora", runner: str = RUNNER) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FT_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    return subprocess.Popen([sys.executable, "-c", runner, str(recipe), str(home), method], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def distill_recipe(project: Path, **training) -> Path:
    """One teacher (lora, trained briefly) and a long distillation into its second layer."""
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": recipe["methods"]["lora"]}
    recipe["distillation"] = {"teacher": "lora", "keep_layers": [1], "alpha": 0.5, "temperature": 2.0,
                              "speed_prompts": 2, "training": {"epochs": 100, **training}}
    path = project / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_kill_9_mid_distillation_then_rerun_resumes_and_matches_uninterrupted(project, tmp_path):
    steps = 20  # killed once the step-10 checkpoint exists: 10 steps (teacher and student forwards) still to run
    recipe = distill_recipe(project, max_steps=steps, checkpoint_every=5, lr=2e-3)
    ref_home, home = tmp_path / "ref", tmp_path / "killed"
    ref = start(recipe, ref_home, runner=STUDENT_RUNNER)

    victim = start(recipe, home, runner=STUDENT_RUNNER)
    ckpts = home / "checkpoints" / "student" / "_"

    def checkpointed_step() -> int:  # the newest checkpoint's step (only the newest is kept)
        return max((int(p.name.removeprefix("step-")) for p in ckpts.glob("*/step-*")), default=0)

    deadline = time.time() + 300
    while time.time() < deadline and checkpointed_step() < 10:
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # kill -9, no cleanup handlers run
    victim.wait()
    assert ArtifactStore(home).latest("student") is None  # nothing half-written looks finished
    assert not list((home / "artifacts" / "student").glob("*/[!.]*/manifest.json"))

    rerun = start(recipe, home, runner=STUDENT_RUNNER)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out
    assert "resumed from checkpoint at step" in out
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    got, want = ArtifactStore(home).latest("student"), ArtifactStore(ref_home).latest("student")
    assert got.version == want.version  # same inputs, code and settings: the same derived version
    got_w, want_w = (load_file(str(a.dir / "model.safetensors")) for a in (got, want))
    assert got_w.keys() == want_w.keys()
    for name in want_w:  # tolerance: 1e-6 absolute on fp32 CPU weights
        torch.testing.assert_close(got_w[name], want_w[name], atol=1e-6, rtol=0, msg=name)
    log, ref_log = (json.loads((a.dir / "train_log.json").read_text()) for a in (got, want))
    assert log["steps"] == steps and len(log["kl"]) == len(log["ce"]) == steps
    for curve in ("losses", "kl", "ce"):  # the curves before the kill come back from the checkpoint
        assert [s for s, _ in log[curve]] == list(range(1, steps + 1))
        assert [v for _, v in log[curve]] == pytest.approx([v for _, v in ref_log[curve]], abs=1e-5)
    run = got.manifest()["train"]
    print("student killed after its checkpoint at step", run["resumed_from_step"], f"of {steps}; resumed there")
    assert run["resumed_from_step"] >= 10 and run["resumed_from_step"] % 5 == 0
    assert not list(ckpts.glob("*/step-*"))  # finished: checkpoints cleaned up


def test_two_partitions_trained_at_once_never_collide(project, tmp_path):
    recipe = long_recipe(project, max_steps=8, checkpoint_every=2)
    home = tmp_path / "shared"
    procs = [start(recipe, home, m) for m in ("lora", "lora_b")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = ArtifactStore(home)
    a, b = store.latest("adapter", "lora"), store.latest("adapter", "lora_b")
    assert a.dir.parent.name == "lora" and b.dir.parent.name == "lora_b"
    assert a.manifest()["partition"] == "lora" and b.manifest()["partition"] == "lora_b"
    assert not list((home / "artifacts").rglob(".staging-*"))


def _run(project, ft_home, selection, partition=None):
    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home))
    return dg.materialize(list(defs.assets), resources=defs.resources, selection=selection, partition_key=partition,
                          instance=instance_of(ft_home), raise_on_error=False)


def _failure(result) -> str:
    return "\n".join(ev.step_failure_data.user_failure_data.description for ev in result.all_events
                     if ev.is_step_failure and ev.step_failure_data.user_failure_data)


def test_nan_loss_fails_fast_and_no_merged_model_is_made(project, ft_home, monkeypatch):
    assert _run(project, ft_home, ["base_model", "sft_dataset", "quantized_base", "base_eval"]).success
    real = prepared.TokenLoss.loss_sum  # the SFT objective's loss of a micro-batch, as the loop asks for it

    def poisoned(self, batch):
        loss, n, terms = real(self, batch)
        return loss * float("nan"), n, terms

    monkeypatch.setattr(prepared.TokenLoss, "loss_sum", poisoned)
    result = _run(project, ft_home, ["adapter", "merged_model", "eval_report"], partition="lora")
    assert not result.success
    assert "loss is nan at step 1; lower the learning rate" in _failure(result)
    store = ArtifactStore(ft_home)
    assert store.latest("adapter", "lora") is None and store.latest("merged_model", "lora") is None


def test_out_of_memory_says_what_to_change(project, ft_home, monkeypatch):
    assert _run(project, ft_home, ["base_model", "sft_dataset", "quantized_base", "base_eval"]).success

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prepared.TokenLoss, "loss_sum", oom)
    result = _run(project, ft_home, ["adapter"], partition="lora")
    msg = _failure(result)
    assert "lora: out of memory on cpu with batch_size 4" in msg
    assert "training.batch_size: 2 with training.grad_accum: 2" in msg and "gradient_checkpointing: true" in msg
    assert ArtifactStore(ft_home).latest("adapter", "lora") is None


def test_adapter_with_validation_reports_the_kept_step_and_its_curve(project, ft_home):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["training"].update({"max_steps": 12, "epochs": 10, "validation_fraction": 0.25, "validation_every": 2,
                               "early_stopping_patience": 2})
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": recipe["methods"]["lora"]}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert _run(project, ft_home, ["base_model", "sft_dataset"]).success
    result = _run(project, ft_home, ["adapter"], partition="lora")
    assert result.success, [ev.step_failure_data.error for ev in result.all_events if ev.is_step_failure]
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    curve = meta["validation_losses"].value
    assert meta["validation_rows"].value == 9  # a quarter of the 36 training rows (12 of 48 rows are the eval split)
    assert [s for s, _ in curve] == list(range(2, 2 * len(curve) + 1, 2))
    best = min(v for _, v in curve)
    assert meta["kept_step"].value == next(s for s, v in curve if v == best)
    train_facts = ArtifactStore(ft_home).latest("adapter", "lora").manifest()["train"]
    assert train_facts["kept_step"] == meta["kept_step"].value and train_facts["best_validation_loss"] == best
