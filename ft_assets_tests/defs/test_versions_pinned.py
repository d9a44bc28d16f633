"""Users' versions are sacred: for every shipped recipe, the recipe hash, each method's section
hash and every asset's key, code version, partitions and upstream keys are exactly those recorded
in pinned_versions.json. A trained artifact's version is the hash of its input versions, code
version and recipe section (artifacts/store.py), so a refactor that keeps these keeps every
artifact version of existing recipes. A change that means to re-version something updates the
file on purpose: FT_PIN_VERSIONS=1 pytest this file rewrites it, and the diff shows what moved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ft_assets.definitions import build_definitions
from ft_assets.config.recipe import PACKAGE_DIR, load_recipe

PINNED = Path(__file__).with_name("pinned_versions.json")
RECIPES = sorted((PACKAGE_DIR / "recipes").glob("*.yaml"))


def versions(recipe_path: Path, home: Path) -> dict:
    recipe = load_recipe(recipe_path)
    defs = build_definitions(recipe, home=str(home))
    assets = {}
    for ad in defs.assets:
        for spec in getattr(ad, "specs", ()):  # source assets (raw data) have no code version
            parts = spec.partitions_def.get_partition_keys() if spec.partitions_def else None
            assets[spec.key.to_user_string()] = {
                "code_version": spec.code_version, "partitions": parts,
                "deps": sorted(d.asset_key.to_user_string() for d in spec.deps)}
    return {"recipe_hash": recipe.recipe_hash,
            "method_sections": {m: recipe.section_hash("training", method=m) for m in recipe.methods},
            "assets": assets}


@pytest.fixture(scope="module")
def current(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    return {p.name: versions(p, home) for p in RECIPES}


def test_shipped_recipes_keep_their_versions(current):
    if os.environ.get("FT_PIN_VERSIONS") == "1":
        PINNED.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(PINNED.read_text())
    assert sorted(pinned) == sorted(current), "a shipped recipe was added or removed: pin it on purpose"
    for name in pinned:
        assert current[name]["recipe_hash"] == pinned[name]["recipe_hash"], name
        assert current[name]["method_sections"] == pinned[name]["method_sections"], name
        for key, want in pinned[name]["assets"].items():
            assert current[name]["assets"].get(key) == want, f"{name}: {key}"
        assert sorted(current[name]["assets"]) == sorted(pinned[name]["assets"]), name
