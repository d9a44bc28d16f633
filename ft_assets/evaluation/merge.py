"""Fold a trained adapter into base weights, and check the result is the same function.

QLoRA adapters are merged into the dequantized NF4 weights in float32 (what the adapter was
trained against), never into 4-bit weights. Methods that cannot merge raise NotMergeable.

The check (`compare`) accepts only what float rounding explains, in two places:
- Every Linear layer on its own: merged layer vs base+adapter layer on random inputs, relative
  to the layer's output scale. Both sides are length-K dot products (each off by about
  sqrt(K)·u: rounding errors add like a random walk), the merged weights rounded once more,
  doubled for the tail of the thousands of outputs compared: 2·(2·sqrt(K) + 1)·u. A layer
  missing its update is off by |s·B·A·x| / |W·x|, orders more, and is named.
- The logits, end to end (norms, embeddings, heads, everything not a Linear), relative to the
  logit scale, by how the method merges (its `merge_rounding`): "copy" (full, last_layers: the
  trained tensors themselves) must agree to one rounding, u; "fold" (W + s·B·A, DoRA's
  rescaling, IA3's scaling: same function, other rounding order) to (4L + 1)·sqrt(K)·u: 4
  linear maps in series per decoder layer, the residual stream adding each layer's error, and
  the LM head.
u is the unit roundoff of the dtype compared in (float32: 2^-24; 2^-11 where torch may run
float32 matmuls in TF32), L the decoder layers, K the widest inner dimension. End to end, one
layer's missing update can shrink below the logit tolerance in a deep model (SmolLM2-135M, a
layer-0 q_proj among 210 adapted matrices: 0.56x, measured), which is why layers are checked
one by one too.

`write_merged_model(store, ...)` is the `merged_model` asset's work: merge, save (weights,
tokenizer, `merge_status.json`, the model card through the caller's `write_card`) inside one
store write, then reload the saved checkpoint and `compare` it with base + adapter on eval rows.
A method that cannot merge stores only `merge_status.json` with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..publish import card
from ..data.sft_dataset import load_split
from ..data.types import Example
from ..methods import Method, NotMergeable
from ..models.base_model import load_model, load_tokenizer
from ..models.quantize import dequantized, load_quantized
from ..training.packing import collate

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
LINEAR_MAPS_IN_SERIES_PER_LAYER = 4  # q/k/v -> o, gate/up -> down


@dataclass(frozen=True)
class MergeComparison:
    """How far the merged model is from base + adapter, against what rounding explains."""

    max_abs_logit_diff: float  # max |logits(merged) - logits(reference)| over the compared tokens
    logit_scale: float  # max |logit| of the reference over the same tokens
    relative_diff: float  # max_abs_logit_diff / logit_scale
    tolerance: float  # the largest relative_diff rounding explains for this method and model
    worst_layer: str  # the Linear layer whose output is furthest from the reference's
    layer_relative_diff: float  # its max |difference| / max |reference output|
    layer_tolerance: float  # what rounding explains for that layer
    expected: str  # where the tolerances come from, in words

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance and self.layer_relative_diff <= self.layer_tolerance

    def numbers(self) -> dict[str, float | str]:
        """Every measured field (all but the explanation), for metadata."""
        return {k: v for k, v in asdict(self).items() if k != "expected"}


def relative(diff: float, scale: float) -> float:
    """diff / scale, where a zero scale makes any non-zero difference infinitely large."""
    return diff / scale if scale else (0.0 if diff == 0 else math.inf)


def merged(method: Method, base_dir: Path, adapter_dir: Path, quantized_dir: Path | None, device: str):
    base = dequantized(quantized_dir, device) if method.uses_quantized_base else load_model(base_dir, device)
    return method.merge(base, adapter_dir)


def unmerged(method: Method, base_dir: Path, adapter_dir: Path, quantized_dir: Path | None, device: str):
    """base + adapter as trained (the reference the merged model must reproduce)."""
    if method.uses_quantized_base:
        base = load_quantized(quantized_dir, device, torch.float32)
    else:
        base = load_model(base_dir, device)
    return method.load(base, adapter_dir)


def unit_roundoff(dtype: torch.dtype) -> float:
    """float32 matmuls run at reduced precision when torch allows it ("high": TF32's 10 mantissa
    bits, "medium": bfloat16's 7), on CUDA and on CPUs with such kernels."""
    if dtype == torch.float32:
        reduced = {"high": torch.float16, "medium": torch.bfloat16}.get(torch.get_float32_matmul_precision())
        if reduced is not None:
            return UNIT_ROUNDOFF[reduced]
    return UNIT_ROUNDOFF[dtype]


def rounding_tolerance(merge_rounding: str, config, dtype: torch.dtype) -> tuple[float, str]:
    """The relative logit difference that rounding explains (see the module docstring)."""
    u = unit_roundoff(dtype)
    dt = str(dtype).removeprefix("torch.")
    if merge_rounding == "copy":
        return u, f"copy merge: identical weights, so at most one rounding of the logit scale (u={u:.3g}, {dt})"
    layers = config.num_hidden_layers
    width = max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)
    depth = LINEAR_MAPS_IN_SERIES_PER_LAYER * layers + 1
    tol = depth * math.sqrt(width) * u
    return tol, (f"fold merge: rounding order only, (4L+1)·sqrt(K)·u = {depth}·sqrt({width})·{u:.3g} = {tol:.3g} "
                 f"of the logit scale (L={layers} layers, K={width}, {dt})")


@torch.inference_mode()
def logits(model, examples: list[Example], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float logits of `examples` and the mask of their real (non-padding) positions."""
    model.eval()
    batch = collate(examples, pad_id, device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    n = batch["input_ids"].size(1)  # prompt tuning returns its virtual tokens' logits first: keep the real ones
    return out[:, -n:], batch["attention_mask"].bool()


def max_logit_difference(a, b, examples: list[Example], pad_id: int, device: str) -> float:
    """Largest |logit_a - logit_b| over the real (non-padding) positions of `examples`."""
    la, mask = logits(a, examples, pad_id, device)
    lb, _ = logits(b, examples, pad_id, device)
    return float((la - lb).abs()[mask].max())


def layer_tolerance(in_features: int, dtype: torch.dtype) -> float:
    return 2 * (2 * math.sqrt(in_features) + 1) * unit_roundoff(dtype)


@torch.inference_mode()
def compare_linear_layers(merged_model, reference, rows: int = 8, seed: int = 0) -> tuple[str, float, float]:
    """(worst layer, its relative difference, its tolerance): each Linear of the merged model
    against the same-named layer of base+adapter (peft's wrapper, or a plain Linear), on random
    inputs. The worst layer is the one with the highest difference/tolerance ratio."""
    reference = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
    reference.eval()
    generator = torch.Generator().manual_seed(seed)
    worst = ("", 0.0, 1.0)
    for name, layer in merged_model.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        weight = layer.weight
        x = torch.randn(rows, layer.in_features, generator=generator, dtype=torch.float32).to(weight.device, weight.dtype)
        expected = reference.get_submodule(name)(x).float()
        diff = float((layer(x).float() - expected).abs().max())
        scale = float(expected.abs().max())
        rel = relative(diff, scale)
        tol = layer_tolerance(layer.in_features, weight.dtype)
        if rel / tol >= worst[1] / worst[2]:
            worst = (name, rel, tol)
    return worst


def compare(merged_model, reference, method: Method, examples: list[Example], pad_id: int, device: str) -> MergeComparison:
    """The merged model against base + adapter: every Linear layer, then the logits on
    `examples` (the `matches_adapter` check)."""
    worst_layer, layer_rel, layer_tol = compare_linear_layers(merged_model, reference)
    lm, mask = logits(merged_model, examples, pad_id, device)
    lr, _ = logits(reference, examples, pad_id, device)
    diff = float((lm - lr).abs()[mask].max())
    scale = float(lr.abs()[mask].max())
    dtype = next(merged_model.parameters()).dtype
    tol, expected = rounding_tolerance(method.merge_rounding, merged_model.config, dtype)
    expected += f"; each Linear layer: 2·(2·sqrt(K)+1)·u of its output scale (worst: {worst_layer})"
    return MergeComparison(max_abs_logit_diff=diff, logit_scale=scale, relative_diff=relative(diff, scale),
                           tolerance=tol, worst_layer=worst_layer, layer_relative_diff=layer_rel,
                           layer_tolerance=layer_tol, expected=expected)


def check_saved_merge(method: Method, merged_dir: Path, base_dir: Path, adapter_dir: Path, quantized_dir: Path | None,
                      examples: list[Example], pad_id: int, device: str) -> MergeComparison:
    """The merged checkpoint as saved, reloaded from disk, against base + adapter as trained."""
    return compare(load_model(merged_dir, device), unmerged(method, base_dir, adapter_dir, quantized_dir, device),
                   method, examples, pad_id, device)


@dataclass
class MergedModel:
    """What `write_merged_model` stored: the artifact, and the check of the merge when there is one."""

    artifact: Any  # store.Artifact
    reason: str | None  # why the method cannot merge; None: it merged
    comparison: MergeComparison | None  # None when it did not merge
    prompts: int = 0  # eval rows the logits were compared on


def write_merged_model(store, name: str, method: Method, *, base_model, adapter, quantized_dir: Path | None,
                       sft_dataset, device: str, inputs: dict[str, str],
                       write_card: Callable[[Path, card.Lineage], Any], min_free_bytes: int,
                       **manifest: Any) -> MergedModel:
    """`adapter` merged into `base_model` (store.Artifacts; `quantized_dir` for QLoRA), stored as
    `merged_model[name]`; `manifest`: recipe_hash, code_version, seed for the store write."""
    with store.write("merged_model", name, min_free_bytes=min_free_bytes, **manifest) as st:
        st.inputs = inputs
        try:
            model = merged(method, base_model.dir, adapter.dir, quantized_dir, device)
        except NotMergeable as exc:
            model, reason = None, str(exc)
            _write_json(st.path / "merge_status.json", {"mergeable": False, "reason": reason})
        else:
            reason = None
            model.save_pretrained(st.path, safe_serialization=True)
            load_tokenizer(base_model.path).save_pretrained(st.path)
            _write_json(st.path / "merge_status.json", {"mergeable": True})
            write_card(st.path, card.content_only(card.lineage_from(adapter.manifest(), base_model.manifest(),
                                                                    sft_dataset.manifest())))
        st.extra["mergeable"] = model is not None
    if model is None:
        return MergedModel(st.artifact, reason, None)
    # The merged checkpoint, reloaded from disk, must compute what base+adapter computes.
    examples = load_split(sft_dataset.path, "eval")[:8]
    pad = load_tokenizer(base_model.path).pad_token_id
    cmp = check_saved_merge(method, st.artifact.dir, base_model.dir, adapter.dir, quantized_dir, examples, pad, device)
    return MergedModel(st.artifact, None, cmp, len(examples))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
