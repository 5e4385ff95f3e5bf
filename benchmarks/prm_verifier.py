"""How good can a learned PRM get in the arithmetic world, given exact labels and compute?

(Not a bench_*.py: sized for a GPU, so `make bench` does not run it on the CPU box.)

    python benchmarks/prm_verifier.py --policy runs/arith/policy --out runs/exp/verifier \\
        [--train-problems 4000] [--minutes 4] [--variants head+min,head+min@3e-4,head] [--device cuda]

The demo's PRM (`mathprm/configs/prm_arith.yaml`) is the policy's own confidence (weight and bias
on `prefix_min_logp`); issue 5's targets (step AUROC >= 0.95, first-error F1 >= 80) need a
verifier that sees errors the policy is confident about. This asks whether training can give
one, with no Ray and no tree search in the way (so it runs on a bare GPU machine):

1. data: the policy samples `--n` solutions at `--temperature` for `--train-problems` fresh
   arith:hard training-split problems; every step gets its exact label (`arith.step_labels`:
   1 while every step so far is right). 10 % of the problems (by hash) are held out.
2. training, one process per variant, side by side: `build_prm` on the policy (its backbone
   fine-tuned, a hidden-state head, optionally the frozen policy's likelihood features), BCE,
   AdamW with warmup and cosine decay, bf16 autocast on a GPU, for `--minutes`. The held-out
   AUROC is logged as it goes (`curve`), and the threshold is picked on held-out paths.
3. test: `--eval-problems` fresh arith:hard test problems (seed 0, as `mathprm evaluate-prm`),
   `--n` samples each; every variant and the untrained prior (the demo's recipe before its
   two parameters are fitted) score the same samples; step AUROC, first-error F1 at each
   PRM's own threshold, best-of-n (min) against majority.

Variants: `head` (hidden-state head only), `head+min` (plus `prefix_min_logp`), `head+all`
(plus all three features); `@LR` sets the learning rate (default `--lr`), `~B` the batch.
Writes `--out`/results.json (and data.jsonl, test.jsonl, one PRM directory per variant).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.generation import Prefix, Sampling  # noqa: E402
from mathprm.steps import StepFormat  # noqa: E402

FMT = StepFormat("\n")
FEATURE_SETS = {"head": [], "head+min": ["prefix_min_logp"],
                "head+all": ["step_min_logp", "step_mean_logp", "prefix_min_logp"]}


def log(msg: str) -> None:
    print(f"[verifier {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_variant(name: str, lr: float, batch: int) -> tuple[list[str], float, int]:
    base, _, rest = name.partition("@")
    base, _, b = base.partition("~")
    if "~" in rest:
        rest, _, b = rest.partition("~")
    if base not in FEATURE_SETS:
        raise SystemExit(f"--variants: unknown {base!r}; choose from {', '.join(FEATURE_SETS)} (+@LR, ~BATCH)")
    return FEATURE_SETS[base], float(rest) if rest else lr, int(b) if b else batch


def variant_dir(out: Path, name: str) -> Path:
    """Where variant `name` saves its PRM (and train_result.json) under `out`."""
    return out / f"prm_{name.replace('+', '_').replace('@', '_lr').replace('~', '_b')}"


# ----------------------------------------------------------------------------- data


def sample_labelled(gen, problems, n: int, temperature: float, seed: int, chunk: int) -> list[dict]:
    """One row per sampled solution with its steps, exact step labels and correctness."""
    from mathprm.data.answers import Judge

    rows, started = [], time.monotonic()
    for lo in range(0, len(problems), chunk):
        part = problems[lo : lo + chunk]
        sampling = Sampling(temperature=temperature, max_solution_tokens=384, seed=seed * 1_000_003 + lo)
        for p, rolls in zip(part, gen.rollouts([Prefix(p.question) for p in part], n, sampling)):
            judge = Judge(p)
            for r in rolls:
                steps = [s for s in r.steps if s.strip()]
                if steps:
                    rows.append({"problem_id": p.id, "question": p.question, "steps": steps,
                                 "targets": [float(x) for x in arith.step_labels(p, steps)],
                                 "correct": judge.correct(judge.key(r.text)), "key": judge.key(r.text)})
        done = min(lo + chunk, len(problems))
        el = time.monotonic() - started
        log(f"sampled {done}/{len(problems)} problems, {len(rows)} solutions, {el:.0f}s")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ----------------------------------------------------------------------------- one variant


def train_variant(args, name: str) -> dict:
    from transformers import AutoTokenizer

    from mathprm.models.prm import PRM_CONFIG_FILE, build_prm, collate, save_prm
    from mathprm.prompts import Prompter
    from mathprm.train.prm import choose_threshold, prm_loss, validate
    from mathprm.train.prm_data import is_validation, usable_examples
    from mathprm.train.run import optimizer_step
    from mathprm.train.schedule import warmup_cosine

    out = Path(args.out)
    features, lr, batch_size = parse_variant(name, args.lr, args.batch)
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.policy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = read_jsonl(out / "data.jsonl")
    train_rows = [r for r in rows if not is_validation(r["problem_id"], 0.1)]
    val_rows = [r for r in rows if is_validation(r["problem_id"], 0.1)][: args.max_val]
    train = usable_examples(train_rows, Prompter(tok, FMT), 512)
    val = usable_examples(val_rows, Prompter(tok, FMT), 512)
    model = build_prm(args.policy, features=features, hidden_head=True).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    budget = args.minutes * 60
    warmup = 50
    started = time.monotonic()
    curve, step, seen, epoch = [], 0, 0, 0
    rng = random.Random(args.seed)
    order: list[int] = []
    # Batches from length-sorted windows: less padding, same shuffle quality for this purpose.
    while True:
        el = time.monotonic() - started
        if el >= budget:
            break
        if len(order) < batch_size:
            idx = list(range(len(train)))
            rng.shuffle(idx)
            windows = [sorted(idx[i : i + batch_size * 16], key=lambda j: len(train[j].input_ids))
                       for i in range(0, len(idx), batch_size * 16)]
            chunks = [w[i : i + batch_size] for w in windows for i in range(0, len(w), batch_size)]
            rng.shuffle(chunks)
            order = [j for c in chunks for j in c]
            epoch += 1
        members, order = order[:batch_size], order[batch_size:]
        progress = min(1.0, el / budget)
        rate = warmup_cosine(lr, warmup, step, progress)
        batch = collate([train[j] for j in members], pad).to(device)
        loss = optimizer_step(model, opt, rate, lambda: prm_loss(model, batch), bf16)
        step += 1
        seen += len(members)
        if step % args.eval_every == 0:
            metrics, _ = validate(model, val, pad, device, 256)
            curve.append({"step": step, "seconds": round(time.monotonic() - started, 1), "epoch": epoch,
                          "loss": round(loss, 4), "val_bce": metrics["val_bce"], "val_auroc": metrics["val_auroc"]})
            log(f"{name}: step {step} epoch {epoch} loss {loss:.4f} val_bce {metrics['val_bce']} "
                f"val_auroc {metrics['val_auroc']} {seen / (time.monotonic() - started):.0f} solutions/s")
    elapsed = time.monotonic() - started
    metrics, val_scores = validate(model, val, pad, device, 256)
    threshold, how = choose_threshold(model, val, train[:2000], pad, device, 256, val_scores)
    target = variant_dir(out, name)
    tmp = target.with_name(target.name + ".tmp")
    model.eval()
    save_prm(model.float(), tok, FMT, tmp, {"threshold": threshold, "threshold_from": how, "variant": name})
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    result = {"variant": name, "features": features, "lr": lr, "batch": batch_size, "steps": step,
              "epochs": epoch, "train_solutions": len(train), "val_solutions": len(val), "seconds": round(elapsed, 1),
              "solutions_per_s": round(seen / elapsed, 1), "val_auroc": metrics["val_auroc"], "threshold": threshold,
              "curve": curve, "dir": str(target), "device": str(device), "bf16": bf16}
    atomic.write_json(target / "train_result.json", result)
    assert (target / PRM_CONFIG_FILE).is_file()
    return result


# ----------------------------------------------------------------------------- scoring the test samples


def score_records(records: list[dict], scorer, threshold: float, n: int) -> dict:
    from mathprm.eval.prm import summarise

    flat = [(r, s) for r in records for s in r["solutions"] if s["steps"]]
    for lo in range(0, len(flat), 512):
        part = flat[lo : lo + 512]
        scores = scorer.score([r["question"] for r, _ in part], [s["steps"] for _, s in part])
        for (_, s), sc in zip(part, scores):
            s["scores"] = sc
    for r in records:
        for s in r["solutions"]:
            s.setdefault("scores", [])
    return summarise(records, n, "min", threshold)


def prior_dir(args) -> Path:
    """The demo's recipe untrained (`mathprm prm-prior`): weight 1 on prefix_min_logp, bias 0; main()
    picks its threshold on the held-out training samples' exact labels (as its training would)."""
    from mathprm.train.prm import PriorPRMConfig, save_prior_prm

    return save_prior_prm(PriorPRMConfig(base=args.policy, separator=FMT.separator,
                                         out_dir=str(Path(args.out) / "prm_prior")))


def held_out_threshold(args, prm: Path) -> float:
    """ProcessBench's best threshold for `prm` on the held-out training samples."""
    from mathprm.eval.processbench import best_threshold
    from mathprm.models.prm import PRMScorer
    from mathprm.train.prm import first_zero
    from mathprm.train.prm_data import is_validation

    rows = [r for r in read_jsonl(Path(args.out) / "data.jsonl") if is_validation(r["problem_id"], 0.1)][: args.max_val]
    scores = PRMScorer(prm, device=args.device, batch_size=256).score([r["question"] for r in rows],
                                                                        [r["steps"] for r in rows])
    found = best_threshold(scores, [first_zero(r["targets"]) for r in rows])
    return 0.5 if found is None else found


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/arith/policy")
    ap.add_argument("--out", default="runs/exp/verifier")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-problems", type=int, default=4000)
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.85)
    ap.add_argument("--chunk", type=int, default=256, help="problems per generator call")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--max-val", type=int, default=3000)
    ap.add_argument("--variants", default="head+min,head+min@3e-4,head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help=argparse.SUPPRESS)  # a child process: train this variant
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only:
        train_variant(args, args.only)
        return

    from mathprm.data.problems import load_problems
    from mathprm.models.gen_hf import HFGenerator

    started = time.monotonic()
    if not (out / "data.jsonl").is_file() or not (out / "test.jsonl").is_file():
        gen = HFGenerator(args.policy, FMT, device=args.device, batch_prefixes=args.chunk)
        train_problems = arith.generate("hard", args.train_problems, seed=args.seed + 1, split="train")
        rows = sample_labelled(gen, train_problems, args.n, args.temperature, args.seed + 1, args.chunk)
        write_jsonl(out / "data.jsonl", rows)
        test_problems = load_problems("arith:hard", limit=args.eval_problems, seed=args.seed)
        test = sample_labelled(gen, test_problems, args.n, args.temperature, args.seed, args.chunk)
        write_jsonl(out / "test.jsonl", test)
        del gen
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    rows = read_jsonl(out / "data.jsonl")
    wrong = sum(t == 0 for r in rows for t in r["targets"])
    log(f"data: {len(rows)} solutions, {sum(len(r['targets']) for r in rows)} steps ({wrong} wrong), "
        f"{time.monotonic() - started:.0f}s")

    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        parse_variant(v, args.lr, args.batch)
    child_args = [a for a in sys.argv[1:]]
    procs = {v: subprocess.Popen([sys.executable, __file__, *child_args, "--only", v],
                                 env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // len(variants)))})
             for v in variants}
    failed = [v for v, p in procs.items() if p.wait() != 0]
    trained = []
    for v in variants:
        d = variant_dir(out, v)
        if (d / "train_result.json").is_file():
            trained.append(json.loads((d / "train_result.json").read_text()))

    # Test: the same samples for every PRM.
    from mathprm.models.prm import PRMScorer

    test = read_jsonl(out / "test.jsonl")
    by_problem: dict[str, dict] = {}
    for r in test:
        rec = by_problem.setdefault(r["problem_id"], {"id": r["problem_id"], "question": r["question"],
                                                      "solutions": []})
        first = next((i for i, t in enumerate(r["targets"]) if t == 0), -1)
        rec["solutions"].append({"steps": r["steps"], "key": r["key"], "correct": r["correct"], "first_error": first})
    records = list(by_problem.values())
    results = []
    prior = prior_dir(args)
    entries = [("prior (untrained prefix_min_logp)", prior, held_out_threshold(args, prior), None)]
    entries += [(t["variant"], Path(t["dir"]), t["threshold"] if t["threshold"] is not None else 0.5, t)
                for t in trained]
    for label, d, threshold, t in entries:
        summary = score_records(json.loads(json.dumps(records)), PRMScorer(d, device=args.device, batch_size=256),
                                threshold, args.n)
        row = {"prm": label, "dir": str(d), "threshold": round(threshold, 4),
               **{k: summary[k] for k in ("step_auroc", "first_error_f1", f"best_of_n@{args.n}", f"majority@{args.n}",
                                          f"pass@{args.n}", "n_steps", "wrong_steps")}}
        if t is not None:
            row["training"] = {k: t[k] for k in ("steps", "epochs", "seconds", "solutions_per_s", "val_auroc", "lr",
                                                 "batch", "train_solutions", "curve")}
        results.append(row)
        log(f"{label}: step AUROC {row['step_auroc']} F1 {row['first_error_f1']} "
            f"BoN {row[f'best_of_n@{args.n}']} maj {row[f'majority@{args.n}']}")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _doc import machine

    report = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/prm_verifier.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "device": args.device,
              "policy": args.policy, "train_solutions": len(rows), "train_wrong_steps": wrong,
              "failed_variants": failed, "results": results, "elapsed_s": round(time.monotonic() - started, 1)}
    atomic.write_json(out / "results.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    for row in results:
        print(json.dumps({k: v for k, v in row.items() if k != "training"}))


if __name__ == "__main__":
    main()
