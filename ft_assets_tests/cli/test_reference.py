"""docs/recipe_reference.md is generated from the schema (`python -m ft_assets reference`): it must
be what the generator writes now, name every key and method type, and describe every key."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest

from ft_assets.config import recipe as R
from ft_assets.config.method_spec import SPECS
from ft_assets.config.method_spec import MethodSpecBase
from ft_assets.cli.reference import REFERENCE_FILE, SECTIONS, MissingDescription, render, rows
from ft_assets_tests.conftest import REPO


def test_committed_reference_is_up_to_date():
    assert REFERENCE_FILE == REPO / "docs" / "recipe_reference.md"
    assert REFERENCE_FILE.read_text(encoding="utf-8") == render(), (
        "docs/recipe_reference.md is stale: run `python -m ft_assets reference` and commit the result")


def test_reference_lists_every_section_key_and_method_type():
    text = render()
    for cls in [R.Recipe, *(c for _, c in SECTIONS), MethodSpecBase, *SPECS.values()]:
        for key, field in cls.model_fields.items():
            if not field.exclude and key != "type":
                assert f"| `{key}` |" in text, f"{cls.__name__}.{key} missing"
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    for method_type in SPECS:
        assert any(f"`{method_type}`" in h for h in headings), method_type
    assert f"| `max_steps` | integer | `{R.TrainingSpec().max_steps}` | >= 1 |" in text  # a default, from the schema


class _Undocumented(MethodSpecBase):
    type: Literal["undocumented"]
    width: int = 2


def test_a_key_without_description_is_an_error():
    with pytest.raises(MissingDescription, match="_Undocumented.width"):
        rows(_Undocumented, skip=("type",))


def test_reference_command_writes_the_file_without_torch_or_dagster(tmp_path):
    out = tmp_path / "ref.md"
    heavy = ("torch", "peft", "transformers", "trl", "bitsandbytes", "dagster")
    code = ("import sys; from ft_assets.cli.main import main; "
            f"rc = main(['reference', '-o', {str(out)!r}]); "
            f"print(rc, [m for m in {heavy!r} if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 []"
    assert out.read_text(encoding="utf-8") == render()
