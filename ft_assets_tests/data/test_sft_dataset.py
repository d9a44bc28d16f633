"""sft_dataset in Arrow: the streamed build gives what the row functions give, saved rows read back
exactly, the version ignores the shard layout (num_proc) but not one token, training reads rows
from the memory-mapped split as it reads a list."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from ft_assets.data import rows as data
from ft_assets.config.training import TrainingSpec
from ft_assets.training import loop as train
from ft_assets.data import sft_dataset as S
from ft_assets.methods import get_method
from ft_assets.methods.lora import LoraSpec
from ft_assets.models.base_model import load_model
from ft_assets.artifacts.store import ArtifactStore, content_hash
from ft_assets_tests.conftest import qa_rows, write_jsonl

COLS = {"question": "question", "context": "context", "answer": "answer", "id": "id"}
PROMPT = dict(system=None, template="Context:\n{context}\n\nQuestion: {question}", template_without_context="{question}")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def source(path, **kw):
    spec = dict(name="qa", path=path, format="jsonl", columns=COLS, eval_fraction=0.2, split_seed=5,
                max_rejected_fraction=0.5)
    return data.SourceSpec(**{**spec, **kw})


def awkward_rows(n: int) -> list[dict]:
    rows = qa_rows(n)
    rows[4] = {**rows[4], "answer": "  "}  # blank: rejected by validation
    rows.append(dict(rows[7]))  # exact duplicate of line 8
    rows[9] = {**rows[9], "context": "long " * 400}  # too long for max_length 128: rejected by formatting
    return rows


def saved(built, path):
    path.mkdir()
    S.save_dataset(built, path, {"k": 1})
    return path


def test_streamed_build_gives_what_the_row_functions_give_and_reads_back_exactly(tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", awkward_rows(30))
    built = S.build_sft_dataset([source(p)], tok, max_length=128, num_proc=1, **PROMPT)

    # the reference: the list functions of data.rows, one row after another
    kept, rejected = data.validate_rows(data.read_rows(p, "jsonl"), COLS, task="qa")
    usable = []
    for ex in kept:
        reason = data.format_example(tok, ex, data.build_messages(ex, None, PROMPT["template"], "{question}"), 128)
        if reason:
            rejected.append(data.Rejected(ex.line, reason, "prompt", ex.id))
        else:
            usable.append(ex)
    want_train, want_eval = data.split_examples(usable, 0.2, 5)

    def facts(rows):
        return [(e.id, e.line, e.question, e.context, e.answer, e.task, e.input_ids, e.labels) for e in rows]

    assert facts(built.train) == facts(want_train) and facts(built.eval) == facts(want_eval)
    assert [(r.line, r.reason, r.field) for _, r in built.rejected] == [(r.line, r.reason, r.field) for r in rejected]
    assert {r.line for _, r in built.rejected} == {5, 10, 31}  # blank, too long, duplicate of line 8
    assert "exact duplicate of line 8" in [r.reason for _, r in built.rejected]

    d = saved(built, tmp_path / "out")
    train_rows, eval_rows = S.load_split(d, "train"), S.load_split(d, "eval")
    assert isinstance(train_rows, S.SftRows)
    assert facts(train_rows) == facts(want_train) and facts(eval_rows) == facts(want_eval)
    assert [facts([train_rows[i]])[0] for i in (0, -1)] == [facts(want_train)[0], facts(want_train)[-1]]
    assert list(train_rows.lengths()) == [len(e.input_ids) for e in want_train]
    assert data.dataset_info(d)["trained_tokens_per_epoch"] == sum(
        sum(1 for x in e.labels if x != data.IGNORE_INDEX) for e in want_train)


def test_version_ignores_num_proc_and_shards_but_not_one_token(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(S, "MIN_ROWS_PER_WORKER", 4)  # let 2 processes share this small file
    p = write_jsonl(tmp_path / "d.jsonl", qa_rows(120))
    one = saved(S.build_sft_dataset([source(p)], tok, max_length=128, num_proc=1, **PROMPT), tmp_path / "one")
    two = saved(S.build_sft_dataset([source(p)], tok, max_length=128, num_proc=2, **PROMPT), tmp_path / "two")
    # the two layouts differ (1 shard vs 2), so a hash of the files would differ ...
    assert len(list((one / "train").glob("*.arrow"))) == 1 and len(list((two / "train").glob("*.arrow"))) == 2
    assert content_hash(one) != content_hash(two)
    # ... the canonical version does not
    assert S.canonical_version(one) == S.canonical_version(two)

    def edited(name, column, row, pos):
        out = tmp_path / name
        shutil.copytree(one, out, ignore=shutil.ignore_patterns("train"))
        ds = S.load_split(one, "train").dataset

        def bump(r, i):
            if i == row:
                r[column] = [*r[column][:pos], r[column][pos] + 1, *r[column][pos + 1:]]
            return r

        ds.map(bump, with_indices=True).save_to_disk(str(out / "train"))
        return out

    assert S.canonical_version(edited("token", "input_ids", 0, 3)) != S.canonical_version(one)
    assert S.canonical_version(edited("label", "labels", 17, -1)) != S.canonical_version(one)


def test_training_on_the_arrow_split_equals_training_on_its_rows_as_a_list(tiny_model_dir, tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    d = saved(S.build_sft_dataset([source(p)], tok, max_length=128, num_proc=1, **PROMPT), tmp_path / "out")
    rows = S.load_split(d, "train")
    spec = LoraSpec(type="lora", r=4, alpha=8, dropout=0.0)
    cfg = TrainingSpec(max_steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                       group_by_length=True, packing=False, validation_fraction=0.2, validation_every=2)
    losses = []
    for examples in (rows, list(rows)):
        torch.manual_seed(0)
        model = get_method("lora").wrap(load_model(tiny_model_dir), spec)
        result = train.train(model, get_method("lora"), spec, examples, cfg, seed=3, pad_id=tok.pad_token_id)
        losses.append((result.losses, result.validation_losses))
    assert losses[0] == losses[1] and len(losses[0][0]) == 4 and losses[0][1]


def test_store_versions_by_the_canonical_version_the_writer_sets(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("thing") as st:
        (st.path / "a.txt").write_text("shard layout 1")
        st.version = "c0ffee0000000000"
    art = st.artifact
    assert art.version == "c0ffee0000000000" and art.manifest()["version_basis"] == "canonical"
    assert art.manifest()["content_hash"] == content_hash(art.dir)
    with pytest.raises(ValueError, match="either derived or set"):
        with store.write("thing", derivation={"x": 1}) as st:
            st.version = "c0ffee0000000001"
    assert store.latest("thing").version == "c0ffee0000000000"


def test_an_index_reads_the_rows_it_names_across_arrow_chunks_without_a_batch_per_row(tok, tmp_path):
    import datasets
    import numpy as np
    import pyarrow as pa

    p = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    d = saved(S.build_sft_dataset([source(p)], tok, max_length=128, num_proc=1, **PROMPT), tmp_path / "out")
    flat = S.load_split(d, "train").dataset
    # a base of several Arrow chunks (as the build's concatenated sources and map shards are)
    base = datasets.concatenate_datasets([flat.select(range(a, min(a + 7, len(flat)))).flatten_indices()
                                          for a in range(0, len(flat), 7)])
    assert base.data.table.column("labels").num_chunks > 3
    index = np.array([len(base) - 1, 0, 8, 8, 3, 20, 7, 6, 1, 15, 14, 2])  # unsorted, repeats, chunk edges
    rows, want = S.SftRows(base, index=index), [flat[int(i)] for i in index]
    assert [(e.id, e.input_ids, e.labels) for e in rows] == [(r["id"], r["input_ids"], r["labels"]) for r in want]
    assert rows.ids() == [r["id"] for r in want] and list(rows.lengths()) == [r["length"] for r in want]
    assert [e.id for e in rows[2:5]] == [r["id"] for r in want[2:5]] and rows[-1].id == want[-1]["id"]
    assert [t.num_rows for t in rows.column_batches(["id"], batch_rows=5)] == [5, 5, 2]
    assert rows.select([3, 0]).ids() == [want[3]["id"], want[0]["id"]]
    assert S.label_facts(rows, tok.eos_token_id)[0] == sum(
        sum(1 for x in r["labels"] if x != data.IGNORE_INDEX) for r in want)
    # the columns come from Arrow's buffers, not from `datasets`' per-row gather (one record batch
    # per row, which made a 1M-row build hold ~0.3 KB per row); an indexed column is one array
    # per batch of BATCH_ROWS
    assert rows.column("length").num_chunks == 1 and isinstance(rows.column("length"), pa.ChunkedArray)


SIGTERM_OF_CHILD = [sys.executable, "-S", "-c", "import signal; print(signal.getsignal(signal.SIGTERM).name)"]


def test_dataset_workers_stop_on_sigterm_even_when_this_process_ignores_it(tok, tmp_path, monkeypatch):
    """A process that ignores SIGTERM (Dagster leaves it so after a run when SIGINT was ignored at
    start) still starts its tokenizing and saving workers with SIGTERM at default, so a pool can end
    a stuck one; it ignores SIGTERM again afterwards."""
    entered = []
    real = S.stoppable_workers

    @contextlib.contextmanager
    def recorded():
        with real():
            entered.append(subprocess.run(SIGTERM_OF_CHILD, capture_output=True, text=True).stdout.strip())
            yield

    monkeypatch.setattr(S, "stoppable_workers", recorded)
    monkeypatch.setattr(S, "MIN_ROWS_PER_WORKER", 4)  # 2 processes for this small file
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        built = S.build_sft_dataset([source(write_jsonl(tmp_path / "d.jsonl", qa_rows(120)))], tok, max_length=128,
                                    num_proc=2, **PROMPT)
        saved(built, tmp_path / "out")
        after = subprocess.run(SIGTERM_OF_CHILD, capture_output=True, text=True).stdout.strip()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert entered and set(entered) == {"SIG_DFL"}  # tokenizing (a map) and each split's save
    assert len(entered) >= 3 and after == "SIG_IGN"
