"""What the benchmark scripts share: the machine's CPU name, a plain one-question-at-a-time
transformers `generate` loop (the baseline two benchmarks measure against), and writing a
result as `<stem>.json` + `<stem>.md` (also printed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def plain_generate(model, tok, examples, max_new_tokens: int) -> tuple[list[str], list[int], float]:
    """One greedy `generate` call per question, its prompt unpadded: (answers, tokens generated for
    each (batch 1 stops at end-of-turn: nothing after it), wall seconds of the calls)."""
    import torch

    answers, generated, wall = [], [], 0.0
    with torch.inference_mode():
        for ex in examples:
            ids = torch.tensor([ex.input_ids[: ex.prompt_len]])
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            wall += time.perf_counter() - t0
            new = out[0, ids.shape[1]:]
            answers.append(tok.decode(new, skip_special_tokens=True).strip())
            generated.append(len(new))
    return answers, generated, wall


def write_results(res: dict[str, Any], out_dir: str | Path, stem: str, markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
