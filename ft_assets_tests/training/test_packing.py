"""Packing, length grouping and the memory-lean loss on the tiny model: packed batches compute
exactly what separate samples compute, attention never crosses a sample boundary, the chunked
loss equals the plain one (value and gradients) for every method that can use it, and training
with packing learns and resumes exactly.

Device: `FT_TEST_DEVICE` (conftest; CPU by default). Tolerances (fp32, no autocast): losses 1e-5 relative; logits of untouched samples 1e-6 absolute
(bit-identical in practice); gradients 1e-4 relative / 1e-6 absolute (different summation order).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from ft_assets.data import rows as data
from ft_assets.evaluation import heldout as evaluate
from ft_assets.config.training import TrainingSpec
from ft_assets.training import loss as L, packing as P, prepared, loop as train
from ft_assets.methods import REGISTRY, get_method
from ft_assets.methods.bottleneck import BottleneckSpec
from ft_assets.methods.delta_lora import DeltaLoraSpec
from ft_assets.methods.full import FullSpec, LastLayersSpec
from ft_assets.methods.lora import LoraSpec
from ft_assets.methods.peft_variants import IA3Spec, LoraPlusSpec, LoraVariantSpec, PromptLearningSpec, VeraSpec
from ft_assets.models.base_model import load_model
from ft_assets_tests.conftest import DEVICE, formatted_examples

PAD = 2
LORA = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    out = formatted_examples(tiny_model_dir, 16, drop_context_every=3)  # rows of several lengths
    assert len({len(e.input_ids) for e in out}) > 2
    return out


def lora_model(model_dir, seed=0, attn="sdpa"):
    base = load_model(model_dir, DEVICE)
    base.set_attn_implementation(attn)
    torch.manual_seed(seed)
    model = get_method("lora").wrap(base, LORA)
    with torch.no_grad():  # non-zero B so the adapter matters in the forward
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


SEED = 3


def cfg(**kw) -> TrainingSpec:
    base = dict(max_steps=6, epochs=10, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                checkpoint_every=3)
    return TrainingSpec(**{**base, **kw})


def loss_of(model, batch, loss="plain"):
    with torch.no_grad():
        s, n = prepared.token_loss_sum(model, batch, loss)
    return float(s), n


# --------------------------------------------------------------------------------------
# layout of a packed batch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["varlen", "flash", "mask"])
def test_position_ids_restart_and_boundaries_carry_no_label(examples, mode):
    rows = examples[:5]
    b = P.collate_packed(rows, PAD, DEVICE, mode, max_tokens=2 * max(len(r.input_ids) for r in rows))
    ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
    assert b["n_tokens"] == sum(len(r.input_ids) for r in rows)
    starts = (pos == 0).nonzero().tolist()
    found = []
    for r, c in starts:
        end = c + 1
        while end < pos.size(1) and pos[r, end] == pos[r, end - 1] + 1:
            end += 1
        seg = ids[r, c:end].tolist()
        if seg[0] == PAD and all(t == PAD for t in seg) and labels[r, c:end].eq(data.IGNORE_INDEX).all():
            continue  # trailing padding (mask mode)
        found.append(seg)
        assert pos[r, c:end].tolist() == list(range(end - c))  # restarts at 0, counts up
        assert labels[r, c] == data.IGNORE_INDEX  # nothing predicts a sample's first token
    assert sorted(found) == sorted(r.input_ids for r in rows)
    if mode == "mask":
        assert ids.size(0) > 1 and ids.size(1) <= 2 * max(len(r.input_ids) for r in rows)  # FFD rows within budget
        assert b["attention_mask"].shape == (ids.size(0), 1, ids.size(1), ids.size(1))
    else:
        assert ids.size(0) == 1 and ids.size(1) == b["n_tokens"]  # one row, no padding
    if mode == "flash":
        cu = b["attn_kwargs"]["cu_seq_lens_q"].tolist()
        assert cu == [0, *torch.tensor([len(r.input_ids) for r in rows]).cumsum(0).tolist()]


def test_first_fit_decreasing_is_deterministic_and_within_budget():
    lengths = [5, 9, 3, 7, 7, 2, 8, 1]
    bins = P.first_fit_decreasing(lengths, 10)
    assert bins == P.first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert [sorted(lengths[i] for i in b) for b in bins] == [[1, 9], [2, 8], [3, 7], [7], [5]]  # 42 tokens: 5 bins is optimal


# --------------------------------------------------------------------------------------
# packed loss == separate samples; no attention across boundaries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn, mode", [("sdpa", "varlen"), ("sdpa", "mask"), ("eager", "varlen"), ("eager", "mask")])
@pytest.mark.parametrize("loss", ["plain", "chunked"])
def test_packed_loss_equals_mean_of_per_sample_losses(tiny_model_dir, examples, attn, mode, loss):
    model = lora_model(tiny_model_dir, attn=attn).eval()
    rows = examples[:6]
    eager = torch.float32 if attn == "eager" else None
    packed_sum, packed_n = loss_of(model, P.collate_packed(rows, PAD, DEVICE, mode, max_tokens=100, eager_mask_dtype=eager), loss)
    singles = [loss_of(model, P.collate([r], PAD, DEVICE), "plain") for r in rows]
    assert packed_n == sum(n for _, n in singles) == sum(sum(1 for x in r.labels[1:] if x != data.IGNORE_INDEX) for r in rows)
    per_sample_mean = sum(s for s, _ in singles) / sum(n for _, n in singles)
    assert packed_sum / packed_n == pytest.approx(per_sample_mean, rel=LOSS_RTOL)
    padded_sum, _ = loss_of(model, P.collate(rows, PAD, DEVICE), "plain")  # the loop's padded batch
    assert packed_sum == pytest.approx(padded_sum, rel=LOSS_RTOL)


def _logits(model, batch):
    kwargs, impl = P.forward_kwargs(batch)
    with torch.no_grad(), P.attention_implementation(model, impl):
        return model(**kwargs).logits


@pytest.mark.parametrize("mode", ["varlen", "mask"])
def test_no_attention_across_sample_boundaries(tiny_model_dir, examples, mode):
    model = lora_model(tiny_model_dir).eval()
    rows = sorted(examples[:3], key=lambda r: -len(r.input_ids))  # FFD (mask mode) keeps this order
    changed = data.Example(**{**rows[1].to_json(), "input_ids": [(t * 7 + 3) % 1000 + 5 for t in rows[1].input_ids]})
    budget = sum(len(r.input_ids) for r in rows)  # mask mode: all three in one row too
    a = P.collate_packed(rows, PAD, DEVICE, mode, max_tokens=budget)
    b = P.collate_packed([rows[0], changed, rows[2]], PAD, DEVICE, mode, max_tokens=budget)
    assert a["input_ids"].size(0) == 1
    la, lb = _logits(model, a)[0], _logits(model, b)[0]
    n0, n1 = len(rows[0].input_ids), len(rows[1].input_ids)
    others = torch.ones(la.size(0), dtype=torch.bool)
    others[n0: n0 + n1] = False  # sample 1's own positions change, of course
    assert (la[~others] - lb[~others]).abs().max() > 1e-2
    assert (la[others] - lb[others]).abs().max() <= 1e-6  # samples 0 and 2 do not see sample 1
    # ...while a plain causal forward over the same row lets sample 2 see the change (the test can fail)
    plain_a = model(input_ids=a["input_ids"]).logits[0].detach()
    plain_b = model(input_ids=b["input_ids"]).logits[0].detach()
    assert (plain_a[n0 + n1:] - plain_b[n0 + n1:]).abs().max() > 1e-3


def test_prompt_learning_is_never_packed(tiny_model_dir, examples):
    torch.manual_seed(0)
    model = get_method("prompt").wrap(load_model(tiny_model_dir, DEVICE), PromptLearningSpec(type="prompt", num_virtual_tokens=4))
    assert not P.supports_packing(model) and prepared.lean_head(model) is None
    with pytest.raises(ValueError, match="packed"):
        prepared.token_loss_sum(model, P.collate_packed(examples[:2], PAD, DEVICE))


# --------------------------------------------------------------------------------------
# the chunked linear cross-entropy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_equals_plain_loss_and_gradients(with_bias):
    torch.manual_seed(0)
    n, hidden, vocab = 37, 16, 101
    h = torch.randn(n, hidden).to(DEVICE).requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.3).to(DEVICE).requires_grad_()
    b = torch.randn(vocab).to(DEVICE).requires_grad_() if with_bias else None
    y = torch.randint(0, vocab, (n,)).to(DEVICE)
    y[::5] = L.IGNORE_INDEX
    ref = L.plain_linear_cross_entropy_sum(h, w, b, y)
    ref_grads = torch.autograd.grad(ref * 0.7, [t for t in (h, w, b) if t is not None])
    out = L.linear_cross_entropy_sum(h, w, b, y, chunk_rows=8, impl="chunked")  # 5 chunks, the last one short
    grads = torch.autograd.grad(out * 0.7, [t for t in (h, w, b) if t is not None])
    assert float(out) == pytest.approx(float(ref), rel=LOSS_RTOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: value only
        assert float(L.linear_cross_entropy_sum(h, w, b, y, chunk_rows=8)) == pytest.approx(float(ref), rel=LOSS_RTOL)
    # a frozen head: no weight gradient is built, h's gradient is unchanged
    h2 = h.detach().requires_grad_()
    (g_h,) = torch.autograd.grad(L.linear_cross_entropy_sum(h2, w.detach(), None if b is None else b.detach(), y, chunk_rows=8), [h2])
    torch.testing.assert_close(g_h, ref_grads[0] / 0.7, rtol=1e-4, atol=1e-6)


METHOD_SPECS = {
    "lora": LORA,
    "full": FullSpec(type="full"),
    "last_layers": LastLayersSpec(type="last_layers", n_layers=1),
    "dora": LoraVariantSpec(type="dora", r=4, alpha=8, dropout=0.0),
    "rslora": LoraVariantSpec(type="rslora", r=4, alpha=8, dropout=0.0),
    "lora_fa": LoraVariantSpec(type="lora_fa", r=4, alpha=8, dropout=0.0),
    "lora_plus": LoraPlusSpec(type="lora_plus", r=4, alpha=8, dropout=0.0),
    "delta_lora": DeltaLoraSpec(type="delta_lora", r=4, alpha=8),
    "vera": VeraSpec(type="vera", r=32),
    "ia3": IA3Spec(type="ia3"),
    "prefix": PromptLearningSpec(type="prefix", num_virtual_tokens=4),
    "prompt": PromptLearningSpec(type="prompt", num_virtual_tokens=4),
    "bottleneck": BottleneckSpec(type="bottleneck", reduction_factor=8, non_linearity="gelu"),
}


def test_every_registered_method_is_covered():
    # qlora: lora's path on a 4-bit base (the head stays a float Linear); preference methods: trained by TRL
    from ft_assets.config.method_spec import SPECS, PreferenceSpecBase

    by_trl = {t for t, spec in SPECS.items() if issubclass(spec, PreferenceSpecBase)}
    assert by_trl >= {"dpo", "orpo", "simpo", "kto"}
    assert set(REGISTRY) - {"qlora"} - by_trl <= set(METHOD_SPECS)


def _grads(model, batch, loss):
    model.zero_grad(set_to_none=True)
    s, n = prepared.token_loss_sum(model, batch, loss)
    (s / n).backward()
    return float(s), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", sorted(METHOD_SPECS))
def test_lean_loss_matches_plain_loss_for_every_method(tiny_model_dir, examples, name):
    spec = METHOD_SPECS[name]
    torch.manual_seed(0)
    model = get_method(spec.type).wrap(load_model(tiny_model_dir, DEVICE), spec)
    with torch.no_grad():  # move zero-initialised adapters off zero so every path carries signal
        for n, p in model.named_parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    lean = prepared.lean_head(model)
    assert (lean is None) == (name in ("prefix", "prompt"))  # prompt learning falls back to the plain path
    rows = examples[:4]
    ref_loss, ref = _grads(model, P.collate(rows, PAD, DEVICE), "plain")
    batches = [P.collate(rows, PAD, DEVICE)]
    if P.supports_packing(model):
        batches.append(P.collate_packed(rows, PAD, DEVICE, "varlen"))
    for batch in batches:
        got_loss, got = _grads(model, batch, "chunked")
        assert got_loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
        assert set(got) == set(ref) and ref
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    if name == "last_layers":  # the untied head trains through the lean path
        assert any(k.endswith("lm_head.weight") for k in ref)


# --------------------------------------------------------------------------------------
# training with packing
# --------------------------------------------------------------------------------------


def test_training_with_packing_lowers_the_loss_and_tracks_the_padded_run(tiny_model_dir, examples):
    results, after = {}, {}
    for packing in (True, False):
        model = lora_model(tiny_model_dir)
        before = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
        results[packing] = train.train(model, get_method("lora"), LORA, examples, cfg(max_steps=8, packing=packing, loss="auto" if packing else "plain"), seed=SEED, pad_id=PAD, device=DEVICE)
        after[packing] = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
    assert after[True] < before - 0.05, (before, after)
    # same rows per micro-batch, same normalisation: the packed run is the padded run up to rounding
    assert [l for _, l in results[True].losses] == pytest.approx([l for _, l in results[False].losses], rel=1e-4)
    assert results[True].tokens_seen == results[False].tokens_seen  # non-padding tokens, both ways
    assert results[True].tokens_trained == results[False].tokens_trained


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_is_exact_with_packing(tiny_model_dir, examples, tmp_path, group_by_length):
    method = get_method("lora")
    c = cfg(packing=True, group_by_length=group_by_length)
    ref = lora_model(tiny_model_dir)
    ref_result = train.train(ref, method, LORA, examples, c, seed=SEED, pad_id=PAD, device=DEVICE)
    ckpt = tmp_path / "ckpt"
    train.train(lora_model(tiny_model_dir), method, LORA, examples, c, seed=SEED, pad_id=PAD, checkpoint_dir=ckpt, device=DEVICE)
    for late in sorted(ckpt.glob("step-*")):
        if late.name != "step-000003":
            shutil.rmtree(late)
    resumed = lora_model(tiny_model_dir, seed=1234)
    result = train.train(resumed, method, LORA, examples, c, seed=SEED, pad_id=PAD, checkpoint_dir=ckpt, device=DEVICE)
    assert result.resumed_from_step == 3 and result.steps == 6
    assert [l for _, l in result.losses] == pytest.approx([l for _, l in ref_result.losses], abs=1e-5)
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_length_grouped_batches_are_pure_and_grouped(examples):
    many = examples * 4  # 64 rows, 16 steps of 4
    grouped, plain = cfg(max_steps=40, group_by_length=True), cfg(max_steps=40)
    full = [[r.id for mb in s for r in mb] for s in train.batches(many, grouped, SEED)]
    tail = [[r.id for mb in s for r in mb] for s in train.batches(many, grouped, SEED, start_step=23)]
    assert full[23:] == tail  # a pure function of (seed, step): resume sees the same batches
    assert sorted(sum(full[:16], [])) == sorted(r.id for r in many)  # an epoch still sees every row once

    def padding(c):
        waste = 0
        for step in train.batches(many, c, SEED):
            for mb in step:
                width = max(len(r.input_ids) for r in mb)
                waste += sum(width - len(r.input_ids) for r in mb)
        return waste

    assert padding(grouped) < 0.5 * padding(plain)
