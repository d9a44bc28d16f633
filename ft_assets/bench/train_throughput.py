"""Training throughput, side by side: this project's training core vs TRL's SFTTrainer.

One invocation runs, each in a fresh subprocess (so peak memory is per configuration):

  ours          ft_assets.training.loop: packed micro-batches (per-sample attention, no padding),
                LM head + chunked cross-entropy on the labelled positions only (Liger's fused head on
                CUDA when installed), one flash varlen kernel call for packed rows on CUDA, compile
                only with --compile;
  trl-defaults  SFTTrainer with its defaults (gradient checkpointing on, padded batches, full
                LM head over every position in its fused chunked head on CPU);
  trl-best      SFTTrainer with its best options here: packing (bfd, padding-free), gradient
                checkpointing off, flash-attention on CUDA when installed, Liger only if installed;

on the same model, data (`data/finqa.jsonl` through the default recipe's chat formatting; TRL gets
the same conversations in prompt/completion form, so it masks the prompt), LoRA r16 all-linear
(alpha 32, dropout 0, same seeded init), learning rate (constant, no warmup), optimizer AdamW and
about the same tokens per optimizer step. It reports useful (non-padding) tokens/s over the
measured steps (after warm-up), time per epoch extrapolated from that rate, peak memory (CPU: peak
RSS of the subprocess; CUDA: max allocated) and the eval loss on the held-out rows, computed for
every configuration by the same function (`evaluation.heldout.eval_loss`).

    python -m ft_assets.bench.train_throughput --base-dir .ft_home/artifacts/base_model/_/<version>
    python -m ft_assets.bench.train_throughput --random-init llama3.2-1b --tokenizer-dir <dir>   # GPU

Results: ft_assets/bench/results/train_throughput_<device>_<date>.{json,md}. Importable without
Dagster (it uses the ML rooms and ft_assets.config only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("ours", "trl-defaults", "trl-best")
EXTRA_CONFIGS = ("trl-nogc",)  # TRL's padded path without gradient checkpointing (its fastest on CPU)
RANDOM_INIT = {  # real configurations, random weights (throughput does not depend on the weights)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# --------------------------------------------------------------------------------------
# shared setup (runs in each worker)
# --------------------------------------------------------------------------------------


def device_and_dtypes():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float32, torch.bfloat16  # fp32 master weights, bf16 autocast (as the pipeline)
    return "cpu", torch.float32, None


def load_tokenizer(args):
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer_dir or args.base_dir
    if tok_dir is None:
        from ft_assets.models.base_model import bundled_gguf_path

        gguf = bundled_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.eos_token != "<|im_end|>" and "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"  # SmolLM2 ends a turn with <|im_end|> (see models.base_model.fix_special_tokens)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_data(args, tok):
    """(train, eval) Examples, formatted exactly as the pipeline's sft_dataset, plus the recipe's prompt."""
    from ft_assets.data import rows as data, sft_dataset
    from ft_assets.config.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    ds = recipe.datasets[0]
    path = Path(args.data).resolve() if args.data else recipe.dataset_path(ds)
    source = data.SourceSpec(ds.name, path, ds.format, ds.columns.model_dump(), ds.eval_fraction,
                             recipe.split_seed(ds), 1.0)
    built = sft_dataset.build_sft_dataset(
        [source], tok, system=recipe.prompt.system, template=recipe.prompt.template,
        template_without_context=recipe.prompt.template_without_context, max_length=recipe.prompt.max_length,
    )
    return built.train, built.eval, recipe.prompt


def build_model(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    attn = "sdpa"
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    if args.random_init:
        cfg = LlamaConfig(**RANDOM_INIT[args.random_init], bos_token_id=1, eos_token_id=2, pad_token_id=2)
        cfg._attn_implementation = attn
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if not args.quantize:
            return model.to(device)
        source = tempfile.mkdtemp(prefix="bench-base-")  # bitsandbytes quantizes while loading a checkpoint
        model.save_pretrained(source, safe_serialization=True)
    elif not args.quantize:
        return AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=dtype, use_safetensors=True,
                                                    attn_implementation=attn).to(device)
    else:
        source = args.base_dir
    # QLoRA: the pipeline's own NF4 settings (double quantization, bf16 compute on CUDA)
    from ft_assets.models.quantize import bnb_config, compute_dtype, exact_nf4_kernels

    compute = compute_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb_config("nf4", True, compute), dtype=compute,
                                                 device_map={"": device}, use_safetensors=True, attn_implementation=attn)
    if args.random_init:
        import shutil

        shutil.rmtree(source, ignore_errors=True)  # the float checkpoint was only the quantizer's input
    return exact_nf4_kernels(model)


def with_lora(model):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same adapter init in every configuration
    return get_peft_model(model, LoraConfig(**LORA))


def peak_memory(device) -> dict:
    import torch

    if device == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda max allocated"}
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(ru * (1 if sys.platform == "darwin" else 1024)), "peak_memory_kind": "process peak RSS"}


def flops_per_token(model, seq_len: float) -> float:
    """Training FLOPs per token of LoRA on a frozen base: 2 (forward) + 2 (input gradients) per
    frozen weight, the adapters' own 6 per weight, causal attention scores (the peer's convention)."""
    import torch

    cfg = model.config
    frozen = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * seq_len * 0.5
    return 4 * frozen + 6 * adapters + 3 * attn


def evaluate_loss(model, eval_rows, pad_id, device, autocast_dtype) -> float:
    import torch

    from ft_assets.evaluation.heldout import eval_loss

    with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return eval_loss(model, eval_rows, pad_id, device, batch_size=16)["eval_loss"]


# --------------------------------------------------------------------------------------
# the configurations
# --------------------------------------------------------------------------------------


SEED = 42


def ours_config(args):
    from ft_assets.config.training import TrainingSpec

    return TrainingSpec(max_steps=args.warmup_steps + args.steps, epochs=1000, batch_size=args.batch_size, grad_accum=1,
                        lr=args.lr, warmup_ratio=0.0, lr_scheduler="constant", max_grad_norm=1.0,
                        checkpoint_every=10**9, packing=True, loss="auto", compile=args.compile or None)


def ours_order(args, train_rows):
    """The rows in the order our loop consumes them, step after step (TRL's padded configurations
    read them in this order, so every configuration without packing sees the same rows per step)."""
    from ft_assets.training import loop as T

    return [r for step in T.batches(train_rows, ours_config(args), SEED) for mb in step for r in mb]


def run_ours(args, device, dtype, autocast_dtype, tok, train_rows, eval_rows, prompt) -> dict:
    import torch

    from ft_assets.training import loop as T
    from ft_assets.methods import get_method
    from ft_assets.methods.lora import LoraSpec

    model = with_lora(build_model(args, device, dtype))
    result: dict = {}
    if args.eval_before:
        result["eval_loss_before"] = evaluate_loss(model, eval_rows, tok.pad_token_id, device, autocast_dtype)
    steps = args.warmup_steps + args.steps
    cfg = ours_config(args)
    step_tokens = [sum(len(r.input_ids) for mb in s for r in mb) for s in T.batches(train_rows, cfg, SEED)]
    marks: list[tuple[int, float]] = []
    spec = LoraSpec(type="lora", r=16, alpha=32, dropout=0.0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = T.train(model, get_method("lora"), spec, train_rows, cfg, seed=SEED, pad_id=tok.pad_token_id, device=device,
                  autocast_dtype=autocast_dtype, on_log=lambda step, loss: marks.append((step, _clock(device))))
    (t_start, c_start) = dict(marks)[args.warmup_steps] if args.warmup_steps else (None, None)
    (t_end, c_end) = dict(marks)[steps]
    seconds = t_end - t_start if t_start is not None else res.wall_s
    cpu_seconds = c_end - c_start if c_start is not None else None
    measured = step_tokens[args.warmup_steps: steps]
    from ft_assets.training import packing as P

    result.update(
        settings={"packing": True, "pack_attention": P.attention_mode(model), "loss": "auto (lean head, chunked CE"
                  + (", Liger" if device == "cuda" and _has("liger_kernel") else "") + ")",
                  "compile": bool(cfg.compile), "gradient_checkpointing": False, "batch_size": args.batch_size},
        useful_tokens=sum(measured), seconds=seconds, cpu_seconds=cpu_seconds, steps_measured=len(measured),
        samples_per_step=args.batch_size, losses=[l for _, l in res.losses],
        **peak_memory(device),
    )
    if not args.skip_eval:
        result["eval_loss"] = evaluate_loss(model, eval_rows, tok.pad_token_id, device, autocast_dtype)
    result["flops_per_token"] = flops_per_token(model, sum(len(r.input_ids) for r in train_rows) / len(train_rows))
    return result


def _sync_time(device) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _clock(device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads): on a shared machine the CPU time of a
    single-threaded run is the contention-free measure of work."""
    return _sync_time(device), time.process_time()


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_trl(args, device, dtype, autocast_dtype, tok, train_rows, eval_rows, prompt, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    packed = variant == "trl-best"
    # padded configurations read our step order (same rows per step: comparable eval losses);
    # packing re-orders rows into bins, so that one keeps TRL's own shuffling
    rows = train_rows if packed else ours_order(args, train_rows)
    dataset = Dataset.from_list([trl_conversation(e, prompt) for e in rows])
    model = with_lora(build_model(args, device, dtype))
    steps = args.warmup_steps + args.steps
    common = trl_common_args(args, device, steps, packed)
    extra = trl_variant_args(args, device, train_rows, variant)
    cfg = SFTConfig(**common, **extra)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer, marks = measured_trainer(model, cfg, dataset, tok, device)
    trainer.train()
    result = trl_result(args, device, trainer, model, cfg, extra, marks, steps)
    if not args.skip_eval:
        model = trainer.model
        model.eval()
        result["eval_loss"] = evaluate_loss(model, eval_rows, tok.pad_token_id, device, autocast_dtype)
    return result


def trl_conversation(ex, prompt) -> dict:
    """One row for TRL: the pipeline's prompt messages and the answer as the completion."""
    from ft_assets.data import rows as data

    msgs = data.build_messages(ex, prompt.system, prompt.template, prompt.template_without_context)
    return {"prompt": msgs, "completion": [{"role": "assistant", "content": ex.answer}]}


def trl_common_args(args, device, steps: int, packed: bool) -> dict:
    """SFTConfig arguments of every TRL configuration: the same schedule and optimizer as ours."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), max_steps=steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=42,
        save_strategy="no", report_to="none", dataloader_num_workers=0, logging_steps=10, disable_tqdm=True,
        bf16=device == "cuda", fp16=False, use_cpu=device == "cpu",
        train_sampling_strategy="random" if packed else "sequential",  # data order only, no effect on speed
    )


def trl_variant_args(args, device, train_rows, variant: str) -> dict:
    """SFTConfig arguments that make `variant` (reported as its settings)."""
    if variant == "trl-best":
        # packing (bfd, padding-free) into rows of pack_len tokens; one row per forward and
        # accumulation over about batch_size samples: on sdpa the packed row carries a
        # block-diagonal mask whose cost grows with the square of the row, so short rows are
        # its fastest setting here (a flattened batch of several rows is one longer row)
        mean_len = sum(len(e.input_ids) for e in train_rows) / len(train_rows)
        rows_per_step = max(1, round(args.batch_size * mean_len / args.trl_pack_len))
        # CPU: one packed row per forward, accumulated; CUDA: the step's rows in one forward (as ours),
        # since a GPU is under-filled by one short row and TRL flattens a padding-free batch anyway
        per_forward = rows_per_step if device == "cuda" else 1
        extra = dict(packing=True, max_length=args.trl_pack_len, per_device_train_batch_size=per_forward,
                     gradient_accumulation_steps=rows_per_step // per_forward, gradient_checkpointing=False)
        if _has("liger_kernel"):
            extra["use_liger_kernel"] = True
        return extra
    if variant == "trl-nogc":
        return dict(per_device_train_batch_size=args.batch_size, gradient_checkpointing=False)
    return dict(per_device_train_batch_size=args.batch_size)  # everything else: TRL's defaults


def measured_trainer(model, cfg, dataset, tok, device):
    """(an SFTTrainer that counts the non-padding tokens and the samples it trains on, the marks it
    fills: per optimizer step, (wall s, CPU s, tokens, samples) at the step's end)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    counted = {"tokens": 0, "samples": 0}
    marks: dict[int, tuple[float, float, int, int]] = {}

    class Bench(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                counted["tokens"] += int(inputs["attention_mask"].sum())
                counted["samples"] += int(inputs["attention_mask"].size(0))
            else:  # padding-free: one flattened row, position ids restart per sample
                counted["tokens"] += int(inputs["position_ids"].numel())
                counted["samples"] += int((inputs["position_ids"] == 0).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class Marks(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks[state.global_step] = (*_clock(device), counted["tokens"], counted["samples"])

    return Bench(model=model, args=cfg, train_dataset=dataset, processing_class=tok, callbacks=[Marks()]), marks


def trl_result(args, device, trainer, model, cfg, extra: dict, marks: dict, steps: int) -> dict:
    """The measured steps (after the warm-up) from `marks`, the settings, logged losses and peak memory."""
    t0, c0, tok0, s0 = marks[args.warmup_steps] if args.warmup_steps else (None, None, 0, 0)
    t1, c1, tok1, s1 = marks[steps]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(
        settings={k: v for k, v in extra.items()} | {
            "gradient_checkpointing": cfg.gradient_checkpointing, "padding_free": trainer.padding_free,
            "attn_implementation": model.config._attn_implementation, "bf16": cfg.bf16},
        useful_tokens=tok1 - tok0, seconds=t1 - t0, cpu_seconds=c1 - c0, steps_measured=args.steps,
        samples_per_step=(s1 - s0) / args.steps, logged_losses=losses, **peak_memory(device),
    )


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, autocast_dtype = device_and_dtypes()
    tok = load_tokenizer(args)
    train_rows, eval_rows, prompt = load_data(args, tok)
    if args.eval_rows:
        eval_rows = eval_rows[: args.eval_rows]
    t0 = time.perf_counter()
    if args.worker == "ours":
        out = run_ours(args, device, dtype, autocast_dtype, tok, train_rows, eval_rows, prompt)
    else:
        out = run_trl(args, device, dtype, autocast_dtype, tok, train_rows, eval_rows, prompt, args.worker)
    out.update(config=args.worker, device=device, threads=torch.get_num_threads(), wall_s=round(time.perf_counter() - t0, 1),
               epoch_tokens=sum(len(e.input_ids) for e in train_rows), train_rows=len(train_rows),
               eval_rows=len(eval_rows), load_avg=os.getloadavg())
    Path(args.result).write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------------------------
# the parent: run every configuration in its own process, write the results
# --------------------------------------------------------------------------------------


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "liger-kernel", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor() or "cpu")
    return f"CPU {model}, {os.cpu_count()} cores"


def _shared_note(meta: dict) -> str:
    """Our own run adds a load of about `threads`; more than that means other jobs were running."""
    own = (meta["threads"] or 1) + 0.5
    busy = meta["load_avg_start"][0] > 0.5 or meta["load_avg_end"][0] > own
    return ": the machine was shared" if busy else ": nothing else was running"


def pool(results: list[dict]) -> dict:
    """One row per configuration: the measured steps of every pass added up; eval loss and the
    rest from the pass that evaluated; the per-pass rates kept to show the spread."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    row = dict(next((r for r in ok if "eval_loss" in r), ok[-1]))
    for k in ("useful_tokens", "seconds", "steps_measured"):
        row[k] = sum(r[k] for r in ok)
    row["cpu_seconds"] = sum(r["cpu_seconds"] for r in ok) if all(r.get("cpu_seconds") for r in ok) else None
    row["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in ok)
    row["passes"] = [{"useful_tok_s": round(r["useful_tokens"] / r["seconds"], 2),
                      "useful_tok_per_cpu_s": round(r["useful_tokens"] / r["cpu_seconds"], 2) if r.get("cpu_seconds") else None,
                      "load_avg": r.get("load_avg")} for r in ok]
    return row


def summarize(rows: list[dict], tolerance: float, ceiling_tflops: float | None = None) -> list[dict]:
    by = {r["config"]: r for r in rows if "error" not in r}
    flops = next((r["flops_per_token"] for r in by.values() if r.get("flops_per_token")), None)
    for r in by.values():
        r["useful_tok_s"] = r["useful_tokens"] / r["seconds"]
        r["s_per_step"] = r["seconds"] / r["steps_measured"]
        r["tokens_per_step"] = r["useful_tokens"] / r["steps_measured"]
        r["epoch_s_extrapolated"] = r["epoch_tokens"] / r["useful_tok_s"]
        if r.get("cpu_seconds"):
            r["useful_tok_per_cpu_s"] = r["useful_tokens"] / r["cpu_seconds"]
        if flops and r["device"] == "cuda":  # the same model in every configuration: ours' count for all
            r["model_tflops"] = r["useful_tok_s"] * flops / 1e12
            if ceiling_tflops:
                r["mfu"] = r["model_tflops"] / ceiling_tflops
    trl = [r for n, r in by.items() if n.startswith("trl")]
    if trl:  # the fastest TRL configuration measured, whatever its name
        by["trl-fastest"] = max(trl, key=lambda r: r["useful_tok_s"])
    for ref in ("trl-best", "trl-defaults", "trl-fastest"):
        if ref in by:
            for r in rows:
                if "error" not in r:
                    r[f"speedup_vs_{ref}"] = r["useful_tok_s"] / by[ref]["useful_tok_s"]
                    if r.get("cpu_seconds") and by[ref].get("cpu_seconds"):
                        r[f"cpu_speedup_vs_{ref}"] = r["useful_tok_per_cpu_s"] / by[ref]["useful_tok_per_cpu_s"]
    if "ours" in by:
        for r in by.values():
            d = r["eval_loss"] - by["ours"]["eval_loss"]
            r["eval_loss_delta_vs_ours"] = d
            r["eval_loss_agrees"] = abs(d) <= tolerance * by["ours"]["eval_loss"]
    return rows


def matmul_ceiling_tflops(n: int = 8192, reps: int = 10) -> float:
    """The measured bf16 matmul rate of this GPU (n x n x n products, mean of `reps` after 3
    warm-ups): the denominator of MFU, measured rather than taken from a datasheet."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def device_slug() -> str:
    """The results file's device name: "h200" for an NVIDIA H200, "cpu" without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0).split()[-1].lower().replace("-", "")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = _md_header(meta) + [_md_table_row(r) for r in rows]
    ok = [r for r in rows if "error" not in r]
    ours = next((r for r in ok if r["config"] == "ours"), None)
    lines += _md_fastest_trl(ok, ours)
    lines += _md_passes(ok)
    lines += _md_rates_note(rows)
    lines += _md_settings(rows)
    lines += _md_quality(meta, rows, ok, ours)
    lines += _md_peak_memory(meta, ok, ours)
    lines += _md_device_note(meta, ok)
    return "\n".join(lines) + "\n"


def _md_header(meta: dict) -> list[str]:
    """The title, what was measured and how, and the results table's head."""
    return [
        f"# Training throughput: ft_assets core vs TRL SFTTrainer ({meta['device_kind']})",
        "",
        f"- date: {meta['date']}",
        f"- device: {meta['device']} (torch threads {meta['threads']}; load average at start {meta['load_avg_start']}, "
        f"end {meta['load_avg_end']}{_shared_note(meta)})",
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- model: {meta['model']}{'; NF4 base (QLoRA: double quantization, bf16 compute on CUDA)' if meta.get('quantize') else ''}; "
        f"LoRA r16 alpha 32 all-linear, dropout 0; lr {meta['lr']} constant, AdamW, clip 1.0",
        f"- data: {meta['data']} (default recipe's chat formatting): {meta['train_rows']} train rows, "
        f"{meta['eval_rows']} held-out rows for the eval loss; {meta['epoch_tokens']} tokens per epoch",
        f"- measured: {meta['steps']} optimizer steps per configuration and pass after {meta['warmup_steps']} warm-up step(s), "
        f"{meta.get('repeats', 1)} pass(es) in alternating order, pooled; "
        f"about {meta['batch_size']} samples per step; time per epoch is extrapolated from the measured rate",
        f"- command: `{meta['command']}`",
        "",
        "| configuration | useful tok/s | vs TRL best (packing) | vs TRL defaults | vs fastest TRL | useful tok per CPU-s "
        "| s/step | tokens/step | epoch (extrap.) | peak memory | eval loss | Δ vs ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]


def _md_table_row(r: dict) -> str:
    """One configuration's row of the results table (its error, when it failed)."""
    gib = 2**30
    nan = float("nan")
    if "error" in r:
        return f"| {r['config']} | error: {r['error'][:120]} |||||||||||"
    cpu = f"{r['useful_tok_per_cpu_s']:.0f}" if r.get("useful_tok_per_cpu_s") else "n/a"
    return (f"| {r['config']} | {r['useful_tok_s']:.1f} | {r.get('speedup_vs_trl-best', nan):.2f}x "
            f"| {r.get('speedup_vs_trl-defaults', nan):.2f}x | {r.get('speedup_vs_trl-fastest', nan):.2f}x | {cpu} "
            f"| {r['s_per_step']:.1f} | {r['tokens_per_step']:.0f} | {r['epoch_s_extrapolated'] / 60:.1f} min "
            f"| {r['peak_memory_bytes'] / gib:.2f} GiB | {r['eval_loss']:.4f} | {r.get('eval_loss_delta_vs_ours', 0):+.4f} |")


def _md_fastest_trl(ok: list[dict], ours: dict | None) -> list[str]:
    trl = [r for r in ok if r["config"].startswith("trl")]
    if not (trl and ours):
        return []
    fastest = max(trl, key=lambda r: r["useful_tok_s"])
    cpu_note = ""
    if ours.get("cpu_speedup_vs_trl-fastest"):
        cpu_note = f" (per CPU-second: {ours['cpu_speedup_vs_trl-fastest']:.2f}x)"
    return ["", f"Fastest TRL configuration measured: {fastest['config']}; ours is "
            f"{ours['speedup_vs_trl-fastest']:.2f}x its useful tokens/s{cpu_note}."]


def _md_passes(ok: list[dict]) -> list[str]:
    """Each pass's rates, when there were several passes."""
    if not any(len(r.get("passes", [])) > 1 for r in ok):
        return []
    return ["", "Per pass (useful tok/s wall / per CPU-s): " + "; ".join(
        f"{r['config']} " + ", ".join(f"{p['useful_tok_s']:.1f}/{p['useful_tok_per_cpu_s'] or float('nan'):.0f}"
                                      for p in r["passes"]) for r in ok) + "."]


def _md_rates_note(rows: list[dict]) -> list[str]:
    return ["", "useful tok/s: non-padding input tokens of the measured steps / their wall-clock time. "
            "useful tok per CPU-s: the same tokens / the process CPU time (user + system, all threads) over "
            "those steps; with one thread per configuration on a shared machine this is the rate an idle core "
            "would give, while wall-clock rates move with the other jobs' load (load average per "
            "configuration at its end: " + ", ".join(
                f"{r['config']} {r['load_avg'][0]:.1f}" for r in rows if "load_avg" in r) + ")."]


def _md_settings(rows: list[dict]) -> list[str]:
    lines = ["", "Settings:", ""]
    for r in rows:
        if "settings" in r:
            lines.append(f"- {r['config']}: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()))
    return lines + [""]


def _md_quality(meta: dict, rows: list[dict], ok: list[dict], ours: dict | None) -> list[str]:
    """The eval loss before training, the tolerance, and whether each configuration's eval loss agrees with ours."""
    lines = []
    before = next((r.get("eval_loss_before") for r in rows if r.get("eval_loss_before") is not None), None)
    if before is not None:
        lines.append(f"Eval loss before training (base + zero LoRA update): {before:.4f}.")
    lines.append(f"Quality tolerance: eval losses agree when within {meta['tolerance']:.0%} (relative) of ours. "
                 "trl-defaults and trl-nogc read the training rows in our order (train_sampling_strategy="
                 f"'sequential'), {meta['batch_size']} per step, so their eval loss is directly comparable with ours; "
                 "trl-best packs rows into bins and reads them in its own random order (about as many per step), so "
                 "after a few steps its eval loss also differs by which rows it saw.")
    for r in ok:
        if r["config"] != "ours" and "eval_loss_agrees" in r:
            lines.append(f"- {r['config']}: eval loss {r['eval_loss']:.4f} vs ours {ours['eval_loss']:.4f} "
                         f"({r['eval_loss_delta_vs_ours'] / ours['eval_loss']:+.1%}): "
                         + ("agrees" if r["eval_loss_agrees"] else "outside the tolerance"))
    return lines


def _md_peak_memory(meta: dict, ok: list[dict], ours: dict | None) -> list[str]:
    """Why the peak memories differ: how many tokens each configuration's forward holds at once."""
    if ours is None:
        return []
    trl_best = next((r for r in ok if r["config"] == "trl-best"), None)
    forwards = (f"trl-best runs {trl_best['settings']['gradient_accumulation_steps']} forward(s) of "
                f"{trl_best['settings']['per_device_train_batch_size']} packed row(s) of at most "
                f"{meta.get('trl_pack_len', 512)} tokens, " if trl_best else "")
    return ["", f"Peak memory: ours runs each step's {meta['batch_size']} rows as one packed forward (about "
            f"{ours['tokens_per_step']:,.0f} tokens of activations at once, no gradient checkpointing); "
            f"{forwards}trl-defaults recomputes activations (gradient checkpointing). `grad_accum` or "
            "`gradient_checkpointing` lower ours the same way."]


def _md_device_note(meta: dict, ok: list[dict]) -> list[str]:
    """On a CPU, where the GPU numbers are; on a GPU, the model FLOP utilisation table."""
    if meta["device_kind"] == "cpu":
        return ["", GPU_NOTE]
    if not any("mfu" in r for r in ok):
        return []
    return ["", f"Model FLOP utilisation against the measured bf16 matmul rate of this GPU "
            f"({meta['bf16_matmul_tflops']} TFLOP/s, 8192^3 products): training FLOPs per token = 4 per frozen "
            "weight + 6 per trained weight + causal attention (the peer's convention), the same count for "
            "every configuration.", "", "| configuration | model TFLOP/s | MFU | peak memory per token of step |",
            "|---|---:|---:|---:|"] + [
        f"| {r['config']} | {r['model_tflops']:.1f} | {r['mfu']:.1%} "
        f"| {r['peak_memory_bytes'] / r['tokens_per_step'] / 2**20:.2f} MiB |" for r in ok if "mfu" in r]


GPU_NOTE = """GPU targets are not measured on a CPU (>= 4x TRL best, >= 10x TRL defaults in useful tokens/s,
>= 50 % MFU on Llama-3.2-1B). The GPU measurements are in train_throughput_h200_2026-11-30.md beside
this file; on a GPU, `OUT=/tmp/gpu bash ft_assets/bench/gpu_session.sh` runs the CUDA tests and these
benchmarks (random-init SmolLM2-135M and Llama-3.2-1B configurations; LoRA and QLoRA) in one go.
The peer numbers on an H100 (shared/bench, SmolLM2-135M, 3,000 QA rows, batch 16), useful tokens/s:
TRL defaults 7,471, defaults + Liger 10,721, packing 16,660, packing + Liger 21,486."""


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.rerender:
        saved = json.loads(Path(args.rerender).read_text())
        Path(args.rerender).with_suffix(".md").write_text(markdown(saved["meta"], saved["rows"]))
        return None
    if not args.base_dir and not args.random_init:
        ap.error("pass --base-dir (a saved checkpoint) or --random-init CONFIG")
    if args.worker:
        return worker(args)

    import torch

    command = " ".join([Path(sys.executable).name, "-m", "ft_assets.bench.train_throughput", *(argv or sys.argv[1:])])
    load_start = os.getloadavg()
    passthrough = [a for a in (argv or sys.argv[1:])]
    names = args.configs.split(",")
    passes = run_passes(args, names, passthrough)
    ceiling = round(matmul_ceiling_tflops(), 1) if torch.cuda.is_available() else None
    rows = summarize([pool(passes[n]) for n in names], args.tolerance, ceiling)
    meta = results_meta(args, rows, command, load_start, ceiling)
    write_results(args, meta, rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", help="a saved safetensors checkpoint with its tokenizer (e.g. .ft_home/artifacts/base_model/_/<version>)")
    ap.add_argument("--random-init", choices=sorted(RANDOM_INIT), help="random-init model of a real configuration (GPU runs)")
    ap.add_argument("--tokenizer-dir", help="tokenizer for --random-init (default: --base-dir, else the bundled GGUF's)")
    ap.add_argument("--data", help="SFT data file (default: the recipe's dataset, data/finqa.jsonl)")
    ap.add_argument("--recipe", default=str(REPO / "ft_assets" / "recipes" / "default.yaml"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=4, help="measured optimizer steps per configuration and pass")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--trl-pack-len", type=int, default=512, help="TRL packing row length (max_length)")
    ap.add_argument("--eval-rows", type=int, default=0, help="held-out rows for the eval loss (0: all)")
    ap.add_argument("--no-eval-before", dest="eval_before", action="store_false")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes over the configurations, alternating their order (ABC CBA ...); the measured steps "
                         "of all passes are pooled, the eval loss comes from the last pass (a shared machine's load "
                         "drifts: alternating spreads it over every configuration)")
    ap.add_argument("--skip-eval", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tolerance", type=float, default=0.05, help="relative eval-loss agreement")
    ap.add_argument("--quantize", choices=["nf4"], help="QLoRA: every configuration trains LoRA on an NF4 base")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the decoder layers (training.compile)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--rerender", help="write the markdown again from a results JSON (no runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


def run_passes(args, names: list[str], passthrough: list[str]) -> dict[str, list[dict]]:
    """Each configuration's result (or error) per pass: `args.repeats` passes over `names`, their
    order alternating (ABC CBA ...), each configuration in its own worker process."""
    passes: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            last = rep == args.repeats - 1  # the last pass also evaluates
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                result_path = fh.name
            print(f"== {name} (pass {rep + 1}/{args.repeats})", flush=True)
            t0 = time.perf_counter()
            passes[name].append(run_worker(name, passthrough, result_path, evaluate=last))
            print(f"   {time.perf_counter() - t0:.0f} s: " + json.dumps(
                {k: v for k, v in passes[name][-1].items() if k not in ("losses", "logged_losses")})[:600], flush=True)
    return passes


def run_worker(name: str, passthrough: list[str], result_path: str, evaluate: bool) -> dict:
    """One configuration in a worker process: its result, or {config, error} with the last line of
    its stderr (whose tail goes to ours); `result_path` is removed either way."""
    cmd = [sys.executable, "-m", "ft_assets.bench.train_throughput", *passthrough, "--worker", name,
           "--result", result_path, *([] if evaluate else ["--skip-eval", "--no-eval-before"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        result = {"config": name, "error": err}
        print(proc.stderr[-3000:], file=sys.stderr)
    else:
        result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return result


def results_meta(args, rows: list[dict], command: str, load_start, ceiling: float | None) -> dict:
    """The results' `meta`: the machine, versions, command and settings of the run."""
    import torch

    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "device": device_name(), "device_kind": kind,
        "threads": first.get("threads"), "load_avg_start": [round(x, 1) for x in load_start],
        "load_avg_end": [round(x, 1) for x in os.getloadavg()], "versions": versions(), "command": command,
        "model": args.random_init and f"random-init {args.random_init}" or f"SmolLM2-135M-Instruct (dequantized Q4_1) from {args.base_dir}",
        "data": args.data or "data/finqa.jsonl", "train_rows": first.get("train_rows"), "eval_rows": first.get("eval_rows"),
        "epoch_tokens": first.get("epoch_tokens"), "steps": args.steps, "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size, "lr": args.lr, "tolerance": args.tolerance, "repeats": args.repeats,
        "trl_pack_len": args.trl_pack_len, "quantize": args.quantize, "bf16_matmul_tflops": ceiling,
    }


def write_results(args, meta: dict, rows: list[dict]) -> None:
    """train_throughput_<device>_<date>[_<tag>].{json,md} in `args.out_dir`; the markdown also to stdout."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput_{device_slug()}_{dt.date.today().isoformat()}{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
