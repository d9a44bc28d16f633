"""`sft_dataset` at scale: a streamed build into Arrow, a canonical version, memory-mapped reading.

Layout of the artifact directory::

    train/  eval/        Arrow datasets (`datasets` save_to_disk; the shard files depend on num_proc),
                         one row per example: `data.Example`'s fields (`input_ids`/`labels` int32
                         lists, fields other than text/line/tokens as JSON text) + `length` (tokens)
    rejected.jsonl       every rejected row: source, line, reason, field, id, row (null for duplicates,
                         rows the reader refused and rows refused by formatting; a row over
                         `data.WHOLE_ROW_CHARS` of JSON with its long values cut: `data.stored_row`)
    dataset_info.json    tokenizer fingerprint, max_length, eos/pad ids, row and token statistics

Guarantees:
- The build never holds a source's rows as Python objects: rows stream from the file through
  `data.validate_row` into an Arrow file; the duplicate check and the seeded split keep two 8-byte
  hashes per row (numpy; a hash match is confirmed on the texts); `data.format_example` runs in
  `Dataset.map(batched=True, num_proc=N)`; train/eval are index selections written by save_to_disk.
  The rows, their order and the rejections are those of `data`'s per-row functions in file order,
  for any N.
- `canonical_version(dir)`: sha256 over each split's column values in row order (not the Arrow
  files' bytes) and the bytes of rejected.jsonl and dataset_info.json: the same data keeps one
  version whatever N and the shard layout.
- `load_split` memory-maps a split: `SftRows` is a sequence of `Example`s read row by row, whose
  lengths and ids come from columns, so training reads only the rows of each batch.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import rows as D
from .rows import IGNORE_INDEX, DataFileError, Example, Rejected, SourceSpec

SPLITS = ("train", "eval")
TEXT_FIELDS = ("id", "task", "question", "context", "answer")
TOKEN_FIELDS = ("input_ids", "labels")
BATCH_ROWS = 10_000  # rows per Arrow record batch written, and per batch hashed
MAP_BATCH_ROWS = 1_000  # rows per Dataset.map call
MIN_ROWS_PER_WORKER = 1_000  # fewer rows per tokenizing process cost more in start-up than they save


def json_fields() -> list[str]:
    """Example fields that are neither text, line nor tokens: stored as JSON text."""
    return [f.name for f in dataclasses.fields(Example) if f.name not in (*TEXT_FIELDS, "line", *TOKEN_FIELDS)]


def example_of(row: dict[str, Any]) -> Example:
    """The Example of one stored row (a dict of column values)."""
    kw: dict[str, Any] = {n: row[n] for n in (*TEXT_FIELDS, "line")}
    kw.update({n: json.loads(row[n]) for n in json_fields() if n in row})
    kw.update({n: list(row[n]) for n in TOKEN_FIELDS if n in row})
    return Example(**kw)


def _record(ex: Example) -> dict[str, Any]:
    out: dict[str, Any] = {n: getattr(ex, n) for n in (*TEXT_FIELDS, "line")}
    out.update({n: json.dumps(getattr(ex, n), ensure_ascii=False) for n in json_fields()})
    return out


def _text_schema():
    import pyarrow as pa

    return pa.schema([pa.field(n, pa.string()) for n in TEXT_FIELDS] + [pa.field("line", pa.int64())]
                     + [pa.field(n, pa.string()) for n in json_fields()])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bars (they flood the run's logs)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def stoppable_workers() -> Iterator[None]:
    """Worker processes started inside stop on SIGTERM even when this process ignores it. Why: a
    process started with SIGINT ignored (a background job without job control) ignores SIGTERM too
    after its first Dagster run (Dagster gives SIGTERM SIGINT's disposition); children inherit an
    ignored signal, and `datasets`' pools end a worker that did not take its sentinel with SIGTERM,
    so one stuck worker would hold `Pool.terminate` forever (seen once in `make test`)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# --------------------------------------------------------------------------------------
# reading: a memory-mapped split as a sequence of Examples
# --------------------------------------------------------------------------------------


class SftRows(Sequence[Example]):
    """A split on disk, memory-mapped: `rows[i]` reads one Example, `rows[a:b]` a list of them.

    It is a flat `datasets.Dataset` (`base`, no indices mapping) and optionally `index`, the base
    rows it holds in order (numpy int64, repeats allowed). Columns are read from `base`'s Arrow
    batches, gathered batch by batch (`lengths()`, `ids()`, `column_batches`, iteration): `datasets`
    answers a query on an index-mapped dataset with one record batch per row (~0.3 KB each, and
    the memory stayed with the process), which made the build's memory grow with its row count."""

    def __init__(self, base, keep: Any = None, index: np.ndarray | None = None):
        self.base = base
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self._keep = keep  # what must outlive the rows (the temporary directory of their files)

    @property
    def dataset(self):
        """The rows as one `datasets.Dataset` (index-mapped when `index` is set): to save or iterate."""
        return self.base if self.index is None else self.base.select(self.index)

    def __len__(self) -> int:
        return len(self.base) if self.index is None else len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = range(len(self))[i]
            return list(self.select(idx)) if len(idx) else []
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return example_of(self.base[i if self.index is None else int(self.index[i])])

    def __iter__(self) -> Iterator[Example]:
        for tbl in self.column_batches(self.base.column_names, 256):
            for r in tbl.to_pylist():
                yield example_of(r)

    def __add__(self, other: Sequence[Example]):
        return self if not len(other) else [*self, *other]  # a few replayed rows: materialized

    def __repr__(self) -> str:
        return f"SftRows({len(self)} rows)"

    def column(self, name: str):
        """One column in row order (a pyarrow ChunkedArray; zero-copy without an index)."""
        if self.index is None:
            return self.base.data.column(name)
        import pyarrow as pa

        return pa.chunked_array([t.column(0) for t in self.column_batches([name])],
                                type=self.base.data.schema.field(name).type)

    def column_batches(self, names: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[Any]:
        """`names` in row order as pyarrow Tables of at most `batch_rows` rows (zero-copy slices
        without an index; with one, gathered chunk by chunk: pyarrow's own `take` on a chunked
        column first concatenates the whole column)."""
        table = self.base.data.table.select(names)
        if self.index is None:
            for start in range(0, len(self), batch_rows):
                yield table.slice(start, min(batch_rows, len(self) - start))
            return
        chunks = table.to_batches()
        offsets = np.cumsum([0] + [c.num_rows for c in chunks])
        for start in range(0, len(self), batch_rows):
            yield _gather(table.schema, chunks, offsets, self.index[start:start + batch_rows])

    def lengths(self) -> np.ndarray:
        return self.column("length").to_numpy()

    def ids(self) -> list[str]:
        return self.column("id").to_pylist()

    def select(self, indices: Iterable[int]) -> "SftRows":
        idx = np.fromiter(indices, dtype=np.int64) if not isinstance(indices, np.ndarray) else indices
        return SftRows(self.base, self._keep, idx if self.index is None else self.index[idx])


def _gather(schema, chunks: list, offsets: np.ndarray, index: np.ndarray):
    """Rows `index` of the record batches `chunks` (row offsets `offsets`), in that order. The
    copies are made by the system allocator: pyarrow's default (mimalloc) kept ~50 MB of them
    resident after the build had freed them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pool = pa.system_memory_pool()
    chunk = np.searchsorted(offsets, index, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    by_chunk = chunk[order]
    starts = np.r_[0, np.nonzero(np.diff(by_chunk))[0] + 1, len(order)]
    pieces = [pc.take(chunks[by_chunk[a]], pa.array(index[order[a:b]] - offsets[by_chunk[a]]), memory_pool=pool)
              for a, b in zip(starts[:-1], starts[1:])]
    table = pa.Table.from_batches(pieces, schema=schema)
    if np.all(order[1:] > order[:-1]):  # the index already ran chunk by chunk
        return table
    return pc.take(table.combine_chunks(memory_pool=pool), pa.array(np.argsort(order, kind="stable")), memory_pool=pool)


def row_lengths(rows: Sequence[Example]) -> Sequence[int]:
    """Token count of every row; a column read for `SftRows`."""
    return rows.lengths() if isinstance(rows, SftRows) else [len(e.input_ids) for e in rows]


def row_ids(rows: Sequence[Example]) -> list[str]:
    return rows.ids() if isinstance(rows, SftRows) else [e.id for e in rows]


def take(rows: Sequence[Example], indices: Sequence[int]) -> Sequence[Example]:
    """`rows` at `indices`, in that order; an `SftRows` stays on disk."""
    return rows.select(list(indices)) if isinstance(rows, SftRows) else [rows[i] for i in indices]


def load_split(dataset_dir: str | Path, split: str) -> Sequence[Example]:
    """One split of an sft_dataset artifact: memory-mapped `SftRows`; a list for artifacts of the
    JSONL layout (before Arrow)."""
    d = Path(dataset_dir)
    if (d / split).is_dir():
        import datasets

        with _quiet():
            return SftRows(datasets.load_from_disk(str(d / split)))
    with (d / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [Example(**json.loads(line)) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------


@dataclass
class BuiltDataset:
    train: Sequence[Example]  # SftRows over Arrow files in the build's work directory
    eval: Sequence[Example]
    rejected: list[tuple[str, Rejected]]  # (source name, rejection)
    stats: dict[str, Any]
    num_proc: int = 1


@dataclass
class _Validated:
    """One source after reading and validation: kept rows in an Arrow file, hashes in numpy."""

    rows: int
    rejected: list[Rejected]  # validation rejections, duplicates included, by line
    dup_of: dict[int, int]  # kept-row index -> index of the row it duplicates
    split_rank: np.ndarray  # uint64 per kept row: its place in the seeded split order


def _validate_source(src: SourceSpec, arrow_path: Path) -> _Validated:
    import pyarrow as pa

    schema = _text_schema()
    names: set[str] = set()
    n_rows, rejected, buf = 0, [], []
    dup_hash, rank = array.array("Q"), array.array("Q")
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lineno, row in D.iter_rows(src.path, src.format, src.split):
            n_rows += 1
            names.update(row)
            ex, rej = D.validate_row(lineno, row, src.columns, task=src.name, schema=src.schema)
            if rej is not None:
                rejected.append(rej)
                continue
            buf.append(_record(ex))
            dup_hash.append(_hash64(json.dumps(D.duplicate_key(ex))))
            rank.append(int(D.split_rank(ex, src.split_seed)[:16], 16))
            if len(buf) >= BATCH_ROWS:
                writer.write_batch(pa.RecordBatch.from_pylist(buf, schema=schema))
                buf.clear()
        if buf:
            writer.write_batch(pa.RecordBatch.from_pylist(buf, schema=schema))
    if not n_rows:
        raise DataFileError(src.path, "the dataset has no rows" if src.format == "hf" else "file has no rows (only blank lines)")
    D.check_column_names(src.path, names, src.columns, src.schema)
    dup_of = _duplicates(np.frombuffer(dup_hash, dtype=np.uint64), arrow_path)
    return _Validated(n_rows, rejected, dup_of, np.frombuffer(rank, dtype=np.uint64))


def _duplicates(hashes: np.ndarray, arrow_path: Path) -> dict[int, int]:
    """Rows whose duplicate key equals an earlier row's: hash runs, confirmed on the texts."""
    if len(hashes) < 2:
        return {}
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    repeat = np.nonzero(ordered[1:] == ordered[:-1])[0] + 1
    if not len(repeat):
        return {}
    import pyarrow as pa

    with pa.memory_map(str(arrow_path)) as src:
        table = pa.ipc.open_stream(src).read_all()

    def key(i: int) -> tuple:
        return D.duplicate_key(example_of(table.slice(int(i), 1).to_pylist()[0]))

    out: dict[int, int] = {}
    run_start = np.maximum.accumulate(np.where(np.r_[True, ordered[1:] != ordered[:-1]], np.arange(len(ordered)), 0))
    for pos in repeat:
        first, row = int(order[run_start[pos]]), int(order[pos])
        if key(first) == key(row):  # else two texts share 64 bits of hash: both stay
            out[row] = first
    return out


def _format_batch(batch: dict[str, list], tokenizer, system, template, template_without_context, max_length,
                  schema, train_on):
    out: dict[str, list] = {"input_ids": [], "labels": [], "answer_start": [], "length": [], "rejected_because": []}
    for values in zip(*batch.values()):
        ex = example_of(dict(zip(batch, values)))
        reason = D.format_example(tokenizer, ex, D.build_messages(ex, system, template, template_without_context, schema),
                                  max_length, train_on)
        out["input_ids"].append(ex.input_ids if not reason else [])
        out["labels"].append(ex.labels if not reason else [])
        out["answer_start"].append(json.dumps(ex.answer_start))
        out["length"].append(len(ex.input_ids) if not reason else 0)
        out["rejected_because"].append(reason or "")
    return out


def _tokenize(arrow_path: Path, work: Path, num_proc: int, fmt_kwargs: dict[str, Any]):
    import datasets

    ds = datasets.Dataset.from_file(str(arrow_path))
    features = datasets.Features({**ds.features, "input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32"), "rejected_because": datasets.Value("string")})
    procs = max(1, min(num_proc, len(ds) // MIN_ROWS_PER_WORKER))
    with stoppable_workers():
        return ds.map(_format_batch, batched=True, batch_size=MAP_BATCH_ROWS, num_proc=procs if procs > 1 else None,
                      fn_kwargs=fmt_kwargs, features=features,
                      cache_file_name=str(work / f"{arrow_path.stem}-tokens.arrow"),
                      new_fingerprint=uuid.uuid4().hex, load_from_cache_file=False, desc=None)


def build_sft_dataset(
    sources: Iterable[SourceSpec], tokenizer, *, system: str | None, template: str,
    template_without_context: str, max_length: int, mixture_seed: int = 0, num_proc: int | None = None,
    work_dir: str | Path | None = None, chat_template: str | None = None,
) -> BuiltDataset:
    """Every source read, validated, formatted and split (see `data.rows` for the rules). With
    mixture weights, the training split is `data.mixture.mix` of the sources' training rows
    (seeded by `mixture_seed`); the eval split keeps every held-out row of every task. The rows
    live in Arrow files under `work_dir` (default: a temporary directory the result keeps alive).
    `chat_template`: Jinja text rendering the rows instead of the tokenizer's own (which the
    tokenizer gets back afterwards); without either, `data.chat.ChatTemplateError`."""
    from .chat import template_override

    with template_override(tokenizer, chat_template):
        return _build(list(sources), tokenizer, system, template, template_without_context, max_length,
                      mixture_seed, num_proc, work_dir)


def _build(sources: list[SourceSpec], tokenizer, system, template, template_without_context, max_length,
           mixture_seed, num_proc, work_dir) -> BuiltDataset:
    import datasets

    num_proc = max(1, num_proc or os.cpu_count() or 1)
    tmp, work = _work_dir(work_dir)
    fmt_kwargs = dict(tokenizer=tokenizer, system=system, template=template,
                      template_without_context=template_without_context, max_length=max_length)
    with _quiet():
        parts, rejected, per_source, train_by_task, eval_idx = [], [], {}, {}, []
        offset = 0  # the first row of this source in the concatenated parts
        for k, src in enumerate(sources):
            prepared = _prepare_source(src, work / f"source-{k}.arrow", work, num_proc, fmt_kwargs)
            parts.append(prepared.tokens)
            train_by_task[src.name] = prepared.train + offset
            eval_idx.append(prepared.eval + offset)
            offset += prepared.kept_rows
            rejected += [(src.name, r) for r in prepared.rejected]
            per_source[src.name] = {"rows": prepared.rows, "kept": prepared.usable_rows,
                                    "rejected": len(prepared.rejected), "train": len(prepared.train),
                                    "eval": len(prepared.eval)}
        train_idx, mixture = _train_index(sources, train_by_task, per_source, mixture_seed)
        every = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        train = SftRows(every, tmp, np.asarray(train_idx, dtype=np.int64))
        evals = SftRows(every, tmp, np.concatenate(eval_idx))
    stats = _build_stats(per_source, train, evals, len(rejected), tokenizer.eos_token_id)
    if mixture is not None:
        stats["mixture"] = {"seed": mixture_seed, "tasks": mixture}
    return BuiltDataset(train, evals, rejected, stats, num_proc)


def _work_dir(work_dir: str | Path | None) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """(the temporary directory, when `work_dir` is None: the rows keep it alive; the build's directory)."""
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ft-sft-")
        work_dir = tmp.name
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return tmp, work


@dataclass
class _PreparedSource:
    """One source validated, tokenized, checked and split."""

    tokens: Any  # datasets.Dataset: every kept row (duplicates and rows formatting refused included)
    rejected: list[Rejected]  # validation's and duplicates in file order, then formatting's
    rows: int  # rows read
    kept_rows: int  # rows of `tokens`
    usable_rows: int  # rows of `tokens` neither duplicates nor refused: train + eval
    train: np.ndarray  # row indices into `tokens`
    eval: np.ndarray


def _prepare_source(src: SourceSpec, arrow_path: Path, work: Path, num_proc: int,
                    fmt_kwargs: dict[str, Any]) -> _PreparedSource:
    """Read, validate, tokenize, collect the rejections, check their share and split one source;
    a DataFileError when it keeps no row or rejects more than `max_rejected_fraction`."""
    v = _validate_source(src, arrow_path)
    n_kept = len(v.split_rank)
    tokens = (_tokenize(arrow_path, work, num_proc, {**fmt_kwargs, "schema": src.schema, "train_on": src.train_on})
              if n_kept else None)
    rej, usable = _rejections(src, v, tokens)
    n_usable = int(usable.sum())
    _check_rejected(src, v.rows, rej, n_usable)
    train_rows, held = _split_usable(usable, n_usable, v.split_rank, src.eval_fraction)
    return _PreparedSource(tokens.remove_columns(["rejected_because"]), rej, v.rows, n_kept, n_usable,
                           train_rows, held)


def _rejections(src: SourceSpec, v: _Validated, tokens) -> tuple[list[Rejected], np.ndarray]:
    """(every rejection of the source, a bool per kept row: neither a duplicate nor refused by
    formatting). Without `tokens` (no kept row) only validation's rejections."""
    rej = list(v.rejected)
    usable = np.ones(len(v.split_rank), dtype=bool)
    if tokens is None:
        return rej, usable
    unit = D.row_word(src.format)
    lines = tokens.data.column("line").to_numpy()
    ids = tokens.data.column("id")
    rej += [Rejected(int(lines[row]), f"exact duplicate of {unit} {lines[first]}", None, ids[row].as_py())
            for row, first in v.dup_of.items()]
    rej.sort(key=lambda r: r.line)  # validation's rejections in file order, as one pass gives them
    usable[list(v.dup_of)] = False
    reasons = tokens.data.column("rejected_because").to_numpy(zero_copy_only=False)
    bad = np.nonzero((reasons != "") & usable)[0]
    field = "messages" if src.schema == "messages" else "prompt"
    rej += [Rejected(int(lines[i]), str(reasons[i]), field, ids[int(i)].as_py()) for i in bad]
    usable[bad] = False
    return rej, usable


def _check_rejected(src: SourceSpec, rows: int, rej: list[Rejected], n_usable: int) -> None:
    """A DataFileError (carrying `rej`) when no row is usable or too many were rejected."""
    unit = D.row_word(src.format)
    frac = len(rej) / rows
    if not n_usable:
        raise DataFileError(src.path, f"every row was rejected ({len(rej)} rows); first reason: "
                            f"{unit} {rej[0].line}: {rej[0].reason}", rejected=rej)
    if frac > src.max_rejected_fraction:
        worst = "; ".join(f"{unit} {r.line}: {r.reason}" for r in sorted(rej, key=lambda r: r.line)[:5])
        raise DataFileError(
            src.path,
            f"{len(rej)} of {rows} rows rejected ({frac:.0%} > max_rejected_fraction "
            f"{src.max_rejected_fraction:.0%}). First: {worst}",
            rejected=rej,
        )


def _split_usable(usable: np.ndarray, n_usable: int, split_rank: np.ndarray,
                  eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both ascending: the usable rows of the smallest split ranks are held out."""
    kept = np.nonzero(usable)[0]
    n_eval = D.eval_size(n_usable, eval_fraction)
    held = np.sort(kept[np.argsort(split_rank[kept], kind="stable")[:n_eval]])
    return np.setdiff1d(kept, held, assume_unique=True), held


def _train_index(sources: list[SourceSpec], train_by_task: dict[str, np.ndarray], per_source: dict[str, dict],
                 mixture_seed: int) -> tuple[Any, dict[str, dict] | None]:
    """(the training split's rows, the mixture's facts per task or None): with weights,
    `data.mixture.mix` of the sources' training rows (each source's `mixed_train` count added to
    `per_source`); without, every source's training rows one source after another."""
    weights = {s.name: s.weight for s in sources if s.weight is not None}
    if not weights:
        return np.concatenate(list(train_by_task.values())), None
    from .mixture import mix

    train_idx, counts = mix(train_by_task, weights, mixture_seed)
    total_w = sum(weights.values())
    mixture = {t: {"weight": weights[t], "share": round(weights[t] / total_w, 4), "rows": counts[t],
                   "unique_rows": len(train_by_task[t])} for t in sorted(weights)}
    for t, info in mixture.items():
        per_source[t]["mixed_train"] = info["rows"]
    return train_idx, mixture


def _build_stats(per_source: dict[str, dict], train: SftRows, evals: SftRows, rejected_rows: int,
                 eos_id: int) -> dict[str, Any]:
    """dataset_info.json's build facts: rows per source and split, token statistics of both splits."""
    lengths = np.sort(np.concatenate([train.lengths(), evals.lengths()]))
    trained, _ = label_facts(train, eos_id)
    return {
        "sources": per_source,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "rejected_rows": rejected_rows,
        "tokens": {
            "min": int(lengths[0]), "max": int(lengths[-1]), "mean": round(float(lengths.mean()), 1),
            "p50": int(lengths[len(lengths) // 2]), "p95": int(lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))]),
        },
        "trained_tokens_per_epoch": trained,
    }


def label_facts(rows: SftRows, eos_id: int, max_problems: int = 20) -> tuple[int, list[str]]:
    """(labelled tokens of all rows, the first problems found: a row without a labelled token, or
    whose last labelled token is not end-of-turn), from the columns in batches."""
    trained, problems = 0, []
    import pyarrow.compute as pc

    for tbl in rows.column_batches(["id", "line", "labels"]):
        labels = tbl.column("labels")
        flat = pc.list_flatten(labels).to_numpy()
        n = pc.list_value_length(labels).to_numpy().astype(np.int64)
        ends = np.cumsum(n)
        labelled = flat != IGNORE_INDEX
        trained += int(labelled.sum())
        if len(problems) >= max_problems:
            continue
        # the last labelled position of each row (-1: none)
        where = np.where(labelled, np.arange(len(flat)), -1)
        starts = ends - n
        last = np.full(len(n), -1, dtype=np.int64)
        nonempty = n > 0
        last[nonempty] = np.maximum.reduceat(where, starts[nonempty]) if len(flat) else -1
        last[nonempty & (last < starts)] = -1
        for i in np.nonzero((last < 0) | (flat[np.maximum(last, 0)] != eos_id) if len(flat) else last < 0)[0]:
            rid, line = tbl.column("id")[int(i)].as_py(), tbl.column("line")[int(i)].as_py()
            problems.append(f"example {rid} (line {line}) has no labelled token" if last[i] < 0 else
                            f"example {rid} (line {line}) does not end its labels with end-of-turn")
    if not len(rows):
        problems.insert(0, "the training split is empty")
    return trained, problems[:max_problems]


# --------------------------------------------------------------------------------------
# saving and the canonical version
# --------------------------------------------------------------------------------------


def save_dataset(ds: BuiltDataset, out_dir: Path, meta: dict[str, Any]) -> None:
    """The artifact's files (the layout above). `meta` must not hold build facts such as num_proc."""
    for split, rows in (("train", ds.train), ("eval", ds.eval)):
        with _quiet(), stoppable_workers():
            rows.dataset.save_to_disk(str(out_dir / split), num_proc=_save_procs(len(rows), ds.num_proc))
    D.write_jsonl(out_dir / "rejected.jsonl", ({"source": s, **asdict(r)} for s, r in ds.rejected))
    (out_dir / "dataset_info.json").write_text(json.dumps({**meta, **ds.stats}, indent=2, sort_keys=True) + "\n")


def _save_procs(n_rows: int, num_proc: int) -> int | None:
    procs = max(1, min(num_proc, n_rows // (10 * MIN_ROWS_PER_WORKER)))
    return procs if procs > 1 else None


def canonical_version(dataset_dir: str | Path) -> str:
    """sha256 (16 hex chars) of the artifact's content in a layout-free form: per split, its
    features and row count, then every column's values in row order, batch by batch of
    BATCH_ROWS rows; then rejected.jsonl and dataset_info.json byte for byte."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    d = Path(dataset_dir)
    h = hashlib.sha256()
    for split in SPLITS:
        with _quiet():
            ds = datasets.load_from_disk(str(d / split))
        names = sorted(ds.column_names)
        h.update(json.dumps([split, len(ds), {n: str(ds.features[n]) for n in names}]).encode())
        for tbl in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            for name in names:
                col = tbl.column(name)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    h.update(pc.list_value_length(col).to_numpy().astype("<i8").tobytes())
                    h.update(pc.list_flatten(col).to_numpy().astype("<i8").tobytes())
                else:
                    h.update(json.dumps(col.to_pylist(), ensure_ascii=False).encode())
    for name in ("rejected.jsonl", "dataset_info.json"):
        h.update(name.encode() + b"\0" + (d / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# the asset's work: build, save, version, and what its metadata shows
# --------------------------------------------------------------------------------------


@dataclass
class WrittenDataset:
    """What `write_sft_dataset` made: the artifact and the facts the asset reports."""

    artifact: Any  # store.Artifact
    stats: dict[str, Any]
    rejected: list[tuple[str, Rejected]]
    preview: list[dict[str, Any]]  # the first training rows, for a table
    problems: list[str]  # the `trainable` check's findings (empty: passed)
    num_proc: int


def write_sft_dataset(store, sources: list[SourceSpec], tokenizer, *, system: str | None, template: str,
                      template_without_context: str, max_length: int, seed: int, num_proc: int | None,
                      inputs: dict[str, str], recipe_hash: str, code_version: str,
                      preview_rows: int = 20, chat_template: str | None = None) -> WrittenDataset:
    """Build into the store's staging directory, save, and set the canonical version. A
    DataFileError leaves nothing behind; with rejected rows, `write_rejection_report` lists them."""
    meta = {"tokenizer_fingerprint": D.tokenizer_fingerprint(tokenizer), "max_length": max_length,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with store.write("sft_dataset", recipe_hash=recipe_hash, seed=seed, code_version=code_version) as st:
        st.inputs = inputs
        work = st.path / ".build"
        built = build_sft_dataset(sources, tokenizer, system=system, template=template,
                                  template_without_context=template_without_context, max_length=max_length,
                                  mixture_seed=seed, num_proc=num_proc, work_dir=work,
                                  chat_template=chat_template)
        save_dataset(built, st.path, meta)
        stats, rejected, used = built.stats, built.rejected, built.num_proc
        del built  # its rows map files in `work`
        shutil.rmtree(work)
        st.version = canonical_version(st.path)
        st.extra["build"] = {"num_proc": used}
    art = st.artifact
    train = load_split(art.path, "train")
    preview = [{"id": e.id, "task": e.task, "question": e.question, "answer": e.answer,
                "tokens": len(e.input_ids), "answer_tokens": len(e.input_ids) - e.prompt_len}
               for e in train[:preview_rows]]
    _, problems = label_facts(train, tokenizer.eos_token_id)
    return WrittenDataset(art, stats, rejected, preview, problems, used)


def write_rejection_report(store, exc: DataFileError) -> Path:
    """Every row a failed build rejected, with its reason, beside the artifact's versions."""
    report = store.slot("sft_dataset", None) / "rejected_rows.jsonl"
    report.parent.mkdir(parents=True, exist_ok=True)
    D.write_jsonl(report, ({"file": exc.path, **asdict(r)} for r in exc.rejected))
    return report
