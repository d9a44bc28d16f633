"""`sft_dataset`: raw files -> validated, chat-formatted, answer-masked train/eval splits.

- reads every dataset file of the recipe (a file that cannot be parsed fails the run with
  file and line; nothing is written);
- validates rows (missing/blank/non-text fields, duplicates, too long): rejected rows are
  counted, written to `rejected.jsonl` beside the artifact, and fail the asset above
  `max_rejected_fraction`;
- streams the rows and tokenizes them in `compute.data_workers` processes into Arrow splits,
  versioned by a hash of their content in row order (`data.sft_dataset`: layout and guarantees);
- renders each row with the base model's chat template (or `prompt.chat_template`) and masks
  labels so only the answer and its end-of-turn token train (`messages`: the assistant turns
  `train_on` selects);
- splits train/eval by a seeded hash of each row's id (stable under edits of other rows);
- with `weight`s on the datasets (tasks), the training split is a seeded mixture in those
  proportions (`data.mixture`); the eval split keeps every task's held-out rows.

Blocking check `trainable`: not empty, no example fully masked, end-of-turn token labelled.
"""


import dagster as dg

from ..data import rows as data
from ..data import sft_dataset as sft
from ..data.chat import ChatTemplateError
from ..data.hfdata import source_version
from ..models.base_model import load_tokenizer
from ..config.recipe import Recipe
from ..artifacts.store import Artifact
from . import _common as c
from .raw import raw_key
from .resources import StoreResource


def build(recipe: Recipe) -> list:
    cv = c.code_version("sft_dataset", recipe, "datasets", "prompt", "seed")

    @dg.asset(
        key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "data"),
        kinds={"arrow"},
        deps=[raw_key(recipe, ds) for ds in recipe.datasets],
        ins=c.ins(recipe, "base_model"),
        code_version=cv,
        check_specs=[dg.AssetCheckSpec("trainable", asset=c.key(recipe, "sft_dataset"), blocking=True,
                                       description="not empty; no example fully masked; end-of-turn labelled")],
    )
    def sft_dataset(context: dg.AssetExecutionContext, store: StoreResource, base_model: Artifact):
        """Validated, chat-formatted, answer-masked train/eval splits of every recipe dataset (Arrow)."""
        tok = load_tokenizer(base_model.path)
        sources = data.sft_sources(recipe)
        try:
            made = sft.write_sft_dataset(
                store.store(recipe.pipeline), sources, tok, system=recipe.prompt.system, template=recipe.prompt.template,
                template_without_context=recipe.prompt.template_without_context,
                max_length=recipe.prompt.max_length, seed=recipe.seed, num_proc=recipe.compute.data_workers,
                inputs={**{f"raw/{s.name}": source_version(s.path) for s in sources}, **c.inputs_of(base_model)},
                recipe_hash=recipe.recipe_hash, code_version=cv, preview_rows=recipe.evaluation.preview_rows,
                chat_template=recipe.chat_template_text())
        except ChatTemplateError as exc:
            raise c.user_error(exc) from None
        except data.DataFileError as exc:
            if exc.rejected:  # no artifact is written, but the user needs the list to fix the file
                report = sft.write_rejection_report(store.store(recipe.pipeline), exc)
                raise c.user_error(exc, f"All {len(exc.rejected)} rejected rows, with reasons: {report}") from None
            raise c.user_error(exc) from None
        for source, rej in made.rejected[:20]:
            context.log.warning(f"rejected {source} line {rej.line}: {rej.reason}")
        yield c.output(made.artifact, sft_dataset_metadata(made))
        yield dg.AssetCheckResult(
            check_name="trainable", passed=not made.problems,
            metadata={"problems": dg.MetadataValue.json(made.problems[:20]), "train_rows": made.stats["train_rows"]},
        )

    return [sft_dataset]


def sft_dataset_metadata(made) -> dict:
    """The materialization's metadata: row counts, token lengths, per-source facts, preview, rejections."""
    stats = made.stats
    rejected = [{"source": s, "line": r.line, "field": r.field, "reason": r.reason} for s, r in made.rejected[:50]]
    extra = {}
    if "mixture" in stats:  # multi-task: what the training split holds of each task
        extra["mixture"] = c.table([{"task": t, **v} for t, v in stats["mixture"]["tasks"].items()],
                                   ["task", "weight", "share", "rows", "unique_rows"])
    return {
        **extra,
        "rows_kept": stats["train_rows"] + stats["eval_rows"], "rows_rejected": stats["rejected_rows"],
        "train_rows": stats["train_rows"], "eval_rows": stats["eval_rows"],
        "token_lengths": dg.MetadataValue.json(stats["tokens"]),
        "trained_tokens_per_epoch": stats["trained_tokens_per_epoch"],
        "per_source": dg.MetadataValue.json(stats["sources"]), "num_proc": made.num_proc,
        "preview": c.table(made.preview, ["id", "task", "question", "answer", "tokens", "answer_tokens"]),
        "rejected": c.table(rejected, ["source", "line", "field", "reason"]),
    }
