"""The instance `make install` creates: the gpu pool limited to one step at a time, run monitoring
and run retries for the daemon, no community pop-up; brought up to date when ft_assets wrote it."""

from __future__ import annotations

import dagster as dg

from ft_assets.demo import INSTANCE_YAML, ensure_instance


def test_instance_limits_pools_to_one_and_enables_monitoring_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    instance = ensure_instance(tmp_path)
    assert (tmp_path / "dagster" / "dagster.yaml").is_file()
    assert isinstance(instance, dg.DagsterInstance)
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    assert instance.run_monitoring_enabled and instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 5
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_retries_retry_on_asset_or_op_failure is False  # bad data / NaN / OOM: never retried
    assert instance.nux_enabled is False  # no "Join the Dagster community" pop-up


def test_an_older_ft_assets_instance_file_is_updated_and_a_users_own_is_left_alone(tmp_path, monkeypatch):
    cfg = tmp_path / "dagster" / "dagster.yaml"
    cfg.parent.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(cfg.parent))
    cfg.write_text("# Written by ft_assets (make install / first use). An older version.\n"
                   "concurrency:\n  pools:\n    default_limit: 1\n")
    ensure_instance(tmp_path)
    assert cfg.read_text() == INSTANCE_YAML
    mine = "concurrency:\n  pools:\n    default_limit: 2\n"
    cfg.write_text(mine)
    ensure_instance(tmp_path)
    assert cfg.read_text() == mine
