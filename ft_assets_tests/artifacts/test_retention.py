"""`prune`: the latest and N newest versions of every slot stay with everything they name; the
rest goes only with --delete; a killed prune leaves nothing that looks like a version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ft_assets.artifacts import retention
from ft_assets.cli.main import main as cli
from ft_assets.artifacts.store import MANIFEST, ArtifactStore


def put(store: ArtifactStore, asset: str, partition: str | None, text: str, inputs=None, **extra):
    with store.write(asset, partition) as st:
        (st.path / "f.bin").write_text(text)
        st.inputs = dict(inputs or {})
        st.extra.update(extra)
    return st.artifact


@pytest.fixture
def history(tmp_path):
    """Two data versions; lora trained on each; the latest lora continued the first one and its
    report reads the old data's eval split (forgetting); qlora trained on the old data only."""
    s = ArtifactStore(tmp_path)
    base = put(s, "base_model", None, "base")
    d1 = put(s, "sft_dataset", None, "data-1")
    q1 = put(s, "adapter", "qlora", "q1", {"sft_dataset": d1.version, "base_model": base.version})
    a1 = put(s, "adapter", "lora", "a1", {"sft_dataset": d1.version, "base_model": base.version})
    d2 = put(s, "sft_dataset", None, "data-2")
    a2 = put(s, "adapter", "lora", "a2", {"sft_dataset": d2.version, "base_model": base.version,
                                          "adapter[lora]": a1.version},
             continual={"previous_sft_dataset": d1.version})
    r2 = put(s, "eval_report", "lora", "r2", {"adapter[lora]": a2.version, "sft_dataset": d2.version},
             forgetting={"previous_adapter": a1.version, "previous_sft_dataset": d1.version})
    m1 = put(s, "merged_model", "lora", "m1", {"adapter[lora]": a1.version})
    m2 = put(s, "merged_model", "lora", "m2", {"adapter[lora]": a2.version})
    return s, dict(base=base, d1=d1, d2=d2, q1=q1, a1=a1, a2=a2, r2=r2, m1=m1, m2=m2)


def refs(plan):
    return {(v.asset, v.partition, v.version) for v in plan.drop}


def test_only_what_no_kept_version_names_is_dropped(history):
    store, a = history
    p = retention.plan(store, keep=1)
    # m1 is the only version neither latest nor named by a kept one: a1 stays because a2 continued
    # it (and r2 measured forgetting against it), d1 because qlora's latest and a2's replay read it
    assert refs(p) == {("merged_model", "lora", a["m1"].version)}
    assert p.kept[("adapter", "lora", a["a1"].version)].startswith("an input of")
    assert p.kept[("sft_dataset", None, a["d1"].version)].startswith("an input of")


def test_keep_n_keeps_the_n_newest_and_latest_even_when_older(history):
    store, a = history
    assert retention.plan(store, keep=2).drop == []
    store.set_latest(a["m1"])  # rolled back: the pointer names the older version
    p = retention.plan(store, keep=1)
    assert p.kept[("merged_model", "lora", a["m1"].version)] == "latest"
    assert p.kept[("merged_model", "lora", a["m2"].version)] == "among the 1 newest"
    with pytest.raises(ValueError, match="at least 1"):
        retention.plan(store, keep=0)


def test_references_follow_chains_transitively(tmp_path):
    s = ArtifactStore(tmp_path)
    d1 = put(s, "sft_dataset", None, "old")
    a1 = put(s, "adapter", "lora", "a1", {"sft_dataset": d1.version})
    m1 = put(s, "merged_model", "lora", "m1", {"adapter[lora]": a1.version})
    put(s, "sft_dataset", None, "new")
    put(s, "adapter", "lora", "a2", {"sft_dataset": s.latest("sft_dataset").version})
    put(s, "eval_report", "lora", "r", {"merged_model[lora]": m1.version})  # still reports on m1
    p = retention.plan(s, keep=1)
    assert {("merged_model", "lora", m1.version), ("adapter", "lora", a1.version),
            ("sft_dataset", None, d1.version)} <= set(p.kept)
    assert refs(p) == set()


def test_cli_is_a_dry_run_until_delete(history, capsys):
    store, a = history
    m1 = a["m1"]
    assert cli(["prune", "--home", str(store.home)]) == 0
    out = capsys.readouterr().out
    assert "drop merged_model[lora]" in out and m1.version in out and "dry run: nothing deleted" in out
    assert (m1.dir / MANIFEST).is_file()
    assert cli(["prune", "--home", str(store.home), "--delete"]) == 0
    assert "deleted 1 versions" in capsys.readouterr().out
    assert not m1.dir.exists() and store.get("merged_model", "lora", m1.version) is None
    assert not list(m1.dir.parent.glob(".deleting-*"))
    for key in ("a1", "a2", "d1", "d2", "q1", "r2", "m2", "base"):
        assert (a[key].dir / MANIFEST).is_file(), key
    assert cli(["prune", "--home", str(store.home)]) == 0
    assert "0 to drop" in capsys.readouterr().out
    assert cli(["prune", "--home", str(store.home), "--keep", "0"]) == 2


def test_a_killed_prune_leaves_no_version_that_looks_whole(tmp_path):
    """SIGKILL while deleting a large version: the version is gone by name at once (renamed before
    its files are removed); the next prune removes what the killed one left."""
    store = ArtifactStore(tmp_path)
    with store.write("merged_model", "lora") as st:
        for i in range(400):
            (st.path / f"shard-{i:04d}.bin").write_bytes(os.urandom(64 << 10))
    old = st.artifact
    put(store, "merged_model", "lora", "newer")
    code = ("import sys, shutil, time\n"
            "from ft_assets.artifacts import retention, store\n"
            "from ft_assets.artifacts.store import ArtifactStore\n"
            "real = shutil.rmtree\n"
            "def slow(path, *a, **k):\n"
            "    print('deleting', flush=True); time.sleep(30); real(path, *a, **k)\n"
            "store.shutil.rmtree = slow\n"
            f"s = ArtifactStore({str(tmp_path)!r})\n"
            "retention.apply(s, retention.plan(s, keep=1))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "deleting"  # renamed, about to remove the files
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert store.get("merged_model", "lora", old.version) is None
    left = retention.plan(store, keep=1)
    assert left.drop == [] and len(left.leftovers) == 1
    retention.apply(store, left)
    assert not list(old.dir.parent.glob(".deleting-*"))
    assert store.latest("merged_model", "lora").version != old.version


@pytest.mark.parametrize("namespace", [None, "finance"])  # finance: one pipeline of several in one store
def test_what_continual_learning_reads_outside_the_inputs_stays(tmp_path, namespace):
    """A continued adapter's replay data and a report's forgetting baseline are not manifest
    inputs, yet re-running those steps reads them."""
    s = ArtifactStore(tmp_path, namespace)
    q = s.qualified
    d1 = put(s, "sft_dataset", None, "old")
    a1 = put(s, "adapter", "lora", "a1", {q("sft_dataset"): d1.version})
    d2 = put(s, "sft_dataset", None, "new")
    a2 = put(s, "adapter", "lora", "a2", {q("sft_dataset"): d2.version}, continual={"previous_sft_dataset": d1.version})
    p = retention.plan(s, keep=1)
    assert p.kept[(q("sft_dataset"), None, d1.version)] == f"an input of {q('adapter')}[lora] {a2.version}"
    assert refs(p) == {(q("adapter"), "lora", a1.version)}
    r = put(s, "eval_report", "lora", "r", {f"{q('adapter')}[lora]": a2.version},
            forgetting={"previous_adapter": a1.version, "previous_sft_dataset": d1.version})
    p = retention.plan(s, keep=1)
    assert p.kept[(q("adapter"), "lora", a1.version)] == f"an input of {q('eval_report')}[lora] {r.version}"
    assert refs(p) == set()
