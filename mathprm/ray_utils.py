"""Connecting to Ray the same way from a job, the CLI and the tests.

Under `ray job submit` (or with RAY_ADDRESS set) we join the running cluster. Otherwise we
start a local one that listens on loopback only: Ray's core services bind to every
interface unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before they start, and usage
stats would try the network. Both are set here, before the first `ray.init`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

_LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = True) -> dict:
    """Connect to `address` (or RAY_ADDRESS), else start a loopback-only local Ray. Idempotent.

    Returns `ray.init`'s address info. `num_cpus` only applies to a cluster started here. A
    local cluster gets the dashboard (http://127.0.0.1:8265) by default: people watch runs on
    it, and Ray's State API, which Ray Train's placement-group cleaner polls, lives in it
    (without it that cleaner logs a warning every few seconds).
    """
    for key, value in _LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return {"gcs_address": ray.get_runtime_context().gcs_address}
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        info = ray.init(address=address, **kwargs)
    else:
        info = ray.init(
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    _quiet_ray_data()
    return dict(info.address_info)


def _quiet_ray_data() -> None:
    """Ray Data's progress bars flood CI logs; our stages print their own progress lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_job_paths(**paths: str | None) -> None:
    """Refuse relative paths under `ray job submit --working-dir`: the job runs in a temporary
    copy of the working directory (without git-ignored folders such as runs/), so a relative
    policy would not be found and a relative output would vanish with the copy. ValueError
    naming the field and the fix (a `ConfigError`, which the commands print without a traceback)."""
    import os
    from pathlib import Path

    from mathprm.config import ConfigError

    if "/runtime_resources/working_dir_files/" not in os.getcwd() + "/":
        return
    for name, value in paths.items():
        if value and not Path(value).is_absolute():
            raise ConfigError(f"{name}: {value!r} is relative, but this job runs in a temporary copy of its working "
                             f"directory; pass an absolute path, e.g. {name}=$PWD/{value}")


# ----------------------------------------------------------------------------- Ray Train state

TRAIN_STATE_FILE = "train_state.pt"  # inside a Ray Train checkpoint: model, optimiser, step, clocks


def restore_train_state(model: Any, state: dict, tag: str, rank: int) -> dict:
    """Inside a Ray Train worker: the latest checkpoint's state, its weights loaded into the
    (not yet wrapped) `model` and `resumed_from` set; `state` unchanged when the run has none."""
    from pathlib import Path

    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    state["resumed_from"] = state["step"]
    if rank == 0:
        print(f"[{tag}] resuming from step {state['step']}", flush=True)
    return state


@functools.cache
def _quiet_report_log() -> None:
    """Ray Train logs every `report` at INFO with all its metrics, from a logger named after
    its own file (so `LoggingConfig`'s level, which filters "ray.train" records, misses it);
    our progress lines already say the same. Raise that logger to WARNING in this worker
    (once per process)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logs as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def report_train_step(model: Any, optimizer: Any, state: dict, metrics: dict, rank: int,
                      with_checkpoint: bool) -> None:
    """`ray.train.report` is collective: every rank calls it, only rank 0 attaches a checkpoint
    (`state` + the unwrapped model's and the optimiser's state dicts)."""
    import tempfile
    from pathlib import Path

    import ray.train
    import torch

    _quiet_report_log()
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    unwrapped = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as d:
        full = {**state, "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(full, Path(d) / TRAIN_STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def check_resume(run_dir: Any, may_change: tuple[str, ...], settings: dict[str, Any]) -> None:
    """Ray Train resumes whatever checkpoint `run_dir` holds; refuse it (a `ConfigError` naming
    the field) when the run there was started with other settings: another lr, data or base
    would silently continue the old run. Only the fields in `may_change` may differ (e.g. more
    epochs, to train longer). The first call writes the settings to `run_dir`."""
    import json
    from pathlib import Path

    from mathprm import atomic
    from mathprm.config import ConfigError

    keep = {k: v for k, v in settings.items() if k not in may_change}
    file = Path(run_dir) / "mathprm_run.json"
    if file.is_file():
        before = json.loads(file.read_text())
        diff = sorted(k for k in keep.keys() | before.keys() if keep.get(k) != before.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"{k}: {run_dir} holds an interrupted run started with {k}={before.get(k)!r}, not "
                              f"{keep.get(k)!r}; rerun with its settings to resume, or pass overwrite=true")
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(file, keep)


def reuse_finished(out: Any, overwrite: bool, finished: bool, tag: str, what: str) -> bool:
    """Whether a trainer can return its finished output `out` as it is (printing that it does).
    A directory that exists but holds no finished `what` is refused (ConfigError naming
    out_dir), unless `overwrite`: it may be someone else's files."""
    from mathprm.config import ConfigError

    if not out.exists() or overwrite:
        return False
    if finished:
        print(f"[{tag}] reusing the finished {what} in {out} (overwrite=true retrains)", flush=True)
        return True
    raise ConfigError(f"out_dir: {out} exists but holds no finished {what} (pass overwrite=true)")


def fit_torch_trainer(loop: Any, config: dict[str, Any], out: Any, run_name: str, *, num_workers: int,
                      use_gpu: bool, overwrite: bool, may_change: tuple[str, ...],
                      resources_per_worker: dict[str, float] | None = None, datasets: dict | None = None,
                      dataset_config: Any = None) -> None:
    """Run `loop(config)` on a `TorchTrainer` whose checkpoints live in `out.parent/ray_train/run_name`
    (one kept; a rerun resumes from it, refused by `check_resume` when settings other than
    `may_change` differ; `overwrite` starts from scratch). Keys of `config` starting with "_"
    are derived values, not settings.

    Logs: Ray Train's own INFO lines are filtered to WARNING (`report_train_step` also quiets
    its "Reporting training result ..." line per report), and its print patch is off unless
    RAY_TRAIN_ENABLE_PRINT_PATCH is set (patched, every progress line of a worker reaches the
    driver twice: once through Train's logger and once through its tee to the real stdout)."""
    import os
    import shutil

    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # the driver's value reaches the workers

    storage = out.parent / "ray_train"
    if overwrite:  # from scratch: the old run's checkpoints would be resumed otherwise
        shutil.rmtree(storage / run_name, ignore_errors=True)
    check_resume(storage / run_name, may_change, {k: v for k, v in config.items() if not k.startswith("_")})
    extra = {"datasets": datasets, "dataset_config": dataset_config} if datasets is not None else {}
    TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker),
        run_config=RunConfig(storage_path=str(storage), name=run_name, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),
        **extra,
    ).fit()


def greedy_accuracy(generator: Any, problems: Any, rank: int, world: int, grade: Any,
                    max_solution_tokens: int) -> float:
    """Inside a Ray Train worker: greedy accuracy of `generator` on `problems`, each rank
    solving every world-th one and `grade(problem, text)` judging it; the counts are
    all-reduced, so every rank returns the same number (and may act on it alike)."""
    import torch
    import torch.distributed as dist

    from mathprm.generation import Prefix, Sampling

    mine = list(problems[rank::world])
    correct = 0
    if mine:
        rolls = generator.rollouts([Prefix(p.question) for p in mine], 1,
                                   Sampling(temperature=0.0, max_solution_tokens=max_solution_tokens))
        correct = sum(bool(r.finished and grade(p, r.text)) for p, (r,) in zip(mine, rolls, strict=True))
    counts = torch.tensor([correct, len(mine)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return float(counts[0] / max(counts[1], 1))
