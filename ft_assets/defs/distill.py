"""`student`: knowledge distillation of `merged_model[<teacher>]` into a smaller model.

Reads the recipe's `distillation:` section. The teacher is the merged fine-tuned model of one
method (a Dagster input mapped to that single partition, so only that teacher re-runs it);
the student is the teacher with fewer decoder layers (`keep_layers`) or a local model
(`student_path`). Trained on the `sft_dataset` train split with
alpha * KL(teacher || student at T) * T^2 + (1 - alpha) * answer-token CE (`core.distill`).

Writes the student as a plain transformers checkpoint (+ tokenizer), `distill_report.json`
(teacher vs student: QA metrics on the held-out split, parameters, bytes, greedy tokens/s,
KL to the teacher before/after), `predictions.jsonl` and `train_log.json`. Manifest inputs
name the teacher (`merged_model[<teacher>]`) and, in `distill.teacher_adapter`, the adapter
version the teacher was merged from.
"""


import dagster as dg

from ..core import data, distill, evaluate, plots, train
from ..core.models import check_tokenizer_matches, load_model, load_tokenizer
from ..recipe import Recipe
from ..store import Artifact, dir_bytes
from . import _common as c
from .models import MODEL_BYTES_HEADROOM
from .reports import METRIC_KEYS, TABLE_COLUMNS
from .resources import ComputeResource, StoreResource

SUMMARY_COLUMNS = ["model", "layers", "parameters", "bytes", "tokens_per_s", *METRIC_KEYS]


def build(recipe: Recipe) -> list:
    spec = recipe.distillation
    if spec is None:
        return []
    teacher = spec.teacher
    cv = c.code_version("student", recipe, "distillation", "training", "evaluation", "seed")

    @dg.asset(
        group_name="training",
        kinds={"pytorch", "safetensors"},
        code_version=cv,
        pool="gpu",
        ins={"merged_model": dg.AssetIn(partition_mapping=dg.SpecificPartitionsPartitionMapping([teacher]))},
        description=f"A smaller student distilled from merged_model[{teacher}]; quality, size and speed vs the teacher.",
    )
    def student(context: dg.AssetExecutionContext, compute: ComputeResource, store: StoreResource,
                merged_model: Artifact, sft_dataset: Artifact, base_model: Artifact) -> dg.Output:
        hw = compute.resolve()
        tok = load_tokenizer(base_model.path)
        if not merged_model.manifest().get("mergeable"):
            raise c.user_error(RuntimeError(
                f"distillation.teacher {teacher!r} cannot be merged into a plain model; pick a mergeable method"))
        teacher_model = load_model(merged_model.path, hw.device)
        student_path = recipe.resolve_path(spec.student_path, "distillation.student_path") if spec.student_path else None
        model, facts = distill.build_student(merged_model.dir, spec.keep_layers, hw.device, student_path)
        check_tokenizer_matches(tok, model)
        if model.get_input_embeddings().weight.shape[0] != teacher_model.get_input_embeddings().weight.shape[0]:
            raise c.user_error(RuntimeError("the student's vocabulary differs from the teacher's; "
                                            "distillation needs the same tokenizer"))
        cfg = train.TrainConfig.from_spec(recipe.training_for_distillation(), recipe.seed)
        examples = data.load_split(sft_dataset.path, "train")
        evals = c.eval_examples(recipe, sft_dataset)
        pad, eos = tok.pad_token_id, tok.eos_token_id
        kl_before = distill.kl_to_teacher(model, teacher_model, evals, temperature=spec.temperature, pad_id=pad,
                                          device=hw.device)
        context.log.info(f"student: {facts}; {distill.parameters(model):,} parameters "
                         f"(teacher {distill.parameters(teacher_model):,}); KL before {kl_before}")
        result = distill.distill(
            model, teacher_model, examples, cfg, alpha=spec.alpha, temperature=spec.temperature, pad_id=pad,
            device=hw.device,
            on_log=lambda s, loss, kl, ce: context.log.info(f"step {s}: loss {loss:.4f} (KL {kl:.4f}, CE {ce:.4f})"))
        kl_after = distill.kl_to_teacher(model, teacher_model, evals, temperature=spec.temperature, pad_id=pad,
                                         device=hw.device)
        ev = recipe.evaluation
        quality = {}
        for who, m in (("teacher", teacher_model), ("student", model)):
            quality[who] = evaluate.evaluate(m, tok, evals, max_new_tokens=ev.max_new_tokens,
                                             batch_size=ev.batch_size, device=hw.device)
        timed = evals[: spec.speed_prompts]
        speed = {who: distill.generation_speed(m, timed, new_tokens=ev.max_new_tokens, pad_id=pad, eos_id=eos,
                                               device=hw.device)
                 for who, m in (("teacher", teacher_model), ("student", model))}
        teacher_adapter = merged_model.manifest().get("inputs", {}).get(f"adapter[{teacher}]")
        with store.store().write("student", recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed,
                                 min_free_bytes=MODEL_BYTES_HEADROOM) as st:
            st.inputs = c.inputs_of(merged_model, sft_dataset, base_model)
            model.save_pretrained(st.path, safe_serialization=True)
            tok.save_pretrained(st.path)
            sizes = {"teacher": dir_bytes(merged_model.dir), "student": dir_bytes(st.path)}
            params = {"teacher": distill.parameters(teacher_model), "student": distill.parameters(model)}
            layers = {"teacher": teacher_model.config.num_hidden_layers, "student": model.config.num_hidden_layers}
            report = {
                "teacher": {"method": teacher, "merged_model": merged_model.version, "adapter": teacher_adapter},
                "student": facts,
                "loss": {"alpha": spec.alpha, "temperature": spec.temperature},
                "kl_to_teacher": {"before": kl_before, "after": kl_after},
                "quality": {who: q["metrics"] for who, q in quality.items()},
                "size": {who: {"parameters": params[who], "bytes": sizes[who], "layers": layers[who]}
                         for who in ("teacher", "student")},
                "speed": speed,
                "ratios": {
                    "parameters": round(params["student"] / params["teacher"], 4),
                    "bytes": round(sizes["student"] / sizes["teacher"], 4),
                    "speedup": round(speed["student"]["tokens_per_s"] / speed["teacher"]["tokens_per_s"], 3),
                    "token_f1_retained": round(quality["student"]["metrics"]["token_f1"]
                                               / max(1e-9, quality["teacher"]["metrics"]["token_f1"]), 4),
                },
                "train": result.summary(),
            }
            c.write_json(st.path / "distill_report.json", report)
            c.write_json(st.path / "train_log.json", {"losses": result.losses, "kl": result.kls, "ce": result.ces,
                                                      **result.summary()})
            data.write_jsonl(st.path / "predictions.jsonl", quality["student"]["rows"])
            st.extra["distill"] = {"teacher": f"merged_model[{teacher}]", "teacher_version": merged_model.version,
                                   "teacher_adapter": {"method": teacher, "version": teacher_adapter},
                                   "student": facts, "alpha": spec.alpha, "temperature": spec.temperature}
        art = st.artifact
        summary = []
        for who in ("teacher", "student"):
            q = quality[who]["metrics"]
            summary.append({"model": f"{who}" + (f" ({teacher})" if who == "teacher" else ""),
                            "layers": layers[who], "parameters": params[who], "bytes": sizes[who],
                            "tokens_per_s": speed[who]["tokens_per_s"], **{k: q[k] for k in METRIC_KEYS}})
        png = plots.loss_curve_png(result.losses, "student: distillation loss")
        return c.output(art, {
            "teacher": f"merged_model[{teacher}] {merged_model.version}",
            "teacher_adapter": f"adapter[{teacher}] {teacher_adapter}",
            "student_layers": layers["student"],
            "teacher_layers": layers["teacher"],
            "student_parameters": params["student"],
            "teacher_parameters": params["teacher"],
            "student_bytes": sizes["student"],
            "teacher_bytes": sizes["teacher"],
            "student_tokens_per_s": speed["student"]["tokens_per_s"],
            "teacher_tokens_per_s": speed["teacher"]["tokens_per_s"],
            "speedup": report["ratios"]["speedup"],
            "student_token_f1": quality["student"]["metrics"]["token_f1"],
            "teacher_token_f1": quality["teacher"]["metrics"]["token_f1"],
            "token_f1_retained": report["ratios"]["token_f1_retained"],
            "kl_before": kl_before["kl"],
            "kl_after": kl_after["kl"],
            "summary": c.table(summary, SUMMARY_COLUMNS),
            "loss_curve": dg.MetadataValue.md(plots.markdown_image(png, "distillation loss")),
            "losses": dg.MetadataValue.json([[s_, l] for s_, l in result.losses]),
            "steps": result.steps,
            "wall_time_s": round(result.wall_s, 2),
            "predictions": c.table(quality["student"]["rows"][: recipe.evaluation.preview_rows], TABLE_COLUMNS),
            "device": hw.name,
        })

    return [student]
