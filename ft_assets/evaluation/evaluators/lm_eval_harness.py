"""`type: lm_eval`: EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`) on the evaluated model, offline.

    evaluators:
      - {type: lm_eval}                                  # the shipped general-capability probe
      - {type: lm_eval, name: mine, include_path: evals/tasks, tasks: [my_task], limit: 50, num_fewshot: 2}

Keys: `tasks` (task, group or tag names; default: the shipped probe's, `evaluation.probe`),
`include_path` (null: the shipped probe's directory; else a directory of lm-eval task YAMLs,
relative to the recipe root), `limit` (rows per task; null: all), `num_fewshot` (null: each
task's own, else 0), `batch_size`.

The model is lm-eval's `hf` model: `pretrained=` the evaluated transformers directory, `peft=` its
adapter when the method did not merge, on the evaluation's device (float32 on CPU), no remote
code. Only the tasks under the task directory exist (lm-eval's built-in tasks are not indexed:
they read their data from the Hub); an unknown name is refused with the known ones. Relative
`data_files` (and a `dataset_path` naming a local file or folder) in a task YAML are relative to
that YAML, wherever the directory is installed. Nothing is downloaded: the Hub is switched offline
for the call; the datasets lm-eval builds from local files are cached under
`$FT_HOME/cache/lm_eval/`. Python's, numpy's and torch's random states are restored afterwards
(lm-eval seeds them).

Scores: `<task>.<metric>` (e.g. `probe_arithmetic.acc`; a metric under a filter other than
lm-eval's `none` is `<metric>_<filter>`), for tasks and groups, directions from lm-eval's own
`higher_is_better` (a metric it gives no direction is left out). Table `per_task`: task, metric,
value, stderr, n. Raw: lm-eval's results without its samples, full task configs and environment
dump (kept: results, groups, versions, n-shot, n-samples, higher_is_better, each task's dataset
and metrics, the run's settings).
`files()` lists every file under the task directory (the shipped probe's too), so editing a task
or its rows re-evaluates; `run` takes the task directory back from them (their deepest common folder).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import Field

from ...config.evaluator_spec import EvaluatorSpecBase
from ..probe import PROBE_DIR, PROBE_TASKS
from . import Answered, EvaluatorResult, register

_offline_lock = threading.Lock()  # the offline switches are process-wide
_SKIPPED_PARTS = {"__pycache__", ".ipynb_checkpoints"}


class LmEvalSpec(EvaluatorSpecBase):
    """lm-eval tasks from a local task directory (default: the shipped probe)."""

    type: Literal["lm_eval"]
    tasks: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(default_factory=lambda: list(PROBE_TASKS))  # task, group or tag names of the task directory (default: the probe's)
    include_path: Annotated[str, Field(min_length=1)] | None = None  # a directory of task YAMLs; null: the probe
    limit: Annotated[int, Field(ge=1)] | None = None  # rows per task; null: all
    num_fewshot: Annotated[int, Field(ge=0)] | None = None  # null: each task's own (else 0)
    batch_size: Annotated[int, Field(ge=1)] = 16  # lm-eval's batch of requests

    def files(self, resolve: Callable[[str, str], Path], where: str) -> list[Path]:
        if self.include_path is None:
            return task_files(PROBE_DIR)
        return task_files(resolve(self.include_path, f"{where}.include_path"))


def task_files(directory: Path) -> list[Path]:
    """Every file under a task directory (sorted); refused when it holds no task YAML."""
    if not directory.is_dir():
        raise FileNotFoundError(f"lm_eval include_path {directory} is not a directory")
    found = sorted(p for p in directory.rglob("*") if p.is_file() and not _SKIPPED_PARTS & set(p.parts)
                   and p.suffix != ".pyc")
    if not any(p.suffix == ".yaml" for p in found):
        raise ValueError(f"lm_eval include_path {directory} holds no task YAML (*.yaml)")
    return found


def task_dir_of(files: list[Path]) -> Path:
    """The task directory `files()` listed: the deepest folder holding all its files."""
    common = Path(os.path.commonpath([str(p) for p in files]))
    return common if common.is_dir() else common.parent


def run(spec: LmEvalSpec, answered: Answered, files: list[Path]) -> EvaluatorResult:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ...config.paths import ft_home

    manager = TaskManager(include_path=str(task_dir_of(files)), include_defaults=False)
    check_task_names(spec, manager)
    anchor_local_paths(manager, cache_dir=ft_home() / "cache" / "lm_eval" / "datasets")
    with _offline(), _kept_random_state():  # offline, and no forked pool
        out = lm_eval.simple_evaluate(
            model="hf", model_args=model_args(answered), tasks=list(spec.tasks), task_manager=manager,
            device=answered.device, batch_size=spec.batch_size, limit=spec.limit, num_fewshot=spec.num_fewshot,
            log_samples=False, bootstrap_iters=1000,  # stderr of non-mean aggregations only
        )
    return result_of(out)


def model_args(answered: Answered) -> dict[str, Any]:
    args: dict[str, Any] = {"pretrained": str(answered.model_dir), "trust_remote_code": False,
                            "dtype": "float32" if answered.device == "cpu" else "auto"}
    if answered.adapter_dir is not None:
        args["peft"] = str(answered.adapter_dir)
    return args


def check_task_names(spec: LmEvalSpec, manager) -> None:
    unknown = [t for t in spec.tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"evaluator {spec.label}: unknown lm-eval task(s) {', '.join(unknown)}; the task directory "
                         f"{manager.include_path} has: {', '.join(manager.all_tasks) or 'none'} "
                         "(lm-eval's built-in tasks need the Hub and are not offered)")


def anchor_local_paths(manager, cache_dir: Path) -> None:
    """Make each YAML task's relative `data_files` (and a local `dataset_path`) absolute against
    its YAML's folder, and cache its dataset under `cache_dir`: lm-eval would resolve them against
    the working directory and cache in ~/.cache. Rewrites the manager's index entries in place."""
    from lm_eval.tasks._index import Entry, Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    index = manager.task_index
    for name, entry in list(index.items()):
        if entry.kind is not Kind.TASK or entry.yaml_path is None:
            continue
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        here = Path(entry.yaml_path).parent
        path = cfg.get("dataset_path")
        if isinstance(path, str) and not Path(path).is_absolute() and (here / path).exists():
            cfg["dataset_path"] = str(here / path)
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            kwargs["data_files"] = _anchored(kwargs["data_files"], here)
        kwargs.setdefault("cache_dir", str(cache_dir))
        cfg["dataset_kwargs"] = kwargs
        index[name] = Entry(name=entry.name, kind=entry.kind, yaml_path=None, cfg=cfg, tags=entry.tags)


def _anchored(data_files: Any, here: Path) -> Any:
    """`data_files` (a path, a list, or split -> path(s)) with relative paths made absolute under `here`."""
    if isinstance(data_files, dict):
        return {split: _anchored(v, here) for split, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_anchored(v, here) for v in data_files]
    if isinstance(data_files, str) and "://" not in data_files and not Path(data_files).is_absolute():
        return str(here / data_files)
    return data_files


@contextlib.contextmanager
def _offline():
    """The Hub offline for the call (the environment and the switches datasets and huggingface_hub
    read at import time), and lm-eval's bootstrap of standard errors in this process: its default
    forks a `multiprocessing.Pool` from a process that holds torch's threads, and that pool's
    shutdown hung for good in a loaded test run (`DISABLE_MULTIPROC` is lm-eval's own switch)."""
    import datasets
    import huggingface_hub.constants as hub

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DISABLE_MULTIPROC")
    with _offline_lock:
        saved_env = {n: os.environ.get(n) for n in names}
        saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
        os.environ.update({n: "1" for n in names})
        hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
            for n, v in saved_env.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v


@contextlib.contextmanager
def _kept_random_state():
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def result_of(out: dict[str, Any]) -> EvaluatorResult:
    """Scores, their directions, the per_task table and the JSON-able raw output of simple_evaluate."""
    import pandas as pd

    scores, directions, rows = {}, {}, []
    for task, metrics in out["results"].items():
        directions_of_task = out.get("higher_is_better", {}).get(task, {})
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, kept = key.partition(",")
            if not kept or metric.endswith("_stderr") or not _is_number(value):
                continue
            score = metric if kept == "none" else f"{metric}_{kept}"
            if directions_of_task.get(metric) is None:
                continue  # lm-eval states no direction: not a score the gate could read
            scores[f"{task}.{score}"] = round(float(value), 4)
            directions[f"{task}.{score}"] = bool(directions_of_task[metric])
            stderr = metrics.get(f"{metric}_stderr,{kept}")
            rows.append({"task": task, "metric": score, "value": float(value),
                         "stderr": float(stderr) if _is_number(stderr) else None, "n": n})
    if not scores:
        raise ValueError(f"lm-eval reported no score for {', '.join(out['results']) or 'no task'}")
    table = pd.DataFrame(rows, columns=["task", "metric", "value", "stderr", "n"])
    return EvaluatorResult(scores, directions, tables={"per_task": table}, raw=raw_of(out))


def raw_of(out: dict[str, Any]) -> dict[str, Any]:
    """What of lm-eval's output is kept beside the scores (JSON-able; no samples, no environment dump)."""
    # no `date` or timings: the report is content-hashed, so the same scores must give the same bytes
    kept = {k: out[k] for k in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better",
                                "n-samples", "lm_eval_version", "transformers_version") if k in out}
    kept["configs"] = {task: {k: cfg.get(k) for k in ("task", "dataset_path", "dataset_name", "output_type",
                                                      "num_fewshot", "test_split", "fewshot_split")}
                       | {"metrics": [m.get("metric") for m in cfg.get("metric_list") or []]}
                       for task, cfg in out.get("configs", {}).items()}
    settings = out.get("config", {})
    kept["config"] = {k: settings.get(k) for k in ("model", "model_args", "batch_size", "device", "limit",
                                                   "bootstrap_iters", "model_num_parameters", "model_dtype")}
    return _jsonable(kept)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


register(LmEvalSpec, run)
