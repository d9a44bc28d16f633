"""`sft_dataset`: raw files -> validated, chat-formatted, answer-masked train/eval splits.

- reads every dataset file of the recipe (a file that cannot be parsed fails the run with
  file and line; nothing is written);
- validates rows (missing/blank/non-text fields, duplicates, too long): rejected rows are
  counted, written to `rejected.jsonl` beside the artifact, and fail the asset above
  `max_rejected_fraction`;
- renders each row with the base model's chat template (or `prompt.chat_template`) and masks
  labels so only the answer and its end-of-turn token train (`messages`: the assistant turns
  `train_on` selects);
- splits train/eval by a seeded hash of each row's id (stable under edits of other rows);
- with `weight`s on the datasets (tasks), the training split is a seeded mixture in those
  proportions (`core.mixture`); the eval split keeps every task's held-out rows.

Blocking check `trainable`: not empty, no example fully masked, end-of-turn token labelled.
"""


from dataclasses import asdict

import dagster as dg

from ..core import data
from ..core.chat import ChatTemplateError
from ..core.hfdata import source_version
from ..core.models import load_tokenizer
from ..recipe import Recipe
from ..store import Artifact
from . import _common as c
from .raw import raw_key
from .resources import StoreResource


def check_trainable(examples: list[data.Example], eos_id: int) -> list[str]:
    problems = []
    if not examples:
        problems.append("the training split is empty")
    for ex in examples:
        labelled = [t for t in ex.labels if t != data.IGNORE_INDEX]
        if not labelled:
            problems.append(f"example {ex.id} (line {ex.line}) has no labelled token")
        elif labelled[-1] != eos_id:
            problems.append(f"example {ex.id} (line {ex.line}) does not end its labels with end-of-turn")
    return problems


def build(recipe: Recipe) -> list:
    cv = c.code_version("sft_dataset", recipe, "datasets", "prompt", "seed")

    @dg.asset(
        group_name="data",
        kinds={"jsonl"},
        deps=[raw_key(ds) for ds in recipe.datasets],
        code_version=cv,
        check_specs=[dg.AssetCheckSpec("trainable", asset="sft_dataset", blocking=True,
                                       description="not empty; no example fully masked; end-of-turn labelled")],
    )
    def sft_dataset(context: dg.AssetExecutionContext, store: StoreResource, base_model: Artifact):
        """Validated, chat-formatted, answer-masked train/eval splits of every recipe dataset."""
        tok = load_tokenizer(base_model.path)
        sources = data.sft_sources(recipe)
        try:
            built = data.build_sft_dataset(
                sources, tok, system=recipe.prompt.system, template=recipe.prompt.template,
                template_without_context=recipe.prompt.template_without_context,
                max_length=recipe.prompt.max_length, mixture_seed=recipe.seed,
                chat_template=recipe.chat_template_text(),
            )
        except ChatTemplateError as exc:
            raise c.user_error(exc) from None
        except data.DataFileError as exc:
            if exc.rejected:  # no artifact is written, but the user needs the list to fix the file
                report = store.store().slot("sft_dataset", None) / "rejected_rows.jsonl"
                report.parent.mkdir(parents=True, exist_ok=True)
                data.write_jsonl(report, ({"file": exc.path, **asdict(r)} for r in exc.rejected))
                raise c.user_error(exc, f"All {len(exc.rejected)} rejected rows, with reasons: {report}") from None
            raise c.user_error(exc) from None
        meta = {"tokenizer_fingerprint": data.tokenizer_fingerprint(tok), "max_length": recipe.prompt.max_length,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        with store.store().write("sft_dataset", recipe_hash=recipe.recipe_hash, seed=recipe.seed,
                                 code_version=cv) as st:
            st.inputs = {**{f"raw/{s.name}": source_version(s.path) for s in sources}, **c.inputs_of(base_model)}
            data.save_dataset(built, st.path, meta)
        art = st.artifact
        for source, rej in built.rejected[:20]:
            context.log.warning(f"rejected {source} line {rej.line}: {rej.reason}")
        preview = [{"id": e.id, "task": e.task, "question": e.question, "answer": e.answer,
                    "tokens": len(e.input_ids), "answer_tokens": len(e.input_ids) - e.prompt_len}
                   for e in built.train[: recipe.evaluation.preview_rows]]
        rejected = [{"source": s, "line": r.line, "field": r.field, "reason": r.reason} for s, r in built.rejected[:50]]
        extra = {}
        if "mixture" in built.stats:  # multi-task: what the training split holds of each task
            mix = built.stats["mixture"]["tasks"]
            extra["mixture"] = c.table([{"task": t, **v} for t, v in mix.items()],
                                       ["task", "weight", "share", "rows", "unique_rows"])
        yield c.output(art, {
            **extra,
            "rows_kept": built.stats["train_rows"] + built.stats["eval_rows"],
            "rows_rejected": built.stats["rejected_rows"],
            "train_rows": built.stats["train_rows"],
            "eval_rows": built.stats["eval_rows"],
            "token_lengths": dg.MetadataValue.json(built.stats["tokens"]),
            "trained_tokens_per_epoch": built.stats["trained_tokens_per_epoch"],
            "per_source": dg.MetadataValue.json(built.stats["sources"]),
            "preview": c.table(preview, ["id", "task", "question", "answer", "tokens", "answer_tokens"]),
            "rejected": c.table(rejected, ["source", "line", "field", "reason"]),
        })
        problems = check_trainable(built.train, tok.eos_token_id)
        yield dg.AssetCheckResult(
            check_name="trainable", passed=not problems,
            metadata={"problems": dg.MetadataValue.json(problems[:20]), "train_rows": len(built.train)},
        )

    return [sft_dataset]
