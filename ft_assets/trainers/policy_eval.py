"""Held-out evaluation of a GRPO policy (`trainers.policy`) against the SFT adapter it started from,
on the sft_dataset's eval examples, the same way for both models:

    rewards    each reward function's mean over the greedy answers (`evaluation.heldout.generate`),
               "rewards": {name: mean}, and the mean of their weighted sum, "reward", with the
               training's functions and weights
    qa         exact match, token F1, ROUGE-L of those answers (`evaluation.qa_metrics`)
    kl         a Monte-Carlo estimate of KL(policy || start) over answers: one answer per prompt
               sampled from the policy (temperature 1, no top-k/top-p, seeded), the summed log-ratio
               log p_policy - log p_start of its tokens (end-of-turn included), averaged over prompts;
               the KL of the two models' answer distributions cut at max_new_tokens, in nats per answer

`evaluate_policy` returns {"examples", "policy": {"reward", "rewards", "exact_match", "token_f1",
"rouge_l"}, "start": {the same}, "kl", "rows"}; `evaluate_heldout` runs it for a finished
`policy.run` on its sft_dataset's eval split. No Dagster here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.rows import IGNORE_INDEX, Example
from ..data.sft_dataset import load_split
from ..evaluation.heldout import generate_answers
from ..evaluation.qa_metrics import score_answers
from ..models.base_model import load_model
from ..models.device import Compute
from ..training.packing import collate
from .policy import PolicyRequest, PolicyTraining, TrainedElsewhere, prompt_of
from .rewards import build_rewards, weighted_total


def evaluate_heldout(request: PolicyRequest, tuned: PolicyTraining | TrainedElsewhere, hw: Compute, *,
                     max_new_tokens: int, batch_size: int = 8, limit: int | None = None) -> dict[str, Any]:
    """`evaluate_policy` of the policy `run(request)` trained against its SFT start (loaded here, a
    second copy of the base) on the first `limit` (None: all) examples of the eval split, with the
    request's rewards."""
    from peft import PeftModel

    rows = load_split(request.sft_dataset_dir, "eval")
    examples = list(rows[:limit] if limit else rows)
    start = PeftModel.from_pretrained(load_model(request.base_dir, hw.device, hw.dtype), request.sft_adapter_dir)
    tuned_policy, tokenizer = tuned.policy(request.base_dir, hw)  # in memory, or loaded from what rank 0 saved
    return evaluate_policy(tuned_policy, start, tokenizer, examples, request.rewards,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, device=hw.device, seed=request.seed)


def evaluate_policy(policy, start, tokenizer, examples: Sequence[Example], rewards: list[dict[str, Any]], *,
                    max_new_tokens: int, batch_size: int = 8, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The policy and its SFT start scored on `examples` (the module doc); `rewards` as the
    training's request lists them."""
    examples = list(examples)
    funcs, weights = build_rewards(rewards, device=device)
    prompts = [prompt_of(ex, tokenizer).text for ex in examples]
    references = [ex.answer for ex in examples]
    out: dict[str, Any] = {"examples": len(examples)}
    answers: dict[str, list[str]] = {}
    totals: dict[str, list[float]] = {}
    for who, model in (("policy", policy), ("start", start)):
        answers[who] = generate_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, device=device)
        per_function = [f(prompts=prompts, completions=answers[who], reference=references) for f in funcs]
        totals[who] = weighted_total(per_function, weights)
        out[who] = {"reward": _mean(totals[who]),
                    "rewards": {f.__name__: _mean(r) for f, r in zip(funcs, per_function)},
                    **score_answers(answers[who], references).means}
    log_ratios = policy_log_ratios(policy, start, tokenizer, examples, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, device=device, seed=seed)
    out["kl"] = _mean(log_ratios)
    out["rows"] = [{"id": ex.id, "reference": ex.answer, "policy_answer": answers["policy"][i],
                    "start_answer": answers["start"][i], "policy_reward": round(totals["policy"][i], 4),
                    "start_reward": round(totals["start"][i], 4), "log_ratio": round(log_ratios[i], 4)}
                   for i, ex in enumerate(examples)]
    return out


def policy_log_ratios(policy, start, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int,
                      device: str, seed: int) -> list[float]:
    """Per example: log p_policy(y) - log p_start(y) of one answer y sampled from the policy."""
    prompts = [list(ex.input_ids[:ex.prompt_len]) for ex in examples]
    answers = sample_answers(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             device=device, seed=seed)
    pad = tokenizer.pad_token_id
    mine = answer_logps(policy, prompts, answers, pad, device, batch_size)
    theirs = answer_logps(start, prompts, answers, pad, device, batch_size)
    return [a - b for a, b in zip(mine, theirs)]


@torch.inference_mode()
def sample_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int, device: str,
                   seed: int) -> list[list[int]]:
    """One answer per prompt sampled from the model's whole distribution (temperature 1, no
    top-k/top-p): its tokens up to and including end-of-turn. Seeded; the global RNG is left as it was."""
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
            for row in gen[:, width:].tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@torch.inference_mode()
def answer_logps(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, device: str,
                 batch_size: int = 8) -> list[float]:
    """Sum of log p(answer token | prefix) over each answer."""
    model.eval()
    rows = [Example("", "", None, "", 0, input_ids=p + a, labels=[IGNORE_INDEX] * len(p) + a)
            for p, a in zip(prompts, answers)]
    sums: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i: i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums += (logp * (targets != IGNORE_INDEX)).sum(dim=1).tolist()
    return sums


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0
