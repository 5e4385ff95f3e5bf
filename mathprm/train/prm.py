"""PRM training on Ray Train: BCE on soft step scores, from tree-search Parquet or TRL rows.

    mathprm train-prm --config mathprm/configs/prm_arith.yaml            # runs/arith/mcts -> runs/arith/prm

Data (`prm_data`): a tree-search output directory, step-score Parquet, or TRL stepwise rows,
read as a Ray Dataset of labelled solution paths; problems go to validation by a hash of their id.

Training, on the trainer skeleton (`mathprm.train.run`). A `TorchTrainer` with N workers (gloo on CPU, NCCL on GPU) shards the training
rows with `get_dataset_shard`; each worker encodes its batches (`prm.encode_solution`) and
runs DDP through `prepare_model`. The loss is `prm.bce_step_loss`, at step ends only.
Optional LoRA through PEFT (the head is always trained in full; the adapters are merged
before saving, so the output is a plain HF directory). `precision: bf16` runs the forward
under bfloat16 autocast (GPUs; CPUs with AVX-512 BF16). Every `eval_every` steps rank 0
scores the whole validation set: BCE against the soft labels and step AUROC against
`score > 0` (the state can still reach the gold answer; Math-Shepherd's hard label).
Checkpoints go through `ray.train.report` every `checkpoint_every` steps; a killed run
resumes from the latest one (same step, optimiser and schedule; the batches of the resumed
epoch already trained are skipped by count). The finished PRM is written once, atomically.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mathprm import atomic
from mathprm.config import ConfigError, to_dict
from mathprm.models import check_model_dir, loading
from mathprm.models.prm import (
    FEATURES,
    PRMBatch,
    PRMExample,
    bce_step_loss,
    build_prm,
    collate,
    likelihood_threshold,
    save_prm,
    step_logits,
)
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.stats import auroc
from mathprm.steps import StepFormat
from mathprm.train.prm_data import (
    EpochBatches,
    data_step_format,
    is_validation,
    rows_of,
    solutions_dataset,
    to_example,
    usable_examples,
)
from mathprm.train.run import Stage, Window, Worker, add_lora, launch, optimizer_step, reuse_finished
from mathprm.train.schedule import warmup_cosine

PRM_STAGE = Stage("train-prm", "prm", "PRM", "prm_summary.json", may_change=(
    "epochs", "log_every", "eval_every", "checkpoint_every", "out_dir", "overwrite",
    "ray_address", "num_cpus", "max_failures"))


@dataclasses.dataclass
class TrainPRMConfig:
    data: str = "runs/arith/mcts"  # tree-search output dir, step-score Parquet, or TRL stepwise Parquet/JSONL
    base: str = "runs/arith/policy"  # HF causal-LM (or PRM) directory whose backbone the PRM starts from
    separator: str | None = None  # step separator; None: the tree-search run's (run.json), else "\n\n"
    # the system message of a chat prompt when `base`'s tokenizer has a chat template (mathprm.prompts);
    # the PRM keeps it and scores with it
    system_prompt: str | None = DEFAULT_SYSTEM
    # the backbone's own log-probabilities of each step fed to the head (mathprm.models.prm.FEATURES); [] = a head
    # on the hidden state alone
    features: list[str] = dataclasses.field(default_factory=lambda: list(FEATURES))
    # false: no head on the hidden state; only the feature weights and a bias train and the backbone stays
    # the frozen base (the calibrated prior: Monte-Carlo values cannot teach it a problem's difficulty)
    hidden_head: bool = True
    val_fraction: float = 0.1  # share of problems held out for validation (by a hash of the id)
    epochs: int = 10
    batch_size: int = 16  # solutions per worker per step (global batch = batch_size * num_workers)
    lr: float = 5e-4  # peak learning rate (AdamW), after `warmup_steps`, cosine to 10 % at the end
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_length: int = 512  # longer solutions are dropped (counted), never truncated
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (PEFT) instead of the whole backbone
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    log_every: int = 10  # steps between progress lines / ray.train.report calls
    eval_every: int = 100  # steps between validation passes (a multiple of log_every)
    checkpoint_every: int = 100  # steps between rank-0 checkpoints (a multiple of log_every)
    seed: int = 0
    # worker-group restarts from the last checkpoint after a worker or its node dies (Ray Train FailureConfig)
    max_failures: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    out_dir: str = "runs/arith/prm"
    overwrite: bool = False  # retrain from scratch even if out_dir holds a finished PRM
    ray_address: str | None = None  # None: RAY_ADDRESS or a local loopback cluster
    num_cpus: int | None = None  # CPUs of a local cluster started by this run

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "log_every", "eval_every", "checkpoint_every",
                     "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) % self.log_every:
                raise ValueError(f"{name}: must be a multiple of log_every ({self.log_every}), got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for name in ("warmup_steps", "weight_decay", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lora_r and (self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_alpha / lora_dropout: need alpha >= 1 and dropout in [0, 1), got "
                             f"{self.lora_alpha} / {self.lora_dropout}")
        if self.separator is not None:
            StepFormat(self.separator)
        if not self.hidden_head and (not self.features or self.lora_r):
            raise ValueError(f"hidden_head: false trains only the feature weights, so it needs features (got "
                             f"{self.features}) and no LoRA (got lora_r {self.lora_r})")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or len(set(self.features)) != len(self.features):
            raise ValueError(f"features: {self.features} must be distinct names from {', '.join(FEATURES)} (or [])")

    def learning_rate(self, step: int, total: int) -> float:
        """Linear warmup, then cosine from `lr` to 10 % of it at `total` steps."""
        return warmup_cosine(self.lr, self.warmup_steps, step,
                             (step - self.warmup_steps) / max(1, total - self.warmup_steps))


# ----------------------------------------------------------------------------- pure core


def first_zero(targets: Sequence[float]) -> int:
    """The index of a path's first step labelled 0 (its first error, for ProcessBench), -1 if none."""
    return next((i for i, t in enumerate(targets) if t == 0), -1)


@torch.no_grad()
def score_examples(model: torch.nn.Module, examples: Sequence[PRMExample], pad_id: int, device: torch.device,
                   batch_size: int) -> tuple[list[list[float]], float, int]:
    """(each example's scores at its labelled steps, in `examples`' order; the summed BCE of
    those steps against their targets; how many there are). Leaves the model in eval mode."""
    model.eval()
    out: list[list[float]] = [[] for _ in examples]
    loss_sum, n = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for lo in range(0, len(order), batch_size):
        members = order[lo : lo + batch_size]
        chunk = [examples[i] for i in members]
        batch = collate(chunk, pad_id).to(device)
        logits = step_logits(model, batch).float()
        k = int(batch.step_mask.sum())
        loss_sum += float(bce_step_loss(logits, batch.targets, batch.step_mask)) * k
        n += k
        probs = torch.sigmoid(logits).cpu()
        for row, (i, e) in enumerate(zip(members, chunk)):
            out[i] = probs[row, e.positions].tolist()
    return out, loss_sum, n


def validate(model: torch.nn.Module, examples: Sequence[PRMExample], pad_id: int, device: torch.device,
             batch_size: int) -> tuple[dict[str, float | None], list[list[float]]]:
    """(BCE against the soft labels and AUROC against `label > 0`, over every labelled step, and
    `val_threshold`, the ProcessBench threshold that best finds each path's first step labelled
    0 (`processbench.best_threshold`, over its labelled steps), None without such paths and
    clean ones both; the scores themselves, as `score_examples` gives them)."""
    from mathprm.eval.processbench import best_threshold

    scores, loss_sum, n = score_examples(model, examples, pad_id, device, batch_size)
    model.train()
    preds = [x for ss in scores for x in ss]
    hard = [t > 0 for e in examples for t in e.targets]
    paths = [(ss, first_zero(e.targets)) for ss, e in zip(scores, examples)]
    return {"val_bce": loss_sum / n if n else None,
            "val_auroc": auroc(preds, hard) if 0 < sum(hard) < len(hard) else None, "val_steps": n,
            "val_threshold": best_threshold([p for p, _ in paths], [y for _, y in paths])}, scores


MAX_THRESHOLD_TRAIN = 4000  # training paths (rank 0's shard) scored to pick a step-level threshold
MIN_THRESHOLD_PATHS = 10  # clean and erroneous validation paths each, to pick the threshold on paths


def choose_threshold(model: torch.nn.Module, val: Sequence[PRMExample], train: Sequence[PRMExample], pad_id: int,
                     device: torch.device, batch_size: int,
                     val_scores: list[list[float]] | None = None) -> tuple[float | None, str]:
    """(the ProcessBench threshold to store with the PRM, how it was picked).

    With at least MIN_THRESHOLD_PATHS clean and as many erroneous validation paths, the one
    that maximises F1 on them (`best_threshold`: the benchmark's own objective). Tree-search
    labels rarely give that many clean paths, so otherwise, for a likelihood-only PRM, its score
    of a step with a token the reference LM gives probability 1/e (`prm.likelihood_threshold`), and
    for any other PRM the split of its own scores
    of the validation and `train` labelled steps into two groups (`two_group_threshold`, no
    labels: tree-search labels are wrong both ways often enough to pull a fitted threshold into
    the wrong steps' group). `val_scores`: the final model's scores of `val` when the last
    validation already computed them (scored here otherwise)."""
    from mathprm.eval.processbench import best_threshold, two_group_threshold

    if val_scores is None:
        val_scores, _, _ = score_examples(model, val, pad_id, device, batch_size)
    firsts = [first_zero(e.targets) for e in val]
    n_clean = sum(y == -1 for y in firsts)
    if n_clean >= MIN_THRESHOLD_PATHS and len(firsts) - n_clean >= MIN_THRESHOLD_PATHS:
        return best_threshold(val_scores, firsts), (f"F1 on {len(firsts)} validation paths ({n_clean} clean, "
                                                    f"{len(firsts) - n_clean} with a step labelled 0)")
    doubt = likelihood_threshold(model)
    if doubt is not None:
        return doubt, (f"the score of a step whose least likely token the reference LM gives probability 1/e "
                       f"(a likelihood-only PRM): only {n_clean} clean validation paths")
    train_scores, _, _ = score_examples(model, train, pad_id, device, batch_size)
    scores = [x for ss in [*val_scores, *train_scores] for x in ss]
    return two_group_threshold(scores), (f"the split of the scores of {len(scores)} labelled steps of {len(val)} "
                                         f"validation and {len(train)} training paths into two groups (Otsu): only "
                                         f"{n_clean} clean validation paths")


# ----------------------------------------------------------------------------- data on Ray


# ----------------------------------------------------------------------------- Ray shell


def train_prm(cfg: TrainPRMConfig) -> Path:
    """Train (or reuse, or resume) the PRM; returns its directory."""

    def prepare(out: Path) -> tuple[dict, dict]:
        from ray.train import DataConfig

        from mathprm.ray_utils import init_ray

        check_model_dir(cfg.base, "base")
        fmt = data_step_format(cfg.data, cfg.separator)
        init_ray(cfg.ray_address, cfg.num_cpus)
        data = solutions_dataset(cfg.data, fmt)
        frac = cfg.val_fraction
        train_ds = data.filter(lambda r: not is_validation(r["problem_id"], frac)).materialize()
        val_ds = data.filter(lambda r: is_validation(r["problem_id"], frac)).materialize()
        n_train, n_val = train_ds.count(), val_ds.count()
        per_epoch = n_train // (cfg.batch_size * cfg.num_workers)
        if n_train == 0:
            raise ConfigError(f"data: {cfg.data} holds no labelled solution for training ({n_val} went to validation)")
        if per_epoch < 1:
            raise ConfigError(f"batch_size: {cfg.batch_size} x {cfg.num_workers} workers is more than the "
                              f"{n_train} training solutions in {cfg.data}")
        total = per_epoch * cfg.epochs
        print(f"[train-prm] {n_train} training / {n_val} validation solutions from {cfg.data}; "
              f"{cfg.epochs} epochs x {per_epoch} steps = {total} steps", flush=True)
        config = {**to_dict(cfg), "data": str(Path(cfg.data).resolve()), "base": str(Path(cfg.base).resolve()),
                  "separator": fmt.separator, "out_dir": str(out), "_total_steps": total, "_per_epoch": per_epoch,
                  "_n_train": n_train, "_n_val": n_val}
        return config, {"datasets": {"train": train_ds, **({"val": val_ds} if n_val else {})},
                        "dataset_config": DataConfig(datasets_to_split=["train"])}  # rank 0 validates on all of val

    return launch(PRM_STAGE, cfg, _train_loop, prepare, {"data": cfg.data, "base": cfg.base, "out_dir": cfg.out_dir})


@dataclasses.dataclass
class PriorPRMConfig:
    """`mathprm prm-prior`: a PRM with no labels and no training. Its score of a step is
    sigmoid(the lowest log-probability `base` gives any token of the solution so far): the
    likelihood prior that `train-prm` with `hidden_head: false` starts from and then only
    calibrates (a weight and a bias: the ranking of steps stays the prior's). Use it to try a
    stronger LM as the verifier before labelling anything."""

    base: str = "runs/arith/checker"  # any HF causal-LM directory; it must compute the steps better than the policy
    separator: str = "\n"  # the step separator of the solutions it will score: the arithmetic world's
                            # (MATH-style solutions and ProcessBench: separator='"\n\n"' on the command line)
    out_dir: str = "runs/arith/prm_prior"
    overwrite: bool = False  # replace a finished PRM in out_dir

    def __post_init__(self) -> None:
        StepFormat(self.separator)  # ValueError naming `separator`


def save_prior_prm(cfg: PriorPRMConfig) -> Path:
    """Write (or reuse) the prior over `cfg.base` into `cfg.out_dir`, atomically; returns it. Its
    ProcessBench threshold is `prm.likelihood_threshold`: the score of a step whose least likely
    token the LM gives probability 1/e."""
    from transformers import AutoTokenizer

    from mathprm.ray_utils import check_job_paths

    check_job_paths(base=cfg.base, out_dir=cfg.out_dir)
    out = Path(cfg.out_dir).resolve()
    if reuse_finished(out, cfg.overwrite, PRM_STAGE, "prm-prior"):
        return out
    model = build_prm(cfg.base, features=["prefix_min_logp"], hidden_head=False)  # FileNotFoundError names base
    threshold = likelihood_threshold(model)
    threshold_from = "the score of a step whose least likely token the LM gives probability 1/e (untrained prior)"
    with atomic.directory(out, overwrite=cfg.overwrite) as tmp:
        save_prm(model, AutoTokenizer.from_pretrained(cfg.base), StepFormat(cfg.separator), tmp,
                 {"base": cfg.base, "data": None, "lora_r": 0, "threshold": threshold, "threshold_from": threshold_from})
        atomic.write_json(tmp / PRM_STAGE.summary_file, {"steps": 0, "prior": True, "threshold": threshold,
                                               "config": to_dict(cfg)})
    print(f"[prm-prior] saved the untrained prior over {cfg.base} to {out} (threshold {threshold:.4f})", flush=True)
    return out


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    from transformers import AutoTokenizer

    total, per_epoch = config.pop("_total_steps"), config.pop("_per_epoch")
    n_train, n_val = config.pop("_n_train"), config.pop("_n_val")
    cfg = TrainPRMConfig(**config)
    fmt = StepFormat(cfg.separator)
    with loading(cfg.base):
        tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    prompter = Prompter(tokenizer, fmt, cfg.system_prompt)  # the policy's prompts, chat template and all
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(cfg.seed)
    model = build_prm(cfg.base, cfg.features, hidden_head=cfg.hidden_head)
    if cfg.lora_r:  # adapters on the backbone's linear layers (not its LM head); the PRM head trains in full
        model.lm = add_lora(model.lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    worker = Worker(PRM_STAGE, model, {"step": 0, "elapsed": 0.0, "first_loss": None, "last_loss": None, "dropped": 0},
                    lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=cfg.lr,
                                                weight_decay=cfg.weight_decay))
    state, rank, device, unwrapped = worker.state, worker.rank, worker.device, worker.unwrapped

    val_examples: list[PRMExample] = []
    if rank == 0 and n_val:
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=256, batch_format="pyarrow"):
            val_examples += usable_examples(rows_of(batch), prompter, cfg.max_length)

    if rank == 0 and val_examples and state.get("initial_val_bce") is None:
        # The untrained PRM's validation loss: what "it learned" is measured against (a batch
        # loss moves with each batch's rows; this is one fixed set).
        state["initial_val_bce"] = validate(unwrapped, val_examples, pad_id, device, cfg.batch_size * 2)[0]["val_bce"]
    gauges = _ray_metrics() if rank == 0 else None
    step, dropped = state["step"], state["dropped"]
    first_loss, last_loss, val = state["first_loss"], state["last_loss"], state.get("val", {})
    last_val_scores: list[list[float]] | None = None  # the final validation's, for the threshold
    started = time.monotonic() - state["elapsed"]
    window = Window(worker, 4)  # loss sum, batches, solutions, labelled steps
    epochs = EpochBatches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed, rank)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        batches = epochs.batches(epoch)
        for _ in range(skip):  # a resumed epoch: these batches were trained before the kill
            next(batches, None)
        while step < min(total, (epoch + 1) * per_epoch):
            batch = next(batches, None)
            # every rank stops an epoch together, or DDP would hang
            if not worker.reduce(torch.tensor([batch is not None], dtype=torch.int64), "min").item():
                step = (epoch + 1) * per_epoch  # a shard ran short (equal splits should prevent it): next epoch
                break
            examples = []
            for row in rows_of(batch):
                ex = to_example(row, prompter)
                if ex is None:
                    continue
                if len(ex.input_ids) > cfg.max_length:
                    dropped += 1
                    continue
                examples.append(ex)
            weight = 1.0 if examples else 0.0  # a batch of only too-long solutions: a zero-weight
            examples = examples or [PRMExample([pad_id], [0], [0.5])]  # step keeps DDP's ranks in step
            on_device = collate(examples, pad_id).to(device)
            loss = optimizer_step(worker.model, worker.optimizer, cfg.learning_rate(step, total),
                                  lambda: prm_loss(worker.model, on_device) * weight, cfg.precision == "bf16")
            step += 1
            window.add(loss, 1, len(examples), sum(len(e.positions) for e in examples))
            if step % cfg.log_every and step != total:
                continue
            stats, seconds = window.read()
            last_loss = float(stats[0] / stats[1])
            first_loss = last_loss if first_loss is None else first_loss
            metrics = {"step": step, "epoch": epoch, "loss": last_loss, "lr": cfg.learning_rate(step - 1, total),
                       "solutions_per_s": float(stats[2]) / seconds, "labelled_steps_per_s": float(stats[3]) / seconds,
                       "elapsed_s": time.monotonic() - started}
            if rank == 0 and val_examples and (step % cfg.eval_every == 0 or step == total):
                val, scored = validate(unwrapped, val_examples, pad_id, device, cfg.batch_size * 2)
                last_val_scores = scored if step == total else None
            metrics.update({k: v for k, v in val.items() if v is not None})
            if gauges is not None:
                gauges["steps"].inc(int(stats[1]) // max(1, worker.world))
                for key in ("loss", "solutions_per_s", "val_bce", "val_auroc"):
                    if metrics.get(key) is not None:
                        gauges[key].set(float(metrics[key]))
            shown = " ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
            worker.log(f"step {step}/{total} epoch {epoch} loss {last_loss:.4f} "
                       f"{metrics['solutions_per_s']:.1f} solutions/s {shown}")
            state = {"step": step, "elapsed": metrics["elapsed_s"], "first_loss": first_loss, "last_loss": last_loss,
                     "dropped": dropped, "val": val, "resumed_from": state.get("resumed_from", 0),
                     "initial_val_bce": state.get("initial_val_bce")}
            worker.report(state, metrics, checkpoint=step % cfg.checkpoint_every == 0 or step == total)

    if rank != 0:
        return
    kept = epochs.rows.slice(0, MAX_THRESHOLD_TRAIN) if epochs.rows is not None else None  # rank 0's shard
    train_examples = usable_examples(rows_of(kept), prompter, cfg.max_length) if kept is not None else []
    threshold, threshold_from = choose_threshold(unwrapped, val_examples, train_examples, pad_id, device,
                                                 cfg.batch_size * 2, last_val_scores)
    worker.log(f"ProcessBench threshold {threshold}: {threshold_from}")
    if cfg.lora_r:
        unwrapped.lm = unwrapped.lm.merge_and_unload()
    summary = {"steps": step, "first_loss": first_loss, "final_loss": last_loss,
               "initial_val_bce": state.get("initial_val_bce"), **val, "threshold": threshold,
               "train_solutions": n_train, "val_solutions": n_val, "dropped_too_long_rank0": dropped,
               "elapsed_s": time.monotonic() - started, "resumed_from_step": state.get("resumed_from", 0),
               "config": {**config}}
    worker.save(cfg.out_dir, cfg.overwrite, lambda tmp: save_prm(
        unwrapped, tokenizer, fmt, tmp, {"base": cfg.base, "data": cfg.data, "lora_r": cfg.lora_r,
                                         "threshold": threshold, "threshold_from": threshold_from,
                                         **prompter.describe()}), summary)
    worker.log(f"saved the PRM to {cfg.out_dir} after {step} steps")


def _ray_metrics() -> dict[str, Any]:
    """mathprm_prm_* (`mathprm.metrics`): the step counter and the loss / speed / validation gauges."""
    from mathprm.metrics import create

    return {key: create(f"mathprm_prm_{key}") for key in ("steps", "loss", "solutions_per_s", "val_bce", "val_auroc")}


def prm_loss(model: torch.nn.Module, batch: PRMBatch) -> torch.Tensor:
    """BCE of the step logits against the soft labels at the labelled steps (`optimizer_step`'s loss)."""
    return bce_step_loss(step_logits(model, batch), batch.targets, batch.step_mask)
