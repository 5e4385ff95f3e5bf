"""One Ray Train skeleton for every trainer here: SFT, PRM training and PPO plug into it.

A trainer is three things:

- a `Stage`: its tag, what it writes ("policy", "PRM"), the summary file whose presence marks
  that output finished, and the settings a resumed run may change;
- a per-worker loop, which builds its model and hands it to `Worker`: the worker restores the
  latest checkpoint into it, wraps it for DDP (`prepare_model`) or shards it with FSDP2
  (`strategy="fsdp"`, checkpoints then gathered whole on rank 0), builds the optimiser (and
  restores its state), and gives the loop what every trainer needs: all-reduce, one progress
  line from rank 0, `report` (metrics every time, a rank-0 checkpoint when asked) and the
  atomic final save with the summary written last;
- a `launch` call from the driver: refuse relative paths under `ray job submit`, reuse a
  finished output, validate (the stage's `prepare`), start Ray, run the `TorchTrainer` (which
  resumes an interrupted run from its checkpoint, refused when its settings changed), and
  check that the output was written.

`optimizer_step` is the one AdamW step (learning rate, bf16 autocast, gradient clipping)
that SFT and PRM training share. A new trainer is a Stage, a loop over its own batches, and
a `launch` call: see `sft.py` for the smallest one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mathprm import atomic
from mathprm.config import ConfigError

TRAIN_STATE_FILE = "train_state.pt"  # inside a Ray Train checkpoint: model, optimiser, step, clocks
STRATEGIES = ("ddp", "fsdp")  # how the learners share the model: replicas (DDP) or shards (FSDP2)
GRAD_CLIP = 1.0  # max gradient norm of every optimiser step


@dataclasses.dataclass(frozen=True)
class Stage:
    tag: str  # prefix of the progress lines ("[sft] ...")
    run_prefix: str  # Ray Train's run is named <run_prefix>-<output directory name>
    what: str  # what the stage writes, in messages: "policy", "PRM"
    summary_file: str  # written last into the output directory: its presence marks a finished output
    # Settings a resumed run may change (train longer, log differently); any other change would
    # silently continue the old run with new settings, so `check_resume` refuses it.
    may_change: tuple[str, ...] = ()

    def is_finished(self, out_dir: str | Path) -> bool:
        """An output written to the end by this stage (atomic, so complete if present)."""
        return (Path(out_dir) / self.summary_file).is_file()


# ----------------------------------------------------------------------------- driver side


def launch(stage: Stage, cfg: Any, loop: Callable[[dict], None], prepare: Callable[[Path], tuple[dict, dict]],
           paths: dict[str, str | None]) -> Path:
    """Train (or reuse, or resume) `stage`'s output `cfg.out_dir`; returns it, resolved.

    `paths` are the config's path fields (`check_job_paths`). `prepare(out)` validates the
    config and returns (the loop's config dict, extra `fit_torch_trainer` arguments such as
    datasets); it runs before Ray starts unless it starts Ray itself. `cfg` has `out_dir`,
    `overwrite`, `ray_address`, `num_cpus`, `num_workers`, `use_gpu` and `max_failures`."""
    from mathprm.ray_utils import check_job_paths, init_ray

    check_job_paths(**paths)
    if not isinstance(cfg.max_failures, int) or isinstance(cfg.max_failures, bool) or cfg.max_failures < 0:
        raise ConfigError(f"max_failures: must be an int >= 0, got {cfg.max_failures!r}")  # before any work
    out = Path(cfg.out_dir).resolve()
    if reuse_finished(out, cfg.overwrite, stage):
        return out
    settings, extra = prepare(out)
    init_ray(cfg.ray_address, cfg.num_cpus)
    fit_torch_trainer(loop, settings, out, f"{stage.run_prefix}-{out.name}", num_workers=cfg.num_workers,
                      use_gpu=cfg.use_gpu, overwrite=cfg.overwrite, may_change=stage.may_change,
                      max_failures=cfg.max_failures, **extra)
    if not stage.is_finished(out):
        raise RuntimeError(f"[{stage.tag}] the run ended without writing a {stage.what} to {out}")
    return out


def reuse_finished(out: Path, overwrite: bool, stage: Stage, tag: str | None = None) -> bool:
    """Whether a trainer can return `stage`'s finished output `out` as it is (printing that it
    does, as `tag`, default the stage's). A directory that exists but holds no finished output
    is refused (ConfigError naming out_dir), unless `overwrite`: it may be someone else's
    files; so is an `out` that is a file, or whose summary does not read back as JSON."""
    atomic.check_not_a_file(out, "out_dir")
    if not out.exists() or overwrite:
        return False
    if stage.is_finished(out):
        atomic.read_json(out / stage.summary_file, "move the directory aside or retrain with overwrite=true")
        print(f"[{tag or stage.tag}] reusing the finished {stage.what} in {out} (overwrite=true retrains)", flush=True)
        return True
    raise ConfigError(f"out_dir: {out} exists but holds no finished {stage.what} (pass overwrite=true)")


def check_resume(run_dir: Any, may_change: tuple[str, ...], settings: dict[str, Any]) -> None:
    """Ray Train resumes whatever checkpoint `run_dir` holds; refuse it (a `ConfigError` naming
    the field) when the run there was started with other settings: another lr, data or base
    would silently continue the old run. Only the fields in `may_change` may differ (e.g. more
    epochs, to train longer). A checkpoint or run record there that cannot be read (truncated,
    empty, foreign) is refused the same way, naming the file. The first call writes the settings
    to `run_dir`."""
    keep = {k: v for k, v in settings.items() if k not in may_change}
    file = Path(run_dir) / "mathprm_run.json"
    fix = "pass overwrite=true to start over"
    for state in sorted(Path(run_dir).glob(f"checkpoint_*/{TRAIN_STATE_FILE}")):
        try:  # torch.save's zip: a truncated or foreign file has no readable directory at its end
            zipfile.ZipFile(state).close()
        except (OSError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{state} is not a readable checkpoint ({e}); {fix}") from None
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints
    if snapshot.is_file():
        atomic.read_json(snapshot, fix)
    if file.is_file():
        before = atomic.read_json(file, fix)
        diff = sorted(k for k in keep.keys() | before.keys() if keep.get(k) != before.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"{k}: {run_dir} holds an interrupted run started with {k}={before.get(k)!r}, not "
                              f"{keep.get(k)!r}; rerun with its settings to resume, or pass overwrite=true")
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(file, keep)


def fit_torch_trainer(loop: Any, config: dict[str, Any], out: Path, run_name: str, *, num_workers: int,
                      use_gpu: bool, overwrite: bool, may_change: tuple[str, ...],
                      resources_per_worker: dict[str, float] | None = None, max_failures: int = 0,
                      datasets: dict | None = None,
                      dataset_config: Any = None) -> None:
    """Run `loop(config)` on a `TorchTrainer` whose checkpoints live in `out.parent/ray_train/run_name`
    (one kept; a rerun resumes from it, refused by `check_resume` when settings other than
    `may_change` differ; `overwrite` starts from scratch). A worker (or its node) that dies is
    replaced up to `max_failures` times, the group restarting from the last checkpoint. Keys of
    `config` starting with "_" are derived values, not settings.

    Logs: Ray Train's own INFO lines are filtered to WARNING (`Worker.report` also quiets its
    "Reporting training result ..." line per report), and its print patch is off unless
    RAY_TRAIN_ENABLE_PRINT_PATCH is set (patched, every progress line of a worker reaches the
    driver twice: once through Train's logger and once through its tee to the real stdout)."""
    import os
    import shutil

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
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
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),
        **extra,
    ).fit()


# ----------------------------------------------------------------------------- worker side


class Worker:
    """One Ray Train worker's side of a run (see the module docstring). `state` holds the
    stage's resumable counters; "step" is the one every stage has. After construction
    `self.state` is the latest checkpoint's state (with `resumed_from` set) or `state`."""

    def __init__(self, stage: Stage, model: torch.nn.Module, state: dict[str, Any],
                 make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], strategy: str = "ddp") -> None:
        import ray.train
        import ray.train.torch

        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        ctx = ray.train.get_context()
        self.stage, self.rank, self.world = stage, ctx.get_world_rank(), ctx.get_world_size()
        self.strategy = strategy
        self.device = ray.train.torch.get_device()
        self.state = self._restore(model, state)
        if strategy == "fsdp":
            self.model = self.unwrapped = shard(model.to(self.device))
        else:
            self.model = ray.train.torch.prepare_model(model)
            self.unwrapped = self.model.module if hasattr(self.model, "module") else self.model  # DDP's inner model
        self.optimizer = make_optimizer(self.unwrapped)
        if "optimizer" in self.state:
            optimizer_state = self.state.pop("optimizer")
            if strategy == "fsdp":
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.optimizer, optimizer_state,
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(optimizer_state)
        self.state.pop("model", None)

    def full_state_dict(self, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor] | None:
        """`module`'s (default: the model's) whole state dict on CPU, on rank 0 (None elsewhere).
        Collective under FSDP (every rank must call it at the same point): the shards gathered."""
        module = self.unwrapped if module is None else module
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def _restore(self, model: torch.nn.Module, state: dict) -> dict:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return state
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        state["resumed_from"] = state["step"]
        self.log(f"resuming from step {state['step']}")
        return state

    def log(self, message: str) -> None:
        """One progress line, from rank 0 only."""
        if self.rank == 0:
            print(f"[{self.stage.tag}] {message}", flush=True)

    def reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`values` all-reduced in place over the workers (sum, max, min or mean) and returned;
        every rank must call it at the same point, or the run hangs."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                                        "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
            if op == "mean":
                values /= self.world
        return values

    def report(self, state: dict[str, Any], metrics: dict[str, Any], checkpoint: bool) -> None:
        """`ray.train.report` is collective: every rank calls it, only rank 0 attaches a
        checkpoint (`state` + the model's and the optimiser's state dicts) when `checkpoint`."""
        import tempfile

        import ray.train

        _quiet_report_log()
        self.state = state
        model_state = optimizer_state = None
        if checkpoint and self.strategy == "fsdp":  # collective: every rank takes part in the gather
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_state, optimizer_state = get_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not (checkpoint and self.rank == 0):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            full = {**state, "model": model_state if model_state is not None else self.unwrapped.state_dict(),
                    "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict()}
            torch.save(full, Path(d) / TRAIN_STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def save(self, out_dir: str | Path, overwrite: bool, write: Callable[[Path], None], summary: dict) -> None:
        """Rank 0: `write(tmp)` the output, then the stage's summary file, and move it to
        `out_dir` atomically (a crash leaves no half-written output)."""
        if self.rank != 0:
            return
        with atomic.directory(out_dir, overwrite=overwrite) as tmp:
            write(tmp)
            atomic.write_json(tmp / self.stage.summary_file, summary)


class Window:
    """Per-step figures summed since the last report (e.g. loss, batches, tokens), read
    all-reduced over the workers with the seconds the window took."""

    def __init__(self, worker: Worker, size: int) -> None:
        self.worker, self.values, self.start = worker, torch.zeros(size, dtype=torch.float64), time.monotonic()

    def add(self, *values: float) -> None:
        self.values += torch.tensor(values, dtype=torch.float64)

    def read(self) -> tuple[torch.Tensor, float]:
        """(the sums over every worker, seconds since the window opened); then a new window."""
        totals = self.worker.reduce(self.values.clone())
        seconds = max(time.monotonic() - self.start, 1e-9)
        self.values.zero_()
        self.start = time.monotonic()
        return totals, seconds


def greedy_accuracy(generator: Any, problems: Any, rank: int, world: int, grade: Callable[[Any, str], bool],
                    max_solution_tokens: int) -> float:
    """Greedy accuracy of `generator` on `problems`, rank `rank` of `world` solving every
    world-th one and `grade(problem, text)` judging it; inside a Ray Train run the counts are
    all-reduced, so every rank returns the same number (and may act on it alike)."""
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


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                   loss_fn: Callable[[], torch.Tensor], bf16: bool = False) -> float:
    """One optimiser step at rate `lr` on `loss_fn()` (computed in train mode, under bfloat16
    autocast when `bf16`: weights, optimiser state and the loss's softmax stay float32), the
    gradient norm clipped to GRAD_CLIP; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return float(loss.detach())


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """`model` sharded over the process group with FSDP2 (`fully_shard`): each transformer block
    (the classes its HF models name in `_no_split_modules`) is one unit, the rest the root's.
    Its parameters become DTensors, so the optimiser must be built after this."""
    from torch.distributed.fsdp import fully_shard

    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module)
    fully_shard(model)
    return model


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


def add_lora(lm: torch.nn.Module, r: int, alpha: int, dropout: float) -> torch.nn.Module:
    """`lm` with PEFT LoRA adapters of rank `r` on every linear layer of its backbone (not its
    LM head); only the adapters train. `merge_and_unload()` folds them back before saving."""
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(lm, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                         target_modules="all-linear"))


def lora_merged_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_and_unload()` would give a PEFT LoRA model (base weight + each
    adapter's delta, HF parameter names), computed without touching the model: merging and
    unmerging in place would leave float drift in the base weights at every call."""
    from peft.tuners.lora import LoraLayer

    deltas = {name: m.get_delta_weight(m.active_adapters[0]) for name, m in lm.named_modules()
              if isinstance(m, LoraLayer) and m.active_adapters}
    out = {}
    for key, value in lm.state_dict().items():
        if "lora_" in key:
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
            if leaf == "weight" and module in deltas:
                value = value + deltas[module]
            key = f"{module}.{leaf}"
        out[key.removeprefix("base_model.model.")] = value.detach().cpu()
    return out
