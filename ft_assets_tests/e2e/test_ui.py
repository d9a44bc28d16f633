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

Screenshots go to `<tmp>/ui-screenshots/` (beside FT_HOME) and are copied to
/tmp/ft_ui_screenshots/. Every wait is bounded; a failure prints the tail of the dagster dev log.
Needs Debian's chromium + chromium-driver (`make install` installs them) and selenium (test
extra); marked `slow` and `ui`: `make test-fast` skips it, `-m 'not ui'` deselects only it. Takes
about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ft_assets.config.recipe import DEMO_RECIPE
from ft_assets.defs.runs import CHILDREN_TAG, WORKER_TAG, Proc
from ft_assets_tests.conftest import REPO, make_recipe, qa_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.ui]  # minutes: `make test-fast` (-m 'not slow') skips it

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/ft_ui_screenshots")
LOCATION = "ft_assets"

STARTUP_TIMEOUT_S = 150  # webserver answering and the code location loaded
RUN_TIMEOUT_S = 300  # one run of the tiny recipe (about a minute: each step imports torch)
UI_TIMEOUT_S = 60  # a page or element showing up in the browser
STOP_GRACE_S = 8  # SIGTERM -> SIGKILL for the dagster dev process group

ASSET_KEYS = [
    ("raw", "qa"), ("recipe", "method"), ("base_model",), ("sft_dataset",), ("quantized_base",),
    ("adapter",), ("merged_model",), ("eval_report",), ("base_eval",), ("leaderboard",),
]
GROUPS = ["raw_data", "models", "data", "training", "evaluation"]
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


# --------------------------------------------------------------------------------------
# Processes: start in a new session, stop the whole group, prove nothing survived
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_pids(pgid: int, env_marker: str) -> list[int]:
    """Live (non-zombie) processes in process group `pgid` or whose environment has `env_marker`
    (KEY=VALUE): everything these tests started, even what left the group."""
    marker = env_marker.encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if state in ("Z", "X"):
                continue
            if pgrp == pgid or marker in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(f"{pid}: " + (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                                     .decode(errors="replace")[:200]))
    return "\n".join(out)


def _stop_group(pgid: int, env_marker: str, proc: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM the group, SIGKILL it after STOP_GRACE_S (dagster dev may ignore SIGTERM), then
    SIGKILL by pid anything of ours still alive. Returns what still lived after 15 s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and _live_pids(pgid, env_marker):
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while (left := _live_pids(pgid, env_marker)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    return _live_pids(pgid, env_marker)


# --------------------------------------------------------------------------------------
# The dagster dev server
# --------------------------------------------------------------------------------------


class DagsterDev:
    def __init__(self, root: Path, home: Path, port: int, log: Path):
        self.root, self.home, self.port, self.log = root, home, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.env_marker = f"FT_HOME={home}"
        self.proc: subprocess.Popen | None = None
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, msg: str):
        pytest.fail(f"{msg}\n----- dagster dev log ({self.log}), last lines -----\n{self.log_tail()}",
                    pytrace=False)

    def gql(self, query: str, variables: dict | None = None, timeout: float = 15) -> dict:
        req = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"})
        with self._http.open(req, timeout=timeout) as resp:
            body = json.load(resp)
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def wait_until(self, what: str, check, timeout: float, interval: float = 1.0):
        """Poll `check()` until it returns something truthy; fail (with the log) after `timeout`."""
        deadline, last_exc = time.monotonic() + timeout, None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                self.fail(f"dagster dev exited (rc {self.proc.returncode}) while waiting for {what}")
            try:
                if result := check():
                    return result
            except (OSError, RuntimeError, ValueError) as exc:  # not up yet, or a transient error
                last_exc = exc
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")
            time.sleep(interval)

    # --- queries -------------------------------------------------------------------------

    def location_loaded(self) -> bool:
        data = self.gql("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
                        timeout=5)
        for entry in data["workspaceOrError"].get("locationEntries", []):
            if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
                continue
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                self.fail(f"code location {LOCATION} failed to load:\n{loaded.get('message')}")
            return loaded.get("__typename") == "RepositoryLocation"
        return False

    def run_status(self, run_id: str) -> str | None:
        data = self.gql("query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                        {"id": run_id})
        return data["runOrError"].get("status")

    def wait_run(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> None:
        status = self.wait_until(f"run {run_id} to finish",
                                 lambda: (s := self.run_status(run_id)) in DONE and s, timeout, interval=2)
        if status != "SUCCESS":
            self.fail(f"run {run_id} ended {status}")

    def materialization_run(self, key: tuple[str, ...], partition: str | None = None) -> str | None:
        """The run id of the asset's (partition's) latest materialization, or None."""
        data = self.gql("""query($key: AssetKeyInput!, $parts: [String!]) { assetOrError(assetKey: $key) {
            __typename ... on Asset { assetMaterializations(partitions: $parts, limit: 1) { runId } } } }""",
                        {"key": {"path": list(key)}, "parts": [partition] if partition else None})
        mats = data["assetOrError"].get("assetMaterializations") or []
        return mats[0]["runId"] if mats else None

    def asset_job(self) -> tuple[str, str]:
        """(repository name, asset job name) of the code location."""
        data = self.gql("""{ repositoriesOrError { ... on RepositoryConnection { nodes {
            name location { name } jobs { name isAssetJob } } } } }""")
        for repo in data["repositoriesOrError"]["nodes"]:
            if repo["location"]["name"] == LOCATION:
                for job in repo["jobs"]:
                    if job["isAssetJob"]:
                        return repo["name"], job["name"]
        self.fail(f"no asset job in code location {LOCATION}: {data}")


def _dagster_bin() -> Path:
    here = Path(sys.executable).parent / "dagster"
    return here if here.is_file() else REPO / ".venv" / "bin" / "dagster"


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

    with _serve(root, root / "recipe.yaml", home, dagster_home) as dev:
        yield dev


@contextlib.contextmanager
def _serve(root: Path, recipes: Path, home: Path, dagster_home: Path):
    """`dagster dev` on the workspace with FT_RECIPE=`recipes`, until the block ends."""
    dev = DagsterDev(root, home, _free_port(), root / "dagster-dev.log")
    env = {**os.environ, "FT_RECIPE": str(recipes), "FT_HOME": str(home),
           "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    cmd = [str(_dagster_bin()), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dev.port)]
    with dev.log.open("wb") as log:
        dev.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        dev.wait_until(f"the webserver on port {dev.port} and code location {LOCATION}",
                       dev.location_loaded, STARTUP_TIMEOUT_S)
        print(f"[ui] dagster dev ready in {time.monotonic() - t0:.0f}s on {dev.url}")
        dev.gql("mutation { setNuxSeen }")  # no "Join the community" dialog over the pages
        yield dev
    finally:
        left = _stop_group(dev.proc.pid, dev.env_marker, dev.proc)
        assert not left, f"dagster dev processes survived the kill:\n{_describe(left)}"


# --------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through the Debian chromedriver (no downloads: Selenium Manager is
    bypassed by giving both paths); chromedriver runs in its own process group."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `make install` (installs chromium)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    logs = tmp_path_factory.mktemp("chromium")
    profile = Path(tempfile.mkdtemp(prefix="ft-ui-chromium-"))
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1600,1200",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    marker = f"FT_UI_BROWSER={profile}"
    service = Service(str(CHROMEDRIVER), log_output=str(logs / "chromedriver.log"),
                      env={**os.environ, "FT_UI_BROWSER": str(profile)},
                      popen_kw={"start_new_session": True})
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=opts)
        driver.set_page_load_timeout(UI_TIMEOUT_S)
        yield driver
    finally:
        pgid = service.process.pid if getattr(service, "process", None) else -1
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        left = _stop_group(pgid, marker) if pgid > 0 else _live_pids(-1, marker)
        shutil.rmtree(profile, ignore_errors=True)
        assert not left, f"chromium/chromedriver processes survived:\n{_describe(left)}"


@pytest.fixture(scope="module")
def snap(ui, browser):
    """snap(name): a PNG of the browser window in <tmp>/ui-screenshots/ (beside FT_HOME), also
    copied to /tmp/ft_ui_screenshots/ (emptied of older PNGs first) for a human to look at."""
    shots = ui.home.parent / "ui-screenshots"
    shots.mkdir(exist_ok=True)
    SCREENSHOT_COPY.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOT_COPY.glob("*.png"):  # this run's pictures only
        old.unlink(missing_ok=True)

    def take(name: str) -> Path:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"screenshot {path} failed"
        shutil.copy2(path, SCREENSHOT_COPY / path.name)
        return path

    return take


@contextlib.contextmanager
def diagnosed(ui: DagsterDev, snap, name: str):
    """On any failure: a FAILED-<name> screenshot and the dagster dev log tail in the output."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            print(f"[ui] failure screenshot: {snap(f'FAILED-{name}')}")
        print(f"----- dagster dev log ({ui.log}), last lines -----\n{ui.log_tail(100)}")
        raise


def _page_lines(driver) -> set[str]:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        text = driver.find_element("tag name", "body").text
    except (StaleElementReferenceException, WebDriverException):
        return set()
    return {" ".join(line.split()) for line in text.splitlines()}


def _wait(driver, what: str, condition, timeout: float = UI_TIMEOUT_S):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} on {driver.current_url}; "
                             f"page text: {sorted(_page_lines(driver))[:80]}") from None


def _wait_for_lines(driver, lines: list[str], timeout: float = UI_TIMEOUT_S) -> None:
    _wait(driver, f"text {lines}", lambda d: set(lines) <= _page_lines(d), timeout)


def _dismiss_dialogs(driver) -> None:
    """The webserver's one-time "Join the Dagster community" dialog, should it show anyway."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Skip']"):
        with contextlib.suppress(Exception):
            if button.is_displayed():
                button.click()


def _latest_materialization_shown(driver) -> bool:
    """The asset page's status block has loaded: "Latest materialization" then e.g. "a minute ago"."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        lines = [" ".join(line.split()) for line in driver.find_element("tag name", "body").text.splitlines()]
    except (StaleElementReferenceException, WebDriverException):
        return False
    return any(a == "Latest materialization" and b.endswith(" ago") for a, b in zip(lines, lines[1:]))


def _key_text(key: tuple[str, ...]) -> str:
    return " / ".join(key)  # how the catalog writes a multi-part key: "raw / qa"


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_catalog_and_lineage_show_every_asset(ui, browser, snap):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with diagnosed(ui, snap, "catalog"):
        browser.get(f"{ui.url}/assets")
        _wait_for_lines(browser, ["Assets", *(_key_text(k) for k in ASSET_KEYS)])
        _dismiss_dialogs(browser)
        _wait_for_lines(browser, ["Never materialized", "2 partitions"])  # the status column loaded
        snap("a1-catalog")

    with diagnosed(ui, snap, "lineage"):
        browser.get(f"{ui.url}/asset-groups")
        _wait_for_lines(browser, ["Global asset lineage", *GROUPS])
        _dismiss_dialogs(browser)
        # graph settings (the gear at the bottom right) -> "Expand all groups": asset nodes drawn
        gear = _wait(browser, "the graph settings button", lambda d: d.find_elements(
            By.XPATH, "(//*[@role='img'][@aria-label='settings'])[last()]/ancestor::button[1]"))[0]
        gear.click()
        _wait(browser, "'Expand all groups'", lambda d: d.find_elements(
            By.XPATH, "//*[normalize-space(text())='Expand all groups']"))[0].click()
        _wait_for_lines(browser, ["base_model", "sft_dataset"])
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close the settings menu
        # The graph draws only the nodes in view (by the key's last part): zoom out until all are.
        nodes = [k[-1] for k in ASSET_KEYS]
        zoom_out = browser.find_element(
            By.XPATH, "//*[@role='img'][@aria-label='zoom_out']/ancestor::button[1]")
        for _ in range(4):
            if set(nodes) <= _page_lines(browser):
                break
            zoom_out.click()
            time.sleep(0.7)
        _wait_for_lines(browser, nodes, timeout=10)
        snap("a2-lineage")


def test_materialize_from_the_catalog(ui, browser, snap):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    keys = ["base_model", "sft_dataset"]
    with diagnosed(ui, snap, "materialize"):
        browser.get(f"{ui.url}/assets")
        _wait_for_lines(browser, keys)
        _dismiss_dialogs(browser)
        for key in keys:  # tick the row's checkbox (click its label: the input itself is hidden)
            box = _wait(browser, f"the checkbox of {key}", EC.presence_of_element_located(
                (By.CSS_SELECTOR, f"input[data-testid='checkbox-{key}']")))
            if not box.is_selected():
                browser.find_element(By.CSS_SELECTOR, f"label[for='{box.get_attribute('id')}']").click()
            _wait(browser, f"{key} selected", lambda d, b=box: b.is_selected(), timeout=10)
        button = _wait(browser, "'Materialize selected (2)'", EC.element_to_be_clickable(
            (By.XPATH, "//button[starts-with(normalize-space(), 'Materialize selected')]")))
        assert "(2)" in button.text, button.text
        snap("b1-catalog-selected")
        button.click()

        # The toast "Launched run <id>" links to the run: that is the run this click started.
        link = _wait(browser, "the 'Launched run' toast", EC.presence_of_element_located((By.XPATH,
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
        _wait(browser, "the run page saying Success", lambda d: "Success" in _page_lines(d))
        snap("b2-run")

        browser.get(f"{ui.url}/assets/base_model")
        _wait_for_lines(browser, ["Metadata", "architecture", "LlamaForCausalLM", "layers", "parameters"])
        _wait(browser, "the latest materialization's time", _latest_materialization_shown)
        snap("b3-base_model-metadata")
        browser.get(f"{ui.url}/assets/sft_dataset")
        _wait_for_lines(browser, ["Metadata", "rows_kept", "train_rows", "eval_rows"])
        _wait(browser, "the latest materialization's time", _latest_materialization_shown)
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
        _wait_for_lines(browser, ["Materialized (1)", "Missing (1)", "lora", "qlora"])
        browser.find_element(By.XPATH, "//*[normalize-space(text())='lora']").click()
        _wait_for_lines(browser, ["Materialized", "method", "final_loss", run_id[:8]])
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
    with _serve(tmp_path, recipes, home, dagster_home) as dev:
        nodes = dev.gql("{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
        groups = {tuple(n["assetKey"]["path"]): n["groupName"] for n in nodes}
        for pipeline in ("finance", "legal"):
            assert groups[(pipeline, "adapter")] == f"{pipeline}_training"
            assert groups[(pipeline, "base_model")] == f"{pipeline}_models"
        assert {path[0] for path in groups} == {"finance", "legal"}
        try:
            browser.get(f"{dev.url}/asset-groups")
            _wait_for_lines(browser, ["Global asset lineage", *(f"{p}_{g}" for p in ("finance", "legal")
                                                                 for g in ("data", "training", "evaluation"))])
            browser.save_screenshot(str(tmp_path / "two-pipelines.png"))
            SCREENSHOT_COPY.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tmp_path / "two-pipelines.png", SCREENSHOT_COPY / "d1-two-pipelines.png")
        except BaseException:
            print(f"----- dagster dev log ({dev.log}), last lines -----\n{dev.log_tail(100)}")
            raise
