"""Driving the Dagster UI from tests (e2e/test_ui.py, defs/test_beyond_sft.py).

The server: `serve` runs `dagster dev` (webserver + daemon) on the workspace, or `serve_instance`
a read-only `dagster-webserver` (no daemon: nothing runs) on the storage of an instance a test
already filled. Either listens on 127.0.0.1 on a free port, in a process group of its own, and is
stopped by that group (then by the pid of anything of ours that left it); every wait is bounded.
The browser: `chromium` is headless Debian Chromium through the Debian chromedriver (no downloads:
Selenium Manager is bypassed by giving both paths), skipping the test when either is missing
(`make install` installs them) or selenium is not installed (test extra).
Then what a page shows: its text lines, waits for them, and an asset page's metadata rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from ft_assets_tests.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/ft_ui_screenshots")
LOCATION = "ft_assets"

STARTUP_TIMEOUT_S = 150  # webserver answering and the code location loaded
RUN_TIMEOUT_S = 300  # one run of the tiny recipe (about a minute: each step imports torch)
UI_TIMEOUT_S = 60  # a page or element showing up in the browser
STOP_GRACE_S = 8  # SIGTERM -> SIGKILL for the dagster dev process group

DONE = {"SUCCESS", "FAILURE", "CANCELED"}


# --------------------------------------------------------------------------------------
# Processes: start in a new session, stop the whole group, prove nothing survived
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_pids(pgid: int, env_marker: str) -> list[int]:
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


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(f"{pid}: " + (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                                     .decode(errors="replace")[:200]))
    return "\n".join(out)


def stop_group(pgid: int, env_marker: str, proc: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM the group, SIGKILL it after STOP_GRACE_S (dagster dev may ignore SIGTERM), then
    SIGKILL by pid anything of ours still alive. Returns what still lived after 15 s."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and live_pids(pgid, env_marker):
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while (left := live_pids(pgid, env_marker)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    return live_pids(pgid, env_marker)


# --------------------------------------------------------------------------------------
# The server
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


def _venv_bin(name: str) -> Path:
    here = Path(sys.executable).parent / name
    return here if here.is_file() else REPO / ".venv" / "bin" / name


@contextlib.contextmanager
def serve(root: Path, recipes: Path, home: Path, dagster_home: Path, read_only: bool = False):
    """`dagster dev` on the workspace with FT_RECIPE=`recipes`, until the block ends; with `read_only`
    a read-only `dagster-webserver` instead (no daemon: no sensor, schedule or automation runs)."""
    dev = DagsterDev(root, home, free_port(), root / "dagster-dev.log")
    env = {**os.environ, "FT_RECIPE": str(recipes), "FT_HOME": str(home),
           "DAGSTER_HOME": str(dagster_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    server = [str(_venv_bin("dagster-webserver"))] if read_only else [str(_venv_bin("dagster")), "dev"]
    cmd = [*server, "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dev.port),
           *(["--read-only"] if read_only else [])]
    with dev.log.open("wb") as log:
        dev.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        dev.wait_until(f"the webserver on port {dev.port} and code location {LOCATION}",
                       dev.location_loaded, STARTUP_TIMEOUT_S)
        print(f"[ui] {'dagster-webserver --read-only' if read_only else 'dagster dev'} ready in "
              f"{time.monotonic() - t0:.0f}s on {dev.url}")
        dev.gql("mutation { setNuxSeen }")  # no "Join the community" dialog over the pages
        yield dev
    finally:
        left = stop_group(dev.proc.pid, dev.env_marker, dev.proc)
        assert not left, f"dagster dev processes survived the kill:\n{describe(left)}"


@contextlib.contextmanager
def serve_instance(root: Path, recipe: Path, home: Path, instance):
    """A read-only webserver on `instance`'s SQLite storage (read in place, not copied), with a
    DAGSTER_HOME of its own under `root` (its dagster.yaml, the dismissed-dialog file)."""
    storage = Path(instance.root_directory)
    assert (storage / "history" / "runs.db").is_file(), f"not a SQLite instance: {instance.root_directory}"
    dagster_home = root / "webserver_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(
        {"telemetry": {"enabled": False}, "storage": {"sqlite": {"base_dir": str(storage)}}}))
    with serve(root, recipe, home, dagster_home, read_only=True) as dev:
        yield dev


# --------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(logs: Path):
    """A headless Chromium (Selenium driver) until the block ends; chromedriver runs in its own
    process group, stopped with everything it started. Skips the test when none is installed."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `make install` (installs chromium)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

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
        left = stop_group(pgid, marker) if pgid > 0 else live_pids(-1, marker)
        shutil.rmtree(profile, ignore_errors=True)
        assert not left, f"chromium/chromedriver processes survived:\n{describe(left)}"


def screenshots(browser, shots: Path, copy_to: Path = SCREENSHOT_COPY):
    """take(name): a PNG of the browser window in `shots`, also copied to `copy_to` (emptied of
    older PNGs first: this run's pictures only) for a human to look at."""
    shots.mkdir(parents=True, exist_ok=True)
    copy_to.mkdir(parents=True, exist_ok=True)
    for old in copy_to.glob("*.png"):
        old.unlink(missing_ok=True)

    def take(name: str) -> Path:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"screenshot {path} failed"
        shutil.copy2(path, copy_to / path.name)
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


# --------------------------------------------------------------------------------------
# What a page shows
# --------------------------------------------------------------------------------------


def page_lines(driver) -> set[str]:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        text = driver.find_element("tag name", "body").text
    except (StaleElementReferenceException, WebDriverException):
        return set()
    return {" ".join(line.split()) for line in text.splitlines()}


def wait(driver, what: str, condition, timeout: float = UI_TIMEOUT_S):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} on {driver.current_url}; "
                             f"page text: {sorted(page_lines(driver))[:80]}") from None


def wait_for_lines(driver, lines: list[str], timeout: float = UI_TIMEOUT_S) -> None:
    wait(driver, f"text {lines}", lambda d: set(lines) <= page_lines(d), timeout)


def dismiss_dialogs(driver) -> None:
    """The webserver's one-time "Join the Dagster community" dialog, should it show anyway."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//*[@role='dialog']//button[normalize-space()='Skip']"):
        with contextlib.suppress(Exception):
            if button.is_displayed():
                button.click()


def latest_materialization_shown(driver) -> bool:
    """The asset page's status block has loaded: "Latest materialization" then e.g. "a minute ago"."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        lines = [" ".join(line.split()) for line in driver.find_element("tag name", "body").text.splitlines()]
    except (StaleElementReferenceException, WebDriverException):
        return False
    return any(a == "Latest materialization" and b.endswith(" ago") for a, b in zip(lines, lines[1:]))


def key_text(key: tuple[str, ...]) -> str:
    return " / ".join(key)  # how the catalog writes a multi-part key: "raw / qa"


# --------------------------------------------------------------------------------------
# An asset page's metadata, as the UI writes the values of a materialization record
# --------------------------------------------------------------------------------------


def js_number(x: float | int) -> str:
    """A number as the UI writes it (JavaScript's String(n)): 1.0 -> "1", 3.2e-05 -> "0.000032"."""
    text = repr(float(x)) if isinstance(x, float) else str(x)
    if isinstance(x, float) and "e" in text and 1e-6 <= abs(x) < 1e21:  # JS writes these in full
        text = format(Decimal(text), "f")
    elif "e" in text:  # JS: 1e-7, 1.5e+21 (Python: 1e-07, 1.5e+21)
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{'+' if int(exp) > 0 else '-'}{abs(int(exp))}"
    if "." in text and "e" not in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def metadata_value(driver, name: str):
    """The value cell of metadata row `name` on the open asset page (waits for it)."""
    from selenium.webdriver.common.by import By

    xpath = f"//tr[td[1][normalize-space()='{name}']]/td[2]"
    return wait(driver, f"the metadata row {name!r}", lambda d: d.find_elements(By.XPATH, xpath))[0]


def table_cells(cell) -> list[list[str]]:
    """The body rows of the table shown in a metadata cell, as the texts of their cells."""
    from selenium.webdriver.common.by import By

    return [[" ".join(td.text.split()) for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in cell.find_elements(By.XPATH, ".//table//tr[td]")]


def table_record_cells(value) -> list[list[str]]:
    """A TableMetadataValue's records as the UI writes their cells (columns in schema order)."""
    names = [c.name for c in value.schema.columns]

    def text(v) -> str:
        return "" if v is None else js_number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return [[text(r.data.get(n)) for n in names] for r in value.records]


def markdown_image(driver, name: str) -> tuple[str, str, int]:
    """Opens metadata row `name`'s "[Show Markdown]" dialog: (alt, src, naturalWidth) of its <img>;
    closes the dialog again."""
    from selenium.webdriver.common.by import By

    link = metadata_value(driver, name).find_element(By.XPATH, ".//a[normalize-space()='[Show Markdown]']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
    link.click()
    xpath = f"//*[@role='dialog'][.//*[normalize-space(text())='{name}']]//img"
    img = wait(driver, f"the image of {name!r} in its dialog",
               lambda d: [i for i in d.find_elements(By.XPATH, xpath) if i.get_property("complete")])[0]
    shown = (img.get_attribute("alt"), img.get_attribute("src"), img.get_property("naturalWidth"))
    img.find_element(By.XPATH, "./ancestor::*[@role='dialog'][1]//button[normalize-space()='Close']").click()
    wait(driver, f"the dialog of {name!r} closed", lambda d: not d.find_elements(By.XPATH, xpath), timeout=10)
    return shown


def markdown_image_source(md: str) -> tuple[str, str]:
    """(alt, src) of the one image of a markdown string `![alt](src)`."""
    found = re.fullmatch(r"\s*!\[([^\]]*)\]\(([^)\s]+)\)\s*", md)
    assert found, f"not one markdown image: {md[:120]!r}"
    return found.group(1), found.group(2)


def upstream_shown(driver) -> set[str]:
    """The asset overview's "Upstream assets" (its Lineage block) as asset key strings (a/b); none
    while it loads."""
    from urllib.parse import unquote, urlparse

    from selenium.webdriver.common.by import By

    xpath = ("//*[normalize-space(text())='Upstream assets']/following-sibling::*[1]"
             "//a[contains(@href, '/assets/')]")
    links = driver.find_elements(By.XPATH, xpath)
    return {unquote(urlparse(a.get_attribute("href")).path).split("/assets/", 1)[1].strip("/") for a in links}


def check_metadata_shown(driver, name: str, value) -> None:
    """Metadata row `name` of the open asset page shows `value` (a materialization record's) as the
    UI writes it: a number or text as such, a table's rows cell by cell, a markdown image as an
    <img> of the record's picture (opened from "[Show Markdown]", decoded by the browser)."""
    import dagster as dg

    cell = metadata_value(driver, name)
    if isinstance(value, dg.TableMetadataValue):
        assert table_cells(cell) == table_record_cells(value), f"{name}: {table_cells(cell)}"
    elif isinstance(value, dg.MarkdownMetadataValue):
        alt, src, width = markdown_image(driver, name)
        assert (alt, src) == markdown_image_source(value.value), f"{name}: <img alt={alt!r} src={src[:60]!r}...>"
        assert width > 0, f"{name}: the browser could not decode the image"
    elif isinstance(value, (dg.FloatMetadataValue, dg.IntMetadataValue)):
        assert cell.text.strip() == js_number(value.value), f"{name}: shows {cell.text!r}, record {value.value!r}"
    elif isinstance(value, (dg.TextMetadataValue, dg.PathMetadataValue)):
        assert " ".join(cell.text.split()) == " ".join(str(value.value).split()), f"{name}: {cell.text!r}"
    else:
        raise AssertionError(f"{name}: no check for {type(value).__name__}")
