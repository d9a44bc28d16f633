"""GGUF export, measured: merged safetensors vs each GGUF type on the held-out split.

One invocation materializes, through the Dagster graph with a throwaway instance, base_model,
sft_dataset, adapter[m], merged_model[m] and gguf_model[m] for one method of a recipe (the
recipe's own settings, `export.gguf` replaced by --types), then on the held-out split
(`--max-examples` rows, the order sft_dataset wrote them):

  size        bytes on disk: merged model.safetensors vs each model-<type>.gguf
  token F1    greedy answers (`evaluation.max_new_tokens`) scored by evaluation.qa_metrics against the
              references: transformers on the merged checkpoint (float32, batch 1) vs
              llama.cpp's llama-completion on each GGUF (the same chat-formatted prompt text)
  agreement   share of prompts where llama.cpp's answer equals transformers' answer
  tokens/s    CPU generation with the same threads, generated tokens / wall time: transformers'
              `generate` on the loaded model (prefill included) vs each llama-completion process
              (model load and prefill included), and llama.cpp's own decode-only rate

    python -m ft_assets.bench.gguf_export [--recipe R --method M] --types f16,q8_0,q4_k_m --threads 2 [--max-steps 4]

Results: ft_assets/bench/results/gguf_export_cpu_<date>.{json,md}. Needs `make install`
(llama.cpp built). Uses FT_HOME (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

from ft_assets.bench.common import cpu_name, plain_generate, write_results

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"


def materialize(recipe_path: Path, method: str, types: list[str], home: Path, max_steps: int | None) -> dict:
    import dagster as dg

    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    from ft_assets.artifacts.store import ArtifactStore

    raw = yaml.safe_load(recipe_path.read_text())
    raw["root"] = str((recipe_path.parent / raw.get("root", ".")).resolve())
    raw["methods"] = {method: raw["methods"][method]}
    raw["export"] = {"gguf": types}
    if max_steps:  # a shorter run of the same recipe (a busy machine)
        raw["training"]["max_steps"] = max_steps
    if raw["methods"][method].get("type", method) != "qlora":
        raw["quantization"] = {"method": "none"}  # quantized_base only feeds qlora
    copy = home / "bench_recipe.yaml"
    copy.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(copy)
    defs = build_definitions(recipe, home=str(home))
    instance, assets = dg.DagsterInstance.ephemeral(), list(defs.assets)
    shared = ["base_model", "sft_dataset"] + (["quantized_base"] if recipe.quantization.method != "none" else [])
    t0 = time.perf_counter()
    dg.materialize(assets, instance=instance, resources=defs.resources, selection=shared)
    dg.materialize(assets, instance=instance, resources=defs.resources, partition_key=method,
                   selection=["adapter", "merged_model", "gguf_model"])
    store = ArtifactStore(home)
    return {"recipe": recipe, "pipeline_s": round(time.perf_counter() - t0, 1),
            "merged": store.latest("merged_model", method), "gguf": store.latest("gguf_model", method),
            "dataset": store.latest("sft_dataset"), "adapter": store.latest("adapter", method)}


def reuse(home: Path, method: str) -> dict:
    """The artifacts an earlier invocation left in FT_HOME (measure again without training again)."""
    from ft_assets.config.recipe import load_recipe
    from ft_assets.artifacts.store import ArtifactStore

    store = ArtifactStore(home)
    return {"recipe": load_recipe(home / "bench_recipe.yaml"), "pipeline_s": None,
            "merged": store.latest("merged_model", method), "gguf": store.latest("gguf_model", method),
            "dataset": store.latest("sft_dataset"), "adapter": store.latest("adapter", method)}


def transformers_answers(merged_dir: Path, examples, max_new_tokens: int, threads: int) -> tuple[list[str], dict]:
    import torch

    from ft_assets.models.base_model import load_model, load_tokenizer

    torch.set_num_threads(threads)
    answers, counts, wall = plain_generate(load_model(merged_dir), load_tokenizer(merged_dir), examples, max_new_tokens)
    generated = sum(counts)
    return answers, {"generated_tokens": generated, "generate_wall_s": round(wall, 2),
                     "tokens_per_s_wall": round(generated / wall, 1)}


def llama_cpp_answers(gguf: Path, prompts: list[str], max_new_tokens: int, threads: int) -> tuple[list[str], dict]:
    from ft_assets.publish.gguf import llama_cpp_generate

    runs = [llama_cpp_generate(gguf, p, max_new_tokens, threads=threads) for p in prompts]
    generated = sum(r.generated_tokens for r in runs)  # measured: equals transformers' count (EOS included)
    wall = sum(r.wall_s for r in runs)
    eval_rates = [r.tokens_per_s for r in runs if r.tokens_per_s > 0]
    return [r.text for r in runs], {"generated_tokens": generated, "process_wall_s": round(wall, 2),
                                     "tokens_per_s_wall": round(generated / wall, 1),
                                     "tokens_per_s_eval": round(sum(eval_rates) / max(1, len(eval_rates)), 1)}


def score(answers: list[str], examples) -> float:
    from ft_assets.evaluation.qa_metrics import score_answers

    return score_answers(answers, [ex.answer for ex in examples]).means["token_f1"]


def run(args) -> dict:
    from ft_assets.data import sft_dataset

    home = Path(os.environ.get("FT_HOME") or tempfile.mkdtemp(prefix="gguf-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")  # with --reuse: those of the existing gguf_model
    load_start = [round(x, 1) for x in os.getloadavg()]
    arts = reuse(home, args.method) if args.reuse else materialize(Path(args.recipe).resolve(), args.method, types,
                                                                     home, args.max_steps)
    recipe, merged, gguf = arts["recipe"], arts["merged"].dir, arts["gguf"].dir
    examples = sft_dataset.load_split(arts["dataset"].dir, "eval")[: args.max_examples]
    max_new = recipe.evaluation.max_new_tokens
    from ft_assets.models.base_model import load_tokenizer

    tok = load_tokenizer(merged)
    prompts = [tok.decode(ex.input_ids[: ex.prompt_len]) for ex in examples]
    hf, hf_speed = transformers_answers(merged, examples, max_new, args.threads)
    rows = [{"model": "merged safetensors (transformers, float32)", "type": "safetensors",
             "bytes": sum(p.stat().st_size for p in merged.glob("*.safetensors")), "token_f1": score(hf, examples),
             "same_answer_as_transformers": 1.0, **hf_speed}]
    gfacts = arts["gguf"].manifest()["gguf"]
    for kind in types:
        answers, speed = llama_cpp_answers(gguf / gfacts["files"][kind], prompts, max_new, args.threads)
        rows.append({"model": f"GGUF {kind} (llama.cpp)", "type": kind, "bytes": gfacts["bytes"][kind],
                     "token_f1": score(answers, examples),
                     "same_answer_as_transformers": round(sum(a == b for a, b in zip(answers, hf)) / len(hf), 3),
                     "export_s": gfacts["seconds"][kind], **speed})
    import torch
    import transformers

    train = arts["adapter"].manifest().get("train", {})
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({cpu_name()})",
        "threads": args.threads, "load_avg_start": load_start, "load_avg_end": [round(x, 1) for x in os.getloadavg()],
        "recipe": str(args.recipe), "method": args.method, "training_steps": train.get("steps"),
        "held_out_examples": len(examples), "max_new_tokens": max_new, "converter": gfacts["converter"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "pipeline_s": arts["pipeline_s"], "rows": rows,
        "command": "python -m ft_assets.bench.gguf_export " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v is not False),
    }


def markdown(res: dict) -> str:
    out = [f"# GGUF export: merged safetensors vs GGUF types (CPU)", "",
           f"- date: {res['date']}; machine: {res['machine']}; threads {res['threads']} for both runtimes; "
           f"load average at start {res['load_avg_start']}, end {res['load_avg_end']}",
           f"- model: SmolLM2-135M-Instruct (bundled), recipe `{res['recipe']}`, method {res['method']} "
           f"({res['training_steps']} training steps); {res['held_out_examples']} held-out rows, greedy, "
           f"max {res['max_new_tokens']} new tokens",
           f"- converter: {res['converter']}; {', '.join(f'{k} {v}' for k, v in res['versions'].items())}",
           f"- command: `{res['command']}`", "",
           "| model | size on disk | token F1 | same answer as transformers | generated tokens | tok/s (wall, incl. prompt) | tok/s (llama.cpp eval only) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        out.append(f"| {r['model']} | {r['bytes'] / 2**20:.1f} MiB | {r['token_f1']:.3f} | "
                   f"{100 * r['same_answer_as_transformers']:.0f} % | {r['generated_tokens']} | {r['tokens_per_s_wall']} | "
                   f"{r.get('tokens_per_s_eval', '-')} |")
    out += ["", "tok/s (wall): generated tokens / wall time of generation, prompt processing included; for llama.cpp "
            "the wall time of each llama-completion process (model load included), for transformers the "
            "`generate` calls on an already loaded model. tok/s (eval only): llama.cpp's own decode rate."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "ft_assets" / "recipes" / "default.yaml"))
    ap.add_argument("--method", default=None, help="a method of the recipe (default: its first)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--max-examples", type=int, default=1000)
    ap.add_argument("--max-steps", type=int, default=0, help="override training.max_steps (0: the recipe's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="measure the artifacts already in FT_HOME (no training)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.method = args.method or next(iter(yaml.safe_load(Path(args.recipe).read_text())["methods"]))
    res = run(args)
    write_results(res, args.out, f"gguf_export_cpu_{res['date'][:10]}", markdown(res))


if __name__ == "__main__":
    main()
