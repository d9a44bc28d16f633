"""`base_eval`, `eval_report[method]`, `leaderboard`.

- `base_eval`: the untuned base model on the held-out split (the baseline every method is
  compared with; computed once, not once per method).
- `leaderboard`: every method's latest report on one table (Parquet, CSV, JSON, chart), with
  the base model as a row; says which methods have no report yet.
- `eval_report[method]`: the tuned model (merged when the method can merge, else base +
  adapter) on the same split: exact match, token F1, ROUGE-L, eval loss, perplexity, and a
  per-example table. Writes `metrics.json` as {"base": {...}, "tuned": {...}} and the
  predictions table (`predictions.jsonl`, `.parquet`, `.csv`). Check `beats_base` warns when
  tuned token F1 is not above base.

  Beyond SFT, when they apply:
  - several tasks in the eval split: `per_task` in metrics.json ({task: {"base", "tuned"}}),
    `per_task.parquet` and a per-task metadata table;
  - a preference method (dpo, orpo, simpo, kto) d: the tuned model is `preference_adapter[d]`, and `preference_metrics.json`
    scores the held-out pairs of `preference_dataset[d]` (log-prob accuracy of base, SFT and tuned
    models; DPO reward accuracy and margin against the SFT adapter; held-out labelled answers of an
    unpaired set: desirable vs undesirable log-probs and implicit rewards). That SFT adapter is a declared
    input: the `adapter` input maps adapter[sft_from] to partition d as well as adapter[m] to m, so
    partition d reads the reference policy and the UI draws that edge;
  - an adapter that continued from a previous version (`continue_from`): `forgetting` in
    metrics.json: the previous adapter and the new one on the *previous* sft_dataset's eval
    split (before/after and the drop).

The recipe's evaluators (`evaluation.evaluators`, `evaluation/evaluators/`) score the same answers
for the base and each tuned model: their `<name>.<score>` join the scores in metrics.json (and
the step's metadata, with an `evaluator_scores` table of base vs tuned), their per-example columns
go to `evaluators.parquet`, their tables and raw output beside it. The files they read are hashed
into both steps' code versions (`evaluation_code_version`); a recipe without evaluators keeps the
code versions, files and metrics it always had. `champion[m]` (`defs/champion.py`) reads the report.

Tables are pandas DataFrames built in core (`evaluation.tables`); each asset shows previews as table
metadata and describes its own table (predictions; the leaderboard) with `dagster/column_schema`
and `dagster/row_count`.
"""


import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg

from ..evaluation import plots, report, tables
from ..trainers import preference as tuning
from ..data import preferences
from ..models.base_model import load_model, load_tokenizer
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, ArtifactStore, dir_bytes
from ..data.sft_dataset import load_split
from . import _common as c
from .adapters import adapter_partitions, methods_partitions
from .preferences import pairs_ins, pairs_of, preference_mapping, sft_sources
from .resources import ComputeResource, StoreResource, all_partitions

METRIC_KEYS = report.METRIC_KEYS
PREF_COLUMNS = ["model", "logp_accuracy", "logp_margin", "reward_accuracy", "reward_margin"]
# held-out labelled answers (schema unpaired): no pairs to compare (`trainers.preference.labelled_metrics`)
LABELLED_COLUMNS = ["model", "logp_desirable", "logp_undesirable", "logp_margin", "reward_desirable",
                    "reward_undesirable", "reward_margin", "reward_sign_accuracy"]
TABLE_COLUMNS = ["id", "question", "reference", "prediction", "exact_match", "token_f1", "rouge_l"]


def scoring(recipe: Recipe) -> report.Scoring:
    """The recipe's evaluators with their files resolved against the recipe root."""
    return report.Scoring([(spec, spec.files(recipe.resolve_path, f"evaluation.evaluators[{i}]"))
                           for i, spec in enumerate(recipe.evaluation.evaluators)], recipe.prompt.system)


def evaluation_code_version(stage: str, recipe: Recipe) -> str:
    """The stage's code version over the `evaluation` section, plus the content of the files its
    evaluators read (a metric module, task configs): editing one re-evaluates. Without evaluators
    it is the code version it always was."""
    cv = c.code_version(stage, recipe, "evaluation")
    files = [f for _, fs in scoring(recipe).evaluators for f in fs]
    return f"{cv}-{files_hash(files)}" if files else cv


def files_hash(paths: list[Path]) -> str:
    """sha256 over the files (a directory: every file under it, by relative path), first 8 hex digits."""
    h = hashlib.sha256()
    for path in paths:
        if not path.exists():
            raise c.user_error(FileNotFoundError(f"{path}: named by evaluation.evaluators but not found; fix the path"))
        for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(f"{f.relative_to(path.parent)}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()[:8]


def build(recipe: Recipe) -> list:
    return [_base_eval_asset(recipe), _eval_report_asset(recipe), _leaderboard_asset(recipe)]


# --------------------------------------------------------------------------------------
# base_eval
# --------------------------------------------------------------------------------------


def _base_eval_asset(recipe: Recipe) -> dg.AssetsDefinition:
    cv = evaluation_code_version("base_eval", recipe)

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "evaluation"), kinds={"json", "parquet"}, code_version=cv, pool="gpu",
              ins=c.ins(recipe, "base_model", "sft_dataset"))
    def base_eval(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                  base_model: Artifact, sft_dataset: Artifact) -> dg.Output:
        """The untuned base model on the held-out split (the baseline for every method)."""
        art, result = _evaluate_base(recipe, cv, compute, store, base_model, sft_dataset)
        return c.output(art, _base_eval_metadata(result, recipe.evaluation.preview_rows))

    return base_eval


def _evaluate_base(recipe: Recipe, cv: str, compute: ComputeResource, store: StoreResource,
                   base_model: Artifact, sft_dataset: Artifact) -> tuple[Artifact, dict]:
    """(the written base_eval artifact, the evaluation result)."""
    hw = compute.resolve()
    tok = load_tokenizer(base_model.path)
    examples = c.eval_examples(recipe, sft_dataset)
    ev = recipe.evaluation
    result = report.evaluate_base(load_model(base_model.path, hw.device), base_model.dir, tok, examples, scoring(recipe),
                                  max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, device=hw.device)
    with store.store(recipe.pipeline).write("base_eval", recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed) as st:
        st.inputs = c.inputs_of(base_model, sft_dataset)
        report.save_base(result, st.path)
    return st.artifact, result


def _base_eval_metadata(result: dict, preview_rows: int) -> dict:
    per_task = result["metrics"].get("per_task")
    extra = {"per_task": c.frame_table(tables.per_task_frame(per_task))} if per_task else {}
    predictions = tables.predictions_frame(result["rows"])
    return {
        **extra,
        **{k: result["metrics"][k] for k in METRIC_KEYS},
        "examples": result["metrics"]["examples"],
        "predictions": c.frame_table(predictions, preview_rows),
        **c.table_facts(predictions),
        **eval_speed(result["timing"]),
        **{k: v for k, v in result["metrics"].items() if "." in k},  # the evaluators' `<name>.<score>`
    }


def eval_speed(timing: dict) -> dict:
    """How fast the held-out questions were answered (generation only; the loss pass apart)."""
    return {"eval_questions_per_s": timing["questions_per_s"], "eval_generated_tokens_per_s": timing["generated_tokens_per_s"],
            "eval_generated_tokens": timing["generated_tokens"], "eval_generate_s": timing["generate_s"]}


# --------------------------------------------------------------------------------------
# eval_report[method]
# --------------------------------------------------------------------------------------


def _eval_report_asset(recipe: Recipe) -> dg.AssetsDefinition:
    parts = methods_partitions(recipe)
    cv = evaluation_code_version("eval_report", recipe)

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "evaluation"), kinds={"json", "parquet"}, code_version=cv, partitions_def=parts, pool="gpu",
              ins=_eval_report_ins(recipe),
              check_specs=[dg.AssetCheckSpec("beats_base", asset=c.key(recipe, "eval_report"), partitions_def=parts,
                                             description="tuned token F1 above the base model's (warning)")])
    def eval_report(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource, **inputs):
        """Base vs tuned on the held-out split: EM, token F1, ROUGE-L, loss, perplexity, per-example table."""
        art, made = _evaluate_report(context, recipe, cv, compute, store, inputs)
        yield c.output(art, _report_metadata(context.partition_key, made, recipe.evaluation.preview_rows))
        yield _beats_base(made)

    return eval_report


def _eval_report_ins(recipe: Recipe) -> dict[str, dg.AssetIn]:
    """Partition m reads adapter[m]; a preference partition d reads preference_adapter[d] (what it evaluates),
    preference_dataset[d] (held-out pairs) and adapter[sft_from] (the reference policy)."""
    adapter_map = {m: {m} for m in adapter_partitions(recipe).get_partition_keys()}
    for sft, continuing in sft_sources(recipe).items():
        adapter_map[sft] |= set(continuing)
    adapter_in = c.asset_in(recipe, partition_mapping=dg.StaticPartitionMapping(adapter_map) if recipe.preference_methods()
                            else None)  # identity: lets the automation run a partition's chain in one run
    ins = {"merged_model": c.asset_in(recipe), "adapter": adapter_in,
           **{k: c.asset_in(recipe) for k in ("base_model", "sft_dataset", "base_eval")},
           **({"quantized_base": c.asset_in(recipe)} if recipe.quantization.method != "none" else {})}
    if recipe.preference_methods():
        ins["preference_adapter"] = c.asset_in(recipe, partition_mapping=preference_mapping(recipe))
        ins.update(pairs_ins(recipe, recipe.preference_methods()))
    return ins


def _evaluate_report(context, recipe: Recipe, cv: str, compute: ComputeResource, store: StoreResource,
                     inputs: dict[str, Artifact]) -> tuple[Artifact, report.TunedReport]:
    """(the written eval_report artifact, the report): the tuned model of this partition against the
    base on the held-out split, with preference metrics and forgetting where they apply."""
    name = context.partition_key
    tuned_by_preferences = inputs.get("preference_adapter")
    trained = tuned_by_preferences or inputs["adapter"]
    reference = inputs["adapter"] if tuned_by_preferences else None
    merged_model, base_eval = inputs["merged_model"], inputs["base_eval"]
    prefs = pairs_of(inputs) if tuned_by_preferences else None
    hw = compute.resolve()
    artifacts = store.store(recipe.pipeline)
    trained_manifest = trained.manifest()
    preference = _preference_inputs(name, trained_manifest, reference, prefs) if prefs is not None else None
    forgetting = forgetting_inputs(artifacts, trained_manifest, recipe.evaluation.max_examples)
    examples = c.eval_examples(recipe, inputs["sft_dataset"])
    made = _evaluate_tuned(recipe, name, hw.device, inputs, trained, examples, preference, forgetting)
    with artifacts.write("eval_report", name, recipe_hash=recipe.recipe_hash, code_version=cv,
                         seed=recipe.seed) as st:
        st.inputs = c.inputs_of(merged_model, trained, inputs["sft_dataset"], base_eval, reference, prefs)
        made.save(st.path)
        if forgetting is not None:
            st.extra["forgetting"] = {"previous_adapter": forgetting.previous_adapter,
                                      "previous_sft_dataset": forgetting.previous_sft_dataset}
        # what the leaderboard shows beside the scores, so it reads only reports
        st.extra["adapter"] = {"asset": c.key_of(trained), "version": trained.version,
                               "train": trained_manifest.get("train", {}), "bytes": dir_bytes(trained.dir)}
    return st.artifact, made


def _evaluate_tuned(recipe: Recipe, name: str, device: str, inputs: dict[str, Artifact], trained: Artifact,
                    examples: list, preference: report.PreferenceEval | None,
                    forgetting: report.ForgettingEval | None) -> report.TunedReport:
    """The tuned model (merged when mergeable, else base + adapter; on the quantized base when there
    is one) and the base scores of `base_eval`, on the held-out split."""
    merged_model, base_model, quantized_base = inputs["merged_model"], inputs["base_model"], inputs.get("quantized_base")
    tuned_model = report.TunedModel(base_model.dir, trained.dir,
                                    merged_model.dir if merged_model.manifest().get("mergeable") else None,
                                    quantized_base.dir if quantized_base else None)
    ev = recipe.evaluation
    return report.evaluate_tuned(
        recipe.methods[name].type, name, tuned_model, load_tokenizer(base_model.path),
        examples, json.loads((inputs["base_eval"].dir / "metrics.json").read_text()),
        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, device=device,
        preference=preference, forgetting=forgetting, scoring=scoring(recipe))


def _beats_base(made: report.TunedReport) -> dg.AssetCheckResult:
    base, tuned = made.metrics["base"], made.metrics["tuned"]
    return dg.AssetCheckResult(
        check_name="beats_base", passed=tuned["token_f1"] > base["token_f1"],
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"tuned_token_f1": tuned["token_f1"], "base_token_f1": base["token_f1"]},
    )


# --------------------------------------------------------------------------------------
# leaderboard
# --------------------------------------------------------------------------------------


def _leaderboard_asset(recipe: Recipe) -> dg.AssetsDefinition:
    cv = c.code_version("leaderboard", recipe)

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "evaluation"), kinds={"csv", "json", "parquet"}, code_version=cv,
              ins={"eval_report": all_partitions(c.key(recipe, "eval_report")), "base_eval": c.asset_in(recipe)})
    def leaderboard(context: dg.AssetExecutionContext, store: StoreResource, eval_report: dict[str, Artifact],
                    base_eval: Artifact) -> dg.MaterializeResult:
        """Every method's eval_report on one table (plus the base model), as table, chart, CSV and JSON.

        Reads the report versions Dagster recorded (declared inputs); each report carries the facts
        of the adapter it evaluated. Correct with only some partitions materialized: the missing
        ones are listed, not guessed.
        """
        art, board, png = _write_leaderboard(recipe, cv, store, eval_report, base_eval)
        if board.missing:
            context.log.warning(f"leaderboard without {board.missing}: their eval_report is not materialized")
        return dg.MaterializeResult(data_version=dg.DataVersion(art.version), metadata=_leaderboard_metadata(art, board, png))

    return leaderboard


def _write_leaderboard(recipe: Recipe, cv: str, store: StoreResource, eval_report: dict[str, Artifact],
                       base_eval: Artifact) -> tuple[Artifact, report.Leaderboard, bytes]:
    """(the written leaderboard artifact, the board, its chart) from the recorded reports."""
    reports = {name: (json.loads((art.dir / "metrics.json").read_text())["tuned"],
                      art.manifest().get("adapter", {}))  # reports made before this field: no training facts
               for name, art in eval_report.items()}
    board = report.leaderboard({n: m.type for n, m in recipe.methods.items()}, reports,
                               json.loads((base_eval.dir / "metrics.json").read_text()))
    with store.store(recipe.pipeline).write("leaderboard", recipe_hash=recipe.recipe_hash, code_version=cv,
                                            seed=recipe.seed) as st:
        st.inputs = c.inputs_of(base_eval, *(eval_report[n] for n in recipe.methods if n in eval_report))
        png = board.save(st.path)
    return st.artifact, board, png


def _leaderboard_metadata(art: Artifact, board: report.Leaderboard, png: bytes) -> dict:
    table = board.frame()
    return {
        "path": dg.MetadataValue.path(art.path),
        "leaderboard": c.frame_table(table),
        **c.table_facts(table),
        "chart": dg.MetadataValue.md(plots.markdown_image(png, "token F1 by method")),
        "missing_methods": dg.MetadataValue.json(board.missing),
        "methods_ranked": len(board.rows) - 1,
        "best": board.best,
    }


# --------------------------------------------------------------------------------------
# beyond SFT: per-task metrics, preference metrics, forgetting
# --------------------------------------------------------------------------------------


def _preference_inputs(name: str, trained_manifest: dict, reference: Artifact, prefs: Artifact) -> report.PreferenceEval:
    """The held-out pairs and the SFT reference the preference adapter continued (both declared inputs);
    fails when the reference Dagster recorded is not the one this adapter started from."""
    kind = trained_manifest["method"]["type"]
    facts = trained_manifest[kind]
    if facts["sft_adapter"]["version"] != reference.version:
        raise c.user_error(RuntimeError(
            f"preference_adapter[{name}] continued {c.key_of(reference)} {facts['sft_adapter']['version']}, but "
            f"the latest {c.key_of(reference)} is {reference.version}; materialize preference_adapter[{name}] first"))
    return report.PreferenceEval(
        preferences.load_pairs(prefs.path, "eval"), reference.dir, reference.manifest()["method"]["type"], kind,
        tuning.OBJECTIVES[kind].reward_beta(facts), {prefs.asset: prefs.version,  # preference_dataset or generated_preferences
                        "reference": {"adapter": c.key_of(reference), "version": reference.version}})


def _report_metadata(name: str, made: report.TunedReport, preview_rows: int) -> dict:
    m = made.metrics
    base, tuned = m["base"], m["tuned"]
    meta = {}
    if "per_task" in m:
        meta["per_task"] = c.frame_table(made.per_task_frame())
    if made.preferences is not None:
        meta.update(_preference_meta(name, made.preference_key, made.preferences))
    if "forgetting" in m:
        meta.update(_forgetting_meta(m["forgetting"]))
    scored = made.evaluator_frame()
    if scored is not None:
        meta["evaluator_scores"] = c.frame_table(scored)
        meta.update({k: tuned[k] for k in m["higher_is_better"] if k in tuned})
    predictions = made.predictions_frame()
    summary = [{"model": "base", **{k: base[k] for k in METRIC_KEYS}},
               {"model": name, **{k: tuned[k] for k in METRIC_KEYS}}]
    return {
        **meta,
        **{f"tuned_{k}": tuned[k] for k in METRIC_KEYS},
        **{f"base_{k}": base[k] for k in METRIC_KEYS},
        "token_f1_gain": round(tuned["token_f1"] - base["token_f1"], 4),
        "evaluated_as": m["evaluated_as"],
        "summary": c.table(summary, ["model", *METRIC_KEYS]),
        "predictions": c.frame_table(predictions, preview_rows),
        **c.table_facts(predictions),
        **eval_speed(made.timing),
    }


def _preference_meta(name: str, key: str, out: dict) -> dict:
    tuned = out[key]
    rows = [{"model": "base", **out["base"]}, {"model": f"sft ({out['reference']['adapter']})", **out["sft"]},
            {"model": name, **tuned}]
    if out.get("form") == "unpaired":  # labelled answers: no preference accuracy, rewards by label
        return {
            "reward_margin": tuned["reward_margin"],
            "reward_sign_accuracy": tuned["reward_sign_accuracy"],
            f"logp_margin_{key}": tuned["logp_margin"],
            "logp_margin_sft": out["sft"]["logp_margin"],
            "logp_margin_base": out["base"]["logp_margin"],
            "preference_answers": out["answers"],
            "preferences": c.table(rows, LABELLED_COLUMNS),
        }
    return {
        "preference_accuracy": tuned["reward_accuracy"],
        "reward_margin": tuned["reward_margin"],
        f"logp_accuracy_{key}": tuned["logp_accuracy"],
        "logp_accuracy_sft": out["sft"]["logp_accuracy"],
        "logp_accuracy_base": out["base"]["logp_accuracy"],
        "preference_pairs": out["pairs"],
        "preferences": c.table(rows, PREF_COLUMNS),
    }


def _forgetting_meta(f: dict) -> dict:
    rows = [{"model": f"previous adapter {f['previous_adapter']}", **{k: f["before"][k] for k in METRIC_KEYS}},
            {"model": "this adapter", **{k: f["after"][k] for k in METRIC_KEYS}}]
    return {
        "forgetting_token_f1_drop": f["drop"]["token_f1"],
        "forgetting_eval_loss_rise": f["drop"]["eval_loss"],
        "forgetting_previous_adapter": f["previous_adapter"],
        "forgetting_previous_sft_dataset": f["previous_sft_dataset"],
        "forgetting": c.table(rows, ["model", *METRIC_KEYS]),
    }


def forgetting_inputs(store: ArtifactStore, adapter_manifest: dict[str, Any], max_examples: int | None
                      ) -> report.ForgettingEval | None:
    """The previous adapter and the previous data's eval split, when this adapter continued one
    (`continual` in its manifest) and both are still in the store; else None."""
    facts = adapter_manifest.get("continual") or {}
    prev = facts.get("continued_from")
    if not prev or not facts.get("previous_sft_dataset"):
        return None
    old_data = store.get("sft_dataset", None, facts["previous_sft_dataset"])
    prev_art = store.get("adapter", adapter_manifest["partition"], prev["version"])
    if old_data is None or prev_art is None:
        return None
    old_eval = load_split(old_data.path, "eval")
    return report.ForgettingEval(prev_art.dir, prev["version"], old_data.version,
                                 old_eval[:max_examples] if max_examples else old_eval)
