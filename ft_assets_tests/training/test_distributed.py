"""Data parallelism in the one training loop (`training.distributed`, `training.loop`): which rows each
rank reads, and two gloo processes on loopback against one process (no Dagster, no torchrun:
the launcher's side is `defs/test_scale_out.py`). The slow tests' two-rank runs (DDP method
families, FSDP2) are spawned once for the module (`two_rank_runs`), and so are the other tests'
(validation, a signal to one rank: `two_rank_checks`); each test asserts on its own."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ft_assets.config.training import TrainingSpec
from ft_assets.training import checkpoint, loop as train
from ft_assets.training.distributed import Ranks
from ft_assets.training.steps import steps_for
from ft_assets.methods import get_method
from ft_assets.config.recipe import ComputeSpec
from ft_assets_tests.conftest import formatted_examples
from ft_assets_tests.training.test_train import SEED, SPEC, cfg, lora_model


@functools.lru_cache(maxsize=None)
def _rows(model_dir: Path) -> list:
    """The 16 formatted rows every run here trains on, made once per process (each call reads
    the tokenizer; training never changes the rows)."""
    return formatted_examples(model_dir, 16)


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    return _rows(tiny_model_dir)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_each_rank_reads_its_own_slice_and_together_the_rows_one_process_reads(examples, group_by_length):
    one = cfg(batch_size=8, max_steps=6, group_by_length=group_by_length)
    two = cfg(batch_size=4, max_steps=6, group_by_length=group_by_length)
    single = [[r.id for mb in step for r in mb] for step in train.batches(examples, one, SEED)]
    rank0 = [[r.id for mb in step for r in mb] for step in train.batches(examples, two, SEED, rank=0, world_size=2)]
    rank1 = [[r.id for mb in step for r in mb] for step in train.batches(examples, two, SEED, rank=1, world_size=2)]
    assert len(single) == len(rank0) == len(rank1) == 6
    for s, a, b in zip(single, rank0, rank1):
        assert len(a) == len(b) == 4 and not set(a) & set(b)  # disjoint, none idle
        assert a + b == s  # the same rows, in the same order, as one process
    assert steps_for(16, two, 2) == steps_for(16, one)


def test_a_checkpoint_written_by_another_number_of_processes_is_refused(tiny_model_dir, examples, tmp_path):
    method = get_method("lora")
    train.train(lora_model(tiny_model_dir), method, SPEC, examples, cfg(max_steps=4), seed=SEED, pad_id=2, checkpoint_dir=tmp_path)
    progress = next(tmp_path.glob("step-*")) / "progress.json"
    progress.write_text(json.dumps({**json.loads(progress.read_text()), "world_size": 2}))
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1"):
        train.train(lora_model(tiny_model_dir), method, SPEC, examples, cfg(max_steps=6), seed=SEED, pad_id=2, checkpoint_dir=tmp_path)


def test_processes_need_a_launcher_that_starts_them():
    with pytest.raises(ValueError, match="nproc_per_node 2 needs launcher: torchrun"):
        ComputeSpec(nproc_per_node=2)
    with pytest.raises(ValueError, match="parallel: fsdp shards the model over several processes"):
        ComputeSpec(parallel="fsdp")
    with pytest.raises(ValueError, match="compute.ray is set but launcher is not ray"):
        ComputeSpec(ray={"num_workers": 2})
    with pytest.raises(ValueError, match="device: cuda on Ray needs ray.use_gpu: true"):
        ComputeSpec(launcher="ray", device="cuda")
    with pytest.raises(ValueError, match="nnodes 2 needs launcher: torchrun and master_addr"):
        ComputeSpec(launcher="torchrun", nnodes=2)
    with pytest.raises(ValueError, match="master_addr / master_port are for several nodes"):
        ComputeSpec(launcher="torchrun", master_addr="10.0.0.1")
    assert ComputeSpec(launcher="torchrun", nproc_per_node=2).world_size == 2
    assert ComputeSpec(launcher="torchrun", nproc_per_node=4, nnodes=2, master_addr="10.0.0.1").world_size == 8
    assert ComputeSpec(launcher="ray", ray={"num_workers": 3}, parallel="fsdp").world_size == 3
    assert ComputeSpec(launcher="ray").world_size == 1
    assert ComputeSpec().model_dump() == ComputeSpec(launcher="inprocess").model_dump()  # recipe hashes unchanged
    assert "ray" not in ComputeSpec().model_dump()  # omitted at its default: no recipe hash moved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VALIDATION = dict(max_steps=24, validation_fraction=0.25, validation_every=2, early_stopping_patience=2, lr=0.1)


def _validated(ranks: Ranks, model_dir: Path, out: Path) -> None:
    """LoRA with VALIDATION on 2 ranks x batch 2; rank r's result and trainable weights in `rank-<r>.pt`."""
    out.mkdir(parents=True, exist_ok=True)
    model = lora_model(model_dir)
    result = train.train(model, get_method("lora"), SPEC, _rows(model_dir), cfg(**VALIDATION, batch_size=2),
                         seed=SEED, pad_id=2, checkpoint_dir=out / "ckpt", ranks=ranks)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"result": result.log(), "weights": weights}, out / f"rank-{ranks.rank}.pt")


def _signalled(ranks: Ranks, model_dir: Path, out: Path) -> None:
    """Rank 1 alone gets SIGTERM during step 2: both ranks must stop after that step, checkpointed.
    Each rank's outcome in `rank-<r>.txt`."""
    import signal

    from ft_assets.training.preemption import Preempted

    def on_log(step: int, loss: float) -> None:
        if ranks.rank == 1 and step == 2:  # arrives during step 2 (its log line), on rank 1 only
            os.kill(os.getpid(), signal.SIGTERM)

    out.mkdir(parents=True, exist_ok=True)
    try:
        train.train(lora_model(model_dir), get_method("lora"), SPEC, _rows(model_dir),
                    cfg(max_steps=12, batch_size=2, checkpoint_every=100), seed=SEED, pad_id=2,
                    checkpoint_dir=out / "ckpt", ranks=ranks, on_log=on_log)
        outcome = "finished"
    except Preempted as exc:
        outcome = f"preempted at {exc.step}"
    (out / f"rank-{ranks.rank}.txt").write_text(outcome)


def _rank_checks(rank: int, port: int, model_dir: str, out: str) -> None:
    """The other tests' two-rank training, in one process group: `_validated` (`validation/`), then
    `_signalled` (`signal/`, last: it ends in a preemption)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = Ranks.from_env("cpu")
    try:
        _validated(ranks, Path(model_dir), Path(out) / "validation")
        _signalled(ranks, Path(model_dir), Path(out) / "signal")
    finally:
        ranks.close()


@pytest.fixture(scope="module")
def two_rank_checks(tiny_model_dir, tmp_path_factory) -> Path:
    """Where `_rank_checks` left its results: its two processes are spawned once for the module
    (each one's imports take seconds of a core)."""
    out = tmp_path_factory.mktemp("two_rank_checks")
    mp.start_processes(_rank_checks, args=(_free_port(), str(tiny_model_dir), str(out)), nprocs=2,
                       start_method="spawn")
    return out


def test_two_processes_with_validation_keep_what_one_process_keeps(tiny_model_dir, examples, two_rank_checks):
    """Validation, early stopping and the best weights (saved by rank 0, read by both) under DDP,
    within the spread of two single-process runs that differ in summation order only (batch 4,
    and batch 2 x grad_accum 2: the per-process batches of the two-rank run)."""
    single = {}
    for label, shape in (("one", {"batch_size": 4}), ("accum", {"batch_size": 2, "grad_accum": 2})):
        model = lora_model(tiny_model_dir)
        result = train.train(model, get_method("lora"), SPEC, examples, cfg(**VALIDATION, **shape), seed=SEED, pad_id=2)
        single[label] = (result.log(), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (one, w_one), (accum, w_accum) = single["one"], single["accum"]
    loss_spread = max(abs(a - b) for (_, a), (_, b) in zip(one["validation_losses"], accum["validation_losses"]))
    weight_spread = max(float((w_one[n] - w_accum[n]).abs().max()) for n in w_one)
    assert one["stopped_early_at"] and one["kept_step"] < one["steps"]  # it stops early, ends with earlier weights
    assert one["kept_step"] == accum["kept_step"] and one["stopped_early_at"] == accum["stopped_early_at"]
    for r in (0, 1):
        got = torch.load(two_rank_checks / "validation" / f"rank-{r}.pt", weights_only=True)
        assert (got["result"]["kept_step"], got["result"]["steps"], got["result"]["stopped_early_at"]) == \
            (one["kept_step"], one["steps"], one["stopped_early_at"])
        assert [s for s, _ in got["result"]["validation_losses"]] == [s for s, _ in one["validation_losses"]]
        for (_, a), (_, b) in zip(got["result"]["validation_losses"], one["validation_losses"]):
            assert abs(a - b) <= max(4 * loss_spread, 1e-6), (a, b, loss_spread)
        for name, w in w_one.items():  # both ranks end with the kept step's weights
            assert float((got["weights"][name] - w).abs().max()) <= max(4 * weight_spread, 1e-7), name


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(two_rank_checks):
    out = two_rank_checks / "signal"
    assert [(out / f"rank-{r}.txt").read_text() for r in (0, 1)] == ["preempted at 2"] * 2
    assert checkpoint.latest_checkpoint(out / "ckpt").name == "step-000002"


def _trained(model_dir: Path, name: str, settings: dict, **run) -> dict[str, torch.Tensor]:
    """Method `name` of test_methods.SPECS trained on the 16 tiny rows; its trainable weights."""
    from ft_assets.models.base_model import load_model
    from ft_assets_tests.methods.test_methods import SPECS
    from ft_assets_tests.methods.test_methods import cfg as method_cfg

    spec = SPECS[name]
    method = get_method(spec.type)
    torch.manual_seed(0)
    model = method.wrap(load_model(model_dir), spec)
    c = method_cfg(spec)
    c = c.model_copy(update=settings)
    train.train(model, method, spec, _rows(model_dir), c, seed=SEED, pad_id=2, **run)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


DDP_METHODS = ("full", "last_layers", "dora", "lora_plus", "delta_lora", "vera", "ia3", "prefix", "prompt", "bottleneck")
FSDP_ADAPTERS = ("lora", "dora", "rslora", "lora_plus", "lora_fa")
# (method, run label, step it is first stopped at: 0 = straight through) of the FSDP2 tests
FSDP_RUNS = (("full", "straight", 0), ("full", "resumed", 4),
             *((name, "straight", 0) for name in FSDP_ADAPTERS), ("lora", "resumed", 4))


def _ddp_methods(ranks: Ranks, model_dir: Path, out: Path) -> None:
    """Every method of DDP_METHODS trained on 2 ranks x batch 2; rank r's weights in `<name>-<r>.pt`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in DDP_METHODS:
        weights = _trained(model_dir, name, {"batch_size": 2}, ranks=ranks,
                           checkpoint_dir=out / name)
        torch.save(weights, out / f"{name}-{ranks.rank}.pt")


def _fsdp_run(ranks: Ranks, model_dir: Path, out: Path, resume_at: int, name: str) -> None:
    """Method `name` trained with FSDP2 on 2 ranks; with `resume_at`, stopped there first (its
    checkpoint kept, as a killed run leaves it) and resumed by a fresh model. Saved as the
    artifact is (`FineTuned.save`)."""
    from ft_assets.trainers.sft import FineTuned
    from ft_assets.models.base_model import load_model
    from ft_assets_tests.methods.test_methods import SPECS
    from ft_assets_tests.methods.test_methods import cfg as method_cfg

    spec, method = SPECS[name], get_method(SPECS[name].type)
    settings = {**method_cfg(spec).model_dump(), "batch_size": 2, "checkpoint_every": 3, "max_steps": 6}
    for stop in ([resume_at] if resume_at else []) + [6]:
        torch.manual_seed(0)
        model = ranks.shard(method.wrap(load_model(model_dir), spec))
        c = TrainingSpec(**{**settings, "max_steps": stop})
        result = train.train(model, method, spec, _rows(model_dir), c, seed=SEED, pad_id=2, checkpoint_dir=out / "ckpt",
                             ranks=ranks)
    (out / "saved").mkdir(parents=True, exist_ok=True)
    FineTuned(model, method, result, 0, 0).save(out / "saved", ranks)
    if ranks.is_main:
        (out / "result.json").write_text(json.dumps(result.log()))


def _rank_slow_runs(rank: int, port: int, model_dir: str, out: str) -> None:
    """The slow tests' two-rank training, all in one process group: the DDP method families
    (`ddp/`), then every FSDP_RUNS entry (`fsdp/<method>/<label>/`)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = Ranks.from_env("cpu")
    try:
        _ddp_methods(ranks, Path(model_dir), Path(out) / "ddp")
        for name, label, resume_at in FSDP_RUNS:
            _fsdp_run(ranks, Path(model_dir), Path(out) / "fsdp" / name / label, resume_at, name)
    finally:
        ranks.close()


@pytest.fixture(scope="module")
def two_rank_runs(tiny_model_dir, tmp_path_factory) -> Path:
    """Where `_rank_slow_runs` left its results: the two processes are spawned once for the
    module (each one's imports take seconds; a spawn per run was most of these tests' time)."""
    out = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(_rank_slow_runs, args=(_free_port(), str(tiny_model_dir), str(out)), nprocs=2,
                       start_method="spawn")
    return out


@pytest.mark.slow
def test_every_method_family_trains_under_two_processes_as_in_one(tiny_model_dir, two_rank_runs):
    """Full weights, last layers, LoRA variants (DoRA's magnitudes, LoRA+'s groups, Delta-LoRA's
    after-step base update, VeRA's shared projections), IA3, prompt learning (no packing) and
    bottleneck adapters: 2 ranks x batch 2 against 1 process x batch 4, within 4x the spread of
    1 process x batch 2 x grad_accum 2 (the same computation, another summation order)."""
    for name in DDP_METHODS:
        one = _trained(tiny_model_dir, name, {"batch_size": 4})
        accum = _trained(tiny_model_dir, name, {"batch_size": 2, "grad_accum": 2})
        spread = max(float((one[k] - accum[k]).abs().max()) for k in one)
        moved = max(float((one[k] - w).abs().max()) for k, w in
                    _initial(tiny_model_dir, name).items())
        for rank in (0, 1):
            got = torch.load(two_rank_runs / "ddp" / f"{name}-{rank}.pt", weights_only=True)
            off = max(float((one[k] - got[k]).abs().max()) for k in one)
            assert off <= max(4 * spread, 1e-6) and off < moved / 100, (name, rank, off, spread, moved)


@functools.lru_cache(maxsize=None)
def _initial(model_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Method `name`'s trainable weights as wrapped (one step at lr 0), once per module: read only."""
    return _trained(model_dir, name, {"max_steps": 1, "lr": 0.0})


@pytest.mark.slow
def test_fsdp2_full_fine_tuning_trains_as_one_process_and_resumes_exactly(tiny_model_dir, two_rank_runs):
    """Weights, gradients and optimizer state sharded over 2 ranks: the same training as one process
    (within 4x the batch 4 / batch 2 x grad_accum 2 spread), and a run resumed from its step-3
    checkpoint (sharded weights and optimizer state written whole, read back into shards) ends
    where the uninterrupted one does."""
    from safetensors.torch import load_file

    # a sharded model's loss goes through the model's own forward (the logits path, `loss: plain`)
    one = _trained(tiny_model_dir, "full", {"batch_size": 4, "max_steps": 6, "loss": "plain"})
    accum = _trained(tiny_model_dir, "full", {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "loss": "plain"})
    spread = max(float((one[k] - accum[k]).abs().max()) for k in one)
    runs = two_rank_runs / "fsdp" / "full"
    straight = load_file(str(runs / "straight" / "saved" / "model.safetensors"))
    resumed = load_file(str(runs / "resumed" / "saved" / "model.safetensors"))
    assert straight.keys() <= one.keys() and len(straight) >= len(one) - 1  # the tied head is not saved
    off = max(float((one[k] - straight[k]).abs().max()) for k in straight)
    assert off <= max(4 * spread, 1e-6), (off, spread)
    assert json.loads((runs / "resumed" / "result.json").read_text())["steps"] == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_base_under_lora_family_adapters_as_one_process_trains(tiny_model_dir, two_rank_runs):
    """`parallel: fsdp` for adapters: base and adapter sharded over 2 ranks (each rank holds half
    of every decoder layer's frozen weights), the adapter saved in peft's format from the gathered
    tensors, within 4x the batch 4 / batch 2 x grad_accum 2 spread of one process, for every
    method marked `fsdp`; LoRA's run resumed from its step-3 checkpoint (the trainable tensors by
    live name, the optimizer state whole) ends bit-identical to the uninterrupted one."""
    from safetensors.torch import load_file

    from ft_assets_tests.methods.test_methods import SPECS

    runs = two_rank_runs / "fsdp"
    for name in FSDP_ADAPTERS:
        assert get_method(SPECS[name].type).fsdp, name
        one = _trained(tiny_model_dir, name, {"batch_size": 4, "max_steps": 6, "loss": "plain"})
        accum = _trained(tiny_model_dir, name, {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "loss": "plain"})
        moved = max(float((one[k] - w).abs().max()) for k, w in _initial(tiny_model_dir, name).items())
        spread = max(float((one[k] - accum[k]).abs().max()) for k in one)
        saved = load_file(str(runs / name / "straight" / "saved" / "adapter_model.safetensors"))
        # peft saves names without the adapter's, and DoRA's magnitude without `.weight`
        live = {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
                for k, v in one.items()}
        assert saved.keys() == live.keys(), name
        off = max(float((live[k] - saved[k]).abs().max()) for k in saved)
        assert off <= max(4 * spread, 1e-6) and off < moved / 100, (name, off, spread, moved)
    resumed = load_file(str(runs / "lora" / "resumed" / "saved" / "adapter_model.safetensors"))
    straight = load_file(str(runs / "lora" / "straight" / "saved" / "adapter_model.safetensors"))
    assert json.loads((runs / "lora" / "resumed" / "result.json").read_text())["steps"] == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
