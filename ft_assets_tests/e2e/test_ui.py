"""End to end through the real UI: `dagster dev` on a tiny recipe, driven in headless Chromium.

A module-scoped `dagster dev` (webserver + daemon, own process group, free loopback port) serves
the workspace (`workspace.yaml`) with FT_RECIPE pointing at a tiny recipe whose automation is
off, so nothing runs unless a test launches it. Then:

  a. the catalog lists every asset key of the graph (and the lineage page shows the groups);
  b. base_model + sft_dataset are materialized by clicking in the catalog (tick both rows,
     "Materialize selected"); the run must succeed and the asset page shows the metadata;
  c. runs launched with Dagster's GraphQL Python client succeed (base_eval + quantized_base,
     and the `lora` partition of adapter);
  d. a second `dagster dev` with FT_RECIPE naming a directory of two recipes: the lineage page
     lists each recipe's groups apart (`finance_training`, `legal_training`, ...).

The server, the browser and the page helpers are e2e/ui_driver.py's (defs/test_beyond_sft.py
uses them too). Screenshots go to `<tmp>/ui-screenshots/` (beside FT_HOME) and are copied to
/tmp/ft_ui_screenshots/. Every wait is bounded; a failure prints the tail of the dagster dev log.
Needs Debian's chromium + chromium-driver (`make install` installs them) and selenium (test
extra); marked `slow` and `ui`: `make test-fast` skips it, `-m 'not ui'` deselects only the UI
tests (these and test_beyond_sft.py's). Takes about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import yaml

from ft_assets.config.recipe import DEMO_RECIPE
from ft_assets.defs.runs import CHILDREN_TAG, WORKER_TAG, Proc
from ft_assets_tests.conftest import REPO, make_recipe, qa_rows, write_jsonl
from ft_assets_tests.e2e.ui_driver import (DONE, LOCATION, RUN_TIMEOUT_S, SCREENSHOT_COPY, chromium, diagnosed,
                                           dismiss_dialogs, key_text, latest_materialization_shown, page_lines,
                                           screenshots, serve, wait, wait_for_lines)

pytestmark = [pytest.mark.slow, pytest.mark.ui]  # minutes: `make test-fast` (-m 'not slow') skips it

ASSET_KEYS = [
    ("raw", "qa"), ("recipe", "method"), ("base_model",), ("sft_dataset",), ("quantized_base",),
    ("adapter",), ("merged_model",), ("eval_report",), ("base_eval",), ("leaderboard",),
]
GROUPS = ["raw_data", "models", "data", "training", "evaluation"]


# --------------------------------------------------------------------------------------
# Fixtures: the server and the browser (ft_assets_tests/e2e/ui_driver.py)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_model_dir):
    """`dagster dev` serving a tiny project; stopped (whole process group) afterwards."""
    from ft_assets.demo import ensure_instance

    root = tmp_path_factory.mktemp("ui_project")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    recipe = make_recipe(tiny_model_dir, automation={"eager": False, "rerun_on_code_change": False},
                         compute={"device": "cpu", "threads": 1})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    home = root / "ft_home"
    dagster_home = home / "dagster"
    with pytest.MonkeyPatch.context() as mp:  # ensure_instance only setdefault()s DAGSTER_HOME
        mp.setenv("FT_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        ensure_instance(home).dispose()
    assert (dagster_home / "dagster.yaml").is_file()

    with serve(root, root / "recipe.yaml", home, dagster_home) as dev:
        yield dev


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium (ui_driver.chromium); skips when it is not installed."""
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


@pytest.fixture(scope="module")
def snap(ui, browser):
    """snap(name): a PNG of the browser window in <tmp>/ui-screenshots/ (beside FT_HOME), also
    copied to /tmp/ft_ui_screenshots/ (emptied of older PNGs first) for a human to look at."""
    return screenshots(browser, ui.home.parent / "ui-screenshots")


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_catalog_and_lineage_show_every_asset(ui, browser, snap):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with diagnosed(ui, snap, "catalog"):
        browser.get(f"{ui.url}/assets")
        wait_for_lines(browser, ["Assets", *(key_text(k) for k in ASSET_KEYS)])
        dismiss_dialogs(browser)
        wait_for_lines(browser, ["Never materialized", "2 partitions"])  # the status column loaded
        snap("a1-catalog")

    with diagnosed(ui, snap, "lineage"):
        browser.get(f"{ui.url}/asset-groups")
        wait_for_lines(browser, ["Global asset lineage", *GROUPS])
        dismiss_dialogs(browser)
        # graph settings (the gear at the bottom right) -> "Expand all groups": asset nodes drawn
        gear = wait(browser, "the graph settings button", lambda d: d.find_elements(
            By.XPATH, "(//*[@role='img'][@aria-label='settings'])[last()]/ancestor::button[1]"))[0]
        gear.click()
        wait(browser, "'Expand all groups'", lambda d: d.find_elements(
            By.XPATH, "//*[normalize-space(text())='Expand all groups']"))[0].click()
        wait_for_lines(browser, ["base_model", "sft_dataset"])
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close the settings menu
        # The graph draws only the nodes in view (by the key's last part): zoom out until all are.
        nodes = [k[-1] for k in ASSET_KEYS]
        zoom_out = browser.find_element(
            By.XPATH, "//*[@role='img'][@aria-label='zoom_out']/ancestor::button[1]")
        for _ in range(4):
            if set(nodes) <= page_lines(browser):
                break
            zoom_out.click()
            time.sleep(0.7)
        wait_for_lines(browser, nodes, timeout=10)
        snap("a2-lineage")


def test_materialize_from_the_catalog(ui, browser, snap):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    keys = ["base_model", "sft_dataset"]
    with diagnosed(ui, snap, "materialize"):
        browser.get(f"{ui.url}/assets")
        wait_for_lines(browser, keys)
        dismiss_dialogs(browser)
        for key in keys:  # tick the row's checkbox (click its label: the input itself is hidden)
            box = wait(browser, f"the checkbox of {key}", EC.presence_of_element_located(
                (By.CSS_SELECTOR, f"input[data-testid='checkbox-{key}']")))
            if not box.is_selected():
                browser.find_element(By.CSS_SELECTOR, f"label[for='{box.get_attribute('id')}']").click()
            wait(browser, f"{key} selected", lambda d, b=box: b.is_selected(), timeout=10)
        button = wait(browser, "'Materialize selected (2)'", EC.element_to_be_clickable(
            (By.XPATH, "//button[starts-with(normalize-space(), 'Materialize selected')]")))
        assert "(2)" in button.text, button.text
        snap("b1-catalog-selected")
        button.click()

        # The toast "Launched run <id>" links to the run: that is the run this click started.
        link = wait(browser, "the 'Launched run' toast", EC.presence_of_element_located((By.XPATH,
            "//*[contains(normalize-space(), 'Launched run')]/ancestor::*[.//a[contains(@href, '/runs/')]][1]"
            "//a[contains(@href, '/runs/')]")), timeout=30)
        run_id = link.get_attribute("href").rstrip("/").rsplit("/", 1)[-1]
        assert len(run_id) == 36, link.get_attribute("href")
        t0 = time.monotonic()
        ui.wait_run(run_id)
        print(f"[ui] UI-launched run {run_id} succeeded after {time.monotonic() - t0:.0f}s")
        for key in keys:
            assert ui.materialization_run((key,)) == run_id, f"{key} not materialized by run {run_id}"

        browser.get(f"{ui.url}/runs/{run_id}")
        wait(browser, "the run page saying Success", lambda d: "Success" in page_lines(d))
        snap("b2-run")

        browser.get(f"{ui.url}/assets/base_model")
        wait_for_lines(browser, ["Metadata", "architecture", "LlamaForCausalLM", "layers", "parameters"])
        wait(browser, "the latest materialization's time", latest_materialization_shown)
        snap("b3-base_model-metadata")
        browser.get(f"{ui.url}/assets/sft_dataset")
        wait_for_lines(browser, ["Metadata", "rows_kept", "train_rows", "eval_rows"])
        wait(browser, "the latest materialization's time", latest_materialization_shown)
        snap("b4-sft_dataset-metadata")


def test_graphql_client_launches_runs(ui, snap, browser):
    from dagster_graphql import DagsterGraphQLClient
    from selenium.webdriver.common.by import By

    client = DagsterGraphQLClient("127.0.0.1", port_number=ui.port, timeout=30)
    repo, job = ui.asset_job()

    def launch(selection: list[str], partition: str | None = None) -> str:
        tags = {"dagster/partition": partition} if partition else None
        run_id = client.submit_job_execution(job, repository_location_name=LOCATION, repository_name=repo,
                                             asset_selection=selection, tags=tags)
        t0 = time.monotonic()
        status = ui.wait_until(f"run {run_id} ({selection}, partition {partition})", lambda: (
            s := client.get_run_status(run_id).value) in DONE and s, RUN_TIMEOUT_S, interval=2)
        if status != "SUCCESS":
            ui.fail(f"run {run_id} of {selection} (partition {partition}) ended {status}")
        print(f"[ui] client run {selection} partition={partition}: {time.monotonic() - t0:.0f}s")
        return run_id

    with diagnosed(ui, snap, "graphql-client"):
        # quantized_base reads base_model, sft_dataset and base_eval (its eval loss is compared).
        upstream = [k for k in ("base_model", "sft_dataset") if ui.materialization_run((k,)) is None]
        run_id = launch([*upstream, "base_eval", "quantized_base"])
        for key in ("base_eval", "quantized_base"):
            assert ui.materialization_run((key,)) == run_id

        run_id = launch(["adapter"], partition="lora")
        assert ui.materialization_run(("adapter",), "lora") == run_id
        # the run worker recorded itself and the step process it started (what a dead-run check reads)
        tags = {t["key"]: t["value"] for t in ui.gql("""query($id: ID!) { runOrError(runId: $id) {
            ... on Run { tags { key value } } } }""", {"id": run_id})["runOrError"]["tags"]}
        worker = Proc.parse(tags.get(WORKER_TAG))
        assert worker is not None and worker.local and worker.pid != os.getpid(), tags
        assert Proc.parse(tags.get(CHILDREN_TAG, "").split(" ")[0]) is not None, tags
        assert ui.materialization_run(("adapter",), "qlora") is None

        browser.get(f"{ui.url}/assets/adapter?view=partitions")
        wait_for_lines(browser, ["Materialized (1)", "Missing (1)", "lora", "qlora"])
        browser.find_element(By.XPATH, "//*[normalize-space(text())='lora']").click()
        wait_for_lines(browser, ["Materialized", "method", "final_loss", run_id[:8]])
        snap("c1-adapter-lora-partition")


def test_two_recipes_show_as_separate_pipelines(tmp_path, browser):
    """FT_RECIPE naming a directory of two recipes: one code location, each recipe's assets under
    its own key prefix and groups, as the lineage page lists them."""
    from ft_assets.demo import ensure_instance

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    demo = yaml.safe_load(DEMO_RECIPE.read_text())
    for name in ("finance", "legal"):
        recipe = {**demo, "name": name, "root": str(REPO), "automation": {"eager": False}}
        (recipes / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    home, dagster_home = tmp_path / "ft_home", tmp_path / "ft_home" / "dagster"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FT_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        ensure_instance(home).dispose()
    with serve(tmp_path, recipes, home, dagster_home) as dev:
        nodes = dev.gql("{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
        groups = {tuple(n["assetKey"]["path"]): n["groupName"] for n in nodes}
        for pipeline in ("finance", "legal"):
            assert groups[(pipeline, "adapter")] == f"{pipeline}_training"
            assert groups[(pipeline, "base_model")] == f"{pipeline}_models"
        assert {path[0] for path in groups} == {"finance", "legal"}
        try:
            browser.get(f"{dev.url}/asset-groups")
            wait_for_lines(browser, ["Global asset lineage", *(f"{p}_{g}" for p in ("finance", "legal")
                                                                 for g in ("data", "training", "evaluation"))])
            browser.save_screenshot(str(tmp_path / "two-pipelines.png"))
            SCREENSHOT_COPY.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tmp_path / "two-pipelines.png", SCREENSHOT_COPY / "d1-two-pipelines.png")
        except BaseException:
            print(f"----- dagster dev log ({dev.log}), last lines -----\n{dev.log_tail(100)}")
            raise
