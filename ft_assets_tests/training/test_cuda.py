"""The CUDA path of the training core, on a GPU (`FT_TEST_DEVICE=cuda`; skipped everywhere else).

What only a GPU runs: bf16 autocast, PyTorch's flash varlen kernel for packed rows, compiled
decoder layers (opt-in, `training.compile`), Liger's fused head (when installed), bitsandbytes NF4
with a bf16 compute dtype, the paged 8-bit optimizer. Last run: an H200 on 2026-11-30
(ft_assets/bench/results/train_throughput_h200_2026-11-30.md says which tests ran there). The float32 numerics of packing, the chunked loss and QLoRA merging
run on the GPU too, through the device-aware modules (test_packing, test_merge_and_quantize).

Tolerances (bf16 autocast: 8 mantissa bits, u = 2^-8): losses of two bf16 computations of the
same function within 1 % relative; gradients by cosine similarity >= 0.99 (elementwise bf16
differences are large on near-zero entries, their direction is what training follows).
"""

from __future__ import annotations

import pytest
import torch

from ft_assets.config.training import TrainingSpec
from ft_assets.training import loss as L, packing as P, prepared, loop as train
from ft_assets.models import quantize
from ft_assets.methods import get_method
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets_tests.conftest import DEVICE, formatted_examples

pytestmark = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA path: run with FT_TEST_DEVICE=cuda on a GPU")

PAD = 2
LORA = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    return formatted_examples(tiny_model_dir, 16, drop_context_every=3)


def lora_model(model_dir):
    torch.manual_seed(0)
    model = get_method("lora").wrap(load_model(model_dir, DEVICE), LORA)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, batch, loss="chunked"):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=BF16):
        s, n = prepared.token_loss_sum(model, batch, loss)
    (s / n).backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return float(s) / n, grads


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_packed_rows_use_one_varlen_kernel_call_and_match_the_padded_batch(tiny_model_dir, examples, monkeypatch):
    fn, params = P._torch_varlen()
    if fn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    calls = []
    monkeypatch.setattr(P, "_VARLEN", (lambda *a, **k: calls.append(1) or fn(*a, **k), params))
    model = lora_model(tiny_model_dir)
    rows = examples[:8]
    packed_loss, packed_grads = loss_and_grads(model, P.collate_packed(rows, PAD, DEVICE, "varlen"))
    assert len(calls) == 2  # one call per layer (2 layers), not one per sample
    padded_loss, padded_grads = loss_and_grads(model, P.collate(rows, PAD, DEVICE))
    monkeypatch.setattr(P, "_VARLEN", (None, frozenset()))  # the per-sample sdpa loop, same bf16 autocast
    loop_loss, loop_grads = loss_and_grads(model, P.collate_packed(rows, PAD, DEVICE, "varlen"))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-2) and packed_loss == pytest.approx(loop_loss, rel=1e-2)
    assert cosine(packed_grads, padded_grads) > 0.99 and cosine(packed_grads, loop_grads) > 0.99


def test_varlen_kernel_keeps_samples_apart(tiny_model_dir, examples):
    model = lora_model(tiny_model_dir).eval()
    rows = examples[:3]
    changed = type(rows[1])(**{**rows[1].to_json(), "input_ids": [(t * 7 + 3) % 1000 + 5 for t in rows[1].input_ids]})
    logits = []
    for rs in (rows, [rows[0], changed, rows[2]]):
        kwargs, impl = P.forward_kwargs(P.collate_packed(rs, PAD, DEVICE, "varlen"))
        with torch.no_grad(), torch.autocast("cuda", dtype=BF16), P.attention_implementation(model, impl):
            logits.append(model(**kwargs).logits[0].float())
    n0, n1 = len(rows[0].input_ids), len(rows[1].input_ids)
    diff = (logits[0] - logits[1]).abs().amax(-1)
    assert float(diff[n0: n0 + n1].max()) > 1e-2  # sample 1 changed
    assert float(diff[:n0].max()) == 0.0 and float(diff[n0 + n1:].max()) == 0.0  # the others did not see it


def test_compiled_layers_compute_what_the_eager_layers_compute(tiny_model_dir, examples):
    rows = examples[:8]
    out = {}
    for compile_ in (False, True):
        model = lora_model(tiny_model_dir)
        prep = prepared.prepare(model, TrainingSpec(max_steps=1, compile=compile_), train.CrossEntropy(), device=DEVICE, pad_id=PAD)
        assert bool(prep.compiled_layers) == compile_
        try:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=BF16):
                s, n, _ = prep.loss_sum(prep.batch(rows))
            (s / n).backward()
            out[compile_] = (float(s) / n, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
        finally:
            prep.release()
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-2)
    assert cosine(out[True][1], out[False][1]) > 0.99


@pytest.mark.skipif(not L.liger_available(), reason="liger-kernel not installed")
def test_liger_fused_head_equals_the_chunked_head():
    torch.manual_seed(0)
    n, hidden, vocab = 300, 64, 5000
    h = torch.randn(n, hidden, device=DEVICE, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=DEVICE) * 0.1).requires_grad_()
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    y[::7] = L.IGNORE_INDEX
    ref = L.linear_cross_entropy_sum(h, w, None, y, impl="chunked", chunk_rows=64)
    ref_g = torch.autograd.grad(ref, [h, w])
    got = L.linear_cross_entropy_sum(h, w, None, y, impl="liger")
    got_g = torch.autograd.grad(got, [h, w])
    assert float(got) == pytest.approx(float(ref), rel=1e-4)
    for g, r in zip(got_g, ref_g):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_training_on_cuda_with_bf16_and_packing_lowers_the_loss(tiny_model_dir, examples):
    model = lora_model(tiny_model_dir)
    from ft_assets.evaluation import heldout as evaluate

    before = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
    result = train.train(model, get_method("lora"), LORA, examples,
                         TrainingSpec(max_steps=8, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant"),
                         seed=3, pad_id=PAD, device=DEVICE, autocast_dtype=BF16)
    after = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
    assert after < before - 0.05, (before, after, result.losses)


def test_qlora_on_a_bf16_nf4_base_trains_with_the_paged_8bit_optimizer(tiny_model_dir, examples, tmp_path):
    quantize.quantize(tiny_model_dir, tmp_path / "q", "nf4", True, BF16, DEVICE)
    base = quantize.load_quantized(tmp_path / "q", DEVICE, BF16)
    import bitsandbytes as bnb

    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.weight.device.type == "cuda" for m in layers)
    method = get_method("qlora")
    torch.manual_seed(0)
    model = method.wrap(base, LORA)
    from ft_assets.evaluation import heldout as evaluate

    before = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
    result = train.train(model, method, LORA, examples,
                         TrainingSpec(max_steps=8, batch_size=4, lr=2e-2, warmup_ratio=0.0, lr_scheduler="constant",
                                      optimizer="paged_adamw_8bit"),
                         seed=3, pad_id=PAD, device=DEVICE, autocast_dtype=BF16)
    after = evaluate.eval_loss(model, examples, PAD, DEVICE)["eval_loss"]
    assert all(l == l for _, l in result.losses)  # no NaN
    assert after < before - 0.05, (before, after, result.losses)
