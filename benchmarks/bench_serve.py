"""The Serve app under load: guided search for concurrent clients, PRM batched vs unbatched.

    .venv/bin/python benchmarks/bench_serve.py [--requests 96] [--clients 16] [--n 8] [--write]

Starts the app of mathprm/serve.py on a local loopback Ray (or RAY_ADDRESS) with the demo's
models (runs/arith/policy, runs/arith/prm); without them, an untrained `tiny` policy and a
PRM on it are built in a temporary directory (speed only: the answers are then junk).
`--clients` threads post arith:hard test problems (seed 0) to /v1/solve with `guided@N` (the
app's default temperature, one seed per request) until `--requests` have been answered,
after one untimed warm-up request per client. Run twice: the PRM deployment's
`max_batch_size` 64 (solutions of every concurrent request share a forward batch) and 1 (one
forward pass per solution); everything else, the generator's batching included, is the same.
Reports problems/s, p50 / p95 latency, the accuracy, and the mean PRM batch the deployment
ran (its `stats()`); the throughput ratio batched / unbatched is the headline. Clients, proxy
and replicas share this machine's cores.

The end-to-end figure mixes in the generator, which guided@N waits on most of the time. So each
run then loads the PRM deployment alone: `--clients` threads send it scoring rounds through its
DeploymentHandle (what the ingress's HandleScorer sends: one question, `--n` candidate next
steps after a prefix of its reference solution, the candidates' results differing) until
`--prm-rounds` are scored, and report solutions scored per second; their ratio is what
`@serve.batch` itself buys. With --write the table replaces the
"## Serve: guided search under load" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import command_line, repo_relative, write_section  # noqa: E402

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.serve import ServeConfig  # noqa: E402

SECTION = "Serve: guided search under load"
BATCH_SIZES = (64, 1)  # the PRM deployment's max_batch_size: batched, then the unbatched baseline


def models(policy: Path, prm: Path, tmp: str) -> tuple[Path, Path, str]:
    """(policy, prm, how to describe them): the demo's, else untrained ones built in `tmp`."""
    if (policy / "config.json").is_file() and (prm / "prm_config.json").is_file():
        return policy, prm, f"`{repo_relative(policy)}` and `{repo_relative(prm)}`"
    from mathprm.models.policy import build_policy
    from mathprm.models.prm import build_prm, save_prm
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.steps import StepFormat

    print(f"no policy/PRM at {policy} / {prm}: building untrained tiny ones in {tmp} (speed only)", flush=True)
    tok = build_char_tokenizer()
    policy, prm = Path(tmp) / "policy", Path(tmp) / "prm"
    build_policy("tiny", tok).save_pretrained(policy)
    tok.save_pretrained(policy)
    save_prm(build_prm(policy), tok, StepFormat(arith.STEP_SEPARATOR), prm, {"base": "untrained tiny"})
    return policy, prm, "untrained `tiny` policy and PRM (no demo models found; answers are junk)"


def drain(count: int, clients: int, client: Callable[[Callable[[], int | None]], None]) -> float:
    """Run `client(next_index)` in `clients` threads until the indices 0..count-1 are handed out
    (`next_index()` gives the next or None); the wall time in seconds."""
    lock, issued = threading.Lock(), [0]

    def next_index() -> int | None:
        with lock:
            if issued[0] >= count:
                return None
            issued[0] += 1
            return issued[0] - 1

    threads = [threading.Thread(target=client, args=(next_index,)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def load(url: str, problems: list, clients: int, requests_total: int, n: int) -> dict:
    """`clients` threads solving `problems` in turn until `requests_total` answers; latencies,
    accuracy and wall time."""
    import requests

    lock, latencies, correct, failures = threading.Lock(), [], [0], []

    def client(next_index: Callable[[], int | None]) -> None:
        with requests.Session() as session:
            # The app demands the key named by ServeConfig.api_key_env when it is set in the
            # environment its replicas inherit (this shell's, on the local cluster this starts).
            if key := os.environ.get(ServeConfig.api_key_env):
                session.headers["Authorization"] = f"Bearer {key}"
            while (i := next_index()) is not None:
                p = problems[i % len(problems)]
                t0 = time.perf_counter()
                r = session.post(url, json={"question": p.question, "strategy": "guided", "n": n, "seed": i},
                                 timeout=600)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    correct[0] += r.json()["answer"] == p.answer

    wall = drain(requests_total, clients, client)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"requests": len(latencies), "wall_s": round(wall, 2), "problems_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0], 3),
            "accuracy": round(correct[0] / len(latencies), 3)}


def scoring_rounds(problems: list, n: int, count: int) -> list[tuple[list[str], list[list[str]]]]:
    """`count` rounds of a guided@n search as the PRM deployment gets them: per round, n solutions
    that share a prefix of one problem's reference solution and differ in the next step's result
    (the first is the right step), for `score_solutions(questions, steps)`."""
    import random

    rng, rounds = random.Random(0), []
    for i in range(count):
        p = problems[i % len(problems)]
        steps = arith.solution_steps(p)
        k = rng.randrange(len(steps) - 1)  # the next step is an operation, not the answer line
        head, _, result = steps[k].rpartition(" = ")
        candidates = [f"{head} = {int(result) + d}" for d in range(n)]
        rounds.append(([p.question] * n, [steps[:k] + [c] for c in candidates]))
    return rounds


def prm_load(handle, rounds: list, clients: int) -> dict:
    """`clients` threads sending `rounds` to the PRM deployment's handle; solutions per second."""
    lock, latencies = threading.Lock(), []

    def client(next_index: Callable[[], int | None]) -> None:
        while (i := next_index()) is not None:
            t0 = time.perf_counter()
            scores = handle.score_solutions.remote(*rounds[i]).result()
            dt = time.perf_counter() - t0
            if len(scores) != len(rounds[i][0]):
                raise RuntimeError(f"round {i}: {len(scores)} score lists for {len(rounds[i][0])} solutions")
            with lock:
                latencies.append(dt)

    wall = drain(len(rounds), clients, client)
    if len(latencies) != len(rounds):
        raise RuntimeError(f"PRM load: {len(rounds) - len(latencies)} of {len(rounds)} rounds failed")
    solutions = sum(len(r[0]) for r in rounds)
    return {"prm_rounds": len(rounds), "prm_solutions_per_s": round(solutions / wall, 1),
            "prm_round_p50_s": round(statistics.median(latencies), 3)}


def with_prm_batches(prm, work: Callable[[], dict]) -> tuple[dict, tuple[int, float, int]]:
    """`work()`'s result, and the PRM deployment's Serve batches during it (its `stats()` before
    and after): how many, their mean size in solutions, the largest so far."""
    before = prm.stats.remote().result()
    result = work()
    after = prm.stats.remote().result()
    batches, items = after["batches"] - before["batches"], after["items"] - before["items"]
    return result, (batches, round(items / batches, 2) if batches else 0.0, after["largest_batch"])


def run(policy: Path, prm_dir: Path, args: argparse.Namespace) -> list[dict]:
    from ray import serve

    from mathprm.ray_utils import init_ray
    from mathprm.serve import build_app

    init_ray(dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/solve"
    problems = arith.generate(args.difficulty, max(args.requests, args.clients), seed=0, split="test")
    rounds = scoring_rounds(problems, args.n, args.prm_rounds)
    rows = []
    try:
        for size in BATCH_SIZES:
            app = build_app({"policy": str(policy), "prm": str(prm_dir), "dataset": f"arith:{args.difficulty}",
                             "device": "cpu", "search": {"n": args.n}, "limits": {"n": args.n},
                             "prm_batch": {"max_batch_size": size, "batch_wait_timeout_s": args.batch_wait_s}})
            serve.run(app, name="bench", route_prefix="/", blocking=False)
            print(f"PRM max_batch_size {size}: warming up", flush=True)
            load(url, problems[::-1], args.clients, args.clients, args.n)  # untimed: first calls, lazy init
            prm = serve.get_deployment_handle("PRMDeployment", app_name="bench")
            result, (batches, mean, largest) = with_prm_batches(
                prm, lambda: load(url, problems, args.clients, args.requests, args.n))
            result |= {"prm_max_batch_size": size, "prm_batches": batches, "mean_prm_batch": mean,
                       "largest_prm_batch": largest}
            prm_load(prm, rounds[: args.clients], args.clients)  # untimed warm-up
            alone, (_, result["prm_alone_mean_batch"], _) = with_prm_batches(
                prm, lambda: prm_load(prm, rounds, args.clients))
            result |= alone
            print(result, flush=True)
            rows.append(result)
            serve.delete("bench")
    finally:
        serve.shutdown()
    return rows


def table(rows: list[dict], source: str, args: argparse.Namespace) -> str:
    lines = ["| PRM max_batch_size | problems/s | p50 latency | p95 latency | mean PRM batch | accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prm_max_batch_size']} | {r['problems_per_s']:.2f} | {r['p50_s']:.2f} s | "
                     f"{r['p95_s']:.2f} s | {r['mean_prm_batch']:.1f} | {r['accuracy']:.1%} |")
    by_size = {r["prm_max_batch_size"]: r for r in rows}
    ratio = by_size[BATCH_SIZES[0]]["problems_per_s"] / by_size[BATCH_SIZES[1]]["problems_per_s"]
    alone = by_size[BATCH_SIZES[0]]["prm_solutions_per_s"] / by_size[BATCH_SIZES[1]]["prm_solutions_per_s"]
    lines += ["", f"Throughput batched / unbatched: **{ratio:.2f}x** end to end.", "",
              "The PRM deployment alone (its handle, the same clients, no generator):", "",
              "| PRM max_batch_size | solutions scored / s | p50 round latency | solutions per Serve batch |",
              "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prm_max_batch_size']} | {r['prm_solutions_per_s']:.0f} | {r['prm_round_p50_s'] * 1e3:.0f} ms | "
                     f"{r['prm_alone_mean_batch']:.1f} |")
    lines += ["", f"PRM throughput batched / unbatched: **{alone:.2f}x**.", "",
              f"{args.clients} concurrent clients, {rows[0]['requests']} arith:{args.difficulty} test problems per "
              f"run (seed 0), `guided@{args.n}` at the app's default temperature, one seed per request, after one "
              f"warm-up request per client. Models: {source}. One replica per deployment (generator batching on "
              f"in both runs, PRM `batch_wait_timeout_s` {args.batch_wait_s}); clients, HTTP proxy and replicas "
              "share the machine's cores. The PRM-alone rows: "
              f"{rows[0]['prm_rounds']} rounds of {args.n} solutions each (a prefix of a problem's reference solution and "
              f"{args.n} candidate next steps whose results differ), sent by {args.clients} threads through the "
              "deployment's handle. A Serve batch's solutions go through the model in forward batches of at most "
              "max_batch_size, so at 1 every solution is a forward pass of its own."]
    return "\n".join(lines)


def figures(rows: list[dict], args: argparse.Namespace) -> list[tuple[str, str]]:
    """Rows of docs/BENCHMARKS.md's figures table: end to end batched vs unbatched (a run with a failed
    request raises before this), and the PRM deployment alone."""
    by_size = {r["prm_max_batch_size"]: r for r in rows}
    batched, unbatched = by_size[BATCH_SIZES[0]], by_size[BATCH_SIZES[1]]

    def speed(r: dict) -> str:
        return f"{r['problems_per_s']:.2f} problems/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s"

    return [("Serve: guided search under concurrent clients",
             f"{args.clients} clients, guided@{args.n}, {batched['requests']} requests per run, none failed; "
             f"PRM batched: {speed(batched)}; unbatched: {speed(unbatched)} "
             f"({batched['problems_per_s'] / unbatched['problems_per_s']:.2f}x)"),
            ("Serve: PRM deployment alone, batched vs unbatched",
             f"{batched['prm_solutions_per_s']:.0f} vs {unbatched['prm_solutions_per_s']:.0f} solutions scored/s "
             f"({batched['prm_solutions_per_s'] / unbatched['prm_solutions_per_s']:.2f}x)")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(REPO / "runs" / "arith" / "policy"))
    parser.add_argument("--prm", default=str(REPO / "runs" / "arith" / "prm"))
    parser.add_argument("--difficulty", default="hard", help="arith preset of the problems")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="timed requests per run")
    parser.add_argument("--n", type=int, default=8, help="guided@N: candidates per step")
    parser.add_argument("--prm-rounds", type=int, default=400, help="scoring rounds sent to the PRM alone per run")
    parser.add_argument("--batch-wait-s", type=float, default=0.01, help="PRM batch_wait_timeout_s")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if min(args.requests, args.clients, args.prm_rounds, args.n) < 1:
        parser.error("--requests, --clients, --prm-rounds and --n must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        policy, prm, source = models(Path(args.policy), Path(args.prm), tmp)
        rows = run(policy, prm, args)
    text = table(rows, source, args)
    print(text)
    out = REPO / "runs" / "bench" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, {"runs": rows, "models": source, "clients": args.clients, "n": args.n})
    if args.write:
        command = command_line("bench_serve.py", parser, args)
        write_section(SECTION, command, text, figures(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
