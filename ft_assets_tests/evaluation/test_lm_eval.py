"""The `lm_eval` evaluator: lm-eval's real engine on the tiny model, offline, over the shipped probe
and over a user's own task directory; an unknown task name; an adapter really applied."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from ft_assets.config.recipe import validate_evaluator
from ft_assets.evaluation.evaluators import Answered
from ft_assets.evaluation.evaluators.lm_eval_harness import LmEvalSpec, run
from ft_assets.evaluation.probe import PROBE_DIR, PROBE_TASKS, generate

WHERE = "evaluation.evaluators[0]"


def answered(model_dir: Path, adapter_dir: Path | None = None) -> Answered:
    return Answered("base", [], [], [], [], [], Path(model_dir), adapter_dir, "cpu")


def evaluate(spec: LmEvalSpec, root: Path, model_dir: Path, adapter_dir: Path | None = None):
    files = spec.files(lambda p, key: (root / p).resolve(), WHERE)
    return run(spec, answered(model_dir, adapter_dir), files)


def write_task(directory: Path, name: str, rows: list[dict], **config) -> None:
    """A task YAML whose rows live in a json file beside it, named by a relative path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows").mkdir(exist_ok=True)
    (directory / "rows" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": f"rows/{name}.jsonl"}},
            "test_split": "test", **config}
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        raise OSError(f"test: no network (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_the_recipe_entry_defaults_to_the_shipped_probe():
    spec = validate_evaluator({"type": "lm_eval"})
    assert isinstance(spec, LmEvalSpec) and spec.label == "lm_eval" and spec.tasks == list(PROBE_TASKS)
    files = spec.files(lambda p, key: pytest.fail("the shipped probe is not a recipe path"), WHERE)
    assert {p.name for p in files} >= {f"{t}{ext}" for t in PROBE_TASKS for ext in (".yaml", ".jsonl")}
    assert all(p.parent == PROBE_DIR for p in files)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LmEvalSpec(type="lm_eval", include_path="nowhere").files(lambda p, key: Path("/nonexistent") / p, WHERE)


def test_the_shipped_probe_files_are_what_generate_writes(tmp_path):
    written = generate.write(tmp_path)
    assert {p.name for p in written} == {p.name for p in PROBE_DIR.iterdir() if p.suffix in (".yaml", ".jsonl")}
    assert all(p.read_bytes() == (PROBE_DIR / p.name).read_bytes() for p in written)


def test_the_probe_scores_every_task_with_lm_evals_directions(tiny_model_dir, ft_home, tmp_path, no_network):
    import torch

    rng_before = torch.get_rng_state()
    result = evaluate(LmEvalSpec(type="lm_eval", limit=12, num_fewshot=1), tmp_path, tiny_model_dir)
    assert set(result.scores) == {f"{t}.acc" for t in PROBE_TASKS}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert result.higher_is_better == {f"{t}.acc": True for t in PROBE_TASKS}
    table = result.tables["per_task"]
    assert sorted(table["task"]) == sorted(PROBE_TASKS) and set(table["metric"]) == {"acc"}
    assert list(table["n"]) == [12, 12, 12] and table["stderr"].notna().all()
    raw = json.loads(json.dumps(result.raw))  # JSON as it is saved
    assert set(raw["versions"]) == set(PROBE_TASKS) and raw["n-shot"] == {t: 1 for t in PROBE_TASKS}
    assert raw["n-samples"]["probe_capitals"] == {"original": 60, "effective": 12}
    assert raw["configs"]["probe_antonyms"]["output_type"] == "multiple_choice"
    assert "samples" not in raw and "pretty_env_info" not in raw
    assert (ft_home / "cache" / "lm_eval" / "datasets").is_dir()  # not ~/.cache
    assert torch.equal(torch.get_rng_state(), rng_before)  # lm-eval's seeding is undone


def test_a_users_task_directory_is_read_offline_with_paths_relative_to_its_yaml(
        tiny_model_dir, ft_home, tmp_path, monkeypatch, no_network):
    # identical choices: lm-eval's argmax takes the first, so the score is fixed by the file's answers
    rows = [{"q": f"Pick {i}.", "choices": ["same", "same"], "answer": 0 if i < 3 else 1} for i in range(4)]
    write_task(tmp_path / "evals" / "mine", "twin_choices", rows, output_type="multiple_choice",
               doc_to_text="{{q}}", doc_to_choice="{{choices}}", doc_to_target="answer")
    monkeypatch.chdir(tmp_path / "evals" / "mine" / "rows")  # lm-eval alone would resolve data files here
    spec = LmEvalSpec(type="lm_eval", include_path="evals", tasks=["twin_choices"])
    files = spec.files(lambda p, key: (tmp_path / p).resolve(), WHERE)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "evals/mine/rows/twin_choices.jsonl", "evals/mine/twin_choices.yaml"]
    result = run(spec, answered(tiny_model_dir), files)
    assert result.scores == {"twin_choices.acc": 0.75, "twin_choices.acc_norm": 0.75}
    # reports are content-hashed: the same model scored again keeps the same bytes (no date, no timings)
    assert json.dumps(run(spec, answered(tiny_model_dir), files).raw, sort_keys=True) == json.dumps(result.raw, sort_keys=True)
    assert result.higher_is_better == {"twin_choices.acc": True, "twin_choices.acc_norm": True}
    assert result.tables["per_task"]["n"].tolist() == [4, 4]


def test_an_unknown_task_is_refused_naming_the_known_ones(tmp_path):
    spec = LmEvalSpec(type="lm_eval", tasks=["probe_capitals", "hellaswag"])
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) hellaswag; .*probe_antonyms, probe_arithmetic"):
        evaluate(spec, tmp_path, tmp_path / "no_model_needed")


def lora_on(model_dir: Path, out: Path) -> tuple[Path, Path]:
    """A LoRA with random (nonzero) B on the model: its adapter dir, and the model merged with it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


def test_an_adapter_is_applied_over_the_base(tiny_model_dir, ft_home, tmp_path, no_network, monkeypatch):
    import multiprocessing

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval forked a multiprocessing pool (its shutdown can hang beside torch's threads)")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)  # perplexity's stderr is bootstrapped: in process only
    # a loglikelihood task: its perplexity moves with any change of the weights
    rows = [{"text": "The capital of France is", "target": " Paris"}, {"text": "Two plus two is", "target": " four"}]
    write_task(tmp_path / "evals", "continue", rows, output_type="loglikelihood",
               doc_to_text="{{text}}", doc_to_target="{{target}}")
    adapter, merged = lora_on(tiny_model_dir, tmp_path)
    spec = LmEvalSpec(type="lm_eval", include_path="evals", tasks=["continue"])
    bare = evaluate(spec, tmp_path, tiny_model_dir)
    tuned = evaluate(spec, tmp_path, tiny_model_dir, adapter)
    merged_run = evaluate(spec, tmp_path, merged)
    assert bare.higher_is_better["continue.perplexity"] is False  # lm-eval's direction, not a default
    assert tuned.scores["continue.perplexity"] != pytest.approx(bare.scores["continue.perplexity"], rel=1e-3)
    assert tuned.scores["continue.perplexity"] == pytest.approx(merged_run.scores["continue.perplexity"], rel=1e-3)
