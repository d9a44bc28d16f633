"""Run workers, and what happens when one dies without telling Dagster (kill -9, OOM killer, a lost node).

Records. Every run ft_assets launches carries the run tag `ft_assets/worker` = "host:pid:start"
of the process executing it: the `materialize_graph` caller for its in-process runs (demo, CLI,
tests), the run worker for runs the UI, schedules and sensors launch (`worker_executor`, which
Definitions use). `ft_assets/children` lists the processes the worker started (step processes,
training workers) so that a dead worker's orphans can be stopped. The start time makes a reused
pid never look alive.

Dead runs. `reap_dead_runs(instance)`: an unfinished run whose worker is on this host and gone
has its orphans stopped (SIGTERM: training checkpoints and exits; SIGKILL after a grace period),
is reported failed with the reason (`report_run_failed`), and has its pool slots and queued claims
freed (`free_concurrency_slots_for_run`, what the UI's "free concurrency slots" does); a finished
run still holding slots is freed too. Never touched: a run whose worker is alive, on another host,
or not recorded (launched by something else; free those in the UI). It runs before every
`materialize_graph` (so `make demo` after a crash starts at once), every WATCH_INTERVAL_S while a
launched run waits on a pool (`PoolWatch`), and in the `ft_assets_dead_runs` sensor (the daemon, `make ui`).

Blocked steps. A step queued on a pool for more than BLOCKED_AFTER_S gets one engine event in its
run's log (and a line on the console for in-process runs) naming the run that holds the slot,
whether that run's worker is alive, and the command that frees it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import dagster as dg
import psutil

WORKER_TAG = "ft_assets/worker"
CHILDREN_TAG = "ft_assets/children"
LAUNCH_TAG = "ft_assets/launch"
BLOCKED_AFTER_S = 10.0  # a step queued longer than this gets told who holds its pool
WATCH_INTERVAL_S = 2.0  # how often a waiting in-process launch looks for dead holders
STOP_GRACE_S = 30.0  # SIGTERM, then this long for a checkpoint, then SIGKILL
UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
FREE_COMMAND = "python -m ft_assets runs --reap"


@dataclass(frozen=True)
class Proc:
    """A process, identified across pid reuse by its start time."""

    host: str
    pid: int
    started: float

    @classmethod
    def of(cls, pid: int | None = None) -> Proc | None:
        try:
            p = psutil.Process(pid)
            return cls(socket.gethostname(), p.pid, round(p.create_time(), 2))
        except psutil.Error:
            return None

    def tag(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @classmethod
    def parse(cls, text: str | None) -> Proc | None:
        try:
            host, pid, started = (text or "").rsplit(":", 2)
            return cls(host, int(pid), float(started))
        except ValueError:
            return None

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True/False on this host; None elsewhere (not ours to judge)."""
        if not self.local:
            return None
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.started) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        state = {True: "alive", False: "gone", None: "on another host, not checked"}[self.alive()]
        return f"pid {self.pid} on {self.host} ({state})"


def worker_tags() -> dict[str, str]:
    """The tags of a run this process executes in-process."""
    me = Proc.of()
    return {WORKER_TAG: me.tag()} if me else {}


def _children_tag() -> str:
    """This process's descendants, as a tag value."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return ""
    return " ".join(p.tag() for p in (Proc.of(k.pid) for k in kids) if p is not None)


def _record_children(instance: dg.DagsterInstance, run_id: str, last: str) -> str:
    now = _children_tag()
    if now and now != last:
        instance.add_run_tags(run_id, {CHILDREN_TAG: now})
    return now or last


# --------------------------------------------------------------------------------------
# the run worker of launched runs (UI, schedules, sensors)
# --------------------------------------------------------------------------------------


class _RecordingExecutor(dg.Executor):
    """Dagster's multiprocess executor, plus the worker and children records above."""

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
        children, checked = "", 0.0
        for event in self._inner.execute(plan_context, execution_plan):
            if time.monotonic() - checked > 1.0:  # step processes start between events
                children, checked = _record_children(instance, run_id, children), time.monotonic()
            yield event


@dg.executor(name="multiprocess", config_schema=dg.multiprocess_executor.config_schema,
             requirements=dg.multiple_process_executor_requirements())
def worker_executor(init_context):
    """Dagster's default executor for launched runs (one process per step), recording its worker."""
    return _RecordingExecutor(dg.multiprocess_executor.executor_creation_fn(init_context))


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


def stop_processes(procs: list[Proc], grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM the live local ones and their descendants (training checkpoints and exits), then
    SIGKILL whatever is left after `grace_s`. Returns the pids signalled."""
    live = []
    for p in procs:
        if p.alive():
            try:
                proc = psutil.Process(p.pid)
                live += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
    for proc in live:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(live, timeout=grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in live]


def reap_dead_runs(instance: dg.DagsterInstance, say: Callable[[str], None] = lambda _: None) -> list[DeadRun]:
    """Fail the unfinished runs whose local worker is gone and free their slots (see module doc)."""
    reaped = []
    holding = held_slots(instance)
    for record in instance.get_run_records(dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        worker = Proc.parse(run.tags.get(WORKER_TAG))
        if worker is None or worker.alive() is not False:
            continue
        orphans = [p for p in map(Proc.parse, run.tags.get(CHILDREN_TAG, "").split()) if p is not None]
        stopped = stop_processes(orphans)
        slots = holding.get(run.run_id, [])
        message = (f"ft_assets: the run worker ({worker.pid} on {worker.host}) is gone: killed or crashed without "
                   f"reporting. Marked failed; {len(slots)} pool slot(s) freed"
                   f"{f' ({_slots_text(slots)})' if slots else ''}"
                   f"{f'; stopped the processes it left: {stopped}' if stopped else ''}. "
                   "Materialize again: training resumes from its newest checkpoint.")
        instance.report_run_failed(run, message=message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(f"[runs] run {run.run_id}: {message}")
        reaped.append(DeadRun(run.run_id, worker, len(slots), stopped, message))
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
    """While `materialize_graph` runs one in-process launch (tag LAUNCH_TAG = launch_id): every
    WATCH_INTERVAL_S, record the launch's child processes, reap dead runs, and explain (once per
    step) a step of this launch that waits on a pool."""

    def __init__(self, instance: dg.DagsterInstance, launch_id: str, say: Callable[[str], None]):
        self.instance, self.launch_id, self.say = instance, launch_id, say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ft_assets-pool-watch", daemon=True)

    def __enter__(self) -> PoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        told: set[tuple[str, str]] = set()
        children, run_id, last_error = "", None, ""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                if run_id is None:
                    runs = self.instance.get_runs(dg.RunsFilter(tags={LAUNCH_TAG: self.launch_id}), limit=1)
                    run_id = runs[0].run_id if runs else None
                    if run_id is None:
                        continue
                children = _record_children(self.instance, run_id, children)
                waiting = blocked_steps(self.instance, {run_id}, after_s=0)
                if not waiting:
                    continue
                reap_dead_runs(self.instance, self.say)
                for b in blocked_steps(self.instance, {run_id}):
                    if (b.run_id, b.step_key) not in told:
                        told.add((b.run_id, b.step_key))
                        self.say(f"[runs] {b.explanation}")
                        explain_blocked(self.instance, b)
            except Exception as exc:  # never let the watch take the launch down; say (once) what went wrong
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
                           "tells a step waiting on a pool who holds it (ft_assets/runs.py).")
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
