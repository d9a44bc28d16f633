"""The shipped general-capability probe: lm-eval task YAMLs and their rows, plain files in this package.

A smoke probe of general ability, not a benchmark: three small multiple-choice tasks with known
answers, written by `generate.py` (seeded, reproducible; the files are committed), that
SmolLM2-135M-Instruct partly solves and that fine-tuning on one narrow domain can damage.
Each is scored by lm-eval's loglikelihood `multiple_choice` (`acc`; no generation, so it is cheap):

    probe_arithmetic  "What is 3 + 5?"                          one-digit sums and differences
    probe_capitals    "Which country has Lima as its capital?"  capitals of 70 well-known countries
    probe_antonyms    'What is the opposite of "hot"?'          common English antonyms

60 scored rows each, four choices (chance: 0.25), prompted "Question: ...\nAnswer:". The
untuned SmolLM2-135M-Instruct scores about 0.53, 0.90 and 0.88 (2026-12-07).

`<task>.jsonl` holds the scored rows (split `test`), `<task>.fewshot.jsonl` five other rows (split
`train`, the few-shot examples when `num_fewshot` is set). The YAMLs name their files relative
to themselves; the `lm_eval` evaluator makes such paths absolute before lm-eval reads them.
`PROBE_DIR` is this directory (the evaluator's default `include_path`), `PROBE_TASKS` its tasks.
"""

from pathlib import Path

PROBE_DIR = Path(__file__).resolve().parent
PROBE_TASKS = ("probe_arithmetic", "probe_capitals", "probe_antonyms")
