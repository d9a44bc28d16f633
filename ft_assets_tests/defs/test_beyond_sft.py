"""Beyond SFT through Dagster on the tiny model: preference_dataset + preference_adapter[dpo] (the
other objectives share its asset; each is tested in trainers/), reward_model[rm] on the same pairs,
the student,
a two-task mixture with per-task metrics, continue_from with replay and forgetting, and what
the automation re-runs when the preference pairs change."""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from ft_assets.trainers import distill
from ft_assets.definitions import build_definitions
from ft_assets.defs import _common
from ft_assets.defs.automation import record_sources
from ft_assets.demo import materialize_all, materialize_graph
from ft_assets.config.recipe import load_recipe
from ft_assets.artifacts.store import ArtifactStore
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl

PARTITIONED = ("adapter", "preference_adapter", "merged_model", "eval_report", "preference_dataset", "reward_model",
               "policy_adapter", "generated_preferences")


def head_rows(n: int = 20) -> list[dict]:
    words = ["beats estimates", "cuts guidance", "schedules results call"]
    labels = ["positive", "negative", "neutral"]
    return [{"id": f"h{i:03d}", "instruction": "Classify the sentiment of this headline.",
             "headline": f"Company {i} {words[i % 3]}", "label": labels[i % 3]} for i in range(n)]


def pref_rows(n: int = 16) -> list[dict]:
    return [{"id": r["id"], "prompt": f"Context:\n{r['context']}\n\nQuestion: {r['question']}",
             "chosen": r["answer"], "rejected": r["answer"].replace("million", "billion")} for r in qa_rows(n)]


def beyond_recipe(model_dir) -> dict:
    return make_recipe(
        model_dir,
        datasets=[
            {"name": "qa", "path": "data/qa.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25, "weight": 0.6},
            {"name": "heads", "path": "data/heads.jsonl", "eval_fraction": 0.25, "weight": 0.4,
             "columns": {"question": "instruction", "context": "headline", "answer": "label", "id": "id"}},
        ],
        quantization={"method": "none"},
        methods={
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "continue_from": "previous", "replay_fraction": 0.5},
            "dpo": {"sft_from": "lora", "beta": 0.1, "training": {"max_steps": 2, "batch_size": 2, "lr": 5e-3}},
            "dpo_gen": {"type": "dpo", "sft_from": "lora", "pairs": "ranked",
                        "training": {"max_steps": 2, "batch_size": 2, "lr": 5e-3}},
        },
        preferences={"name": "prefs", "path": "data/prefs.jsonl", "columns": {"id": "id"}, "eval_fraction": 0.25},
        reward_models={"rm": {"r": 4, "alpha": 8, "dropout": 0.0, "training": {"max_steps": 3, "batch_size": 4,
                                                                                "lr": 5e-3}}},
        policies={"grpo": {"sft_from": "lora", "rewards": [{"type": "token_f1"},
                                                          {"type": "reward_model", "reward_model": "rm", "weight": 0.5}],
                           "num_generations": 2, "max_completion_length": 4, "heldout_prompts": 3,
                           "training": {"max_steps": 2, "batch_size": 4, "lr": 5e-3}}},
        # the hybrid loop: lora's own answers ranked by the reward model (the random tiny model
        # rarely ends an answer within 6 tokens: finished_only false lets a cut one be chosen)
        generated_preferences={"ranked": {"generator": "lora", "rank_by": [{"type": "reward_model", "reward_model": "rm"}],
                                          "answers_per_prompt": 3, "max_new_tokens": 6, "max_prompts": 8,
                                          "finished_only": False, "eval_fraction": 0.25}},
        distillation={"teacher": "lora", "keep_layers": [1], "alpha": 0.5, "temperature": 2.0,
                      "training": {"max_steps": 3}, "speed_prompts": 2},
    )


def requested(result) -> set[tuple[str, str | None]]:
    out = set()
    for key in ("base_model", "sft_dataset", "base_eval", "leaderboard", "student"):
        if result.get_num_requested(dg.AssetKey(key)):
            out.add((key, None))
    for key in PARTITIONED:
        for p in result.get_requested_partitions(dg.AssetKey(key)):
            out.add((key, p))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("beyond")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    write_jsonl(root / "data" / "heads.jsonl", head_rows())
    write_jsonl(root / "data" / "prefs.jsonl", pref_rows())
    (root / "recipe.yaml").write_text(yaml.safe_dump(beyond_recipe(tiny_model_dir), sort_keys=False))
    home = root / "ft_home"
    with dg.instance_for_test() as instance:
        recipe = load_recipe(root / "recipe.yaml")
        defs = build_definitions(recipe, home=str(home))
        failed = materialize_all(defs, instance, say=lambda *_: None)  # as make demo
        assert not failed, failed
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        yield {"root": root, "home": home, "instance": instance, "defs": defs, "recipe": recipe,
               "store": ArtifactStore(home), "cursor": first.cursor, "first": first}


def meta(world, key: str, partition: str | None = None) -> dict:
    events = world["instance"].fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
        limit=1).records
    return events[0].asset_materialization.metadata


def test_graph_declares_the_new_assets_and_their_dependencies(world):
    defs = world["defs"]
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw/qa", "raw/heads", "raw/prefs", "preference_dataset", "student"} <= keys
    assert defs.resolve_assets_def("preference_adapter").partitions_def.get_partition_keys() == ["dpo", "dpo_gen"]
    assert defs.resolve_assets_def("preference_dataset").partitions_def.get_partition_keys() == ["dpo", "rm"]
    assert defs.resolve_assets_def("reward_model").partitions_def.get_partition_keys() == ["rm"]
    assert defs.resolve_assets_def("adapter").partitions_def.get_partition_keys() == ["lora"]
    assert defs.resolve_assets_def("eval_report").partitions_def.get_partition_keys() == ["lora", "dpo", "dpo_gen"]
    # every edge of the dpo chain is declared, partition to partition (what the UI's lineage shows)
    parents = {k: {p.to_user_string() for p in graph.get(dg.AssetKey(k)).parent_keys}
               for k in ("preference_adapter", "merged_model", "eval_report")}
    assert {"adapter", "preference_dataset", "base_model", "recipe/method"} <= parents["preference_adapter"]
    assert {"adapter", "preference_adapter"} <= parents["merged_model"]
    assert {"adapter", "preference_adapter", "preference_dataset"} <= parents["eval_report"]

    def upstream(asset: str, partition: str, parent: str) -> list[str]:
        mapping = defs.resolve_assets_def(asset).get_partition_mapping(dg.AssetKey(parent))
        down = defs.resolve_assets_def(asset).partitions_def
        up = defs.resolve_assets_def(parent).partitions_def
        got = mapping.get_upstream_mapped_partitions_result_for_partitions(
            down.subset_with_partition_keys([partition]), down, up)
        return sorted(got.partitions_subset.get_partition_keys())

    assert upstream("preference_adapter", "dpo", "adapter") == ["lora"]  # the SFT adapter it continues
    assert upstream("preference_adapter", "dpo", "preference_dataset") == ["dpo"]
    assert upstream("reward_model", "rm", "preference_dataset") == ["rm"]
    assert {"preference_dataset", "base_model"} <= {p.to_user_string() for p in graph.get(dg.AssetKey("reward_model")).parent_keys}
    assert upstream("merged_model", "dpo", "preference_adapter") == ["dpo"]
    assert upstream("merged_model", "dpo", "adapter") == [] and upstream("merged_model", "lora", "adapter") == ["lora"]
    assert upstream("eval_report", "dpo", "adapter") == ["lora"]  # the reference policy of its preference metrics
    assert upstream("eval_report", "lora", "preference_adapter") == []
    assert dg.AssetKey("merged_model") in graph.get(dg.AssetKey("student")).parent_keys
    assert graph.get(dg.AssetKey("preference_dataset")).group_name == "data"
    # the policy: the SFT adapter it continues, the prompts, and the reward model it is scored by
    assert defs.resolve_assets_def("policy_adapter").partitions_def.get_partition_keys() == ["grpo"]
    assert {"adapter", "sft_dataset", "base_model", "reward_model"} <= \
        {p.to_user_string() for p in graph.get(dg.AssetKey("policy_adapter")).parent_keys}
    assert upstream("policy_adapter", "grpo", "adapter") == ["lora"]
    assert upstream("policy_adapter", "grpo", "reward_model") == ["rm"]
    # the hybrid loop: which model made which data, and who trains on it
    assert {"adapter", "sft_dataset", "base_model", "reward_model"} <= \
        {p.to_user_string() for p in graph.get(dg.AssetKey("generated_preferences")).parent_keys}
    assert upstream("generated_preferences", "ranked", "adapter") == ["lora"]
    assert upstream("generated_preferences", "ranked", "reward_model") == ["rm"]
    assert upstream("preference_adapter", "dpo_gen", "generated_preferences") == ["ranked"]
    assert upstream("preference_adapter", "dpo_gen", "preference_dataset") == []
    assert upstream("preference_adapter", "dpo", "generated_preferences") == []
    assert upstream("eval_report", "dpo_gen", "generated_preferences") == ["ranked"]


def test_dpo_continues_the_latest_sft_adapter_with_lineage(world):
    store = world["store"]
    lora, dpo_ = store.latest("adapter", "lora"), store.latest("preference_adapter", "dpo")
    prefs = store.latest("preference_dataset", "dpo")
    m = dpo_.manifest()
    assert m["inputs"] == {"adapter[lora]": lora.version, "base_model": store.latest("base_model").version,
                           "preference_dataset[dpo]": prefs.version}
    assert m["dpo"]["sft_adapter"] == {"method": "lora", "version": lora.version, "path": lora.path}
    assert m["train"]["steps"] == 2 and m["train"]["trainable_parameters"] > 0
    assert prefs.manifest()["inputs"]["raw/prefs"] and (prefs.dir / "rejected.jsonl").is_file()
    md = meta(world, "preference_adapter", "dpo")
    assert md["sft_adapter"].value == f"adapter[lora] {lora.version}"
    # the held-out pairs are scored in the dpo eval report, against the SFT adapter it started from
    report = store.latest("eval_report", "dpo")
    pm = json.loads((report.dir / "preference_metrics.json").read_text())
    assert pm["reference"] == {"adapter": "adapter[lora]", "version": lora.version}
    assert pm["pairs"] == 4 and set(pm) >= {"base", "sft", "dpo"}
    assert {"reward_accuracy", "reward_margin", "logp_accuracy"} <= set(pm["dpo"])
    assert report.manifest()["inputs"]["adapter[lora]"] == lora.version
    assert report.manifest()["inputs"]["preference_adapter[dpo]"] == dpo_.version
    assert report.manifest()["inputs"]["preference_dataset[dpo]"] == prefs.version
    md = meta(world, "eval_report", "dpo")
    assert md["preference_accuracy"].value == pm["dpo"]["reward_accuracy"]
    assert md["reward_margin"].value == pm["dpo"]["reward_margin"]
    metrics = json.loads((report.dir / "metrics.json").read_text())
    assert isinstance(metrics["tuned"]["token_f1"], float)  # and the usual QA metrics
    # merged like any LoRA, and on the leaderboard
    assert store.latest("merged_model", "dpo").manifest()["mergeable"]
    board = json.loads((store.latest("leaderboard").dir / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {"lora", "dpo", "dpo_gen", "base"}


def test_reward_model_trains_on_the_pairs_and_reports_its_held_out_accuracy(world):
    """reward_model[rm]: a plain sequence classifier (merged LoRA + head) from the same pairs, with
    its held-out pairwise accuracy, calibration and lineage."""
    from transformers import AutoModelForSequenceClassification

    store = world["store"]
    rm, prefs = store.latest("reward_model", "rm"), store.latest("preference_dataset", "rm")
    m = rm.manifest()
    assert m["inputs"] == {"preference_dataset[rm]": prefs.version, "base_model": store.latest("base_model").version}
    assert m["reward_model"]["type"] == "lora" and m["train"]["steps"] == 3
    heldout = json.loads((rm.dir / "heldout.json").read_text())
    assert heldout["pairs"] == 4 and len(heldout["rows"]) == 4 and 0.0 <= heldout["accuracy"] <= 1.0
    assert m["reward_model"]["heldout"]["accuracy"] == heldout["accuracy"]
    md = meta(world, "reward_model", "rm")
    assert md["heldout_accuracy"].value == heldout["accuracy"] and md["chance_accuracy"].value == 0.5
    assert "calibration" in md and md["calibration_plot"].value.startswith("![rm calibration](data:image/png")
    assert len(md["train_accuracy"].value) == 3
    model = AutoModelForSequenceClassification.from_pretrained(rm.dir)  # plain transformers, no peft
    assert model.config.num_labels == 1


def test_policy_is_optimized_against_its_rewards_and_reports_against_its_sft_start(world):
    """policy_adapter[grpo]: adapter[lora] continued with GRPO against token F1 + the reward model's
    score; a plain peft adapter with its lineage, curves and held-out report."""
    from peft import PeftModel

    from ft_assets.models.base_model import load_model

    store = world["store"]
    pol, lora, rm = (store.latest("policy_adapter", "grpo"), store.latest("adapter", "lora"),
                     store.latest("reward_model", "rm"))
    m = pol.manifest()
    assert m["inputs"] == {"adapter[lora]": lora.version, "reward_model[rm]": rm.version,
                           "sft_dataset": store.latest("sft_dataset").version,
                           "base_model": store.latest("base_model").version}
    assert m["policy"]["sft_adapter"] == {"method": "lora", "version": lora.version} and m["train"]["steps"] == 2
    log = json.loads((pol.dir / "train_log.json").read_text())
    assert [s for s, _ in log["rewards"]] == [1, 2] and set(log["function_rewards"]) == {"token_f1", "reward_model"}
    assert len(log["kls"]) == 2  # beta 0.04 (the default): the KL to the SFT adapter is logged
    report = json.loads((pol.dir / "policy_eval.json").read_text())
    assert report["examples"] == 3 and len(report["rows"]) == 3 and isinstance(report["kl"], float)
    for who in ("policy", "start"):
        assert set(report[who]["rewards"]) == {"token_f1", "reward_model"} and 0 <= report[who]["token_f1"] <= 1
    md = meta(world, "policy_adapter", "grpo")
    assert md["heldout_reward"].value == report["policy"]["reward"]
    assert md["start_heldout_reward"].value == report["start"]["reward"]
    assert md["heldout_kl_from_start"].value == report["kl"] and len(md["train_reward"].value) == 2
    assert md["reward_curve"].value.startswith("![grpo reward curve](data:image/png")
    model = PeftModel.from_pretrained(load_model(store.latest("base_model").dir), pol.dir)  # plain peft
    assert list(model.peft_config) == ["default"]


def test_a_tuned_model_ranks_its_own_answers_into_pairs_that_dpo_trains_on(world):
    """generated_preferences[ranked]: adapter[lora]'s sampled answers ranked by reward_model[rm] into
    pairs, stored as preference_dataset stores pairs; preference_adapter[dpo_gen] trains on them and
    its eval report scores their held-out ones; the lineage names the model that made the data."""
    store = world["store"]
    made, lora, rm = (store.latest("generated_preferences", "ranked"), store.latest("adapter", "lora"),
                      store.latest("reward_model", "rm"))
    m = made.manifest()
    assert m["inputs"] == {"adapter[lora]": lora.version, "reward_model[rm]": rm.version,
                           "sft_dataset": store.latest("sft_dataset").version,
                           "base_model": store.latest("base_model").version}
    assert m["generated_preferences"]["generator"] == {"method": "lora", "version": lora.version}
    samples = [json.loads(line) for line in (made.dir / "samples.jsonl").open()]
    train = [json.loads(line) for line in (made.dir / "train.jsonl").open()]
    evals = [json.loads(line) for line in (made.dir / "eval.jsonl").open()]
    assert len(samples) == 8 and all(len(s["answers"]) == 3 for s in samples)
    assert len(train) + len(evals) == sum(s["pair"] is not None for s in samples) >= 4
    for pair in train:  # chosen is the answer the reward model scored highest, rejected the lowest
        group = next(s for s in samples if s["id"] == pair["id"])
        scores = [a["rewards"]["reward_model"] for a in group["answers"]]
        chosen, rejected = group["pair"]
        assert scores[chosen] == max(scores) and scores[rejected] == min(scores) and scores[chosen] > scores[rejected]
        assert pair["chosen"] == group["answers"][chosen]["text"]
    md = meta(world, "generated_preferences", "ranked")
    assert md["generator"].value == f"adapter[lora] {lora.version}" and md["pairs"].value == len(train) + len(evals)
    assert md["mean_chosen_reward"].value > md["mean_rejected_reward"].value
    tuned = store.latest("preference_adapter", "dpo_gen")
    assert tuned.manifest()["inputs"] == {"adapter[lora]": lora.version, "generated_preferences[ranked]": made.version,
                                          "base_model": store.latest("base_model").version}
    assert meta(world, "preference_adapter", "dpo_gen")["pairs"].value == "generated_preferences[ranked]"
    report = store.latest("eval_report", "dpo_gen")
    assert report.manifest()["inputs"]["generated_preferences[ranked]"] == made.version
    pm = json.loads((report.dir / "preference_metrics.json").read_text())
    assert pm["pairs"] == len(evals)


def test_student_is_distilled_from_the_teacher_with_a_report(world):
    store = world["store"]
    student, teacher = store.latest("student"), store.latest("merged_model", "lora")
    m = student.manifest()
    assert m["inputs"]["merged_model[lora]"] == teacher.version
    assert m["distill"]["teacher_adapter"] == {"method": "lora", "version": store.latest("adapter", "lora").version}
    report = json.loads((student.dir / "distill_report.json").read_text())
    assert report["size"]["student"]["layers"] == 1 and report["size"]["teacher"]["layers"] == 2
    assert report["size"]["student"]["parameters"] < report["size"]["teacher"]["parameters"]
    assert report["size"]["student"]["bytes"] < report["size"]["teacher"]["bytes"]
    for who in ("teacher", "student"):
        assert report["speed"][who]["tokens_per_s"] > 0
        assert isinstance(report["quality"][who]["token_f1"], float)
    assert report["train"]["steps"] == 3 and report["loss"] == {"alpha": 0.5, "temperature": 2.0}
    md = meta(world, "student")
    assert md["student_layers"].value == 1 and md["kl_after"].value == report["kl_to_teacher"]["after"]["kl"]
    from ft_assets.models.base_model import load_model

    assert load_model(student.path).config.num_hidden_layers == 1  # a plain checkpoint


def materialize_student(world, **run_config):
    defs = world["defs"]
    config = dg.RunConfig(ops={"student": _common.TrainingRun(**run_config)}) if run_config else None
    result = dg.materialize(list(defs.assets), resources=defs.resources, instance=world["instance"],
                            selection=["student"], run_config=config)
    messages = [e.user_message for e in world["instance"].all_logs(result.run_id)]
    return result.asset_materializations_for_node("student")[0].metadata, messages


def test_same_inputs_give_the_same_student_version_without_training(world, monkeypatch):
    store = world["store"]
    before = store.latest("student")
    assert before.manifest()["version_basis"] == "derivation"
    log = json.loads((before.dir / "train_log.json").read_text())
    assert len(log["losses"]) == len(log["kl"]) == len(log["ce"]) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("trained although inputs, code and settings are unchanged")

    monkeypatch.setattr(distill, "distill_student", no_training)
    meta_, messages = materialize_student(world)
    assert meta_["data_version"].value == before.version and meta_["reused"].value is True
    assert any(m.startswith(f"student: version {before.version}") and "reused, nothing trained" in m for m in messages)
    assert store.latest("student") == before


def test_force_retrains_the_student_into_a_version_of_its_own(world):
    store = world["store"]
    before = store.latest("student")
    meta_, messages = materialize_student(world, force=True)
    forced = store.latest("student")
    assert meta_["data_version"].value == forced.version != before.version and "reused" not in meta_
    assert any("student: training (force: true)" in m for m in messages)
    assert forced.manifest()["derivation"]["forced_by"] and meta_["steps"].value == 3
    assert [s for s, _ in meta_["kl"].value] == [s for s, _ in meta_["ce"].value] == [1, 2, 3]
    meta_, _ = materialize_student(world)  # unforced again: the forced version is the one made from these inputs
    assert meta_["data_version"].value == forced.version and meta_["reused"].value is True


def test_mixture_and_per_task_metrics(world):
    store = world["store"]
    info = json.loads((store.latest("sft_dataset").dir / "dataset_info.json").read_text())
    tasks = info["mixture"]["tasks"]
    total = info["train_rows"]
    assert tasks["qa"]["rows"] + tasks["heads"]["rows"] == total
    assert abs(tasks["qa"]["rows"] - 0.6 * total) <= 1 and abs(tasks["heads"]["rows"] - 0.4 * total) <= 1
    metrics = json.loads((store.latest("eval_report", "lora").dir / "metrics.json").read_text())
    per = metrics["per_task"]
    assert set(per) == {"qa", "heads"}
    assert per["qa"]["tuned"]["examples"] == 12 and per["heads"]["tuned"]["examples"] == 5
    preds = [json.loads(line) for line in (store.latest("eval_report", "lora").dir / "predictions.jsonl").open()]
    heads = [p for p in preds if p["task"] == "heads"]
    assert per["heads"]["tuned"]["token_f1"] == round(sum(p["token_f1"] for p in heads) / len(heads), 4)
    table = meta(world, "eval_report", "lora")["per_task"]
    assert sorted(r.data["task"] for r in table.records) == ["heads", "qa"]
    assert "per_task" in json.loads((store.latest("base_eval").dir / "metrics.json").read_text())


def step(world, observe_first=True):
    """One daemon tick: the observation sensor's (its events recorded), then the automation's."""
    if observe_first:
        record_sources(world["defs"], world["instance"])
    result = dg.evaluate_automation_conditions(defs=world["defs"], instance=world["instance"], cursor=world["cursor"])
    world["cursor"] = result.cursor
    return requested(result)


def settle(world, got) -> set:
    """Do what the daemon would (launch the requested runs) until a tick requests nothing; all that ran."""
    ran = set()
    for _ in range(10):  # a tick that requests nothing ends it; ten ticks is far more than any chain here
        if not got:
            return ran
        ran |= got
        targets = {(dg.AssetKey(k), p) for k, p in got}
        assert not materialize_graph(world["defs"], world["instance"], targets, say=lambda *_: None)
        got = step(world)
    raise AssertionError(f"still requesting after 10 ticks: {got}")


def test_changed_preference_pairs_rerun_only_the_preference_partitions(world):
    """Through the observation sensor: it hashes the preference file too."""
    assert requested(world["first"]) == set() and step(world) == set()
    rows = pref_rows()
    rows[0]["rejected"] = "$1 million"
    write_jsonl(world["root"] / "data" / "prefs.jsonl", rows)
    first = step(world)
    # the pairs first: preference_dataset has a partition per reader (dpo, rm), which neither
    # preference_adapter (dpo) nor reward_model (rm) shares, and a run has one partitions
    # definition; its blocking check gates what follows in the next tick
    assert first == {("preference_dataset", p) for p in ("dpo", "rm")}
    chains = {(asset, "dpo") for asset in ("preference_dataset", "preference_adapter", "merged_model", "eval_report")}
    rm = {("preference_dataset", "rm"), ("reward_model", "rm"), ("policy_adapter", "grpo")}  # grpo reads rm's score
    # rm ranks lora's answers: new pairs are generated and dpo_gen retrains on them
    hybrid = {("generated_preferences", "ranked"),
              *((asset, "dpo_gen") for asset in ("preference_adapter", "merged_model", "eval_report"))}
    assert settle(world, first) == chains | rm | hybrid | {("leaderboard", None)}  # never lora, never student


def test_a_new_sft_adapter_version_retrains_the_dpo_method_through_its_declared_edge(world):
    """No store reads behind the graph: adapter[lora] -> preference_adapter[dpo] is a declared,
    mapped input, so the automation sees the new version and re-runs the dpo chain after lora's."""
    assert step(world) == set()
    before = world["store"].latest("preference_adapter", "dpo")
    defs = world["defs"]
    dg.materialize(list(defs.assets), instance=world["instance"], resources=defs.resources, partition_key="lora",
                   selection=["adapter"], run_config={"ops": {"adapter": {"config": {"force": True}}}})
    lora = world["store"].latest("adapter", "lora")
    first = step(world)
    assert ("preference_adapter", "dpo") in first and ("merged_model", "lora") in first
    # not the student: the forced retrain made the same weights on CPU, so merged_model[lora] has the same
    # content version and nothing below it changed
    assert settle(world, first) == {("merged_model", "lora"), ("eval_report", "lora"),
                                    ("preference_adapter", "dpo"), ("merged_model", "dpo"), ("eval_report", "dpo"),
                                    ("policy_adapter", "grpo"), ("leaderboard", None), ("generated_preferences", "ranked"),
                                    *((asset, "dpo_gen") for asset in ("preference_adapter", "merged_model", "eval_report"))}
    after = world["store"].latest("preference_adapter", "dpo")
    assert after.version != before.version and after.manifest()["inputs"]["adapter[lora]"] == lora.version
    pm = json.loads((world["store"].latest("eval_report", "dpo").dir / "preference_metrics.json").read_text())
    assert pm["reference"]["version"] == lora.version


def test_an_edited_reward_model_policy_or_generated_entry_is_requested_by_the_automation(world):
    """Their sections are in their assets' code versions: an edit is seen without a run (evaluated
    on the edited recipe's definitions, nothing launched; the module's cursor is left alone)."""
    assert step(world) == set()
    edited = beyond_recipe(world["recipe"].base_model.path)
    edited["reward_models"]["rm"]["center_rewards"] = 0.02
    edited["policies"]["grpo"]["heldout_prompts"] = 2
    edited["generated_preferences"]["ranked"]["min_margin"] = 0.01
    (world["root"] / "edited.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    defs = build_definitions(load_recipe(world["root"] / "edited.yaml"), home=str(world["home"]))
    got = dg.evaluate_automation_conditions(defs=defs, instance=world["instance"], cursor=world["cursor"])
    assert requested(got) == {("reward_model", "rm"), ("policy_adapter", "grpo"), ("generated_preferences", "ranked")}


def test_continue_from_previous_when_the_data_changes(world):
    store, defs, instance = world["store"], world["defs"], world["instance"]
    v1 = store.latest("adapter", "lora")
    old_data = store.latest("sft_dataset")
    assert v1.manifest()["continual"]["continued_from"] is None  # the first version started from scratch
    assert "adapter[lora]" not in v1.manifest()["inputs"]
    # new data: half the QA rows replaced by other questions
    rows = qa_rows()[:24] + [dict(r, id=f"n{i}", question="What was operating income?",
                                  answer=f"${i + 100} million") for i, r in enumerate(qa_rows()[24:])]
    write_jsonl(world["root"] / "data" / "qa.jsonl", rows)
    assets, res = list(defs.assets), defs.resources
    dg.materialize(assets, instance=instance, resources=res, selection=["sft_dataset", "base_eval"])
    # adapter has only the SFT partitions, merged_model/eval_report every method's: two runs, in order
    assert not materialize_graph(defs, instance, {(dg.AssetKey(k), "lora") for k in ("adapter", "merged_model", "eval_report")},
                                 say=lambda *_: None)
    v2 = store.latest("adapter", "lora")
    m = v2.manifest()
    assert v2.version != v1.version
    assert m["inputs"]["adapter[lora]"] == v1.version  # lineage: the version it continued from
    assert m["continual"]["continued_from"] == {"version": v1.version, "path": v1.path}
    assert m["continual"]["previous_sft_dataset"] == old_data.version
    assert m["continual"]["replay_rows"] > 0
    md = meta(world, "adapter", "lora")
    assert md["continued_from"].value == v1.version and md["replay_rows"].value == m["continual"]["replay_rows"]
    # the eval report measures forgetting on the previous eval split
    report = json.loads((store.latest("eval_report", "lora").dir / "metrics.json").read_text())
    f = report["forgetting"]
    assert f["previous_adapter"] == v1.version and f["previous_sft_dataset"] == old_data.version
    assert f["examples"] == 17 and set(f["before"]) >= {"token_f1", "eval_loss"} and "token_f1" in f["drop"]
    assert meta(world, "eval_report", "lora")["forgetting_previous_adapter"].value == v1.version
    # re-running with the same data repeats the same continuation (from v1), not a chain v1 -> v2 -> v3
    dg.materialize(assets, instance=instance, resources=res, partition_key="lora", selection=["adapter"])
    assert store.latest("adapter", "lora").manifest()["inputs"]["adapter[lora]"] == v1.version
    # the lineage command follows the chain back through v1 to the previous data
    from ft_assets.cli.main import lineage

    tree = lineage(store, "adapter", "lora", v2.version)
    prev = next(n for n in tree["inputs"] if n["asset"] == "adapter")
    assert prev["version"] == v1.version
    assert any(n["asset"] == "sft_dataset" and n["version"] == old_data.version for n in prev["inputs"])


# What a user looks for on each new asset's partition page (metadata entries, their values the
# latest materialization record's) and the upstream edges its overview's lineage must show.
UI_REPORTS = {
    ("reward_model", "rm"): (("heldout_accuracy", "heldout_mean_margin", "heldout_pairs", "chance_accuracy",
                              "calibration", "calibration_plot"), {"preference_dataset", "base_model"}),
    ("preference_adapter", "dpo"): (("sft_adapter", "train_pairs", "beta", "final_loss", "loss_curve"),
                                    {"adapter", "preference_dataset", "base_model"}),
    ("policy_adapter", "grpo"): (("heldout_reward", "start_heldout_reward", "heldout_kl_from_start", "heldout",
                                  "reward_curve"), {"adapter", "reward_model"}),
}


@pytest.mark.slow
@pytest.mark.ui
def test_the_ui_shows_the_new_assets_with_their_reports(world, tmp_path):
    """A read-only webserver (no daemon) on this module's instance, in headless Chromium
    (e2e/ui_driver.py): each asset's partition page shows its latest materialization (the record's
    run) with the report's values as recorded, the held-out table's rows and the curves as images;
    its overview lists the upstream assets the graph declares. Screenshots in
    /tmp/ft_ui_screenshots/beyond_sft/."""
    from ft_assets_tests.e2e import ui_driver as ui

    graph = world["defs"].resolve_asset_graph()
    with ui.chromium(tmp_path) as browser, \
            ui.serve_instance(tmp_path, world["root"] / "recipe.yaml", world["home"], world["instance"]) as dev:
        snap = ui.screenshots(browser, tmp_path / "shots", ui.SCREENSHOT_COPY / "beyond_sft")
        for (asset, partition), (names, edges) in UI_REPORTS.items():
            record = world["instance"].fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records[0]
            md = record.asset_materialization.metadata
            with ui.diagnosed(dev, snap, f"{asset}-{partition}"):
                browser.get(f"{dev.url}/assets/{asset}?view=partitions&partition={partition}")
                ui.wait_for_lines(browser, [partition, "Latest materialization", record.run_id[:8], "Metadata"])
                ui.dismiss_dialogs(browser)
                for name in names:
                    assert name in md, f"{asset}[{partition}] records no {name}"
                    ui.check_metadata_shown(browser, name, md[name])
                snap(f"{asset}-{partition}")
                if asset == "policy_adapter":  # the comparison a user reads first: the policy vs its SFT start
                    rows = ui.table_cells(ui.metadata_value(browser, "heldout"))
                    assert [r[0] for r in rows] == ["policy", "start"], rows

                browser.get(f"{dev.url}/assets/{asset}")
                parents = {p.to_user_string() for p in graph.get(dg.AssetKey(asset)).parent_keys}
                assert edges <= parents
                ui.wait(browser, f"upstream assets {sorted(parents)}", lambda d: ui.upstream_shown(d) == parents)
                snap(f"{asset}-overview")
