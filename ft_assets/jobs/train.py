"""`python -m ft_assets.jobs.train SPEC.json`: train one recipe method outside the Dagster process.

    TrainJob (the spec file the asset writes: the request the asset built for its trainer, the
    trainer's `kind`, and where this launch reports)  ->  every rank: join the process group
    torchrun (or Ray Train: `jobs.ray_train`) set up (`training.distributed.Ranks.from_env`), call
    the trainer's `run` with that request  ->  rank 0: save the trained files into `out_dir`,
    report the result through Dagster Pipes.

Trainers (`trainers()`, the one place that names them): `sft` (`trainers.sft`: every SFT method;
torchrun and Ray), `preference` (`trainers.preference`: DPO, ORPO, SimPO, KTO), `reward`
(`trainers.reward`: reward models) and `policy` (`trainers.policy`: GRPO), the last three over
HF Trainer's DDP, torchrun only (in the Dagster step under `launcher: ray`). Each
module offers a request dataclass (`to_json` / `from_json`), `run(request, hw, ranks=, log=,
on_log=)` returning what trained (`save(dir, ranks)`, `report()`), and `TrainedElsewhere.from_report`
for the Dagster step's side.

Contract:
- Imports `dagster_pipes`, never `dagster`. Under several processes every rank inherits the
  Pipes environment; only rank 0 opens it (one writer to the message channel). It forwards the
  step log lines and reports the whole `TrainResult` as a custom message (`result_message`),
  which the asset turns into the same metadata an in-process run gets. Without a Dagster parent
  it prints the log and writes the result beside the spec.
- The artifact: rank 0 writes the method's files and `train_log.json` into `out_dir` (beside
  the checkpoints; the asset moves them into the store); nothing else. Checkpoints go to `checkpoint_dir`, which
  every rank reads on resume (one machine, or a filesystem all nodes share).
- How a rank ended: `run_dir/rank-<r>.json` says "started" (with its pid), then "done" or
  "failed" (with the error, and whether the user can act on it). A rank that says "started"
  and no more was killed (kill -9, the out-of-memory killer): that is how the asset names it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

RESULT_MESSAGE = "ft_assets.train_result"


@dataclass(frozen=True)
class Trainer:
    """A kind of training as the launchers see it (module doc)."""

    module: Any  # trainers.sft, trainers.preference
    request: type  # its request dataclass
    launchers: frozenset[str] = frozenset({"torchrun", "ray"})  # where it runs outside the step (tested there)

    def run(self, request: dict[str, Any], hw, ranks, log: Callable[[str], None], on_log: Callable[..., None]):
        return self.module.run(self.request.from_json(request), hw, ranks=ranks, log=log, on_log=on_log)

    def received(self, staged: Path, message: dict[str, Any]):
        """Rank 0's report, on the Dagster step's side: what the asset stores."""
        return self.module.TrainedElsewhere.from_report(staged, message)


def trainers() -> dict[str, Trainer]:
    """The trainers a launch may run, by kind (imported when a launch needs them)."""
    from ..trainers import policy, preference, reward, sft

    return {"sft": Trainer(sft, sft.SftRequest),
            # HF Trainer's DDP under torchrun; inside Ray Train's workers it is untested: in the step there
            "preference": Trainer(preference, preference.PreferenceRequest, frozenset({"torchrun"})),
            "reward": Trainer(reward, reward.RewardRequest, frozenset({"torchrun"})),
            "policy": Trainer(policy, policy.PolicyRequest, frozenset({"torchrun"}))}


def kind_of(request: Any) -> str:
    """The kind of the trainer whose request `request` is."""
    found = [kind for kind, t in trainers().items() if isinstance(request, t.request)]
    if not found:
        raise TypeError(f"no trainer runs a {type(request).__name__} outside the Dagster step")
    return found[0]


@dataclass
class TrainJob:
    request: dict[str, Any]  # the trainer's request `.to_json()`, as the asset built it for an in-process run too
    out_dir: str  # rank 0 writes the trained files here
    run_dir: str  # rank-<r>.json status files
    device: str = "auto"  # compute.device; under several processes each rank takes cuda:<local rank>
    threads: int | None = None
    ray: dict[str, Any] = field(default_factory=dict)  # launcher ray: {"num_workers", "use_gpu", "cpus_per_worker"}
    launcher: dict[str, Any] = field(default_factory=dict)  # torchrun: the Dagster step's {"pid", "started", "host"}
    kind: str = "sft"  # which of `trainers()` runs `request`
    label: str = ""  # the recipe name it trains (a method, a reward model): its log lines and errors say it

    @property
    def trainer(self) -> Trainer:
        known = trainers()
        if self.kind not in known:
            raise ValueError(f"unknown trainer kind {self.kind!r}; known: {', '.join(known)}")
        return known[self.kind]

    @property
    def method(self) -> str:
        return self.label or self.request["method"]

    @property
    def checkpoint_dir(self) -> str:
        return self.request["checkpoint_dir"]

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text()))


def result_message(trained) -> dict[str, Any]:
    """What rank 0 reports: its trainer's `report()` (the result's fields, sizes)."""
    return {"kind": RESULT_MESSAGE, **trained.report()}


class RankStatus:
    """`run_dir/rank-<r>.json`: started (pid, host) -> done | failed (error, user_error)."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.path = Path(run_dir) / f"rank-{rank}.json"
        self.rank = rank

    def _write(self, **fields: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), **fields}))
        os.replace(tmp, self.path)

    def started(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(status="started")

    def done(self) -> None:
        self._write(status="done")

    def failed(self, exc: BaseException, user_error: bool) -> None:
        self._write(status="failed", error=f"{type(exc).__name__}: {exc}", user_error=user_error)


class Report:
    """Where rank 0's log lines and result go: Dagster Pipes when a Dagster step launched this
    process, else stdout and `run_dir/result.json`. Other ranks report nothing."""

    def __init__(self, pipes: Any = None, run_dir: str | Path | None = None):
        self.pipes, self.run_dir = pipes, run_dir

    def log(self, msg: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(msg)
        else:
            print(msg, flush=True)

    def error(self, msg: str) -> None:
        if self.pipes is not None:
            self.pipes.log.error(msg)

    def result(self, message: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_custom_message(message)
        elif self.run_dir is not None:
            (Path(self.run_dir) / "result.json").write_text(json.dumps(message))


class Silent(Report):
    """A rank other than 0."""

    def log(self, msg: str) -> None:
        pass

    def result(self, message: dict[str, Any]) -> None:
        pass


@contextmanager
def pipes_report(run_dir: str | Path | None) -> Iterator[Report]:
    """The Pipes context when this process runs under a Dagster step, else stdout."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield Report(None, run_dir)
        return
    with open_dagster_pipes() as pipes:
        yield Report(pipes, run_dir)


def watch_launcher(launcher: dict[str, Any], poll_s: float = 1.0) -> None:
    """If the Dagster step that started this rank dies (kill -9 of its run worker, the OOM killer),
    this rank asks itself to stop: SIGTERM, so the loop stops every rank after the same step with
    a checkpoint and exits, and the checkpoint lock is free for the rerun. torchrun starts ranks in
    sessions of their own: nothing else would stop them. Only ranks on the step's machine watch
    (the others stop with them)."""
    if not launcher or launcher.get("host") != socket.gethostname():
        return
    import psutil

    def alive() -> bool:
        try:
            return psutil.Process(launcher["pid"]).create_time() == launcher["started"]
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run(job: TrainJob, report_for: Callable[[TrainJob], ContextManager[Report]] = lambda job: pipes_report(job.run_dir)
        ) -> int:
    """Train `job` as this process's rank; 0 when done. `report_for(job)` opens rank 0's report
    (torchrun: rank 0 opens Pipes itself; Ray: a queue to the job's driver, `jobs.ray_train`)."""
    from ..training import loop as train
    from ..trainers import sft
    from ..models.device import resolve
    from ..training.distributed import Ranks
    from ..training.preemption import CheckpointBusy

    hw = resolve(job.device, job.threads)
    ranks = Ranks.from_env(hw.device)
    status = RankStatus(job.run_dir, ranks.rank)
    status.started()
    watch_launcher(job.launcher)
    try:
        with report_for(job) if ranks.is_main else nullcontext(Silent()) as report:
            log = report.log
            if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
                log(f"{job.method}: rank {ranks.rank} of {ranks.world_size}: "
                    f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
            try:
                tuned = job.trainer.run(job.request, hw, ranks, log=lambda m: log(f"{job.method}: {m}"),
                                        on_log=lambda step, loss, **_: log(f"step {step}: loss {loss:.4f}"))
                Path(job.out_dir).mkdir(parents=True, exist_ok=True)
                tuned.save(Path(job.out_dir), ranks)
                report.result(result_message(tuned))
                ranks.barrier()
            except Exception as exc:
                user = isinstance(exc, (sft.TrainingFailed, train.TrainingDiverged, CheckpointBusy, ValueError))
                status.failed(exc, user_error=user)
                report.error(f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                return 1
        status.done()
        return 0
    finally:
        ranks.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ft_assets.jobs.train SPEC.json", file=sys.stderr)
        return 2
    return run(TrainJob.read(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
