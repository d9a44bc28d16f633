"""`compute.launcher: torchrun` for the TRL trainers: `preference_adapter` (DPO: TRL's DPOTrainer),
`reward_model` (TRL's RewardTrainer) and `policy_adapter` (GRPO: TRL's GRPOTrainer), each over HF
Trainer's DDP (gloo) in 2 torchrun ranks on CPU, launched through Dagster Pipes by the asset, on
the user's persistent instance with its gpu pool (`defs.launchers`, `jobs.train`'s trainers).

- 2 ranks x batch 2 train what 1 process x batch 4 trains, for DPO and for the reward model: the
  loss curve and the weights within the spread of two single-process runs that are the same
  computation in another summation order (batch 4, and batch 2 x grad_accum 2); the step log and
  the launcher facts reach the materialization through Pipes; the reward model's held-out report
  is made in the step from the scorer rank 0 saved.
- GRPO on 2 ranks: each rank samples the answers of its share of a step's prompts (so no
  single-process run computes the same numbers); a step takes twice the prompts, the policy moves
  from its SFT start, and the held-out evaluation is made in the step from the adapter rank 0 saved.
- kill -9 of DPO's rank 1 once a checkpoint exists (the 2-rank run again, forced): the step fails
  naming rank 1, nothing is stored; the rerun resumes from the checkpoint and ends bit for bit
  with the uninterrupted 2-rank run.

The SFT adapter DPO continues trains in the step (the in-process recipe materializes the upstream;
the torchrun recipe reuses it: same derivation), so each torchrun launch here is a TRL trainer's.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_assets import demo
from ft_assets.artifacts.store import ArtifactStore
from ft_assets.config.recipe import load_recipe
from ft_assets.definitions import build_definitions
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl
from ft_assets_tests.defs.test_beyond_sft import pref_rows
from ft_assets_tests.defs.test_failures import failure_message
from ft_assets_tests.defs.test_scale_out import killing_rank_1, largest_difference

pytestmark = pytest.mark.slow

# 16 pairs, 12 of them train: 4 pairs a step, 3 steps an epoch, so the resume (from step 2) is mid-epoch
DPO_TRAINING = {"max_steps": 6, "epochs": 100, "lr": 2e-2, "warmup_ratio": 0.0, "checkpoint_every": 2}
DDP = {"launcher": "torchrun", "nproc_per_node": 2, "threads": 1}


def recipe_file(root: Path, model_dir: Path, label: str, dpo_training: dict, compute: dict) -> Path:
    """DPO and a LoRA reward model `rm`, both with `dpo_training` over DPO_TRAINING."""
    training = {**DPO_TRAINING, **dpo_training}
    recipe = make_recipe(
        model_dir, quantization={"method": "none"},
        methods={"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                 "dpo": {"sft_from": "lora", "beta": 0.1, "training": training}},
        preferences={"name": "prefs", "path": "data/prefs.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25},
        reward_models={"rm": {"r": 4, "alpha": 8, "dropout": 0.0, "training": dict(training)}},
        # the tiny random model's answers all score 0 token F1 (no advantage, no update): the reward
        # model's scores tell them apart, and each rank loads it
        policies={"grpo": {"sft_from": "lora", "num_generations": 2,
                           "rewards": [{"type": "token_f1"}, {"type": "reward_model", "reward_model": "rm"}],
                           "max_completion_length": 4, "heldout_prompts": 3,
                           "training": {"max_steps": 2, "batch_size": 4, "lr": 5e-3}}},
        compute={"device": "cpu", **compute})
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def materialize_dpo(path: Path, home: Path, instance: dg.DagsterInstance, raise_on_error: bool = True,
                    asset: str = "preference_adapter", partition: str = "dpo", force: bool = False
                    ) -> dg.ExecuteInJobResult:
    """preference_adapter[dpo] (or `asset[partition]`) of `path`'s recipe (its upstream already
    materialized); `force`: trained again though that derivation exists."""
    defs = build_definitions(load_recipe(path), home=str(home))
    config = {"ops": {asset: {"config": {"force": True}}}} if force else None
    return dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, partition_key=partition,
                          selection=[asset], raise_on_error=raise_on_error, run_config=config)


def materialize_upstream(path: Path, home: Path, instance: dg.DagsterInstance) -> None:
    """What preference_adapter[dpo] and reward_model[rm] read: base_model, sft_dataset, adapter[lora],
    preference_dataset[dpo] and [rm]."""
    defs = build_definitions(load_recipe(path), home=str(home))
    kw = dict(instance=instance, resources=defs.resources)
    dg.materialize(list(defs.assets), selection=["base_model", "sft_dataset"], **kw)
    dg.materialize(list(defs.assets), selection=["adapter"], partition_key="lora", **kw)
    for reader in ("dpo", "rm"):
        dg.materialize(list(defs.assets), selection=["preference_dataset"], partition_key=reader, **kw)


def dpo_of(result: dg.ExecuteInJobResult, home: Path, asset: str = "preference_adapter", partition: str = "dpo",
           weights: str = "adapter_model.safetensors") -> tuple[dict, dict[str, torch.Tensor]]:
    """(materialization metadata, weights) of the run's preference_adapter[dpo] (or `asset[partition]`)."""
    mat = result.asset_materializations_for_node(asset)[0]
    meta = {k: v.value for k, v in mat.metadata.items()}
    art = ArtifactStore(home).get(asset, partition, meta["data_version"])
    return meta, load_file(str(art.dir / weights))


def reward_of(result: dg.ExecuteInJobResult, home: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(materialization metadata, merged scorer weights) of the run's reward_model[rm]."""
    return dpo_of(result, home, "reward_model", "rm", "model.safetensors")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pref_scale_out")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    write_jsonl(root / "data" / "prefs.jsonl", pref_rows(16))
    return root, tiny_model_dir


@pytest.fixture(scope="module")
def runs(project, tmp_path_factory) -> dict:
    """DPO and the reward model three ways in one home on the user's instance: 1 process x batch 4
    ("one"), 1 process x batch 2 x grad_accum 2 ("accum"), 2 torchrun ranks x batch 2 ("ddp"); each
    (metadata, weights) (the reward model's under "rm_<way>"), the ddp DPO step's log lines, and the
    SFT adapter DPO continues ("sft")."""
    root, model_dir = project
    home = tmp_path_factory.mktemp("dpo_ddp") / "ft_home"
    instance = demo.ensure_instance(home)
    out = {}
    try:
        plans = {"one": ({"batch_size": 4}, {}), "accum": ({"batch_size": 2, "grad_accum": 2}, {}),
                 "ddp": ({"batch_size": 2}, DDP)}
        for label, (training, compute) in plans.items():
            path = recipe_file(root, model_dir, label, training, compute)
            if label == "one":
                materialize_upstream(path, home, instance)
            result = materialize_dpo(path, home, instance)
            out[label] = dpo_of(result, home)
            out[f"rm_{label}"] = reward_of(materialize_dpo(path, home, instance, asset="reward_model", partition="rm"),
                                           home)
            if label == "ddp":
                out["grpo"] = dpo_of(materialize_dpo(path, home, instance, asset="policy_adapter", partition="grpo"),
                                     home, "policy_adapter", "grpo")
            if label == "ddp":
                out["logs"] = [e.message for e in instance.all_logs(result.run_id) if e.user_message]
        out["home"] = str(home)
        out["sft"] = load_file(str(ArtifactStore(home).latest("adapter", "lora").dir / "adapter_model.safetensors"))
    finally:
        instance.dispose()
    return out


def ddp_matches_one_process(one, accum, ddp) -> tuple[float, float]:
    """Each (metadata, weights): the 2-rank run's steps, loss curve and weights equal one process's
    at twice the batch within 4x the spread of one computation in two summation orders (batch 4,
    batch 2 x grad_accum 2); (the weight tolerance, the loss tolerance)."""
    (m_one, w_one), (m_acc, w_acc), (m_ddp, w_ddp) = one, accum, ddp
    assert m_one["steps"] == m_acc["steps"] == m_ddp["steps"] == DPO_TRAINING["max_steps"]
    spread = largest_difference(w_one, w_acc)  # one computation, two summation orders
    tolerance = max(4 * spread, 1e-6)
    assert largest_difference(w_one, w_ddp) <= tolerance, (largest_difference(w_one, w_ddp), spread)
    loss_spread = max(abs(a[1] - b[1]) for a, b in zip(m_one["losses"], m_acc["losses"]))
    loss_tolerance = max(4 * loss_spread, 1e-5)
    assert [s for s, _ in m_one["losses"]] == [s for s, _ in m_ddp["losses"]] == list(range(1, 7))
    for (s, l1), (_, l2) in zip(m_one["losses"], m_ddp["losses"]):
        assert abs(l1 - l2) <= loss_tolerance, (s, l1, l2)
    return tolerance, loss_tolerance


def test_dpo_on_two_ranks_trains_what_one_process_trains_at_twice_the_batch(runs):
    (m_one, w_one), (m_acc, _), (m_ddp, _) = runs["one"], runs["accum"], runs["ddp"]
    tolerance, loss_tolerance = ddp_matches_one_process(runs["one"], runs["accum"], runs["ddp"])
    assert m_one["train_pairs"] == m_ddp["train_pairs"] == 12
    # a rank that trained nothing, or rank 0's rows again, would not match: the adapter moved far
    # more than the tolerance, and the loss fell
    assert largest_difference(w_one, runs["sft"]) > 100 * tolerance
    assert m_one["losses"][0][1] - m_one["losses"][-1][1] > 100 * loss_tolerance

    # Pipes: rank 0's lines in the step's log, the launcher on the materialization
    logs = runs["logs"]
    assert any(line.startswith("step 6: loss") for line in logs), logs[-20:]
    assert any("x 2 processes" in line for line in logs), logs[-20:]
    assert (m_ddp["launcher"], m_ddp["processes"]) == ("torchrun", 2)
    assert "launcher" not in m_one
    assert m_ddp["data_version"] not in (m_one["data_version"], m_acc["data_version"])


def test_kill_9_of_one_dpo_rank_fails_clearly_and_the_rerun_resumes_to_the_same_adapter(project, runs):
    """`runs`' ddp recipe trained again in its home (`force`: that version exists; its checkpoints
    are keyed by the same derivation): rank 1 dies once a checkpoint exists, the step fails naming
    it and stores nothing; the rerun resumes from the checkpoint and ends bit for bit where the
    uninterrupted ddp run ended."""
    root, model_dir = project
    home = Path(runs["home"])
    path = recipe_file(root, model_dir, "ddp", {"batch_size": 2}, DDP)
    store = ArtifactStore(home)
    stored = store.latest_version("preference_adapter", "dpo")
    instance = demo.ensure_instance(home)
    try:
        failed, killed = killing_rank_1(
            lambda: materialize_dpo(path, home, instance, raise_on_error=False, force=True),
            home / "checkpoints" / "preference_adapter" / "dpo")
        assert killed and not failed.success
        message = failure_message(failed)
        assert f"rank 1 (pid {killed['pid']}) of 2 was killed" in message, message
        assert "Nothing was stored. Materialize again to resume from the checkpoint of step" in message, message
        assert store.latest_version("preference_adapter", "dpo") == stored

        m_resumed, w_resumed = dpo_of(materialize_dpo(path, home, instance, force=True), home)
    finally:
        instance.dispose()
    m_fresh, w_fresh = runs["ddp"]
    manifest = store.get("preference_adapter", "dpo", m_resumed["data_version"]).manifest()
    assert DPO_TRAINING["checkpoint_every"] <= manifest["train"]["resumed_from_step"] < DPO_TRAINING["max_steps"]
    assert m_resumed["losses"] == m_fresh["losses"]
    assert largest_difference(w_fresh, w_resumed) == 0.0


def test_the_reward_model_on_two_ranks_trains_what_one_process_trains_at_twice_the_batch(runs):
    (m_one, _), (m_ddp, _) = runs["rm_one"], runs["rm_ddp"]
    _, loss_tolerance = ddp_matches_one_process(runs["rm_one"], runs["rm_accum"], runs["rm_ddp"])
    assert abs(m_one["losses"][0][1] - m_one["losses"][-1][1]) > 100 * loss_tolerance  # it trained
    # the held-out report, made in the step from the scorer rank 0 saved, as from the in-process one
    assert m_ddp["heldout_pairs"] == m_one["heldout_pairs"] == 4
    assert abs(m_ddp["heldout_mean_margin"] - m_one["heldout_mean_margin"]) <= 1e-3
    assert (m_ddp["launcher"], m_ddp["processes"]) == ("torchrun", 2) and "launcher" not in m_one


def test_grpo_on_two_ranks_trains_through_the_asset_and_is_evaluated_in_the_step(runs):
    meta, weights = runs["grpo"]
    assert (meta["launcher"], meta["processes"]) == ("torchrun", 2)
    home = Path(runs["home"])
    manifest = ArtifactStore(home).get("policy_adapter", "grpo", meta["data_version"]).manifest()
    assert meta["steps"] == manifest["train"]["steps"] == 2
    assert manifest["train"]["prompts_seen"] == 2 * 4  # 4 completions a rank, 2 per prompt, 2 ranks
    assert largest_difference(weights, runs["sft"]) > 1e-6  # it moved from its SFT start
    # the held-out comparison, made in the step from what rank 0 saved
    assert meta["heldout_prompts"] == 3 and meta["heldout_kl_from_start"] is not None
    assert 0.0 <= meta["heldout_token_f1"] <= 1.0
