"""`type: judge`: an LLM grades the answers, through any OpenAI-compatible chat endpoint
(llama-server, vLLM, Ollama, a hosted API), with the `openai` client.

    evaluators:
      - {type: judge, base_url: "http://127.0.0.1:8080/v1"}                      # pointwise, 1-10
      - {type: judge, name: vs_ref, base_url: "http://127.0.0.1:8080/v1", mode: pairwise}
      - {type: judge, base_url: "https://api.openai.com/v1", model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}

pointwise: a request per row (rubric, question, reference, the model's answer), the reply a score
1-10. Scores: `score`, the mean parsed score on that 1-10 scale (not normalised); `parsed`, the
share of replies with a score. Column `score` (None: unparsed).
pairwise: the model's answer against the reference, asked in both orders (A/B, then B/A) so that a
judge favouring a position cancels out: per row win 1 / tie 0.5 / loss 0 from each reply, summed:
above 1 wins, below loses, else ties. Scores: `win_rate` (wins + 0.5 * ties over the rows whose two
replies parsed); `parsed` (share of replies). Column `verdict` (win | tie | loss | None).
`structured` (default): replies are asked for as JSON of a fixed schema (`response_format`
json_schema, which llama-server, vLLM, Ollama and OpenAI enforce: a small judge still answers
parseably); false: `Score: N` / `Verdict: A` in free text. Raw output: per judged row its id,
prompt(s), reply(ies) and what was parsed. `max_rows`: judge the first N rows only (the rest's
columns are None). No parsed reply at all, an unset `api_key_env` variable, and an endpoint that
cannot be reached or refuses are errors naming the evaluator (the last two on the first request).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from ...config.evaluator_spec import EvaluatorSpecBase
from . import Answered, EvaluatorResult, register

DEFAULT_RUBRIC = (
    "The answers are short factual answers. Judge correctness first: an answer stating the right facts is "
    "good even when brief or worded differently; one that is wrong, does not answer, or contradicts itself is "
    "bad; missing facts and added unsupported claims count against an answer."
)
RETRIES = 2  # the openai client's own retries (connection errors, 408/429/5xx), with its backoff
CONNECT_TIMEOUT_S = 10.0  # a silent host fails in seconds, not after the whole timeout_s
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (unreachable, refusing, or no key)."""


class JudgeSpec(EvaluatorSpecBase):
    """An LLM judge behind an OpenAI-compatible endpoint."""

    type: Literal["judge"]
    base_url: Annotated[str, Field(min_length=1)]  # the API root, e.g. http://127.0.0.1:8080/v1
    model: str = ""  # the judge model's name; llama-server ignores it, hosted APIs need it
    api_key_env: Annotated[str, Field(pattern=ENV_NAME)] | None = None  # the variable holding the key (never the key); null: none
    mode: Literal["pointwise", "pairwise"] = "pointwise"  # a 1-10 score per answer, or the answer against the reference
    rubric: str | dict[str, str] = DEFAULT_RUBRIC  # one text, or task -> text with a `default` entry
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 64  # the most tokens of each reply
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0  # of the judge; 0: greedy, the same replies every run
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60  # seconds per request (the client retries twice)
    max_rows: Annotated[int, Field(ge=1)] | None = None  # judge the first N rows only; null: all
    structured: bool = True  # ask for a JSON reply (response_format json_schema); false: an endpoint refusing it

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/v1)")
        return url

    @field_validator("rubric")
    @classmethod
    def _rubric_per_task(cls, rubric: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(rubric, dict) and "default" not in rubric:
            raise ValueError("a rubric per task needs a `default` entry (for the tasks it does not name)")
        return rubric

    def rubric_for(self, task: str) -> str:
        return self.rubric if isinstance(self.rubric, str) else self.rubric.get(task, self.rubric["default"])


def run(spec: JudgeSpec, answered: Answered, files: list) -> EvaluatorResult:
    ask = _asker(spec, SCHEMAS[spec.mode] if spec.structured else None)
    rows = len(answered.ids) if spec.max_rows is None else min(spec.max_rows, len(answered.ids))
    judge = _pointwise if spec.mode == "pointwise" else _pairwise
    return judge(spec, answered, rows, ask)


def _pointwise(spec: JudgeSpec, answered: Answered, rows: int, ask) -> EvaluatorResult:
    scores: list[int | None] = [None] * len(answered.ids)
    raw = []
    for i in range(rows):
        prompt = pointwise_prompt(spec.rubric_for(answered.tasks[i]), answered.questions[i],
                                  answered.references[i], answered.predictions[i], spec.structured)
        reply = ask(prompt)
        scores[i] = parse_score(reply)
        raw.append({"id": answered.ids[i], "prompt": prompt, "reply": reply, "parsed": scores[i]})
    got = [s for s in scores[:rows] if s is not None]
    _require_parsed(spec, bool(got), raw)
    return EvaluatorResult({"score": round(sum(got) / len(got), 4), "parsed": round(len(got) / max(rows, 1), 4)},
                           {"score": True, "parsed": True}, {"score": scores}, raw=raw)


def _pairwise(spec: JudgeSpec, answered: Answered, rows: int, ask) -> EvaluatorResult:
    verdicts: list[str | None] = [None] * len(answered.ids)
    raw, parsed = [], 0
    for i in range(rows):
        rubric, question = spec.rubric_for(answered.tasks[i]), answered.questions[i]
        model, reference = answered.predictions[i], answered.references[i]
        prompts = [pairwise_prompt(rubric, question, model, reference, spec.structured),
                   pairwise_prompt(rubric, question, reference, model, spec.structured)]
        replies = [ask(p) for p in prompts]
        picks = [parse_verdict(r) for r in replies]
        parsed += sum(p is not None for p in picks)
        verdicts[i] = verdict_of(*picks)
        raw.append({"id": answered.ids[i], "prompts": prompts, "replies": replies, "parsed": picks,
                    "verdict": verdicts[i]})
    judged = [v for v in verdicts[:rows] if v is not None]
    _require_parsed(spec, bool(judged), raw)
    wins = sum(v == "win" for v in judged) + 0.5 * sum(v == "tie" for v in judged)
    return EvaluatorResult({"win_rate": round(wins / len(judged), 4), "parsed": round(parsed / max(2 * rows, 1), 4)},
                           {"win_rate": True, "parsed": True}, {"verdict": verdicts}, raw=raw)


# What the judge is asked to reply, per mode: the JSON schema (structured) and the free-text form.
SCHEMAS = {
    "pointwise": {"type": "object", "properties": {"score": {"type": "integer", "enum": list(range(1, 11))}},
                  "required": ["score"], "additionalProperties": False},
    "pairwise": {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
                 "required": ["verdict"], "additionalProperties": False},
}
_REPLY_FORMS = {
    ("pointwise", True): 'Reply with JSON, {"score": N}, where N is an integer from 1 (worst) to 10 (best).',
    ("pointwise", False): "Reply with one line, `Score: N`, where N is an integer from 1 (worst) to 10 (best).",
    ("pairwise", True): 'Which answer is better by the rubric? Reply with JSON, {"verdict": "A"}, {"verdict": "B"} '
                        'or {"verdict": "tie"}.',
    ("pairwise", False): "Which answer is better by the rubric? Reply with one line: `Verdict: A`, `Verdict: B` or "
                         "`Verdict: tie`.",
}


def pointwise_prompt(rubric: str, question: str, reference: str, answer: str, structured: bool = True) -> str:
    return (f"Grade an answer to a question.\n\nRubric: {rubric}\n\nQuestion:\n{question}\n\n"
            f"Reference answer (correct):\n{reference}\n\nAnswer to grade:\n{answer}\n\n"
            + _REPLY_FORMS["pointwise", structured])


def pairwise_prompt(rubric: str, question: str, answer_a: str, answer_b: str, structured: bool = True) -> str:
    return (f"Compare two answers to a question.\n\nRubric: {rubric}\n\nQuestion:\n{question}\n\n"
            f"Answer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n" + _REPLY_FORMS["pairwise", structured])


_SCORE = re.compile(r"score\W{0,4}(\d{1,2})\b|\b(\d{1,2})\s*/\s*10\b|^\W*(\d{1,2})\W*$", re.IGNORECASE)
_VERDICT = re.compile(r"verdict\W{0,4}(A|B|tie)\b|^\W*(A|B|tie)\W*$", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    """The first `{"score": N}` or `Score: N` (or `N/10`, or a bare N) of a reply when N is in 1-10,
    else None."""
    found = _SCORE.search(reply.strip())
    score = int(next(g for g in found.groups() if g)) if found else None
    return score if score is not None and 1 <= score <= 10 else None


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from the first `{"verdict": "X"}` or `Verdict: X` (or a bare X) of a reply,
    else None."""
    found = _VERDICT.search(reply.strip())
    pick = next(g for g in found.groups() if g) if found else None
    return None if pick is None else ("tie" if pick.lower() == "tie" else pick.upper())


def verdict_of(model_first: str | None, model_second: str | None) -> str | None:
    """The model's verdict from the A/B reply (model is A) and the B/A reply (model is B)."""
    if model_first is None or model_second is None:
        return None
    points = {"A": 1.0, "tie": 0.5, "B": 0.0}[model_first] + {"B": 1.0, "tie": 0.5, "A": 0.0}[model_second]
    return "win" if points > 1 else "loss" if points < 1 else "tie"


def _require_parsed(spec: JudgeSpec, any_parsed: bool, raw: list[dict[str, Any]]) -> None:
    """A score needs at least one parsed reply: none is an error, not a made-up number."""
    if not raw:
        raise JudgeError(f"evaluator {spec.label} (judge): there are no held-out rows to judge")
    if not any_parsed:
        first = raw[0].get("reply", (raw[0].get("replies") or [""])[0])
        raise JudgeError(f"evaluator {spec.label} (judge): none of the judge's {len(raw)} row(s) gave a parseable "
                         f"{'score' if spec.mode == 'pointwise' else 'verdict'} (first reply: {first[:200]!r}); "
                         "use a judge model that follows the format, or raise max_tokens")


def _asker(spec: JudgeSpec, schema: dict[str, Any] | None):
    """prompt -> the judge's reply text (JSON of `schema` when given), with errors naming the
    evaluator and the endpoint."""
    import openai

    form = {"type": "json_schema", "json_schema": {"name": f"judge_{spec.mode}", "schema": schema, "strict": True}}
    extra = {} if schema is None else {"response_format": form}
    client = openai.OpenAI(base_url=spec.base_url, api_key=_api_key(spec), max_retries=RETRIES,
                           timeout=openai.Timeout(spec.timeout_s, connect=min(spec.timeout_s, CONNECT_TIMEOUT_S)))

    def ask(prompt: str) -> str:
        try:
            reply = client.chat.completions.create(model=spec.model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=spec.max_tokens, temperature=spec.temperature, **extra)
        except openai.APIConnectionError as e:  # refused, unresolvable, or silent past the timeout
            raise JudgeError(f"evaluator {spec.label} (judge): cannot reach {spec.base_url} ({e.__class__.__name__}: "
                             f"{e}); start the server (e.g. `llama-server -m judge.gguf --port 8080`) or fix "
                             "`base_url`") from e
        except openai.APIStatusError as e:
            raise JudgeError(f"evaluator {spec.label} (judge): {spec.base_url} answered HTTP {e.status_code} "
                             f"({str(e)[:300]}); {_hint(e.status_code)}") from e
        choices = reply.choices or []
        return (choices[0].message.content or "") if choices else ""

    return ask


def _hint(status: int) -> str:
    if status in (401, 403):
        return "the endpoint wants a key: set `api_key_env` to the variable that holds it"
    if status == 400:
        return "if the endpoint refuses `response_format`, set `structured: false`"
    if status == 404:
        return "check that `base_url` is the API root (often ending in /v1) and that `model` exists there"
    return "check the server's log"


def _api_key(spec: JudgeSpec) -> str:
    """The key from the variable `api_key_env` names; a placeholder when it is null (the client
    requires a key, and must not pick up OPENAI_API_KEY on its own for an endpoint without one)."""
    if spec.api_key_env is None:
        return "no-key"
    key = os.environ.get(spec.api_key_env, "").strip()
    if not key:
        raise JudgeError(f"evaluator {spec.label} (judge): api_key_env names {spec.api_key_env}, which is not set "
                         f"(or empty) in this environment; export {spec.api_key_env}=<key> before running "
                         "(the key never goes in the recipe)")
    return key


register(JudgeSpec, run)
