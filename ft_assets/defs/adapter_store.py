"""What the `adapter` step reads from and writes to the store besides its declared inputs.

- `training_data`: the `sft_dataset` train split (checked against the base model's tokenizer)
  and, for `continue_from: previous`, the `plan_continual` of where the run starts: the method's
  own previous adapter version and `replay_fraction` of the previous sft_dataset's train split,
  read by exact version (the asset's own history, not an edge of the graph).
- `write_adapter`: `FineTuned.save` (or a `TrainedElsewhere`'s files) into one store write, with
  the manifest's method/train facts and the model card.
The ML stays in `trainers.sft` (no store, no Dagster); this module is the store side of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..artifacts.store import ArtifactStore, derived_version
from ..publish import card
from ..training import continual
from ..data import rows as data
from ..data.sft_dataset import load_split
from ..trainers.sft import ContinualPlan, FineTuned, StaleDataset, TrainedElsewhere, TrainingData
from ..models.base_model import load_tokenizer


def plan_continual(store: ArtifactStore, name: str, spec, sft_dataset_version: str, base_model_version: str,
                   examples: list[data.Example], tokenizer_fingerprint: str, seed: int) -> ContinualPlan:
    """The start `continual.pick_start` chooses from this method's previous versions, and
    `spec.replay_fraction` of the previous sft_dataset's train split when it continues."""
    prev = store.latest("adapter", name)  # the newest version before this run

    def manifest_of(version: str):
        art = store.get("adapter", name, version)
        return (art.manifest(), art.path) if art else None

    start = continual.pick_start(prev.manifest() if prev else None, prev.path if prev else None,
                                 sft_dataset=sft_dataset_version, base_model=base_model_version,
                                 spec=spec.model_dump(mode="json"), manifest_of=manifest_of)
    plan = ContinualPlan(start, notes=[f"{name}: {start.reason}"])
    if start.from_scratch or not spec.replay_fraction or not start.previous_sft_dataset:
        return plan
    old = store.get("sft_dataset", None, start.previous_sft_dataset)
    if old is None:
        plan.notes.append(f"previous sft_dataset {start.previous_sft_dataset} is gone: no replay")
    elif data.dataset_info(old.path).get("tokenizer_fingerprint") != tokenizer_fingerprint:
        plan.notes.append("previous sft_dataset used another tokenizer: no replay")
    else:
        plan.replay = continual.replay_rows(load_split(old.path, "train"), examples, spec.replay_fraction, seed)
        plan.replay_dataset = str(old.path)
        plan.notes.append(f"replaying {len(plan.replay)} rows of sft_dataset {old.version} "
                          f"({spec.replay_fraction:.0%} of its train split)")
    return plan


def training_data(store: ArtifactStore, name: str, spec, sft_dataset_dir: str, sft_dataset_version: str,
                  base_model_dir: str, base_model_version: str, seed: int) -> TrainingData:
    """The train split of `sft_dataset` (checked against the base model's tokenizer) and, for
    `continue_from: previous`, where the run starts and the rows it replays."""
    info = data.dataset_info(sft_dataset_dir)
    tok = load_tokenizer(base_model_dir)
    if data.tokenizer_fingerprint(tok) != info["tokenizer_fingerprint"]:
        raise StaleDataset("sft_dataset was built with a different tokenizer than base_model has now; "
                           "re-materialize sft_dataset")
    plan = None
    if spec.continue_from == "previous":  # replay is drawn against this split; otherwise only the trainer reads it
        plan = plan_continual(store, name, spec, sft_dataset_version, base_model_version,
                              load_split(sft_dataset_dir, "train"), info["tokenizer_fingerprint"], seed)
    return TrainingData(str(sft_dataset_dir), tok.pad_token_id, plan)


def write_adapter(store: ArtifactStore, name: str, tuned: FineTuned | TrainedElsewhere, *, inputs: dict[str, str],
                  derivation: dict[str, Any], facts: dict[str, Any], manifests: tuple[dict, dict],
                  write_card: Callable[[Path, card.Lineage], Any], **manifest: Any):
    """`tuned` stored as `adapter[name]` under `derivation`; `facts` go to the manifest's extra
    keys, `manifests` (base_model's, sft_dataset's) into the card's lineage; `manifest`:
    recipe_hash, code_version, seed for the store write. Returns the Artifact."""
    with store.write("adapter", name, derivation=derivation, **manifest) as st:
        st.inputs = inputs
        tuned.save(st.path)
        st.extra.update(facts)
        lin = card.lineage_from({"asset": "adapter", "partition": name, "version": derived_version(derivation),
                                 "inputs": inputs, **manifest, **st.extra}, *manifests)
        write_card(st.path, lin)
    return st.artifact
