"""The Dagster instance on a real PostgreSQL (Debian's package, which `make install` installs):
the test starts its own server (initdb in a temporary directory, pg_ctl on a free loopback port,
as the unprivileged `postgres` user when run as root, since the server refuses root), writes the
instance file `make install` writes with $FT_PG_URL set, materializes through it, reads runs,
asset events and the gpu pool back, and stops the server by its own process id."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from ft_assets.definitions import build_definitions
from ft_assets.demo import PG_URL_ENV, POSTGRES_STORAGE, ensure_instance, instance_yaml
from ft_assets.config.recipe import load_recipe

pytestmark = pytest.mark.slow  # a server start and four runs: about a minute


def postgres_bindir() -> Path | None:
    """Debian keeps the server's programs under /usr/lib/postgresql/<major>/bin, off PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def postgres():
    bindir = postgres_bindir()
    assert bindir is not None, "PostgreSQL's server is not installed: run `make install` (it installs Debian's postgresql)"
    root = Path(tempfile.mkdtemp(prefix="ft-pg-"))  # under /tmp: the postgres user cannot enter pytest's 0700 dirs
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    pid = None
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "ft", "--auth=trust", "-E", "UTF8", "--no-locale")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start")
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        yield f"postgresql+psycopg2://ft@127.0.0.1:{port}/postgres"
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGINT)  # the server's "fast" shutdown
            deadline = time.monotonic() + 60
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    assert pid is None or not alive(pid)


def test_the_instance_on_postgres_keeps_runs_events_and_the_gpu_pool(postgres, project, tmp_path, monkeypatch):
    home = tmp_path / "ft_home"
    monkeypatch.setenv("FT_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv(PG_URL_ENV, postgres)
    instance = ensure_instance(home)
    cfg = (home / "dagster" / "dagster.yaml").read_text()
    assert cfg == instance_yaml(postgres=True) and postgres not in cfg  # the URL stays in the environment
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1

    defs = build_definitions(load_recipe(project / "recipe.yaml"), home=str(home))
    result = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources,
                            selection=["base_model", "sft_dataset"])
    assert result.success

    # base_model is in the gpu pool: the run's executor created the pool's row, with the limit 1
    assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    second = dg.materialize(list(defs.assets), instance=instance, resources=defs.resources, selection=["base_model"])
    assert second.success  # a later run through the existing pool

    # another instance object (as the daemon or webserver would load) reads what the runs wrote
    again = dg.DagsterInstance.from_config(str(home / "dagster"))
    runs = again.get_runs()
    assert {r.run_id for r in runs} == {result.run_id, second.run_id}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert again.get_latest_materialization_event(dg.AssetKey("sft_dataset")).run_id == result.run_id
    assert again.get_latest_materialization_event(dg.AssetKey("base_model")).run_id == second.run_id

    # a team with two devices raises the pool per pool, with Dagster's CLI (README: on PostgreSQL a
    # changed `default_limit` fails every run in the pool with Dagster 1.13.27)
    subprocess.run([str(Path(sys.executable).parent / "dagster"), "instance", "concurrency", "set", "gpu", "2"],
                   check=True, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    storage = again.event_log_storage
    assert storage.get_concurrency_info("gpu").slot_count == 2
    assert dg.materialize(list(defs.assets), instance=instance, resources=defs.resources,
                          selection=["base_model"]).success
    assert storage.claim_concurrency_slot("gpu", "run-a", "adapter").is_claimed
    assert storage.claim_concurrency_slot("gpu", "run-b", "adapter").is_claimed
    assert not storage.claim_concurrency_slot("gpu", "run-c", "merged_model").is_claimed  # the limit holds

    monkeypatch.setenv(PG_URL_ENV, postgres.replace("+psycopg2", ""))
    with pytest.raises(ValueError, match=r"must start with postgresql\+psycopg2://"):
        ensure_instance(home)
    # once on PostgreSQL, an instance without $FT_PG_URL fails loudly instead of starting empty on SQLite
    monkeypatch.delenv(PG_URL_ENV)
    with pytest.raises(Exception, match=PG_URL_ENV):
        ensure_instance(home)
    assert POSTGRES_STORAGE in (home / "dagster" / "dagster.yaml").read_text()
