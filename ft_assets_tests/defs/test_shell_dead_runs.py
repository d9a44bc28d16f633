"""A killed run never wedges README's shell path (issue 31), and the reaper judges and signals only
what is its own. The slow tests run README's "Or from the shell" steps as written: `python -c
"...ensure_instance()"` writes the persistent instance (gpu pool limit 1) under a DAGSTER_HOME of
their own, then `dagster asset materialize -m ft_assets.definitions ...` commands, no daemon; the
others drive `reap_dead_runs` on that same kind of instance with real processes."""

from __future__ import annotations

import dataclasses
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ft_assets.defs import runs
from ft_assets.defs.runs import CHILDREN_TAG, WORKER_TAG, Proc, held_slots, reap_dead_runs
from ft_assets_tests.conftest import REPO, make_recipe, qa_rows, write_jsonl
from ft_assets_tests.defs.test_dead_runs import _noop_job, sleeper

DAGSTER = Path(sys.executable).with_name("dagster")
DEAD_PID = 2**22 + 7  # a pid no process has (above the kernel's pid_max)
RUN_MARKER_ENV = "FT_ASSETS_RUN"  # what a run's processes carry (runs.RUN_MARKER_ENV): its id, or its launch id


# --------------------------------------------------------------------------------------
# who is ours to judge, what we signal (fast)
# --------------------------------------------------------------------------------------


@pytest.fixture
def instance(tmp_path, monkeypatch) -> dg.DagsterInstance:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    from ft_assets.demo import ensure_instance

    return ensure_instance(tmp_path)


def started_run(instance: dg.DagsterInstance, tags: dict[str, str]) -> str:
    run = instance.create_run_for_job(job_def=_noop_job(), tags=tags)
    instance.handle_run_event(run.run_id, dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value,
                                                          job_name=run.job_name))
    return run.run_id


def test_a_worker_record_names_its_boot_and_pid_namespace_and_only_ours_are_judged(instance):
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    pidns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    me = Proc.of()
    assert boot in me.tag() and pidns.split("[")[1].rstrip("]") in me.tag()
    assert Proc.parse(me.tag()) == me and me.alive() is True
    dead_here = dataclasses.replace(me, pid=DEAD_PID)
    ids = {name: started_run(instance, {WORKER_TAG: tag}) for name, tag in (
        ("dead_here", dead_here.tag()),
        ("other_pid_namespace", dataclasses.replace(dead_here, pidns="4026599999").tag()),
        ("other_boot", dataclasses.replace(dead_here, boot="00000000-0000-4000-8000-000000000000").tag()),
        ("old_three_part_tag", f"{me.host}:{DEAD_PID}:1.00"))}  # what workers before this change wrote
    reaped = {d.run_id for d in reap_dead_runs(instance)}
    assert reaped == {ids["dead_here"], ids["old_three_part_tag"]}
    other = Proc.parse(instance.get_run_by_id(ids["other_pid_namespace"]).tags[WORKER_TAG])
    assert other.alive() is None and "another pid namespace" in other.describe()


def test_a_live_worker_in_another_pid_namespace_on_this_host_is_not_reaped(instance):
    """Two containers with one host name: the other's worker is pid 1 of its namespace, and our
    pid 1 is some other process: judged from here, it would look gone (pid reused)."""
    code = ("import time; from ft_assets.defs.runs import worker_tags, WORKER_TAG; "
            "print(worker_tags()[WORKER_TAG], flush=True); time.sleep(600)")
    cmd = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([worker.stdout], [], [], 60)
        tag = worker.stdout.readline().strip() if ready else ""
        if not tag:
            pytest.skip(f"no pid namespace here (unshare: {worker.stderr.read() if worker.poll() is not None else ''})")
        assert Proc.parse(tag).pid == 1 and Proc.parse(tag).host == Proc.of().host, tag
        run_id = started_run(instance, {WORKER_TAG: tag})
        assert not reap_dead_runs(instance)
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # unshare and the namespace's pid 1
        except ProcessLookupError:
            pass
        worker.wait(timeout=30)


def test_the_reaper_signals_only_processes_that_carry_the_dead_runs_marker(instance):
    assert runs.RUN_MARKER_ENV == RUN_MARKER_ENV
    run_id = started_run(instance, {WORKER_TAG: dataclasses.replace(Proc.of(), pid=DEAD_PID).tag()})
    ours = sleeper({**os.environ, RUN_MARKER_ENV: run_id})  # what the dead worker started
    unrelated = sleeper({k: v for k, v in os.environ.items() if k != RUN_MARKER_ENV})
    other_run = sleeper({**os.environ, RUN_MARKER_ENV: "another-run"})
    try:
        # a forged (or stale) children record that names processes the run never started
        instance.add_run_tags(run_id, {CHILDREN_TAG: " ".join(Proc.of(p.pid).tag() for p in (ours, unrelated, other_run))})
        (dead,) = reap_dead_runs(instance)
        assert dead.run_id == run_id and dead.stopped == [ours.pid]
        assert ours.poll() is not None  # SIGTERMed, and gone (the reaper waited for it)
        time.sleep(0.5)
        assert unrelated.poll() is None and other_run.poll() is None  # never signalled
        assert "left alone" in dead.message and str(unrelated.pid) in dead.message and str(other_run.pid) in dead.message
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        for p in (ours, unrelated, other_run):
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------
# README's shell path (slow: real dagster commands)
# --------------------------------------------------------------------------------------


class Command:
    """One `dagster`/`python` process in a session of its own; output collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._done = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
        self._done.put(True)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None and not self._done.empty():  # exited, all its output read
                raise AssertionError(f"exited {self.proc.returncode} without {text!r}:\n{self.output()}")
            assert time.time() < deadline, f"no line with {text!r} within {timeout}s:\n{self.output()}"
            time.sleep(0.1)

    def finish(self, timeout: float, wedged_after: float = 60) -> int:
        """The exit status; fails if it runs past `timeout`, or waits on a pool for `wedged_after`."""
        deadline = time.time() + timeout
        blocked_since = None
        while self.proc.poll() is None:
            if blocked_since is None and any("blocked by limit for pool" in line for line in self.lines):
                blocked_since = time.time()
            wedged = blocked_since is not None and time.time() - blocked_since > wedged_after
            assert not wedged and time.time() < deadline, (
                f"still running after {time.time() - self.started:.0f}s"
                f"{f', blocked on a pool for {wedged_after:.0f}s' if wedged else ''}:\n{self.output()}")
            time.sleep(0.2)
        self._done.get(timeout=30)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Shell:
    """README's variables, and its commands."""

    def __init__(self, recipe: Path, home: Path):
        self.home = home
        self.env = {**os.environ, "FT_RECIPE": str(recipe), "FT_HOME": str(home),
                    "DAGSTER_HOME": str(home / "dagster"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop(RUN_MARKER_ENV, None)
        self.commands: list[Command] = []

    def run(self, *argv: str) -> Command:
        self.commands.append(Command(list(argv), self.env))
        return self.commands[-1]

    def materialize(self, select: str, partition: str | None = None) -> Command:
        return self.run(str(DAGSTER), "asset", "materialize", "-m", "ft_assets.definitions", "--select", select,
                        *(["--partition", partition] if partition else []))

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home / "dagster"))

    def adapter_run(self, partition: str) -> dg.DagsterRun:
        (run,) = [r for r in self.instance().get_runs() if r.tags.get("dagster/partition") == partition]
        return run


@pytest.fixture(scope="module")
def shell(tiny_model_dir, tmp_path_factory):
    """A project whose lora trains long enough to be killed mid-training (checkpoints every 5 steps)
    and whose lora_b is short; README's first two commands already run."""
    root = tmp_path_factory.mktemp("shell_dead_runs")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "qa.jsonl", qa_rows())
    recipe = make_recipe(tiny_model_dir, quantization={"method": "none"})
    lora = recipe["methods"]["lora"]
    recipe["methods"] = {"lora": {**lora, "training": {"max_steps": 40}},
                         "lora_b": {**lora, "type": "lora", "training": {"max_steps": 6}}}
    recipe["training"].update({"epochs": 1000, "checkpoint_every": 5})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    sh = Shell(root / "recipe.yaml", root / "ft_home")
    try:
        assert sh.run(sys.executable, "-c", "from ft_assets.demo import ensure_instance; ensure_instance()"
                      ).finish(120) == 0, sh.commands[-1].output()
        first = sh.materialize("base_model,sft_dataset")
        assert first.finish(300) == 0, first.output()
        assert sh.instance().get_concurrency_config().pool_config.default_pool_limit == 1
        yield sh
    finally:
        for c in sh.commands:
            c.stop()


def checkpointed_step(home: Path, method: str) -> int:
    ckpts = home / "checkpoints" / "adapter" / method
    return max((int(p.name.removeprefix("step-")) for p in ckpts.glob("*/step-*")), default=0)


def marked_descendants(pid: int, run_id: str) -> list[int]:
    """The processes under `pid` whose environment names the run."""
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.environ().get(RUN_MARKER_ENV) == run_id:
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_kill_9_mid_training_then_the_same_command_frees_the_dead_run_and_resumes(shell):
    victim = shell.materialize("adapter", "lora")
    deadline = time.time() + 300
    while checkpointed_step(shell.home, "lora") < 5:  # training, the gpu slot claimed
        assert time.time() < deadline and victim.proc.poll() is None, victim.output()
        time.sleep(0.05)
    dead = shell.adapter_run("lora")
    marked = marked_descendants(victim.proc.pid, dead.run_id)  # the step process, which trains
    os.killpg(victim.proc.pid, signal.SIGKILL)  # kill -9: no handler runs, the slot stays claimed
    victim.proc.wait(timeout=30)
    assert shell.adapter_run("lora").status == dg.DagsterRunStatus.STARTED
    assert held_slots(shell.instance()) == {dead.run_id: [("gpu", "adapter")]}

    again = shell.materialize("adapter", "lora")
    rc = again.finish(300)
    out = again.output()
    assert rc == 0, out
    print(f"the same command again: done in {time.time() - again.started:.0f}s")
    freed = [line for line in again.lines if f"run {dead.run_id}: ft_assets: the run worker" in line]
    assert freed, out  # it names the dead run it freed
    print(freed[0])
    assert "resumed from checkpoint at step" in out
    assert shell.instance().get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    assert not held_slots(shell.instance())
    assert marked, "the run's step processes carry its marker"


@pytest.mark.slow
def test_a_step_waiting_on_the_pool_hears_who_holds_it_and_a_holder_that_dies_is_freed(shell):
    instance = shell.instance()
    holder = started_run(instance, {WORKER_TAG: Proc.of().tag()})  # a live run (this process) holding the gpu
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")
    assert storage.claim_concurrency_slot("gpu", holder, "adapter").is_claimed
    waiter = shell.materialize("adapter", "lora_b")
    waiter.wait_for(f"held by run {holder} (step adapter, STARTED, worker pid {os.getpid()}", timeout=180)
    assert "(alive)" in next(line for line in waiter.lines if "held by run" in line)
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.STARTED  # alive: untouched

    instance.add_run_tags(holder, {WORKER_TAG: dataclasses.replace(Proc.of(), pid=DEAD_PID).tag()})  # it dies
    died = time.time()
    waiter.wait_for(f"run {holder}: ft_assets: the run worker", timeout=60)
    freed_after = time.time() - died
    assert waiter.finish(300) == 0, waiter.output()
    print(f"waiting command unblocked {freed_after:.1f}s after its holder died")
    assert freed_after < 15
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE
