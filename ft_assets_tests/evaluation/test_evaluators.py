"""Evaluators declared in the recipe: an `evaluate` metric module by path (the shipped example and
a user's own file), what its output becomes (scores, per-example columns, raw), its errors, and
that editing the file re-versions the evaluation steps (and nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ft_assets.config.recipe import PACKAGE_DIR, load_recipe
from ft_assets.evaluation import evaluators
from ft_assets.evaluation.evaluators.evaluate_module import EvaluateModuleSpec, run

FIGURES = PACKAGE_DIR / "recipes" / "metrics" / "figure_recall.py"
LENGTH_METRIC = '''
import datasets
import evaluate


class AnswerLength(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="words per answer", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("string"),
                                                               "references": datasets.Value("string")}))

    def _compute(self, predictions, references, unit=1):
        words = [len(p.split()) * unit for p in predictions]
        return {"words": sum(words) / len(words), "words_each": words, "note": "lengths"}
'''


def answered(predictions: list[str], references: list[str]) -> evaluators.Answered:
    n = len(predictions)
    return evaluators.Answered("lora", [f"r{i}" for i in range(n)], ["qa"] * n, ["q"] * n, references, predictions,
                               Path("."), None, "cpu")


def spec(**kw) -> EvaluateModuleSpec:
    return EvaluateModuleSpec(type="evaluate", **{"path": "metric.py", **kw})


def test_the_shipped_figure_recall_module_scores_the_figures_of_each_answer():
    result = run(spec(name="figures"), answered(["It was $4,512 million.", "no idea", "1.5 and 7"],
                                                ["4,512 million", "$3 billion", "7 and 1.5"]), [FIGURES])
    assert result.scores == {"figure_recall": 0.6667} and result.higher_is_better == {"figure_recall": True}
    assert result.columns == {"figure_recall_scores": [1.0, 0.0, 1.0]}


def test_a_users_module_gets_its_arguments_and_its_outputs_are_sorted_by_shape(tmp_path):
    path = tmp_path / "length.py"
    path.write_text(LENGTH_METRIC)
    result = run(spec(name="length", args={"unit": 2}, higher_is_better={"words": False}),
                 answered(["one two", "one"], ["x", "y"]), [path])
    assert result.scores == {"words": 3.0} and result.higher_is_better == {"words": False}
    assert result.columns == {"words_each": [4, 2]} and result.raw == {"other_outputs": {"note": "lengths"}}
    results = {"length": result}
    assert evaluators.scores_of(results) == {"length.words": 3.0}
    evaluators.save(results, ["r0", "r1"], tmp_path)
    assert pd.read_parquet(tmp_path / "evaluators.parquet").to_dict("list") == {"id": ["r0", "r1"], "length.words_each": [4, 2]}
    assert json.loads((tmp_path / "length.json").read_text()) == {"other_outputs": {"note": "lengths"}}

    path.write_text(LENGTH_METRIC.replace("len(p.split()) * unit", "len(p) * unit"))  # edited: loaded again
    assert run(spec(name="length"), answered(["abc"], ["x"]), [path]).scores == {"words": 3.0}


def test_asking_for_a_score_the_module_does_not_return_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"evaluator figures: .* returned no number named recall .*fix `keep:`"):
        run(spec(name="figures", keep=["recall"]), answered(["1"], ["1"]), [FIGURES])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(spec(), answered(["1"], ["1"]), [tmp_path / "missing.py"])


def test_editing_the_metric_file_re_versions_the_evaluation_steps_only(tmp_path, tiny_model_dir):
    from ft_assets.definitions import build_definitions
    from ft_assets_tests.conftest import make_recipe

    (tmp_path / "m.py").write_text(FIGURES.read_text())
    recipe = make_recipe(tiny_model_dir, evaluation={"evaluators": [{"type": "evaluate", "name": "f", "path": "m.py"}]})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qa.jsonl").write_text("")

    def code_versions() -> dict[str, str]:
        defs = build_definitions(load_recipe(tmp_path / "recipe.yaml"), home=str(tmp_path / "home"))
        return {s.key.to_user_string(): s.code_version for a in defs.assets for s in getattr(a, "specs", ())}

    before = code_versions()
    (tmp_path / "m.py").write_text(FIGURES.read_text() + "\n# a new rule\n")
    after = code_versions()
    assert sorted(k for k in before if before[k] != after[k]) == ["base_eval", "champion", "eval_report"]


def test_the_leaderboard_gets_a_column_per_evaluator_score_only_when_there_are_some():
    from ft_assets.evaluation.report import leaderboard

    plain = {"token_f1": 0.5, "exact_match": 0.1, "rouge_l": 0.4, "eval_loss": 1.0}
    board = leaderboard({"lora": "lora"}, {"lora": ({**plain, "figures.figure_recall": 0.8}, {})},
                        {**plain, "figures.figure_recall": 0.6})
    frame = board.frame()
    assert list(frame["figures.figure_recall"]) == [0.8, 0.6] and str(frame["figures.figure_recall"].dtype) == "float64"
    assert "figures.figure_recall" not in leaderboard({"lora": "lora"}, {"lora": (plain, {})}, plain).frame()


def test_modules_load_when_ft_home_changes_within_one_process(tmp_path, monkeypatch):
    """evaluate imports every module as `evaluate_modules.metrics.<name>` from the first modules
    cache of the process; a later FT_HOME (another project, another test) must not break loading."""
    from ft_assets.evaluation.qa_metrics import score_answers

    monkeypatch.setenv("FT_HOME", str(tmp_path / "first"))
    score_answers(["1"], ["1"])  # the built-in metrics, loaded once per process
    for i, home in enumerate(("second", "third")):
        monkeypatch.setenv("FT_HOME", str(tmp_path / home))
        path = tmp_path / home / f"metric_{i}.py"
        path.parent.mkdir(parents=True)
        path.write_text(LENGTH_METRIC)
        assert run(spec(name="length"), answered(["a b"], ["x"]), [path]).scores == {"words": 2.0}
