"""`champion[method]`: the model in use for each method, moved only by a model that passes the gate.

Each new `eval_report[m]` (its declared input) proposes its model. `evaluation.gate.decide`
compares it with the current champion (this asset's own latest record) on the same held-out rows
with the recipe's `evaluation.gate`: when the report scored other rows than the champion's record
(the data changed), the champion's model is scored again on the report's rows first (built-ins
and evaluators, `report.rescore`). The first model is compared with the base (the report's base
scores: same rows). Run config `promote: true` promotes without the gate, and says so.

The artifact is `champion.json`: the champion's model (the versions it is made of), the report that
promoted it, its scores and rows, how it was promoted. Its version is its content hash, so a model
that fails the gate leaves the champion, its version and everything downstream (`gguf_model`,
`chat`) as they were. Check `gate`: passed when promoted; severity `evaluation.gate.on_fail`;
metadata: the gate's table (score, candidate, incumbent, change, required, ok).
"""

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from ..config.recipe import Recipe
from ..evaluation import gate, heldout, report
from ..artifacts.asset_keys import parse_key
from ..artifacts.store import Artifact, ArtifactStore
from ..models.base_model import load_tokenizer
from . import _common as c
from .adapters import methods_partitions
from .reports import evaluation_code_version, scoring
from .resources import ComputeResource, StoreResource

RECORD = "champion.json"


class ChampionRun(dg.Config):
    """Run config of `champion` (the launchpad's `config:` section)."""

    promote: bool = Field(default=False, description="Promote this eval_report's model without the gate "
                                                     "(recorded in champion.json as forced).")


def build(recipe: Recipe) -> list:
    parts = methods_partitions(recipe)
    cv = evaluation_code_version("champion", recipe)

    @dg.asset(key_prefix=c.key_prefix(recipe), group_name=c.group(recipe, "evaluation"), kinds={"json"},
              code_version=cv, partitions_def=parts, pool="gpu", ins=c.ins(recipe, "eval_report"),
              check_specs=[dg.AssetCheckSpec("gate", asset=c.key(recipe, "champion"), partitions_def=parts,
                                             description="the newest eval_report's model passed evaluation.gate")])
    def champion(context: dg.AssetExecutionContext, config: ChampionRun, compute: ComputeResource, store: StoreResource,
                 eval_report: Artifact):
        """The method's model in use: moves to the newest eval_report's model only when it passes the gate."""
        artifacts = store.store(recipe.pipeline)
        candidate = scored_by(recipe, artifacts, eval_report)
        current = artifacts.latest("champion", context.partition_key)
        held = json.loads((current.dir / RECORD).read_text()) if current is not None else None
        decision = _decide(recipe, artifacts, compute, candidate, current, held, config.promote)
        art, record = _record(recipe, cv, artifacts, context, candidate, decision, held, config.promote)
        log = context.log.info if decision.passed or config.promote else context.log.warning
        log(f"champion[{context.partition_key}]: {decision.reason}")
        yield c.output(art, _metadata(record, decision, config.promote))
        yield dg.AssetCheckResult(
            check_name="gate", passed=decision.passed,
            severity=dg.AssetCheckSeverity.ERROR if recipe.evaluation.gate.on_fail == "fail" else dg.AssetCheckSeverity.WARN,
            metadata={"decision": decision.reason, "compared_with": decision.against,
                      "rules": c.table(decision.rows, gate.GATE_COLUMNS)})

    return [champion]


@dataclass(frozen=True)
class Scored:
    """What one eval_report scored: the model (the versions it is made of), the rows, the scores."""

    eval_report: Artifact
    model: dict[str, Any]  # method_type, trained {asset, partition, version}, merged_model, mergeable, base_model, quantized_base
    heldout: dict[str, Any]  # {"sft_dataset": version, "fingerprint": rows_fingerprint}
    scores: dict[str, Any]  # the tuned model's (built-ins and `<evaluator>.<score>`)
    base_scores: dict[str, Any]
    directions: dict[str, bool]


def scored_by(recipe: Recipe, artifacts: ArtifactStore, eval_report: Artifact) -> Scored:
    """The model and rows an eval_report scored, from the input versions its manifest records."""
    name = eval_report.partition
    inputs = {parse_key(k): v for k, v in eval_report.manifest()["inputs"].items()}

    def recorded(asset: str, partition: str | None) -> Artifact:
        version = next((v for (a, p), v in inputs.items() if a.rsplit(".", 1)[-1] == asset and p == partition), None)
        art = artifacts.get(asset, partition, version) if version else None
        if art is None:
            raise c.user_error(RuntimeError(f"eval_report[{name}] {eval_report.version} records no {asset} that is still in "
                                            f"the store; materialize eval_report[{name}] again"))
        return art

    preference = any(a.rsplit(".", 1)[-1] == "preference_adapter" for a, _ in inputs)
    trained = recorded("preference_adapter" if preference else "adapter", name)
    merged, sft = recorded("merged_model", name), recorded("sft_dataset", None)
    made_from = {parse_key(k)[0].rsplit(".", 1)[-1]: v for k, v in _made_from(artifacts, trained).items()}
    metrics = json.loads((eval_report.dir / "metrics.json").read_text())
    model = {"method_type": recipe.methods[name].type,
             "trained": {"asset": trained.asset, "partition": trained.partition, "version": trained.version},
             "merged_model": merged.version, "mergeable": bool(merged.manifest().get("mergeable")),
             "base_model": made_from["base_model"], "quantized_base": made_from.get("quantized_base")}
    rows = {"sft_dataset": sft.version, "fingerprint": heldout.rows_fingerprint(c.eval_examples(recipe, sft))}
    return Scored(eval_report, model, rows, metrics["tuned"], metrics["base"],
                  gate.directions_with_builtins(metrics.get("higher_is_better", {})))


def _made_from(artifacts: ArtifactStore, trained: Artifact) -> dict[str, str]:
    """The inputs of a trained artifact, and of the adapter it continued (a preference adapter's base is its SFT start's)."""
    inputs = dict(trained.manifest().get("inputs", {}))
    if not any(parse_key(k)[0].endswith("base_model") for k in inputs):
        for key, version in list(inputs.items()):
            asset, part = parse_key(key)
            if asset.rsplit(".", 1)[-1] == "adapter":
                start = artifacts.get(asset, part, version)
                inputs.update(start.manifest().get("inputs", {}) if start else {})
    return inputs


def _decide(recipe: Recipe, artifacts: ArtifactStore, compute: ComputeResource, candidate: Scored,
            current: Artifact | None, held: dict[str, Any] | None, forced: bool) -> gate.Decision:
    """The gate's decision on the candidate against the current champion (`current`, its record
    `held`), or, while none holds a model, against the base."""
    name, rule = candidate.eval_report.partition, recipe.evaluation.gate
    if held is None or held["model"] is None:
        return gate.decide(rule, candidate.scores, candidate.base_scores, candidate.directions, "base")
    against = f"champion {current.version} (eval_report {held['eval_report']})"
    if held["heldout"]["fingerprint"] == candidate.heldout["fingerprint"]:
        incumbent = held["scores"]
    elif forced:
        incumbent = {}  # not compared: a forced promotion does not wait for a re-evaluation it ignores
    else:
        incumbent = _rescore(recipe, name, artifacts, compute, held["model"], candidate)
        against += ", scored again on this report's rows"
    return gate.decide(rule, candidate.scores, incumbent, candidate.directions, against)


def _rescore(recipe: Recipe, name: str, artifacts: ArtifactStore, compute: ComputeResource, model: dict[str, Any],
             candidate: Scored) -> dict[str, Any]:
    """The champion's model scored on the candidate's held-out rows."""
    def stored(asset: str, partition: str | None, version: str) -> Artifact:
        return _stored(artifacts, name, asset, partition, version)

    trained = stored(model["trained"]["asset"], model["trained"]["partition"], model["trained"]["version"])
    base = stored("base_model", None, model["base_model"])
    tuned = report.TunedModel(base.dir, trained.dir,
                              stored("merged_model", name, model["merged_model"]).dir if model["mergeable"] else None,
                              stored("quantized_base", None, model["quantized_base"]).dir if model["quantized_base"] else None)
    sft = stored("sft_dataset", None, candidate.heldout["sft_dataset"])
    ev = recipe.evaluation
    return report.rescore(model["method_type"], name, tuned, load_tokenizer(base.path), c.eval_examples(recipe, sft),
                          scoring(recipe), max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                          device=compute.resolve().device)


def _record(recipe: Recipe, cv: str, artifacts: ArtifactStore, context, candidate: Scored, decision: gate.Decision,
            held: dict[str, Any] | None, forced: bool) -> tuple[Artifact, dict[str, Any]]:
    """(the written champion artifact, its record): the candidate's when promoted; else the current record
    `held` again (same content: same version), or, before any model passed, a record of no model."""
    name = context.partition_key
    if decision.passed or forced:
        record = {"eval_report": candidate.eval_report.version, "model": candidate.model, "heldout": candidate.heldout,
                  "scores": candidate.scores,
                  "promoted": {"run_id": context.run_id, "forced": not decision.passed, "against": decision.against}}
    elif held is not None:
        record = held
    else:
        record = {"eval_report": None, "model": None, "reason": "no model has passed the gate yet"}
    with artifacts.write("champion", name, recipe_hash=recipe.recipe_hash, code_version=cv, seed=recipe.seed) as st:
        # the report of the model it holds: `prune` keeps that report and, through its inputs, the model
        st.inputs = {c.key_of(candidate.eval_report): record["eval_report"] or candidate.eval_report.version}
        c.write_json(st.path / RECORD, record)
    return st.artifact, record


def _metadata(record: dict[str, Any], decision: gate.Decision, forced: bool) -> dict[str, Any]:
    model = record["model"]
    trained = model["trained"] if model else None
    return {
        "promoted": decision.passed or forced,
        "forced": forced and not decision.passed,
        "decision": decision.reason,
        "champion_eval_report": record["eval_report"] or "none",
        "champion_trained": f"{trained['asset']}[{trained['partition']}] {trained['version']}" if trained else "none",
        "champion_merged_model": (model["merged_model"] if model["mergeable"] else "not mergeable") if model else "none",
        "gate": c.table(decision.rows, gate.GATE_COLUMNS),
    }


@dataclass(frozen=True)
class ChampionArtifacts:
    """The artifacts a champion's record names (what the export and the model card publish)."""

    eval_report: Artifact
    merged_model: Artifact  # its `mergeable` says whether it holds weights
    trained: Artifact  # adapter[m], or preference_adapter[m]
    base_model: Artifact
    sft_dataset: Artifact


def champion_artifacts(artifacts: ArtifactStore, champion: Artifact) -> ChampionArtifacts | None:
    """The champion's artifacts, by the versions its record names; None while it holds no model."""
    record = json.loads((champion.dir / RECORD).read_text())
    model, name = record["model"], champion.partition
    if model is None:
        return None

    def stored(asset: str, partition: str | None, version: str) -> Artifact:
        return _stored(artifacts, name, asset, partition, version)

    trained = model["trained"]
    return ChampionArtifacts(
        stored("eval_report", name, record["eval_report"]), stored("merged_model", name, model["merged_model"]),
        stored(trained["asset"], trained["partition"], trained["version"]), stored("base_model", None, model["base_model"]),
        stored("sft_dataset", None, record["heldout"]["sft_dataset"]))


def _stored(artifacts: ArtifactStore, name: str, asset: str, partition: str | None, version: str) -> Artifact:
    """A version the champion's record names; a clear error when retention or a hand dropped it."""
    art = artifacts.get(asset, partition, version)
    if art is None:
        raise c.user_error(RuntimeError(
            f"champion[{name}] names {asset} version {version}, which is no longer in the store; retrain, or "
            "promote another model (run config promote: true)"))
    return art
