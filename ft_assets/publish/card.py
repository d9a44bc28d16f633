"""Hugging Face model cards (`README.md`) for trained artifacts, and the optional upload.

Contract:
- `card_text(...)` renders a card through `huggingface_hub`'s `ModelCard` / `ModelCardData`
  (YAML front matter: `base_model`, `library_name`, `tags`, `datasets`, `model_name` and, with
  an eval report, `model-index` built from `EvalResult`s), then parses the text back with
  `ModelCard`, so a card that would not load on the Hub fails here. The body states the lineage
  in words, read only from the manifests of the artifacts involved (data file hashes,
  sft_dataset version, base model origin and version, recipe hash, code version, seed), how to
  load the weights (per method: merged/full checkpoints with `AutoModelForCausalLM`, peft
  adapters with `PeftModel.from_pretrained`, QLoRA on the NF4 base, Delta-LoRA / last_layers /
  bottleneck through `ft_assets`), and the metrics or, without a report, that they are pending.
  The text has no timestamps: equal inputs give equal bytes (content-hashed artifacts stay put).
- Why two kinds of card: `adapter` and `merged_model` exist before `eval_report` measures them
  and artifacts are immutable, so their cards carry the lineage and say the metrics are pending.
  The complete card is the `model_card[method]` asset, downstream of `eval_report`: its
  directory is a ready-to-upload repo, the weights it describes (hard links to the
  merged model, or to the adapter when the method cannot merge; copies across file systems) plus
  the card with `model-index` (`link_files` + `card_text`). A downstream asset, not a rewrite of the report, because the card
  depends on four artifacts' versions, and Dagster records exactly which.
- `push(...)` uploads such a directory with `huggingface_hub.upload_folder`, only when asked;
  `check_push` fails before anything is uploaded when the token variable is unset.
Nothing here imports Dagster; `huggingface_hub` is imported inside the functions that use it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

README = "README.md"
BUNDLED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled GGUF is a quantization of
METRIC_NAMES = {  # metrics.json key -> (EvalResult metric_type, the name shown)
    "exact_match": ("exact_match", "Exact match"),
    "token_f1": ("f1", "Token F1"),
    "rouge_l": ("rougeL", "ROUGE-L"),
    "eval_loss": ("loss", "Eval loss (answer tokens)"),
    "perplexity": ("perplexity", "Perplexity"),
}
# files of a merged model / adapter that are not part of the published repo
NOT_PUBLISHED = {"manifest.json", README, "merge_status.json"}


class PushError(RuntimeError):
    """The upload cannot start (no token, no repo id) or failed."""


@dataclass(frozen=True)
class Lineage:
    """Where a trained artifact came from, read from manifests (see `lineage_from`)."""

    method: str
    method_type: str
    base_origin: str  # "gguf:<file>", "hub:<id>" or "local:<path>"
    base_version: str
    sft_dataset_version: str
    data_files: dict[str, str]  # dataset name -> sha256 prefix of the raw file
    adapter_asset: str  # "adapter[lora]" or "preference_adapter[dpo]"
    adapter_version: str | None  # None: not named (a content-versioned artifact's card, see `content_only`)
    recipe_hash: str
    code_version: str
    seed: int | None
    training: dict[str, Any] = field(default_factory=dict)  # the manifest's train facts (steps, tokens, loss)
    extra: dict[str, str] = field(default_factory=dict)  # more "what: version" lines (merged model, report)

    @property
    def base_hub_id(self) -> str | None:
        """The Hub id the base model is (or was quantized from), None for a local directory."""
        kind, _, ref = self.base_origin.partition(":")
        if kind == "gguf":
            return BUNDLED_BASE_ID
        return ref if kind == "hub" else None


def lineage_from(trained: dict[str, Any], base_model: dict[str, Any], sft_dataset: dict[str, Any]) -> Lineage:
    """The lineage of a trained adapter from its manifest and those of its base and dataset."""
    method = trained.get("method", {})
    return Lineage(
        method=method.get("name", trained["partition"]), method_type=method.get("type", trained["partition"]),
        base_origin=base_model.get("model", {}).get("origin", "unknown"), base_version=base_model["version"],
        sft_dataset_version=sft_dataset["version"],
        data_files={k.removeprefix("raw/"): v for k, v in sft_dataset.get("inputs", {}).items() if k.startswith("raw/")},
        adapter_asset=f"{trained['asset']}[{trained['partition']}]", adapter_version=trained["version"],
        recipe_hash=trained.get("recipe_hash", ""), code_version=trained.get("code_version", ""),
        seed=trained.get("seed"), training=trained.get("train", {}),
        extra={f"Also trained from `{k}` version": v for k, v in sorted(trained.get("inputs", {}).items())
               if k not in ("base_model", "sft_dataset")},  # quantized base, DPO pairs, the SFT adapter continued
    )


def content_only(lin: Lineage) -> Lineage:
    """The lineage a content-versioned artifact (`merged_model`) may carry in its card: what
    determines its weights, without the adapter's derived version or the run's facts. A forced
    retrain that gives the same weights then gives the same bytes, so the same version, and
    nothing downstream re-runs; `model_card[m]` (derivation-versioned) names the rest."""
    return replace(lin, adapter_version=None, training={})


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def library_of(weights_dir: Path) -> str:
    """What loads the weights in a directory: transformers (a full checkpoint), peft (an adapter),
    or ft_assets (a method's own format)."""
    if (weights_dir / "config.json").is_file():
        return "transformers"
    if (weights_dir / "adapter_config.json").is_file():
        return "peft"
    return "ft_assets"


def usage(weights_dir: Path, lin: Lineage, uses_quantized_base: bool, repo: str = "REPO") -> str:
    """A Python snippet that loads the weights of `weights_dir` once published as `repo` (a Hub
    repo id or a local path)."""
    where = "# REPO: this directory, or its Hub repo id once uploaded\n" if repo == "REPO" else ""
    return where + _usage(library_of(weights_dir), weights_dir, lin, uses_quantized_base, repo)


def _usage(library: str, weights_dir: Path, lin: Lineage, uses_quantized_base: bool, repo: str) -> str:
    base = lin.base_hub_id or "path/to/base_model"  # a local base: the base_model artifact directory
    if library == "transformers":
        tok_from = repo if (weights_dir / "tokenizer_config.json").is_file() else base  # `full` saves no tokenizer
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({tok_from!r})")
    if library == "peft" and uses_quantized_base:
        return ("import torch\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig\n\n"
                "nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                "bnb_4bit_use_double_quant=True,\n                         bnb_4bit_compute_dtype=torch.float32)\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, quantization_config=nf4)\n"
                f"model = PeftModel.from_pretrained(base, {repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({base!r})")
    if library == "peft":
        return ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                f"model = PeftModel.from_pretrained(base, {repo!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({base!r})")
    return ("# this method saves its own format: load it with ft_assets (github: this project)\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from ft_assets.methods import get_method\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            f"model = get_method({lin.method_type!r}).load(base, {repo!r})  # a local copy of this repo\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})")


def card_text(lin: Lineage, *, what: str, weights_dir: Path, uses_quantized_base: bool, dataset_names: list[str],
              recipe_name: str, metrics: dict[str, Any] | None = None, pending_note: str = "",
              license: str | None = None, repo: str = "REPO") -> str:
    """The README.md text of a card. `what`: a line saying what the directory holds. `metrics`: the
    eval report's metrics.json (None: metrics pending, `pending_note` says where they will be)."""
    from huggingface_hub import ModelCard, ModelCardData

    library = library_of(weights_dir)
    model_name = f"{recipe_name}-{lin.method}"
    data = ModelCardData(
        base_model=lin.base_hub_id, library_name=library, license=license, datasets=dataset_names,
        model_name=model_name, pipeline_tag="text-generation",
        tags=["ft_assets", lin.method_type, "text-generation", *(["peft"] if library == "peft" else [])],
        eval_results=eval_results(metrics, dataset_names) if metrics else None,
    )
    body = [f"# {model_name}", "", what, "", "## Lineage", "", *_lineage_lines(lin), "",
            "## Usage", "", "```python", usage(weights_dir, lin, uses_quantized_base, repo), "```", "",
            "## Evaluation", ""]
    body += _metric_lines(metrics) if metrics else [f"Metrics pending. {pending_note}".strip()]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    ModelCard(text)  # parses the front matter as the Hub would: a malformed card fails here
    return text


def eval_results(metrics: dict[str, Any], dataset_names: list[str]) -> list:
    """`model-index` entries: the tuned scores, per task when the report has several."""
    from huggingface_hub import EvalResult

    per_task = metrics.get("per_task") or {"+".join(dataset_names): {"tuned": metrics["tuned"]}}
    out = []
    for task, sides in per_task.items():
        for key, (metric_type, shown) in METRIC_NAMES.items():
            value = sides["tuned"].get(key)
            if value is None:
                continue
            out.append(EvalResult(task_type="text-generation", task_name="Question answering (generated, greedy)",
                                  dataset_type=task, dataset_name=task, dataset_split="eval (seeded held-out rows)",
                                  metric_type=metric_type, metric_name=shown, metric_value=value))
    return out


def _lineage_lines(lin: Lineage) -> list[str]:
    kind, _, ref = lin.base_origin.partition(":")
    origin = {"gguf": f"{BUNDLED_BASE_ID}, dequantized from the Q4_1 GGUF `{ref}` (not the original bf16 weights)",
              "hub": f"`{ref}` from the Hugging Face Hub", "local": f"a local checkpoint, `{ref}`"}.get(kind, lin.base_origin)
    version = f" version `{lin.adapter_version}`" if lin.adapter_version else ""
    lines = [f"- Method: `{lin.method}` (type `{lin.method_type}`), trained as `{lin.adapter_asset}`{version}.",
             f"- Base model: {origin}; `base_model` version `{lin.base_version}`.",
             f"- Training data: `sft_dataset` version `{lin.sft_dataset_version}`, built from "
             + ", ".join(f"`{n}` (file sha256 `{h}…`)" for n, h in sorted(lin.data_files.items())) + "."]
    lines.append(f"- Recipe hash `{lin.recipe_hash}`, code version `{lin.code_version}`, seed `{lin.seed}`.")
    t = lin.training
    if t:
        facts = [f"{t['steps']} optimizer steps" if "steps" in t else "",
                 f"{t['tokens_trained']} answer tokens trained" if "tokens_trained" in t else "",
                 f"final train loss {t['final_loss']:.4f}" if isinstance(t.get("final_loss"), (int, float)) else "",
                 f"{t['trainable_parameters']} trainable parameters" if "trainable_parameters" in t else ""]
        lines.append("- Training: " + ", ".join(f for f in facts if f) + ".")
    lines += [f"- {k}: `{v}`." for k, v in lin.extra.items()]
    return lines


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    base, tuned = metrics["base"], metrics["tuned"]
    n = tuned.get("examples") or base.get("examples")
    lines = [f"Greedy answers on the held-out split{f' ({n} rows)' if n else ''}, evaluated as "
             f"{metrics.get('evaluated_as', 'the tuned model')}; the base model on the same rows:", "",
             "| metric | base | tuned |", "|---|---|---|"]
    for key, (_, shown) in METRIC_NAMES.items():
        if key in tuned:
            lines.append(f"| {shown} | {_num(base.get(key))} | {_num(tuned[key])} |")
    return lines


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------
# the publishable directory and the upload
# --------------------------------------------------------------------------------------


def link_files(out_dir: Path, weights_dir: Path) -> list[str]:
    """Link (or copy) every file of `weights_dir` but its manifest, card and merge status into
    `out_dir`: the repo's weights and tokenizer. Returns their relative paths."""
    files = []
    for src in sorted(p for p in weights_dir.rglob("*") if p.is_file()):
        rel = src.relative_to(weights_dir)
        if rel.as_posix() in NOT_PUBLISHED:
            continue
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)  # the source is immutable: sharing its bytes costs no disk
        except OSError:
            shutil.copy2(src, dst)
        files.append(rel.as_posix())
    return files


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    private: bool


def repo_id_for(template: str, method: str) -> str:
    return template.replace("{method}", method)


def check_push(repo_id: str | None, token_env: str) -> str:
    """The token to upload with; raises PushError (before any upload) naming what to set."""
    if not repo_id:
        raise PushError("publish.push is true but publish.repo_id is not set; set it (e.g. you/finqa-{method})")
    token = os.environ.get(token_env)
    if not token:
        raise PushError(f"publish.push is true but ${token_env} is not set: nothing was uploaded. Export a Hugging "
                        f"Face token with write access as {token_env} (or set publish.push: false)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PushError("publish.push is true but HF_HUB_OFFLINE is set (offline): nothing was uploaded; unset "
                        "HF_HUB_OFFLINE for the run that publishes, or set publish.push: false")
    return token


def push(repo_dir: Path, repo_id: str, token: str, private: bool, message: str) -> PushResult:
    """Create the repo if needed and upload `repo_dir` as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(repo_dir), repo_id=repo_id, repo_type="model",
                                   commit_message=message)
    except Exception as exc:  # network, auth, quota: the user must read it
        raise PushError(f"uploading {repo_dir} to {repo_id} failed: {exc}") from exc
    return PushResult(repo_id, getattr(commit, "commit_url", str(commit)), private)
