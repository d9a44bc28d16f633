"""Held-out evaluation speed, measured: `evaluation.heldout.generate` (what base_eval and
eval_report run: length-sorted, left-padded batches of `evaluation.batch_size`) against a plain
transformers `generate` loop (one question at a time, no padding) on the same rows and model.

One invocation materializes base_model and sft_dataset of a recipe through the Dagster graph
(throwaway instance; no training: the base model answers), then answers the first
`--max-examples` held-out questions greedily (`evaluation.max_new_tokens`) both ways and reports,
for each: wall time of generation (model already loaded), questions/s, generated tokens
(up to and including end-of-turn) and tokens/s, token F1 against the references, and the share of
questions whose answer equals the plain loop's (padding changes float rounding, rarely a token).

    python -m ft_assets.bench.eval_throughput [--recipe R] [--max-examples N] [--threads 2]

Results: ft_assets/bench/results/eval_throughput_cpu_<date>.{json,md}. Uses FT_HOME (default: a
temporary directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

from ft_assets.bench.common import cpu_name, plain_generate, write_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"


def base_and_examples(recipe_path: Path, home: Path):
    """(the recipe, base_model's directory, the held-out examples) after materializing both assets."""
    import dagster as dg

    from ft_assets.artifacts.store import ArtifactStore
    from ft_assets.config.recipe import load_recipe
    from ft_assets.data import sft_dataset
    from ft_assets.definitions import build_definitions

    recipe = load_recipe(recipe_path)
    defs = build_definitions(recipe, home=str(home))
    dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(), resources=defs.resources,
                   selection=["base_model", "sft_dataset"])
    store = ArtifactStore(home)
    return recipe, store.latest("base_model").dir, sft_dataset.load_split(store.latest("sft_dataset").dir, "eval")


def row(name: str, answers: list[str], generated: list[int], wall: float, examples, reference: list[str]) -> dict:
    from ft_assets.evaluation.qa_metrics import score_answers

    return {"way": name, "questions": len(answers), "generate_s": round(wall, 2),
            "questions_per_s": round(len(answers) / wall, 3), "generated_tokens": sum(generated),
            "tokens_per_s": round(sum(generated) / wall, 1),
            "token_f1": score_answers(answers, [ex.answer for ex in examples]).means["token_f1"],
            "same_answer_as_plain_loop": round(sum(a == b for a, b in zip(answers, reference)) / len(answers), 3)}


def run(args) -> dict:
    import torch
    import transformers

    from ft_assets.evaluation import heldout
    from ft_assets.models.base_model import load_model, load_tokenizer

    home = Path(os.environ.get("FT_HOME") or tempfile.mkdtemp(prefix="eval-bench-"))
    load_start = [round(x, 1) for x in os.getloadavg()]
    recipe, base_dir, examples = base_and_examples(Path(args.recipe).resolve(), home)
    examples = examples[: args.max_examples]
    ev = recipe.evaluation
    torch.set_num_threads(args.threads)
    tok, model = load_tokenizer(base_dir), load_model(base_dir)
    plain, plain_tokens, plain_s = plain_generate(model, tok, examples, ev.max_new_tokens)
    t0 = time.perf_counter()
    ours, our_tokens = heldout.generate(model, tok, examples, max_new_tokens=ev.max_new_tokens,
                                        batch_size=ev.batch_size, device="cpu")
    ours_s = time.perf_counter() - t0
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores ({cpu_name()})", "threads": args.threads,
        "load_avg_start": load_start, "load_avg_end": [round(x, 1) for x in os.getloadavg()],
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO)), "max_new_tokens": ev.max_new_tokens,
        "batch_size": ev.batch_size, "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "rows": [row("plain loop (batch 1, no padding)", plain, plain_tokens, plain_s, examples, plain),
                 row(f"heldout.generate (batches of {ev.batch_size}, left-padded)", ours, our_tokens, ours_s,
                     examples, plain)],
        "command": "python -m ft_assets.bench.eval_throughput " + " ".join(
            f"--{k.replace('_', '-')} {_shown(v)}" for k, v in vars(args).items() if k != "out"),
    }


def _shown(value) -> str:
    """An argument as the command line would give it from the repository."""
    path = Path(str(value))
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(value)


def markdown(res: dict) -> str:
    out = ["# Held-out evaluation speed: batched generation vs a plain loop (CPU)", "",
           f"- date: {res['date']}; machine: {res['machine']}; threads {res['threads']}; load average at start "
           f"{res['load_avg_start']}, end {res['load_avg_end']}",
           f"- model: SmolLM2-135M-Instruct (bundled, the untuned base, float32), recipe `{res['recipe']}`: "
           f"greedy, max {res['max_new_tokens']} new tokens; {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
           f"- command: `{res['command']}`", "",
           "| way | questions | generation s | questions/s | generated tokens | tokens/s | token F1 | same answer as the plain loop |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['way']} | {r['questions']} | {r['generate_s']} | {r['questions_per_s']} | "
                   f"{r['generated_tokens']} | {r['tokens_per_s']} | {r['token_f1']:.3f} | "
                   f"{100 * r['same_answer_as_plain_loop']:.0f} % |")
    out += ["", "Generation only (the model is loaded before; the loss pass of an eval is apart). Tokens: generated "
            "up to and including end-of-turn, the padding after it in a batch not counted."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "ft_assets" / "recipes" / "demo.yaml"))
    ap.add_argument("--max-examples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    res = run(args)
    write_results(res, args.out, f"eval_throughput_cpu_{res['date'][:10]}", markdown(res))


if __name__ == "__main__":
    main()
