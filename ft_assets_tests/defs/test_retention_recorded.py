"""`prune` and what is in use (issue 31): the version a latest Dagster materialization recorded
stays (the IO manager loads that one, not LATEST), and a prune never drops a version a writer is
committing or reusing at that moment (a per-slot lock in the local home)."""

from __future__ import annotations

import os
import stat
import threading

import dagster as dg
import pytest

from ft_assets.artifacts import slot_locks
from ft_assets.cli.main import main as cli
from ft_assets.defs import _common as c
from ft_assets.artifacts.store import LATEST, MANIFEST, ArtifactStore
from ft_assets_tests.defs.conftest import tiny_recipe, write_project

WAIT_S = 60  # bound of every wait on the other thread (they take milliseconds)
CHEAP_EVAL = {"max_new_tokens": 2, "batch_size": 4, "max_examples": 4}  # base_eval only has to read its inputs


def put(store: ArtifactStore, asset: str, partition: str | None, text: str, derivation=None):
    with store.write(asset, partition, derivation=derivation) as st:
        (st.path / "f.bin").write_text(text)
    return st.artifact


def test_prune_keeps_the_version_dagster_recorded_though_latest_moved_past_it(tmp_path, tiny_model_dir, monkeypatch,
                                                                               capsys):
    """README's `python -m ft_assets prune --keep 1 --delete` on the persistent instance `make install`
    writes: another instance (or a step that failed after its store write) moved sft_dataset's LATEST
    to a version no materialization names; the next downstream run still loads the recorded one."""
    from ft_assets.definitions import build_definitions
    from ft_assets.demo import ensure_instance
    from ft_assets.config.recipe import load_recipe

    home = tmp_path / "ft_home"
    monkeypatch.setenv("FT_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    instance = ensure_instance(home)
    recipe = load_recipe(write_project(tmp_path, tiny_recipe(tiny_model_dir, evaluation=CHEAP_EVAL)))
    defs = build_definitions(recipe, home=str(home))
    assets, resources = list(defs.assets), defs.resources
    made = dg.materialize(assets, instance=instance, resources=resources, selection=["base_model", "sft_dataset"])
    store = ArtifactStore(home)
    recorded = store.latest("sft_dataset")
    # another instance writes a newer sft_dataset to the same store: LATEST moves, this instance records nothing
    unrecorded = put(ArtifactStore(home), "sft_dataset", None, "another instance's data")
    assert store.latest_version("sft_dataset") == unrecorded.version != recorded.version

    assert cli(["prune", "--keep", "1", "--delete"]) == 0
    out = capsys.readouterr().out
    assert store.get("sft_dataset", None, recorded.version) is not None, out
    assert "keep sft_dataset" in out and f"{recorded.version}: recorded by Dagster run {made.run_id}" in out
    assert store.get("sft_dataset", None, unrecorded.version) is not None  # LATEST stays too

    downstream = dg.materialize(assets, instance=instance, resources=resources, selection=["base_eval"])
    report = downstream.asset_materializations_for_node("base_eval")[0]
    assert store.get("base_eval", None, report.tags["dagster/data_version"]).manifest()["inputs"]["sft_dataset"] \
        == recorded.version


def test_prune_without_a_dagster_instance_says_so_and_keeps_the_rule_it_had(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "no-instance"))
    store = ArtifactStore(tmp_path / "home")
    old = put(store, "sft_dataset", None, "old")
    put(store, "sft_dataset", None, "new")
    assert cli(["prune", "--home", str(store.home), "--delete"]) == 0
    out = capsys.readouterr().out
    assert f"no Dagster instance at {tmp_path / 'no-instance'}" in out and "deleted 1 versions" in out
    assert store.get("sft_dataset", None, old.version) is None
    assert not (tmp_path / "no-instance").exists()  # nothing created where the user has no instance


def test_prune_refuses_to_delete_when_the_instance_cannot_be_read(tmp_path, monkeypatch, capsys):
    """An instance on PostgreSQL whose $FT_PG_URL is unset: what it recorded is unknown, so nothing goes."""
    from ft_assets.demo import instance_yaml

    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text(instance_yaml(postgres=True))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("FT_PG_URL", raising=False)
    store = ArtifactStore(tmp_path / "home")
    old = put(store, "sft_dataset", None, "old")
    put(store, "sft_dataset", None, "new")
    assert cli(["prune", "--home", str(store.home), "--delete"]) == 2
    err = capsys.readouterr().err
    assert f"cannot open the Dagster instance at {tmp_path / 'dagster'}" in err and "nothing deleted" in err
    assert len(err) < 1000 and store.get("sft_dataset", None, old.version) is not None


def test_the_versions_recorded_are_the_latest_of_every_key_and_partition_in_their_store_slots(tmp_path):
    """Keys of a pipeline (`finance/adapter`) map to its store slots as the IO manager maps them (the
    base model to its one shared slot); per partition, only the latest materialization counts."""
    from ft_assets.defs.recorded import recorded_versions

    def report(key: list[str], partition: str | None, version: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            dg.AssetKey(key), partition=partition, tags={"dagster/data_version": version}))

    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster"))  # a persistent one, as a user's
    for key, partition, version in ((["finance", "adapter"], "lora", "a1"), (["finance", "adapter"], "lora", "a2"),
                                    (["finance", "adapter"], "dora", "d1"), (["finance", "base_model"], None, "b1"),
                                    (["sft_dataset"], None, "s1"), (["sft_dataset"], None, "s2")):
        report(key, partition, version)
    store = ArtifactStore(tmp_path / "home")
    assert set(recorded_versions(instance, store)) == {
        ("finance.adapter", "lora", "a2"), ("finance.adapter", "dora", "d1"), ("base_model", None, "b1"),
        ("sft_dataset", None, "s2")}
    assert set(recorded_versions(instance, store).values()) == {"recorded by Dagster (reported, no run)"}


def test_a_recorded_version_that_is_a_path_is_never_read_as_one(tmp_path, monkeypatch, capsys):
    """Whoever can write the instance's event log can name any version; prune matches it against the
    versions the store lists and never opens a path built from it."""
    (tmp_path / "dagster").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster"))
    instance.report_runless_asset_event(dg.AssetMaterialization(
        dg.AssetKey("sft_dataset"), tags={"dagster/data_version": "../../../outside"}))
    store = ArtifactStore(tmp_path / "home")
    (store.home / "outside").mkdir(parents=True)
    (store.home / "outside" / MANIFEST).write_text("not json: reading it would fail the prune")
    old = put(store, "sft_dataset", None, "old")
    put(store, "sft_dataset", None, "new")
    assert cli(["prune", "--home", str(store.home), "--delete"]) == 0
    out = capsys.readouterr().out
    assert "no Dagster instance" not in out  # one without dagster.yaml, as `dagster dev` leaves it, is found
    assert "deleted 1 versions" in out and store.get("sft_dataset", None, old.version) is None


class Paused:
    """Runs `work` in a thread that stops where `pause_at` is called, until `resume()`."""

    def __init__(self, work):
        self.inside, self.go, self.result, self.error = threading.Event(), threading.Event(), None, None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)

    def pause_at(self) -> None:
        self.inside.set()
        assert self.go.wait(WAIT_S)

    def _run(self, work) -> None:
        try:
            self.result = work()
        except BaseException as exc:  # noqa: BLE001 (reported by resume())
            self.error = exc
        finally:
            self.inside.set()

    def start(self) -> None:
        self.thread.start()
        assert self.inside.wait(WAIT_S)

    def resume(self):
        self.go.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


MADE_BY = {"inputs": {"sft_dataset": "d1"}, "code_version": "1", "recipe": "r1"}  # what the reusing step asks for


def three_adapter_versions(home):
    """(store, oldest, reused): adapter[lora] w0 (another recipe), w1 (made by MADE_BY: neither LATEST
    nor the newest), w2 (another recipe: LATEST and the newest)."""
    store = ArtifactStore(home)
    oldest = put(store, "adapter", "lora", "w0", {**MADE_BY, "recipe": "r0"})
    reused = put(store, "adapter", "lora", "w1", MADE_BY)
    put(store, "adapter", "lora", "w2", {**MADE_BY, "recipe": "r2"})
    return store, oldest, reused


def reuse(step_store):
    """The adapter step's reuse rule, on the step's own store object (another process in real life)."""
    return c.reuse_or_say_why(dg.build_asset_context(), step_store, "adapter", "lora", MADE_BY, False)


def test_a_version_a_step_is_reusing_survives_a_concurrent_prune(tmp_path, capsys):
    """A step finds the adapter made from its inputs already stored (an older version, neither LATEST
    nor the newest) and reuses it; a `prune --delete` runs in between: that version stays, and so
    does everything else of the slot until the step is done; then prune works as before."""
    store, oldest, reused = three_adapter_versions(tmp_path)

    step_store = ArtifactStore(tmp_path)  # the step's own store object (another process in real life)
    real_get = step_store.get

    def get(asset, partition, version):  # the step is inside the reuse: found, not yet returned
        found = real_get(asset, partition, version)
        if version == reused.version:
            step.pause_at()
        return found

    step_store.get = get
    step = Paused(lambda: reuse(step_store))
    step.start()
    assert cli(["prune", "--home", str(tmp_path), "--delete"]) == 0
    out = capsys.readouterr().out
    assert step.resume() == reused
    assert store.get("adapter", "lora", reused.version) is not None, out
    assert store.latest_version("adapter", "lora") == reused.version
    assert "adapter[lora]" in out and "in use" in out
    assert store.get("adapter", "lora", oldest.version) is not None  # its slot was left alone

    assert cli(["prune", "--home", str(tmp_path), "--delete"]) == 0  # nobody in the slot now: as before
    assert "deleted 1 versions" in capsys.readouterr().out
    assert store.get("adapter", "lora", oldest.version) is None
    assert store.get("adapter", "lora", reused.version) is not None


def test_a_version_found_for_reuse_is_latest_before_the_step_moves_on(tmp_path, capsys):
    """The step has found the version to reuse and let go of the slot's lock, and has not yet returned
    it when a prune runs: the store made it LATEST while it held the lock, so it stays."""
    store, oldest, reused = three_adapter_versions(tmp_path)

    step_store = ArtifactStore(tmp_path)
    real_find_derived = step_store.find_derived

    def find_derived(*args):  # the step between the find (lock released) and returning the artifact
        found = real_find_derived(*args)
        step.pause_at()
        return found

    step_store.find_derived = find_derived
    step = Paused(lambda: reuse(step_store))
    step.start()
    assert cli(["prune", "--home", str(tmp_path), "--delete"]) == 0
    out = capsys.readouterr().out
    assert step.resume() == reused
    assert store.get("adapter", "lora", reused.version) is not None, out
    assert store.get("adapter", "lora", oldest.version) is None and "deleted 1 versions" in out


def test_a_version_a_writer_is_committing_again_survives_a_concurrent_prune(tmp_path, capsys):
    """The data went back to what an older version holds: the rebuild's content version is that
    older directory (kept as it is), and the writer is about to make it LATEST when a prune runs."""
    store = ArtifactStore(tmp_path)
    oldest = put(store, "sft_dataset", None, "rows 0")
    again = put(store, "sft_dataset", None, "rows 1")
    put(store, "sft_dataset", None, "rows 2")  # LATEST and the newest

    writer = ArtifactStore(tmp_path)
    real_set_latest = writer.set_latest

    def set_latest(art):  # renamed into place (found there already), LATEST not yet moved
        writer.pause_at_commit()
        real_set_latest(art)

    writer.set_latest = set_latest
    step = Paused(lambda: put(writer, "sft_dataset", None, "rows 1"))
    writer.pause_at_commit = step.pause_at
    step.start()
    assert cli(["prune", "--home", str(tmp_path), "--delete"]) == 0
    out = capsys.readouterr().out
    assert step.resume().version == again.version
    assert store.get("sft_dataset", None, again.version) is not None, out
    assert store.latest("sft_dataset").version == again.version

    assert cli(["prune", "--home", str(tmp_path), "--delete"]) == 0
    assert "deleted 1 versions" in capsys.readouterr().out
    assert store.get("sft_dataset", None, oldest.version) is None


def test_lock_files_are_no_artifacts_and_their_directory_is_private_and_never_a_symlink(tmp_path):
    store = ArtifactStore(tmp_path / "home")
    art = put(store, "adapter", "lora", "w")
    locks = store.home / ".locks"
    mode = locks.lstat().st_mode
    assert stat.S_ISDIR(mode) and not mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH | stat.S_IXOTH)
    assert list(locks.iterdir()) and all(f.is_file() and not f.is_symlink() for f in locks.iterdir())
    assert [(v.asset, v.partition, v.version) for v in store.stored_versions()] == [("adapter", "lora", art.version)]
    assert [r["data_version"] for r in store.list_latest()] == [art.version] and store.interrupted_drops() == []

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = ArtifactStore(tmp_path / "victim")
    victim.home.mkdir()
    os.symlink(elsewhere, victim.home / ".locks")
    with pytest.raises(OSError, match=r"\.locks.*symlink"):
        put(victim, "adapter", "lora", "w")
    assert list(elsewhere.iterdir()) == []  # nothing created through the link
    slot = victim.root / "adapter" / "lora"
    assert victim.latest("adapter", "lora") is None and not list(slot.glob("*/" + MANIFEST))
    assert not (slot / LATEST).exists() and not list(slot.glob(".staging-*"))  # failed before any work


def test_a_writer_waits_while_a_prune_drops_in_its_slot_and_says_so_if_it_waits_too_long(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    first = put(store, "adapter", "lora", "w0")
    with slot_locks.exclusive(store.home, store.rel("adapter", "lora")) as held:  # what a prune holds
        assert held
        with monkeypatch.context() as short:
            short.setattr(slot_locks, "WAIT_S", 0.2)
            with pytest.raises(slot_locks.SlotLockError, match="a prune has held this slot's lock .* is a `python -m "
                                                               "ft_assets prune` stuck"):
                put(ArtifactStore(tmp_path), "adapter", "lora", "w2")
        writer = threading.Thread(target=put, args=(ArtifactStore(tmp_path), "adapter", "lora", "w1"), daemon=True)
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and store.latest_version("adapter", "lora") == first.version  # waiting
    writer.join(WAIT_S)
    assert not writer.is_alive() and store.latest_version("adapter", "lora") != first.version
    assert not list(store.slot("adapter", "lora").glob(".staging-*"))
