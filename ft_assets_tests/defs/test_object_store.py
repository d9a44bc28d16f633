"""Artifacts on object storage: FT_HOME=s3://bucket/prefix against a real S3 API server (moto's,
started by these tests on 127.0.0.1 as a process of its own and stopped by its PID), through s3fs.
The graph materializes and its lineage reads back; another machine (another local cache) gets the
same bytes; a killed upload leaves nothing that looks finished; a training run killed on one node
resumes on another from the checkpoint on the store and ends with the uninterrupted run's adapter
(in process, and under torchrun)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_assets.artifacts import retention
from ft_assets.cli.main import main as cli
from ft_assets.definitions import build_definitions
from ft_assets.demo import ensure_instance, materialize_graph
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import MANIFEST, ArtifactStore, content_hash

BUCKET = "ft-team"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port, in its own process; the bucket made; stopped by PID."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:  # bounded: the server answers within a minute or the test fails
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        import s3fs

        # fsspec reuses filesystem instances (bound to the endpoint they were made with): the next
        # module's server listens on another port
        s3fs.S3FileSystem.clear_instance_cache()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


@pytest.fixture
def s3_home(s3_endpoint, tmp_path, monkeypatch) -> str:
    """FT_HOME on the test's S3 server (a fresh prefix per test), FT_LOCAL_HOME in tmp_path."""
    import s3fs

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    url = f"s3://{BUCKET}/{tmp_path.name}"
    monkeypatch.setenv("FT_HOME", url)
    monkeypatch.setenv("FT_LOCAL_HOME", str(tmp_path / "node_a"))
    return url


def s3(home: str):
    return ArtifactStore(home).remote


def test_the_graph_materializes_on_s3_and_its_lineage_reads_back(project, s3_home, tmp_path, monkeypatch, capsys):
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": recipe["methods"]["lora"]}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    defs = build_definitions(load_recipe(project / "recipe.yaml"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # as `make demo` with FT_HOME=s3://...: derived locally
    instance = ensure_instance()  # the persistent instance, its gpu pool limited to 1
    assert instance.root_directory == str(tmp_path / "node_a" / "dagster")
    targets = {(dg.AssetKey(k), p) for k, p in (("base_model", None), ("sft_dataset", None), ("adapter", "lora"),
                                                ("merged_model", "lora"))}
    assert materialize_graph(defs, instance, targets) == []

    remote = s3(s3_home)
    store = ArtifactStore()
    merged = store.latest("merged_model", "lora")
    for asset, part in (("base_model", None), ("sft_dataset", None), ("adapter", "lora"), ("merged_model", "lora")):
        version = store.latest_version(asset, part)
        assert remote.exists(f"{store.rel(asset, part, version)}/{MANIFEST}"), asset  # committed on S3
    assert not remote.glob("checkpoints/adapter/lora/*/*")  # finished: its checkpoints left the store too

    # the CLI reads the store on S3: URLs, and the lineage of a URL, without downloading anything
    assert cli(["artifacts"]) == 0
    listed = capsys.readouterr().out
    url = remote.url_of(store.rel("merged_model", "lora", merged.version))
    assert url in listed
    assert cli(["lineage", url]) == 0
    tree = capsys.readouterr().out
    assert f"merged_model[lora]  {merged.version}" in tree and "adapter[lora]" in tree and "raw data file" in tree

    # another machine: an empty local cache gets the same bytes, once
    monkeypatch.setenv("FT_LOCAL_HOME", str(tmp_path / "node_b"))
    other = ArtifactStore()
    assert other.root != store.root
    got = other.latest("merged_model", "lora")
    assert got.version == merged.version and Path(got.path).is_relative_to(tmp_path / "node_b")
    assert content_hash(got.dir) == got.manifest()["content_hash"] == merged.manifest()["content_hash"]
    before = {p: p.stat().st_mtime_ns for p in got.dir.rglob("*")}
    again = ArtifactStore().get("merged_model", "lora", merged.version)
    assert {p: p.stat().st_mtime_ns for p in again.dir.rglob("*")} == before  # never downloaded twice

    # retention on the store: a newer merged version, then prune drops the old one on S3
    with store.write("merged_model", "lora") as st:
        (st.path / "note.txt").write_text("a newer version")
    p = retention.plan(store, keep=1)
    assert [v.version for v in p.drop] == [merged.version]
    retention.apply(store, p)
    assert not remote.exists(f"{store.rel('merged_model', 'lora', merged.version)}/{MANIFEST}")
    assert ArtifactStore().get("merged_model", "lora", merged.version) is None  # the cached copy is not served
    assert store.latest("adapter", "lora") is not None  # what the kept versions name stays


SLOW_UPLOAD = textwrap.dedent("""
    import os, sys
    from ft_assets.artifacts.store import ArtifactStore
    with ArtifactStore(sys.argv[1]).write("merged_model", "lora") as st:
        for i in range(300):
            (st.path / f"shard-{i:04d}.bin").write_bytes(os.urandom(64 << 10))
""")


def test_a_killed_upload_leaves_nothing_that_looks_done(s3_home):
    remote = s3(s3_home)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_UPLOAD, s3_home], start_new_session=True)
    try:
        deadline = time.time() + 120
        while not remote.glob("artifacts/merged_model/lora/*/.uploads/*/shard-*"):  # the upload has begun
            assert proc.poll() is None and time.time() < deadline, "the writer ended before uploading"
            time.sleep(0.05)
        assert not remote.glob(f"artifacts/merged_model/lora/*/{MANIFEST}")  # still uploading
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    uploaded = remote.glob("artifacts/merged_model/lora/*/.uploads/*/shard-*")
    assert 0 < len(uploaded) < 300, len(uploaded)  # killed mid-upload
    assert not remote.glob(f"artifacts/merged_model/lora/*/{MANIFEST}")
    store = ArtifactStore()
    version = uploaded[0].split("/")[3]
    assert store.latest("merged_model", "lora") is None and store.get("merged_model", "lora", version) is None
    assert store.list_latest() == [] and retention.versions(store) == {}
    with store.write("merged_model", "lora") as st:  # the next writer is not blocked by the debris
        (st.path / "ok.txt").write_text("done")
    assert store.latest("merged_model", "lora").version == st.artifact.version


NODE = textwrap.dedent("""
    import sys, dagster as dg
    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    defs = build_definitions(load_recipe(sys.argv[1]))
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance,
                   selection=["base_model", "sft_dataset"])
    dg.materialize(list(defs.assets), resources=defs.resources, instance=instance, partition_key="lora",
                   selection=["adapter"])
""")


def _train_on(recipe: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", NODE, str(recipe)], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["inprocess", "torchrun"])
def test_a_run_killed_on_one_node_resumes_on_another_from_the_store(project, s3_home, tmp_path, launcher):
    """torchrun: 2 ranks train, the step's process mirrors their checkpoints to the store."""
    recipe = yaml.safe_load((project / "recipe.yaml").read_text())
    if launcher == "torchrun":
        recipe["compute"] = {**recipe.get("compute", {}), "launcher": "torchrun", "nproc_per_node": 2}
    recipe["quantization"] = {"method": "none"}
    recipe["methods"] = {"lora": recipe["methods"]["lora"]}
    recipe["training"].update({"epochs": 100, "max_steps": 60, "checkpoint_every": 5})
    path = project / "long.yaml"
    path.write_text(yaml.safe_dump(recipe))
    remote = s3(s3_home)

    ref = _train_on(path, {"FT_HOME": str(tmp_path / "reference")})  # uninterrupted, on a local disk
    victim = _train_on(path, {"FT_LOCAL_HOME": str(tmp_path / "node_a")})

    def stored_step() -> int:
        done = remote.glob(f"checkpoints/adapter/lora/*/step-*/progress.json")
        return max((int(r.split("/")[-2].removeprefix("step-")) for r in done), default=0)

    deadline = time.time() + 300
    while stored_step() < 10:
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)  # node A dies
    victim.wait()
    killed_at = stored_step()
    assert 10 <= killed_at < 60 and ArtifactStore().latest("adapter", "lora") is None

    node_b = _train_on(path, {"FT_LOCAL_HOME": str(tmp_path / "node_b")})  # nothing local: only the store
    out = node_b.communicate(timeout=600)[0]
    assert node_b.returncode == 0, out
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    got = ArtifactStore().latest("adapter", "lora")
    want = ArtifactStore(tmp_path / "reference").latest("adapter", "lora")
    assert got.manifest()["train"]["resumed_from_step"] >= killed_at
    assert got.version == want.version
    got_w, want_w = (load_file(str(a.dir / "adapter_model.safetensors")) for a in (got, want))
    assert got_w.keys() == want_w.keys()
    for name in want_w:  # fp32 CPU: the resumed run computes what the uninterrupted one did
        torch.testing.assert_close(got_w[name], want_w[name], atol=1e-6, rtol=0, msg=name)
    curve = json.loads((got.dir / "train_log.json").read_text())["losses"]
    assert [s for s, _ in curve] == list(range(1, 61))
    assert not remote.glob("checkpoints/adapter/lora/*/*")
