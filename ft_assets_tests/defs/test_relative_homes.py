"""Relative FT_HOME / DAGSTER_HOME, as a user types them (`FT_HOME=.ft_home_beyond make demo`):
resolved against the current directory, by the Makefile and by the Python side, so Dagster gets
the absolute DAGSTER_HOME it requires."""

from __future__ import annotations

import os
import subprocess

import dagster as dg

from ft_assets.demo import ensure_instance
from ft_assets.artifacts.store import ArtifactStore
from ft_assets.config.paths import ft_home
from ft_assets_tests.conftest import REPO


def test_relative_ft_home_resolves_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FT_HOME", ".ft_home_beyond")
    assert ft_home() == tmp_path.resolve() / ".ft_home_beyond"
    assert ArtifactStore().root == tmp_path.resolve() / ".ft_home_beyond" / "artifacts"


def test_relative_dagster_home_gives_a_working_instance_under_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FT_HOME", ".ft_home_beyond")
    monkeypatch.setenv("DAGSTER_HOME", ".ft_home_beyond/dagster")  # what the Makefile used to export
    instance = ensure_instance()
    home = tmp_path.resolve() / ".ft_home_beyond" / "dagster"
    assert os.environ["DAGSTER_HOME"] == str(home)  # child processes (runs, dagster dev) get it absolute too
    assert (home / "dagster.yaml").is_file()
    assert isinstance(instance, dg.DagsterInstance) and instance.root_directory == str(home)


def test_unset_dagster_home_is_derived_from_a_relative_ft_home_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FT_HOME", "rel_home")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    instance = ensure_instance()
    assert os.environ["DAGSTER_HOME"] == str(tmp_path.resolve() / "rel_home" / "dagster")
    assert instance.root_directory == os.environ["DAGSTER_HOME"]


def _make_env(tmp_path, **env: str) -> dict[str, str]:
    """`make env` in the repo with `env` set as the user would in the shell; its KEY=value lines."""
    base = {k: v for k, v in os.environ.items() if k not in ("FT_HOME", "DAGSTER_HOME", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "-s", "env"], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_makefile_exports_absolute_homes_for_a_relative_ft_home(tmp_path):
    got = _make_env(tmp_path, FT_HOME=".ft_home_beyond")
    assert got["FT_HOME"] == str(REPO / ".ft_home_beyond")
    assert got["DAGSTER_HOME"] == str(REPO / ".ft_home_beyond" / "dagster")


def test_makefile_makes_a_relative_dagster_home_absolute_and_keeps_absolute_ones(tmp_path):
    got = _make_env(tmp_path, FT_HOME=str(tmp_path / "h"), DAGSTER_HOME="inst")
    assert got["FT_HOME"] == str(tmp_path / "h")
    assert got["DAGSTER_HOME"] == str(REPO / "inst")
    for unset in ({}, {"FT_HOME": "", "DAGSTER_HOME": ""}):  # unset or empty: the defaults
        got = _make_env(tmp_path, **unset)
        assert got["FT_HOME"] == str(REPO / ".ft_home") and got["DAGSTER_HOME"] == str(REPO / ".ft_home" / "dagster")


def test_makefile_keeps_a_url_ft_home_and_puts_local_state_in_ft_local_home(tmp_path):
    got = _make_env(tmp_path, FT_HOME="s3://bucket/team")
    assert got["FT_HOME"] == "s3://bucket/team"  # not made into a path
    assert got["FT_LOCAL_HOME"] == str(REPO / ".ft_home")
    assert got["DAGSTER_HOME"] == str(REPO / ".ft_home" / "dagster")
    got = _make_env(tmp_path, FT_HOME="s3://bucket/team", FT_LOCAL_HOME="scratch")
    assert got["DAGSTER_HOME"] == str(REPO / "scratch" / "dagster")


def test_a_url_ft_home_keeps_the_instance_and_the_cache_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FT_HOME", "s3://bucket/team/")
    monkeypatch.setenv("FT_LOCAL_HOME", "local")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert ft_home() == tmp_path.resolve() / "local"
    store = ArtifactStore()
    assert store.location == "s3://bucket/team" and store.artifacts_location == "s3://bucket/team/artifacts"
    assert store.root.is_relative_to(tmp_path.resolve() / "local" / "remote")
    instance = ensure_instance()
    assert instance.root_directory == str(tmp_path.resolve() / "local" / "dagster")
    monkeypatch.setenv("FT_HOME", f"file://{tmp_path}/files")  # a file:// URL is a local directory
    assert ArtifactStore().remote is None and ArtifactStore().root == tmp_path.resolve() / "files" / "artifacts"
