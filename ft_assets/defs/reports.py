"""`base_eval`, `eval_report[method]`.

- `base_eval`: the untuned base model on the held-out split (the baseline every method is
  compared with; computed once, not once per method).
- `leaderboard`: every method's latest report on one table (CSV, JSON, chart), with the
  base model as a row; says which methods have no report yet.
- `eval_report[method]`: the tuned model (merged when the method can merge, else base +
  adapter) on the same split: exact match, token F1, ROUGE-L, eval loss, perplexity, and a
  per-example table. Writes `metrics.json` as {"base": {...}, "tuned": {...}} and
  `predictions.jsonl`. Check `beats_base` warns when tuned token F1 is not above base.
"""


import csv
import json

import dagster as dg

from ..core import data, evaluate, merge, plots
from ..core.methods import get_method
from ..core.models import load_model, load_tokenizer
from ..recipe import Recipe
from ..store import Artifact, dir_bytes
from . import _common as c
from .adapters import methods_partitions
from .resources import ComputeResource, StoreResource

METRIC_KEYS = ("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity")
TABLE_COLUMNS = ["id", "question", "reference", "prediction", "exact_match", "token_f1", "rouge_l"]


def _run_eval(recipe: Recipe, model, tok, examples, device: str) -> dict:
    ev = recipe.evaluation
    return evaluate.evaluate(model, tok, examples, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, device=device)


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    quantized = recipe.quantization.method != "none"
    cv_base = c.code_version("base_eval", recipe, "evaluation")
    cv_report = c.code_version("eval_report", recipe, "evaluation")

    @dg.asset(group_name="evaluation", kinds={"json"}, code_version=cv_base, pool="gpu")
    def base_eval(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                  base_model: Artifact, sft_dataset: Artifact) -> dg.Output:
        """The untuned base model on the held-out split (the baseline for every method)."""
        hw = compute.resolve()
        tok = load_tokenizer(base_model.path)
        examples = c.eval_examples(recipe, sft_dataset)
        result = _run_eval(recipe, load_model(base_model.path, hw.device), tok, examples, hw.device)
        with store.store().write("base_eval", recipe_hash=recipe.recipe_hash, code_version=cv_base, seed=recipe.seed) as st:
            st.inputs = c.inputs_of(base_model, sft_dataset)
            c.write_json(st.path / "metrics.json", result["metrics"])
            data.write_jsonl(st.path / "predictions.jsonl", result["rows"])
        return c.output(st.artifact, {
            **{k: result["metrics"][k] for k in METRIC_KEYS},
            "examples": result["metrics"]["examples"],
            "predictions": c.table(result["rows"][: recipe.evaluation.preview_rows], TABLE_COLUMNS),
        })

    def _report(context, compute: ComputeResource, store: StoreResource, merged_model: Artifact, adapter: Artifact,
                base_model: Artifact, quantized_base: Artifact | None, sft_dataset: Artifact, base_eval: Artifact):
        name = context.partition_key
        method = get_method(recipe.methods[name].type)
        hw = compute.resolve()
        tok = load_tokenizer(base_model.path)
        if merged_model.manifest().get("mergeable"):
            model, form = load_model(merged_model.path, hw.device), "merged"
        else:
            q_dir = quantized_base.dir if (quantized_base and method.uses_quantized_base) else None
            model, form = merge.unmerged(method, base_model.dir, adapter.dir, q_dir, hw.device), "adapter"
        examples = c.eval_examples(recipe, sft_dataset)
        result = _run_eval(recipe, model, tok, examples, hw.device)
        base = json.loads((base_eval.dir / "metrics.json").read_text())
        tuned = result["metrics"]
        with store.store().write("eval_report", name, recipe_hash=recipe.recipe_hash, code_version=cv_report,
                                 seed=recipe.seed) as st:
            st.inputs = c.inputs_of(merged_model, adapter, sft_dataset, base_eval)
            c.write_json(st.path / "metrics.json", {"base": base, "tuned": tuned, "evaluated_as": form,
                                                    "method": name})
            data.write_jsonl(st.path / "predictions.jsonl", result["rows"])
        summary = [{"model": "base", **{k: base[k] for k in METRIC_KEYS}},
                   {"model": name, **{k: tuned[k] for k in METRIC_KEYS}}]
        yield c.output(st.artifact, {
            **{f"tuned_{k}": tuned[k] for k in METRIC_KEYS},
            **{f"base_{k}": base[k] for k in METRIC_KEYS},
            "token_f1_gain": round(tuned["token_f1"] - base["token_f1"], 4),
            "evaluated_as": form,
            "summary": c.table(summary, ["model", *METRIC_KEYS]),
            "predictions": c.table(result["rows"][: recipe.evaluation.preview_rows], TABLE_COLUMNS),
        })
        yield dg.AssetCheckResult(
            check_name="beats_base", passed=tuned["token_f1"] > base["token_f1"],
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"tuned_token_f1": tuned["token_f1"], "base_token_f1": base["token_f1"]},
        )

    report_kwargs = dict(
        group_name="evaluation", kinds={"json"}, code_version=cv_report, partitions_def=parts, pool="gpu",
        check_specs=[dg.AssetCheckSpec("beats_base", asset="eval_report", partitions_def=parts,
                                       description="tuned token F1 above the base model's (warning)")],
    )
    if quantized:
        @dg.asset(**report_kwargs)
        def eval_report(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                        merged_model: Artifact, adapter: Artifact, base_model: Artifact, quantized_base: Artifact,
                        sft_dataset: Artifact, base_eval: Artifact):
            """Base vs tuned on the held-out split: EM, token F1, ROUGE-L, loss, perplexity, per-example table."""
            yield from _report(context, compute, store, merged_model, adapter, base_model, quantized_base, sft_dataset, base_eval)
    else:
        @dg.asset(**report_kwargs)
        def eval_report(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                        merged_model: Artifact, adapter: Artifact, base_model: Artifact,
                        sft_dataset: Artifact, base_eval: Artifact):
            """Base vs tuned on the held-out split: EM, token F1, ROUGE-L, loss, perplexity, per-example table."""
            yield from _report(context, compute, store, merged_model, adapter, base_model, None, sft_dataset, base_eval)

    cv_board = c.code_version("leaderboard", recipe)

    @dg.asset(group_name="evaluation", kinds={"csv", "json"}, code_version=cv_board,
              deps=[dg.AssetDep("eval_report"), dg.AssetDep("base_eval")])
    def leaderboard(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        """Every method's latest eval_report on one table (plus the base model), as table, chart, CSV and JSON.

        Correct with only some partitions materialized: the missing ones are listed, not guessed.
        """
        st_ = store.store()
        base_art = st_.latest("base_eval")
        if base_art is None:
            raise c.user_error(RuntimeError("base_eval has not been materialized yet; materialize it first"))
        rows, missing, inputs = [], [], {c.key_of(base_art): base_art.version}
        base = json.loads((base_art.dir / "metrics.json").read_text())
        base_params = None
        for name in recipe.methods:
            report, adapter_art = st_.latest("eval_report", name), st_.latest("adapter", name)
            if report is None or adapter_art is None:
                missing.append(name)
                continue
            inputs[c.key_of(report)] = report.version
            tuned = json.loads((report.dir / "metrics.json").read_text())["tuned"]
            train_facts = adapter_art.manifest().get("train", {})
            base_params = base_params or train_facts.get("total_parameters")
            rows.append(board_row(name, recipe.methods[name].type, tuned, train_facts, dir_bytes(adapter_art.dir)))
        rows.sort(key=lambda r: -r["token_f1"])
        rows.append(board_row("base", "-", base, {}, 0))
        with st_.write("leaderboard", recipe_hash=recipe.recipe_hash, code_version=cv_board, seed=recipe.seed) as st:
            st.inputs = inputs
            c.write_json(st.path / "leaderboard.json", {"rows": rows, "missing": missing})
            with (st.path / "leaderboard.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=BOARD_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            png = plots.bar_chart_png([r["method"] for r in rows], [r["token_f1"] for r in rows],
                                      "token F1 on the held-out split", "token F1")
            (st.path / "leaderboard.png").write_bytes(png)
        art = st.artifact
        if missing:
            context.log.warning(f"leaderboard without {missing}: their eval_report is not materialized")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(art.version),
            metadata={
                "path": dg.MetadataValue.path(art.path),
                "leaderboard": c.table(rows, BOARD_COLUMNS),
                "chart": dg.MetadataValue.md(plots.markdown_image(png, "token F1 by method")),
                "missing_methods": dg.MetadataValue.json(missing),
                "methods_ranked": len(rows) - 1,
                "best": rows[0]["method"] if len(rows) > 1 else "-",
            },
        )

    return [base_eval, eval_report, leaderboard]


BOARD_COLUMNS = ["method", "type", "token_f1", "exact_match", "rouge_l", "eval_loss", "trainable_parameters",
                 "trainable_percent", "adapter_bytes", "train_tokens_per_s", "peak_memory_mib", "wall_time_s"]


def board_row(name: str, type_: str, metrics: dict, train_facts: dict, adapter_bytes: int) -> dict:
    trainable, total = train_facts.get("trainable_parameters"), train_facts.get("total_parameters")
    peak = train_facts.get("peak_memory_bytes")
    return {
        "method": name, "type": type_,
        **{k: metrics[k] for k in ("token_f1", "exact_match", "rouge_l", "eval_loss")},
        "trainable_parameters": trainable,
        "trainable_percent": round(100 * trainable / total, 3) if trainable and total else None,
        "adapter_bytes": adapter_bytes or None,
        "train_tokens_per_s": train_facts.get("tokens_per_s"),
        "peak_memory_mib": round(peak / 2**20) if peak else None,
        "wall_time_s": train_facts.get("wall_s"),
    }
