"""Preference tuning: an SFT adapter continued on preference pairs with one of TRL's preference
trainers, the objective its method type names (one module each beside this one):

    dpo.py    DPO: -log sigmoid(beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]),
              ref = the SFT adapter, frozen (TRL's "ref" copy of it: no second model is loaded)
    orpo.py   ORPO: NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)); no reference
    simpo.py  SimPO: -log sigmoid(beta * (mean log pi(chosen) - mean log pi(rejected)) - gamma); no reference
    kto.py    KTO: labelled answers (desirable / undesirable), against the reference: an unpaired set's
              (schema `unpaired`) as they are, or each pair as two

The model handed to the trainer is a PeftModel whose "default" adapter is the SFT adapter loaded
trainable; only "default" is saved, so the result loads and merges like the LoRA it started from.
The data are in-memory `datasets.Dataset`s of our chat-rendered text; each objective checks that
TRL re-tokenizes them to our ids. Checkpoints, exact resume and signals: `trainers.trl_common`.

The metrics are ours (`sequence_logps`, `preference_metrics`), so they mean the same thing for the
base, SFT and tuned models whatever the objective: log-probability accuracy (pi(chosen) >
pi(rejected)) for any model, and against the SFT reference, the implicit reward r = beta * (log pi -
log ref) (DPO's): reward accuracy (r_chosen > r_rejected) and the mean reward margin. Held-out
labelled answers (an unpaired set) have no chosen/rejected to compare, so they get
`labelled_metrics` instead: the mean log-probability per token of desirable and of undesirable
answers for any model, and against the reference the mean implicit reward of each (KTO's
rewards/chosen and rewards/rejected), their margin, and the share of answers the tuned model moved
the way their label says (r > 0 desirable, r < 0 undesirable). No Dagster here.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...data.rows import IGNORE_INDEX, Example, dataset_info, tokenizer_fingerprint
from ...models.base_model import load_model, load_tokenizer, parameter_count
from ...models.device import Compute
from ...data.preferences import LabelledAnswer, PreferencePair, is_unpaired, load_pairs
from ...config.training import TrainingSpec
from ...training import checkpoint
from ...training.distributed import SINGLE, Ranks
from ...training.steps import steps_for
from ...training.loop import peak_memory_bytes, reset_peak_memory, seed_everything
from ...training.packing import collate
from .. import trl_common
from . import dpo, kto, orpo, simpo
from .objective import Objective
from ..request import JsonRequest

OBJECTIVES: dict[str, Objective] = {o.key: o for o in (dpo.OBJECTIVE, orpo.OBJECTIVE, simpo.OBJECTIVE, kto.OBJECTIVE)}


@dataclass
class PreferenceResult(trl_common.TrainedRun):
    reward_accuracies: list[tuple[int, float]] = field(default_factory=list)  # logged by dpo, orpo, simpo
    reward_margins: list[tuple[int, float]] = field(default_factory=list)
    kl: list[tuple[int, float]] = field(default_factory=list)  # logged by kto
    answers_seen: int | None = None  # an unpaired set: the labelled answers trained on (it has no pairs_seen)

    @property
    def unpaired(self) -> bool:
        """Trained on an unpaired set's labelled answers (kto), not on pairs."""
        return self.answers_seen is not None

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        resumed = out.pop("resumed_from_step")  # last, as before
        if self.unpaired:  # answers_seen in pairs_seen's place
            out = {k: v for k, v in out.items() if k != "pairs_seen"} | {"answers_seen": self.answers_seen}
        return {**out,
                "final_train_reward_accuracy": self.reward_accuracies[-1][1] if self.reward_accuracies else None,
                "final_train_reward_margin": self.reward_margins[-1][1] if self.reward_margins else None,
                "resumed_from_step": resumed}

    def train_log(self, objective: Objective) -> dict[str, Any]:
        """train_log.json: the loss and the objective's curves by step (not how the run went)."""
        return {"losses": self.losses, **{c.field: getattr(self, c.field) for c in objective.curves},
                "steps": self.steps}


def preference_steps(n_pairs: int, training: TrainingSpec, objective: Objective, unpaired: bool = False,
                     world_size: int = 1) -> int:
    """Optimizer steps over `n_pairs` (`unpaired`: labelled answers): the SFT rule
    (`training.steps.steps_for`) over the rows the objective trains on (a pair, two labelled
    answers, or one labelled answer of an unpaired set), `world_size` processes sharing each step."""
    return steps_for(n_pairs * (1 if unpaired else objective.rows_per_pair), training, world_size)


@dataclass
class PreferenceTuning:
    """What `tune_sft_adapter` made: the model (its "default" adapter is the tuned one) and the run."""

    model: Any
    result: PreferenceResult
    pairs: int = 0  # the training pairs (an unpaired set: labelled answers)
    objective: str = "dpo"

    def save(self, out_dir: Path, ranks: Ranks = SINGLE) -> None:
        """The tuned adapter and train_log.json, by rank 0."""
        if ranks.is_main:
            save_adapter(self.model, out_dir)
            write_train_log(self.result, self.objective, out_dir)

    def report(self) -> dict[str, Any]:
        """What rank 0 reports to the Dagster step (`TrainedElsewhere.from_report`)."""
        return {"result": asdict(self.result), "pairs": self.pairs, "objective": self.objective}


@dataclass
class TrainedElsewhere:
    """A preference run torchrun's ranks made (`ft_assets.jobs.train`): the files rank 0 saved in
    `staged` and what it reported; stored by `write_preference_adapter` like a `PreferenceTuning`."""

    staged: Path
    result: PreferenceResult
    pairs: int
    objective: str

    @classmethod
    def from_report(cls, staged: Path, message: dict[str, Any]) -> "TrainedElsewhere":
        return cls(staged, PreferenceResult.from_dict(message["result"]), message["pairs"], message["objective"])

    def save(self, out_dir: Path) -> None:
        checkpoint.move_files(self.staged, out_dir)


@dataclass
class PreferenceRequest(JsonRequest):
    """One preference-tuning run as plain values: what `run` needs, built once by `defs.preferences`."""

    method: str  # the recipe's method name
    objective: str  # its type: a key of OBJECTIVES
    base_dir: str
    sft_adapter_dir: str  # the adapter it continues (and, for dpo and kto, its frozen reference)
    preference_dataset_dir: str  # its train pairs (or labelled answers)
    training: dict[str, Any]  # `recipe.training_for(method)`, a TrainingSpec as JSON
    seed: int
    settings: dict[str, Any]  # the objective's recipe keys (`spec.trainer_settings()`), e.g. beta, loss_type
    max_length: int | None
    checkpoint_dir: str


def run(request: PreferenceRequest, hw: Compute, *, ranks: Ranks = SINGLE, log: Callable[[str], None] = print,
        on_log: Callable[..., None] | None = None,
        on_checkpoint: Callable[[Path], None] | None = None) -> PreferenceTuning:
    """Preference tuning as `request` says, on `hw`, as this process's place among `ranks`,
    resuming from its checkpoints."""
    training = TrainingSpec.model_validate(request.training)
    objective = OBJECTIVES[request.objective]
    tokenizer = load_tokenizer(request.base_dir)
    pairs = load_train_pairs(request.preference_dataset_dir, tokenizer)
    settings = ", ".join(f"{k} {v}" for k, v in request.settings.items())
    unpaired = is_unpaired(pairs)
    log(f"{objective.name} on {len(pairs)} {'labelled answers' if unpaired else 'pairs'}, "
        f"{preference_steps(len(pairs), training, objective, unpaired, ranks.world_size)} steps, {settings}, "
        f"on {hw.device}{f' x {ranks.world_size} processes' if ranks.distributed else ''}")
    tuned = tune_sft_adapter(
        Path(request.base_dir), Path(request.sft_adapter_dir), tokenizer, pairs, training, objective=request.objective,
        settings=request.settings, seed=request.seed, max_length=request.max_length, device=ranks.device(hw.device),
        dtype=hw.dtype, checkpoint_dir=Path(request.checkpoint_dir), on_log=on_log, on_checkpoint=on_checkpoint,
        ranks=ranks)
    if tuned.result.resumed_from_step:
        log(f"resumed from checkpoint at step {tuned.result.resumed_from_step}")
    tuned.pairs, tuned.objective = len(pairs), request.objective
    return tuned


def load_train_pairs(dataset_dir: str, tokenizer) -> list[PreferencePair] | list[LabelledAnswer]:
    """The training pairs (or labelled answers) of a preference_dataset, refused when they were
    tokenized by another tokenizer."""
    if tokenizer_fingerprint(tokenizer) != dataset_info(dataset_dir)["tokenizer_fingerprint"]:
        from ..sft import TrainingFailed

        raise TrainingFailed("preference_dataset was built with a different tokenizer than base_model has now; "
                             "re-materialize preference_dataset")
    return load_pairs(dataset_dir, "train")


def tune_sft_adapter(base_dir: Path, sft_adapter_dir: Path, tokenizer, pairs: list[PreferencePair],
                     training: TrainingSpec, *, objective: str, settings: dict[str, Any], seed: int,
                     max_length: int | None, device: str, dtype: torch.dtype, checkpoint_dir: Path | None = None,
                     on_log: Callable[[int, float], None] | None = None,
                     on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE) -> PreferenceTuning:
    """Load base + the SFT adapter (trainable) and continue it with `objective` on `pairs`,
    checkpointing into and resuming from `checkpoint_dir` (`train_preferences`). Raises
    `TrainingDiverged` when the loss is not finite, `sft.TrainingFailed` (with the recipe keys to
    change) when out of memory, `Preempted` on SIGTERM/SIGINT, `CheckpointBusy` when another
    process trains into `checkpoint_dir`."""
    from peft import PeftModel

    seed_everything(seed)
    reset_peak_memory(device)
    model = PeftModel.from_pretrained(load_model(base_dir, device, dtype), sft_adapter_dir, is_trainable=True)
    trainable, total = parameter_count(model)
    result = train_preferences(model, tokenizer, pairs, training, objective=objective, settings=settings,
                               seed=seed, max_length=max_length, device=device, checkpoint_dir=checkpoint_dir,
                               on_log=on_log, on_checkpoint=on_checkpoint, ranks=ranks)
    result.trainable_parameters, result.total_parameters = trainable, total
    result.peak_memory_bytes = peak_memory_bytes(device)
    return PreferenceTuning(model, result, objective=objective)


def train_preferences(
    model, tokenizer, pairs: list[PreferencePair], training: TrainingSpec, *, objective: str,
    settings: dict[str, Any], seed: int, max_length: int | None = None, device: str = "cpu",
    checkpoint_dir: Path | None = None, on_log: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None, ranks: Ranks = SINGLE,
) -> PreferenceResult:
    """Continue `model` (a PeftModel, SFT adapter trainable as "default") with `objective` on
    `pairs` (or an unpaired set's labelled answers, for an objective that takes them), in place:
    `trl_common.train` (checkpoints in `checkpoint_dir`, exact resume, signals; DDP over `ranks`)."""
    if not trl_common.is_peft(model):
        raise TypeError("preference tuning continues a peft adapter: pass a PeftModel loaded with is_trainable=True")
    obj = OBJECTIVES[objective]
    unpaired = is_unpaired(pairs)
    if unpaired and not obj.unpaired:
        raise ValueError(f"{obj.name} trains on pairs, and preference_dataset holds unpaired labelled answers "
                         f"(schema unpaired); only {', '.join(k for k, o in OBJECTIVES.items() if o.unpaired)} "
                         "trains on those")
    steps = preference_steps(len(pairs), training, obj, unpaired, ranks.world_size)
    result = PreferenceResult()
    rows = obj.rows(pairs, random.Random(seed))

    def build(out: Path, callback):
        args = trl_common.trainer_args(training, seed, steps, out, checkpoint_dir is not None, device)
        return obj.build(model, tokenizer, rows, args, settings, max_length, callback)

    trl_common.train(model, build, what=obj.name, training=training, device=device, steps=steps, result=result,
                     curves=obj.curves, checkpoint_dir=checkpoint_dir,
                     check=lambda trainer: obj.check_tokenization(trainer.train_dataset, rows),
                     on_log=on_log, on_checkpoint=on_checkpoint, ranks=ranks)
    result.steps = steps
    rows_seen = steps * training.batch_size * training.grad_accum * ranks.world_size
    if unpaired:
        result.answers_seen = rows_seen
    else:
        result.pairs_seen = rows_seen // obj.rows_per_pair
    return result


def save_adapter(model, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True, selected_adapters=["default"])


def write_preference_adapter(store, name: str, tuned: PreferenceTuning | TrainedElsewhere, *, inputs: dict[str, str],
                             derivation: dict[str, Any], facts: dict[str, Any], **manifest: Any):
    """`tuned` stored as `preference_adapter[name]` under `derivation` (an `ArtifactStore`), with
    its train log; `facts` go to the manifest's extra keys, `manifest` (recipe_hash, code_version,
    seed) to the store write. Returns the Artifact."""
    with store.write("preference_adapter", name, derivation=derivation, **manifest) as st:
        st.inputs = inputs
        tuned.save(st.path)
        st.extra.update(facts)
    return st.artifact


def write_train_log(result: PreferenceResult, objective: str, out_dir: Path) -> None:
    log = result.train_log(OBJECTIVES[objective])
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


def _as_example(pair: PreferencePair | LabelledAnswer, answer_ids: list[int]) -> Example:
    ids = pair.prompt_ids + answer_ids
    return Example(pair.id, pair.prompt, None, "", pair.line, pair.task, ids,
                   [IGNORE_INDEX] * len(pair.prompt_ids) + answer_ids)


@torch.inference_mode()
def answer_logps(model, rows: list[Example], pad_id: int, device: str = "cpu", batch_size: int = 8) -> list[float]:
    """Sum of log pi(answer token | prefix) over each row's labelled tokens (the answer, incl. end-of-turn)."""
    model.eval()
    sums: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i: i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits = logits[:, -batch["input_ids"].size(1):]  # prompt-learning peft prepends virtual tokens
        targets = batch["labels"][:, 1:]
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        mask = targets != IGNORE_INDEX
        tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums += (tok * mask).sum(dim=1).tolist()
    return sums


def sequence_logps(model, pairs: list[PreferencePair], pad_id: int, device: str = "cpu",
                   batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Sum of log pi(answer token | prefix) over each answer (incl. end-of-turn): (chosen, rejected)."""
    return tuple(answer_logps(model, [_as_example(p, getattr(p, which)) for p in pairs], pad_id, device, batch_size)
                 for which in ("chosen_ids", "rejected_ids"))


def labelled_logps(model, answers: list[LabelledAnswer], pad_id: int, device: str = "cpu") -> list[float]:
    """Sum of log pi(answer token | prefix) over each labelled answer (incl. end-of-turn)."""
    return answer_logps(model, [_as_example(a, a.completion_ids) for a in answers], pad_id, device)


def preference_metrics(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]] | None = None,
                       beta: float = 0.1) -> dict[str, float]:
    chosen, rejected = policy
    n = len(chosen)
    m = {
        "pairs": n,
        "logp_accuracy": round(sum(c > r for c, r in zip(chosen, rejected)) / n, 4),
        "logp_margin": round(sum(c - r for c, r in zip(chosen, rejected)) / n, 4),
    }
    if reference is not None:
        rc = [beta * (c - c0) for c, c0 in zip(chosen, reference[0])]
        rr = [beta * (r - r0) for r, r0 in zip(rejected, reference[1])]
        m.update({
            "reward_accuracy": round(sum(a > b for a, b in zip(rc, rr)) / n, 4),
            "reward_margin": round(sum(a - b for a, b in zip(rc, rr)) / n, 4),
            "reward_chosen": round(sum(rc) / n, 4),
            "reward_rejected": round(sum(rr) / n, 4),
        })
    return m


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def labelled_metrics(policy: list[float], answers: list[LabelledAnswer], reference: list[float] | None = None,
                     beta: float = 0.1) -> dict[str, Any]:
    """Labelled answers' scores (`policy`: `answer_logps` of each): the mean log-probability per
    token of the desirable and of the undesirable ones (answers to different prompts differ in
    length) and their gap; against `reference`, the mean implicit reward r = beta * (log pi - log
    ref) of each, their margin, and `reward_sign_accuracy`, the share of answers with r > 0 when
    desirable and r < 0 when not. A mean over no answers (a split with one label only) is None."""
    good = [a.label for a in answers]
    per_token = [lp / max(1, len(a.completion_ids)) for lp, a in zip(policy, answers)]
    m: dict[str, Any] = {
        "answers": len(answers), "desirable": sum(good), "undesirable": len(answers) - sum(good),
        "logp_desirable": _mean([x for x, g in zip(per_token, good) if g]),
        "logp_undesirable": _mean([x for x, g in zip(per_token, good) if not g]),
    }
    m["logp_margin"] = _gap(m["logp_desirable"], m["logp_undesirable"])
    if reference is not None:
        r = [beta * (p - p0) for p, p0 in zip(policy, reference)]
        m["reward_desirable"] = _mean([x for x, g in zip(r, good) if g])
        m["reward_undesirable"] = _mean([x for x, g in zip(r, good) if not g])
        m["reward_margin"] = _gap(m["reward_desirable"], m["reward_undesirable"])
        m["reward_sign_accuracy"] = round(sum((x > 0) if g else (x < 0) for x, g in zip(r, good)) / len(r), 4)
    return m


def evaluate_preferences(tuned, reference, base, pairs: list[PreferencePair] | list[LabelledAnswer], *, key: str,
                         beta: float, pad_id: int, device: str = "cpu") -> dict[str, Any]:
    """Held-out pairs scored the same way for three models: log-prob accuracy of the base, the SFT
    reference and the tuned model (under `key`, its method type), and the tuned model's implicit
    rewards (DPO's, with `beta`) against the reference. Held-out labelled answers (an unpaired
    set) get `labelled_metrics` instead, and `form: unpaired`."""
    if is_unpaired(pairs):
        ref = labelled_logps(reference, pairs, pad_id, device)
        return {
            "form": "unpaired", "answers": len(pairs), "beta": beta,
            "base": labelled_metrics(labelled_logps(base, pairs, pad_id, device), pairs),
            "sft": labelled_metrics(ref, pairs),
            key: labelled_metrics(labelled_logps(tuned, pairs, pad_id, device), pairs, ref, beta),
        }
    ref = sequence_logps(reference, pairs, pad_id, device)
    return {
        "pairs": len(pairs), "beta": beta,
        "base": preference_metrics(sequence_logps(base, pairs, pad_id, device)),
        "sft": preference_metrics(ref),
        key: preference_metrics(sequence_logps(tuned, pairs, pad_id, device), ref, beta),
    }
