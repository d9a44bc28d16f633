"""Beyond SFT on the tiny model: preference tuning (DPO, ORPO, SimPO, KTO), distillation, continual
learning, multi-task mixtures."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ft_assets.config.training import TrainingSpec
from ft_assets.training import checkpoint, continual, loop as train, packing, prepared
from ft_assets.data import rows as data, mixture, preferences, sft_dataset
from ft_assets.config.method_spec import SPECS
from ft_assets.trainers import distill, preference as tuning
from ft_assets.evaluation import heldout as evaluate
from ft_assets.config import chat_templates
from ft_assets.methods import get_method
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets_tests.conftest import qa_rows, write_jsonl

SPEC = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)
TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_examples(tok, rows, task="qa") -> list[data.Example]:
    out = []
    for i, row in enumerate(rows):
        ex = data.Example(row["id"], row["question"], row["context"], row["answer"], i + 1, task)
        assert data.format_example(tok, ex, data.build_messages(ex, None, TEMPLATE, "{question}"), 128) is None
        out.append(ex)
    return out


def pref_rows(n: int = 16) -> list[dict]:
    """Pairs a 2-layer random model can learn: the right unit ("$463 million", chosen) over the
    wrong one ("$463 billion", rejected): same length in tokens, so no length bias at the start."""
    out = []
    for r in qa_rows(n):
        out.append({"id": r["id"], "prompt": TEMPLATE.format(context=r["context"], question=r["question"]),
                    "chosen": r["answer"], "rejected": r["answer"].replace("million", "billion")})
    return out


def make_pairs(tok, rows) -> list[preferences.PreferencePair]:
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
    pairs, rejected = preferences.validate_pairs(list(enumerate(rows, start=1)), cols, "prefs")
    assert not rejected
    for p in pairs:
        assert preferences.format_pair(tok, p, None, 160) is None
    return pairs


SEED = 3


def cfg(**kw) -> TrainingSpec:
    base = dict(max_steps=6, epochs=50, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    base.update(kw)
    return TrainingSpec(**base)


# --------------------------------------------------------------------------------------
# multi-task mixtures
# --------------------------------------------------------------------------------------


def test_mixture_follows_the_weights_exactly_and_deterministically():
    rows = {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(30)], "c": [f"c{i}" for i in range(7)]}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    mixed, counts = mixture.mix(rows, weights, seed=1, size=1001)
    assert len(mixed) == 1001 and sum(counts.values()) == 1001
    got = Counter(x[0] for x in mixed)
    for task, w in weights.items():  # tolerance: one row of the exact share (largest-remainder rounding)
        assert abs(got[task] - 1001 * w) <= 1, (task, got[task])
    # upsampling repeats every row equally often (+-1); downsampling never repeats a row
    c_reps = Counter(x for x in mixed if x[0] == "c")
    assert max(c_reps.values()) - min(c_reps.values()) <= 1 and len(c_reps) == 7
    a_reps = Counter(x for x in mixed if x[0] == "a")
    assert max(a_reps.values()) - min(a_reps.values()) <= 1
    assert mixture.mix(rows, weights, seed=1, size=1001)[0] == mixed  # pure function of the seed
    assert mixture.mix(rows, weights, seed=2, size=1001)[0] != mixed
    with pytest.raises(ValueError, match="no training rows"):
        mixture.mix({"a": [], "b": ["x"]}, {"a": 1, "b": 1}, seed=0)


def test_weighted_sources_make_a_mixed_training_split(tmp_path, tok):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    heads = write_jsonl(tmp_path / "heads.jsonl", [
        {"id": f"h{i}", "instruction": "Classify the sentiment.", "headline": f"Company {i} beats estimates",
         "label": "positive" if i % 2 else "negative"} for i in range(20)])
    srcs = [
        data.SourceSpec("qa", qa, "jsonl", {"question": "question", "context": "context", "answer": "answer", "id": "id"},
                        0.25, 7, 0.1, weight=0.25),
        data.SourceSpec("heads", heads, "jsonl", {"question": "instruction", "context": "headline", "answer": "label",
                                                  "id": "id"}, 0.25, 7, 0.1, weight=0.75),
    ]
    built = sft_dataset.build_sft_dataset(srcs, tok, system=None, template=TEMPLATE, template_without_context="{question}",
                                   max_length=128, mixture_seed=7)
    n = len(built.train)
    assert n == 30 + 15  # the mixture keeps the number of training rows; it changes the proportions
    counts = Counter(e.task for e in built.train)
    assert abs(counts["heads"] - 0.75 * n) <= 1 and abs(counts["qa"] - 0.25 * n) <= 1
    assert built.stats["mixture"]["tasks"]["heads"]["rows"] == counts["heads"]
    assert Counter(e.task for e in built.eval) == {"qa": 10, "heads": 5}  # eval keeps every held-out row
    again = sft_dataset.build_sft_dataset(srcs, tok, system=None, template=TEMPLATE, template_without_context="{question}",
                                   max_length=128, mixture_seed=7)
    assert [e.id for e in again.train] == [e.id for e in built.train]


def test_per_task_metrics_are_computed_within_each_task(tiny_model_dir, tok):
    rows = [{"task": "a", "prediction": "x", "reference": "x"}, {"task": "a", "prediction": "y", "reference": "x"},
            {"task": "b", "prediction": "z", "reference": "z"}]
    from ft_assets.evaluation.qa_metrics import qa_scores

    for r in rows:
        r.update(qa_scores(r["prediction"], r["reference"]))
    per = evaluate.per_task_scores(rows)
    assert per["a"]["exact_match"] == 0.5 and per["b"]["exact_match"] == 1.0
    assert per["a"]["examples"] == 2 and per["b"]["examples"] == 1
    # and through evaluate(): one entry per task, each with its own loss
    qa = make_examples(tok, qa_rows(6), task="qa")
    heads = make_examples(tok, [{"id": f"h{i}", "question": "Sentiment?", "context": f"Firm {i} misses",
                                 "answer": "negative"} for i in range(3)], task="heads")
    model = load_model(tiny_model_dir)
    out = evaluate.evaluate(model, tok, qa + heads, max_new_tokens=3, batch_size=4, device="cpu")
    per = out["metrics"]["per_task"]
    assert set(per) == {"qa", "heads"} and per["qa"]["examples"] == 6 and per["heads"]["examples"] == 3
    assert per["qa"]["eval_loss"] != per["heads"]["eval_loss"]
    only_heads = evaluate.eval_loss(model, heads, tok.pad_token_id, "cpu")["eval_loss"]
    assert per["heads"]["eval_loss"] == only_heads


# --------------------------------------------------------------------------------------
# preference data and DPO
# --------------------------------------------------------------------------------------


def test_preference_rows_are_validated_with_lines(tmp_path, tok):
    rows = pref_rows(6)
    rows[1]["chosen"] = ""                           # blank
    rows[2]["rejected"] = rows[2]["chosen"]          # same answers
    rows.append(dict(rows[0]))                       # duplicate of line 1
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    src = preferences.PreferenceSource("prefs", path, "jsonl", {"prompt": "prompt", "chosen": "chosen",
                                       "rejected": "rejected", "id": "id"}, 0.25, 1, 0.5)
    built = preferences.build_preference_dataset(src, tok, system="Be brief.", max_length=160)
    reasons = {r.line: r.reason for r in built.rejected}
    assert set(reasons) == {2, 3, 7}
    assert "empty" in reasons[2] and "same text" in reasons[3] and "duplicate of line 1" in reasons[7]
    assert len(built.train) + len(built.eval) == 4
    pair = built.train[0]
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.rejected_ids[-1] == tok.eos_token_id
    assert tok(pair.prompt_text + pair.chosen_text)["input_ids"] == pair.prompt_ids + pair.chosen_ids
    src.max_rejected_fraction = 0.1
    with pytest.raises(data.DataFileError, match="3 of 7 rows rejected"):
        preferences.build_preference_dataset(src, tok, system=None, max_length=160)


def test_preference_pairs_use_the_recipes_chat_template_for_a_base_without_one(tmp_path, tiny_model_dir):
    """prompt.chat_template renders preference pairs as it renders SFT rows; no template anywhere
    is refused with what to set, and the override does not outlive the build."""
    from ft_assets.data import chat

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", pref_rows(4))
    src = preferences.PreferenceSource("prefs", path, "jsonl", {"prompt": "prompt", "chosen": "chosen",
                                       "rejected": "rejected", "id": "id"}, 0.25, 1, 0.5)
    with pytest.raises(chat.ChatTemplateError, match="set prompt.chat_template"):
        preferences.build_preference_dataset(src, bare, system=None, max_length=160)
    built = preferences.build_preference_dataset(src, bare, system="Be brief.", max_length=160,
                                                 chat_template=chat_templates.chat_template_text("chatml"))
    pair = built.train[0]
    assert pair.prompt_text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{pair.prompt}<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert pair.chosen_text == f"{pair.chosen}<|im_end|>" and pair.chosen_ids[-1] == bare.eos_token_id
    assert bare.chat_template is None


def saved_adapter(tiny_model_dir, out: Path) -> Path:
    """A saved LoRA adapter, as `adapter[lora]` leaves one (untrained here: B = 0, so the policy
    starts as the random base, which has no preference between the two units)."""
    torch.manual_seed(0)
    get_method("lora").save(get_method("lora").wrap(load_model(tiny_model_dir), SPEC), out)
    return out


@pytest.mark.parametrize("objective", list(tuning.OBJECTIVES))
def test_each_objective_raises_preference_accuracy_on_training_pairs(tiny_model_dir, tok, tmp_path, objective):
    """Every objective, with its recipe defaults, separates the training pairs it was given (the
    starting policy does not), and saves a plain peft adapter that reproduces the trained policy."""
    from peft import PeftModel

    adapter = saved_adapter(tiny_model_dir, tmp_path / "sft")
    pairs = make_pairs(tok, pref_rows(16))
    assert all(len(p.chosen_ids) == len(p.rejected_ids) for p in pairs)
    model = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter, is_trainable=True)
    ref = tuning.sequence_logps(model, pairs, tok.pad_token_id)
    before = tuning.preference_metrics(ref, ref, beta=0.1)
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.0  # policy == reference
    settings = SPECS[objective](type=objective, sft_from="lora").trainer_settings()
    result = tuning.train_preferences(model, tok, pairs, cfg(max_steps=6, lr=1e-2), objective=objective,
                                      settings=settings, seed=SEED, max_length=160)
    assert result.steps == 6 and len(result.losses) == 6
    assert set(model.peft_config) == {"default"}  # TRL's frozen "ref" copy (dpo, kto) is gone
    after = tuning.preference_metrics(tuning.sequence_logps(model, pairs, tok.pad_token_id), ref, beta=0.1)
    print(f"{objective} on training pairs: before", before, "after", after, "losses", result.losses)
    assert before["logp_accuracy"] <= 0.75  # the starting policy does not already separate the pairs
    assert after["logp_accuracy"] >= 0.9 and after["logp_accuracy"] > before["logp_accuracy"]
    # and each moved chosen above rejected relative to where it started (DPO's implicit reward,
    # beta 0.1, for every objective; measured: dpo 0.20, simpo 0.20, kto 0.19, orpo 0.08)
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.05
    # saved like any LoRA adapter: plain peft loads it, and it reproduces the trained policy
    tuning.save_adapter(model, tmp_path / objective)
    assert not (tmp_path / objective / "ref").exists()
    reloaded = get_method(objective).load(load_model(tiny_model_dir), tmp_path / objective)
    again = tuning.sequence_logps(reloaded, pairs, tok.pad_token_id)
    assert again[0] == pytest.approx(tuning.sequence_logps(model, pairs, tok.pad_token_id)[0], abs=1e-3)


def unpaired_answers(tok, rows) -> list[preferences.LabelledAnswer]:
    """The pairs `rows` written as TRL's unpaired KTO rows, in file order: each pair's chosen answer
    (desirable), then its rejected one (undesirable)."""
    lines = [{"id": f"{r['id']}-{good}", "prompt": r["prompt"], "completion": r["chosen" if good else "rejected"],
              "label": good} for r in rows for good in (True, False)]
    cols = {"prompt": "prompt", "completion": "completion", "label": "label", "id": "id"}
    answers, rejected = preferences.validate_answers(list(enumerate(lines, start=1)), cols, "prefs")
    assert not rejected
    for a in answers:
        assert preferences.format_answer(tok, a, None, 160) is None
    return answers


def test_kto_trains_on_unpaired_answers_as_on_the_pairs_they_were_written_from(tiny_model_dir, tok, tmp_path):
    """KTO on TRL's unpaired rows: one row per labelled answer (steps and answers_seen count answers,
    not pairs), the very run it makes on the pairs the rows were written from (it unpairs a pair
    into these answers, in this order), moving desirable answers up and undesirable ones down; the
    held-out answers are scored by label (they have no pairs), and a pairwise objective refuses them."""
    from peft import PeftModel

    adapter = saved_adapter(tiny_model_dir, tmp_path / "sft")
    rows = pref_rows(6)
    pairs, answers = make_pairs(tok, rows), unpaired_answers(tok, rows)
    settings = SPECS["kto"](type="kto", sft_from="lora").trainer_settings()
    one_epoch = cfg(max_steps=100, epochs=1, batch_size=4)  # 12 answers, 4 a step: 3 steps (as pairs, 6 would be 6)

    def sft_model():
        return PeftModel.from_pretrained(load_model(tiny_model_dir), adapter, is_trainable=True)

    def tune(items, objective="kto"):
        model = sft_model()
        return model, tuning.train_preferences(model, tok, items, one_epoch, objective=objective, settings=settings,
                                               seed=SEED, max_length=160)

    ref = tuning.labelled_logps(sft_model(), answers, tok.pad_token_id)
    model, result = tune(answers)
    _, on_pairs = tune(pairs)
    assert result.steps == on_pairs.steps == 3 and len(result.losses) == 3
    assert result.answers_seen == 12 and on_pairs.pairs_seen == 6 and on_pairs.answers_seen is None
    assert "pairs_seen" not in result.summary() and result.summary()["answers_seen"] == 12
    assert result.losses == on_pairs.losses and result.kl == on_pairs.kl  # rounded to 6 digits as logged
    trained = tuning.labelled_metrics(tuning.labelled_logps(model, answers, tok.pad_token_id), answers, ref, beta=0.1)
    print("kto on unpaired answers:", trained, "losses", result.losses)
    assert trained["reward_desirable"] > 0 > trained["reward_undesirable"] and trained["reward_sign_accuracy"] >= 0.75

    base = load_model(tiny_model_dir)
    held_out = tuning.evaluate_preferences(model, sft_model(), base, answers[:4], key="kto", beta=0.1,
                                           pad_id=tok.pad_token_id)
    assert held_out["form"] == "unpaired" and held_out["answers"] == 4 and "pairs" not in held_out
    assert held_out["kto"]["desirable"] == held_out["kto"]["undesirable"] == 2
    assert held_out["kto"]["reward_margin"] > 0 and "reward_margin" not in held_out["sft"]
    one_label = tuning.evaluate_preferences(model, sft_model(), base, answers[:1], key="kto", beta=0.1,
                                            pad_id=tok.pad_token_id)["kto"]  # a split with desirable answers only
    assert one_label["reward_undesirable"] is None and one_label["reward_margin"] is None
    assert one_label["logp_margin"] is None and one_label["reward_sign_accuracy"] in (0.0, 1.0)
    with pytest.raises(ValueError, match="DPO trains on pairs, and preference_dataset holds unpaired labelled answers "
                                         r"\(schema unpaired\); only kto trains on those"):
        tune(answers, "dpo")


# --------------------------------------------------------------------------------------
# distillation
# --------------------------------------------------------------------------------------


def fine_tuned_teacher(tiny_model_dir, tok, out: Path) -> Path:
    """The tiny model after a few full fine-tuning steps on the QA rows (a random model is too
    flat a teacher: its KL to any student is ~0)."""
    from ft_assets.methods.full import FullSpec

    torch.manual_seed(0)
    spec = FullSpec(type="full")
    model = get_method("full").wrap(load_model(tiny_model_dir), spec)
    train.train(model, get_method("full"), spec, make_examples(tok, qa_rows(16)), cfg(max_steps=10), seed=SEED, pad_id=2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tok, tmp_path_factory):
    return fine_tuned_teacher(tiny_model_dir, tok, tmp_path_factory.mktemp("teacher"))


def test_student_from_teacher_layers_is_smaller_and_reloads(teacher_dir, tok, tmp_path):
    teacher = load_model(teacher_dir)
    student, facts = distill.build_student(teacher_dir, [1])
    assert facts["kept_layers"] == [1] and student.config.num_hidden_layers == 1
    assert distill.parameters(student) < distill.parameters(teacher)
    assert distill.layer_indices(30, "every_other") == list(range(0, 30, 2)) + [29]
    assert distill.layer_indices(4, "first_half") == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        distill.layer_indices(2, [0, 5])
    # the kept layer is the teacher's layer 1, renumbered 0 (the KV cache indexes by position)
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert student.model.layers[0].self_attn.layer_idx == 0
    student.save_pretrained(tmp_path / "student")
    reloaded = load_model(tmp_path / "student")
    assert reloaded.config.num_hidden_layers == 1
    examples = make_examples(tok, qa_rows(2))
    speed = distill.generation_speed(reloaded, examples, new_tokens=4, pad_id=2, eos_id=2)
    assert speed["tokens_per_s"] > 0 and speed["prompts"] == 2


def test_distillation_lowers_the_kl_to_the_teacher(teacher_dir, tok, tmp_path):
    """A student that starts far from the teacher (another random 1-layer model, the
    `student_path` route): the KL term pulls it toward the teacher; CE alone (alpha=0) much less."""
    from ft_assets.models.base_model import random_init_model
    from ft_assets_tests.conftest import tiny_llama_config

    config = tiny_llama_config(len(tok))
    config.num_hidden_layers = 1
    random_init_model(config, seed=5).save_pretrained(tmp_path / "other")
    teacher = load_model(teacher_dir)
    examples = make_examples(tok, qa_rows(16))
    after = {}
    for alpha in (0.8, 0.0):
        student, facts = distill.build_student(teacher_dir, "every_other", student_path=tmp_path / "other")
        before = distill.kl_to_teacher(student, teacher, examples, temperature=2.0, pad_id=2)
        result = distill.train_student(student, teacher, examples, cfg(max_steps=8, lr=3e-3), alpha=alpha,
                                       temperature=2.0, seed=SEED, pad_id=2)
        after[alpha] = distill.kl_to_teacher(student, teacher, examples, temperature=2.0, pad_id=2)
        assert result.steps == 8 and facts["origin"].startswith("local:")
        assert [s for s, _ in result.terms["kl"]] == [s for s, _ in result.terms["ce"]] == list(range(1, 9))
    print("distillation KL(teacher||student): before", before, "after alpha=0.8", after[0.8], "alpha=0", after[0.0])
    assert after[0.8]["kl"] < 0.8 * before["kl"], (before, after)
    assert after[0.8]["kl"] < after[0.0]["kl"]


def test_alpha_zero_is_plain_sft_loss(tiny_model_dir, tok):
    """alpha=0 leaves only the answer-token CE: the same number token_loss_sum gives."""
    model = load_model(tiny_model_dir)
    examples = make_examples(tok, qa_rows(4))
    batch = packing.collate(examples, 2, "cpu")
    loss_sum, n = prepared.token_loss_sum(model, batch)
    with torch.no_grad():
        loss, m, terms = distill.Distillation(model, alpha=0.0, temperature=2.0).loss_sum(model, batch)
    assert m == n and float(terms["kl"]) == pytest.approx(0.0, abs=1e-4)
    assert float(loss) == float(terms["ce"]) == pytest.approx(float(loss_sum), rel=1e-5)


def test_distillation_objective_is_alpha_t2_kl_plus_ce_over_answer_tokens(teacher_dir, tiny_model_dir, tok):
    """The objective's sum is alpha * T^2 * KL + (1 - alpha) * CE of `distill_terms`, over the labels."""
    teacher, student = load_model(teacher_dir), load_model(tiny_model_dir)
    batch = packing.collate(make_examples(tok, qa_rows(4)), 2, "cpu")
    with torch.no_grad():
        loss, n, terms = distill.Distillation(teacher, alpha=0.3, temperature=3.0).loss_sum(student, batch)
    assert n == int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    assert float(loss) == pytest.approx(0.3 * 9.0 * float(terms["kl"]) + 0.7 * float(terms["ce"]), rel=1e-6)
    assert float(terms["kl"]) > 0


def distill_cfg(**kw) -> TrainingSpec:
    return cfg(**{"max_steps": 6, "lr": 3e-3, "checkpoint_every": 3, "weight_decay": 0.1, **kw})


def test_distillation_resumes_from_a_checkpoint_exactly(teacher_dir, tok, tmp_path):
    """Distillation goes through training.loop's checkpoints: a run that stopped after step 3 (its
    checkpoint is what a killed process leaves) resumes to the uninterrupted run's weights and curves."""
    teacher = load_model(teacher_dir)
    examples = make_examples(tok, qa_rows(16))

    def run(ckpt: Path):
        student, _ = distill.build_student(teacher_dir, [1])
        result = distill.train_student(student, teacher, examples, distill_cfg(), alpha=0.5, temperature=2.0,
                                       seed=SEED, pad_id=2, checkpoint_dir=ckpt)
        return student, result

    ref, ref_result = run(tmp_path / "ref")
    assert checkpoint.latest_checkpoint(tmp_path / "ref").name == "step-000003"  # the last step writes none
    # the checkpoint a killed run left behind, picked up by a fresh student
    shutil.copytree(tmp_path / "ref", tmp_path / "killed")
    resumed, result = run(tmp_path / "killed")
    assert result.resumed_from_step == 3 and result.steps == 6
    assert result.losses == ref_result.losses and result.terms == ref_result.terms
    assert set(result.terms) == {"kl", "ce"} and len(result.terms["kl"]) == 6
    assert result.log()["kl"] == result.terms["kl"] and result.log()["ce"] == result.terms["ce"]
    for (name, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_distillation_takes_its_optimizer_and_decay_from_train_config(teacher_dir, tok, monkeypatch):
    """No hard-coded AdamW: `training.optimizer` reaches the optimizer, weight decay spares norms."""
    seen = {}
    real = train.make_optimizer

    def spy(name, groups, lr):
        seen.update(name=name, decays=sorted({g["weight_decay"] for g in groups}))
        return real("adamw", groups, lr)

    monkeypatch.setattr(train, "make_optimizer", spy)
    student, _ = distill.build_student(teacher_dir, [1])
    distill.train_student(student, load_model(teacher_dir), make_examples(tok, qa_rows(4)),
                          distill_cfg(max_steps=1, optimizer="adamw_8bit"), alpha=0.5, temperature=2.0, seed=SEED, pad_id=2)
    assert seen == {"name": "adamw_8bit", "decays": [0.0, 0.1]}


def test_distillation_stops_on_nan_like_sft(teacher_dir, tok):
    student, _ = distill.build_student(teacher_dir, [1])
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 1; lower the learning rate"):
        distill.train_student(student, load_model(teacher_dir), make_examples(tok, qa_rows(4)), distill_cfg(),
                              alpha=0.5, temperature=2.0, seed=SEED, pad_id=2)


# --------------------------------------------------------------------------------------
# continual learning
# --------------------------------------------------------------------------------------


def test_continuing_starts_at_the_previous_adapters_loss(tiny_model_dir, tok, tmp_path):
    method = get_method("lora")
    old = make_examples(tok, qa_rows(16))
    new = make_examples(tok, [dict(r, id=f"n{i}", question=r["question"].replace("What", "Which figure"))
                              for i, r in enumerate(qa_rows(16))])
    torch.manual_seed(0)
    prev = method.wrap(load_model(tiny_model_dir), SPEC)
    train.train(prev, method, SPEC, old, cfg(max_steps=10), seed=SEED, pad_id=2)
    method.save(prev, tmp_path / "prev")
    prev_loss = evaluate.eval_loss(prev, new, 2, "cpu", batch_size=16)["eval_loss"]

    torch.manual_seed(1)  # a different fresh init: the loaded state must override it
    cont = method.wrap(load_model(tiny_model_dir), SPEC)
    fresh_loss = evaluate.eval_loss(cont, new, 2, "cpu", batch_size=16)["eval_loss"]
    assert continual.load_state(cont, method, tmp_path / "prev") > 0
    one = cfg(max_steps=1, batch_size=16)  # one step over all 16 rows: its loss is the start's loss
    result = train.train(cont, method, SPEC, new, one, seed=SEED, pad_id=2)
    print("continual: first loss", result.losses[0][1], "previous adapter", prev_loss, "fresh", fresh_loss)
    assert result.losses[0][1] == pytest.approx(prev_loss, abs=2e-3)
    assert abs(fresh_loss - prev_loss) > 0.3


def manifest(version, sft, base="b1", spec=None, continued=None):
    m = {"version": version, "inputs": {"sft_dataset": sft, "base_model": base},
         "method": {"spec": spec or {"type": "lora", "r": 4, "training": {}}}}
    if continued:
        m["continual"] = {"continued_from": {"version": continued}}
    return m


def test_pick_start_continues_only_across_data_changes():
    spec = {"type": "lora", "r": 4, "training": {"lr": 0.1}, "continue_from": "previous"}
    store = {"v1": manifest("v1", "d1"), "v2": manifest("v2", "d2", continued="v1")}
    lookup = lambda v: (store[v], f"/a/{v}") if v in store else None  # noqa: E731
    pick = lambda prev, sft, **kw: continual.pick_start(prev, prev and f"/a/{prev['version']}", sft_dataset=sft,  # noqa: E731
                                                        base_model=kw.get("base", "b1"), spec=spec, manifest_of=lookup)
    assert pick(None, "d1").from_scratch
    s = pick(store["v1"], "d2")  # data changed: continue from v1, replay/forget against d1
    assert (s.adapter_version, s.adapter_path, s.previous_sft_dataset) == ("v1", "/a/v1", "d1")
    s = pick(store["v2"], "d2")  # rerun with unchanged data: repeat v2's own start (idempotent)
    assert (s.adapter_version, s.previous_sft_dataset) == ("v1", "d1")
    assert pick(store["v1"], "d1").from_scratch  # v1 was itself from scratch on d1
    assert pick(store["v1"], "d2", base="b2").from_scratch
    other = manifest("v3", "d1", spec={"type": "lora", "r": 8, "training": {}})
    assert "other method settings" in pick(other, "d2").reason


def test_replay_draws_a_seeded_fraction_of_rows_the_new_split_lacks(tok):
    old = make_examples(tok, qa_rows(20))
    new = old[:5] + make_examples(tok, [dict(r, id=f"n{i}", answer="$1 million") for i, r in enumerate(qa_rows(5))])
    rows = continual.replay_rows(old, new, 0.5, seed=3)
    assert len(rows) == 10 and not {e.id for e in rows} & {e.id for e in old[:5]}
    assert [e.id for e in continual.replay_rows(old, new, 0.5, seed=3)] == [e.id for e in rows]
    assert continual.replay_rows(old, new, 0.0, seed=3) == []
    assert len(continual.replay_rows(old, new, 1.0, seed=3)) == 15  # only 15 old rows are not in new


# --------------------------------------------------------------------------------------
# recipe keys
# --------------------------------------------------------------------------------------

BASE = {"name": "r", "datasets": [{"name": "qa", "path": "data/qa.jsonl"}], "methods": {"lora": {"r": 8}}}
PREFS = {"name": "prefs", "path": "data/prefs.jsonl"}
UNPAIRED_PREFS = {**PREFS, "schema": "unpaired"}
ONLY_KTO = ("trains on preference pairs (prompt/chosen/rejected), but preferences.schema is unpaired: one labelled "
            "answer a row (prompt/completion/label), which only kto methods train on. Either ")


def test_beyond_sft_recipe_is_valid():
    from ft_assets.config.recipe import PACKAGE_DIR, load_recipe

    r = load_recipe(PACKAGE_DIR / "recipes" / "beyond_sft.yaml")
    assert r.methods["dpo"].type == "dpo" and r.methods["dpo"].sft_from == "lora"
    assert r.methods["lora"].continue_from == "previous" and r.methods["lora"].replay_fraction == 0.25
    assert [d.weight for d in r.datasets] == [0.7, 0.3] and r.distillation.teacher == "lora"
    assert all(r.dataset_path(d).is_file() for d in (*r.datasets, r.preferences))
    assert r.training_for_distillation().lr == 1e-4 and r.training_for_distillation().max_steps == 16


@pytest.mark.parametrize("change, expected", [
    ({"methods": {"lora": {}, "dpo": {"sft_from": "lora"}}}, "needs a `preferences:` section"),
    ({"methods": {"lora": {}, "dpo": {"sft_from": "nope"}}, "preferences": PREFS}, "'nope' is not a method"),
    ({"methods": {"qlora": {}, "dpo": {"sft_from": "qlora"}}, "preferences": PREFS}, "is a qlora method"),
    ({"methods": {"lora": {}, "dpo": {"sft_from": "lora", "continue_from": "previous"}}, "preferences": PREFS},
     "always continues its sft_from adapter"),
    ({"methods": {"lora": {"replay_fraction": 0.2}}}, "replay_fraction needs continue_from"),
    ({"methods": {"lora": {"continue_from": "first"}}}, "continue_from: Input should be 'previous'"),
    ({"datasets": [{"name": "a", "path": "a.jsonl", "weight": 1}, {"name": "b", "path": "b.jsonl"}]},
     "give every dataset a weight or none"),
    ({"datasets": [{"name": "a", "path": "a.jsonl", "weight": 0}]}, "weight: Input should be greater than 0"),
    ({"preferences": {"name": "qa", "path": "p.jsonl"}}, "also a dataset name"),
    ({"preferences": {"name": "p", "path": "p.jsonl", "colums": {}}}, "did you mean 'columns'"),
    ({"distillation": {"teacher": "nope"}}, "distillation.teacher: 'nope' is not a method"),
    ({"distillation": {"teacher": "lora", "alpha": 1.5}}, "distillation.alpha: Input should be less than or equal to 1"),
    ({"distillation": {"teacher": "lora", "keep_layers": "odd"}}, "keep_layers"),
    # the other preference objectives share dpo's rules, in their own words
    ({"methods": {"lora": {}, "orpo": {"sft_from": "lora"}}}, "method 'orpo' (orpo) needs a `preferences:` section"),
    ({"methods": {"qlora": {}, "simpo": {"sft_from": "qlora"}}, "preferences": PREFS}, "simpo continues one of"),
    ({"methods": {"lora": {}, "kto": {"sft_from": "lora", "training": {"batch_size": 1}}}, "preferences": PREFS},
     "methods.kto: kto estimates its KL term from the other answers of a batch"),
    ({"methods": {"lora": {}, "simpo": {"sft_from": "lora", "gamma": -1}}, "preferences": PREFS},
     "gamma: Input should be greater than or equal to 0"),
    # unpaired answers (schema unpaired): kto only, said once for every method that needs pairs
    ({"methods": {"lora": {}, "dpo": {"sft_from": "lora"}}, "preferences": UNPAIRED_PREFS},
     f"methods.dpo: dpo {ONLY_KTO}make it a kto method, or point `preferences:` at a pairs file (schema text or messages)"),
    ({"methods": {"lora": {}, "kto": {"sft_from": "lora"}, "fast": {"type": "orpo", "sft_from": "lora"}},
      "preferences": UNPAIRED_PREFS}, f"methods.fast: orpo {ONLY_KTO}make it a kto method"),
    ({"methods": {"lora": {}, "simpo": {"sft_from": "lora"}}, "preferences": UNPAIRED_PREFS}, f"methods.simpo: simpo {ONLY_KTO}"),
    ({"methods": {"lora": {}, "kto": {"sft_from": "lora"}}, "preferences": UNPAIRED_PREFS, "reward_models": {"rm": {}}},
     f"reward_models.rm: a reward model {ONLY_KTO}remove reward_models.rm, or point `preferences:` at a pairs file"),
    # reward models
    ({"reward_models": {"rm": {}}}, "reward_models (rm) train on preference pairs: add a `preferences:` section"),
    ({"reward_models": {"lora": {}}, "preferences": PREFS}, "reward_models.lora: 'lora' is also a method name"),
    ({"reward_models": {"../x": {}}, "preferences": PREFS}, "reward model name '../x' must be letters"),
    ({"reward_models": {"rm": {"type": "qlora"}}, "preferences": PREFS}, "Input should be 'lora' or 'full'"),
    ({"reward_models": {"rm": {"training": {"lr": "fast"}}}, "preferences": PREFS}, "lr"),
    # policies
    ({"policies": {"p": {"sft_from": "nope", "rewards": [{"type": "token_f1"}]}}}, "policies.p.sft_from: 'nope' is not a method"),
    ({"methods": {"qlora": {}}, "policies": {"p": {"sft_from": "qlora", "rewards": [{"type": "token_f1"}]}}},
     "'qlora' is a qlora method; a policy continues one of: lora, dora, rslora"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": []}}}, "policies.p.rewards: List should have at least 1 item"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": [{"type": "bleu"}]}}}, "policies.p.rewards[0].type: Input should be"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": [{"type": "format", "pattern": "(["}]}}}, "is not a regular expression"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": [{"type": "reward_model"}]}}}, "a reward_model reward needs `reward_model`"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": [{"type": "reward_model", "reward_model": "rm"}]}}},
     "policies.p.rewards: reward_model 'rm' is not in `reward_models:` (none)"),
    ({"policies": {"p": {"sft_from": "lora", "rewards": [{"type": "token_f1"}], "num_generations": 3,
                         "training": {"batch_size": 4}}}}, "must be a multiple of num_generations (3)"),
    ({"policies": {"../p": {"sft_from": "lora", "rewards": [{"type": "token_f1"}]}}}, "policy name '../p' must be letters"),
    # generated preferences (the hybrid loop) and who reads them
    ({"generated_preferences": {"g": {"generator": "nope", "rank_by": [{"type": "token_f1"}]}}},
     "generated_preferences.g.generator: 'nope' is not a method"),
    ({"methods": {"qlora": {}}, "generated_preferences": {"g": {"generator": "qlora", "rank_by": [{"type": "token_f1"}]}}},
     "'qlora' is a qlora method; a generator samples from one of: lora, dora, rslora"),
    ({"generated_preferences": {"g": {"generator": "lora", "rank_by": []}}}, "rank_by: List should have at least 1 item"),
    ({"generated_preferences": {"g": {"generator": "lora", "rank_by": [{"type": "token_f1"}], "answers_per_prompt": 1}}},
     "answers_per_prompt: Input should be greater than or equal to 2"),
    ({"generated_preferences": {"g": {"generator": "lora", "rank_by": [{"type": "reward_model", "reward_model": "rm"}]}}},
     "generated_preferences.g.rank_by: reward_model 'rm' is not in `reward_models:` (none)"),
    ({"generated_preferences": {"G/..": {"generator": "lora", "rank_by": [{"type": "token_f1"}]}}},
     "generated_preferences name 'G/..' must be lowercase letters"),
    ({"methods": {"lora": {}, "dpo": {"sft_from": "lora", "pairs": "g"}}},
     "methods.dpo.pairs: 'g' is not in `generated_preferences:` (none)"),
    ({"methods": {"lora": {}, "dpo": {"sft_from": "lora", "pairs": "g"}},
      "generated_preferences": {"g": {"generator": "lora", "rank_by": [{"type": "token_f1"}]}}}, None),
    ({"reward_models": {"rm": {"pairs": "g"}}}, "reward_models.rm.pairs: 'g' is not in `generated_preferences:`"),
    ({"reward_models": {"rm": {}, "rm2": {"pairs": "g"}}, "preferences": PREFS,
      "generated_preferences": {"g": {"generator": "lora", "rank_by": [{"type": "reward_model", "reward_model": "rm"}]}}},
     "reward_models.rm2 trains on generated pairs while generated_preferences.g is ranked by a reward model"),
])
def test_bad_beyond_sft_keys_name_the_key(change, expected):
    from ft_assets.config.recipe import RecipeError, parse_recipe

    if expected is None:  # the valid neighbour of the errors around it
        parse_recipe({**BASE, **change}, "recipe.yaml")
        return
    with pytest.raises(RecipeError) as err:
        parse_recipe({**BASE, **change}, "recipe.yaml")
    assert expected in str(err.value), str(err.value)


def test_rlhf_recipe_is_valid():
    from ft_assets.config.recipe import PACKAGE_DIR, load_recipe

    r = load_recipe(PACKAGE_DIR / "recipes" / "rlhf.yaml")
    assert r.preference_methods() == ["dpo", "orpo", "simpo", "kto", "dpo_self"]
    assert {m: r.methods[m].sft_from for m in r.preference_methods()} == dict.fromkeys(r.preference_methods(), "lora")
    assert r.pairs_readers() == {None: ["dpo", "orpo", "simpo", "kto", "rm"], "self_f1": ["dpo_self"]}
    assert r.generated_preferences["self_f1"].generator == "lora" and r.generated_preferences["self_f1"].max_prompts == 64
    assert r.reward_models["rm"].adapter_keys() == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert r.training_for_reward_model("rm").max_steps == 16 and r.training_for("kto").max_steps == 16
    assert {p: s.sft_from for p, s in r.policies.items()} == {"grpo": "lora", "grpo_rm": "lora"}
    assert r.policies["grpo_rm"].reward_models() == ["rm"] and r.policies["grpo"].reward_models() == []
    assert r.policies["grpo"].trainer_settings()["num_generations"] == 4 and r.training_for_policy("grpo").max_steps == 16
    assert all(r.dataset_path(d).is_file() for d in (*r.datasets, r.preferences))


def test_new_keys_at_their_defaults_leave_every_hash_unchanged():
    """Recipes that use none of this keep their hashes, so upgrading re-runs nothing."""
    from ft_assets.config.recipe import parse_recipe

    plain = parse_recipe(BASE)
    explicit = parse_recipe({**BASE, "methods": {"lora": {"r": 8, "continue_from": None, "replay_fraction": 0.0}},
                             "datasets": [{"name": "qa", "path": "data/qa.jsonl", "weight": None}]})
    assert plain.recipe_hash == explicit.recipe_hash
    assert plain.section_hash("seed", method="lora") == explicit.section_hash("seed", method="lora")
    assert "continue_from" not in plain.model_dump()["methods"]["lora"]
    used = parse_recipe({**BASE, "methods": {"lora": {"r": 8, "continue_from": "previous"}}})
    assert used.section_hash("seed", method="lora") != plain.section_hash("seed", method="lora")
