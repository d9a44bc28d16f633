"""Every fine-tuning method on the tiny model: it learns, its saved state reproduces the trained
model on a fresh base, it merges exactly (or says why it cannot), a checkpoint resumes it
exactly, and it has the property that defines it (what trains, what stays frozen, how).

Each method trains once per module (`run`, cached); the tests read that run.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from ft_assets.config import recipe as R
from ft_assets.data import rows as data
from ft_assets.evaluation import heldout as evaluate, merge
from ft_assets.config.training import TrainingSpec
from ft_assets.training import checkpoint, loop as train, packing, prepared
from ft_assets.methods import REGISTRY, NotMergeable, get_method
from ft_assets.methods.bottleneck import BottleneckSpec
from ft_assets.methods.delta_lora import DeltaLoraSpec
from ft_assets.methods.full import FullSpec, LastLayersSpec
from ft_assets.methods.lora import LoraSpec
from ft_assets.methods.peft_variants import IA3Spec, LoraPlusSpec, LoraVariantSpec, PromptLearningSpec, VeraSpec
from ft_assets.models.base_model import load_model, parameter_count
from ft_assets_tests.conftest import formatted_examples

LORA_KEYS = dict(r=4, alpha=8, dropout=0.0)
# name -> spec (learning rate in `training`, as a recipe would override it)
SPECS = {
    "lora": LoraSpec(type="lora", **LORA_KEYS, training={"lr": 1e-2}),  # the reference for dora/rslora
    "full": FullSpec(type="full", training={"lr": 1e-3}),
    "last_layers": LastLayersSpec(type="last_layers", n_layers=1, training={"lr": 1e-3}),
    "dora": LoraVariantSpec(type="dora", **LORA_KEYS, training={"lr": 1e-2}),
    "rslora": LoraVariantSpec(type="rslora", **LORA_KEYS, training={"lr": 1e-2}),
    "lora_fa": LoraVariantSpec(type="lora_fa", **LORA_KEYS, training={"lr": 1e-2}),
    "lora_plus": LoraPlusSpec(type="lora_plus", **LORA_KEYS, ratio=16, training={"lr": 2e-3}),
    "delta_lora": DeltaLoraSpec(type="delta_lora", **LORA_KEYS, delta_lambda=0.5, training={"lr": 1e-2}),
    "vera": VeraSpec(type="vera", r=32, training={"lr": 5e-2}),
    "ia3": IA3Spec(type="ia3", training={"lr": 0.3}),
    "prefix": PromptLearningSpec(type="prefix", num_virtual_tokens=4, training={"lr": 0.3}),
    "prompt": PromptLearningSpec(type="prompt", num_virtual_tokens=4, training={"lr": 0.3}),
    "bottleneck": BottleneckSpec(type="bottleneck", reduction_factor=8, non_linearity="gelu", training={"lr": 1e-2}),
}
METHODS = [m for m in SPECS if m != "lora"]
MERGEABLE = ["full", "last_layers", "dora", "rslora", "lora_fa", "lora_plus", "delta_lora", "vera", "ia3"]
NOT_MERGEABLE = ["prefix", "prompt", "bottleneck"]
STEPS, CHECKPOINT_AT = 6, 3
PAD = 2


SEED = 3


def cfg(spec) -> TrainingSpec:
    base = dict(max_steps=STEPS, epochs=100, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
                checkpoint_every=CHECKPOINT_AT, max_grad_norm=1.0)
    return TrainingSpec(**{**base, **spec.training})


@dataclass
class Run:
    name: str
    method: object
    spec: object
    model: torch.nn.Module  # trained
    before: dict[str, torch.Tensor]  # state_dict right after wrap
    trainable: set[str]  # names that required grad after wrap
    loss_before: float
    loss_after: float
    result: train.TrainResult
    adapter_dir: Path
    ckpt_dir: Path
    optimizers: list = field(default_factory=list)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def wrapped(name: str, model_dir: Path, seed: int = 0):
    return wrapped_spec(SPECS[name], model_dir, seed)


def wrapped_spec(spec, model_dir: Path, seed: int = 0):
    train.seed_everything(seed)  # as the pipeline does: random adapter init is seeded
    return get_method(spec.type).wrap(load_model(model_dir), spec)


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    return formatted_examples(tiny_model_dir, 8)


@pytest.fixture(scope="module")
def run(tiny_model_dir, examples, tmp_path_factory):
    """run(name) -> Run: wrap, train STEPS steps (checkpointing), save. Cached per module."""
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name in cache:
            return cache[name]
        method, spec = get_method(SPECS[name].type), SPECS[name]
        model = wrapped(name, tiny_model_dir)
        before = snapshot(model)
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # tied: both names
        loss_before = evaluate.eval_loss(model, examples, PAD, "cpu")["eval_loss"]
        optimizers = []
        real = train.make_optimizer

        def recording(*args, **kw):  # keep the optimizer the loop builds (LoRA+ checks its groups)
            optimizers.append(real(*args, **kw))
            return optimizers[-1]

        root = tmp_path_factory.mktemp(name)
        train.make_optimizer = recording
        try:
            result = train.train(model, method, spec, examples, cfg(spec), seed=SEED, pad_id=PAD, checkpoint_dir=root / "ckpt")
        finally:
            train.make_optimizer = real
        loss_after = evaluate.eval_loss(model, examples, PAD, "cpu")["eval_loss"]
        method.save(model, root / "adapter")
        cache[name] = Run(name, method, spec, model, before, trainable, loss_before, loss_after, result,
                          root / "adapter", root / "ckpt", optimizers)
        return cache[name]

    return get


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# registry and recipe
# --------------------------------------------------------------------------------------


def test_every_recipe_type_has_a_method_and_trains_the_full_precision_base():
    assert set(R._method_types()) == set(REGISTRY)
    for name in METHODS:
        method = get_method(name)
        assert method.uses_quantized_base is False
        for hook in ("wrap", "param_groups", "save", "load", "merge"):
            assert callable(getattr(method, hook)), (name, hook)


def test_recipe_declares_methods_by_name_or_alias_with_defaults():
    r = R.parse_recipe({
        "name": "r", "datasets": [{"name": "qa", "path": "qa.jsonl"}],
        "methods": {"dora": {"r": 8}, "bottleneck": {"reduction_factor": 8}, "fast": {"type": "lora_plus"},
                    "prompt": {"init_text": "Answer:"}, "last_layers": None, "delta_lora": {}, "vera": {}},
    })
    m = r.methods
    assert (m["dora"].type, m["dora"].r) == ("dora", 8) and m["fast"].ratio == 16
    assert (m["bottleneck"].reduction_factor, m["bottleneck"].non_linearity) == (8, "relu")
    assert m["last_layers"].n_layers == 2 and m["delta_lora"].delta_lambda == 0.5 and m["vera"].r == 256
    assert m["prompt"].num_virtual_tokens == 16


@pytest.mark.parametrize("method, expected", [
    ({"lora_plus": {"ratio": 0}}, "methods.lora_plus.ratio: Input should be greater than 0"),
    ({"delta_lora": {"delta_lambda": -0.1}}, "methods.delta_lora.delta_lambda: Input should be greater than or equal to 0"),
    ({"last_layers": {"n_layers": 0}}, "methods.last_layers.n_layers: Input should be greater than or equal to 1"),
    ({"bottleneck": {"reduction_factor": 0}}, "methods.bottleneck.reduction_factor: Input should be greater than or equal to 1"),
    ({"bottleneck": {"non_linearity": "tanh"}}, "methods.bottleneck.non_linearity: Input should be 'relu', 'gelu' or 'silu'"),
    ({"prompt": {"num_virtual_tokens": 0}}, "methods.prompt.num_virtual_tokens: Input should be greater than or equal to 1"),
    ({"prefix": {"init_text": ""}}, "methods.prefix.init_text: String should have at least 1 character"),
    ({"vera": {"r": 0}}, "methods.vera.r: Input should be greater than or equal to 1"),
    ({"my_dora": {"type": "dora", "rank": 4}}, "methods.my_dora: unknown key 'rank'"),
    ({"x": {"type": "dorra"}}, "methods.x: unknown method type 'dorra'"),
])
def test_bad_method_keys_are_named(method, expected):
    with pytest.raises(R.RecipeError) as err:
        R.parse_recipe({"name": "r", "datasets": [{"name": "qa", "path": "qa.jsonl"}], "methods": method}, "recipe.yaml")
    assert expected in str(err.value), str(err.value)


# --------------------------------------------------------------------------------------
# what every method must do
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_a_few_steps_lower_the_loss_on_the_training_rows(run, name):
    r = run(name)
    assert r.result.steps == STEPS
    # a random-init model gives virtual tokens and rescaling vectors little to work with: 0.03 is
    # several times what those methods need to show, and far above evaluation noise (none: deterministic)
    assert r.loss_after < r.loss_before - 0.03, (r.loss_before, r.loss_after)


@pytest.mark.parametrize("name", METHODS)
def test_frozen_weights_stay_bit_identical(run, name):
    r = run(name)
    after = r.model.state_dict()
    frozen = [n for n in r.before if n not in r.trainable]
    if name == "delta_lora":  # its base weights move by design (checked below)
        frozen = [n for n in frozen if ".base_layer." not in n]
    moved = [n for n in frozen if changed(r.before[n], after[n])]
    assert moved == [], moved
    assert any(changed(r.before[n], after[n]) for n in r.trainable)


@pytest.mark.parametrize("name", METHODS)
def test_saved_state_on_a_fresh_base_reproduces_the_trained_model(run, name, tiny_model_dir, examples):
    r = run(name)
    loaded = r.method.load(load_model(tiny_model_dir), r.adapter_dir)
    assert merge.max_logit_difference(loaded, r.model, examples[:4], PAD, "cpu") < 1e-5
    # ...and the trained model is not the base (else the comparison above proves nothing)
    assert merge.max_logit_difference(load_model(tiny_model_dir), r.model, examples[:4], PAD, "cpu") > 1e-3
    assert not list(r.adapter_dir.glob("*.bin")) and not list(r.adapter_dir.glob("*.pt"))  # no pickle


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_model_matches_base_plus_adapter(run, name, tiny_model_dir, examples, tmp_path):
    r = run(name)
    merged = merge.merged(r.method, tiny_model_dir, r.adapter_dir, None, "cpu")
    assert type(merged).__module__.startswith("transformers.")  # a plain transformers model, no peft wrapper
    assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "vera_", "ia3_", "adapter"))
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    reloaded = load_model(tmp_path / "merged")
    reference = merge.unmerged(r.method, tiny_model_dir, r.adapter_dir, None, "cpu")
    cmp = merge.compare(reloaded, reference, r.method, examples[:4], PAD, "cpu")
    assert cmp.passed, cmp
    assert not merge.compare(reloaded, load_model(tiny_model_dir), r.method, examples[:4], PAD, "cpu").passed


@pytest.mark.parametrize("name", NOT_MERGEABLE)
def test_non_mergeable_methods_say_why(run, name, tiny_model_dir):
    r = run(name)
    with pytest.raises(NotMergeable, match="virtual tokens|non-linearity"):
        merge.merged(r.method, tiny_model_dir, r.adapter_dir, None, "cpu")


@pytest.mark.parametrize("name", ["lora", *METHODS])  # lora: the name-matching path, unchanged
def test_resume_from_checkpoint_matches_the_uninterrupted_run(run, name, tiny_model_dir, examples, tmp_path):
    r = run(name)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(r.ckpt_dir, ckpt)
    assert checkpoint.latest_checkpoint(ckpt).name == f"step-{CHECKPOINT_AT:06d}"
    # another seed: whatever the checkpoint holds must come from the checkpoint, not the init
    resumed = wrapped(name, tiny_model_dir, seed=1234)
    result = train.train(resumed, r.method, r.spec, examples, cfg(r.spec), seed=SEED, pad_id=PAD, checkpoint_dir=ckpt)
    assert result.resumed_from_step == CHECKPOINT_AT and result.steps == STEPS
    assert [l for _, l in result.losses] == pytest.approx([l for _, l in r.result.losses], abs=1e-5)
    ref = r.model.state_dict()
    for n, t in resumed.state_dict().items():
        torch.testing.assert_close(t, ref[n], atol=1e-6, rtol=1e-5, msg=n)


# --------------------------------------------------------------------------------------
# what defines each method
# --------------------------------------------------------------------------------------


def test_full_trains_every_weight(run):
    r = run("full")
    params = dict(r.model.named_parameters(remove_duplicate=False))
    assert all(p.requires_grad for p in params.values()) and set(params) == r.trainable
    unchanged = [n for n, p in params.items() if not changed(r.before[n], p)]
    assert unchanged == [], unchanged
    assert (r.adapter_dir / "config.json").is_file() and list(r.adapter_dir.glob("model*.safetensors"))


def test_prefix_from_init_text_is_exactly_that_text_in_front(tiny_model_dir, examples):
    """Li & Liang's initialisation from real activations: before training, the prefix model's
    logits are the base model's logits with the init text's tokens in front of the input."""
    spec = PromptLearningSpec(type="prefix", num_virtual_tokens=6, init_text="Answer with the figure only.")
    text_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(spec.init_text, add_special_tokens=False)["input_ids"]
    text_ids = (text_ids * 6)[:6]  # repeated or cut to num_virtual_tokens, as the init does
    base = load_model(tiny_model_dir).eval()
    prefixed = wrapped_spec(spec, tiny_model_dir).eval()
    random_init = wrapped("prefix", tiny_model_dir).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        reference = base(input_ids=torch.cat([torch.tensor([text_ids]), ids], dim=1)).logits[:, 6:]
        got = prefixed(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        rand = random_init(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (got - reference).abs().max().item() < 1e-4
    assert (rand - base(input_ids=ids).logits).abs().max().item() > 1e-2  # peft's random init is not the base


def test_last_layers_trains_top_blocks_norm_and_an_untied_head(run, tiny_model_dir, examples):
    r = run("last_layers")
    m = r.model
    assert m.lm_head.weight is not m.model.embed_tokens.weight and m.config.tie_word_embeddings is False
    top = {n for n in r.before if n.startswith("model.layers.1.")}
    assert r.trainable == top | {"model.norm.weight", "lm_head.weight"}
    after = m.state_dict()
    for n in r.before:
        if n.startswith("model.layers.0.") or n == "model.embed_tokens.weight":
            assert torch.equal(r.before[n], after[n]), n  # frozen bottom and input embeddings
    assert all(changed(r.before[n], after[n]) for n in r.trainable)
    # untying copies the head: the wrapped, untrained model is the base
    fresh = wrapped("last_layers", tiny_model_dir)
    assert merge.max_logit_difference(fresh, load_model(tiny_model_dir), examples[:4], PAD, "cpu") == 0.0


@pytest.mark.parametrize("name, flag", [("dora", "use_dora"), ("rslora", "use_rslora")])
def test_dora_and_rslora_set_their_peft_flag_and_differ_from_plain_lora(run, name, flag, examples):
    r, plain = run(name), run("lora")
    config = r.model.peft_config["default"]
    assert getattr(config, flag) is True
    assert getattr(plain.model.peft_config["default"], flag) is False
    q = r.model.base_model.model.model.layers[0].self_attn.q_proj
    if name == "rslora":
        assert q.scaling["default"] == pytest.approx(LORA_KEYS["alpha"] / math.sqrt(LORA_KEYS["r"]))
    else:
        assert any("lora_magnitude_vector" in n for n in r.trainable)
        assert q.scaling["default"] == pytest.approx(LORA_KEYS["alpha"] / LORA_KEYS["r"])
    # same seed, data and steps as plain LoRA, yet a different model
    assert merge.max_logit_difference(r.model, plain.model, examples[:4], PAD, "cpu") > 1e-3


def test_lora_plus_trains_b_at_ratio_times_a_learning_rate(run):
    r = run("lora_plus")
    (optimizer,) = r.optimizers
    groups = {g["name"]: g for g in optimizer.param_groups}
    a_ids = {id(p) for n, p in r.model.named_parameters() if "lora_A" in n}
    b_ids = {id(p) for n, p in r.model.named_parameters() if "lora_B" in n}
    assert {id(p) for p in groups["lora_A"]["params"]} == a_ids
    assert {id(p) for p in groups["lora_B"]["params"]} == b_ids
    assert groups["lora_A"]["lr"] == pytest.approx(cfg(r.spec).lr)
    assert groups["lora_B"]["lr"] == pytest.approx(r.spec.ratio * groups["lora_A"]["lr"])


def test_lora_fa_keeps_a_at_its_random_init_and_trains_b(run):
    r = run("lora_fa")
    params = dict(r.model.named_parameters())
    a = [n for n in params if "lora_A" in n]
    b = [n for n in params if "lora_B" in n]
    assert a and b and r.trainable == set(b)
    assert all(torch.equal(r.before[n], params[n]) for n in a)
    assert all(r.before[n].abs().sum() > 0 for n in a)  # random, not zero
    assert all(changed(r.before[n], params[n]) for n in b)


def test_vera_shares_one_frozen_projection_pair_and_trains_only_scaling_vectors(run):
    r = run("vera")
    from peft.tuners.vera import Linear as VeraLinear

    layers = [m for m in r.model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 14  # all-linear: 7 per block, 2 blocks
    for attr in ("vera_A", "vera_B"):
        tensors = [getattr(m, attr)["default"] for m in layers]
        assert all(t is tensors[0] for t in tensors)  # one buffer shared by every layer
        assert not tensors[0].requires_grad
        assert not any(t is p for t in tensors for p in r.model.parameters())  # a buffer, not a parameter
    assert r.trainable and all(n.split(".")[-2] in ("vera_lambda_b", "vera_lambda_d") for n in r.trainable)
    params = dict(r.model.named_parameters())
    assert all(changed(r.before[n], params[n]) for n in r.trainable)


def test_delta_lora_moves_the_base_weight_by_the_accumulated_product_delta(run):
    r = run("delta_lora")
    from ft_assets.methods.delta_lora import lora_linears

    lam = r.spec.delta_lambda
    worst, largest = 0.0, 0.0
    for name, layer in lora_linears(r.model):
        prefix = f"base_model.model.{name}"
        w0, w = r.before[f"{prefix}.base_layer.weight"], layer.get_base_layer().weight
        a0, b0 = r.before[f"{prefix}.lora_A.default.weight"], r.before[f"{prefix}.lora_B.default.weight"]
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        expected = lam * layer.scaling["default"] * (b @ a - b0 @ a0)
        worst = max(worst, float((w - w0 - expected).abs().max()))
        largest = max(largest, float(expected.abs().max()))
    assert largest > 1e-3  # the update is not negligible...
    assert worst < 1e-6, worst  # ...and W moved by exactly it


def test_delta_lora_artifact_reproduces_the_trained_weights_bit_for_bit(run, tiny_model_dir, examples):
    r = run("delta_lora")
    loaded = r.method.load(load_model(tiny_model_dir), r.adapter_dir)
    trained, reloaded = r.model.state_dict(), loaded.state_dict()
    assert set(trained) == set(reloaded)
    assert all(torch.equal(trained[n], reloaded[n]) for n in trained)
    assert merge.max_logit_difference(loaded, r.model, examples[:4], PAD, "cpu") == 0.0


def test_ia3_trains_only_its_rescaling_vectors(run):
    r = run("ia3")
    assert r.trainable and all(".ia3_l." in n for n in r.trainable)
    params = dict(r.model.named_parameters())
    assert all(params[n].ndim == 2 and 1 in params[n].shape for n in r.trainable)  # vectors
    assert all(changed(r.before[n], params[n]) for n in r.trainable)


def test_bottleneck_parameter_count_and_identity_start(run, tiny_model_dir, examples):
    r = run("bottleneck")
    config = r.model.config
    hidden, d = config.hidden_size, config.hidden_size // r.spec.reduction_factor
    trainable, _ = parameter_count(r.model)
    assert trainable == config.num_hidden_layers * 2 * (2 * hidden * d + d + hidden)
    assert {n.split(".bottleneck_adapter.")[0].rsplit(".", 1)[1] for n in r.trainable} == {"self_attn", "mlp"}
    fresh = wrapped("bottleneck", tiny_model_dir)
    assert merge.max_logit_difference(fresh, load_model(tiny_model_dir), examples[:4], PAD, "cpu") == 0.0


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_token_loss_equals_cross_entropy_by_hand(run, name, examples):
    r = run(name)
    batch = packing.collate(examples[:4], PAD, "cpu")
    with torch.no_grad():
        loss, n = prepared.token_loss_sum(r.model, batch)
        logits = r.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    length = batch["input_ids"].size(1)
    assert logits.size(1) == length + (r.spec.num_virtual_tokens if name == "prompt" else 0)
    logits = logits[:, -length:]  # the real positions
    labels = batch["labels"][:, 1:]
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=data.IGNORE_INDEX, reduction="sum")
    assert n == int((labels != data.IGNORE_INDEX).sum())
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    base = [n for n in r.before if n not in r.trainable]
    after = r.model.state_dict()
    assert base and all(torch.equal(r.before[n], after[n]) for n in base)  # every base weight untouched
