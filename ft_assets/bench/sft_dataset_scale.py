"""raw -> sft_dataset at scale: rows/s and peak memory, the JSONL build before Arrow vs the Arrow build.

Contract. For each row count N (default 10k, 100k, 1M) it writes a JSONL file of N rows of the
shipped finqa kind, then runs, each in a fresh subprocess so peak memory is per run:

  old   `data.rows.build_sft_dataset` + `save_dataset` of the code at `--old-ref` (the JSONL
        layout: every row a Python dict, an Example and token lists in memory), extracted with
        `git archive` into the work directory;
  new   this tree's `data.sft_dataset` build (streamed, `Dataset.map(num_proc)`) + `save_dataset`
        + `canonical_version`;

with the default recipe's prompt (system, template, max_length) and the real SmolLM2 tokenizer.
Measured from after the tokenizer is loaded to the finished artifact directory: wall and CPU
seconds (the run and its workers), rows/s, the run's peak RSS (VmHWM; it counts the pages of
memory-mapped files read) and the largest worker's (ru_maxrss of its children), the peak private
memory (RssAnon) of the run and, summed over the run and its workers, PSS of private memory (pages
shared after fork counted once), both sampled every 0.5 s; and RSS/private memory before the build
(imports + tokenizer). The old code is run up to
`--old-max-rows` rows (it holds every row in memory). Rows: `data/generate.py`'s scenarios (all
their question/answer items) make a pool; row i is pool item i mod P, and its context starts with
"Filing k." (k = i div P + 1) from the second pass on, so no two rows are duplicates.

    python -m ft_assets.bench.sft_dataset_scale --workdir /tmp/sft-bench

Results: ft_assets/bench/results/sft_dataset_scale_cpu_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
OLD_REF = "f1f2f8f"  # the last commit with the JSONL sft_dataset

CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
impl, data_file, tok_dir, out, prompt, num_proc = sys.argv[1:7]
import ft_assets
print("code:", ft_assets.__file__, file=sys.stderr)
prompt, num_proc = json.loads(prompt), int(num_proc)
from transformers import AutoTokenizer
try:
    from ft_assets.data import rows as D  # this tree
except ImportError:
    from ft_assets.core import data as D  # the layout of --old-ref
tok = AutoTokenizer.from_pretrained(tok_dir)
def rss(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
import threading
def anon(pid):  # private memory; RSS also counts the pages of memory-mapped Arrow files read
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
def pss_anon(pid):  # private memory with pages shared after fork counted once (split between sharers)
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
def family(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                kids.setdefault(int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += kids.get(out[-1], [])
    return out
anon0 = anon(os.getpid())
peak = {"self": anon0, "all": pss_anon(os.getpid())}
done = threading.Event()
def sample():
    while not done.wait(0.5):
        peak["self"] = max(peak["self"], anon(os.getpid()))
        peak["all"] = max(peak["all"], sum(pss_anon(q) for q in family(os.getpid())))
threading.Thread(target=sample, daemon=True).start()
src = D.SourceSpec("finqa", Path(data_file), "jsonl", {"question": "question", "context": "context",
                   "answer": "answer", "id": "id"}, 0.15, 42, 0.05)
meta = {"tokenizer_fingerprint": D.tokenizer_fingerprint(tok), "max_length": prompt["max_length"]}
out = Path(out)
out.mkdir(parents=True)
def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
c0 = cpu()
t0 = time.perf_counter()
kw = dict(system=prompt["system"], template=prompt["template"],
          template_without_context=prompt["template_without_context"], max_length=prompt["max_length"])
version = None
if impl == "new":
    from ft_assets.data import sft_dataset as S
    built = S.build_sft_dataset([src], tok, num_proc=num_proc, work_dir=out / ".build", **kw)
    S.save_dataset(built, out, meta)
    stats = built.stats
    del built
    import shutil; shutil.rmtree(out / ".build")
    version = S.canonical_version(out)
else:
    built = D.build_sft_dataset([src], tok, **kw)
    D.save_dataset(built, out, meta)
    stats = built.stats
wall = time.perf_counter() - t0
done.set()
print(json.dumps({"wall_s": wall, "cpu_s": cpu() - c0, "peak_anon_bytes": peak["self"],
                  "peak_anon_all_bytes": peak["all"], "anon_before_bytes": anon0, "rss_before_bytes": before, "peak_rss_bytes": rss("VmHWM:"),
                  "worker_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "train_rows": stats["train_rows"], "eval_rows": stats["eval_rows"],
                  "rejected_rows": stats["rejected_rows"], "trained_tokens": stats["trained_tokens_per_epoch"],
                  "tokens_mean": stats["tokens"]["mean"], "version": version,
                  "artifact_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}))
"""


def load_generator():
    spec = importlib.util.spec_from_file_location("finqa_generate", REPO_ROOT / "data" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules["finqa_generate"] = gen
    spec.loader.exec_module(gen)
    return gen


def write_pool(path: Path, scenarios: int, seed: int = 7) -> int:
    """Question/answer rows of `scenarios` generated scenarios (every item of each)."""
    if path.is_file():
        return sum(1 for _ in path.open())
    gen = load_generator()
    rng = random.Random(seed)
    seen, n = set(), 0
    with path.open("w") as fh:
        for i in range(scenarios):
            template = gen.TEMPLATES[i % len(gen.TEMPLATES)]
            scenario = gen.draw_scenario(rng, template)
            for item in scenario.items:
                key = (item.question, scenario.context)
                if key in seen:
                    continue
                seen.add(key)
                fh.write(json.dumps({"question": item.question, "context": scenario.context, "answer": item.answer,
                                     "kind": item.kind}, sort_keys=True) + "\n")
                n += 1
    return n


def write_rows(pool_path: Path, path: Path, n: int) -> None:
    if path.is_file():
        return
    pool = [json.loads(line) for line in pool_path.open()]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for i in range(n):
            row = dict(pool[i % len(pool)])
            k = i // len(pool)
            if k:
                row["context"] = f"Filing {k + 1}. {row['context']}"
            row["id"] = f"finqa-{i + 1:07d}"
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.rename(path)


def old_tree(workdir: Path, ref: str) -> Path:
    tree = workdir / f"old-{ref}"
    if not (tree / "ft_assets").is_dir():
        blob = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref, "ft_assets"], check=True,
                              capture_output=True).stdout
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def save_tokenizer(workdir: Path) -> Path:
    out = workdir / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from ft_assets.models.base_model import bundled_gguf_path

        gguf = bundled_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def default_prompt() -> dict:
    from ft_assets.config.recipe import load_recipe

    p = load_recipe(REPO_ROOT / "ft_assets" / "recipes" / "default.yaml").prompt
    return {"system": p.system, "template": p.template, "template_without_context": p.template_without_context,
            "max_length": p.max_length}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_one(impl: str, tree: Path, data_file: Path, tok_dir: Path, out: Path, prompt: dict, num_proc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start_load = load()
    proc = subprocess.run([sys.executable, "-c", CHILD, impl, str(data_file), str(tok_dir), str(out),
                           json.dumps(prompt), str(num_proc)], env=env, capture_output=True, text=True,
                          cwd=out.parent)  # not the repo: `python -c` puts the cwd first on sys.path
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "load_start": start_load, "load_end": load()}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {**res, "load_start": start_load, "load_end": load()}


def gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def _gib(r: dict, key: str) -> str:
    return gib(r[key]) if r.get(key) is not None else "not measured"


def _cpu(r: dict, rows: int | None = None) -> str:
    if "cpu_s" not in r:
        return "not measured"
    return f"{r['cpu_s']:.1f}" if rows is None else f"{rows / r['cpu_s']:,.0f}"


def markdown(result: dict) -> str:
    lines = [
        "# raw -> sft_dataset at scale: JSONL build (before) vs Arrow build (now), cpu",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']}; shared with other jobs: load average (1/5/15 min) at each run's start "
        f"and end is in the table",
        f"- versions: {result['versions']}",
        f"- data: {result['data']}",
        f"- prompt: the default recipe's (max_length {result['prompt']['max_length']}); real SmolLM2 tokenizer; "
        "eval_fraction 0.15, split seed 42",
        f"- old: `data.rows.build_sft_dataset` + `save_dataset` at {result['old_ref']} (JSONL files); "
        f"new: `data.sft_dataset` with num_proc {result['num_proc']} (Arrow, save_to_disk, canonical version)",
        f"- command: `{result['command']}`",
        "",
        "| code | rows | wall s | rows/s | CPU s | rows per CPU-s | peak RSS (run) | largest worker RSS | RSS before build | peak private (run) | peak private (run + workers, PSS) | private before build | artifact | load start -> end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['rows']:,} | failed: {r['error']} | | | | | | {r['load_start']} -> {r['load_end']} |")
            continue
        lines.append(
            f"| {r['impl']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} | "
            f"{_cpu(r)} | {_cpu(r, r['rows'])} | "
            f"{gib(r['peak_rss_bytes'])} | {gib(r['worker_peak_rss_bytes'])} | {gib(r['rss_before_bytes'])} | "
            f"{_gib(r, 'peak_anon_bytes')} | {_gib(r, 'peak_anon_all_bytes')} | {_gib(r, 'anon_before_bytes')} | "
            f"{r['artifact_bytes'] / 2**20:,.0f} MiB | {r['load_start']} -> {r['load_end']} |")
    for note in result["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,100000,1000000", help="comma-separated row counts")
    ap.add_argument("--impls", default="old,new")
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--new-tree", default=str(REPO_ROOT), help="the tree whose ft_assets is `new` (a snapshot lets you edit this one meanwhile)")
    ap.add_argument("--old-max-rows", type=int, default=100_000, help="the old code holds every row in memory")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pool-scenarios", type=int, default=4000)
    ap.add_argument("--workdir", default="/tmp/sft-bench")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.rows.split(",")]
    impls = args.impls.split(",")
    tok_dir = save_tokenizer(work)
    prompt = default_prompt()
    pool_rows = write_pool(work / "pool.jsonl", args.pool_scenarios)
    trees = {"new": Path(args.new_tree), "old": old_tree(work, args.old_ref) if "old" in impls else None}
    from importlib.metadata import version

    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        "versions": ", ".join(f"{p} {version(p)}" for p in ("datasets", "pyarrow", "transformers", "tokenizers"))
                    + f", python {platform.python_version()}",
        "data": f"{pool_rows:,} question/answer rows of {args.pool_scenarios:,} data/generate.py finqa scenarios, "
                "repeated with a 'Filing k.' prefix on the context from the second pass on (ids unique)",
        "prompt": prompt, "old_ref": args.old_ref, "num_proc": args.num_proc,
        "command": "python -m ft_assets.bench.sft_dataset_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": [], "notes": [],
    }
    out = Path(args.out)
    stem = out / f"sft_dataset_scale_cpu_{dt.date.today().isoformat()}"
    if stem.with_suffix(".json").is_file():  # runs of an earlier invocation today that this one does not redo
        earlier = json.loads(stem.with_suffix(".json").read_text())
        redo = {(i, n) for i in impls for n in sizes}
        result["runs"] = [r for r in earlier["runs"] if (r["impl"], r["rows"]) not in redo]
        result["notes"] = [x for x in earlier["notes"] if x not in result["notes"]]
        result["command"] = earlier["command"] + "; then " + result["command"]
    for n in sizes:
        data_file = work / f"finqa_{n}.jsonl"
        write_rows(work / "pool.jsonl", data_file, n)
        for impl in impls:
            if impl == "old" and n > args.old_max_rows:
                result["notes"].append(f"old code at {n:,} rows: not run (over --old-max-rows {args.old_max_rows:,}; "
                                       "see the peak RSS per row of the runs above).")
                continue
            print(f"{impl} {n:,} rows ...", flush=True)
            r = {"impl": impl, "rows": n, **run_one(impl, trees[impl], data_file, tok_dir, work / "out", prompt,
                                                     args.num_proc)}
            print(json.dumps(r), flush=True)
            result["runs"].append(r)
            result["runs"].sort(key=lambda r: (r["rows"], r["impl"] != "old"))
            out.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
