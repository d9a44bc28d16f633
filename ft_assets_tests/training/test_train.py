"""The training loop on the tiny model: learns, accumulates exactly, resumes exactly, stops on NaN,
turns SIGTERM/SIGINT into a checkpoint, refuses a checkpoint dir another process trains into."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
from pathlib import Path

import pytest

import torch

from ft_assets.data import rows as data
from ft_assets.evaluation import heldout as evaluate
from ft_assets.config.training import TrainingSpec
from ft_assets.training import checkpoint, loop as train
from ft_assets.methods import get_method
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets.training.preemption import CheckpointBusy, Preempted, checkpoint_lock
from ft_assets_tests.conftest import formatted_examples

SPEC = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    return formatted_examples(tiny_model_dir, 16)


def lora_model(tiny_model_dir):
    torch.manual_seed(0)  # LoRA A is random-init: same seed, same starting adapter
    return get_method("lora").wrap(load_model(tiny_model_dir), SPEC)


def assert_same_trained_weights(a_model, b_model) -> None:
    """Every trainable parameter equal to 1e-6 (fp32 CPU)."""
    for (n, a), (_, b) in zip(a_model.named_parameters(), b_model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


SEED = 3


def cfg(**kw) -> TrainingSpec:
    base = dict(max_steps=6, epochs=10, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                checkpoint_every=3)
    base.update(kw)
    return TrainingSpec(**base)


def test_a_few_steps_lower_the_loss_on_the_training_rows(tiny_model_dir, examples):
    model = lora_model(tiny_model_dir)
    before = evaluate.eval_loss(model, examples, 2, "cpu")["eval_loss"]
    result = train.train(model, get_method("lora"), SPEC, examples, cfg(max_steps=8), seed=SEED, pad_id=2)
    after = evaluate.eval_loss(model, examples, 2, "cpu")["eval_loss"]
    assert after < before - 0.05, (before, after)
    assert result.steps == 8 and result.tokens_trained > 0 and result.tokens_seen > result.tokens_trained
    assert result.tokens_per_s > 0 and result.peak_memory_bytes > 0


@pytest.fixture(scope="module")
def uneven_examples(tiny_model_dir):
    """Rows whose answers range from a few tokens to a few dozen, so micro-batches of one
    step carry very different numbers of labels."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for i in range(8):
        answer = f"${100 + i} million" if i % 2 else " ".join(["revenue grew in every segment"] * (1 + i))
        ex = data.Example(f"u{i}", f"What happened in year {i}?", None, answer, i + 1)
        assert data.format_example(tok, ex, data.build_messages(ex, None, "{question}", "{question}"), 256) is None
        out.append(ex)
    return out


def first_step_gradient(tiny_model_dir, examples, monkeypatch, **kw) -> torch.Tensor:
    """The gradient the optimizer sees at the first step of a real `train.train` run."""
    seen = []
    real = train.make_optimizer

    def spy(name, groups, lr):
        opt = real(name, groups, lr)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(torch.cat(
            [p.grad.detach().flatten().clone() for g in o.param_groups for p in g["params"] if p.grad is not None])))
        return opt

    monkeypatch.setattr(train, "make_optimizer", spy)
    result = train.train(lora_model(tiny_model_dir), get_method("lora"), SPEC, examples,
                         cfg(max_steps=1, max_grad_norm=None, **kw), seed=SEED, pad_id=2)
    assert result.steps == 1 and len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_grad_accumulation_equals_one_big_batch(tiny_model_dir, uneven_examples, monkeypatch, packing):
    shapes = ((4, 1), (2, 2), (1, 4))  # batch_size x grad_accum: 4 rows per optimizer step each time
    steps = [next(train.batches(uneven_examples, cfg(batch_size=b, grad_accum=a), SEED)) for b, a in shapes]
    # the same rows reach the step in every shape (so the gradients must match) ...
    assert len({tuple(r.id for mb in step for r in mb) for step in steps}) == 1
    # ... and the micro-batches carry unequal label counts (so normalising per micro-batch would not)
    labels = [sum(sum(1 for x in r.labels[1:] if x != data.IGNORE_INDEX) for r in mb) for mb in steps[1]]
    assert labels[0] != labels[1], labels

    grads = [first_step_gradient(tiny_model_dir, uneven_examples, monkeypatch, batch_size=b, grad_accum=a,
                                 packing=packing) for b, a in shapes]
    assert grads[0].abs().sum() > 0
    for (b, a), g in zip(shapes[1:], grads[1:]):
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7, msg=lambda m: f"{b}x{a} vs 4x1: {m}")


def test_batches_are_a_pure_function_of_seed_and_step(examples):
    c = cfg(max_steps=10)
    full = [[r.id for mb in step for r in mb] for step in train.batches(examples, c, SEED)]
    tail = [[r.id for mb in step for r in mb] for step in train.batches(examples, c, SEED, start_step=7)]
    assert full[7:] == tail
    assert sorted(sum(full[:4], [])) == sorted(e.id for e in examples)  # epoch 1 sees every row once


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_model_dir, examples, tmp_path):
    method = get_method("lora")
    ref = lora_model(tiny_model_dir)
    ref_result = train.train(ref, method, SPEC, examples, cfg(), seed=SEED, pad_id=2, checkpoint_dir=tmp_path / "ref")

    # A run that stops after step 3 (its checkpoint is what a killed process leaves behind)...
    ckpt = tmp_path / "ckpt"
    first = lora_model(tiny_model_dir)
    train.train(first, method, SPEC, examples, cfg(max_steps=6), seed=SEED, pad_id=2, checkpoint_dir=ckpt)
    for late in sorted(ckpt.glob("step-*")):
        if late.name != "step-000003":
            shutil.rmtree(late)
    assert checkpoint.latest_checkpoint(ckpt).name == "step-000003"
    # ...and a fresh process that picks it up.
    resumed = lora_model(tiny_model_dir)
    result = train.train(resumed, method, SPEC, examples, cfg(), seed=SEED, pad_id=2, checkpoint_dir=ckpt)
    assert result.resumed_from_step == 3 and result.steps == 6
    assert [l for _, l in result.losses] == pytest.approx([l for _, l in ref_result.losses], abs=1e-5)
    assert_same_trained_weights(ref, resumed)


def test_nan_loss_stops_with_step_and_hint(tiny_model_dir, examples):
    model = lora_model(tiny_model_dir)
    with torch.no_grad():
        model.base_model.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 1; lower the learning rate"):
        train.train(model, get_method("lora"), SPEC, examples, cfg(), seed=SEED, pad_id=2)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resettable peak RSS is Linux-only")
def test_cpu_peak_memory_is_per_window_not_per_process():
    # An anonymous mapping, every page touched: closing it is an munmap, so the resident set drops
    # for certain (a freed torch tensor may stay with the process's allocator, as it did once here
    # after 200 other tests: the measured window was then right and the test wrong).
    size = 256 * 2**20
    big = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        big[offset] = 1
    train.reset_peak_memory("cpu")
    big.close()
    high = train.peak_memory_bytes("cpu")
    train.reset_peak_memory("cpu")
    low = train.peak_memory_bytes("cpu")
    assert high - low > 200 * 2**20  # the new window does not remember the freed 256 MiB


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_step_it_arrives_in_and_resume_continues_exactly(tiny_model_dir, examples, tmp_path, sig):
    method = get_method("lora")
    ref = lora_model(tiny_model_dir)
    ref_result = train.train(ref, method, SPEC, examples, cfg(), seed=SEED, pad_id=2)

    def send_during_step_4(step, loss, **_):  # on_log runs inside step 4, before its checkpoint decision
        if step == 4:
            os.kill(os.getpid(), sig)

    ckpt = tmp_path / "ckpt"
    before = signal.getsignal(sig)
    with pytest.raises(Preempted, match=rf"^preempted at step 4 by {sig.name}: checkpoint written at .*step-000004"):
        train.train(lora_model(tiny_model_dir), method, SPEC, examples, cfg(log_every=1), seed=SEED, pad_id=2,
                    checkpoint_dir=ckpt, on_log=send_during_step_4)
    assert signal.getsignal(sig) is before  # the handler is put back
    assert checkpoint.latest_checkpoint(ckpt).name == "step-000004"  # not 3, the last periodic one

    resumed = lora_model(tiny_model_dir)
    result = train.train(resumed, method, SPEC, examples, cfg(), seed=SEED, pad_id=2, checkpoint_dir=ckpt)
    assert result.resumed_from_step == 4 and result.steps == 6
    assert [l for _, l in result.losses] == pytest.approx([l for _, l in ref_result.losses], abs=1e-5)
    assert_same_trained_weights(ref, resumed)


def test_a_checkpoint_dir_in_use_is_refused_and_free_again_when_its_holder_lets_go(tiny_model_dir, examples, tmp_path):
    ckpt = tmp_path / "ckpt"
    with checkpoint_lock(ckpt):  # another writer (flock is per open file: same process counts)
        with pytest.raises(CheckpointBusy, match=rf"{ckpt} is being trained into by process {os.getpid()}"):
            train.train(lora_model(tiny_model_dir), get_method("lora"), SPEC, examples, cfg(), seed=SEED, pad_id=2,
                        checkpoint_dir=ckpt)
    result = train.train(lora_model(tiny_model_dir), get_method("lora"), SPEC, examples, cfg(), seed=SEED, pad_id=2,
                         checkpoint_dir=ckpt)
    assert result.steps == 6


def test_validation_rows_are_held_out_of_training_by_a_seeded_rule(examples):
    c = cfg(validation_fraction=0.25)
    rows, held = train.split_validation(examples, c, SEED)
    assert len(held) == 4 and len(rows) == 12 and {e.id for e in rows}.isdisjoint(e.id for e in held)
    assert train.split_validation(examples, c, SEED) == (rows, held)  # a pure function of rows and seed
    # a row stays on its side when rows are added (they are chosen by a hash of their id)
    _, held_of_fewer = train.split_validation(examples[:8], cfg(validation_fraction=0.25), SEED)
    assert {e.id for e in held_of_fewer} <= {e.id for e in held} | {e.id for e in examples[:8]}
    assert train.split_validation(examples, cfg(), SEED) == (examples, [])
    assert {e.id for b in train.batches(rows, c, SEED) for mb in b for e in mb}.isdisjoint(e.id for e in held)


def test_early_stopping_ends_with_the_weights_of_the_best_validation_loss(tiny_model_dir, examples):
    method = get_method("lora")
    # lr high enough that the held-out loss turns up again within 30 steps on 12 rows
    c = dict(validation_fraction=0.25, validation_every=2, max_steps=30, lr=5e-2)
    model = lora_model(tiny_model_dir)
    result = train.train(model, method, SPEC, examples, cfg(**c, early_stopping_patience=3), seed=SEED, pad_id=2)
    steps, losses = zip(*result.validation_losses)
    best = min(losses)
    assert result.kept_step == steps[losses.index(best)]  # the first step with the lowest held-out loss
    assert result.stopped_early_at == result.steps == result.kept_step + 3 * 2 < 30  # 3 measurements, no new best
    print("validation losses", result.validation_losses, "kept", result.kept_step)

    # the weights it ends with are those of the kept step: a run of exactly that many steps
    # (constant lr, the same held-out rows) ends with the same weights
    short = lora_model(tiny_model_dir)
    short_result = train.train(short, method, SPEC, examples, cfg(**{**c, "max_steps": result.kept_step}), seed=SEED, pad_id=2)
    assert short_result.kept_step == result.kept_step
    assert_same_trained_weights(model, short)
    held = train.split_validation(examples, cfg(**c), SEED)[1]
    assert evaluate.eval_loss(model, held, pad_id=2, device="cpu")["eval_loss"] == pytest.approx(best, abs=1e-4)


def test_resume_with_validation_keeps_its_measurements_and_best_weights(tiny_model_dir, examples, tmp_path):
    method = get_method("lora")
    c = cfg(validation_fraction=0.25, validation_every=2, max_steps=16, lr=5e-2, early_stopping_patience=20)
    ref = lora_model(tiny_model_dir)
    ref_result = train.train(ref, method, SPEC, examples, c, seed=SEED, pad_id=2)

    def stop_at_7(step, loss, **_):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Preempted):
        train.train(lora_model(tiny_model_dir), method, SPEC, examples, c, seed=SEED, pad_id=2, checkpoint_dir=ckpt, on_log=stop_at_7)
    resumed = lora_model(tiny_model_dir)
    result = train.train(resumed, method, SPEC, examples, c, seed=SEED, pad_id=2, checkpoint_dir=ckpt)
    assert result.resumed_from_step == 7
    assert [s for s, _ in result.validation_losses] == [s for s, _ in ref_result.validation_losses]
    assert [v for _, v in result.validation_losses] == pytest.approx([v for _, v in ref_result.validation_losses], abs=1e-5)
    assert result.kept_step == ref_result.kept_step
    assert_same_trained_weights(ref, resumed)


def test_compile_is_opt_in_and_compiles_each_decoder_layer_until_released(tiny_model_dir, monkeypatch):
    """torch.compile recorded, not run (minutes on this CPU): the path `training.compile: true` takes
    on any device. It once raised UnboundLocalError on CUDA before compiling anything."""
    from ft_assets.training import prepared

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)))
    model = lora_model(tiny_model_dir)
    assert prepared.compile_layers(model, cfg()) == [] and not compiled  # default: off, CUDA too
    layers = prepared.compile_layers(model, cfg(compile=True))
    decoder_layers = list(model.get_base_model().model.layers)
    assert layers == decoder_layers and [m for m, _ in compiled] == decoder_layers
    assert all(kw == {"dynamic": True} for _, kw in compiled)
    for layer in layers:
        layer._compiled_call_impl = object()  # what Module.compile leaves behind
    prepared.uncompile_layers(layers)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers)
