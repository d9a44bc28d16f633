"""`python -m ft_assets.demo`: materialize the whole graph of $FT_RECIPE (default: the short demo
recipe, `recipes/demo.yaml`) into the persistent Dagster instance ($DAGSTER_HOME, default
$FT_HOME/dagster, or $FT_LOCAL_HOME/dagster when FT_HOME is a URL), so the runs, metadata and lineage are there when you open the UI (`make ui`,
which loads the same recipe). Prints where the eval reports are."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import dagster as dg

from .training.preemption import PREEMPTED
from .definitions import build_definitions
from .defs.automation import record_sources
from .config.recipe import DEMO_RECIPE, load_recipes
from .defs.runs import LAUNCH_TAG, PoolWatch, launch_tags, reap_dead_runs
from .artifacts.store import ArtifactStore
from .config.paths import ft_home

INSTANCE_MARK = "# Written by ft_assets"
INSTANCE_YAML = f"""\
{INSTANCE_MARK} (make install / first use); rewritten when ft_assets changes it, unless you
# delete this first line. GPU-bound assets are in pool "gpu": one of them runs at a time; assets
# outside that pool are never blocked by it.
concurrency:
  pools:
    default_limit: 1
# With the daemon (make ui): fail runs stuck starting or canceling, free the slots of ended runs.
# Runs whose worker process died are found by ft_assets' dead_runs sensor (ft_assets/defs/runs.py).
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  free_slots_after_run_end_seconds: 5
# With the daemon: a run that died (worker gone) or was preempted (SIGTERM, checkpoint written) is
# re-run once and resumes from its checkpoint; a step that failed on bad input, NaN or OOM is not.
run_retries:
  enabled: true
  max_retries: 1
  retry_on_asset_or_op_failure: false
nux:
  enabled: false
telemetry:
  enabled: false
"""


PG_URL_ENV = "FT_PG_URL"
PG_SCHEME = "postgresql+psycopg2://"
# Runs, event logs and schedules in PostgreSQL (dagster-postgres) instead of SQLite files under
# DAGSTER_HOME: what several people, a daemon and a webserver need. The URL (with its password)
# stays in the environment; the file names only the variable.
POSTGRES_STORAGE = f"""\
# The instance's storage is PostgreSQL at ${PG_URL_ENV} (set when this file was written); to go
# back to SQLite under DAGSTER_HOME, delete this file with {PG_URL_ENV} unset.
storage:
  postgres:
    postgres_url:
      env: {PG_URL_ENV}
"""


def instance_yaml(postgres: bool) -> str:
    return INSTANCE_YAML + (POSTGRES_STORAGE if postgres else "")


def ensure_instance(home: Path | None = None) -> dg.DagsterInstance:
    """The persistent instance under the local FT_HOME ($FT_LOCAL_HOME when FT_HOME is a URL), with
    a gpu-pool limit of 1: created if new, brought up to date if ft_assets wrote it (a file
    without INSTANCE_MARK is the user's and left alone).
    Its storage is PostgreSQL when $FT_PG_URL is set, and stays PostgreSQL once it is (an unset
    variable then fails loudly rather than quietly starting an empty SQLite instance)."""
    home = home or ft_home()
    # A relative $DAGSTER_HOME resolves against the current directory, and is exported absolute
    # (Dagster refuses a relative one, here and in the processes it starts).
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or Path(home) / "dagster").resolve()
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    url = os.environ.get(PG_URL_ENV, "")
    if url and not url.startswith(PG_SCHEME):
        raise ValueError(f"${PG_URL_ENV} must start with {PG_SCHEME} (dagster-postgres talks to the server "
                         f"through psycopg2; SQLAlchemy reads a bare postgresql:// as psycopg 3, which is not "
                         f"installed): e.g. {PG_SCHEME}USER:PASSWORD@HOST:5432/DATABASE")
    cfg = dagster_home / "dagster.yaml"
    current = cfg.read_text() if cfg.exists() else None
    want = instance_yaml(bool(os.environ.get(PG_URL_ENV)) or (current is not None and POSTGRES_STORAGE in current))
    if current is None or (current.startswith(INSTANCE_MARK) and current != want):
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text(want)
        os.replace(tmp, cfg)
    return dg.DagsterInstance.get()


Target = tuple[dg.AssetKey, str | None]  # an asset and one of its partitions (None: unpartitioned)


def run_batches(defs: dg.Definitions) -> list[list[dg.AssetsDefinition]]:
    """The materializable assets in the order their declared dependencies (`asset_deps`) allow,
    cut into batches that share one partitions definition: each batch is one run per partition
    key (a Dagster run holds one partition key). Greedy: an asset joins the open batch when its
    partitions match and every dependency is done or in that batch, so chains stay in one run."""
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]
    deps = {id(a): {d for k in a.keys for d in a.asset_deps[k]} - set(a.keys) for a in assets}
    owner = {k: a for a in assets for k in a.keys}
    pending, batches = list(assets), []
    while pending:  # each pass places at least one asset (the graph is acyclic), so it ends
        done = {k for a in assets if a not in pending for k in a.keys}
        ready = [a for a in pending if all(d in done or d not in owner for d in deps[id(a)])]
        batch, keys = [ready[0]], set(ready[0].keys)
        pending.remove(ready[0])
        grew = True
        while grew:
            grew = False
            for a in list(pending):
                if a.partitions_def == batch[0].partitions_def and all(
                        d in done or d in keys or d not in owner for d in deps[id(a)]):
                    batch.append(a)
                    keys |= set(a.keys)
                    pending.remove(a)
                    grew = True
        batches.append(batch)
    return batches


def materialize_graph(defs: dg.Definitions, instance: dg.DagsterInstance, targets: set[Target] | None = None,
                      say=print) -> list[Target]:
    """Materialize `targets` (default: every partition of every asset) in dependency order, one
    run per batch and partition key. A run that fails does not stop the others; targets whose
    same-partition (or unpartitioned) upstream failed are skipped; after a run preempted by a signal
    nothing more is launched. Dead runs are cleaned up first and while a run waits on a pool
    (`ft_assets.defs.runs`). Returns what did not materialize."""
    t0 = time.perf_counter()
    failed: list[Target] = []
    stopped = False
    reap_dead_runs(instance, say)  # a run killed earlier must not hold the gpu pool for this one
    for batch in run_batches(defs):
        pdef = batch[0].partitions_def
        for partition in pdef.get_partition_keys() if pdef else [None]:
            want = [k for a in batch for k in a.keys if targets is None or (k, partition) in targets]
            upstream_failed = [f for f in failed if f[1] in (partition, None)
                               and any(f[0] in a.asset_deps[k] for a in batch for k in a.keys if k in want)]
            if not want:
                continue
            label = f"{', '.join(k.to_user_string() for k in want)}{f' [{partition}]' if partition else ''}"
            if stopped:
                failed += [(k, partition) for k in want]
                continue
            if upstream_failed:
                say(f"[demo] {time.perf_counter() - t0:6.0f}s  skipped {label}: an input failed")
                failed += [(k, partition) for k in want]
                continue
            say(f"[demo] {time.perf_counter() - t0:6.0f}s  {label}")
            tags = launch_tags()
            with PoolWatch(instance, tags[LAUNCH_TAG], say), sigterm_kept():
                result = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources,
                                        selection=want, partition_key=partition, raise_on_error=False, tags=tags)
            made = {e.asset_key for e in result.get_asset_materialization_events()}
            if not result.success:
                failed += [(k, partition) for k in want if k not in made]
                say(f"[demo] {label} FAILED; see the run {result.run_id} in the UI")
                preempted = [m for m in _failure_messages(result) if PREEMPTED in m]
                if preempted:  # this process was asked to stop (SIGTERM/SIGINT): launch nothing more
                    say(f"[demo] {preempted[0]}; launching nothing more")
                    stopped = True
    return failed


@contextlib.contextmanager
def sigterm_kept() -> Iterator[None]:
    """This process's SIGTERM handler as it was before the block. Why: a Dagster run ends by giving
    SIGTERM SIGINT's disposition, and a process started with SIGINT ignored (a background job without
    job control) would then ignore SIGTERM, and so would every process it starts after the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


def _failure_messages(result) -> list[str]:
    return [ev.step_failure_data.user_failure_data.description for ev in result.all_events
            if ev.is_step_failure and ev.step_failure_data.user_failure_data]


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, say=print) -> list[str]:
    """What `make demo` does (its `main` makes the same two calls, keeping the failed keys): record
    the sources it consumes, then materialize the whole graph.
    Returns the method partitions (or unpartitioned assets) that failed; the others still run."""
    record_sources(defs, instance)  # the versions these runs consume, on record (see record_sources)
    failed = materialize_graph(defs, instance, say=say)
    return sorted({p or k.to_user_string() for k, p in failed})


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}")


def main() -> int:
    # SIGTERM outside training stops like Ctrl-C (Dagster records the run as failed and frees its slots);
    # during training the loop turns it into a checkpoint first (training.preemption)
    signal.signal(signal.SIGTERM, _interrupt)
    recipes = load_recipes(os.environ.get("FT_RECIPE") or DEMO_RECIPE)  # several: one pipeline each
    instance = ensure_instance()
    defs = build_definitions(recipes)
    t0 = time.perf_counter()
    record_sources(defs, instance)  # as materialize_all, keeping the failed keys to tell pipelines apart
    failed = materialize_graph(defs, instance)
    print(f"\n[demo] whole graph materialized in {time.perf_counter() - t0:.0f}s "
          f"(recipe {', '.join(r.name for r in recipes)})")
    for recipe in recipes:  # a pipeline's keys start with its name; a lone recipe's failures are all its own
        mine = [p for k, p in failed if p and (recipe.pipeline is None or k.path[0] == recipe.pipeline)]
        report(recipe, ArtifactStore(namespace=recipe.pipeline), mine)
    print("[demo] open the UI with `make ui` (http://127.0.0.1:3000) to browse assets, metadata and lineage")
    return 1 if failed else 0


def report(recipe, store: ArtifactStore, failed: list[str]) -> None:
    """One pipeline's results: each method's metrics against the base (`failed`: its method
    partitions that did not materialize), and the leaderboard."""
    label = f"[demo] {recipe.pipeline}/" if recipe.pipeline else "[demo] "
    for m in recipe.methods:
        if m in failed:
            print(f"{label}{m:>8}: FAILED (the run's logs in the UI say why)")
            continue
        art = store.latest("eval_report", m)
        metrics = json.loads((art.dir / "metrics.json").read_text())
        b, t = metrics["base"], metrics["tuned"]
        print(f"{label}{m:>8}: token F1 {b['token_f1']:.3f} -> {t['token_f1']:.3f}, exact match "
              f"{b['exact_match']:.3f} -> {t['exact_match']:.3f}, ROUGE-L {b['rouge_l']:.3f} -> {t['rouge_l']:.3f}")
        print(f"           eval report: {art.dir / 'metrics.json'}")
    board = store.latest("leaderboard")
    if board is not None:
        print(f"{label}leaderboard: {board.dir / 'leaderboard.csv'}")


if __name__ == "__main__":
    sys.exit(main())
