"""What the torchrun launcher costs on one machine: the same training job in one plain process
and under torchrun with 1 and 2 processes (DDP, gloo on CPU / nccl on CUDA).

Each configuration runs `ft_assets.jobs.train` on the same spec: LoRA r16 all-linear on a
random-init model of a real configuration (default SmolLM2-135M's) with the shipped tokenizer,
`data/finqa.jsonl` formatted by the default recipe, the same global batch (8 rows per optimizer
step: 8 in one process, 4 on each of 2), the same steps. Reported per configuration: the training
loop's useful tokens/s (the job's own TrainResult: after model load, before save), the whole
command's wall time (interpreter and torchrun start, loading, training, saving), the final loss
(identical work, so it must agree), and threads per process.

On this project's 2-core CPU machine torchrun gives each process one thread (OMP_NUM_THREADS=1),
while the plain process uses both cores: the rows measure the launcher's and the all-reduce's
overhead, not scaling. On N GPUs the command the results file names is the one to run.

    python -m ft_assets.bench.scale_out [--steps 20] [--random-init smollm2-135m]

Results: ft_assets/bench/results/scale_out_<device>_<date>.{json,md}. Imports no Dagster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ft_assets.bench.train_throughput import RANDOM_INIT, device_slug
from ft_assets.jobs.train import TrainJob
from ft_assets.trainers.sft import SftRequest

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
GLOBAL_BATCH = 8
CONFIGS = (  # label, processes (0: a plain process, no torchrun)
    ("one process (python -m ft_assets.jobs.train)", 0),
    ("torchrun, 1 process", 1),
    ("torchrun, 2 processes (DDP)", 2),
)


def prepare(work: Path, random_init: str) -> tuple[Path, Path, int]:
    """(base model dir, sft_dataset dir, pad id) in `work`: a random-init model of a real
    configuration with the shipped tokenizer, and data/finqa.jsonl as the default recipe formats it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ft_assets.bench.train_throughput import load_tokenizer
    from ft_assets.data import rows as data
    from ft_assets.data.sft_dataset import build_sft_dataset, save_dataset
    from ft_assets.config.recipe import load_recipe

    tok = load_tokenizer(argparse.Namespace(tokenizer_dir=None, base_dir=None))
    recipe = load_recipe(REPO / "ft_assets" / "recipes" / "default.yaml")
    ds = recipe.datasets[0]
    source = data.SourceSpec(ds.name, recipe.dataset_path(ds), ds.format, ds.columns.model_dump(), ds.eval_fraction,
                             recipe.split_seed(ds), 1.0)
    built = build_sft_dataset([source], tok, system=recipe.prompt.system, template=recipe.prompt.template,
                              template_without_context=recipe.prompt.template_without_context,
                              max_length=recipe.prompt.max_length, work_dir=work / "build")
    save_dataset(built, work / "sft", {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok)})
    cfg = LlamaConfig(**RANDOM_INIT[random_init], bos_token_id=1, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(work / "base", safe_serialization=True)
    tok.save_pretrained(work / "base")
    return work / "base", work / "sft", tok.pad_token_id


def spec(work: Path, label: str, base: Path, sft: Path, pad_id: int, steps: int, processes: int) -> Path:
    run = work / label
    request = SftRequest(
        method="lora", method_spec={"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        training={"max_steps": steps, "epochs": 100.0, "batch_size": GLOBAL_BATCH // max(processes, 1), "lr": 1e-4,
                  "warmup_ratio": 0.0, "lr_scheduler": "constant", "checkpoint_every": 10**6}, seed=42,
        sft_dataset_dir=str(sft), base_dir=str(base), pad_id=pad_id, checkpoint_dir=str(run / "ckpt"))
    job = TrainJob(request.to_json(), out_dir=str(run / "trained"), run_dir=str(run / "ranks"), device="auto")
    (run / "ranks").mkdir(parents=True)
    return job.write(run / "job.json")


def command(spec_path: Path, processes: int) -> list[str]:
    if processes == 0:
        return [sys.executable, "-m", "ft_assets.jobs.train", str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "ft_assets.jobs.train", str(spec_path)]


def run(spec_path: Path, processes: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    t0 = time.perf_counter()
    proc = subprocess.run(command(spec_path, processes), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command(spec_path, processes))} failed:\n{proc.stderr[-3000:]}")
    result = json.loads((spec_path.parent / "ranks" / "result.json").read_text())["result"]
    threads = 1 if processes else (os.cpu_count() or 1)
    return {"processes": max(processes, 1), "torchrun": bool(processes), "threads_per_process": threads,
            "tokens_per_s": round(result["tokens_seen"] / result["wall_s"], 1), "train_wall_s": round(result["wall_s"], 2),
            "command_wall_s": round(wall, 2), "steps": result["steps"], "tokens_seen": result["tokens_seen"],
            "final_loss": result["losses"][-1][1]}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# torchrun launcher overhead, {meta['device']} ({meta['date']})", "",
             f"LoRA r16 all-linear on random-init {meta['model']} (fp32), data/finqa.jsonl, global batch "
             f"{GLOBAL_BATCH} rows, {meta['steps']} steps, the same spec for every row (`{meta['script']}`).", "",
             "| configuration | processes x threads | tokens/s (training loop) | train s | whole command s | final loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['processes']} x {r['threads_per_process']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_wall_s']} | {r['command_wall_s']} | {r['final_loss']} |")
    lines += ["", meta["note"], "", "On N GPUs of one machine (the recipe: `compute: {launcher: torchrun, nproc_per_node: N}`; "
              "what the asset runs):", "", f"    {meta['gpu_command']}", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--random-init", default="smollm2-135m", choices=sorted(RANDOM_INIT))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        work = Path(tmp)
        base, sft, pad_id = prepare(work, args.random_init)
        for i, (label, processes) in enumerate(CONFIGS):
            path = spec(work, f"run{i}", base, sft, pad_id, args.steps, processes)
            rows.append({"label": label, **run(path, processes)})
            print(json.dumps(rows[-1]), flush=True)
    losses = {r["final_loss"] for r in rows}
    meta = {
        "date": dt.date.today().isoformat(), "device": device_slug(), "model": args.random_init, "steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "script": "python -m ft_assets.bench.scale_out",
        "note": (f"Final losses {'agree' if max(losses) - min(losses) < 1e-3 else 'DIFFER'} across configurations "
                 f"({', '.join(str(l) for l in sorted(losses))}): the same rows per step, so the same training. "
                 "On CPU, torchrun's processes get one thread each (OMP_NUM_THREADS=1) and this machine has "
                 f"{os.cpu_count()} cores: the rows measure launch and all-reduce overhead, not scaling."),
        "gpu_command": "python -m torch.distributed.run --standalone --nproc-per-node=N -m ft_assets.jobs.train SPEC.json",
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"scale_out_{meta['device']}_{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
