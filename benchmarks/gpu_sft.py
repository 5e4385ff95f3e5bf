"""The larger policy of issue 6's "small policy + guided@8 vs the 4x larger policy's greedy",
trained on one GPU without Ray (a bare GPU machine has torch and transformers only).

(Not a bench_*.py: sized for a GPU, so `make bench` does not run it on the CPU box.)

    python benchmarks/gpu_sft.py --config mathprm/configs/sft_arith_small.yaml --out runs/exp/small_gpu \\
        [--minutes 5] [--snapshots 0.5,0.7,0.9] [--device cuda] [key=value ...]

On 2 CPU cores the `small` preset (4.3M parameters, 4.9x the demo's policy) gets ~2,500 updates
in 55 minutes, too few to learn exact + and - (docs/BENCHMARKS.md, "The 5x larger policy").
This runs the same recipe (`mathprm.train.sft`: its data, batch order, learning-rate schedule and
`train_step`) in one process on all the workers' data, with the per-worker batch times
`num_workers`, so the global batch is the Ray run's; the cosine runs to `max_steps` or `--minutes`, whichever is first. Held-out
greedy accuracy (the recipe's `held_out_problems`) is checked every `eval_every` steps, and the
policy is saved (bf16, to travel light) the first time it reaches each `--snapshots` accuracy:
`snap_0.5` is what the demo's stop rule (`stop_at_accuracy: 0.5`) would have kept. `final` is
the policy at the end of the budget. `--out`/log.json has the loss and accuracy curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathprm import atomic
from mathprm.config import load_config  # noqa: E402
from mathprm.models.tokenizer import build_char_tokenizer  # noqa: E402
from mathprm.train import sft  # noqa: E402
from mathprm.train.run import optimizer_step  # noqa: E402


def save(model: torch.nn.Module, tokenizer, out: Path, name: str, info: dict) -> None:
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(torch.bfloat16)
    with atomic.directory(out / name, overwrite=True) as tmp:
        copy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / sft.SFT_STAGE.summary_file, info)
    print(f"[gpu_sft] saved {out / name} ({info['step']} steps, held-out {info.get('held_out_accuracy')})", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--snapshots", default="0.5,0.7,0.9")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*", help="SFTConfig key=value")
    args = ap.parse_args(argv)
    recipe = load_config(sft.SFTConfig, args.config, args.overrides)
    world = recipe.num_workers
    cfg = dataclasses.replace(recipe, batch_size=recipe.batch_size * world, num_workers=1,
                              time_budget_min=args.minutes, eval_difficulty=recipe.eval_difficulty or "hard")
    thresholds = sorted(float(x) for x in args.snapshots.split(",") if x)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bf16 = cfg.precision == "bf16"  # the config says (the small preset: fp32; bf16 autocast went NaN on a GPU)

    tokenizer = build_char_tokenizer()
    examples, dropped = [], 0
    for rank in range(world):  # the Ray run's workers' shares together (each rank its own seed)
        share, too_long = sft.training_examples(recipe, tokenizer, rank, world)
        examples, dropped = examples + share, dropped + too_long
    model = sft.build_policy(cfg.preset, tokenizer, seed=cfg.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[gpu_sft] {cfg.preset}: {n_params / 1e6:.2f}M parameters on {device}, {len(examples)} examples "
          f"({dropped} too long), global batch {cfg.batch_size}, {args.minutes} min", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = sft.BatchOrder([len(e.input_ids) for e in examples], cfg.batch_size, f"{cfg.seed}:0", cfg.bucket)
    held_out = sft.held_out_problems(cfg)
    budget = args.minutes * 60
    log: dict = {"config": dataclasses.asdict(cfg), "params": n_params, "device": str(device), "curve": []}
    started, train_s, step, losses = time.monotonic(), 0.0, 0, []
    while step < cfg.max_steps:
        t0 = time.monotonic()
        batch = sft.SFTBatch.collate([examples[i] for i in order(step)], tokenizer.pad_token_id).to(device)
        lr = cfg.learning_rate(step, max(step / cfg.max_steps, train_s / budget))
        losses.append(optimizer_step(model, optimizer, lr, lambda: sft.sft_loss(model, batch), bf16=bf16))
        step += 1
        train_s += time.monotonic() - t0  # the budget counts training, not the held-out checks
        done = train_s >= budget or step == cfg.max_steps
        if step % cfg.eval_every and not done:
            continue
        acc = sft.held_out_accuracy(model, tokenizer, held_out, 0, 1)
        point = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "held_out_accuracy": acc,
                 "train_s": round(train_s, 1), "wall_s": round(time.monotonic() - started, 1)}
        losses.clear()
        log["curve"].append(point)
        print(f"[gpu_sft] {json.dumps(point)}", flush=True)
        while thresholds and acc >= thresholds[0]:
            save(model, tokenizer, out, f"snap_{thresholds.pop(0)}", point)
        if done:
            break
    save(model, tokenizer, out, "final", log["curve"][-1])
    atomic.write_json(out / "log.json", log)


if __name__ == "__main__":
    main()
