"""`lineage` and `chat` over stores whose manifests name inputs a careless or hostile writer could
leave (issue 31): a manifest that refers to itself or to a cycle prints the repeated version once,
marked, instead of recursing until Python gives up; an input key whose partition ends in `]` (a
store written before sweep trial names were allow-listed: `adapter[lora@target_modules=['q_proj',
'v_proj']]`) is followed to that partition, by both commands, through `retention.parse_key`'s rule
(everything after the first `[`, less exactly one trailing `]`). Run as users run them: `python -m
ft_assets ...` in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ft_assets.artifacts.store import MANIFEST, ArtifactStore
from ft_assets_tests.conftest import REPO

OLD_TRIAL = "lora@target_modules=['q_proj', 'v_proj']"  # str() of a list value: the name sweeps gave before


def cli(*args, home, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "ft_assets", *args, "--home", str(home)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def put(store: ArtifactStore, asset: str, partition: str | None, inputs: dict, files: dict | None = None, **extra):
    with store.write(asset, partition, recipe_hash="r", code_version="c", seed=1) as st:
        for name, text in (files or {"data.txt": f"{asset} {partition}"}).items():
            (st.path / name).write_text(text)
        st.inputs, st.extra = inputs, extra
    return st.artifact


def edit_inputs(art, more: dict) -> None:
    """What a hand (or a hostile writer of the store) does to a finished manifest."""
    path = art.dir / MANIFEST
    m = json.loads(path.read_text())
    m["inputs"].update(more)
    path.write_text(json.dumps(m))


def test_lineage_of_a_manifest_that_refers_to_itself_or_a_cycle_marks_the_repeat_once(tmp_path):
    store = ArtifactStore(tmp_path / "home")
    sft = put(store, "sft_dataset", None, {"raw/qa": "0123456789abcdef"})
    adapter = put(store, "adapter", "lora", {"sft_dataset": sft.version})
    edit_inputs(adapter, {"adapter[lora]": adapter.version})  # itself
    edit_inputs(sft, {"adapter[lora]": adapter.version})  # and a cycle: adapter -> sft_dataset -> adapter

    done = cli("lineage", str(adapter.dir), home=store.home)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"adapter[lora]  {adapter.version}  recipe r")
    repeats = [line for line in lines if line.lstrip().startswith("adapter[lora]")][1:]
    assert repeats == [f"  adapter[lora]  {adapter.version}  (cycle: already shown above)",
                       f"    adapter[lora]  {adapter.version}  (cycle: already shown above)"], done.stdout
    assert "  raw/qa  sha256:0123456789abcdef  (raw data file)" in lines[-1], done.stdout

    done = cli("lineage", str(adapter.dir), "--json", home=store.home)
    assert done.returncode == 0, done.stderr[-3000:]
    tree = json.loads(done.stdout)
    me, sft_node = tree["inputs"]
    assert me == {"asset": "adapter", "partition": "lora", "version": adapter.version, "cycle": True}
    assert sft_node["inputs"][0] == me and sft_node["inputs"][1]["raw_file"]


def test_lineage_follows_an_input_whose_partition_ends_with_a_bracket(tmp_path):
    store = ArtifactStore(tmp_path / "home")
    adapter = put(store, "adapter", OLD_TRIAL, {})
    merged = put(store, "merged_model", OLD_TRIAL, {f"adapter[{OLD_TRIAL}]": adapter.version})
    done = cli("lineage", str(merged.dir), "--json", home=store.home)
    assert done.returncode == 0, done.stderr[-3000:]
    (child,) = json.loads(done.stdout)["inputs"]
    assert (child["partition"], child["version"], child.get("missing")) == (OLD_TRIAL, adapter.version, None)


@pytest.fixture(scope="module")
def old_trial_store(tmp_path_factory, tiny_model_dir):
    """base_model (the tiny Llama), a peft LoRA adapter of it in the partition an old sweep named
    with brackets, and a merged_model of that partition that holds no weights (as for a method that
    cannot merge): chat follows its recorded adapter input."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = ArtifactStore(tmp_path_factory.mktemp("old_trial") / "home")
    with store.write("base_model") as st:
        shutil.copytree(tiny_model_dir, st.path, dirs_exist_ok=True)
    base = st.artifact
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base.dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with store.write("adapter", OLD_TRIAL) as st:
        model.save_pretrained(st.path)
        st.inputs, st.extra = {"base_model": base.version}, {"method": {"type": "lora"}}
    adapter = st.artifact
    merged = put(store, "merged_model", OLD_TRIAL, {f"adapter[{OLD_TRIAL}]": adapter.version,
                                                   "base_model": base.version}, mergeable=False)
    return store, adapter, merged


def test_chat_loads_an_artifact_of_a_partition_that_ends_with_a_bracket(old_trial_store):
    store, adapter, merged = old_trial_store
    done = cli("chat", f"merged_model[{OLD_TRIAL}]", "--system", "Be brief.", "--prompt", "Hi",
               "--max-new-tokens", "2", home=store.home, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"loaded merged_model[{OLD_TRIAL}] {merged.version} (base + adapter[{OLD_TRIAL}])"
            in done.stderr), done.stderr[-3000:]
