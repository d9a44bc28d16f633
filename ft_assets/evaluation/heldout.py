"""Evaluate a model on held-out examples: loss/perplexity on the reference answers, and
greedy generation scored with exact match, token F1 and ROUGE-L (the `evaluate` metric modules,
through `evaluation.qa_metrics`).

`evaluate(...)` returns {"metrics", "rows", "timing"} (seconds of the loss pass and of generation,
generated tokens, questions/s and generated tokens/s: the step's metadata, not metrics.json, which
holds only what the model computed); `save_eval(result, dir)` writes
`metrics.json`, the per-example table as `predictions.jsonl`, `predictions.parquet` and
`predictions.csv`, and, with several tasks, `per_task.parquet` (see `evaluation.tables`)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import tables
from ..data.rows import Example, write_jsonl
from .qa_metrics import mean_scores, perplexity, score_answers
from ..training.packing import collate
from ..training.prepared import token_loss_sum


@torch.inference_mode()
def eval_loss(model, examples: list[Example], pad_id: int, device: str, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss over answer tokens (the same masking as training)."""
    model.eval()
    total, count = 0.0, 0
    examples = sorted(examples, key=lambda e: len(e.input_ids))  # less padding; a sum ignores order
    for i in range(0, len(examples), batch_size):
        loss_sum, n = token_loss_sum(model, collate(examples[i: i + batch_size], pad_id, device))
        total += float(loss_sum)
        count += n
    loss = total / max(1, count)
    return {"eval_loss": round(loss, 4), "perplexity": perplexity(loss)}


def generate_answers(model, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int, device: str) -> list[str]:
    """Greedy answers to each example's prompt, in input order (length-sorted, left-padded batches)."""
    return generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)[0]


@torch.inference_mode()
def generate(model, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int, device: str
             ) -> tuple[list[str], list[int]]:
    """(greedy answers, tokens generated for each: up to and including end-of-turn), in input order."""
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_len)
    out: list[str] = [""] * len(examples)
    generated = [0] * len(examples)
    for i in range(0, len(order), batch_size):
        batch_idx = order[i: i + batch_size]
        ids, mask = left_padded([examples[j].input_ids[: examples[j].prompt_len] for j in batch_idx], pad)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        for j, row in zip(batch_idx, gen[:, width:]):
            out[j] = tokenizer.decode(row, skip_special_tokens=True).strip()
            ends = (row == eos).nonzero()  # rows that stopped early are padded after it
            generated[j] = int(ends[0]) + 1 if len(ends) else len(row)
    return out, generated


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `prompts` as one left-padded batch, what `generate` continues."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = torch.tensor(list(p))
        mask[j, width - len(p):] = 1
    return ids, mask


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int, device: str) -> dict[str, Any]:
    """Metrics and a per-example table for one model."""
    t0 = time.perf_counter()
    losses = eval_loss(model, examples, tokenizer.pad_token_id, device, batch_size)
    t1 = time.perf_counter()
    answers, generated = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  device=device)
    gen_s = time.perf_counter() - t1
    scores = score_answers(answers, [ex.answer for ex in examples])
    rows = [{"id": ex.id, "task": ex.task, "question": ex.question, "reference": ex.answer, "prediction": pred,
             **scores.example(i)} for i, (ex, pred) in enumerate(zip(examples, answers))]
    metrics = {**scores.means, **losses, "examples": len(rows)}
    tasks = sorted({ex.task for ex in examples})
    if len(tasks) > 1:  # multi-task: the same metrics per task (loss re-computed on each task's rows)
        metrics["per_task"] = per_task_metrics(model, examples, rows, tokenizer.pad_token_id, device, batch_size)
    timing = {"loss_s": round(t1 - t0, 2), "generate_s": round(gen_s, 2), "generated_tokens": sum(generated),
              "questions_per_s": round(len(examples) / gen_s, 3) if gen_s else None,
              "generated_tokens_per_s": round(sum(generated) / gen_s, 2) if gen_s else None}
    return {"metrics": metrics, "rows": rows, "timing": timing}


def per_task_scores(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Exact match, token F1 and ROUGE-L averaged within each task (rows carry `task`)."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        out[task] = {**mean_scores(mine), "examples": len(mine)}
    return out


def per_task_metrics(model, examples: list[Example], rows: list[dict[str, Any]], pad_id: int, device: str,
                     batch_size: int = 16) -> dict[str, dict[str, float]]:
    scores = per_task_scores(rows)
    for task in scores:
        scores[task].update(eval_loss(model, [e for e in examples if e.task == task], pad_id, device, batch_size))
    return scores


def rows_fingerprint(examples: list[Example]) -> str:
    """The identity of a held-out set as models see it (ids, prompt and answer tokens): two reports
    with the same fingerprint scored the same rows, so their scores compare directly."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, list(ex.input_ids), ex.prompt_len]).encode() + b"\n")
    return h.hexdigest()[:16]


def save_predictions(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """The per-example table: `predictions.jsonl` (read by other code) plus Parquet and CSV."""
    write_jsonl(out_dir / "predictions.jsonl", rows)
    tables.write_table(tables.predictions_frame(rows), out_dir, "predictions", csv=True)


def save_eval(result: dict[str, Any], out_dir: Path) -> None:
    """One model's evaluation: `metrics.json`, the predictions table and, with several tasks, `per_task.parquet`."""
    (out_dir / "metrics.json").write_text(json.dumps(result["metrics"], indent=2, sort_keys=True) + "\n")
    save_predictions(result["rows"], out_dir)
    if "per_task" in result["metrics"]:
        tables.write_table(tables.per_task_frame(result["metrics"]["per_task"]), out_dir, "per_task")
