"""The import rules of the layout (pyproject.toml's [tool.importlinter] contracts) hold, and they are
real: the same check on a copy of the package with one forbidden import planted fails on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ft_assets_tests.conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contracts, on the `ft_assets` package found in `root`."""
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


def test_the_package_keeps_its_import_rules():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    shutil.copytree(REPO / "ft_assets", tmp_path / "ft_assets", ignore=shutil.ignore_patterns("__pycache__", "bench"))
    models = tmp_path / "ft_assets" / "models" / "base_model.py"
    models.write_text(models.read_text() + "\nfrom ..artifacts.store import ArtifactStore  # planted\n")
    rows = tmp_path / "ft_assets" / "data" / "rows.py"
    rows.write_text(rows.read_text() + "\nfrom ..trainers import sft  # planted: an upward import\n")
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout[-3000:]
    assert "The artifact store is used by the Dagster layer and the command line only BROKEN" in done.stdout
    assert "ft_assets.models.base_model -> ft_assets.artifacts.store" in done.stdout
    assert "Rooms import downwards only BROKEN" in done.stdout
    assert "ft_assets.data.rows -> ft_assets.trainers.sft" in done.stdout
