"""Where `adapter` and `preference_adapter` train (`compute.launcher`): in the Dagster step, in
torchrun processes, or on Ray. The request is the trainer's (`trainers.sft.SftRequest`,
`trainers.preference.PreferenceRequest`: `jobs.train.trainers()`); below, SFT's names.

    inprocess   `trainers.sft.run(request)` in the step's own process (the default; the demo's speed)
    torchrun    the same `trainers.sft.SftRequest` in a `ft_assets.jobs.train.TrainJob` spec file, then torchrun `--nproc-per-node N
                -m ft_assets.jobs.train SPEC` (one machine: through `jobs.loopback_torchrun`, its
                rendezvous and ranks listening on loopback only; several machines: torch's own, a
                static rendezvous on `master_addr` with this one as node 0 and `join.sh` for the
                others, on a network only the training nodes reach) under Dagster's
                `PipesSubprocessClient`, on GPUs leased for the run (`models.gpu_leases`, passed as
                CUDA_VISIBLE_DEVICES): rank 0 streams the step log through Pipes and reports the
                result, which comes back as a `trainers.sft.TrainedElsewhere` -- stored and turned
                into metadata exactly like an in-process `FineTuned`.
    ray         the same spec submitted as a Ray job (`python -m ft_assets.jobs.ray_train SPEC`) by
                dagster-ray's `PipesRayJobClient` to `compute.ray.address`; Ray Train's workers
                train, the job's driver reports through Pipes; the same result comes back.

Contract: the run's files live under the checkpoint directory (`trained/` the artifact's files,
`ranks/` each rank's status), so a failed run leaves nothing in the store and its checkpoints
for the rerun; with an object-store FT_HOME this step's process mirrors each new checkpoint
while the run goes on (`mirrored_checkpoints`), so the rerun may happen on another machine.
A failed torchrun or Ray job becomes one step failure naming each rank and how it ended
(`JobFailed`): a rank that started and never reported was killed (kill -9, out of memory);
a user-fixable error (NaN loss, batch too large) reads as it does in process.
"""

import json
import os
import shlex
import shutil
import socket
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import dagster as dg

from ..models import gpu_leases
from ..training import checkpoint
from ..models.device import Compute
from ..jobs.train import RESULT_MESSAGE, TrainJob, kind_of, trainers
from ..config.recipe import ComputeSpec, RaySpec, Recipe
from ..artifacts.store import Checkpoints


class JobFailed(RuntimeError):
    """The training processes failed; the message names each rank and what to do."""


def train_method(context: dg.AssetExecutionContext, request, compute: ComputeSpec, hw: Compute, ckpts: Checkpoints):
    """`request` (a request of one of `jobs.train.trainers()`: SFT, preference) trained where
    `compute.launcher` says, resuming from `ckpts`: what the trainer's `run` returns in process, its
    `TrainedElsewhere` from other processes; the asset stores either the same way."""
    trainer = trainers()[kind_of(request)]
    if compute.launcher in trainer.launchers:
        with mirrored_checkpoints(ckpts):  # an object-store FT_HOME gets them as in process
            return run_elsewhere(context, train_job(request, compute), compute)
    if compute.launcher != "inprocess":
        context.log.info(f"{request.method}: trains in this step (launcher {compute.launcher} runs "
                         f"{', '.join(k for k, t in trainers().items() if compute.launcher in t.launchers)} only)")
    return trainer.module.run(request, hw, log=lambda msg: context.log.info(f"{request.method}: {msg}"),
                              on_log=lambda step, loss, **_: context.log.info(f"step {step}: loss {loss:.4f}"),
                              on_checkpoint=ckpts.saved)


def facts(recipe: Recipe, request=None) -> dict:
    """The adapter metadata's launcher facts (none for the in-process default, nor for a trainer
    that `request`'s launcher does not run)."""
    compute = recipe.compute
    if compute.launcher == "inprocess" or (request is not None and
                                           compute.launcher not in trainers()[kind_of(request)].launchers):
        return {}
    where = {"ray_address": compute.ray.address} if compute.launcher == "ray" else {}
    return {"launcher": compute.launcher, "processes": compute.world_size, **where}


def train_job(request, compute: ComputeSpec) -> TrainJob:
    """The spec file of a torchrun or Ray launch: `request` as is, and where this launch reports."""
    run_files = Path(request.checkpoint_dir)
    return TrainJob(
        request.to_json(), out_dir=str(run_files / "trained"), run_dir=str(run_files / "ranks"),
        device=compute.device, threads=compute.threads,
        ray=compute.ray.model_dump(include={"num_workers", "use_gpu", "cpus_per_worker"}),
        launcher=this_process() if compute.launcher == "torchrun" else {}, kind=kind_of(request),
        label=request.method)


def this_process() -> dict:
    """Who the ranks watch (`jobs.train.watch_launcher`): this step's process, by pid and start time."""
    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname()}


def torchrun_command(spec_path: Path, compute: ComputeSpec, node_rank: int | str = 0,
                     python: str = sys.executable) -> list[str]:
    """torchrun of `python`: on node 0 the step's own interpreter. One node: `jobs.loopback_torchrun`
    (a static rendezvous on 127.0.0.1, nothing listening beyond loopback). Several nodes:
    torch.distributed.run, static rendezvous on node 0's master_addr:master_port, so global rank 0
    (the one that reports through Pipes) is a process of node 0, the step's machine."""
    if compute.nnodes == 1:
        run, where = "ft_assets.jobs.loopback_torchrun", []
    else:
        run, where = "torch.distributed.run", [
            f"--nnodes={compute.nnodes}", f"--node-rank={node_rank}", f"--master-addr={compute.master_addr}",
            f"--master-port={compute.master_port}"]
    return [python, "-m", run, *where, f"--nproc-per-node={compute.nproc_per_node}",
            "-m", "ft_assets.jobs.train", str(spec_path)]


def write_join_script(run_dir: Path, spec_path: Path, compute: ComputeSpec) -> Path:
    """`run_dir/join.sh <node rank>`: what each other node runs (FT_HOME mounted at the same path)."""
    command = " ".join(shlex.quote(a) for a in torchrun_command(spec_path, compute, "RANK_PLACEHOLDER", "PYTHON_PLACEHOLDER"))
    command = command.replace("RANK_PLACEHOLDER", '"$1"').replace("PYTHON_PLACEHOLDER", '"${PYTHON:-python}"')
    script = run_dir / "join.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"# Joins this machine as node <node rank> (1..{compute.nnodes - 1}) to the training that the Dagster step\n"
        "# started on node 0. Needs FT_HOME at the same path as there, and ft_assets in PYTHON's environment.\n"
        f'case "$1" in ""|0|*[!0-9]*) echo "usage: sh $0 <node rank 1..{compute.nnodes - 1}>" >&2; exit 2;; esac\n'
        f"exec {command}\n")
    return script


@contextmanager
def mirrored_checkpoints(ckpts: Checkpoints, poll_s: float = 1.0) -> Iterator[None]:
    """While other processes train into `ckpts.dir`: each new complete checkpoint mirrored to the
    object store by this step's process (what `on_checkpoint` does in process); locally, nothing."""
    if ckpts.remote is None:
        yield
        return
    stop, pushed = threading.Event(), None

    def push_newest() -> None:
        nonlocal pushed
        newest = checkpoint.latest_checkpoint(ckpts.dir)
        if newest is not None and newest.name != pushed:
            try:
                ckpts.saved(newest)
                pushed = newest.name
            except FileNotFoundError:  # rank 0 replaced it by a newer one mid-copy: that one goes next
                pass

    def watch() -> None:
        while not stop.wait(poll_s):
            push_newest()

    watcher = threading.Thread(target=watch, name="checkpoint-mirror", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        push_newest()  # the last one written before the run ended (or failed)


def launch_on_ray(context: dg.AssetExecutionContext, job: TrainJob, spec_path: Path, compute: ComputeSpec):
    """The spec as a Ray job (dagster-ray's PipesRayJobClient); Ray places the workers and their GPUs."""
    from dagster_ray import PipesRayJobClient

    entrypoint = ray_entrypoint(spec_path, compute.ray)
    context.log.info(f"{job.method}: Ray job on {compute.ray.address}: {entrypoint}")
    return PipesRayJobClient(address=compute.ray.address, poll_interval=0.5).run(
        context=context, submit_job_params={"entrypoint": entrypoint, "entrypoint_num_cpus": 0})


def launch_torchrun(context: dg.AssetExecutionContext, job: TrainJob, spec_path: Path, compute: ComputeSpec):
    """torchrun on this machine (node 0) under PipesSubprocessClient, on GPUs leased for the run."""
    command = torchrun_command(spec_path, compute)
    context.log.info(f"{job.method}: {' '.join(command)}")
    if compute.nnodes > 1:
        join = write_join_script(Path(job.run_dir), spec_path, compute)
        context.log.info(f"{job.method}: node 0 of {compute.nnodes} waits for the others (torchrun's rendezvous: "
                         f"600 s): on each other node run `sh {join} <node rank>`")
    gpus = gpu_leases.visible_devices() if compute.device != "cpu" else []
    with gpu_leases.lease_gpus(compute.nproc_per_node, gpus, log=context.log.info) if gpus else nullcontext([]) as names:
        if names:
            context.log.info(f"{job.method}: GPUs {','.join(names)} of this machine, leased for this run "
                             "(CUDA_VISIBLE_DEVICES)")
        env = {"CUDA_VISIBLE_DEVICES": ",".join(names)} if names else {}
        return dg.PipesSubprocessClient(env=env).run(context=context, command=command)


def ray_entrypoint(spec_path: Path, ray: RaySpec) -> str:
    return f"{shlex.quote(ray.python)} -m ft_assets.jobs.ray_train {shlex.quote(str(spec_path))}"


def run_elsewhere(context: dg.AssetExecutionContext, job: TrainJob, compute: ComputeSpec):
    """Run `job` under torchrun or on Ray through Pipes; the trained files and the result."""
    run_dir, out_dir = Path(job.run_dir), Path(job.out_dir)
    for stale in (run_dir, out_dir):  # an earlier attempt's statuses and files (its checkpoints stay)
        shutil.rmtree(stale, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path = job.write(run_dir / "job.json")
    launch = launch_on_ray if compute.launcher == "ray" else launch_torchrun
    try:
        invocation = launch(context, job, spec_path, compute)
    except gpu_leases.LeaseError as exc:  # none free in time, or an unsafe lease directory
        raise JobFailed(f"{job.method}: {exc}") from None
    except Exception as exc:  # a non-zero exit (DagsterPipesExecutionError, not public) or a FAILED Ray job
        raise JobFailed(describe_failure(run_dir, compute, job.checkpoint_dir, exc)) from None
    reported = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and m.get("kind") == RESULT_MESSAGE]
    if not reported or not out_dir.is_dir():
        raise JobFailed(f"{compute.launcher} ended without a result from rank 0 (see the step's stdout/stderr); "
                        f"nothing was stored")
    return job.trainer.received(out_dir, reported[-1])


def describe_failure(run_dir: Path, compute: ComputeSpec, checkpoint_dir: str, exc: Exception) -> str:
    """Each rank's end, from its status file, the cause first, and what to do."""
    nproc_per_node = compute.world_size
    killed, failed, missing, user_errors = [], [], [], []
    for rank in range(nproc_per_node):
        path = run_dir / f"rank-{rank}.json"
        status = json.loads(path.read_text()) if path.is_file() else None
        if status is None:
            missing.append(rank)
        elif status["status"] == "started":
            host = f" on {status.get('host')}" if compute.nnodes > 1 else ""
            killed.append(f"rank {rank} (pid {status['pid']}{host}) of {nproc_per_node} was killed without a word "
                          "(kill -9, or the machine's out-of-memory killer: then lower training.batch_size)")
        elif status["status"] == "failed":
            failed.append(f"rank {rank} ({status['error'].splitlines()[0][:200]})")
            if status.get("user_error"):
                user_errors.append(status["error"].split(": ", 1)[-1])
    if user_errors and not killed:  # the same error on every rank (NaN loss, bad settings): said as in process
        return user_errors[0]
    if killed:
        said = "; ".join(killed) + (f"; {', '.join(failed)} stopped with it" if failed else "")
    elif failed:
        said = "; ".join(f"{f} failed" for f in failed)
    else:
        said = (f"{compute.launcher} ended without any rank reporting ({str(exc)[:1000]}; its own error is in the "
                f"step's stderr{' and the Ray job log' if compute.launcher == 'ray' else ''})")
    if missing and (killed or failed):
        said += f"; rank(s) {', '.join(map(str, missing))} never started"
    if missing and compute.nnodes > 1:
        said += (f" (a node that never joined: run `sh {run_dir / 'join.sh'} <node rank>` on each other node "
                 "within torchrun's 600 s rendezvous)")
    newest = checkpoint.latest_checkpoint(Path(checkpoint_dir))
    resume = (f"Materialize again to resume from the checkpoint of step {int(newest.name.removeprefix('step-'))} "
              f"with the same {nproc_per_node} processes" if newest else "Materialize again (no checkpoint yet: it starts over)")
    return f"{said}. Nothing was stored. {resume}."
