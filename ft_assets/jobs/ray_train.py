"""`python -m ft_assets.jobs.ray_train SPEC.json`: the same training as a job on a Ray cluster.

    the job's driver (what the `adapter` asset submits through dagster-ray's `PipesRayJobClient`):
      opens Dagster Pipes, runs Ray Train's `TorchTrainer` with `ScalingConfig(num_workers,
      use_gpu, CPU per worker)`  ->  every worker: `jobs.train.run`, in the process group Ray Train
      formed (RANK / WORLD_SIZE / LOCAL_RANK in its environment; gloo on CPU, nccl on GPU)
      ->  rank 0's log lines and result travel through a Ray queue back to the driver, which
      writes them to Pipes.

Contract:
- Why a queue: the Pipes reader tails the job's log, which is the driver's stdout; a worker's own
  stdout reaches it prefixed with the worker's name, so it cannot carry Pipes messages.
- Files as under torchrun (`jobs.train`): rank 0 writes `out_dir`, every rank its
  `run_dir/rank-<r>.json`, checkpoints in `checkpoint_dir` -- paths on a filesystem that the
  Dagster step and every Ray node share. Ray Train keeps only its own bookkeeping (`run_dir/ray`).
- A failed worker fails the whole run (`FailureConfig(max_failures=0)`: Ray does not restart it
  behind the asset's back); the driver exits 1, the Ray job FAILS, and the asset names the rank
  from the status files. Materializing again resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .train import Report, TrainJob, pipes_report, run


class QueueReport(Report):
    """Rank 0's report on a Ray worker: everything goes to the driver through `queue`."""

    def __init__(self, queue: Any):
        super().__init__()
        self.queue = queue

    def log(self, msg: str) -> None:
        self.queue.put(("log", msg))

    def error(self, msg: str) -> None:
        self.queue.put(("error", msg))

    def result(self, message: dict[str, Any]) -> None:
        self.queue.put(("result", message))


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the job as its rank; an exception fails the run."""
    job = TrainJob.read(config["spec"])
    if run(job, lambda _job: nullcontext(QueueReport(config["queue"]))) != 0:
        raise RuntimeError(f"rank {os.environ.get('RANK', '?')} failed: see {job.run_dir}/rank-*.json")


def drive(spec_path: str) -> int:
    """The driver: the TrainJob's workers under Ray Train, their reports forwarded to Pipes."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    job = TrainJob.read(spec_path)
    settings = job.ray
    ray.init(log_to_driver=True)
    queue = Queue(actor_options={"num_cpus": 0})  # a mailbox: holds no CPU the workers need
    trainer = TorchTrainer(
        train_worker, train_loop_config={"spec": str(Path(spec_path).resolve()), "queue": queue},
        scaling_config=ScalingConfig(num_workers=settings["num_workers"], use_gpu=settings["use_gpu"],
                                     resources_per_worker={"CPU": settings["cpus_per_worker"]}),
        run_config=RunConfig(name=f"ft-assets-{job.method}", storage_path=str(Path(job.run_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # Ray's TrainingFailedError (or a cancelled job): reported below
            failure.append(exc)

    thread = threading.Thread(target=fit, name="ray-train-fit")
    with pipes_report(job.run_dir) as report:
        thread.start()
        while thread.is_alive() or not queue.empty():
            try:
                kind, payload = queue.get(timeout=0.5)
            except Empty:
                continue
            {"log": report.log, "error": report.error, "result": report.result}[kind](payload)
        thread.join()
        if failure:
            report.error(f"Ray Train failed: {type(failure[0]).__name__}: {str(failure[0])[:2000]}")
    return 1 if failure else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ft_assets.jobs.ray_train SPEC.json", file=sys.stderr)
        return 2
    return drive(argv[0])


if __name__ == "__main__":
    sys.exit(main())
