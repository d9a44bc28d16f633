"""Every preference objective resumes exactly (trainers/preference, trainers/trl_common.py): a run
stopped by SIGTERM, and for the objectives with a frozen reference adapter (dpo, kto: TRL's "ref"
copy, the fragile case) one killed with SIGKILL after a checkpoint, run again ends with the bits and
the loss curve of an uninterrupted run; the reference adapter stays the SFT policy on resume (were
it the checkpoint's weights, the losses after the resume would differ)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ft_assets.config.training import TrainingSpec
from ft_assets.data import preferences
from ft_assets.methods import get_method
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets.config.method_spec import SPECS
from ft_assets.trainers import preference as tuning
from ft_assets.training.checkpoint import latest_checkpoint
from ft_assets.training.preemption import CheckpointBusy, Preempted, checkpoint_lock
from ft_assets_tests.conftest import kill_9_once, qa_rows

# 6 pairs, 2 a step: 3 steps an epoch, so the kill's resume (from step 2) is mid-epoch and SIGTERM's
# (from step 3) at an epoch's end, HF's two ways back in; warmup then cosine decay, so a resume
# that lost the scheduler would differ
PAIRS = 6
TRAINING = TrainingSpec(max_steps=4, epochs=50, batch_size=2, lr=1e-2, warmup_ratio=0.25, lr_scheduler="cosine",
                        checkpoint_every=2)
SEED = 3
TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"

OBJECTIVES = list(tuning.OBJECTIVES)
WITH_REFERENCE = [k for k, o in tuning.OBJECTIVES.items() if o.reference]

# the killed run: stops in step 3 (after the step-2 checkpoint, before step 3 is saved) and waits for the kill
CHILD = """
import sys, time
from pathlib import Path
from ft_assets_tests.trainers.test_preference_resume import tune

def wait_in_step_3(step, loss):
    if step == 3:
        Path(sys.argv[3]).write_text("in step 3")
        time.sleep(600)

tune(sys.argv[5], Path(sys.argv[1]), Path(sys.argv[2]), checkpoint_dir=Path(sys.argv[4]), on_log=wait_in_step_3)
"""


def make_pairs(tok) -> list[preferences.PreferencePair]:
    rows = [{"id": r["id"], "prompt": TEMPLATE.format(context=r["context"], question=r["question"]),
             "chosen": r["answer"], "rejected": r["answer"].replace("million", "billion")} for r in qa_rows(PAIRS)]
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
    pairs, rejected = preferences.validate_pairs(list(enumerate(rows, start=1)), cols, "prefs")
    assert not rejected and all(preferences.format_pair(tok, p, None, 160) is None for p in pairs)
    return pairs


def tune(objective: str, model_dir: Path, sft_dir: Path, **kw) -> tuning.PreferenceTuning:
    """The one run of `objective` every test makes (here and in the child process), with the
    objective's recipe defaults."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    settings = SPECS[objective](type=objective, sft_from="lora").trainer_settings()
    return tuning.tune_sft_adapter(model_dir, sft_dir, tok, make_pairs(tok), TRAINING, objective=objective,
                                   settings=settings, seed=SEED, max_length=160, device="cpu", dtype=torch.float32,
                                   **kw)


def saved_tensors(tuned: tuning.PreferenceTuning, out: Path) -> dict[str, torch.Tensor]:
    tuning.save_adapter(tuned.model, out)
    return load_file(str(out / "adapter_model.safetensors"))


def assert_same_run(tuned: tuning.PreferenceTuning, reference, out: Path) -> None:
    ref_losses, ref_tensors = reference
    assert tuned.result.losses == ref_losses
    tensors = saved_tensors(tuned, out)
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter, as `adapter[lora]` leaves one."""
    out = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    spec = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)
    get_method("lora").save(get_method("lora").wrap(load_model(tiny_model_dir), spec), out)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, sft_dir, tmp_path_factory):
    """objective -> (losses, saved adapter tensors) of its run never interrupted, and without checkpoints."""
    done = {}

    def of(objective: str):
        if objective not in done:
            tuned = tune(objective, tiny_model_dir, sft_dir)
            assert tuned.result.steps == TRAINING.max_steps and tuned.result.resumed_from_step == 0
            assert len(tuned.result.losses) == TRAINING.max_steps and set(tuned.model.peft_config) == {"default"}
            done[objective] = tuned.result.losses, saved_tensors(tuned, tmp_path_factory.mktemp(objective))
        return done[objective]
    return of


@pytest.mark.parametrize("objective", WITH_REFERENCE)
def test_kill_9_after_a_checkpoint_then_rerun_resumes_there_and_matches_the_uninterrupted_run(
        tiny_model_dir, sft_dir, uninterrupted, tmp_path, objective):
    reference = uninterrupted(objective)
    ckpt, marker = tmp_path / "ckpt", tmp_path / "in-step-3"
    kill_9_once([sys.executable, "-c", CHILD, str(tiny_model_dir), str(sft_dir), str(marker), str(ckpt),
                                  objective], marker, tmp_path / "child.log")  # step 3 is lost
    assert latest_checkpoint(ckpt).name == "step-000002"
    # what a kill while HF writes a checkpoint leaves in its output dir: never resumed from
    half = ckpt / "hf" / "checkpoint-4"
    half.mkdir(parents=True)
    (half / "trainer_state.json").write_text('{"global_step": 4, "log_hi')

    resumed = tune(objective, tiny_model_dir, sft_dir, checkpoint_dir=ckpt)
    assert resumed.result.resumed_from_step == 2 and resumed.result.summary()["resumed_from_step"] == 2
    assert_same_run(resumed, reference, tmp_path / "resumed")
    assert not half.exists()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sigterm_checkpoints_the_step_it_arrives_in_raises_preempted_and_resumes_exactly(
        tiny_model_dir, sft_dir, uninterrupted, tmp_path, objective):
    reference = uninterrupted(objective)
    ckpt = tmp_path / "ckpt"
    with checkpoint_lock(ckpt):  # another writer holds the dir: refused before any step
        with pytest.raises(CheckpointBusy):
            tune(objective, tiny_model_dir, sft_dir, checkpoint_dir=ckpt)

    def sigterm_in_step_3(step, loss):  # HF logs a step after its update, before its checkpoint decision
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    saved = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=r"^preempted at step 3 by SIGTERM: checkpoint written at .*step-000003"):
        tune(objective, tiny_model_dir, sft_dir, checkpoint_dir=ckpt, on_log=sigterm_in_step_3,
             on_checkpoint=saved.append)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert [p.name for p in saved] == ["step-000002", "step-000003"]  # periodic, then the signal's
    assert latest_checkpoint(ckpt).name == "step-000003" and not (ckpt / "step-000002").exists()

    resumed = tune(objective, tiny_model_dir, sft_dir, checkpoint_dir=ckpt)
    assert resumed.result.resumed_from_step == 3
    assert_same_run(resumed, reference, tmp_path / "resumed")
