"""Shared fixtures: a tiny random-init Llama (the real SmolLM2 architecture family) with the
real SmolLM2 tokenizer, a small QA dataset file, and recipes pointing at them. Also the order the
modules run in (the slowest first, see SLOW_MODULES) and how idle OpenMP threads wait."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads (torch's intra-op pool, here and in every process a test starts) sleep instead
# of spinning: two pytest-xdist workers, torchrun ranks and step processes share 2 cores, and
# spinning threads burn the time the others need (the real-model graph twice at once on 2 cores:
# 184 -> 113 CPU-s and 188 -> 116 s each; alone, up to 10 % slower). Set before torch loads its OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ft_assets.models.base_model import bundled_gguf_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# The modules that take a minute or more, slowest first (seconds per module on the project's 2-core
# machine, 2026-12-07, under `make test`'s two workers; a range: the same tests in a fast and a slow
# hour of that machine). pytest-xdist hands whole modules to its workers in collection order
# (`make test`: --dist loadfile --no-loadscope-reorder), so the long ones start first and the many
# short ones fill the end, instead of a long one starting last.
# A module missing here only runs later; a name here that no longer exists changes nothing.
SLOW_MODULES = (
    "defs/test_scale_out.py",  # ~150-280 (one shared 2-rank lora run, not three; alone 357 -> 266 CPU-s)
    "defs/test_dead_runs.py",  # ~110-250 (SIGTERM through Dagster, SIGINT in test_train; alone 191 -> 165 s)
    "e2e/test_real_model.py",  # ~130-150
    "e2e/test_ui.py",  # ~100-190
    "defs/test_object_store.py",  # ~100-160
    "defs/test_shell_dead_runs.py",  # ~60-170 (its reaper test no longer waits out a 30 s grace in full runs)
    "defs/test_beyond_sft.py",  # ~80-120 (dpo, a reward model and a GRPO policy through the graph and the automation)
    "defs/test_ray.py",  # ~80-110
    "defs/test_trl_scale_out.py",  # ~120-150 (dpo and a reward model on 2 torchrun ranks; kill -9 of a dpo rank)
    "training/test_distributed.py",  # ~55-180 (two spawns of two processes, not three; 108 -> 91 CPU-s alone)
    "defs/test_faults.py",  # ~60-100
    "publish/test_export.py",  # ~55-60
    "trainers/test_preference_resume.py",  # ~45-65 (four objectives; kill -9 of two)
    "trainers/test_beyond_sft.py",  # ~45-60
    "trainers/test_policy.py",  # ~50 (GRPO: learning, SIGTERM and kill -9 resume)
    "defs/test_graph.py",  # ~25-60
    "defs/test_automation.py",  # ~30-40
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """SLOW_MODULES first, in that order; the rest keep pytest's order (a stable sort, so the
    tests of a module keep theirs)."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}

    def module_rank(item: pytest.Item) -> int:
        inside = item.path.is_relative_to(TESTS)
        return rank.get(item.path.relative_to(TESTS).as_posix(), len(rank)) if inside else len(rank)

    items.sort(key=module_rank)


# The device the device-aware tests (packing, chunked loss, QLoRA/merge, the CUDA module) run on:
# `FT_TEST_DEVICE=cuda pytest ...` on a GPU machine; CPU everywhere else (CI).
DEVICE = os.environ.get("FT_TEST_DEVICE", "cpu")


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer, read once from the bundled GGUF (skips if `make install` did not run).
    `FT_TEST_TOKENIZER_DIR` names a saved copy instead (a GPU machine the 98 MB GGUF cannot reach)."""
    if os.environ.get("FT_TEST_TOKENIZER_DIR"):
        return Path(os.environ["FT_TEST_TOKENIZER_DIR"])
    gguf = bundled_gguf_path()
    if not gguf.is_file():
        pytest.skip(f"bundled GGUF missing at {gguf}; run `make install`")
    from filelock import FileLock
    from transformers import AutoTokenizer

    # the workers of one xdist run share one copy (their base temp dirs are siblings): reading the
    # GGUF's vocabulary takes ~6 s of a core, which both workers would spend at once as they start
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    out = shared / "smollm2_tokenizer" if shared else tmp_path_factory.mktemp("tokenizer")
    with FileLock(str(out) + ".lock") if shared else contextlib.nullcontext():
        if not (out / "tokenizer_config.json").is_file():
            tmp = out.with_name(out.name + ".tmp")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            tmp.replace(out)  # whole or absent
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(real_tokenizer_dir, tmp_path_factory) -> Path:
    """A random-init 2-layer Llama (hidden 64) with the real tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ft_assets.models.base_model import fix_special_tokens

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok)))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    fix_special_tokens(tok, model)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def qa_rows(n: int = 48) -> list[dict]:
    """Short financial QA rows (fast to tokenize and train on)."""
    rows = []
    for i in range(n):
        rev, cost = 1000 + 37 * i, 600 + 11 * i
        rows.append({
            "id": f"t{i:03d}",
            "question": "What was the gross profit?" if i % 2 else "What was total revenue?",
            "context": f"Company {i} reported revenue of ${rev} million and cost of revenue of ${cost} million.",
            "answer": f"${rev - cost} million" if i % 2 else f"${rev} million",
        })
    return rows


def formatted_examples(model_dir: Path, n: int, drop_context_every: int = 0) -> list:
    """`qa_rows(n)` as chat-formatted, answer-masked Examples (max_length 128), as sft_dataset
    builds them; with drop_context_every=k, every row whose index is not a multiple of k keeps
    its context and the others lose it (rows of several lengths)."""
    from transformers import AutoTokenizer

    from ft_assets.data import rows as data

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, row in enumerate(qa_rows(n)):
        no_context = drop_context_every and i % drop_context_every == 0
        ex = data.Example(row["id"], row["question"], None if no_context else row["context"], row["answer"], i + 1)
        msgs = data.build_messages(ex, None, "Context:\n{context}\n\nQuestion: {question}", "{question}")
        assert data.format_example(tok, ex, msgs, 128) is None
        out.append(ex)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    """A project dir: data/qa.jsonl and recipe.yaml using the tiny model as a local base."""
    return write_tiny_project(tmp_path, tiny_model_dir)


def write_tiny_project(root: Path, model_dir: Path) -> Path:
    """`project`'s files under `root` (for a fixture of a wider scope)."""
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    recipe = make_recipe(model_dir)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def make_recipe(model_dir: Path, **overrides) -> dict:
    recipe = {
        "name": "tiny",
        "seed": 7,
        "allow_paths_outside_root": True,  # the tiny model lives in pytest's tmp dir
        "datasets": [{"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25}],
        "prompt": {"max_length": 128},
        "base_model": {"source": "local", "path": str(model_dir)},
        "quantization": {"method": "nf4"},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 2, "warmup_ratio": 0.0},
        "methods": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "qlora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "evaluation": {"max_new_tokens": 8, "batch_size": 8},
        "compute": {"device": "cpu"},
    }
    recipe.update(overrides)
    return recipe


@pytest.fixture
def ft_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "ft_home"
    monkeypatch.setenv("FT_HOME", str(home))
    return home


def kill_9_once(argv: list[str], marker: Path, log_path: Path, timeout_s: float = 300) -> None:
    """Start `argv` (a training child that creates `marker` inside the step to be lost), wait for
    the marker, then SIGKILL it: no handler, no cleanup (loops bounded; the child never outlives it)."""
    import signal
    import subprocess
    import time

    with open(log_path, "w") as log:
        child = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while not marker.exists():
            assert child.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the child never reached the step the marker names"
            time.sleep(0.2)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
