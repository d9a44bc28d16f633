"""A killed or preempted run never wedges the pipeline (issue 12). Every test here runs as users
run it: separate processes launching through `materialize_graph` (what `make demo` does) into the
persistent instance `make install` writes, with its gpu pool limit of 1."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ft_assets.demo import INSTANCE_YAML
from ft_assets_tests.conftest import make_recipe, qa_rows, write_jsonl
from ft_assets.defs import runs
from ft_assets.defs.runs import CHILDREN_TAG, WORKER_TAG, Proc, held_slots, reap_dead_runs
from ft_assets.artifacts.store import ArtifactStore

# Train one adapter partition through the launcher users run (shared assets first, in the same call).
RUNNER = textwrap.dedent("""
    import sys, dagster as dg
    from ft_assets.demo import ensure_instance, materialize_graph
    from ft_assets.definitions import build_definitions
    from ft_assets.config.recipe import load_recipe
    recipe_path, home, method = sys.argv[1:4]
    defs = build_definitions(load_recipe(recipe_path), home=home)
    targets = {(dg.AssetKey("base_model"), None), (dg.AssetKey("sft_dataset"), None), (dg.AssetKey("adapter"), method)}
    failed = materialize_graph(defs, ensure_instance(), targets)
    print("RUNNER DONE", failed, flush=True)
    sys.exit(1 if failed else 0)
""")


def recipe_file(project: Path, lora_steps: int = 40, lora_b_steps: int = 8) -> Path:
    recipe = make_recipe(project.parent / "tiny_llama", quantization={"method": "none"})
    lora = recipe["methods"]["lora"]
    recipe["methods"] = {"lora": {**lora, "training": {"max_steps": lora_steps}},
                         "lora_b": {**lora, "type": "lora", "training": {"max_steps": lora_b_steps}}}
    recipe["training"].update({"epochs": 1000, "checkpoint_every": 5, "lr": 2e-3})
    path = project / f"long-{lora_steps}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory) -> Path:
    """One project for the module (the same data and recipe give the same adapter version)."""
    root = tmp_path_factory.mktemp("dead_runs")
    shutil.copytree(tiny_model_dir, root / "tiny_llama")
    (root / "project" / "data").mkdir(parents=True)
    write_jsonl(root / "project" / "data" / "qa.jsonl", qa_rows())
    return root / "project"


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> Path:
    """An uninterrupted run of adapter[lora] (started now, awaited by the first test that needs it)."""
    home = tmp_path_factory.mktemp("reference")
    return ReferenceRun(Runner(recipe_file(project), home), home)


class ReferenceRun:
    def __init__(self, runner: "Runner", home: Path):
        self.runner, self.home = runner, home

    def adapter_home(self) -> Path:
        if self.runner.proc.returncode is None:
            assert self.runner.finish() == 0, self.runner.output()
        return self.home


class Runner:
    """One launcher process; its output is collected by a thread so a test can wait for a line."""

    def __init__(self, recipe: Path, ft_home: Path, method: str = "lora"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FT_HOME": str(ft_home), "DAGSTER_HOME": str(ft_home / "dagster")}
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(recipe), str(ft_home), method], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds until a line containing `text` appeared (fails after `timeout`)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return time.time() - self.started
            assert self.proc.poll() is None or any(text in line for line in self.lines), self.output()
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        return rc


def checkpointed_step(home: Path, method: str = "lora") -> int:
    ckpts = home / "checkpoints" / "adapter" / method
    return max((int(p.name.removeprefix("step-")) for p in ckpts.glob("*/step-*")), default=0)


def wait_for_checkpoint(runner: Runner, home: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while checkpointed_step(home) < step:
        assert time.time() < deadline and runner.proc.poll() is None, runner.output()
        time.sleep(0.05)


def instance_at(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home / "dagster"))


def adapter_weights(home: Path, method: str = "lora") -> dict[str, torch.Tensor]:
    return load_file(str(ArtifactStore(home).latest("adapter", method).dir / "adapter_model.safetensors"))


def assert_same_adapter(home: Path, ref_home: Path) -> None:
    got, want = adapter_weights(home), adapter_weights(ref_home)
    assert got.keys() == want.keys()
    for name in want:  # tolerance: 1e-6 absolute on fp32 CPU weights
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def runs_of(instance: dg.DagsterInstance) -> dict[str, dg.DagsterRun]:
    """The adapter runs, by partition."""
    return {r.tags.get("dagster/partition"): r for r in instance.get_runs() if r.tags.get("dagster/partition")}


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_at_once_on_the_pool_limited_instance(project, reference, tmp_path):
    """The user's report: kill -9 after the first checkpoint, materialize again -> blocked forever."""
    recipe = recipe_file(project)
    home = tmp_path / "home"
    victim = Runner(recipe, home)
    wait_for_checkpoint(victim, home, 10)
    os.killpg(victim.proc.pid, signal.SIGKILL)  # kill -9: no handler runs, the gpu slot stays claimed
    victim.finish()
    instance = instance_at(home)
    assert (home / "dagster" / "dagster.yaml").read_text() == INSTANCE_YAML  # pool gpu limited to 1
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    dead = runs_of(instance)["lora"]
    assert dead.status == dg.DagsterRunStatus.STARTED and dead.run_id in held_slots(instance)

    rerun = Runner(recipe, home)
    reaped_after = rerun.wait_for(f"run {dead.run_id}: ft_assets: the run worker", timeout=120)
    resumed_after = rerun.wait_for("resumed from checkpoint at step", timeout=120)
    assert rerun.finish() == 0, rerun.output()
    print(f"rerun: dead run cleaned up {reaped_after:.1f}s after start, training resumed at {resumed_after:.1f}s")
    assert "blocked" not in rerun.output().lower()

    dead = instance_at(home).get_run_by_id(dead.run_id)
    assert dead.status == dg.DagsterRunStatus.FAILURE
    assert not held_slots(instance_at(home))
    assert_same_adapter(home, reference.adapter_home())
    train = ArtifactStore(home).latest("adapter", "lora").manifest()["train"]
    assert train["resumed_from_step"] >= 10 and train["resumed_from_step"] % 5 == 0


@pytest.mark.slow
def test_two_runs_one_killed_the_other_waits_only_seconds_and_hears_who_blocks_it(project, tmp_path):
    recipe = recipe_file(project, lora_steps=100_000, lora_b_steps=8)
    home = tmp_path / "home"
    holder = Runner(recipe, home, "lora")
    wait_for_checkpoint(holder, home, 5)  # training: the gpu slot is held by a live run
    waiter = Runner(recipe, home, "lora_b")

    # the waiting run is told who holds the pool, and that the holder is alive
    holder_run = runs_of(instance_at(home))["lora"]
    waiter.wait_for(f"held by run {holder_run.run_id} (step adapter, STARTED, worker pid {holder.proc.pid}", 120)
    assert "(alive)" in next(line for line in waiter.lines if "held by run" in line)
    # a live holder is never touched: still started and holding its slot after several watch periods
    time.sleep(6)
    instance = instance_at(home)
    assert instance.get_run_by_id(holder_run.run_id).status == dg.DagsterRunStatus.STARTED
    assert holder_run.run_id in held_slots(instance)
    assert not reap_dead_runs(instance)
    assert waiter.proc.poll() is None and "RUNNER DONE" not in waiter.output()

    os.killpg(holder.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    holder.finish()
    waiter.wait_for(f"run {holder_run.run_id}: ft_assets: the run worker", 60)
    freed_after = time.time() - killed_at
    assert waiter.finish() == 0, waiter.output()
    print(f"waiting run unblocked {freed_after:.1f}s after its holder was killed")
    assert freed_after < 15  # the bound README states: a watch period (2 s) plus the first query
    assert instance_at(home).get_run_by_id(holder_run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert ArtifactStore(home).latest("adapter", "lora_b") is not None


@pytest.mark.slow
def test_signal_checkpoints_the_current_step_then_rerun_resumes_exactly_there(project, reference, tmp_path):
    """SIGTERM (what Kubernetes, Slurm and spot reclaimers send) to the launcher mid-training. SIGINT
    (Ctrl-C) takes the same path once training runs: `training.preemption.stop_requests` installs one
    handler for both (STOP_SIGNALS), which only records the signal's name, and everything after it
    (the checkpoint, `Preempted`, the failed run, "launching nothing more", the resume) reads the
    same exception. That SIGINT becomes that checkpoint and resumes exactly is proven without a
    launcher by training/test_train.py::test_a_signal_checkpoints_the_step_it_arrives_in_and_resume_continues_exactly[SIGINT]."""
    sig = signal.SIGTERM
    recipe = recipe_file(project)
    home = tmp_path / "home"
    victim = Runner(recipe, home)
    wait_for_checkpoint(victim, home, 5)
    time.sleep(0.3)  # somewhere after step 5, mid-step
    victim.proc.send_signal(sig)
    rc = victim.finish()
    out = victim.output()
    assert rc != 0, out
    line = next(l for l in out.splitlines() if f"preempted at step" in l and sig.name in l)
    step = int(line.split("preempted at step ")[1].split()[0])
    assert 5 < step < 40, line
    assert checkpointed_step(home) == step  # the checkpoint is of that step, not the last periodic one
    assert "launching nothing more" in out
    instance = instance_at(home)
    run = runs_of(instance)["lora"]
    assert run.status == dg.DagsterRunStatus.FAILURE and not held_slots(instance)
    assert run.tags.get("dagster/retry_on_asset_or_op_failure") == "true"  # the daemon's run retry may re-run it

    rerun = Runner(recipe, home)
    rerun.wait_for(f"resumed from checkpoint at step {step}", timeout=120)
    assert rerun.finish() == 0, rerun.output()
    assert_same_adapter(home, reference.adapter_home())
    assert ArtifactStore(home).latest("adapter", "lora").manifest()["train"]["resumed_from_step"] == step


# Start `sleep 600` with SIGTERM at its default action: the stand-in for a process a dead run left
# (training installs its own SIGTERM handler). Without this it would inherit this test process's
# disposition: when pytest starts with SIGINT ignored (`make test &` from a shell without job control
# ignores it) each in-process `dg.materialize` ends by copying SIGINT's disposition to SIGTERM
# (dagster._utils.interrupts), so a plain Popen'd `sleep` would ignore the reaper's SIGTERM and only
# end at its SIGKILL, STOP_GRACE_S (30 s) later. The same can happen to a user's processes started
# with SIGINT ignored (README "Not done yet"); the reaper's SIGKILL still ends them. An exec keeps
# the pid and the environment.
SLEEPER = [sys.executable, "-S", "-c",
           "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_DFL); os.execvp('sleep', ['sleep', '600'])"]


def sleeper(env: dict[str, str]) -> subprocess.Popen:
    """`sleep 600` with `env`, SIGTERM at its default action (see SLEEPER), once it runs `sleep`."""
    proc = subprocess.Popen(SLEEPER, env=env)
    status = Path(f"/proc/{proc.pid}/status")
    deadline = time.time() + 30
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"sleep\x00600\x00":  # exec'd
        assert proc.poll() is None and time.time() < deadline, "sleep did not start"
        time.sleep(0.01)
    ignored = int(next(l for l in status.read_text().splitlines() if l.startswith("SigIgn:")).split()[1], 16)
    assert not ignored & (1 << (signal.SIGTERM - 1)), "sleep ignores SIGTERM"
    return proc


def test_only_runs_whose_local_worker_is_gone_are_reaped_and_the_processes_they_left_are_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    from ft_assets.demo import ensure_instance

    instance = ensure_instance(tmp_path)
    elsewhere = Proc("some-other-host", 1, 1.0)
    gone_here = Proc(Proc.of().host, 2**22 + 7, 1.0)  # a pid no process has
    reused = Proc(Proc.of().host, os.getpid(), Proc.of().started - 100)  # this pid, but an older process's
    ids = {name: _started_run(instance, tags) for name, tags in (
        ("elsewhere", {WORKER_TAG: elsewhere.tag()}), ("unrecorded", {}), ("alive", {WORKER_TAG: Proc.of().tag()}),
        ("gone", {WORKER_TAG: gone_here.tag()}), ("pid_reused", {WORKER_TAG: reused.tag()}))}
    # what a dead worker left training (a step process, a torchrun rank): it carries the run's marker
    orphan = sleeper({**os.environ, runs.RUN_MARKER_ENV: ids["gone"]})
    instance.add_run_tags(ids["gone"], {CHILDREN_TAG: Proc.of(orphan.pid).tag()})
    reaped = {d.run_id: d for d in reap_dead_runs(instance)}
    assert set(reaped) == {ids["gone"], ids["pid_reused"]}
    status = {n: instance.get_run_by_id(r).status for n, r in ids.items()}
    assert status == {"elsewhere": dg.DagsterRunStatus.STARTED, "unrecorded": dg.DagsterRunStatus.STARTED,
                      "alive": dg.DagsterRunStatus.STARTED, "gone": dg.DagsterRunStatus.FAILURE,
                      "pid_reused": dg.DagsterRunStatus.FAILURE}
    assert reaped[ids["gone"]].stopped == [orphan.pid] and orphan.poll() is not None  # SIGTERMed, and gone


def _noop_job():
    @dg.op
    def noop():
        return None

    @dg.job
    def idle():
        noop()

    return idle


def _started(run):
    return dg.DagsterEvent(event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name)


def test_the_sensor_tells_a_waiting_run_who_holds_the_pool_then_frees_it_when_the_holder_dies(tmp_path, monkeypatch):
    """What `make ui`'s daemon does, on the instance `make install` writes (pool limit 1)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setattr(runs, "BLOCKED_AFTER_S", 0.0)
    from ft_assets.demo import ensure_instance

    instance = ensure_instance(tmp_path)
    holder, waiting = (_started_run(instance, {WORKER_TAG: Proc.of().tag()}) for _ in range(2))
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("gpu")  # as Dagster's executor does before a claim
    assert storage.get_concurrency_info("gpu").slot_count == 1
    assert storage.claim_concurrency_slot("gpu", holder, "adapter").is_claimed
    assert not storage.claim_concurrency_slot("gpu", waiting, "merged_model").is_claimed  # queued behind it
    sensor = runs.dead_runs_sensor()

    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    told = [e.message for e in instance.all_logs(waiting) if e.message and "held by run" in e.message]
    assert len(told) == 1 and f"held by run {holder} (step adapter, STARTED, worker pid {os.getpid()}" in told[0]
    assert "(alive)" in told[0] and "python -m ft_assets runs --reap" in told[0]
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.STARTED  # alive: untouched
    assert held_slots(instance) == {holder: [("gpu", "adapter")]}
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=tick.cursor))  # told once, not per tick
    assert len([e for e in instance.all_logs(waiting) if e.message and "held by run" in e.message]) == 1

    # the holder's process dies (its record now names a pid no process has)
    instance.add_run_tags(holder, {WORKER_TAG: Proc(Proc.of().host, 2**22 + 7, 1.0).tag()})
    sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=tick.cursor))
    assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE
    failure = [e.message for e in instance.all_logs(holder) if e.message and "the run worker" in e.message]
    assert failure and "is gone: killed or crashed without reporting" in failure[0] and "1 pool slot(s) freed" in failure[0]
    assert storage.claim_concurrency_slot("gpu", waiting, "merged_model").is_claimed  # the slot went to the waiting step


def _started_run(instance, tags) -> str:
    run = instance.create_run_for_job(job_def=_noop_job(), tags=tags)
    instance.handle_run_event(run.run_id, _started(run))
    return run.run_id


KEEPS_SIGTERM = """
import signal, dagster as dg
from ft_assets.demo import materialize_graph
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job without job control starts
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)  # as `make demo` sets it
@dg.asset
def one():
    return 1
with dg.instance_for_test() as instance:
    failed = materialize_graph(dg.Definitions(assets=[one]), instance, say=lambda *_: None)
print(failed, signal.getsignal(signal.SIGTERM) is stop)
"""


def test_the_demo_keeps_its_sigterm_handler_after_a_run_when_started_with_sigint_ignored():
    """Dagster ends a run by giving SIGTERM SIGINT's disposition; a `make demo &` (SIGINT ignored)
    would then ignore a plain `kill` from its first run on. materialize_graph keeps its handler."""
    out = subprocess.run([sys.executable, "-c", KEEPS_SIGTERM], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] True", out.stdout[-2000:]
