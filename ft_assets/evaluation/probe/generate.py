"""Write the shipped probe's rows and task YAMLs: `python -m ft_assets.evaluation.probe.generate`.

Seeded and deterministic: running it again rewrites the same bytes (the files are committed, and
their content is hashed into every evaluation's code version, so a change here re-evaluates).
The facts are hand-listed below (capital cities, antonym pairs) or computed (one-digit sums and
differences); each row is a question, four choices and the index of the right one, the wrong ones
drawn from the other rows' answers, so no choice is the odd one out.

Every choice is one token (after its leading space) in SmolLM2's tokenizer: a country name, a
common word, a digit. lm-eval then scores all four choices of a question from one forward pass
(its one-token-continuation cache), which keeps the probe at ~180 forward passes in all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import PROBE_DIR, PROBE_TASKS

SEED = 20261207
ROWS = 60  # scored rows per task
FEWSHOT = 5  # few-shot rows per task, disjoint from the scored ones
CHOICES = 4

# (country, its capital); asked the other way round, so the choices are countries (one token each)
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Russia", "Moscow"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"),
    ("Australia", "Canberra"), ("Iceland", "Reykjavik"), ("Lebanon", "Beirut"),
    ("Jordan", "Amman"), ("Qatar", "Doha"), ("Cambodia", "Phnom Penh"), ("Ecuador", "Quito"),
    ("Senegal", "Dakar"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"), ("Jamaica", "Kingston"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
]

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("dark", "light"),
    ("open", "closed"), ("early", "late"), ("high", "low"), ("young", "old"), ("rich", "poor"), ("hard", "soft"),
    ("wet", "dry"), ("full", "empty"), ("strong", "weak"), ("long", "short"), ("thick", "thin"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("true", "false"), ("clean", "dirty"), ("loud", "quiet"),
    ("deep", "shallow"), ("wide", "narrow"), ("sweet", "sour"), ("safe", "dangerous"), ("alive", "dead"),
    ("near", "far"), ("inside", "outside"), ("before", "after"), ("first", "last"), ("love", "hate"),
    ("begin", "end"), ("arrive", "depart"), ("remember", "forget"), ("friend", "enemy"),
    ("question", "answer"), ("day", "night"), ("north", "south"), ("east", "west"), ("left", "right"),
    ("always", "never"), ("cheap", "expensive"), ("easy", "difficult"), ("beautiful", "ugly"),
    ("polite", "rude"), ("healthy", "sick"), ("smooth", "rough"), ("tight", "loose"), ("entrance", "exit"),
    ("increase", "decrease"), ("maximum", "minimum"), ("victory", "defeat"), ("ancient", "modern"),
    ("top", "bottom"), ("laugh", "cry"), ("give", "take"), ("success", "failure"), ("asleep", "awake"),
    ("innocent", "guilty"), ("public", "private"), ("positive", "negative"), ("wild", "tame"),
    ("import", "export"), ("sunrise", "sunset"),
]


def multiple_choice(rng: random.Random, question: str, answer: str, pool: list[str]) -> dict:
    """One row: `answer` and CHOICES-1 distinct wrong choices from `pool`, in a seeded order."""
    wrong = rng.sample(sorted(set(pool) - {answer}), CHOICES - 1)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def arithmetic_rows(rng: random.Random, n: int) -> list[dict]:
    """Sums and differences of numbers 1-9 whose result is one digit; the wrong choices are other digits."""
    sums = [(a, "+", b) for a in range(1, 10) for b in range(1, 10) if a + b <= 9]
    differences = [(a, "-", b) for a in range(2, 10) for b in range(1, a)]
    picked = rng.sample(sums + differences, n)
    rows = []
    for a, op, b in picked:
        value = a + b if op == "+" else a - b
        rows.append(multiple_choice(rng, f"What is {a} {op} {b}?", str(value), [str(d) for d in range(10)]))
    return rows


def pair_rows(rng: random.Random, pairs: list[tuple[str, str]], template: str) -> list[dict]:
    answers = [answer for _, answer in pairs]
    return [multiple_choice(rng, template.format(subject), answer, answers) for subject, answer in pairs]


def task_rows(task: str, rng: random.Random) -> list[dict]:
    """ROWS + FEWSHOT rows of one task (the few-shot rows are the last FEWSHOT)."""
    if task == "probe_arithmetic":
        return arithmetic_rows(rng, ROWS + FEWSHOT)
    pairs, template = {
        "probe_capitals": ([(city, country) for country, city in CAPITALS], "Which country has {} as its capital?"),
        "probe_antonyms": (ANTONYMS, 'What is the opposite of "{}"?'),
    }[task]
    chosen = rng.sample(pairs, ROWS + FEWSHOT)
    return pair_rows(rng, chosen, template)


def task_yaml(task: str) -> str:
    return (
        f"# Written by generate.py. A smoke probe of general ability, not a benchmark.\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:  # relative to this file (the lm_eval evaluator resolves them)\n"
        f"    test: {task}.jsonl\n"
        f"    train: {task}.fewshot.jsonl\n"
        "test_split: test\n"
        "fewshot_split: train\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def write(out_dir: Path = PROBE_DIR) -> list[Path]:
    """Every task's YAML, rows and few-shot rows under `out_dir`; returns the files written."""
    written = []
    for i, task in enumerate(PROBE_TASKS):
        rows = task_rows(task, random.Random(SEED + i))
        files = {f"{task}.yaml": task_yaml(task),
                 f"{task}.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:ROWS]),
                 f"{task}.fewshot.jsonl": "".join(json.dumps(r) + "\n" for r in rows[ROWS:])}
        for name, text in files.items():
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
