"""The OpenAI face of the Serve app under load: concurrent `openai`-client streams for a fixed time.

    .venv/bin/python benchmarks/bench_serve_openai.py [--clients 16] [--seconds 60] [--n 8] [--write]

Starts the app (mathprm/serve/) on a local loopback Ray (or RAY_ADDRESS) with the demo's models
(runs/arith/policy, runs/arith/prm); without them, an untrained `tiny` policy and a PRM on it
(the demo's architecture, built as `bench_serve.py` does: speed only, the answers are junk).
`--clients` threads, each with its own `openai.OpenAI` client, stream
`/v1/chat/completions` with model `mathprm-guided@N` (the app's default temperature, one seed
per request) on arith:hard test problems, each with its gold answer, until `--seconds` have
passed, after one untimed warm-up request per client. Per request: the time to its first
decided step (the first chunk with content) and to its answer (the finishing chunk); a request
that raises, or whose stream ends without an answer, is an error. Reports requests/s, p50 / p95
of both times, errors and accuracy; writes runs/bench/serve_openai.json, and with --write the
section "## Serve: OpenAI streams under load" of docs/BENCHMARKS.md and its figures row.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import command_line, write_section  # noqa: E402
from bench_serve import models  # noqa: E402

from mathprm import atomic  # noqa: E402
from mathprm.data import arith  # noqa: E402

SECTION = "Serve: OpenAI streams under load"


def stream_once(client, model: str, problem, seed: int) -> dict:
    """One streamed request: seconds to the first step and to the answer, and its grade."""
    t0 = time.perf_counter()
    first = answer = None
    correct = None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": problem.question}],
                                            stream=True, seed=seed, extra_body={"gold_answer": problem.answer})
    for chunk in stream:
        if not chunk.choices:
            continue
        if first is None and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.choices[0].finish_reason is not None:
            answer = time.perf_counter() - t0
            correct = chunk.model_extra["mathprm"]["correct"]
    if answer is None:
        raise RuntimeError("the stream ended without an answer")
    return {"first_step_s": first if first is not None else answer, "answer_s": answer, "correct": bool(correct)}


def load(base: str, model: str, problems: list, clients: int, seconds: float, key: str) -> dict:
    """`clients` threads streaming until `seconds` have passed; the requests' times and errors."""
    import openai

    lock, issued = threading.Lock(), [0]
    done: list[dict] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        api = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
        while time.perf_counter() < deadline:
            with lock:
                i = issued[0]
                issued[0] += 1
            try:
                got = stream_once(api, model, problems[i % len(problems)], seed=i)
            except Exception as e:  # counted: the figure to report is that there are none
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                done.append(got)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(key: str, q: float) -> float:
        values = sorted(d[key] for d in done)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"requests": len(done), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
            "requests_per_s": len(done) / wall, "first_step_p50_s": pct("first_step_s", 0.5),
            "first_step_p95_s": pct("first_step_s", 0.95), "answer_p50_s": pct("answer_s", 0.5),
            "answer_p95_s": pct("answer_s", 0.95),
            "accuracy": statistics.fmean(d["correct"] for d in done) if done else float("nan")}


def run(policy: Path, prm: Path, args: argparse.Namespace) -> dict:
    from ray import serve

    from mathprm.ray_utils import init_ray
    from mathprm.serve import build_app

    init_ray(dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    problems = arith.generate(args.difficulty, 500, seed=0, split="test")
    model = f"mathprm-guided@{args.n}"
    try:
        serve.run(build_app({"policy": str(policy), "prm": str(prm), "dataset": f"arith:{args.difficulty}",
                             "device": "cpu", "search": {"n": args.n}, "api_key_env": None,
                             "limits": {"n": args.n, "timeout_s": 600}}),
                  name="bench", route_prefix="/", blocking=False)
        print("warming up", flush=True)
        warm = load(base, model, problems[::-1], args.clients, 0.001, "unused")  # one request per client
        if warm["errors"]:
            raise RuntimeError(f"warm-up failed: {warm['error_samples']}")
        print(f"{args.clients} streams for {args.seconds:g} s", flush=True)
        return load(base, model, problems, args.clients, args.seconds, "unused")
    finally:
        serve.shutdown()


def table(r: dict, source: str, args: argparse.Namespace) -> str:
    return "\n".join([
        "| clients | requests | requests/s | first step p50 / p95 | answer p50 / p95 | errors | accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.clients} | {r['requests']} | {r['requests_per_s']:.2f} | {r['first_step_p50_s']:.2f} / "
        f"{r['first_step_p95_s']:.2f} s | {r['answer_p50_s']:.2f} / {r['answer_p95_s']:.2f} s | {r['errors']} | "
        f"{r['accuracy']:.1%} |",
        "",
        f"{args.clients} threads, each an `openai.OpenAI` client streaming `/v1/chat/completions` with "
        f"`mathprm-guided@{args.n}` (the app's default temperature, one seed per request) on arith:{args.difficulty} "
        f"test problems with their gold answers, for {args.seconds:g} s after one warm-up request per client; "
        "a request still streaming at the end finishes and counts. First step: until the first chunk with content "
        "(the first decided step); answer: until the finishing chunk. Models: "
        f"{source}. One replica per deployment; clients, HTTP proxy and replicas share the machine's cores."])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(REPO / "runs" / "arith" / "policy"))
    parser.add_argument("--prm", default=str(REPO / "runs" / "arith" / "prm"))
    parser.add_argument("--difficulty", default="hard", help="arith preset of the problems")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--n", type=int, default=8, help="guided@N: candidates per step")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if min(args.clients, args.n) < 1 or args.seconds <= 0:
        parser.error("--clients and --n must be >= 1, --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="bench_serve_openai_") as tmp:
        policy, prm, source = models(Path(args.policy), Path(args.prm), tmp)
        result = run(policy, prm, args)
    text = table(result, source, args)
    print(text)
    out = REPO / "runs" / "bench" / "serve_openai.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, result | {"models": source, "clients": args.clients, "n": args.n, "seconds": args.seconds})
    if result["errors"]:
        print(f"{result['errors']} requests failed, e.g. {result['error_samples']}", file=sys.stderr)
        return 1
    if args.write:
        command = command_line("bench_serve_openai.py", parser, args)
        figure = (f"{args.clients} openai-client streams, guided@{args.n}, {args.seconds:g} s: "
                  f"{result['requests_per_s']:.2f} requests/s, first step p50 {result['first_step_p50_s']:.2f} s / "
                  f"p95 {result['first_step_p95_s']:.2f} s, answer p50 {result['answer_p50_s']:.2f} s / "
                  f"p95 {result['answer_p95_s']:.2f} s, {result['errors']} errors")
        write_section(SECTION, command, text, [("Serve: OpenAI streams under load", figure)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
