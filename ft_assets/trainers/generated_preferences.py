"""Preference pairs a tuned model makes from its own answers (the hybrid loop of RLHF): request in,
pairs out; no store, no Dagster.

1. prompts:  the first `max_prompts` training examples of an sft_dataset, each its tokens before the
             answer (what the SFT model learned to answer after) and its reference answer;
2. sample:   the generator (the base + a peft adapter) samples `answers_per_prompt` answers to each
             (temperature, top_p, no top-k; seeded, in batches of `PROMPTS_PER_BATCH` prompts, so the
             same request gives the same answers on the same device). An answer is its tokens up to and
             including end-of-turn; one cut at `max_new_tokens` is unfinished and gets end-of-turn appended;
3. rank:     each answer's reward is the weighted sum of the request's reward functions
             (`trainers.rewards`, the types policies use: verifiable ones against the reference, a
             reward model's score, a format check);
4. pair:     chosen = the best-ranked finished answer (any answer when not `finished_only`),
             rejected = the worst-ranked answer with another text; a prompt makes a pair only when reward(chosen) - reward(rejected) > `min_margin` and
             prompt + longer answer fit `max_length`, else it is listed with the reason. Pairs are split
             train/eval by the seeded per-id hash of SFT rows (`data.rows.split_examples`).

Each pair is stored as `data.preferences` stores the recipe's pairs (ids and text; an answer's text is
decoded and its ids are the tokenizer's own for that text, which is what TRL's trainers re-tokenize),
so DPO, the other preference objectives and reward models read it like human pairs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data.preferences import BuiltPreferences, PreferencePair
from ..data.rows import Example, dataset_info, split_examples, tokenizer_fingerprint
from ..data.sft_dataset import load_split
from ..data.types import Rejected
from ..evaluation.heldout import left_padded
from ..models.base_model import load_model, load_tokenizer
from ..models.device import Compute
from ..training.loop import seed_everything
from .rewards import build_rewards, weighted_total

PROMPTS_PER_BATCH = 8  # fixed: the batch shapes the random stream, so it is part of what makes the pairs


@dataclass(frozen=True)
class GeneratedPreferencesRequest:
    name: str
    base_dir: str
    adapter_dir: str  # the generator: a peft adapter on base_dir
    sft_dataset_dir: str  # its train split gives the prompts and reference answers
    rewards: list[dict[str, Any]]  # `trainers.rewards.build_rewards`'s specs (a reward model by its model_dir)
    answers_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    max_prompts: int | None
    min_margin: float
    finished_only: bool  # chosen must have ended with end-of-turn
    eval_fraction: float
    max_length: int
    seed: int


@dataclass
class Answer:
    text: str  # decoded without special tokens, as rewards read it
    ids: list[int]  # the tokenizer's ids of `text` + end-of-turn
    finished: bool  # it ended with end-of-turn within max_new_tokens
    reward: float = 0.0
    rewards: dict[str, float] = field(default_factory=dict)  # per function


@dataclass
class Group:
    """One prompt and its sampled answers; `pair` is None when it made none, with `why`."""

    example_id: str
    prompt_ids: list[int]
    reference: str
    answers: list[Answer]
    pair: tuple[int, int] | None = None  # (chosen, rejected) indices into answers
    why: str = ""

    def to_json(self, tokenizer) -> dict[str, Any]:
        return {"id": self.example_id, "prompt": tokenizer.decode(self.prompt_ids, skip_special_tokens=True),
                "reference": self.reference, "pair": list(self.pair) if self.pair else None, "why": self.why,
                "answers": [{k: v for k, v in asdict(a).items() if k != "ids"} for a in self.answers]}


@dataclass
class GeneratedPreferences:
    built: BuiltPreferences  # the pairs, split, as `data.preferences.save_preferences` writes them
    groups: list[Group]
    tokenizer: Any
    wall_s: float

    def summary(self) -> dict[str, Any]:
        paired = [g for g in self.groups if g.pair]
        answers = [a for g in self.groups for a in g.answers]
        chosen = [g.answers[g.pair[0]].reward for g in paired]
        rejected = [g.answers[g.pair[1]].reward for g in paired]
        return {"prompts": len(self.groups), "answers": len(answers), "pairs": len(paired),
                "train_pairs": len(self.built.train), "eval_pairs": len(self.built.eval),
                "finished_fraction": _mean([float(a.finished) for a in answers]),
                "mean_reward": _mean([a.reward for a in answers]), "mean_chosen_reward": _mean(chosen),
                "mean_rejected_reward": _mean(rejected), "mean_margin": _mean([c - r for c, r in zip(chosen, rejected)]),
                "wall_time_s": round(self.wall_s, 2)}


def run(request: GeneratedPreferencesRequest, hw: Compute, log=print) -> GeneratedPreferences:
    """Sample, rank and pair (the module doc). Raises ValueError when no prompt made a pair."""
    from peft import PeftModel

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(request.base_dir)
    if tokenizer_fingerprint(tokenizer) != dataset_info(request.sft_dataset_dir)["tokenizer_fingerprint"]:
        raise ValueError("sft_dataset was built with another tokenizer than base_model has now; re-materialize it")
    rows = load_split(request.sft_dataset_dir, "train")
    examples = list(rows[:request.max_prompts] if request.max_prompts else rows)
    seed_everything(request.seed)
    model = PeftModel.from_pretrained(load_model(request.base_dir, hw.device, hw.dtype), request.adapter_dir).eval()
    funcs, weights = build_rewards(request.rewards, device=hw.device, dtype=hw.dtype)
    groups: list[Group] = []
    for i in range(0, len(examples), PROMPTS_PER_BATCH):
        batch = examples[i:i + PROMPTS_PER_BATCH]
        groups += sample_groups(model, tokenizer, batch, request, hw.device)
        rank(groups[-len(batch):], tokenizer, funcs, weights)
        log(f"sampled {len(groups)}/{len(examples)} prompts x {request.answers_per_prompt} answers")
    pairs = [make_pair(g, n, tokenizer, request) for n, g in enumerate(groups, 1)]
    kept = [p for p in pairs if p is not None]
    if not kept:
        raise ValueError(f"none of {len(groups)} prompts made a pair (first: {groups[0].why if groups else 'no prompts'}); "
                         "sample more answers per prompt, raise the temperature or lower min_margin")
    return GeneratedPreferences(_built(request, groups, kept), groups, tokenizer, time.perf_counter() - t0)


@torch.inference_mode()
def sample_groups(model, tokenizer, examples: list[Example], request: GeneratedPreferencesRequest,
                  device: str) -> list[Group]:
    """`answers_per_prompt` sampled answers to each example's prompt (left-padded batch)."""
    pad, eos, k = tokenizer.pad_token_id, tokenizer.eos_token_id, request.answers_per_prompt
    prompts = [list(ex.input_ids[:ex.prompt_len]) for ex in examples]
    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                         temperature=request.temperature, top_p=request.top_p, top_k=0, num_return_sequences=k,
                         max_new_tokens=request.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    groups = []
    for j, ex in enumerate(examples):
        answers = [_answer(row.tolist(), tokenizer) for row in out[j * k:(j + 1) * k, width:]]
        groups.append(Group(ex.id, prompts[j], ex.answer, answers))
    return groups


def _answer(tokens: list[int], tokenizer) -> Answer:
    eos = tokenizer.eos_token_id
    finished = eos in tokens
    body = tokens[:tokens.index(eos)] if finished else tokens
    text = tokenizer.decode(body, skip_special_tokens=True)
    # the tokenizer's own ids for the text: a sampled sequence may not be the canonical one, and
    # TRL's trainers re-tokenize the text (their check refuses ids that differ)
    return Answer(text, tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], finished)


def rank(groups: list[Group], tokenizer, funcs, weights: list[float]) -> None:
    """Each answer's reward (weighted sum) and per-function rewards, in place; batched over the groups."""
    prompts = [tokenizer.decode(g.prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for g in groups for _ in g.answers]
    completions = [a.text for g in groups for a in g.answers]
    references = [g.reference for g in groups for _ in g.answers]
    per_function = [f(prompts=prompts, completions=completions, reference=references) for f in funcs]
    totals = weighted_total(per_function, weights)
    answers = [a for g in groups for a in g.answers]
    for i, a in enumerate(answers):
        a.reward = float(totals[i])
        a.rewards = {f.__name__: float(scores[i]) for f, scores in zip(funcs, per_function)}


def make_pair(group: Group, n: int, tokenizer, request: GeneratedPreferencesRequest) -> PreferencePair | None:
    """The pair of the `n`th group (the module doc: its `line`), or None with `group.why` set."""
    finished = [i for i, a in enumerate(group.answers) if a.finished or not request.finished_only]
    if not finished:
        group.why = f"none of {len(group.answers)} answers ended within max_new_tokens {request.max_new_tokens}"
        return None
    best = max(finished, key=lambda i: group.answers[i].reward)
    others = [i for i, a in enumerate(group.answers) if a.text != group.answers[best].text]
    if not others:
        group.why = f"all {len(group.answers)} answers are the same text"
        return None
    worst = min(others, key=lambda i: group.answers[i].reward)
    chosen, rejected = group.answers[best], group.answers[worst]
    if chosen.reward - rejected.reward <= request.min_margin:
        group.why = (f"best finished answer {chosen.reward:.3f} - worst {rejected.reward:.3f} is not above "
                     f"min_margin {request.min_margin}")
        return None
    if len(group.prompt_ids) + max(len(chosen.ids), len(rejected.ids)) > request.max_length:
        group.why = f"prompt + answer exceed max_length {request.max_length}"
        return None
    group.pair = (best, worst)
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    return PreferencePair(group.example_id, tokenizer.decode(group.prompt_ids, skip_special_tokens=True),
                          chosen.text, rejected.text, line=n, task=request.name, prompt_text=text(group.prompt_ids),
                          chosen_text=text(chosen.ids), rejected_text=text(rejected.ids),
                          prompt_ids=list(group.prompt_ids), chosen_ids=chosen.ids, rejected_ids=rejected.ids)


def _built(request: GeneratedPreferencesRequest, groups: list[Group], pairs: list[PreferencePair]) -> BuiltPreferences:
    train, evals = split_examples(pairs, request.eval_fraction, request.seed)
    unpaired = [Rejected(n, g.why, None, g.example_id) for n, g in enumerate(groups, 1) if not g.pair]
    lengths = sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    stats = {"source": f"generated_preferences/{request.name}", "rows": len(groups), "kept": len(pairs),
             "rejected_rows": len(unpaired), "train_rows": len(train), "eval_rows": len(evals),
             "tokens": {"min": lengths[0], "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
                        "p50": lengths[len(lengths) // 2]}}
    return BuiltPreferences(train, evals, unpaired, stats)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None
