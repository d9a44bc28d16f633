"""The reward model trainer (trainers/reward.py) on the tiny model with the real tokenizer: LoRA +
head and full fine-tuning learn to prefer the right unit in held-out pairs, the saved directory is
a plain sequence classifier that scores as the trained model did, and a run stopped by SIGTERM
resumes to the same bits as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ft_assets.config.recipe import RewardModelSpec
from ft_assets.config.training import TrainingSpec
from ft_assets.data import preferences
from ft_assets.trainers import reward, trl_common
from ft_assets.training.preemption import Preempted
from ft_assets_tests.conftest import qa_rows

TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
TRAINING = TrainingSpec(max_steps=8, epochs=50, batch_size=4, lr=5e-3, warmup_ratio=0.0, checkpoint_every=2)
SEED = 5


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def pairs(tok) -> tuple[list, list]:
    """(train, held out): the right unit is chosen, the wrong one rejected."""
    rows = [{"id": r["id"], "prompt": TEMPLATE.format(context=r["context"], question=r["question"]),
             "chosen": r["answer"], "rejected": r["answer"].replace("million", "billion")} for r in qa_rows(24)]
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
    built, rejected = preferences.validate_pairs(list(enumerate(rows, start=1)), cols, "prefs")
    assert not rejected and all(preferences.format_pair(tok, p, None, 160) is None for p in built)
    return built[:18], built[18:]


def train(tiny_model_dir, tok, pairs, spec: RewardModelSpec, **kw):
    torch.manual_seed(SEED)
    model = reward.load_scorer(tiny_model_dir, tok)
    return reward.train_reward_model(model, tok, pairs, TRAINING, adapter=spec.adapter_keys(), seed=SEED,
                                     center_rewards=spec.center_rewards, max_length=160, **kw)


def swapped(pairs: list) -> list:
    return [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, chosen_text=p.rejected_text,
                                rejected_text=p.chosen_text, chosen_ids=p.rejected_ids, rejected_ids=p.chosen_ids)
            for p in pairs]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_reward_model_learns_the_preference_and_saves_a_plain_classifier(tiny_model_dir, tok, pairs, tmp_path, kind):
    """Trained on the preference the untrained head gets wrong (the pairs as they are, or swapped),
    so a right answer on held-out pairs is learned, not the random head's luck."""
    train_pairs, heldout = pairs
    torch.manual_seed(SEED)  # the head `train` starts from
    untrained = reward.load_scorer(tiny_model_dir, tok)
    if reward.evaluate(untrained, tok, heldout)["accuracy"] > 0.5:
        train_pairs, heldout = swapped(train_pairs), swapped(heldout)
    before = reward.evaluate(untrained, tok, heldout)
    model, result = train(tiny_model_dir, tok, train_pairs, RewardModelSpec(type=kind, r=8, alpha=16, dropout=0.0))
    assert result.steps == 8 and len(result.losses) == 8 and len(result.accuracies) == 8
    assert result.losses[-1][1] < result.losses[0][1]
    assert not trl_common.is_peft(model)  # merged: a plain transformers model
    if kind == "full":
        assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    after = reward.evaluate(model, tok, heldout)
    print(kind, "held-out accuracy", before["accuracy"], "->", after["accuracy"], "margin", after["mean_margin"])
    assert before["accuracy"] <= 0.5 and after["accuracy"] == 1.0 and after["mean_margin"] > 0
    assert sum(b["pairs"] for b in after["calibration"]) == len(heldout)
    # saved as a directory plain transformers loads, scoring as the trained model does
    reward.RewardTraining(model, tok, result, len(train_pairs)).save(tmp_path / "rm")
    assert not list(tmp_path.glob("rm/adapter_*")) and (tmp_path / "rm" / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tok.pad_token_id
    again = reward.evaluate(loaded, tok, heldout)
    assert [r["chosen_score"] for r in again["rows"]] == pytest.approx(
        [r["chosen_score"] for r in after["rows"]], abs=1e-3)


def test_calibration_bins_say_how_often_each_confidence_was_right():
    bins = reward.calibration([3.0, 2.5, -2.8, 0.1, -0.05])
    assert [b["pairs"] for b in bins] == [2, 0, 0, 0, 3]
    assert bins[4]["observed"] == pytest.approx(2 / 3, abs=1e-4)  # two of the three confident calls right
    assert bins[0]["observed"] == 0.5 and 0.5 < bins[0]["predicted"] < 0.53


def test_sigterm_checkpoints_then_the_rerun_resumes_to_the_same_bits(tiny_model_dir, tok, pairs, tmp_path):
    train_pairs, _ = pairs
    spec = RewardModelSpec(type="lora", r=8, alpha=16, dropout=0.0)
    want, want_result = train(tiny_model_dir, tok, train_pairs, spec)

    def sigterm_in_step_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Preempted, match=r"^preempted at step 3 by SIGTERM"):
        train(tiny_model_dir, tok, train_pairs, spec, checkpoint_dir=ckpt, on_log=sigterm_in_step_3)
    got, result = train(tiny_model_dir, tok, train_pairs, spec, checkpoint_dir=ckpt)
    assert result.resumed_from_step == 3 and result.losses == want_result.losses
    got.save_pretrained(tmp_path / "got")
    want.save_pretrained(tmp_path / "want")
    a, b = load_file(str(tmp_path / "got" / "model.safetensors")), load_file(str(tmp_path / "want" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
