"""GRPO policy optimization on the tiny model (trainers/policy.py, rewards.py, policy_eval.py): GRPO
raises the reward it is given on the training prompts; a run stopped by SIGTERM, or killed with
SIGKILL after a checkpoint, resumes to the bits and curves of an uninterrupted one (beta > 0: TRL's
"ref" adapter is in play); the saved policy is a plain one-adapter peft directory that reproduces
it; the reward-model reward scores the text RewardTrainer trained on, as `trainers.reward.scores`
does; the held-out evaluation scores policy and start alike; bad reward lists and batch shapes fail
naming the recipe keys."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ft_assets.config.training import TrainingSpec
from ft_assets.data import preferences, rows as data, sft_dataset
from ft_assets.methods import get_method
from ft_assets.methods.full import FullSpec
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets.models.device import resolve
from ft_assets.trainers import generated_preferences as generated, policy, policy_eval, preference, reward, rewards
from ft_assets.training import loop
from ft_assets.training.checkpoint import latest_checkpoint
from ft_assets.training.preemption import Preempted
from ft_assets_tests.conftest import kill_9_once, qa_rows, write_jsonl

TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
SYSTEM = "Answer briefly."  # shorter than the template's default system prompt (see `policy_rows`)
SEED = 3
NO_DIGIT = {"type": "format", "pattern": r"\D*", "weight": 1.0}  # answers without a figure: the start gives few

# the learning run: 2 prompts a step (8 completions, groups of 4), no KL (TRL adds no "ref" then)
LEARN = TrainingSpec(max_steps=8, epochs=50, batch_size=8, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
LEARN_SETTINGS = {"num_generations": 4, "max_completion_length": 4, "temperature": 1.0, "beta": 0.0}
# the resumed runs: 4 prompts, 2 a step, so an epoch is 2 steps and `epochs` 1.5 makes 3 (max_steps
# does not bind): SIGTERM's resume (from step 1) is mid-epoch, the kill's (from step 2) at an
# epoch's end, where TRL's own sampler would repeat the first epoch's prompt order; warmup then
# cosine decay, so a resume that lost the scheduler would differ
RESUME = TrainingSpec(max_steps=100, epochs=1.5, batch_size=8, lr=1e-2, warmup_ratio=0.34, lr_scheduler="cosine",
                      checkpoint_every=2)
RESUME_SETTINGS = {**LEARN_SETTINGS, "beta": 0.04, "epsilon": 0.2, "loss_type": "dapo", "top_p": 1.0}

# the killed run: stops in step 3 (after the step-2 checkpoint, before step 3 is saved) and waits for the kill
CHILD = """
import json, sys, time
from pathlib import Path
from ft_assets.models.device import resolve
from ft_assets.trainers import policy

def wait_in_step_3(step, loss):
    if step == 3:
        Path(sys.argv[2]).write_text("in step 3")
        time.sleep(600)

policy.run(policy.PolicyRequest(**json.loads(sys.argv[1])), resolve("cpu"), on_log=wait_in_step_3)
"""


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def policy_rows(n: int) -> list[dict]:
    """Short QA rows: GRPO's log-probabilities on CPU pass every prompt token through the LM head
    (TRL's fused head scores all positions off Triton), so a step's time grows with the prompt."""
    return [{"id": f"p{i:03d}", "question": f"Revenue of company {i}?", "answer": f"${1000 + 37 * i} million"}
            for i in range(n)]


@pytest.fixture(scope="module")
def sft_data(tok, tmp_path_factory) -> Path:
    """An sft_dataset directory of 24 QA rows: 18 train, 6 eval."""
    out = tmp_path_factory.mktemp("sft_dataset")
    cols = {"question": "question", "answer": "answer", "id": "id"}
    src = data.SourceSpec("qa", write_jsonl(out / "qa.jsonl", policy_rows(24)), "jsonl", cols, 0.25, 1, 0.0)
    built = sft_dataset.build_sft_dataset([src], tok, system=SYSTEM, template=TEMPLATE,
                                          template_without_context="{question}", max_length=64, num_proc=1)
    sft_dataset.save_dataset(built, out, {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})
    assert (len(built.train), len(built.eval)) == (18, 6)
    return out


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tok, sft_data, tmp_path_factory) -> Path:
    """The tiny model after 10 full fine-tuning steps on the train split: the random model spreads
    its answers almost evenly over ~49k tokens, so no reward differs within a group and GRPO has
    nothing to learn from; this one answers with "$", figures, " million" and end-of-turn."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    spec = FullSpec(type="full")
    model = get_method("full").wrap(load_model(tiny_model_dir), spec)
    steps = TrainingSpec(max_steps=10, epochs=50, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    loop.train(model, get_method("full"), spec, list(sft_dataset.load_split(sft_data, "train")), steps, seed=SEED,
               pad_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_dir(base_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter on the base, as `adapter[lora]` leaves one (B = 0: the start is the base)."""
    out = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    lora = get_method("lora")
    lora.save(lora.wrap(load_model(base_dir), LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)), out)
    return out


@pytest.fixture(scope="module")
def rm_dir(base_dir, tmp_path_factory) -> Path:
    """A reward model directory as `RewardTraining.save` writes one (a new random head: its scores
    differ per text, which is all the agreement test needs). Its tokenizer pads with
    <|endoftext|>, apart from end-of-turn, as many bases do: HF reads the score at the last
    non-pad token, so whether end-of-turn ends the text changes the score."""
    out = tmp_path_factory.mktemp("rm")
    rm_tok = AutoTokenizer.from_pretrained(base_dir)
    rm_tok.pad_token = "<|endoftext|>"
    torch.manual_seed(SEED)
    reward.RewardTraining(reward.load_scorer(base_dir, rm_tok), rm_tok, reward.RewardResult(), 0).save(out)
    return out


def start_policy(base_dir: Path, sft_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir), sft_dir)


def sampled_reward(model, tok, prompts: list[policy.PolicyPrompt], spec: dict, samples: int = 4) -> float:
    """Mean reward of `samples` answers per prompt, sampled as GRPO samples them (temperature 1,
    4 tokens), with a fixed seed."""
    answers = policy_eval.sample_answers(model, tok, [p.ids for p in prompts] * samples, max_new_tokens=4,
                                         batch_size=36, device="cpu", seed=11)
    (func,), _ = rewards.build_rewards([spec])
    scores = func(prompts=[p.text for p in prompts] * samples,
                  completions=[tok.decode(a, skip_special_tokens=True) for a in answers])
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def learned(base_dir, sft_dir, sft_data, tok):
    """(mean reward of the start, the GRPO run, mean reward of the policy) on the training prompts."""
    prompts = policy.load_prompts(sft_data, tok)
    before = sampled_reward(start_policy(base_dir, sft_dir), tok, prompts, NO_DIGIT)
    tuned = policy.tune_sft_adapter(base_dir, sft_dir, tok, prompts, LEARN, rewards=[NO_DIGIT],
                                    settings=LEARN_SETTINGS, seed=SEED)
    return before, tuned, sampled_reward(tuned.model, tok, prompts, NO_DIGIT)


def test_grpo_raises_the_reward_it_is_given_on_the_training_prompts(learned):
    before, tuned, after = learned
    result = tuned.result
    print("mean reward of sampled answers: start", before, "policy", after, "train rewards", result.rewards)
    assert result.steps == len(result.losses) == len(result.rewards) == LEARN.max_steps
    assert result.reward_functions == ["format"] and len(result.function_rewards()["format"]) == LEARN.max_steps
    assert result.kls == [] and set(tuned.model.peft_config) == {"default"}  # beta 0: no KL, no "ref"
    assert result.prompts_seen == 16 and result.epochs == pytest.approx(8 / 9, abs=1e-3)  # 18 prompts, 2 a step
    # measured: 0.25 -> 0.93; the same run with the opposite reward (an answer with a figure) takes
    # the no-figure rate down to 0.125: the policy moves the way the reward says, not merely away
    assert before <= 0.35 and after >= before + 0.4


def request(base_dir: Path, sft_dir: Path, sft_data: Path, rm_dir: Path, ckpt: Path | None) -> policy.PolicyRequest:
    """The resumed runs' request, as it crosses into a child process: JSON and back."""
    req = policy.PolicyRequest(
        name="grpo", base_dir=str(base_dir), sft_adapter_dir=str(sft_dir), sft_dataset_dir=str(sft_data),
        rewards=[NO_DIGIT, {"type": "reward_model", "model_dir": str(rm_dir), "weight": 0.5}],
        settings=RESUME_SETTINGS, training=RESUME.model_dump(mode="json"), seed=SEED,
        checkpoint_dir=str(ckpt) if ckpt else None, max_prompts=4)
    return policy.PolicyRequest(**json.loads(json.dumps(dataclasses.asdict(req))))


def run_of(result: policy.PolicyResult) -> dict:
    return {"losses": result.losses, **result.train_log()}


@pytest.fixture(scope="module")
def uninterrupted(base_dir, sft_dir, sft_data, rm_dir, tmp_path_factory):
    """The resumed runs' run never interrupted, without checkpoints: (training, curves, saved adapter tensors)."""
    tuned = policy.run(request(base_dir, sft_dir, sft_data, rm_dir, None), resolve("cpu"), log=lambda line: None)
    out = tmp_path_factory.mktemp("uninterrupted")
    policy.save_adapter(tuned.model, out)
    return tuned, run_of(tuned.result), load_file(str(out / "adapter_model.safetensors"))


def assert_same_run(resumed: policy.PolicyTraining, uninterrupted, out: Path) -> None:
    _, curves, tensors = uninterrupted
    assert run_of(resumed.result) == curves
    policy.save_adapter(resumed.model, out)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)


def test_the_steps_are_trls_and_every_curve_is_logged(uninterrupted):
    tuned, curves, _ = uninterrupted
    result = tuned.result
    assert tuned.prompts == 4 and result.steps == 3 and result.epochs == pytest.approx(1.5, abs=1e-3)  # TRL's count
    assert result.reward_functions == ["format", "reward_model"] and result.prompts_seen == 6
    assert all(len(curves[k]) == 3 for k in ("losses", "rewards", "reward_stds", "kls"))
    assert all(len(v) == 3 for v in curves["function_rewards"].values())
    assert result.kls[-1][1] > 0  # beta > 0: the policy left its frozen reference
    summary = result.summary()
    assert summary["final_train_reward"] == result.rewards[-1][1] and "pairs_seen" not in summary


def test_sigterm_checkpoints_the_step_it_arrives_in_and_the_rerun_resumes_exactly(
        base_dir, sft_dir, sft_data, rm_dir, uninterrupted, tmp_path):
    ckpt = tmp_path / "ckpt"

    def sigterm_in_step_1(step, loss):  # HF logs a step after its update, before its checkpoint decision
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    saved = []
    req = request(base_dir, sft_dir, sft_data, rm_dir, ckpt)
    with pytest.raises(Preempted, match=r"^preempted at step 1 by SIGTERM: checkpoint written at .*step-000001"):
        policy.run(req, resolve("cpu"), log=lambda line: None, on_log=sigterm_in_step_1, on_checkpoint=saved.append)
    assert [p.name for p in saved] == ["step-000001"]
    assert not (ckpt / "step-000001" / "ref").exists()  # TRL's reference adapter is never checkpointed
    resumed = policy.run(req, resolve("cpu"), log=lambda line: None)
    assert resumed.result.resumed_from_step == 1
    assert_same_run(resumed, uninterrupted, tmp_path / "resumed")


def test_kill_9_after_a_checkpoint_then_rerun_resumes_there_and_matches_the_uninterrupted_run(
        base_dir, sft_dir, sft_data, rm_dir, uninterrupted, tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "in-step-3"
    req = request(base_dir, sft_dir, sft_data, rm_dir, ckpt)
    kill_9_once([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(req)), str(marker)], marker, tmp_path / "child.log")  # step 3 is lost
    assert latest_checkpoint(ckpt).name == "step-000002"
    resumed = policy.run(req, resolve("cpu"), log=lambda line: None)
    assert resumed.result.resumed_from_step == 2  # at the first epoch's end: step 3 draws the second's order
    assert_same_run(resumed, uninterrupted, tmp_path / "resumed")


def test_the_saved_policy_is_a_plain_one_adapter_peft_directory_that_reproduces_it(
        uninterrupted, base_dir, sft_data, tok, tmp_path):
    from peft import PeftModel

    tuned, _, _ = uninterrupted  # trained with beta > 0: TRL had added its "ref" adapter
    policy.save_adapter(tuned.model, tmp_path / "policy")
    assert not (tmp_path / "policy" / "ref").exists()
    reloaded = PeftModel.from_pretrained(load_model(base_dir), tmp_path / "policy")
    assert set(reloaded.peft_config) == {"default"}
    ids = torch.tensor([policy.load_prompts(sft_data, tok, 1)[0].ids])
    with torch.inference_mode():
        want, got = tuned.model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_the_reward_model_reward_scores_prompt_answer_and_end_of_turn_as_the_reward_model_was_trained(
        rm_dir, base_dir):
    """The pairs' ids are what RewardTrainer trains on (prompt + answer + end-of-turn)."""
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rows = [{"id": r["id"], "prompt": TEMPLATE.format(context=r["context"], question=r["question"]),
             "chosen": r["answer"], "rejected": r["answer"].replace("million", "billion")} for r in qa_rows(6)]
    cols = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
    pairs, _ = preferences.validate_pairs(list(enumerate(rows, start=1)), cols, "prefs")
    assert all(preferences.format_pair(tok, p, None, 160) is None for p in pairs)
    (score,), weights = rewards.build_rewards([{"type": "reward_model", "model_dir": str(rm_dir), "weight": 0.5}])
    got = score(prompts=[p.prompt_text for p in pairs], completions=[p.chosen for p in pairs],
                reference=[p.chosen for p in pairs])
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    want = reward.scores(rm, tok, [p.prompt_ids + p.chosen_ids for p in pairs])
    without_end_of_turn = reward.scores(rm, tok, [p.prompt_ids + p.chosen_ids[:-1] for p in pairs])
    assert score.__name__ == "reward_model" and weights == [0.5]
    assert got == pytest.approx(want, abs=1e-5) and len(set(got)) == len(got)
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, without_end_of_turn))


def test_the_heldout_evaluation_scores_policy_and_start_alike_and_estimates_their_kl(
        learned, base_dir, sft_dir, sft_data, tok):
    from ft_assets.evaluation.qa_metrics import score_answers

    _, tuned, _ = learned
    examples = list(sft_dataset.load_split(sft_data, "eval"))[:5]
    specs = [NO_DIGIT, {"type": "token_f1", "weight": 0.5}, {"type": "exact_match", "weight": 0.25}]
    req = policy.PolicyRequest(name="learned", base_dir=str(base_dir), sft_adapter_dir=str(sft_dir),
                               sft_dataset_dir=str(sft_data), rewards=specs, settings=LEARN_SETTINGS,
                               training=LEARN.model_dump(mode="json"), seed=SEED, checkpoint_dir=None)
    out = policy_eval.evaluate_heldout(req, tuned, resolve("cpu"), max_new_tokens=4, limit=5)
    print("held out:", {k: out[k] for k in ("policy", "start", "kl")})
    assert out["examples"] == 5 and [r["id"] for r in out["rows"]] == [e.id for e in examples]
    for who in ("policy", "start"):
        answers = [r[f"{who}_answer"] for r in out["rows"]]
        qa = score_answers(answers, [ex.answer for ex in examples]).means
        m = out[who]
        # the QA rewards are the QA metrics; the total is their weighted sum, per row and on average
        assert m["rewards"]["token_f1"] == qa["token_f1"] and m["rewards"]["exact_match"] == qa["exact_match"]
        assert m["token_f1"] == qa["token_f1"] and set(m["rewards"]) == {"format", "token_f1", "exact_match"}
        total = sum(r[f"{who}_reward"] for r in out["rows"]) / 5
        assert m["reward"] == pytest.approx(total, abs=1e-3)
        assert m["reward"] == pytest.approx(m["rewards"]["format"] + 0.5 * qa["token_f1"] + 0.25 * qa["exact_match"],
                                            abs=1e-3)
    assert out["policy"]["rewards"]["format"] > out["start"]["rewards"]["format"]  # learned; held out too
    assert out["kl"] > 0
    start = start_policy(base_dir, sft_dir)
    same = policy_eval.policy_log_ratios(start, start, tok, examples, max_new_tokens=4, batch_size=8, device="cpu",
                                         seed=0)
    assert same == [0.0] * 5  # the estimator of a model against itself


def test_unknown_reward_types_and_batches_that_split_a_group_fail_naming_the_keys():
    with pytest.raises(ValueError, match=r"rewards\[1\]: unknown type 'bleu'; known types: exact_match, token_f1, "
                                         r"format, reward_model"):
        rewards.build_rewards([NO_DIGIT, {"type": "bleu"}])
    with pytest.raises(ValueError, match=r"rewards\[0\]: type format needs 'pattern'"):
        rewards.build_rewards([{"type": "format"}])
    with pytest.raises(ValueError, match=r"training.batch_size \* training.grad_accum \(6 \* 1 = 6 completions a "
                                         r"step\) must be a multiple of num_generations \(4\)"):
        policy.policy_steps(18, TrainingSpec(batch_size=6), {"num_generations": 4})
    with pytest.raises(ValueError, match="5 training prompts, fewer than the 6 a step takes"):
        policy.policy_steps(5, TrainingSpec(batch_size=6, grad_accum=4), {"num_generations": 4})
    with pytest.raises(ValueError, match="unknown GRPO settings num_iterations"):
        policy.grpo_settings({"num_iterations": 2})
    # 12 completions a step in groups of 4: 3 prompts; an epoch of 7 prompts is 2 steps (TRL drops the 7th)
    twelve = TrainingSpec(batch_size=6, grad_accum=2, max_steps=99, epochs=2)
    assert policy.policy_steps(7, twelve, {"num_generations": 4}) == 4
    funcs, weights = rewards.build_rewards([NO_DIGIT, {"type": "format", "pattern": r"\$\d+ million"}])
    assert [f.__name__ for f in funcs] == ["format", "format_2"] and weights == [1.0, 1.0]
    # the whole answer, stripped, must match; GRPO's completions carry no end-of-turn
    completions = [" $12 million\n", "$12 million and more", "12 million"]
    assert funcs[1](prompts=["p"] * 3, completions=completions) == [1.0, 0.0, 0.0]


# -- generated_preferences (trainers/generated_preferences.py): the hybrid loop's pairs ---------------


def generated_request(base_dir: Path, sft_dir: Path, sft_data: Path, **kw) -> generated.GeneratedPreferencesRequest:
    spec = dict(name="self_ranked", base_dir=str(base_dir), adapter_dir=str(sft_dir), sft_dataset_dir=str(sft_data),
                rewards=[{"type": "token_f1"}, {"type": "format", "pattern": r"\$[0-9,]+ million", "weight": 0.5}],
                answers_per_prompt=4, max_new_tokens=12, temperature=0.7, top_p=1.0, max_prompts=12, min_margin=0.0,
                finished_only=True, eval_fraction=0.25, max_length=64, seed=SEED)
    return generated.GeneratedPreferencesRequest(**{**spec, **kw})


@pytest.fixture(scope="module")
def generated_pairs(base_dir, sft_dir, sft_data):
    return generated.run(generated_request(base_dir, sft_dir, sft_data), resolve("cpu"), log=lambda line: None)


def test_generated_pairs_put_the_best_finished_answer_over_the_worst_of_each_prompt(generated_pairs, sft_data, tok):
    made = generated_pairs
    examples = {ex.id: ex for ex in sft_dataset.load_split(sft_data, "train")[:12]}
    assert [g.example_id for g in made.groups] == list(examples) and all(len(g.answers) == 4 for g in made.groups)
    pairs = made.built.train + made.built.eval
    print(made.summary())
    assert len(pairs) >= 4 and made.built.stats["rejected_rows"] == 12 - len(pairs)
    for pair in pairs:
        group = next(g for g in made.groups if g.example_id == pair.id)
        ex = examples[pair.id]
        chosen, rejected = (group.answers[i] for i in group.pair)
        # the rewards as the metric and the pattern give them, not as the ranking computed them
        f1 = rewards.AnswerScore("token_f1", "f1")
        fmt = rewards.FormatMatch(r"\$[0-9,]+ million", "fmt")
        worth = [f1([""], [a.text], [ex.answer])[0] + 0.5 * fmt([""], [a.text])[0] for a in group.answers]
        assert chosen.finished and chosen.text != rejected.text
        assert worth[group.pair[0]] == max(w for w, a in zip(worth, group.answers) if a.finished)
        assert worth[group.pair[1]] == min(w for w, a in zip(worth, group.answers) if a.text != chosen.text)
        assert worth[group.pair[0]] > worth[group.pair[1]]
        # stored as preference_dataset stores pairs: TRL re-tokenizes each text to these ids
        assert pair.prompt_ids == list(ex.input_ids[:ex.prompt_len])
        assert tok(pair.prompt_text, add_special_tokens=False)["input_ids"] == pair.prompt_ids
        for text, ids in ((pair.chosen_text, pair.chosen_ids), (pair.rejected_text, pair.rejected_ids)):
            assert tok(text, add_special_tokens=False)["input_ids"] == ids and ids[-1] == tok.eos_token_id
    for group in made.groups:
        assert (group.pair is None) == bool(group.why)


def test_the_same_request_generates_the_same_pairs(generated_pairs, base_dir, sft_dir, sft_data):
    again = generated.run(generated_request(base_dir, sft_dir, sft_data), resolve("cpu"), log=lambda line: None)
    assert [p.to_json() for p in again.built.train] == [p.to_json() for p in generated_pairs.built.train]


def test_dpo_trains_on_generated_pairs_as_on_human_ones(generated_pairs, base_dir, sft_dir, tok, tmp_path):
    preferences.save_preferences(generated_pairs.built, tmp_path, {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})  # noqa: E501
    steps = TrainingSpec(max_steps=2, epochs=1, batch_size=2, lr=1e-3)
    tuned = preference.run(preference.PreferenceRequest(
        method="dpo", objective="dpo", base_dir=str(base_dir), sft_adapter_dir=str(sft_dir),
        preference_dataset_dir=str(tmp_path), training=steps.model_dump(mode="json"), seed=SEED,
        settings={"beta": 0.1, "loss_type": "sigmoid"}, max_length=64, checkpoint_dir=str(tmp_path / "ckpt")), resolve("cpu"),
        log=lambda line: None)
    assert tuned.result.steps == 2 and tuned.pairs == len(generated_pairs.built.train)


def test_a_margin_no_prompt_reaches_fails_saying_what_to_change(base_dir, sft_dir, sft_data):
    with pytest.raises(ValueError, match="none of 2 prompts made a pair .*lower min_margin"):
        generated.run(generated_request(base_dir, sft_dir, sft_data, max_prompts=2, min_margin=10.0), resolve("cpu"),
                      log=lambda line: None)
