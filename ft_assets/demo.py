"""`python -m ft_assets.demo`: materialize the whole default graph into the persistent Dagster
instance ($DAGSTER_HOME, default $FT_HOME/dagster), so the runs, metadata and lineage are
there when you open the UI (`make ui`). Prints where the eval reports are."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import dagster as dg

from .definitions import build_definitions
from .defs.automation import record_sources
from .recipe import load_recipe
from .store import ArtifactStore, ft_home

INSTANCE_YAML = """\
# Written by ft_assets (make install / first use). GPU-bound assets are in pool "gpu":
# one of them runs at a time; assets outside that pool are never blocked by it.
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def ensure_instance(home: Path | None = None) -> dg.DagsterInstance:
    """The persistent instance under FT_HOME, created with a gpu-pool limit of 1 if new."""
    home = home or ft_home()
    dagster_home = Path(os.environ.setdefault("DAGSTER_HOME", str(home / "dagster")))
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(INSTANCE_YAML)
    return dg.DagsterInstance.get()


def materialize_all(defs: dg.Definitions, methods: list[str], instance: dg.DagsterInstance, say=print) -> list[str]:
    """Materialize the whole graph, one run per method partition. Returns the methods that failed
    (the others and the leaderboard still run, so one bad method does not hide the rest)."""
    assets = list(defs.assets)
    resources = defs.resources

    def has(key: str) -> bool:
        return any(dg.AssetKey(key) in getattr(a, "keys", ()) for a in assets)

    shared = [k for k in ("base_model", "sft_dataset", "quantized_base", "base_eval") if has(k)]
    t0 = time.perf_counter()
    record_sources(defs, instance)  # the versions these runs consume, on record (see record_sources)
    say(f"[demo] materializing {', '.join(shared)}")
    dg.materialize(assets, instance=instance, resources=resources, selection=shared)
    failed = []
    # dpo partitions continue another partition's adapter and read preference_dataset[<dpo method>]:
    # they go after the other methods, each after its preference_dataset partition
    pref_parts = set(defs.resolve_assets_def("preference_dataset").partitions_def.get_partition_keys()
                     ) if has("preference_dataset") else set()
    for m in sorted(methods, key=lambda m: m in pref_parts):
        if m in pref_parts:
            say(f"[demo] {time.perf_counter() - t0:6.0f}s  preference_dataset[{m}]")
            dg.materialize(assets, instance=instance, resources=resources, partition_key=m,
                           selection=["preference_dataset"])
        say(f"[demo] {time.perf_counter() - t0:6.0f}s  training, merging and evaluating partition {m!r}")
        result = dg.materialize(assets, instance=instance, resources=resources, partition_key=m,
                                selection=["adapter", "merged_model", "eval_report"], raise_on_error=False)
        if not result.success:
            failed.append(m)
            say(f"[demo] partition {m!r} FAILED; see the run {result.run_id} in the UI")
    if has("student"):
        say(f"[demo] {time.perf_counter() - t0:6.0f}s  distilling the student")
        result = dg.materialize(assets, instance=instance, resources=resources, selection=["student"],
                                raise_on_error=False)
        if not result.success:
            failed.append("student")
            say(f"[demo] student FAILED; see the run {result.run_id} in the UI")
    dg.materialize(assets, instance=instance, resources=resources, selection=["leaderboard"])
    record_sources(defs, instance)  # a dpo method's settings version names the SFT adapter trained above
    say(f"[demo] {time.perf_counter() - t0:6.0f}s  done")
    return failed


def main() -> int:
    recipe = load_recipe()
    instance = ensure_instance()
    defs = build_definitions(recipe)
    t0 = time.perf_counter()
    failed = materialize_all(defs, list(recipe.methods), instance)
    store = ArtifactStore()
    print(f"\n[demo] whole graph materialized in {time.perf_counter() - t0:.0f}s (recipe {recipe.name})")
    for m in recipe.methods:
        if m in failed:
            print(f"[demo] {m:>8}: FAILED (the run's logs in the UI say why)")
            continue
        art = store.latest("eval_report", m)
        metrics = json.loads((art.dir / "metrics.json").read_text())
        b, t = metrics["base"], metrics["tuned"]
        print(f"[demo] {m:>8}: token F1 {b['token_f1']:.3f} -> {t['token_f1']:.3f}, exact match "
              f"{b['exact_match']:.3f} -> {t['exact_match']:.3f}, ROUGE-L {b['rouge_l']:.3f} -> {t['rouge_l']:.3f}")
        print(f"           eval report: {art.dir / 'metrics.json'}")
    board = store.latest("leaderboard")
    print(f"[demo] leaderboard: {board.dir / 'leaderboard.csv'}")
    print("[demo] open the UI with `make ui` (http://127.0.0.1:3000) to browse assets, metadata and lineage")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
