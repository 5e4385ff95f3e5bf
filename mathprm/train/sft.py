"""Supervised fine-tuning of the arithmetic policy on reference solutions, on Ray Train.

The training text of a problem is `StepFormat("\\n").prompt(question) + solution + eos`,
tokenised as `<s>` + prompt, then solution + `</s>`. The loss is the mean next-token
cross-entropy over the solution and eos only: prompt positions carry label -100, so the
model learns to write solutions, not to reproduce questions. Writing `</s>` after
"The answer is N" is what lets generation stop on its own.

The pure core (examples, collation, batch order, the loss) has no Ray in it. `train_sft` is
the Ray shell on the trainer skeleton (`mathprm.train.run`): a `TorchTrainer` with N workers
(gloo on CPU, NCCL on GPU), each generating its own train-split problems with a rank-dependent
seed, DDP via `prepare_model`, metrics and rank-0 checkpoints through `ray.train.report`. A
run resumes from its latest Ray Train checkpoint; the finished policy is written once,
atomically, with `save_pretrained`, so `AutoModelForCausalLM.from_pretrained` and vLLM load it
directly.
Training ends at `max_steps`, at `time_budget_min`, or (`stop_at_accuracy`) once greedy
accuracy on held-out train-split problems reaches a target, checked on all ranks alike.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mathprm import atomic
from mathprm.config import to_dict
from mathprm.data import arith
from mathprm.models import check_model_dir, loading
from mathprm.models.policy import MODEL_PRESETS, build_policy
from mathprm.models.tokenizer import build_char_tokenizer
from mathprm.prompts import Prompter
from mathprm.steps import StepFormat
from mathprm.train.run import Stage, Window, Worker, greedy_accuracy, launch, optimizer_step
from mathprm.train.schedule import warmup_cosine

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt and padding)
# A resumed run may train longer or log differently (`Stage.may_change`).
SFT_STAGE = Stage("sft", "sft", "policy", "sft_summary.json", may_change=(
    "max_steps", "time_budget_min", "log_every", "checkpoint_every", "snapshot_every", "out_dir", "overwrite",
    "ray_address", "num_cpus", "max_failures", "stop_at_accuracy", "eval_problems", "eval_every"))


@dataclasses.dataclass
class SFTConfig:
    # Difficulty -> weight of the training mixture, e.g. {easy: 1, medium: 2, hard: 3}.
    mixture: dict[str, float] = dataclasses.field(default_factory=lambda: {"easy": 1.0, "medium": 1.0, "hard": 2.0})
    num_problems: int = 20000  # training problems over all workers (train split only)
    word_fraction: float = 0.3  # share of problems phrased as word problems
    preset: str = "tiny"  # model size, a key of mathprm.models.policy.MODEL_PRESETS (ignored with init_from)
    # Start from this HF causal-LM directory's weights (a policy saved by this command) instead of a
    # fresh `preset` model: e.g. the PRM's checker, the base policy annealed further (checker_arith.yaml).
    init_from: str | None = None
    max_length: int = 512  # longer examples are dropped (counted), never truncated
    lr: float = 1e-3  # peak learning rate (AdamW), reached after `warmup_steps`
    warmup_steps: int = 100
    weight_decay: float = 0.0
    batch_size: int = 32  # examples per worker per step (global batch = batch_size * num_workers)
    bucket: int = 16  # batches per length-sorting window (1: no bucketing; more: less padding)
    max_steps: int = 3000  # the cosine schedule ends here
    time_budget_min: float | None = None  # stop cleanly (and still save) after this many minutes
    # Stop (and save) once greedy accuracy on `eval_problems` held-out train-split problems of
    # `eval_difficulty` reaches this: the policy is deliberately imperfect, and how imperfect
    # then does not depend on how many updates a machine fits in the time budget. None: no
    # held-out check.
    stop_at_accuracy: float | None = None
    eval_difficulty: str = "hard"
    eval_problems: int = 100
    eval_every: int = 250  # steps between held-out checks (a multiple of log_every)
    seed: int = 0
    # worker-group restarts from the last checkpoint after a worker or its node dies (Ray Train FailureConfig)
    max_failures: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: forward under bfloat16 autocast (GPU, or CPU with AVX-512 BF16)
    log_every: int = 50  # steps between progress lines / ray.train.report calls
    checkpoint_every: int = 500  # steps between rank-0 Ray Train checkpoints (a multiple of log_every)
    # Steps between loadable HF copies of the model in <out_dir>-snapshots/step-<N> (a multiple of log_every;
    # 0: none): the policy along its schedule, e.g. greedy accuracy against updates (the run keeps only its
    # latest Ray Train checkpoint).
    snapshot_every: int = 0
    out_dir: str = "runs/arith/policy"
    overwrite: bool = False  # retrain from scratch even if out_dir holds a finished policy
    ray_address: str | None = None  # None: RAY_ADDRESS or a local loopback cluster
    num_cpus: int | None = None  # CPUs of a local cluster started by this run

    def __post_init__(self) -> None:
        if not self.mixture:
            raise ValueError("mixture: give at least one difficulty with a weight")
        for name, weight in self.mixture.items():
            if name not in arith.PRESETS:
                raise ValueError(f"mixture: unknown difficulty {name!r}; difficulties: {', '.join(arith.PRESETS)}")
            if not weight > 0:
                raise ValueError(f"mixture: weight of {name!r} must be > 0, got {weight}")
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"preset: unknown model preset {self.preset!r}; presets: {', '.join(MODEL_PRESETS)}")
        positive = ("num_problems", "batch_size", "bucket", "max_steps", "num_workers", "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_problems < self.num_workers:
            raise ValueError(f"num_problems: must be >= num_workers ({self.num_workers}), got {self.num_problems}")
        if self.snapshot_every < 0 or self.snapshot_every % self.log_every:
            raise ValueError(f"snapshot_every: must be 0 or a multiple of log_every ({self.log_every}), "
                             f"got {self.snapshot_every}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(
                f"checkpoint_every: must be a multiple of log_every ({self.log_every}), got {self.checkpoint_every}"
            )
        if not 0.0 <= self.word_fraction <= 1.0:
            raise ValueError(f"word_fraction: must be in [0, 1], got {self.word_fraction}")
        max_positions = MODEL_PRESETS[self.preset].max_positions
        if not 8 <= self.max_length <= max_positions:
            raise ValueError(
                f"max_length: must be in [8, {max_positions}] for preset {self.preset!r}, got {self.max_length}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ValueError(f"time_budget_min: must be > 0 or null, got {self.time_budget_min}")
        if self.stop_at_accuracy is not None:
            if not 0.0 < self.stop_at_accuracy <= 1.0:
                raise ValueError(f"stop_at_accuracy: must be in (0, 1] or null, got {self.stop_at_accuracy}")
            if self.eval_difficulty not in arith.PRESETS:
                raise ValueError(f"eval_difficulty: unknown difficulty {self.eval_difficulty!r}; "
                                 f"difficulties: {', '.join(arith.PRESETS)}")
            if self.eval_problems < self.num_workers:
                raise ValueError(f"eval_problems: must be >= num_workers ({self.num_workers}), got {self.eval_problems}")
            if self.eval_every < 1 or self.eval_every % self.log_every:
                raise ValueError(f"eval_every: must be a multiple of log_every ({self.log_every}), got {self.eval_every}")

    def learning_rate(self, step: int, progress: float) -> float:
        """Linear warmup over `warmup_steps`, then cosine from `lr` to a tenth of it
        (`schedule.warmup_cosine`). `progress` in [0, 1] is how far the run is; the loop passes
        the larger of the step fraction and the time-budget fraction, so a time-bounded run
        still anneals."""
        return warmup_cosine(self.lr, self.warmup_steps, step, progress)


# ----------------------------------------------------------------------------- pure core


@dataclasses.dataclass
class Example:
    input_ids: list[int]  # (T,) <s> prompt solution </s>
    labels: list[int]  # (T,) IGNORE_INDEX on <s> and the prompt, else == input_ids


@dataclasses.dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor  # (B, T) IGNORE_INDEX on prompt and padding

    def to(self, device: torch.device | str) -> SFTBatch:
        return SFTBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))

    @staticmethod
    def collate(examples: Sequence[Example], pad_id: int) -> SFTBatch:
        """Right-pad to the longest example (training needs no left padding: no generation here)."""
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e.labels)
        return SFTBatch(ids, mask, labels)


def build_example(tokenizer: Any, question: str, solution: str, fmt: StepFormat = StepFormat("\n")) -> Example:
    """Token ids of `prompt(question) + solution + eos`, with the loss on solution + eos only."""
    prompt_ids = Prompter(tokenizer, fmt).ids(question)  # plain (no chat template): with <s> in front
    target_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids)


def mixture_counts(mixture: dict[str, float], n: int) -> dict[str, int]:
    """Split `n` problems over difficulties by weight (largest remainder, so they sum to `n`)."""
    total = sum(mixture.values())
    exact = {name: n * w / total for name, w in mixture.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


class BatchOrder:
    """Which examples make up step `step`'s batch: a pure function of (lengths, seed, step).

    Each epoch is a seeded shuffle cut into windows of `bucket` batches; inside a window the
    examples are sorted by length before being cut into batches, and the window's batches are
    then shuffled. Similar lengths share a batch, so padding (pure wasted compute on a CPU)
    shrinks, while the windows keep the data order random at the scale of the run. An epoch
    has `len(lengths) // batch_size` batches (a remainder waits for a later epoch's shuffle;
    a pool smaller than one batch is repeated). Being a function of the step, not of an
    iterator's state, is what makes a resumed run replay exactly the batches an uninterrupted
    run would have seen.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: str, bucket: int = 16) -> None:
        if not lengths:
            raise ValueError("BatchOrder needs at least one example")
        self.lengths, self.batch_size, self.seed, self.bucket = list(lengths), batch_size, seed, max(1, bucket)
        self.per_epoch = max(1, len(self.lengths) // batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"{self.seed}:{epoch}")
            n, need = len(self.lengths), self.per_epoch * self.batch_size
            order = [i for _ in range(-(-need // n)) for i in rng.sample(range(n), n)][:need]
            batches: list[list[int]] = []
            window = self.bucket * self.batch_size
            for w in range(0, need, window):
                chunk = sorted(order[w : w + window], key=lambda i: self.lengths[i])
                group = [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
                rng.shuffle(group)
                batches.extend(group)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def __call__(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        return self._batches(epoch)[k]


def sft_loss(model: torch.nn.Module, batch: SFTBatch) -> torch.Tensor:
    """The mean next-token loss of `batch` over its solution and eos tokens (`optimizer_step`'s loss)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


def rank_problems(cfg: SFTConfig, rank: int, world_size: int) -> list:
    """The training problems of worker `rank`, difficulty by difficulty of the mixture: its share
    of `num_problems` (rank 0 gets the largest), from its own seed stream (seed, rank)."""
    share = cfg.num_problems // world_size + (rank < cfg.num_problems % world_size)
    seed = cfg.seed * 1_000_003 + rank
    return [p for difficulty, n in mixture_counts(cfg.mixture, share).items() if n
            for p in arith.generate(difficulty, n, seed, split="train", word_problems=cfg.word_fraction)]


def check_problem_pool(cfg: SFTConfig) -> None:
    """Refuse, before any worker starts, a `num_problems` whose per-worker share asks a
    difficulty for more distinct train problems than it has (arith:easy has ~5.5k): draws rank
    0's share, the largest, as a worker would."""
    from mathprm.config import ConfigError

    try:
        rank_problems(cfg, 0, cfg.num_workers)
    except ValueError as e:
        raise ConfigError(f"num_problems: {cfg.num_problems} over {cfg.num_workers} worker(s) asks each worker for "
                          f"more problems than a difficulty's train split holds ({e}); lower num_problems, add "
                          "workers or lower that difficulty's mixture weight") from None


def training_examples(cfg: SFTConfig, tokenizer: Any, rank: int, world_size: int) -> tuple[list[Example], int]:
    """This worker's share of the training set (train split), and how many were too long.

    Each rank generates its own problems with a seed of (seed, rank), so no data moves
    between workers; chains may repeat across ranks, which at these pool sizes is rare.
    """
    examples, dropped = [], 0
    for p in rank_problems(cfg, rank, world_size):
        ex = build_example(tokenizer, p.question, p.solution)
        if len(ex.input_ids) > cfg.max_length:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise ValueError(f"max_length: every training example of rank {rank} is longer than {cfg.max_length}")
    return examples, dropped


def held_out_problems(cfg: SFTConfig) -> list:
    """The problems `stop_at_accuracy` is checked on: train-split (never test) problems of
    `eval_difficulty` from a seed stream no worker trains on (a chain may still repeat one a
    worker trains on, as chains may repeat across workers: rare at these sizes)."""
    return arith.generate(cfg.eval_difficulty, cfg.eval_problems, cfg.seed * 1_000_003 + 999_983, split="train")


def held_out_accuracy(model: torch.nn.Module, tokenizer: Any, problems: Sequence, rank: int, world: int) -> float:
    """Greedy accuracy of `model` (unwrapped) on `problems`, the same number on every rank."""
    from mathprm.models.gen_hf import HFGenerator

    was_training = model.training
    model.eval()
    generator = HFGenerator.from_model(model, tokenizer, StepFormat(arith.STEP_SEPARATOR))
    acc = greedy_accuracy(generator, problems, rank, world, arith.is_correct, max_solution_tokens=384)
    model.train(was_training)
    return acc


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where `snapshot_every` puts the model after `step` updates: <out_dir>-snapshots/step-<step>."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}-snapshots") / f"step-{step:06d}"


# ----------------------------------------------------------------------------- Ray shell


def train_sft(cfg: SFTConfig) -> Path:
    """Train (or reuse, or resume) the policy; returns the directory of the saved HF checkpoint."""

    def prepare(out: Path) -> tuple[dict, dict]:
        check_problem_pool(cfg)
        init_from = None
        if cfg.init_from is not None:
            init_from = str(Path(cfg.init_from).resolve())
            check_init_from(init_from, build_char_tokenizer())
        return {**to_dict(cfg), "out_dir": str(out), "init_from": init_from}, {}

    return launch(SFT_STAGE, cfg, _train_loop, prepare, {"out_dir": cfg.out_dir, "init_from": cfg.init_from})


def check_init_from(path: str | Path, tokenizer: Any) -> None:
    """`init_from` must be an HF causal-LM directory over this tokenizer's vocabulary (a policy
    this command saved): ValueError naming the field otherwise, before any worker starts."""
    from mathprm.config import ConfigError

    check_model_dir(path, "init_from")
    vocab = atomic.read_json(Path(path) / "config.json", "repair it or start from another policy").get("vocab_size")
    if vocab is not None and vocab < len(tokenizer):
        raise ConfigError(f"init_from: {path} has a vocabulary of {vocab} tokens, fewer than the character "
                          f"tokenizer's {len(tokenizer)}; start from a policy saved by `mathprm sft`")


def _initial_model(cfg: SFTConfig, tokenizer: Any) -> torch.nn.Module:
    if cfg.init_from is None:
        return build_policy(cfg.preset, tokenizer, seed=cfg.seed)  # same init everywhere; DDP broadcasts anyway
    from transformers import AutoModelForCausalLM

    with loading(cfg.init_from):
        return AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: DDP over `prepare_model`; rank 0 checkpoints and saves the policy."""
    import ray.train

    cfg = SFTConfig(**config)
    ctx = ray.train.get_context()
    tokenizer = build_char_tokenizer()
    examples, dropped = training_examples(cfg, tokenizer, ctx.get_world_rank(), ctx.get_world_size())
    worker = Worker(SFT_STAGE, _initial_model(cfg, tokenizer),
                    {"step": 0, "elapsed": 0.0, "time_frac": 0.0, "first_loss": None, "last_loss": None},
                    lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
    state, rank = worker.state, worker.rank

    order = BatchOrder([len(e.input_ids) for e in examples], cfg.batch_size, f"{cfg.seed}:{rank}", cfg.bucket)
    step, time_frac, first_loss, last_loss = (state[k] for k in ("step", "time_frac", "first_loss", "last_loss"))
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    started = time.monotonic() - state["elapsed"]
    window = Window(worker, 3)  # loss sum, batches, tokens since the last report
    stopped_by = "max_steps"
    held_out = held_out_problems(cfg) if cfg.stop_at_accuracy is not None else []
    accuracy_history: list[dict[str, float]] = list(state.get("accuracy_history", []))
    while step < cfg.max_steps:
        batch = SFTBatch.collate([examples[i] for i in order(step)], tokenizer.pad_token_id).to(worker.device)
        lr = cfg.learning_rate(step, max(step / cfg.max_steps, time_frac))
        loss = optimizer_step(worker.model, worker.optimizer, lr, lambda: sft_loss(worker.model, batch),
                              bf16=cfg.precision == "bf16")
        step += 1
        window.add(loss, 1.0, float(batch.attention_mask.sum()))
        if step % cfg.log_every and step != 1 and step != cfg.max_steps:
            continue
        # Every worker reaches this point at the same steps: stats and the stop decision are
        # all-reduced so all ranks agree (a rank that stopped alone would hang DDP).
        elapsed = time.monotonic() - started
        stats, seconds = window.read()
        frac = worker.reduce(torch.tensor([elapsed / budget_s if budget_s else 0.0], dtype=torch.float64), "max")
        last_loss = float(stats[0] / stats[1])
        first_loss = last_loss if first_loss is None else first_loss
        time_frac = float(frac[0])
        tokens_per_s = float(stats[2]) / seconds
        worker.log(f"step {step}/{cfg.max_steps} loss {last_loss:.4f} lr {lr:.2e} "
                   f"{tokens_per_s:,.0f} tok/s elapsed {elapsed:.0f}s")
        stop = budget_s is not None and time_frac >= 1.0
        stopped_by = "time_budget" if stop else stopped_by
        metrics = {"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}
        if held_out and step % cfg.eval_every == 0:
            # Every rank computes the same all-reduced accuracy, so all agree on stopping.
            acc = held_out_accuracy(worker.unwrapped, tokenizer, held_out, rank, worker.world)
            accuracy_history.append({"step": step, "held_out_accuracy": acc})
            metrics["held_out_accuracy"] = acc
            worker.log(f"step {step}: greedy accuracy {acc:.3f} on {len(held_out)} held-out "
                       f"arith:{cfg.eval_difficulty} problems (stop at {cfg.stop_at_accuracy})")
            if acc >= cfg.stop_at_accuracy:
                stop, stopped_by = True, "accuracy"
        state = {"step": step, "elapsed": elapsed, "time_frac": time_frac, "first_loss": first_loss,
                 "last_loss": last_loss, "resumed_from": state.get("resumed_from", 0),
                 "accuracy_history": accuracy_history}
        worker.report(state, metrics, checkpoint=stop or step == cfg.max_steps or step % cfg.checkpoint_every == 0)
        if rank == 0 and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            with atomic.directory(snapshot_dir(cfg.out_dir, step), overwrite=True) as tmp:
                worker.unwrapped.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        if stop:
            break

    def write(tmp: Path) -> None:
        worker.unwrapped.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    worker.save(cfg.out_dir, cfg.overwrite, write, {
        "steps": step, "first_loss": first_loss, "final_loss": last_loss, "elapsed_s": time.monotonic() - started,
        "stopped_by": stopped_by, "held_out_accuracy": accuracy_history,
        "resumed_from_step": state.get("resumed_from", 0), "examples_per_worker": len(examples),
        "dropped_too_long_rank0": dropped, "config": {**config}})
    worker.log(f"saved the policy to {cfg.out_dir} after {step} steps ({stopped_by})")
