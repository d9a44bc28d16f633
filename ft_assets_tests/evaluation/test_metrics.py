"""The QA metrics: the `evaluate` modules in ft_assets/evaluation/metrics/, through `evaluation.qa_metrics` and on their own."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from ft_assets.evaluation.qa_metrics import mean_scores, perplexity, qa_scores, score_answers
from ft_assets.evaluation.metrics import MODULE_FILES
from ft_assets.evaluation.metrics.qa_normalize import normalize

FROZEN = Path(__file__).parent / "fixtures" / "qa_scores_finqa_eval.json"
REPO = Path(__file__).resolve().parents[2]


def test_normalize_keeps_number_separators_and_drops_articles():
    assert normalize("The $4,512 million.") == "4,512 million"
    assert normalize("12.5%") == "12.5"
    assert normalize("  An   Apple ") == "apple"


def test_exact_match_and_f1():
    assert qa_scores("$4,512 million", "4,512 million")["exact_match"] == 1.0
    assert qa_scores("4,512", "4,512 million")["exact_match"] == 0.0
    assert qa_scores("4,512", "4,512 million")["token_f1"] == 2 * (1.0 * 0.5) / 1.5
    assert qa_scores("revenue was 4,512 million", "4,512 million")["token_f1"] == 2 * (0.5 * 1.0) / 1.5
    assert qa_scores("", "x")["token_f1"] == 0.0 and qa_scores("", "")["token_f1"] == 1.0
    assert qa_scores("4512", "4,512")["token_f1"] == 0.0  # a different figure is wrong


def test_rouge_l_and_means():
    assert qa_scores("cloud services", "cloud services")["rouge_l"] == 1.0
    assert 0 < qa_scores("the cloud segment", "cloud services")["rouge_l"] < 1
    rows = [qa_scores("a b", "a b"), qa_scores("c", "a b")]
    assert mean_scores(rows)["exact_match"] == 0.5
    assert score_answers([], []).means == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}


def bits(x: float) -> bytes:
    return struct.pack("<d", float(x))


def test_metric_modules_reproduce_the_scores_of_the_code_they_replaced():
    """Scores frozen from the old `evaluation.qa_metrics` functions (fixtures/make_qa_scores.py, run before the
    move) on the shipped finqa eval split with perturbed predictions: equal to the last bit."""
    frozen = json.loads(FROZEN.read_text())
    pairs = frozen["pairs"]
    assert frozen["eval_examples"] == 63 and len(pairs) == 7 * 63
    scores = score_answers([p["prediction"] for p in pairs], [p["reference"] for p in pairs])
    for key in ("exact_match", "token_f1", "rouge_l"):
        got = scores.per_example[key]
        wrong = [(p["id"], p["variant"], p[key], g) for p, g in zip(pairs, got) if bits(p[key]) != bits(g)]
        assert not wrong, (key, wrong[:5])
    assert scores.means == frozen["means"]["all"]
    for variant, means in frozen["means"].items():
        if variant != "all":
            mine = [p for p in pairs if p["variant"] == variant]
            assert score_answers([p["prediction"] for p in mine], [p["reference"] for p in mine]).means == means
    # the fixture is not trivially satisfied: the perturbations score differently
    assert 0 < frozen["means"]["all"]["token_f1"] < 1 and frozen["means"]["figure_changed"]["exact_match"] == 0.0


def test_perplexity_is_exp_of_the_mean_token_loss_capped():
    assert perplexity(0.0) == 1.0 and perplexity(2.0) == round(7.38905609893065, 3)
    assert perplexity(1e6) == perplexity(50.0)  # a diverged model reports a finite number


def test_evaluate_load_by_path_offline_in_a_fresh_process(tmp_path):
    """Outside the project's API: plain `evaluate.load(<file>)` and `evaluate.combine`, offline, from
    another directory; evaluate writes only under HF_HOME."""
    script = (
        "import json, sys, evaluate\n"
        "ms = [evaluate.load(p, keep_in_memory=True) for p in sys.argv[1:]]\n"
        "out = evaluate.combine(ms).compute(predictions=['The $4,512 million.', '4512'],"
        " references=['4,512 million', '4,512'])\n"
        "print(json.dumps({'result': out, 'names': [m.name for m in ms], 'doc': ms[1].__doc__}))\n"
    )
    home = tmp_path / "home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HOME": str(home), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_MODULES_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script, *map(str, MODULE_FILES.values())], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["names"] == ["exact_match", "token_f1", "rouge_l"]
    res = got["result"]
    assert res["exact_match_scores"] == [1.0, 0.0] and res["token_f1_scores"] == [1.0, 0.0]
    assert res["exact_match"] == 0.5 and res["token_f1"] == 0.5 and 0 < res["rouge_l"] <= 1
    assert "number" in got["doc"]  # the module's description is the metric's docstring
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (tmp_path / "hf" / "modules").is_dir()


def test_the_pipeline_keeps_evaluate_s_files_under_ft_home(tmp_path):
    script = ("from ft_assets.evaluation.qa_metrics import score_answers\n"
              "print(score_answers(['a b'], ['a b']).means)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home"), "FT_HOME": str(tmp_path / "ft"),
           "PYTHONPATH": str(REPO)}  # this checkout, whatever the venv's editable install points at
    for var in ("HF_HOME", "HF_MODULES_CACHE"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'exact_match': 1.0" in run.stdout
    assert not (tmp_path / "home").exists()
    assert sorted(p.name for p in (tmp_path / "ft" / "cache" / "evaluate").iterdir()) == ["metrics", "modules"]
