"""The instance `make install` creates limits the gpu pool to one step at a time."""

from __future__ import annotations

import dagster as dg

from ft_assets.demo import ensure_instance


def test_instance_limits_pools_to_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    instance = ensure_instance(tmp_path)
    assert (tmp_path / "dagster" / "dagster.yaml").is_file()
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    assert isinstance(instance, dg.DagsterInstance)
