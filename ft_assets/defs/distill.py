"""`student`: knowledge distillation of `merged_model[<teacher>]` into a smaller model.

Reads the recipe's `distillation:` section. The teacher is the merged fine-tuned model of one
method (a Dagster input mapped to that single partition, so only that teacher re-runs it);
the student is the teacher with fewer decoder layers (`keep_layers`) or a local model
(`student_path`). The work is `trainers.distill.distill_student`: it trains the student on the
`sft_dataset` train split with `training.loop`'s loop and the objective
alpha * KL(teacher || student at T) * T^2 + (1 - alpha) * answer-token CE, then measures teacher
and student. This module maps the recipe and inputs to that call, writes through the store and
maps the result to metadata.

Versioned like `adapter`: by its derivation (input versions, stage code version, the recipe's
distillation/training/evaluation/seed sections, and the bytes of `student_path` when one is
given). The same derivation again reuses the existing version and trains nothing; run config
`force: true` retrains into a version of its own. While training, checkpoints go to
$FT_HOME/checkpoints/student/_/<derived version>: a re-run after a crash resumes from the newest
and matches an uninterrupted run; they are deleted once the artifact is written.

Writes the student as a plain transformers checkpoint (+ tokenizer), `distill_report.json`
(teacher vs student: QA metrics on the held-out split, parameters, bytes, greedy tokens/s,
KL to the teacher before/after), `predictions.jsonl` and `train_log.json` (`losses`, `kl`, `ce`
per step). Manifest inputs name the teacher (`merged_model[<teacher>]`), `distill.teacher_adapter`
the adapter version the teacher was merged from, `train` how the run went (timings, resume).
"""

from pathlib import Path
from typing import Any

import dagster as dg

from ..trainers import distill
from ..evaluation import plots
from ..config.recipe import Recipe
from ..artifacts.store import Artifact, content_hash, derived_version
from . import _common as c
from .models import MODEL_BYTES_HEADROOM
from .reports import METRIC_KEYS, TABLE_COLUMNS
from .resources import ComputeResource, StoreResource

SECTIONS = ("distillation", "training", "evaluation", "seed")  # the recipe settings the student depends on
SUMMARY_COLUMNS = ["model", "layers", "parameters", "bytes", "tokens_per_s", *METRIC_KEYS]


def build(recipe: Recipe) -> list:
    spec = recipe.distillation
    if spec is None:
        return []
    teacher = spec.teacher
    cv = c.code_version("student", recipe, *SECTIONS)

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "training"),
        kinds={"pytorch", "safetensors"},
        code_version=cv,
        pool="gpu",
        ins={"merged_model": c.asset_in(recipe, partition_mapping=dg.SpecificPartitionsPartitionMapping([teacher])),
             **c.ins(recipe, "sft_dataset", "base_model")},
        description=f"A smaller student distilled from merged_model[{teacher}]; quality, size and speed vs the teacher.",
    )
    def student(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                config: c.TrainingRun, merged_model: Artifact, sft_dataset: Artifact, base_model: Artifact) -> dg.Output:
        if not merged_model.manifest().get("mergeable"):
            raise c.user_error(RuntimeError(
                f"distillation.teacher {teacher!r} cannot be merged into a plain model; pick a mergeable method"))
        artifacts = store.store(recipe.pipeline)
        student_path = recipe.resolve_path(spec.student_path, "distillation.student_path") if spec.student_path else None
        inputs = c.inputs_of(merged_model, sft_dataset, base_model)
        derivation = c.derivation(inputs, c.code_version("student", recipe), settings_of(recipe, student_path))
        done = c.reuse_or_say_why(context, artifacts, "student", None, derivation, config.force)
        if done is not None:
            return c.output(done, c.reused_metadata(done))

        hw = compute.resolve()
        checkpoints = artifacts.checkpoints("student", None, derived_version(derivation))
        request = distill_request(recipe, merged_model, sft_dataset, base_model, student_path, checkpoints.dir)
        with c.training_failures(context, "student", user_errors=(distill.NotDistillable,)):
            distilled = distill.run(request, hw, log=context.log.info, on_checkpoint=checkpoints.saved)

        merged_from = merged_model.manifest().get("inputs", {})  # a preference-tuned teacher was merged from preference_adapter
        adapter = {"method": teacher, "version": merged_from.get(f"{artifacts.qualified('adapter')}[{teacher}]",
                                                                  merged_from.get(f"{artifacts.qualified('preference_adapter')}[{teacher}]"))}
        with artifacts.write("student", recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                             min_free_bytes=MODEL_BYTES_HEADROOM,
                             derivation=c.forced(derivation, context) if config.force else derivation) as st:
            st.inputs = inputs
            report = distilled.save(st.path, teacher={"method": teacher, "merged_model": merged_model.version,
                                                      "adapter": adapter["version"]})
            st.extra["distill"] = {"teacher": f"merged_model[{teacher}]", "teacher_version": merged_model.version,
                                   "teacher_adapter": adapter, "student": distilled.built, "alpha": spec.alpha,
                                   "temperature": spec.temperature}
            st.extra["train"] = {**distilled.training.summary(), "device": hw.name}
        checkpoints.finished()  # the artifact supersedes its checkpoints
        return c.output(st.artifact, metadata_of(report, distilled, recipe.evaluation.preview_rows, hw.name))

    return [student]


def distill_request(recipe: Recipe, merged_model: Artifact, sft_dataset: Artifact, base_model: Artifact,
                    student_path: Path | None, checkpoint_dir: Path) -> distill.DistillRequest:
    """The one description of the student's run."""
    spec, evaluation = recipe.distillation, recipe.evaluation
    return distill.DistillRequest(
        teacher_dir=str(merged_model.dir), tokenizer_dir=str(base_model.path), sft_dataset_dir=str(sft_dataset.path),
        training=recipe.training_for_distillation().model_dump(mode="json"), seed=recipe.seed,
        keep_layers=spec.keep_layers, alpha=spec.alpha, temperature=spec.temperature,
        checkpoint_dir=str(checkpoint_dir), max_eval_examples=evaluation.max_examples,
        max_new_tokens=evaluation.max_new_tokens, eval_batch_size=evaluation.batch_size,
        speed_prompts=spec.speed_prompts, student_path=str(student_path) if student_path else None)


def settings_of(recipe: Recipe, student_path: Path | None) -> str:
    """The recipe settings part of the derivation; a local student model's bytes count as settings
    (the recipe names only its path, and other weights there make another student)."""
    settings = recipe.section_hash(*SECTIONS)
    return f"{settings} student_path:{content_hash(student_path)}" if student_path else settings


def metadata_of(report: dict[str, Any], distilled: distill.Distilled, preview_rows: int, device: str) -> dict[str, Any]:
    """The report as Dagster metadata: teacher vs student side by side, the training curves."""
    teacher, size, speed, quality = report["teacher"], report["size"], report["speed"], report["quality"]
    run = distilled.training
    summary = [{"model": who + (f" ({teacher['method']})" if who == "teacher" else ""), "layers": size[who]["layers"],
                "parameters": size[who]["parameters"], "bytes": size[who]["bytes"],
                "tokens_per_s": speed[who]["tokens_per_s"], **{k: quality[who][k] for k in METRIC_KEYS}}
               for who in ("teacher", "student")]
    png = plots.loss_curve_png(run.losses, "student: distillation loss")
    return {
        "teacher": f"merged_model[{teacher['method']}] {teacher['merged_model']}",
        "teacher_adapter": f"adapter[{teacher['method']}] {teacher['adapter']}",
        **{f"{who}_{fact}": value for who in ("student", "teacher") for fact, value in (
            ("layers", size[who]["layers"]), ("parameters", size[who]["parameters"]), ("bytes", size[who]["bytes"]),
            ("tokens_per_s", speed[who]["tokens_per_s"]), ("token_f1", quality[who]["token_f1"]))},
        "speedup": report["ratios"]["speedup"],
        "token_f1_retained": report["ratios"]["token_f1_retained"],
        "kl_before": report["kl_to_teacher"]["before"]["kl"],
        "kl_after": report["kl_to_teacher"]["after"]["kl"],
        "summary": c.table(summary, SUMMARY_COLUMNS),
        "loss_curve": dg.MetadataValue.md(plots.markdown_image(png, "distillation loss")),
        "losses": dg.MetadataValue.json([[s, v] for s, v in run.losses]),
        **{term: dg.MetadataValue.json([[s, v] for s, v in curve]) for term, curve in run.terms.items()},  # kl, ce
        "steps": run.steps,
        "resumed_from_step": run.resumed_from_step,
        "wall_time_s": round(run.wall_s, 2),
        "predictions": c.table(distilled.quality["student"]["rows"][:preview_rows], TABLE_COLUMNS),
        "device": device,
    }
