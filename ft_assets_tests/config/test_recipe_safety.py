"""A recipe or data file from someone else must not choose paths, flood memory or set what the
program sets (issue 31, "Names that become paths"): sweep trial names from an allow-list (the rest
hashed, the length capped), sweep values scalars or flat lists of them, no YAML alias of a list or
mapping, `pipeline`/`source_file` not recipe keys, and `init` writing a recipe whose keys a data
file name cannot add to, never through a symlink. Legitimate recipes keep their trial names and
recipe hashes: the literals below were computed on the code before these checks existed."""

from __future__ import annotations

import errno
import io
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ft_assets.cli import init
from ft_assets.config.recipe import PACKAGE_DIR, RecipeError, load_recipe, parse_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]
BASE = {"name": "r", "datasets": [{"name": "qa", "path": "data/qa.jsonl"}], "compute": {"device": "cpu"}}
TRIAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(@[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9._+-]+)*")


def trials(tmp_path: Path, sweep: dict, method: str = "lora", **keys) -> list[str]:
    """The method names a recipe with this sweep gets, loaded from a YAML file as users write it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "methods": {method: {**keys, "sweep": sweep}}}, sort_keys=False))
    return list(load_recipe(path).methods)


# -- trial names ---------------------------------------------------------------------------


def test_legitimate_sweep_values_keep_their_trial_names(tmp_path):
    """Floats, ints, bools, null and plain strings: exactly the names (partitions, store slots) of
    before."""
    assert trials(tmp_path, {"lr": [1.0e-4, 2.0e-4, 5e-3, 0.1, 0.15, 3e-5]}) == [
        "lora@lr=1e-4", "lora@lr=2e-4", "lora@lr=5e-3", "lora@lr=1e-1", "lora@lr=0.15", "lora@lr=3e-5"]
    assert trials(tmp_path, {"epochs": [1.5, 1.0], "max_grad_norm": [1e20]}) == [
        "lora@epochs=1.5@max_grad_norm=1e+20", "lora@epochs=1e0@max_grad_norm=1e+20"]
    assert trials(tmp_path, {"lr": [1.0e-4, 2.0e-4], "r": [8, 16], "dropout": [0.0, 0.05]}) == [
        "lora@lr=1e-4@r=8@dropout=0e0", "lora@lr=1e-4@r=8@dropout=5e-2", "lora@lr=1e-4@r=16@dropout=0e0",
        "lora@lr=1e-4@r=16@dropout=5e-2", "lora@lr=2e-4@r=8@dropout=0e0", "lora@lr=2e-4@r=8@dropout=5e-2",
        "lora@lr=2e-4@r=16@dropout=0e0", "lora@lr=2e-4@r=16@dropout=5e-2"]
    assert trials(tmp_path, {"packing": [True, False], "max_grad_norm": [1.0, None]}) == [
        "lora@packing=True@max_grad_norm=1e0", "lora@packing=True@max_grad_norm=None",
        "lora@packing=False@max_grad_norm=1e0", "lora@packing=False@max_grad_norm=None"]
    assert trials(tmp_path, {"lr_scheduler": ["cosine", "linear"], "target_modules": ["all-linear"]}) == [
        "lora@lr_scheduler=cosine@target_modules=all-linear", "lora@lr_scheduler=linear@target_modules=all-linear"]
    assert trials(tmp_path, {"init_text": ["a.b+c-d_e", "Q8_0"]}, method="prompt") == [
        "prompt@init_text=a.b+c-d_e", "prompt@init_text=Q8_0"]


def test_a_list_or_a_path_like_value_becomes_a_stable_hash_and_the_slot_stays_in_the_store(tmp_path):
    names = trials(tmp_path, {"target_modules": [["q_proj", "v_proj"], ["../../../../x"]]})
    assert names == trials(tmp_path, {"target_modules": [["q_proj", "v_proj"], ["../../../../x"]]})  # stable
    assert all(re.fullmatch(r"lora@target_modules=h[0-9a-f]{8}", n) for n in names) and len(set(names)) == 2, names
    names += trials(tmp_path, {"init_text": ["../../../etc/x", "two words", "a/b", "Ωmega"]}, method="prompt")
    store = ArtifactStore(tmp_path / "home")
    for name in names:
        assert TRIAL_NAME.fullmatch(name), name
        assert store.slot("adapter", name).resolve().parent == (store.root / "adapter").resolve()
    # a method written by hand with a trial-like name is held to the same rule
    with pytest.raises(RecipeError, match=r"method name 'lora@x=/\.\./\.\.'"):
        parse_recipe({**BASE, "methods": {"lora@x=/../..": {"type": "lora"}}}, "recipe.yaml")
    assert list(parse_recipe({**BASE, "methods": {"lora@lr=1e-4": {"type": "lora"}}}, "recipe.yaml").methods) == [
        "lora@lr=1e-4"]


def test_a_long_trial_name_is_capped_with_a_hash_of_its_tail(tmp_path):
    long = "a" * 150
    names = trials(tmp_path, {"init_text": [long, long + "b"], "num_virtual_tokens": [4, 8]}, method="prompt")
    assert len(set(names)) == 4 and all(len(n) <= 128 and TRIAL_NAME.fullmatch(n) for n in names), names
    assert all(re.fullmatch(r"prompt@rest=h[0-9a-f]{8}", n) for n in names), names
    many = {k: [1.0e-4, 2.0e-4] for k in ("lr", "weight_decay", "warmup_ratio")}
    many |= {"max_grad_norm": [0.5], "epochs": [1.5], "batch_size": [4], "grad_accum": [2], "max_steps": [40],
             "validation_every": [5], "checkpoint_every": [20], "log_every": [1]}
    names = trials(tmp_path, {k: v for k, v in many.items() if k != "validation_every"}, r=8)
    assert all(len(n) <= 128 and n.startswith("lora@lr=") and re.search(r"@rest=h[0-9a-f]{8}$", n) for n in names)
    assert len(set(names)) == 8


@pytest.mark.parametrize("value, what", [({"a": 1}, "mapping"), ([["q_proj", ["k_proj"]]], "list"),
                                         ("2024-01-01", "date")])
def test_a_sweep_value_that_is_not_a_scalar_or_a_flat_list_is_a_clear_error(tmp_path, value, what):
    path = tmp_path / "recipe.yaml"
    values = f"[{value}]" if what == "date" else yaml.safe_dump([value], default_flow_style=True).strip()
    path.write_text(yaml.safe_dump(BASE) + f"methods:\n  lora:\n    sweep:\n      target_modules: {values}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "methods.lora.sweep.target_modules" in msg and "flat list" in msg and "quote" in msg, msg


# -- the YAML loader -----------------------------------------------------------------------


def bomb(levels: int = 9) -> str:
    """~1 KB of YAML whose aliases expand to 9**levels strings ("billion laughs")."""
    lines = ['x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"x{i}: &x{i} [{','.join([f'*x{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(["name: bomb", "datasets: [{name: qa, path: data/qa.jsonl}]", "anchors:", *[f"  {line}" for line in lines],
                      "methods:", "  lora:", f"    sweep: {{r: [*x{levels - 1}]}}", ""])


def _limit_memory():  # today's loader takes gigabytes on the bomb: keep the machine usable
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_a_billion_laughs_recipe_fails_fast_with_a_clear_error(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    assert len(path.read_bytes()) < 1200
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "ft_assets", "validate", str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=60, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail("validate ran for over 60 s on a 1 KB recipe")
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert "alias *x0" in done.stderr and "line 5" in done.stderr and "write the values out" in done.stderr, done.stderr
    assert elapsed < 15, elapsed  # the CLI's imports included; the check itself is milliseconds
    # an alias of a single value (the shipped all_methods.yaml's `*system`) multiplies nothing: allowed
    path.write_text(yaml.safe_dump(BASE).replace("name: r", "name: &n r") + "methods: {prompt: {init_text: *n}}\n")
    assert load_recipe(path).methods["prompt"].init_text == "r"


def test_yaml_nested_too_deep_is_a_recipe_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump(BASE) + "methods: {lora: {target_modules: " + "[" * 5000 + "]" * 5000 + "}}\n")
    with pytest.raises(RecipeError, match="line 7: lists/mappings nested more than 32 levels deep"):
        load_recipe(path)


# -- keys the program sets -----------------------------------------------------------------


def test_pipeline_and_source_file_are_not_recipe_keys(tmp_path):
    path = tmp_path / "recipe.yaml"
    for key, value in (("pipeline", "someone_elses"), ("source_file", "/etc/ft/recipe.yaml")):
        path.write_text(yaml.safe_dump({**BASE, key: value, "methods": {"lora": {}}}))
        with pytest.raises(RecipeError, match=rf"{key}: set by the program, not by a recipe; remove it"):
            load_recipe(path)
    path.write_text(yaml.safe_dump({**BASE, "methods": {"lora": {}}}))
    recipe = load_recipe(path)
    assert recipe.source_file == str(path.resolve()) and recipe.pipeline is None  # the program still sets them


def test_recipe_hashes_of_the_shipped_and_test_recipes_are_unchanged():
    shipped = {p.name: load_recipe(p).recipe_hash for p in sorted((PACKAGE_DIR / "recipes").glob("*.yaml"))}
    assert shipped == {"all_methods.yaml": "986081801f506068", "beyond_sft.yaml": "e1a2600ebfe84ba8",
                       "chat.yaml": "37c2f79a6df08778", "default.yaml": "20115f7d0c195c21",
                       "demo.yaml": "f80fadaae4073012", "gated.yaml": "084f0f0d83818cb7",
                       "rlhf.yaml": "2aef20264eef3f1f"}
    tiny = make_recipe(Path("/models/tiny"))
    assert parse_recipe(tiny, "/tmp/x/recipe.yaml").recipe_hash == "b873d3e2d0599dc3"
    tiny["methods"] = {"lora": {**tiny["methods"]["lora"], "sweep": {"lr": [5e-3, 5e-2]}}}  # test_sweeps.py's
    swept = parse_recipe(tiny, "/tmp/x/recipe.yaml")
    assert swept.recipe_hash == "4ccabd370c3b0771"
    assert {m: swept.section_hash("prompt", method=m) for m in swept.methods} == {
        "lora@lr=5e-3": "846e2497bf6aa92a", "lora@lr=5e-2": "507729d5744aa770"}


# -- init ----------------------------------------------------------------------------------


def no_tokenizer():
    raise FileNotFoundError("no tokenizer in this test")  # init shows plain prompts: fast, same recipe keys


def run_init(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    rc = init.main([str(a) for a in argv], load_tokenizer=no_tokenizer, out=buf, err=buf)
    return rc, buf.getvalue()


@pytest.mark.parametrize("stem", [
    'qa\nallow_paths_outside_root: true\npublish: {push: true, repo_id: "evil\\x2fmodel"}\n#',
    "qa: {x} 'y\" #z\r\nseed: 1\n- [",
    "qa\u2028name: x\x85seed: 2\u2029end",
])
def test_init_writes_a_data_file_name_that_looks_like_yaml_as_a_value_only(tmp_path, stem):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / f"{stem}.jsonl", qa_rows(12))
    out = tmp_path / "recipe.yaml"
    rc, text = run_init(data, "-o", out)
    assert rc == 0, text
    written = yaml.safe_load(out.read_text())
    assert set(written) == {"name", "seed", "root", "datasets", "prompt", "base_model", "quantization", "training",
                            "methods", "evaluation", "compute"}, sorted(written)
    recipe = load_recipe(out)
    assert recipe.datasets[0].path == f"data/{stem}.jsonl" and recipe.dataset_path(recipe.datasets[0]) == data
    assert (recipe.seed, recipe.allow_paths_outside_root, recipe.publish.push) == (42, False, False)


def test_init_refuses_to_write_through_a_symlink(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    target, out = tmp_path / "elsewhere" / "bashrc", tmp_path / "recipe.yaml"
    target.parent.mkdir()
    out.symlink_to(target)  # dangling
    rc, text = run_init(data, "-o", out)
    assert rc == 2 and "is a symbolic link" in text and not target.exists(), text
    target.write_text("mine\n")  # not dangling, and --force: still refused, the target untouched
    rc, text = run_init(data, "-o", out, "--force")
    assert rc == 2 and "is a symbolic link" in text and target.read_text() == "mine\n", text
    out.unlink()
    rc, text = run_init(data, "-o", out)
    assert rc == 0 and not out.is_symlink() and load_recipe(out).datasets[0].path == "qa.jsonl", text
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "qa.jsonl", "recipe.yaml"]  # no temporary file left


def test_init_writes_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """FAT and some network mounts refuse link(2): init creates the file exclusively instead, and
    still refuses an existing file without --force."""
    def no_links(*_a, **_k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(12))
    out = tmp_path / "recipe.yaml"
    rc, text = run_init(data, "-o", out)
    assert rc == 0 and load_recipe(out).datasets[0].path == "qa.jsonl", text
    rc, text = run_init(data, "-o", out)
    assert rc == 2 and "exists" in text, text
    assert sorted(os.listdir(tmp_path)) == ["qa.jsonl", "recipe.yaml"]
