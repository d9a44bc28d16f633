"""The defaults study (issue 17): what `init` writes vs the demo recipe vs TRL's documented defaults.

For each task the project ships, the recipe `python -m ft_assets init DATA_FILE` writes is the
starting point, and every configuration keeps its data handling (columns, prompt, max_length,
eval split, max_new_tokens), so only the training defaults differ:

  init       the recipe as `init` writes it: lora_plus (r 16, ratio 16), 2 epochs, lr 2e-4, cosine,
             10 % of the training rows carved off for validation, best checkpoint kept, early stopping
  init-lora  the same with plain LoRA (r 16, alpha 32): what LoRA+ itself adds
  demo       `ft_assets/recipes/demo.yaml`'s training block and its `lora` method (16 steps, lr 1e-3):
             what a user got by pointing the shipped recipe at their file
  trl        TRL's SFTTrainer with its documented PEFT setup (LoraConfig r 32, alpha 16, dropout 0.05,
             peft's default target modules; SFTConfig learning_rate 2e-4, everything else SFTConfig's
             defaults: batch 8, linear decay, no warmup, gradient checkpointing, completion-only loss)
             at the same 2 epochs, on the same training rows (prompt/completion conversations; for
             `messages` data the last assistant turn is the completion, TRL's prompt/completion form)

Our configurations train through the Dagster graph (base_model, sft_dataset, adapter[m]) with a
throwaway instance; every model, TRL's included, is scored by the function eval_report uses
(`evaluation.heldout.evaluate`: greedy answers on the held-out split, token F1 / exact match / ROUGE-L).
Training time is the training loop's wall time (ours: the adapter's `train.wall_s`, validation
passes included; TRL: `trainer.train()`), and the process CPU time around it (ours: the whole
`adapter` materialization), which moves less when something else shares the machine.

    python -m ft_assets.bench.defaults_study [--tasks finqa,fin_headlines,finchat] [--configs init,demo,trl,init-lora]

Results: ft_assets/bench/results/defaults_study_cpu_<date>.{json,md}; each (task, configuration)
is cached in --work as it finishes, so an interrupted study resumes where it stopped (and
`--resume RESULTS_JSON` takes the runs of a committed results file as done).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# task -> (data file, extra `init` flags: what init asks the user to settle for that file)
TASKS = {
    "finqa": ("data/finqa.jsonl", []),
    "fin_headlines": ("data/fin_headlines.jsonl", ["--context", "headline"]),
    "finchat": ("data/finchat.jsonl", []),
}
CONFIGS = ("init", "init-lora", "demo", "trl")
TRL_LORA = dict(r=32, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
TRL_LR = 2e-4
SCORES = ("token_f1", "exact_match", "rouge_l", "eval_loss")


def init_recipe(task: str, work: Path) -> Path:
    """The recipe `init` writes for the task's file (exactly what a user gets)."""
    from ft_assets.cli import init

    data, flags = TASKS[task]
    out = work / task / "init.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        with open(os.devnull, "w") as sink:
            rc = init.main([str(REPO / data), "-o", str(out), *flags], out=sink, err=sink)
        if rc != 0:
            raise SystemExit(f"init failed for {data} (exit {rc})")
    return out


def variant(init_path: Path, config: str, smoke: int = 0) -> Path:
    """The init recipe with one configuration's training defaults (data handling untouched).
    smoke N: N training steps and N held-out rows (checks the study runs, measures nothing)."""
    raw = yaml.safe_load(init_path.read_text())
    raw["root"] = str((init_path.parent / raw.get("root", ".")).resolve())
    if config == "init-lora":
        lp = raw["methods"]["lora_plus"]
        raw["methods"] = {"lora": {k: lp[k] for k in ("r", "alpha", "dropout")}}
    elif config == "demo":
        demo = yaml.safe_load((REPO / "ft_assets" / "recipes" / "demo.yaml").read_text())
        raw["training"] = demo["training"]
        raw["methods"] = {"lora": demo["methods"]["lora"]}
    if smoke:
        raw["training"]["max_steps"] = smoke
        raw["evaluation"]["max_examples"] = smoke
    out = init_path.parent / config / "recipe.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def train_ours(recipe_path: Path, home: Path, train: bool = True) -> dict:
    """base_model, sft_dataset and (train) adapter[m] through the graph; the artifacts' paths and
    the adapter's facts. train False: the inputs only, reused when the home holds them."""
    import dagster as dg

    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    from ft_assets.artifacts.store import ArtifactStore

    recipe = load_recipe(recipe_path)
    (method,) = recipe.methods
    defs = build_definitions(recipe, home=str(home))
    instance, assets = dg.DagsterInstance.ephemeral(), list(defs.assets)
    store = ArtifactStore(home)
    if train or store.latest("base_model") is None or store.latest("sft_dataset") is None:
        dg.materialize(assets, instance=instance, resources=defs.resources, selection=["base_model", "sft_dataset"])
    made = {"recipe": recipe, "method": method, "type": recipe.methods[method].type,
            "base_dir": store.latest("base_model").path, "dataset_dir": store.latest("sft_dataset").path}
    if train:
        cpu0 = time.process_time()
        dg.materialize(assets, instance=instance, resources=defs.resources, partition_key=method, selection=["adapter"])
        cpu = time.process_time() - cpu0
        adapter = store.latest("adapter", method)
        made.update(adapter_dir=adapter.path, train={**adapter.manifest().get("train", {}), "cpu_s": round(cpu, 1)})
    return made


def score(model, tok, examples, recipe) -> dict:
    from ft_assets.evaluation.heldout import evaluate

    ev = recipe.evaluation
    out = evaluate(model, tok, examples, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, device="cpu")
    return {k: out["metrics"][k] for k in SCORES} | {"examples": out["metrics"]["examples"]}


def trl_conversations(examples, recipe) -> list[dict]:
    from ft_assets.data.rows import build_messages

    ds, p = recipe.datasets[0], recipe.prompt
    rows = []
    for ex in examples:
        msgs = build_messages(ex, p.system, p.template, p.template_without_context, schema=ds.schema)
        if ds.schema == "messages":  # the conversation up to its last reply, which is the completion
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        else:
            rows.append({"prompt": msgs, "completion": [{"role": "assistant", "content": ex.answer}]})
    return rows


def run_trl(ours: dict, smoke: int = 0) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ft_assets.data.sft_dataset import load_split
    from ft_assets.models.base_model import load_model, load_tokenizer

    recipe = ours["recipe"]
    tok = load_tokenizer(ours["base_dir"])
    train_rows = list(load_split(ours["dataset_dir"], "train"))
    dataset = Dataset.from_list(trl_conversations(train_rows, recipe))
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-study-"), num_train_epochs=recipe.training.epochs,
                    learning_rate=TRL_LR, save_strategy="no", report_to="none", logging_steps=10,
                    disable_tqdm=True, use_cpu=True, bf16=False, max_steps=smoke or -1)
    trainer = SFTTrainer(model=load_model(ours["base_dir"]), args=cfg, train_dataset=dataset,
                         processing_class=tok, peft_config=LoraConfig(**TRL_LORA))
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model = trainer.model
    model.eval()
    settings = {"per_device_train_batch_size": cfg.per_device_train_batch_size, "lr_scheduler": str(cfg.lr_scheduler_type),
                "warmup": cfg.warmup_steps, "gradient_checkpointing": cfg.gradient_checkpointing,
                "completion_only_loss": cfg.completion_only_loss, "max_length": cfg.max_length,
                "target_modules": sorted(model.peft_config["default"].target_modules)}
    train = {"steps": trainer.state.global_step, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows": len(train_rows),
             "settings": settings}
    return {"model": model, "tok": tok, "train": train}


def run_config(task: str, config: str, work: Path, smoke: int = 0) -> dict:
    import torch

    from ft_assets.evaluation import merge
    from ft_assets.data.sft_dataset import load_split
    from ft_assets.methods import get_method
    from ft_assets.models.base_model import load_model, load_tokenizer

    torch.manual_seed(0)
    init_path = init_recipe(task, work)
    if config == "trl":  # the base model and data of the init configuration, as they are
        ours = train_ours(variant(init_path, "init", smoke), work / task / "init" / "home", train=False)
    else:
        ours = train_ours(variant(init_path, config, smoke), work / task / config / "home")
    recipe = ours["recipe"]
    examples = list(load_split(ours["dataset_dir"], "eval"))[: recipe.evaluation.max_examples or None]
    tok = load_tokenizer(ours["base_dir"])
    result: dict = {"task": task, "config": config}
    if config == "trl":
        made = run_trl(ours, smoke)
        result["train"] = made["train"]
        result["scores"] = score(made["model"], made["tok"], examples, recipe)
    else:
        model = merge.unmerged(get_method(ours["type"]), Path(ours["base_dir"]), Path(ours["adapter_dir"]), None, "cpu")
        t = ours["train"]
        result["train"] = {k: t.get(k) for k in ("steps", "wall_s", "cpu_s", "kept_step", "stopped_early_at",
                                                 "validation_rows", "tokens_per_s")}
        tr = recipe.training
        result["train"]["settings"] = {"method": ours["method"], "lr": tr.lr, "epochs": tr.epochs,
                                       "max_steps": tr.max_steps, "batch_size": tr.batch_size}
        result["scores"] = score(model, tok, examples, recipe)
        if config == "init":  # the untuned base on the same rows, once per task
            result["base_scores"] = score(load_model(ours["base_dir"]), tok, examples, recipe)
    result["eval_rows"] = len(examples)
    return result


def write_results(results: list[dict], out: Path, command: str) -> Path:
    import torch
    import transformers
    import trl

    out.mkdir(parents=True, exist_ok=True)
    day = dt.date.today().isoformat()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores", "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "command": command}
    (out / f"defaults_study_cpu_{day}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# Defaults study: what `init` writes vs the demo recipe vs TRL's documented defaults (CPU)", "",
        f"- date: {meta['date']}; machine: {meta['machine']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, trl {meta['trl']}",
        "- model: SmolLM2-135M-Instruct (bundled); scores: greedy answers on each task's held-out split "
        "(`evaluation.heldout.evaluate`, as `eval_report`); time: the training loop's wall time",
        f"- command: `{command}`", "",
        "| task | configuration | steps (kept) | train s (wall) | train CPU s | token F1 | exact match | ROUGE-L | eval loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "base_scores" in r:
            b = r["base_scores"]
            lines.append(f"| {r['task']} | base (untuned) | - | - | - | {b['token_f1']:.3f} | {b['exact_match']:.3f} "
                         f"| {b['rouge_l']:.3f} | {b['eval_loss']:.3f} |")
    for r in results:
        s, t = r["scores"], r["train"]
        kept = f" ({t['kept_step']})" if t.get("kept_step") else ""
        cpu = f"{t['cpu_s']:.0f}" if t.get("cpu_s") is not None else "-"
        lines.append(f"| {r['task']} | {r['config']} | {t['steps']}{kept} | {t['wall_s']:.0f} | {cpu} | {s['token_f1']:.3f} "
                     f"| {s['exact_match']:.3f} | {s['rouge_l']:.3f} | {s['eval_loss']:.3f} |")
    loads = [f"{r['task']}/{r['config']} {r['load_avg']['start'][0]} -> {r['load_avg']['end'][0]}"
             for r in results if r.get("load_avg")]
    if loads:
        lines += ["", "Load average (1 min) at the start -> end of each run: " + "; ".join(loads) + "."]
    lines += ["", "Held-out rows per task: " + ", ".join(sorted({f"{r['task']} {r['eval_rows']}" for r in results})),
              "", "Configurations: see the docstring of `ft_assets/bench/defaults_study.py`."]
    md = out / f"defaults_study_cpu_{day}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--configs", default="init,demo,trl,init-lora")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ft_defaults_study"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--smoke", type=int, default=0, help="N steps and N held-out rows: check the study runs")
    ap.add_argument("--resume", help="a results JSON this script wrote: its runs are not run again")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    cache = work / "results.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if args.resume:  # the runs a results file (of an earlier session) holds count as done
        for r in json.loads(Path(args.resume).read_text())["results"]:
            done.setdefault(f"{r['task']}/{r['config']}", r)
    for config in args.configs.split(","):  # every task's run of one configuration before the next one
        for task in args.tasks.split(","):
            key = f"{task}/{config}"
            if key in done:
                continue
            t0, load0 = time.perf_counter(), os.getloadavg()
            done[key] = run_config(task, config, work, args.smoke)
            done[key]["total_s"] = round(time.perf_counter() - t0, 1)
            done[key]["load_avg"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}
            cache.write_text(json.dumps(done, indent=2))
            print(f"{key}: {json.dumps(done[key]['scores'])} train {done[key]['train']['wall_s']} s", flush=True)
    order = [f"{t}/{c}" for t in TASKS for c in CONFIGS]
    results = [done[k] for k in order if k in done]
    cmd = "python -m ft_assets.bench.defaults_study " + " ".join(argv if argv is not None else os.sys.argv[1:])
    print(write_results(results, Path(args.out), cmd.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
