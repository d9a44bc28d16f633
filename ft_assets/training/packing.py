"""How a micro-batch is laid out: padded, or packed without cross-contamination; and length grouping.

Contract. A micro-batch is a dict of tensors built from `Example` rows:
- `collate(rows, pad_id, device)`: padded to the longest row (`input_ids`, `labels`, 2-D
  `attention_mask`);
- `collate_packed(rows, pad_id, device, mode, max_tokens, eager_mask_dtype)`: packed; it also
  carries `position_ids`, the attention kwargs of its mode (`attn_kwargs`), `n_tokens` (non-padding
  tokens) and `packed` (the mode).
`forward_kwargs(batch)` gives the model kwargs of either kind and the attention implementation
its forward must run under (`routed_attention`). What a model allows is looked up here, and
`training.prepared.prepare` asks it once per training run, never per batch: `supports_packing`,
`attention_mode` (how rule 1 below is enforced for it) and `eager_mask_dtype` (the "mask" mode's
mask dtype). Nothing here changes a model; `routed_attention` switches an attention
implementation for the duration of one forward and restores it.

A micro-batch of QA rows padded to its longest row spends compute on padding; packing lays the
rows end to end instead. Three rules keep a packed batch computing exactly what the padded one
computes (tested: the loss equals the padded loss and the mean of per-sample losses):

1. attention stays inside each sample: a token never sees the previous sample's tokens;
2. position ids restart at 0 for every sample (RoPE sees the same positions as unpacked);
3. the first token of a sample carries no label, so the last token of sample i is never asked to
   predict the first token of sample i+1 (unpacked, that label is dropped by the shift too).

How rule 1 is enforced depends on the attention implementation (`attention_mode`):

- "varlen" (CPU, or CUDA without flash-attention; any transformers model that dispatches through
  `ALL_ATTENTION_FUNCTIONS`, e.g. Llama): the micro-batch is ONE row with no padding at all, and
  attention runs per sample through `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`
  (the registered implementation "ft_varlen_sdpa", switched on only for the packed forward). On CUDA
  in bf16/fp16 (autocast) the samples go through PyTorch's own flash varlen kernel in one call
  (`torch.nn.attention.varlen`, no flash-attn package needed) instead of a loop. Cost is
  that of each sample alone: measured on this CPU for 8 QA rows (1,353 tokens, SmolLM2 heads),
  fwd+bwd of one layer's attention: 0.05 s per-sample vs 0.56 s with a block-diagonal 4-D mask over
  the whole row (which computes every masked block) and 0.10 s for the padded 8 x 194 batch.
- "flash" (CUDA with flash_attention_2/3): one row, `position_ids` + `cu_seq_lens_*`: flash-attn's
  varlen kernel, no mask.
- "mask" (anything else, or on request): first-fit-decreasing rows of at most `max_tokens` tokens
  (`prepare(..., pack_max_tokens=)`, default 1024), right-padded, with a block-diagonal causal 4-D
  mask (bool for sdpa, additive float for eager).
  transformers 5.17 passes a 4-D mask through unchanged. Its `position_ids`-only packed detection
  also works, but only with `use_cache=False` (with the default cache the model silently attends
  across samples: measured loss 236.5 vs 147.2) and it builds the same quadratic mask anyway.

Prompt learning (prompt / prefix tuning) cannot be packed: peft drops `position_ids` for prompt
tuning and puts its virtual tokens once per row; `supports_packing` says so and the training
loop's batches are padded for them.

Length grouping (unpacked path, `train.batches`): the epoch's shuffled order is cut into
mega-batches of `train.GROUP_STEPS` optimizer steps and sorted by length inside each, so a
micro-batch holds rows of similar length. It is a function of (seed, epoch) only, so `batches()` stays a pure function of
(seed, step) and resume stays exact.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..data.rows import IGNORE_INDEX, Example

VARLEN_ATTENTION = "ft_varlen_sdpa"
DEFAULT_MASK_MAX_TOKENS = 1024  # row budget of the 4-D mask path (its attention cost grows with the square)


# --------------------------------------------------------------------------------------
# the per-sample attention ("varlen" on any device, without flash-attn)
# --------------------------------------------------------------------------------------


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, ft_segments: Sequence[tuple[int, int]] | None = None, **kwargs):
    """An `AttentionInterface` function: causal attention within each (start, end) segment of a
    single packed row. Without `ft_segments` (an unpacked call) it is plain sdpa."""
    if ft_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _per_sample_attention(query, key, value, dropout, scaling, tuple(ft_segments))


def _per_sample_attention(query, key, value, dropout, scaling, ft_segments):
    if query.size(0) != 1:
        raise ValueError(f"packed varlen attention expects one row, got batch {query.size(0)}")
    if query.is_cuda and not dropout and len(ft_segments) > 1:
        out = _cuda_varlen_attention(query, key, value, scaling, ft_segments)
        if out is not None:
            return out, None
    gqa = query.size(1) != key.size(1)
    lengths = [e - s for s, e in ft_segments]
    # split, not slices: the backward of a split is one concatenation, a slice's zero-fills the whole row
    outs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _torch_varlen():
    """`torch.nn.attention.varlen.varlen_attn` (PyTorch's bundled flash-attention varlen kernel,
    CUDA, half precision) with the names of its keyword arguments, or None where torch lacks it."""
    global _VARLEN
    if _VARLEN is None:
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _VARLEN = (None, frozenset())
        else:
            _VARLEN = (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))
    return _VARLEN


_VARLEN: tuple | None = None


def _cuda_varlen_attention(query, key, value, scaling, ft_segments):
    """Every segment's causal attention in one kernel call (no per-sample loop), or None when this
    torch has no varlen kernel or cannot express the call (then the per-sample loop runs).

    query/key/value (1, heads, tokens, head_dim) -> (1, tokens, heads, head_dim). The kernel takes
    bf16/fp16 only: under autocast the inputs are cast to its dtype (what sdpa does there), in plain
    float32 the loop keeps float32 numerics. torch 2.10 spells causal `is_causal` and has no `scale`
    or `enable_gqa`; later versions spell it `window_size=(-1, 0)`."""
    fn, params = _torch_varlen()
    if fn is None:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    head_dim = query.size(-1)
    kwargs: dict[str, Any] = {}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-12:
        return None
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        return None
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (tokens, heads, head_dim)
    if q.size(1) != k.size(1):
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    ends = [e for _, e in ft_segments]
    cu = torch.tensor([0] + ends, dtype=torch.int32).to(query.device, non_blocking=True)
    longest = max(e - s for s, e in ft_segments)
    out = fn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.unsqueeze(0)


_varlen_registered = False


def register_varlen_attention() -> None:
    """VARLEN_ATTENTION into transformers' attention registry, on first use rather than at import:
    that registry (transformers' model code) and torch's compiler take ~2 s to import, in every
    process that imports the package (the Dagster code location, each run's steps), most of which
    never pack."""
    global _varlen_registered, _per_sample_attention
    if _varlen_registered:
        return
    from transformers import AttentionInterface

    # a data-dependent Python loop: under torch.compile the layer's graph breaks around it
    _per_sample_attention = torch.compiler.disable(_per_sample_attention)
    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    _varlen_registered = True


def inner_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_config(model):
    """The transformers config of `model` (under a peft wrapper): where the attention implementation is set."""
    return getattr(inner_model(model), "config", None)


def supports_packing(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return not (config is not None and config.is_prompt_learning)


def attention_mode(model, requested: str = "auto") -> str:
    """"varlen", "flash" or "mask" for this model (see the module docstring)."""
    if requested != "auto":
        return requested
    inner = inner_model(model)
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None) or ""
    if impl.startswith("flash_attention"):
        return "flash"
    can_set = getattr(type(inner), "_can_set_attn_implementation", None)
    if impl in ("sdpa", "eager", VARLEN_ATTENTION) and callable(can_set) and can_set():
        return "varlen"
    return "mask"


def eager_mask_dtype(model, mode: str | None) -> torch.dtype | None:
    """The dtype of the additive float mask the "mask" mode needs under eager attention (the
    model's parameter dtype), else None: sdpa takes the bool mask, the other modes no mask."""
    if mode != "mask" or getattr(model_config(model), "_attn_implementation", None) != "eager":
        return None
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def routed_attention(config, name: str | None) -> Iterator[None]:
    """Temporarily route attention through `name` by setting it on `config` (None: leave it)."""
    if name == VARLEN_ATTENTION:
        register_varlen_attention()
    if name is None or config is None or config._attn_implementation == name:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def attention_implementation(model, name: str | None) -> ContextManager[None]:
    """`routed_attention` on `model`'s config."""
    return routed_attention(model_config(model), name)


# --------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------


def collate(rows: list[Example], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """A padded micro-batch: rows right-padded to the longest, with a 2-D attention mask."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Bins of indices, each summing to at most `max_tokens` (a longer item gets a bin of its own).
    Deterministic: ties keep input order; bins come out in the order they were opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def collate_packed(rows: list[Example], pad_id: int, device: str, mode: str = "varlen",
                   max_tokens: int | None = None, eager_mask_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A packed micro-batch: input_ids, labels, position_ids, attention_mask (4-D or None), the
    attention kwargs the mode needs (`attn_kwargs`) and `n_tokens` (non-padding tokens)."""
    if mode in ("varlen", "flash"):
        bins = [list(range(len(rows)))]  # one row, no padding
    else:
        longest = max(len(r.input_ids) for r in rows)
        bins = first_fit_decreasing([len(r.input_ids) for r in rows], max(longest, max_tokens or DEFAULT_MASK_MAX_TOKENS))
    width = max(sum(len(rows[i].input_ids) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    seg = torch.full((len(bins), width), -1, dtype=torch.long)
    spans: list[tuple[int, int]] = []  # (start, end) of each sample in row 0 (varlen/flash)
    for r, b in enumerate(bins):
        at = 0
        for k, i in enumerate(b):
            ex = rows[i]
            n = len(ex.input_ids)
            ids[r, at: at + n] = torch.tensor(ex.input_ids)
            lab = torch.tensor(ex.labels)
            lab[0] = IGNORE_INDEX  # rule 3: nothing predicts a sample's first token
            labels[r, at: at + n] = lab
            pos[r, at: at + n] = torch.arange(n)
            seg[r, at: at + n] = k
            spans.append((at, at + n))
            at += n
        if at < width:  # padding: its own segment, positions from 0 (attends to itself only)
            pos[r, at:] = torch.arange(width - at)
            seg[r, at:] = len(b)
    n_tokens = sum(len(r.input_ids) for r in rows)
    out: dict[str, Any] = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device),
                           "attention_mask": None, "attn_kwargs": {}, "n_tokens": n_tokens, "packed": mode}
    if mode == "varlen":
        out["attn_kwargs"] = {"ft_segments": tuple(spans)}
    elif mode == "flash":
        cu = torch.tensor([0] + [e for _, e in spans], dtype=torch.int32, device=device)
        longest = max(e - s for s, e in spans)
        out["attn_kwargs"] = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    else:
        out["attention_mask"] = block_causal_mask(seg, eager_mask_dtype).to(device)
    return out


def block_causal_mask(segments: torch.Tensor, float_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(rows, 1, W, W): query q may see key k iff same segment and k <= q. Bool (True = attend) for
    sdpa; with `float_dtype`, the additive form (0 / dtype min) eager attention expects."""
    width = segments.size(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if float_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=float_dtype).masked_fill(~allowed, torch.finfo(float_dtype).min)


def forward_kwargs(batch: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Model kwargs for a micro-batch (padded or packed) and the attention implementation its
    forward must be routed through (`routed_attention`; None: the model's own)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    impl = None
    if batch.get("packed"):
        kwargs["position_ids"] = batch["position_ids"]
        kwargs["use_cache"] = False  # with a cache, transformers' packed-sequence detection is skipped
        kwargs.update(batch["attn_kwargs"])
        if batch["packed"] == "varlen":
            impl = VARLEN_ATTENTION
    return kwargs, impl


# --------------------------------------------------------------------------------------
# length grouping (unpacked path)
# --------------------------------------------------------------------------------------


def length_grouped(order: list[int], lengths: Sequence[int], group: int) -> list[int]:
    """Sort `order` by length (longest first) within consecutive groups of `group` indices."""
    out: list[int] = []
    for start in range(0, len(order), group):
        out += sorted(order[start: start + group], key=lambda i: (-lengths[i], i))
    return out
