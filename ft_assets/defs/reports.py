"""`base_eval`, `eval_report[method]`.

- `base_eval`: the untuned base model on the held-out split (the baseline every method is
  compared with; computed once, not once per method).
- `eval_report[method]`: the tuned model (merged when the method can merge, else base +
  adapter) on the same split: exact match, token F1, ROUGE-L, eval loss, perplexity, and a
  per-example table. Writes `metrics.json` as {"base": {...}, "tuned": {...}} and
  `predictions.jsonl`. Check `beats_base` warns when tuned token F1 is not above base.
"""


import json

import dagster as dg

from ..core import data, evaluate, merge
from ..core.methods import get_method
from ..core.models import load_model, load_tokenizer
from ..recipe import Recipe
from ..store import Artifact
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

    return [base_eval, eval_report]
