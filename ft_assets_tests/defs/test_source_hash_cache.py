"""The source observation sensor (`ft_assets_observe_sources`) does not re-read unchanged data
files: a file's content hash is reused while its size, mtime, ctime, inode and device stay the
same, and read again when any of them moves (a rewrite with the same size and its old mtime
put back changes the ctime). The versions are the ones the sensor always gave (literal values
computed before the cache existed). Bytes read are the kernel's count for this process
(/proc/self/io rchar), so the test does not depend on how the hash is computed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from ft_assets.definitions import build_definitions
from ft_assets.defs.raw import file_version
from ft_assets.config.recipe import load_recipe

ROW = json.dumps({"question": "What was total revenue?", "context": "x" * 200, "answer": "$1 million"}) + "\n"
ROWS, OTHER_ROWS = ROW * 12000, ROW.replace("$1 million", "$2 million") * 12000  # 3.3 MB each, same size
VERSION, OTHER_VERSION = "00a7c57696b687d1", "e84344eea1bb9512"  # sha256[:16] of each, before the cache
DIR_VERSION = "85eef870c2cd57ae"  # the directory of `dataset_dir`, before the cache
SETTLED_S = 2.5  # a file changed within the last 2 s of a hash is read again next time (a write in the same tick)


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def observe(sensor, instance, cursor=None) -> tuple[dg.SensorResult, int]:
    """One sensor tick and the bytes this process read during it."""
    before = bytes_read()
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))
    return result, bytes_read() - before


@pytest.fixture
def sensor_and_file(project, ft_home):
    data_file = project / "data" / "qa.jsonl"
    data_file.write_text(ROWS)
    sensor = build_definitions(load_recipe(project / "recipe.yaml"), home=str(ft_home)).resolve_sensor_def(
        "ft_assets_observe_sources")
    time.sleep(SETTLED_S)
    return sensor, data_file


def test_an_unchanged_data_file_is_not_read_again_and_a_changed_one_is(sensor_and_file):
    sensor, data_file = sensor_and_file
    size = data_file.stat().st_size
    with dg.instance_for_test() as instance:
        first, read = observe(sensor, instance)
        assert json.loads(first.cursor)["raw/qa"] == VERSION and read >= size
        again, read = observe(sensor, instance, first.cursor)
        assert again.asset_events == [] and read < size / 10, read  # the hash of the same file, not its bytes

        old = data_file.stat()
        data_file.write_text(OTHER_ROWS)  # same size; the old mtime put back, as `rsync -t` or `cp -p` do
        os.utime(data_file, ns=(old.st_atime_ns, old.st_mtime_ns))
        changed, read = observe(sensor, instance, first.cursor)
        assert read >= size
        assert [(e.asset_key.to_user_string(), e.tags["dagster/data_version"]) for e in changed.asset_events] == [
            ("raw/qa", OTHER_VERSION)]

        time.sleep(SETTLED_S)
        os.utime(data_file)  # touched: read again, same version, nothing recorded
        touched, read = observe(sensor, instance, changed.cursor)
        assert read >= size and touched.asset_events == [] and json.loads(touched.cursor)["raw/qa"] == OTHER_VERSION


def test_a_dataset_directory_keeps_its_version_and_is_read_once(tmp_path):
    directory = tmp_path / "dataset_dir"
    (directory / "sub").mkdir(parents=True)
    (directory / "a.jsonl").write_text(ROW * 10)
    (directory / "sub" / "b.jsonl").write_text(ROW.replace("$1 million", "$2 million") * 3)
    (directory / "big.jsonl").write_text(ROWS)
    time.sleep(SETTLED_S)
    expected = file_version(directory)
    before = bytes_read()
    assert file_version(directory) == expected
    assert bytes_read() - before < len(ROWS) / 10
    (directory / "big.jsonl").unlink()
    assert file_version(directory) == DIR_VERSION  # the small files' version, as before the cache
