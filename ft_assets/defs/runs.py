"""Run workers, and what happens when one dies without telling Dagster (kill -9, OOM killer, a lost node).

Records. Every run ft_assets launches carries the run tag `ft_assets/worker` = "host:pid:start:boot:pidns"
of the process executing it: the `materialize_graph` caller for its in-process runs (demo, tests),
the run worker for every other run (`worker_executor`, which Definitions use: the UI, schedules,
sensors and `dagster asset materialize`, README's shell path). `ft_assets/children` lists the
processes the worker started (step processes, training workers) as "host:pid:start", so that a dead
worker's orphans can be stopped. What identifies a worker: its host name, pid and start time (a
reused pid never looks alive), the kernel's boot id and the pid namespace its pid is numbered in
(/proc/self/ns/pid), so that containers sharing a host name, and a rebooted host, never judge each
other's workers. Tags written before boot and namespace were recorded ("host:pid:start") are
judged by host name alone, as they were.

Marker. While a worker executes a run, it exports RUN_MARKER_ENV = the run's id (for an in-process
launch, whose run id is not known before it starts: its LAUNCH_TAG id); the step processes,
training workers and torchrun ranks it starts inherit it. The reaper signals only processes whose
environment (/proc/<pid>/environ) carries that exact value: anyone who can write run tags can name
any pid in `ft_assets/children`, and a pid named there without the marker is left alone and named
in the run's failure message.

Dead runs. `reap_dead_runs(instance)`: an unfinished run whose worker is ours to judge (this host,
boot and pid namespace) and gone has its marked orphans stopped (SIGTERM: training checkpoints and
exits; SIGKILL after a grace period), is reported failed with the reason (`report_run_failed`), and
has its pool slots and queued claims freed (`free_concurrency_slots_for_run`, what the UI's "free
concurrency slots" does); a finished run still holding slots is freed too. Never touched: a run
whose worker is alive, not ours to judge, or not recorded (launched by something else; free those
in the UI). It runs before every run a worker executes (`worker_executor`) and before every
`materialize_graph`, so the same command after a crash starts at once; every WATCH_INTERVAL_S while
a step of a run waits on a pool (`PoolWatch`, in both); and in the `ft_assets_dead_runs` sensor
(the daemon, `make ui`).

Blocked steps. A step queued on a pool for more than BLOCKED_AFTER_S gets one message in its run's
log (also on the console of `dagster asset materialize` and of in-process runs) naming the run
that holds the slot, whether that run's worker is alive, and the command that frees it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import dagster as dg
import psutil

WORKER_TAG = "ft_assets/worker"
CHILDREN_TAG = "ft_assets/children"
LAUNCH_TAG = "ft_assets/launch"
BLOCKED_AFTER_S = 10.0  # a step queued longer than this gets told who holds its pool
WATCH_INTERVAL_S = 2.0  # how often a run's worker records its children and, while it waits, looks for dead holders
STOP_GRACE_S = 30.0  # SIGTERM, then this long for a checkpoint, then SIGKILL
UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
FREE_COMMAND = "python -m ft_assets runs --reap"
# What a run's step processes have imported before they fork (worker_executor): the definitions, and
# the model stack nearly every step loads (~6 CPU-s a step otherwise; ../shared/NOTES.md).
STEP_PRELOAD = ("ft_assets.definitions", "transformers.modeling_utils", "peft", "datasets")
RUN_MARKER_ENV = "FT_ASSETS_RUN"  # in a run's processes: its run id (in-process launches: its launch id)
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_RECORD = re.compile(r"(?P<host>.+):(?P<pid>\d+):(?P<started>\d+(?:\.\d+)?)(?::(?P<boot>[0-9a-f-]*):(?P<pidns>\d*))?")


def _boot_id() -> str:
    """This kernel's boot id ("" where there is none to read)."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """The pid namespace this process numbers pids in: the inode of /proc/self/ns/pid ("" without one)."""
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")  # "pid:[4026531836]"
    except OSError:
        return ""


@dataclass(frozen=True)
class Proc:
    """A process, identified across pid reuse by its start time, and across containers and reboots by
    the boot id and the pid namespace its pid is numbered in ("": not recorded, judged by host)."""

    host: str
    pid: int
    started: float
    boot: str = ""
    pidns: str = ""

    @classmethod
    def of(cls, pid: int | None = None) -> Proc | None:
        """This process, or the process `pid` as this one sees it (its pid is numbered in our namespace)."""
        try:
            p = psutil.Process(pid)
            return cls(socket.gethostname(), p.pid, round(p.create_time(), 2), _boot_id(), _pid_namespace())
        except psutil.Error:
            return None

    def tag(self, namespaced: bool = True) -> str:
        plain = f"{self.host}:{self.pid}:{self.started:.2f}"
        return f"{plain}:{self.boot}:{self.pidns}" if namespaced and (self.boot or self.pidns) else plain

    @classmethod
    def parse(cls, text: str | None) -> Proc | None:
        """A record written by `tag` (either form); None for anything else."""
        m = _RECORD.fullmatch(text or "")
        if m is None:
            return None
        return cls(m["host"], int(m["pid"]), float(m["started"]), m["boot"] or "", m["pidns"] or "")

    def foreign(self) -> str | None:
        """Why this process is not ours to judge (None: it is)."""
        if self.host != socket.gethostname():
            return "on another host"
        if self.boot and self.boot != _boot_id():
            return "from another boot id"  # another machine, or before a reboot
        if self.pidns and self.pidns != _pid_namespace():
            return "in another pid namespace"
        return None

    @property
    def local(self) -> bool:
        return self.foreign() is None

    def alive(self) -> bool | None:
        """True/False where ours to judge (this host, boot and pid namespace); None elsewhere."""
        if not self.local:
            return None
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.started) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        alive = self.alive()
        state = f"{self.foreign()}, not checked" if alive is None else "alive" if alive else "gone"
        return f"pid {self.pid} on {self.host} ({state})"


def worker_tags() -> dict[str, str]:
    """The tags of a run this process executes (as its run worker, or in-process)."""
    me = Proc.of()
    return {WORKER_TAG: me.tag()} if me else {}


def _children_tag() -> str:
    """This process's descendants, as a tag value (short records: judged only once their worker is)."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return ""
    return " ".join(p.tag(namespaced=False) for p in (Proc.of(k.pid) for k in kids) if p is not None)


def _record_children(instance: dg.DagsterInstance, run_id: str, last: str) -> str:
    now = _children_tag()
    if now and now != last:
        instance.add_run_tags(run_id, {CHILDREN_TAG: now})
    return now or last


# --------------------------------------------------------------------------------------
# the run worker of launched runs (UI, schedules, sensors)
# --------------------------------------------------------------------------------------


class _RecordingExecutor(dg.Executor):
    """Dagster's multiprocess executor, plus the worker record, the marker, reaping and a `PoolWatch`."""

    def __init__(self, inner: dg.Executor):
        self._inner = inner

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator:
        instance, run_id = plan_context.instance, plan_context.run_id
        instance.add_run_tags(run_id, worker_tags())

        def say(message: str) -> None:  # the run's log, and the console it runs on
            plan_context.log.warning(message)

        try:  # a run killed earlier must not hold a pool this run waits on
            reap_dead_runs(instance, say)
        except Exception as exc:  # never fail the run for it; the watch and the sensor look again
            say(f"[runs] looking for dead runs failed: {type(exc).__name__}: {exc}")
        with PoolWatch(instance, None, say, run_id=run_id, explain_in_log=False):
            yield from self._inner.execute(plan_context, execution_plan)


@dg.executor(name="multiprocess", config_schema=dg.multiprocess_executor.config_schema,
             requirements=dg.multiple_process_executor_requirements())
def worker_executor(init_context):
    """Dagster's default executor (one process per step), recording its worker and reaping dead runs.
    Its steps start from a forkserver that has imported ft_assets and the model stack once per run
    (`STEP_PRELOAD`), unless the run's config names a `start_method`: under Dagster's default (spawn)
    every step process imports torch, transformers and peft again (~10 CPU-s each on this machine)."""
    config = dict(init_context.executor_config)
    if not config.get("start_method"):
        module = init_context.job.get_module() if hasattr(init_context.job, "get_module") else None
        preload = [*STEP_PRELOAD, *([module] if module and module not in STEP_PRELOAD else [])]
        config["start_method"] = {"forkserver": {"preload_modules": preload}}
    return _RecordingExecutor(dg.multiprocess_executor.executor_creation_fn(init_context._replace(executor_config=config)))


# --------------------------------------------------------------------------------------
# dead runs
# --------------------------------------------------------------------------------------


@dataclass
class DeadRun:
    run_id: str
    worker: Proc | None
    slots_freed: int
    stopped: list[int]
    message: str
    left_alone: list[int] = field(default_factory=list)  # listed by the run, alive, without its marker


def held_slots(instance: dg.DagsterInstance) -> dict[str, list[tuple[str, str]]]:
    """{run_id: [(pool, step_key), ...]} of every claimed pool slot."""
    out: dict[str, list[tuple[str, str]]] = {}
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return out
    for pool in storage.get_concurrency_keys():
        for slot in storage.get_concurrency_info(pool).claimed_slots:
            out.setdefault(slot.run_id, []).append((pool, slot.step_key))
    return out


def carries_marker(proc: psutil.Process, markers: set[str]) -> bool:
    """Whether `proc` was started for one of these runs (RUN_MARKER_ENV in its environment)."""
    try:
        return proc.environ().get(RUN_MARKER_ENV) in markers
    except psutil.Error:  # gone, or another user's: not ours to signal
        return False


def stop_processes(procs: list[Proc], markers: set[str], grace_s: float = STOP_GRACE_S) -> tuple[list[int], list[int]]:
    """SIGTERM the live local ones and their descendants that carry one of `markers` (training
    checkpoints and exits), then SIGKILL whatever is left after `grace_s`. Returns (the pids
    signalled, the live pids left alone because they do not carry it)."""
    found: dict[int, psutil.Process] = {}
    for p in procs:
        if p.alive():
            try:
                proc = psutil.Process(p.pid)
                found.update((q.pid, q) for q in (proc, *proc.children(recursive=True)))
            except psutil.Error:
                pass
    live = [proc for proc in found.values() if carries_marker(proc, markers)]
    left_alone = [pid for pid, proc in found.items() if proc not in live]
    for proc in live:
        try:
            proc.send_signal(signal.SIGTERM)  # psutil checks the start time first: never a reused pid
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(live, timeout=grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in live], left_alone


def reap_dead_runs(instance: dg.DagsterInstance, say: Callable[[str], None] = lambda _: None) -> list[DeadRun]:
    """Fail the unfinished runs whose worker (ours to judge) is gone and free their slots (see module doc)."""
    reaped = []
    holding = held_slots(instance)
    for record in instance.get_run_records(dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        worker = Proc.parse(run.tags.get(WORKER_TAG))
        if worker is None or worker.alive() is not False:
            continue
        orphans = [p for p in map(Proc.parse, run.tags.get(CHILDREN_TAG, "").split()) if p is not None]
        stopped, left_alone = stop_processes(orphans, {run.run_id, run.tags.get(LAUNCH_TAG)} - {None, ""})
        slots = holding.get(run.run_id, [])
        unmarked = f"; left alone {left_alone}: listed in its {CHILDREN_TAG} tag, but without its marker"
        message = (f"ft_assets: the run worker ({worker.pid} on {worker.host}) is gone: killed or crashed without "
                   f"reporting. Marked failed; {len(slots)} pool slot(s) freed"
                   f"{f' ({_slots_text(slots)})' if slots else ''}"
                   f"{f'; stopped the processes it left: {stopped}' if stopped else ''}"
                   f"{unmarked if left_alone else ''}. "
                   "Materialize again: training resumes from its newest checkpoint.")
        instance.report_run_failed(run, message=message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(f"[runs] run {run.run_id}: {message}")
        reaped.append(DeadRun(run.run_id, worker, len(slots), stopped, message, left_alone))
    for run_id, slots in holding.items():  # ended runs whose slots were never given back
        run = instance.get_run_by_id(run_id)
        if run is None or not run.is_finished or run_id in {r.run_id for r in reaped}:
            continue
        worker = Proc.parse(run.tags.get(WORKER_TAG))
        if worker is not None and worker.alive():
            continue  # still winding down; it frees them itself
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        message = f"freed {len(slots)} pool slot(s) ({_slots_text(slots)}) of run {run_id}, which ended {run.status.value}"
        say(f"[runs] {message}")
        reaped.append(DeadRun(run_id, worker, len(slots), [], message))
    return reaped


def _slots_text(slots: list[tuple[str, str]]) -> str:
    return ", ".join(f"pool {pool} by step {step}" for pool, step in slots)


# --------------------------------------------------------------------------------------
# blocked steps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocked:
    run_id: str
    step_key: str
    pool: str
    waited_s: float
    explanation: str


def blocked_steps(instance: dg.DagsterInstance, run_ids: set[str] | None = None,
                  after_s: float | None = None) -> list[Blocked]:
    """Steps queued on a pool for more than `after_s` (default BLOCKED_AFTER_S), each with who holds that pool."""
    after_s = BLOCKED_AFTER_S if after_s is None else after_s
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    now = datetime.now(timezone.utc)
    out = []
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        for pending in info.pending_steps:
            if pending.assigned_timestamp is not None or (run_ids is not None and pending.run_id not in run_ids):
                continue
            enqueued = pending.enqueued_timestamp
            waited = (now - (enqueued if enqueued.tzinfo else enqueued.replace(tzinfo=timezone.utc))).total_seconds()
            if waited < after_s:
                continue
            holders = []
            for slot in info.claimed_slots:
                holder = instance.get_run_by_id(slot.run_id)
                worker = Proc.parse(holder.tags.get(WORKER_TAG)) if holder else None
                state = holder.status.value if holder else "unknown"
                who = worker.describe() if worker else "worker not recorded"
                holders.append(f"run {slot.run_id} (step {slot.step_key}, {state}, worker {who})")
            explanation = (
                f"step {pending.step_key} has waited {waited:.0f}s for pool {pool!r} (limit {info.slot_count}): "
                f"held by {'; '.join(holders) or 'no run (slots being reassigned)'}. A dead holder is freed "
                f"automatically within seconds; to free one by hand: `{FREE_COMMAND}` (dead runs only) or "
                f"`dagster instance concurrency set {pool} N` to allow more at once.")
            out.append(Blocked(pending.run_id, pending.step_key, pool, waited, explanation))
    return out


def explain_blocked(instance: dg.DagsterInstance, blocked: Blocked) -> None:
    """Put the explanation in the waiting run's own log (visible in the UI)."""
    run = instance.get_run_by_id(blocked.run_id)
    if run is not None:
        instance.report_engine_event(blocked.explanation, run, step_key=blocked.step_key)


class PoolWatch:
    """While a run executes, in its worker: the run `run_id` (`worker_executor`), or the in-process
    launch tagged LAUNCH_TAG = `launch_id` (`materialize_graph`). Exports the run's marker
    (RUN_MARKER_ENV) for the processes it starts; every WATCH_INTERVAL_S records the run's child
    processes and, while a step of it waits on a pool, reaps dead runs and explains (once per step)
    a step that waited BLOCKED_AFTER_S: through `say`, and (`explain_in_log`) in the run's log."""

    def __init__(self, instance: dg.DagsterInstance, launch_id: str | None, say: Callable[[str], None], *,
                 run_id: str | None = None, explain_in_log: bool = True):
        self.instance, self.launch_id, self.say = instance, launch_id, say
        self.run_id, self.explain_in_log = run_id, explain_in_log
        self._marker, self._outer_marker = run_id or launch_id or "", os.environ.get(RUN_MARKER_ENV)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ft_assets-pool-watch", daemon=True)

    def __enter__(self) -> PoolWatch:
        os.environ[RUN_MARKER_ENV] = self._marker
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._outer_marker is None:
            os.environ.pop(RUN_MARKER_ENV, None)
        else:
            os.environ[RUN_MARKER_ENV] = self._outer_marker

    def _watch(self) -> None:
        told: set[tuple[str, str]] = set()
        children, last_error = "", ""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                if self.run_id is None:
                    runs = self.instance.get_runs(dg.RunsFilter(tags={LAUNCH_TAG: self.launch_id}), limit=1)
                    self.run_id = runs[0].run_id if runs else None
                    if self.run_id is None:
                        continue
                children = _record_children(self.instance, self.run_id, children)
                if not blocked_steps(self.instance, {self.run_id}, after_s=0):
                    continue
                reap_dead_runs(self.instance, self.say)
                for b in blocked_steps(self.instance, {self.run_id}):
                    if (b.run_id, b.step_key) not in told:
                        told.add((b.run_id, b.step_key))
                        self.say(f"[runs] {b.explanation}")
                        if self.explain_in_log:
                            explain_blocked(self.instance, b)
            except Exception as exc:  # never let the watch take the run down; say (once) what went wrong
                if repr(exc) != last_error:
                    last_error = repr(exc)
                    self.say(f"[runs] pool watch: {type(exc).__name__}: {exc}")


def launch_tags() -> dict[str, str]:
    """Tags for one in-process launch: its worker (this process) and an id the watch finds it by."""
    return {**worker_tags(), LAUNCH_TAG: f"{os.getpid()}-{time.time_ns()}"}


def dead_runs_sensor() -> dg.SensorDefinition:
    """With the daemon (`make ui`): reap dead runs and explain blocked steps every 15 s."""

    @dg.sensor(name="ft_assets_dead_runs", minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Marks runs whose worker process is gone as failed and frees their pool slots; "
                           "tells a step waiting on a pool who holds it (ft_assets/defs/runs.py).")
    def dead_runs(context: dg.SensorEvaluationContext):
        reaped = reap_dead_runs(context.instance, context.log.info)
        told = set(filter(None, (context.cursor or "").split(",")))
        blocked = blocked_steps(context.instance)
        for b in blocked:
            if f"{b.run_id}/{b.step_key}" not in told:
                explain_blocked(context.instance, b)
        context.update_cursor(",".join(sorted(f"{b.run_id}/{b.step_key}" for b in blocked)))
        return dg.SkipReason(f"{len(reaped)} dead run(s) cleaned up, {len(blocked)} step(s) waiting on a pool")

    return dead_runs
