"""Artifacts are written to a staging dir and renamed; failures leave no trace."""

from __future__ import annotations

import json

import pytest

from ft_assets.artifacts.store import MANIFEST, ArtifactStore


def test_write_creates_versioned_dir_with_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("thing", "p1", recipe_hash="r1", code_version="c1", seed=3) as st:
        (st.path / "a.txt").write_text("hello")
        st.inputs = {"up": "v0"}
    art = st.artifact
    assert art.dir.name == art.version and art.dir.parent.name == "p1"
    m = json.loads((art.dir / MANIFEST).read_text())
    assert m["inputs"] == {"up": "v0"} and m["seed"] == 3 and m["files"] == {"a.txt": 5}
    assert store.latest("thing", "p1") == art
    assert not list(art.dir.parent.glob(".staging-*"))


def test_same_content_same_version_different_content_new_dir(tmp_path):
    store = ArtifactStore(tmp_path)
    versions = []
    for text in ("x", "x", "y"):
        with store.write("thing") as st:
            (st.path / "f").write_text(text)
        versions.append(st.artifact.version)
    assert versions[0] == versions[1] != versions[2]
    assert store.latest("thing").version == versions[2]
    assert store.get("thing", None, versions[0]) is not None  # the earlier version is still there


def test_failure_leaves_previous_version_and_no_staging(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("thing") as st:
        (st.path / "f").write_text("good")
    good = st.artifact
    with pytest.raises(RuntimeError):
        with store.write("thing") as st2:
            (st2.path / "f").write_text("half")
            raise RuntimeError("crash mid-write")
    assert store.latest("thing") == good
    assert [p.name for p in store.slot("thing", None).iterdir() if p.is_dir()] == [good.version]


def test_insufficient_disk_space_is_refused_before_writing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(OSError, match="not enough free disk space"):
        with store.write("thing", min_free_bytes=1 << 60):
            pass
    assert store.latest("thing") is None


def test_list_latest_and_find_by_path(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("a") as st:
        (st.path / "sub").mkdir()
        (st.path / "sub" / "f").write_text("1")
    rows = store.list_latest()
    assert [(r["asset"], r["partition"], r["data_version"]) for r in rows] == [("a", None, st.artifact.version)]
    assert store.find_by_path(st.artifact.dir / "sub" / "f") == st.artifact


def test_derived_versions_name_what_made_the_artifact_not_its_bytes(tmp_path):
    store = ArtifactStore(tmp_path)
    made_by = {"inputs": {"sft_dataset": "d1"}, "code_version": "1", "recipe": "r1"}
    assert store.find_derived("adapter", "lora", made_by) is None
    arts = []
    for weights in ("run one", "run two: other bytes (GPU kernels)"):
        with store.write("adapter", "lora", derivation=made_by) as st:
            (st.path / "w").write_text(weights)
        arts.append(st.artifact)
    assert arts[0].version == arts[1].version  # the second write found the first in place, kept it
    assert (arts[0].dir / "w").read_text() == "run one"
    manifest = arts[0].manifest()
    assert manifest["version_basis"] == "derivation" and manifest["derivation"] == made_by
    assert manifest["content_hash"] != manifest["version"] and len(manifest["content_hash"]) == 16
    assert store.find_derived("adapter", "lora", made_by) == arts[0]
    assert store.find_derived("adapter", "lora", {**made_by, "recipe": "r2"}) is None

    with store.write("adapter", "lora", derivation={**made_by, "forced_by": "run-9"}) as st:
        (st.path / "w").write_text("forced retrain")
    forced = st.artifact
    assert forced.version != arts[0].version and store.latest("adapter", "lora") == forced
    assert store.find_derived("adapter", "lora", made_by) == forced  # the latest made from these inputs
