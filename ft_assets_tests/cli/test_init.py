"""`python -m ft_assets init`: column guessing, questions instead of guesses, examples through the
real chat template, and a written recipe that validates with steps sized from the rows and epochs.
No training: the tokenizer is the real SmolLM2 one (read once from the bundled GGUF)."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ft_assets.cli import init
from ft_assets.cli.main import main as cli_main
from ft_assets.data.rows import eval_size
from ft_assets.training import steps
from ft_assets.training.steps import recipe_step_estimates
from ft_assets.config.recipe import TrainingSpec, load_recipe
from ft_assets_tests.conftest import qa_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir):
    from transformers import AutoTokenizer

    return init.end_turn_as_eos(AutoTokenizer.from_pretrained(real_tokenizer_dir))


def run_init(tok, *argv) -> tuple[int, str]:
    buf = io.StringIO()
    rc = init.main([str(a) for a in argv], load_tokenizer=lambda: tok, out=buf, err=buf)
    return rc, buf.getvalue()


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in r.items()} for r in rows]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def trained_rows(n_rows: int) -> int:
    """Rows of a file of `n_rows` good rows that training steps over: less the eval split, and less
    the validation rows where this version of the schema has validation-based stopping."""
    train = n_rows - eval_size(n_rows, init.EVAL_FRACTION)
    validation_rows = getattr(steps, "validation_rows", None)
    if validation_rows is not None and "validation_fraction" in TrainingSpec.model_fields:
        train -= validation_rows(train, TrainingSpec(validation_fraction=init.VALIDATION_FRACTION))
    return train


def expected_steps(n_rows: int) -> int:
    return math.ceil(init.EPOCHS * trained_rows(n_rows) / init.BATCH_SIZE)


def test_our_column_names_give_a_recipe_that_validates_sized_by_rows_and_epochs(tok, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", qa_rows(48))
    out = tmp_path / "recipe.yaml"
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 0, text
    assert "question <- 'question'" in text and "context  <- 'context'" in text and "answer   <- 'answer'" in text
    assert "id       <- 'id'" in text
    # three rows through the real chat template, as sft_dataset formats them
    assert text.count("--- row ") == 3
    for row in qa_rows(3):
        assert f"<|im_start|>assistant\n{row['answer']}<|im_end|>" in text
        assert f"Question: {row['question']}<|im_end|>" in text

    recipe = load_recipe(out)
    ds = recipe.datasets[0]
    assert (recipe.root, ds.path, recipe.allow_paths_outside_root) == (".", "data/qa.jsonl", False)
    assert recipe.dataset_path(ds) == data.resolve()
    assert ds.columns.model_dump() == {"question": "question", "context": "context", "answer": "answer", "id": "id"}
    assert ds.eval_fraction == 0.15
    assert list(recipe.methods) == ["lora_plus"] and recipe.methods["lora_plus"].type == "lora_plus"
    t = recipe.training_for("lora_plus")
    assert (t.epochs, t.lr) == (2.0, 2e-4)
    est = recipe_step_estimates(recipe).methods["lora_plus"]
    assert est.steps == expected_steps(48) and est.binding == "epochs"
    assert est.steps == 11 or "validation_fraction" in TrainingSpec.model_fields  # 2 * 41 / 8 without validation
    raw = out.read_text()
    assert "defaults study" in raw and "docs/results.md" in raw  # where the evidence for these defaults is
    if "validation_fraction" in TrainingSpec.model_fields:
        assert t.validation_fraction == 0.1 and t.early_stopping_patience >= 1
    else:
        assert "# validation_fraction: 0.1" in raw and "# early_stopping_patience:" in raw

    # the data stage, run with the same tokenizer, keeps every row at the max_length init chose
    from ft_assets.data.rows import sft_sources
    from ft_assets.data.sft_dataset import build_sft_dataset

    built = build_sft_dataset(sft_sources(recipe), tok, system=recipe.prompt.system, template=recipe.prompt.template,
                              template_without_context=recipe.prompt.template_without_context,
                              max_length=recipe.prompt.max_length)
    assert (len(built.train), len(built.eval), len(built.rejected)) == (41, 7, 0)

    assert cli_main(["validate", str(out)]) == 0
    assert f"{expected_steps(48)} steps (2.0 epochs of ~{trained_rows(48)} train rows" in capsys.readouterr().out


def test_alpaca_csv_and_prompt_passage_response_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = qa_rows(40)
    alpaca = write_csv(tmp_path / "alpaca.csv", renamed(
        [{k: v for k, v in r.items() if k != "id"} for r in rows],
        {"question": "instruction", "context": "input", "answer": "output"}))
    rc, text = run_init(tok, alpaca, "-o", tmp_path / "a.yaml")
    assert rc == 0, text
    assert "instruction <- 'instruction', input <- 'input', output <- 'output' (Alpaca's columns): schema alpaca" in text
    # the user turn is the instruction, a blank line, the input (schema alpaca's rendering)
    assert f"<|im_start|>user\n{rows[0]['question']}\n\n{rows[0]['context']}<|im_end|>" in text
    recipe = load_recipe(tmp_path / "a.yaml")
    ds = recipe.datasets[0]
    assert ds.format == "csv" and ds.schema == "alpaca"
    assert ds.columns.model_dump() == {"instruction": "instruction", "input": "input", "output": "output", "id": None}
    assert ('schema: alpaca\n    columns: {instruction: "instruction", input: "input", output: "output"}'
            in (tmp_path / "a.yaml").read_text())
    assert recipe.prompt.system == "Follow the user's instruction."
    assert recipe_step_estimates(recipe).methods["lora_plus"].steps == expected_steps(40)
    # --schema qa keeps the question/context/answer mapping of the same columns
    rc, text = run_init(tok, alpaca, "-o", tmp_path / "aq.yaml", "--schema", "qa")
    assert rc == 0, text
    assert load_recipe(tmp_path / "aq.yaml").datasets[0].columns.model_dump() == {
        "question": "instruction", "context": "input", "answer": "output", "id": None}

    table = renamed(rows, {"question": "prompt", "context": "passage", "answer": "response", "id": "uid"})
    for i, r in enumerate(table):
        r["uid"] = i  # an integer id column, unique
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "qa.parquet")
    rc, text = run_init(tok, tmp_path / "qa.parquet", "-o", tmp_path / "p.yaml")
    assert rc == 0, text
    recipe = load_recipe(tmp_path / "p.yaml")
    assert recipe.datasets[0].format == "parquet"
    assert recipe.datasets[0].columns.model_dump() == {"question": "prompt", "context": "passage",
                                                       "answer": "response", "id": "uid"}
    assert recipe_step_estimates(recipe).methods["lora_plus"].steps == expected_steps(40)
    assert text.count("--- row ") == 3 and f"assistant\n{rows[0]['answer']}<|im_end|>" in text


def test_two_answer_columns_is_a_question_and_nothing_is_written_until_a_flag_settles_it(tok, tmp_path):
    rows = [{**r, "output": r["answer"].upper()} for r in qa_rows(20)]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    out = tmp_path / "r.yaml"
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 2 and not out.exists()
    assert "Which column is the answer?" in text and "'answer'" in text and "'output'" in text
    assert "--answer COL" in text and "datasets[0].columns.answer" in text and "nothing written" in text
    assert "--- row " not in text  # no examples of a mapping that is not settled

    rc, text = run_init(tok, data, "-o", out, "--answer", "output")
    assert rc == 0, text
    assert "answer   <- 'output' (--answer)" in text and "not used: 'answer'" in text
    assert load_recipe(out).datasets[0].columns.answer == "output"


def test_missing_roles_and_repeated_ids_are_questions(tok, tmp_path):
    rows = [{"id": f"r{i % 5}", "query": r["question"], "reply": r["answer"]} for i, r in enumerate(qa_rows(20))]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    out = tmp_path / "r.yaml"
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 2 and not out.exists()
    assert "Which column is the question?" in text and "Which column is the answer?" in text
    assert "--question COL" in text and "'query'" in text
    assert "repeats values" in text and "--no-id" in text
    assert "context  <- settled once the question and answer are" in text

    rc, text = run_init(tok, data, "-o", out, "--question", "query", "--answer", "reply", "--no-id")
    assert rc == 0, text
    cols = load_recipe(out).datasets[0].columns.model_dump()
    assert cols == {"question": "query", "context": None, "answer": "reply", "id": None}
    assert "context  <- none" in text
    assert "Question:" not in text and "<|im_start|>user\nWhat was" in text  # template_without_context

    rc, text = run_init(tok, data, "-o", tmp_path / "x.yaml", "--question", "nope")
    assert rc == 2 and "no such column" in text and not (tmp_path / "x.yaml").exists()


def test_refuses_to_overwrite_without_force(tok, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    out = tmp_path / "r.yaml"
    out.write_text("mine\n")
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 2 and "--force" in text and out.read_text() == "mine\n"
    rc, text = run_init(tok, data, "-o", out, "--force")
    assert rc == 0 and load_recipe(out).datasets[0].name == "qa"


def test_without_a_tokenizer_it_says_so_and_shows_plain_prompts(tmp_path):
    def broken():
        raise FileNotFoundError("bundled GGUF not found at /nowhere")

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    buf = io.StringIO()
    assert init.main([str(data), "-o", str(tmp_path / "r.yaml")], load_tokenizer=broken, out=buf, err=buf) == 0
    text = buf.getvalue()
    assert "tokenizer could not be loaded or used" in text and "/nowhere" in text and "plain prompt" in text
    assert text.count("--- row ") == 3 and "[assistant]\n$1000 million" in text
    assert load_recipe(tmp_path / "r.yaml").prompt.max_length == 384


def test_paths_resolve_from_where_the_recipe_is_written(tok, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", qa_rows(12))
    out = tmp_path / "recipes" / "mine.yaml"
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 0, text
    recipe = load_recipe(out)
    assert (recipe.root, recipe.datasets[0].path, recipe.allow_paths_outside_root) == ("..", "data/qa.jsonl", False)
    assert recipe.dataset_path(recipe.datasets[0]) == data.resolve()
    # no shared directory but the filesystem root: an absolute path, allowed outside root, and why
    assert init.recipe_paths(Path("/a/qa.jsonl"), Path("/b/r.yaml"))[1:3] == ("/a/qa.jsonl", True)


def test_cli_asks_before_loading_anything_heavy(tmp_path):
    rows = [{**r, "output": r["answer"]} for r in qa_rows(6)]
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    code = ("import sys; from ft_assets.cli.main import main; rc = main(sys.argv[1:]); "
            "print([m for m in ('torch', 'transformers', 'dagster') if m in sys.modules]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "init", str(data), "-o", str(tmp_path / "r.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "Which column is the answer?" in out.stdout and out.stdout.strip().endswith("[]")
    assert not (tmp_path / "r.yaml").exists()


def test_an_unclaimed_text_column_is_asked_about_not_dropped(tok, tmp_path):
    """The shipped headlines file: instruction/label are named, the headline (the material) is not."""
    data = REPO / "data" / "fin_headlines.jsonl"
    out = tmp_path / "r.yaml"
    rc, text = run_init(tok, data, "-o", out)
    assert rc == 2 and not out.exists()
    assert "Is one of the columns left the context" in text and "'headline'" in text and "--no-context" in text

    rc, text = run_init(tok, data, "-o", out, "--context", "headline")
    assert rc == 0, text
    recipe = load_recipe(out)
    assert recipe.datasets[0].columns.model_dump() == {"question": "instruction", "context": "headline",
                                                       "answer": "label", "id": "id"}
    assert recipe.dataset_path(recipe.datasets[0]) == data.resolve()
    assert recipe_step_estimates(recipe).methods["lora_plus"].steps == expected_steps(240)


def test_a_mapping_the_data_stage_would_reject_is_an_error_not_a_recipe(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": r["question"], "context": r["context"], "label": i % 3} for i, r in enumerate(qa_rows(12))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ints.parquet")
    buf = io.StringIO()
    rc = init.main([str(tmp_path / "ints.parquet"), "-o", str(tmp_path / "r.yaml")], out=buf, err=buf)
    assert rc == 2 and not (tmp_path / "r.yaml").exists()
    assert "every row is rejected" in buf.getvalue() and "expected text" in buf.getvalue()
    buf = io.StringIO()
    assert init.main([str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.yaml")], out=buf, err=buf) == 2
    assert "no such file" in buf.getvalue()


def test_a_conversation_column_writes_a_messages_recipe(tok, tmp_path):
    rows = [{"uid": f"c{i}", "conversations": [{"from": "human", "value": f"Revenue of unit {i}?"},
                                                {"from": "gpt", "value": f"${i} million"}]} for i in range(40)]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    rc, out = run_init(tok, data, "-o", tmp_path / "r.yaml")
    assert rc == 0, out
    assert "messages <- 'conversations' (lists of {from, value} turns, roles human -> user, gpt -> assistant)" in out
    assert "<|im_start|>assistant\n$0 million<|im_end|>" in out  # shown through the real chat template
    recipe = load_recipe(tmp_path / "r.yaml")
    ds = recipe.datasets[0]
    assert ds.schema == "messages" and ds.train_on == "all_assistant"
    assert ds.columns.model_dump() == {"messages": "conversations", "role": "from", "content": "value",
                                       "roles": {"human": "user", "gpt": "assistant"}, "id": "uid"}
    # the same file with question/answer flags stays a qa recipe: nothing is guessed over the user's flags
    rc, out = run_init(tok, data, "-o", tmp_path / "q.yaml", "--question", "uid", "--answer", "conversations")
    assert "schema messages" not in out


def test_the_shipped_default_recipe_is_what_init_writes_for_the_shipped_data(tok, tmp_path):
    """recipes/default.yaml is init's output for data/finqa.jsonl (tidied comments, relative paths):
    a change to init's defaults that the default recipe does not follow fails here."""
    from ft_assets.config.recipe import DEFAULT_RECIPE

    rc, out = run_init(tok, REPO / "data" / "finqa.jsonl", "-o", tmp_path / "r.yaml")
    assert rc == 0, out
    written, shipped = yaml.safe_load((tmp_path / "r.yaml").read_text()), yaml.safe_load(DEFAULT_RECIPE.read_text())
    for section in ("prompt", "base_model", "quantization", "training", "methods", "evaluation", "seed"):
        assert written[section] == shipped[section], section
    (w,), (s,) = written["datasets"], shipped["datasets"]
    assert {k: v for k, v in w.items() if k != "path"} == {k: v for k, v in s.items() if k != "path"}
    assert load_recipe(DEFAULT_RECIPE).dataset_path(load_recipe(DEFAULT_RECIPE).datasets[0]) == REPO / "data" / "finqa.jsonl"


def test_prompt_completion_and_alpaca_without_input_write_their_schemas(tok, tmp_path):
    rows = [{"uid": f"r{i}", "prompt": f"Revenue of unit {i} in 2024?", "completion": f"${i} million"}
            for i in range(30)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    rc, out = run_init(tok, data, "-o", tmp_path / "pc.yaml")
    assert rc == 0, out
    assert "prompt <- 'prompt', completion <- 'completion' (TRL's prompt/completion columns)" in out
    assert "id       <- 'uid'" in out
    assert "<|im_start|>user\nRevenue of unit 0 in 2024?<|im_end|>\n<|im_start|>assistant\n$0 million<|im_end|>" in out
    ds = load_recipe(tmp_path / "pc.yaml").datasets[0]
    assert ds.schema == "prompt_completion"
    assert ds.columns.model_dump() == {"prompt": "prompt", "completion": "completion", "id": "uid"}
    assert recipe_step_estimates(load_recipe(tmp_path / "pc.yaml")).methods["lora_plus"].steps == expected_steps(30)

    rows = [{"Instruction": f"Classify: unit {i} profit {'rose' if i % 2 else 'fell'}.",
             "Output": "positive" if i % 2 else "negative"} for i in range(30)]
    data = write_jsonl(tmp_path / "alp.jsonl", rows)
    rc, out = run_init(tok, data, "-o", tmp_path / "alp.yaml")
    assert rc == 0, out
    assert "input    <- none" in out
    ds = load_recipe(tmp_path / "alp.yaml").datasets[0]
    assert ds.schema == "alpaca"
    assert ds.columns.model_dump() == {"instruction": "Instruction", "input": None, "output": "Output", "id": None}


def test_a_schema_flag_the_columns_do_not_support_is_an_error_before_anything_is_written(tok, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    for schema, expected in (("alpaca", "--schema alpaca: the file has no instruction and output columns"),
                             ("prompt_completion", "no prompt and completion columns"),
                             ("messages", "--schema messages: no column holds conversations")):
        rc, out = run_init(tok, data, "-o", tmp_path / "r.yaml", "--schema", schema)
        assert rc == 2 and expected in out and not (tmp_path / "r.yaml").exists(), out
    rc, out = run_init(tok, data, "-o", tmp_path / "r.yaml", "--schema", "alpaca", "--question", "question")
    assert rc == 2 and "cannot take --question" in out


def test_a_dataset_directory_and_an_arrow_file_write_hf_and_arrow_recipes(tok, tmp_path):
    """format hf: a save_to_disk DatasetDict of two splits needs --split, which the recipe keeps;
    an .arrow file is format arrow. The written recipes read the same rows through the data stage."""
    import datasets

    from ft_assets.data import rows as data

    rows = renamed(qa_rows(30), {"question": "instruction", "context": "input", "answer": "output"})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:24]),
                               "test": datasets.Dataset.from_list(rows[24:])})
    dd.save_to_disk(tmp_path / "alpaca_hf")
    rc, out = run_init(tok, tmp_path / "alpaca_hf", "-o", tmp_path / "h.yaml")
    assert rc == 2 and "splits ['test', 'train']" in out and "datasets[].split" in out
    assert not (tmp_path / "h.yaml").exists()
    rc, out = run_init(tok, tmp_path / "alpaca_hf", "--split", "train", "-o", tmp_path / "h.yaml")
    assert rc == 0, out
    assert "24 rows, hf" in out
    recipe = load_recipe(tmp_path / "h.yaml")
    ds = recipe.datasets[0]
    assert (ds.format, ds.split, ds.schema) == ("hf", "train", "alpaca")
    assert [r["id"] for _, r in data.read_rows(recipe.dataset_path(ds), ds.format, ds.split)] == [r["id"] for r in rows[:24]]

    import pyarrow as pa  # an Arrow IPC stream file, the form `datasets` caches tables in

    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "alpaca.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    rc, out = run_init(tok, tmp_path / "alpaca.arrow", "-o", tmp_path / "a.yaml")
    assert rc == 0, out
    assert load_recipe(tmp_path / "a.yaml").datasets[0].format == "arrow"
    rc, out = run_init(tok, tmp_path / "alpaca.arrow", "--split", "train", "-o", tmp_path / "b.yaml")
    assert rc == 2 and "--split applies to format hf" in out
