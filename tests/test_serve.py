"""The Serve app (mathprm/serve/) on real Ray Serve: HTTP solve, SSE stream, bad input, batching,
the API key, and the `serve run` CLI on serve_configs/guided.yaml.

One app serves every HTTP test (module fixture `app`); the CLI test runs before it, because
stopping `serve run` with Ctrl-C shuts Serve down on the cluster, as it does for a user.
Models: the memorised `tiny_policy_dir` and an untrained PRM built on it.
"""

import asyncio
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import MEMORISED

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"n": 8, "beam_width": 4, "max_steps": 8, "question_chars": 200, "messages": 4, "messages_chars": 400,
          "steps": 8, "step_chars": 100, "solution_chars": 400, "timeout_s": 60, "read_timeout_s": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prm_dir(tiny_policy_dir, tmp_path_factory) -> Path:
    """An untrained PRM on the tiny policy: scores are probabilities, just not good ones."""
    from mathprm.models.prm import build_prm, save_prm
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.steps import StepFormat

    path = tmp_path_factory.mktemp("serve_prm")
    save_prm(build_prm(str(tiny_policy_dir)), build_char_tokenizer(), StepFormat("\n"), path, {"base": "tiny"})
    return path


def _args(policy, prm, **more) -> dict:
    return {"policy": str(policy), "prm": None if prm is None else str(prm), "dataset": "arith", "device": "cpu",
            "search": {"n": 4, "max_steps": 6, "max_step_tokens": 32, "max_solution_tokens": 96},
            "limits": dict(LIMITS)} | more


# ----------------------------------------------------------------------------- without Ray


def test_bad_args_name_the_arg(model_dirs, tmp_path, monkeypatch):
    from mathprm.serve import load_serve_config

    policy, prm = model_dirs
    cases = {
        "policy": {"policy": str(tmp_path / "nowhere")},
        "prm": {"prm": str(policy)},  # a policy, not a PRM: no prm_config.json
        "backend": {"backend": "tgi"},
        "strategy": {"prm": None},  # the default strategy, guided, needs a PRM
        "search.n": {"search": {"n": 9}},  # over limits.n
        "limits.timeout_s": {"limits": LIMITS | {"timeout_s": 0}},
        "prm_batch.max_batch_size": {"prm_batch": {"max_batch_size": 0}},
        "separator": {"separator": "\n\n"},  # the PRM was trained with "\n"
        "bogus": {"bogus": 1},
    }
    for name, change in cases.items():
        with pytest.raises(ValueError, match=name):
            load_serve_config(_args(policy, prm) | change)
    monkeypatch.chdir(tmp_path)  # relative paths become absolute: replicas run in other directories
    cfg = load_serve_config(_args("policy", "prm"))
    assert cfg.policy == str(policy.resolve()) and cfg.prm == str(prm.resolve()) and cfg.separator == "\n"
    real_math = load_serve_config(_args(policy, None, strategy="majority@4", dataset="math500"))
    assert real_math.separator == "\n\n" and real_math.search.n == 4
    # Token caps left out are the dataset's, as in every stage; set ones are kept.
    caps = [(c.search.max_step_tokens, c.search.max_solution_tokens) for c in (
        load_serve_config(_args(policy, None, strategy="greedy", dataset=dataset, search=search))
        for dataset, search in [("arith", {}), ("math500", {}), ("gsm8k", {}), ("math500", {"max_step_tokens": 99})]
        for search in [{"n": 4, "max_steps": 6, **search}])]
    assert caps == [(64, 384), (512, 2048), (256, 1024), (99, 2048)]


class _SlowGenerator:
    """An async generator that never answers in time."""

    async def room(self, prefix):
        return 1 << 20

    async def prompt_tokens(self, prefix):
        return 12

    async def next_steps(self, prefixes, n, sampling):
        await asyncio.sleep(30)

    async def rollouts(self, prefixes, n, sampling):
        await asyncio.sleep(30)


class _ShortContextGenerator(_SlowGenerator):
    """A policy whose context has 10 tokens left after the question."""

    async def room(self, prefix):
        return 10


def test_a_question_that_leaves_no_room_for_a_step_is_a_422_naming_the_limit(model_dirs):
    from mathprm.serve import RequestError, Solver, SolveRequest, load_serve_config

    cfg = load_serve_config(_args(model_dirs[0], None, strategy="greedy"))
    solver = Solver(cfg, _ShortContextGenerator(), None)
    with pytest.raises(RequestError) as e:
        asyncio.run(solver.solve(SolveRequest(question="What is 1+1?")))
    assert e.value.status == 422 and e.value.field == "question"
    limit = cfg.search.max_step_tokens
    assert f"leaves 10 tokens of the policy's context, fewer than max_step_tokens ({limit})" in e.value.message


def test_the_solver_refuses_prm_strategies_without_a_prm_and_times_out(model_dirs):
    from mathprm.serve import RequestError, Solver, SolveRequest, load_serve_config

    cfg = load_serve_config(_args(model_dirs[0], None, strategy="greedy", limits=LIMITS | {"timeout_s": 0.2}))
    solver = Solver(cfg, _SlowGenerator(), None)
    with pytest.raises(RequestError) as e:
        solver.plan(SolveRequest(question="What is 1+1?", strategy="guided"))
    assert e.value.field == "strategy" and e.value.status == 400 and "needs a PRM" in e.value.message
    with pytest.raises(RequestError) as e:  # accepted by the schema, but no finite logits / T: a 422, not a 500
        solver.plan(SolveRequest(question="What is 1+1?", strategy="majority", temperature=1e-38))
    assert e.value.field == "temperature" and e.value.status == 422 and "greedy" in e.value.message
    for strategy in ("guided@\u00b2", "guided@\u0663"):  # str.isdigit() says yes to both
        with pytest.raises(RequestError) as e:
            solver.plan(SolveRequest(question="What is 1+1?", strategy=strategy))
        assert e.value.field == "strategy" and e.value.message.startswith("strategy: "), e.value.message
    t0 = time.perf_counter()
    with pytest.raises(RequestError) as e:
        asyncio.run(solver.solve(SolveRequest(question="What is 1+1?")))
    assert e.value.status == 504 and "timeout_s" in e.value.message
    assert time.perf_counter() - t0 < 5


def test_the_api_key_comes_from_the_environment_variable_the_config_names(model_dirs, monkeypatch):
    from mathprm.serve import api_key_digest, load_serve_config

    with pytest.raises(ValueError, match="api_key_env"):
        load_serve_config(_args(*model_dirs, api_key_env="NOT A NAME"))
    assert load_serve_config(_args(*model_dirs)).api_key_env == "MATHPRM_API_KEY"
    monkeypatch.delenv("MATHPRM_TEST_API_KEY", raising=False)
    assert api_key_digest("MATHPRM_TEST_API_KEY") is None and api_key_digest(None) is None
    monkeypatch.setenv("MATHPRM_TEST_API_KEY", "  ")
    assert api_key_digest("MATHPRM_TEST_API_KEY") is None  # blank: no key
    monkeypatch.setenv("MATHPRM_TEST_API_KEY", " s3cret\n")  # as read from a key file
    assert api_key_digest("MATHPRM_TEST_API_KEY") == hashlib.sha256(b"s3cret").digest()


# ----------------------------------------------------------------------------- the `serve run` CLI


def _wait_healthy(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"`serve run` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # the proxy or the app is still starting
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def test_an_internal_error_reaches_the_client_as_a_request_id_and_the_log_as_a_traceback():
    """A route that raises: the client gets a JSON 500 holding the request's id and never the
    exception's text (a Ray actor error's holds the remote traceback, paths and pids); the
    server log has the traceback under the same id. A request id that is not a plain token (a
    client's, with a newline to forge log lines) is replaced."""
    import logging

    from mathprm.serve.app import ErrorShield, logger

    secret = 'Traceback (most recent call last):\n  File "/srv/mathprm/x.py", line 1, pid=4242, actor_id=abc'

    async def route(scope, receive, send):
        raise RuntimeError(secret)

    async def call(request_id: bytes) -> tuple[int, dict]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/solve", "headers": [(b"x-request-id", request_id)]}
        await ErrorShield(route)(scope, None, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # the serve logger does not propagate to the root (caplog)
    logger.addHandler(handler)
    try:
        status, body = asyncio.run(call(b"req-123"))
        forged_status, forged = asyncio.run(call(b"x\nERROR forged line"))
    finally:
        logger.removeHandler(handler)
    assert status == forged_status == 500
    assert body == {"error": "internal error; the server log has the details under request_id req-123",
                    "field": None, "request_id": "req-123"}
    assert "\n" not in forged["request_id"] and len(forged["request_id"]) == 32
    assert "Traceback" not in json.dumps(forged) and "4242" not in json.dumps(forged)
    assert "req-123" in records[0].getMessage() and "pid=4242" in str(records[0].exc_info[1])
    assert forged["request_id"] in records[1].getMessage()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_run_cli_on_the_guided_yaml(ray_cluster, tiny_policy_dir, prm_dir, tmp_path):
    """`serve run` on a copy of serve_configs/guided.yaml (only the model paths and the port
    changed) against the test cluster, as a user would run it; Ctrl-C stops it and Serve."""
    config = yaml.safe_load((REPO / "serve_configs" / "guided.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"] |= {"policy": str(tiny_policy_dir), "prm": str(prm_dir)}
    copy = tmp_path / "guided.yaml"
    copy.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve_run.log"
    env = os.environ | {"RAY_ADDRESS": ray_cluster["gcs_address"]}
    with open(log, "w") as out:
        # Ctrl-C must reach it even when this run ignores SIGINT (a backgrounded `make test`
        # hands SIG_IGN down, and Python then installs no KeyboardInterrupt handler).
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(copy)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        base = f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}"
        _wait_healthy(base + "/healthz", proc, log)
        r = requests.post(base + "/v1/solve", json={"question": "What is 1+1?", "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == "2" and r.json()["strategy"] == "guided"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:  # the test failed before Ctrl-C: leave no app behind for the next tests
            proc.kill()
            proc.wait()
            from ray import serve

            serve.shutdown()
    with pytest.raises(requests.ConnectionError):  # Ctrl-C shut Serve down, proxy included
        requests.get(base + "/healthz", timeout=5)


# ----------------------------------------------------------------------------- one app for the HTTP tests


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_policy_dir, prm_dir):
    from ray import serve

    from mathprm.serve import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = _args(tiny_policy_dir, prm_dir, prm_batch={"max_batch_size": 32, "batch_wait_timeout_s": 0.05},
                 generator_batch={"max_batch_size": 8, "batch_wait_timeout_s": 0.02})
    serve.run(build_app(args), name="mathprm", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base + "/healthz", None, None)
    yield base
    serve.shutdown()


def _solve(base: str, body: dict, session=requests) -> dict:
    r = session.post(base + "/v1/solve", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.ray
@pytest.mark.slow
def test_solve_greedy_and_guided(app):
    for question, steps in MEMORISED.items():
        greedy = _solve(app, {"question": question, "strategy": "greedy"})
        assert [s["text"] for s in greedy["steps"]] == list(steps) and greedy["finished"]
        assert all(s["score"] is None for s in greedy["steps"]) and greedy["usage"]["prm_calls"] == 0
        guided = _solve(app, {"question": question, "strategy": "guided", "n": 3, "temperature": 0})
        assert [s["text"] for s in guided["steps"]] == list(steps)
        assert guided["answer"] == steps[-1].rsplit(" ", 1)[1] == greedy["answer"]
        assert all(0.0 <= s["score"] <= 1.0 for s in guided["steps"])
        usage = guided["usage"]
        assert usage["generated_tokens"] > 0 and usage["samples"] == 3 * usage["generator_calls"] > 0
        assert usage["prm_calls"] > 0 and usage["scored_steps"] >= len(steps)
        assert guided["config"]["n"] == 3 and guided["latency_ms"] > 0
    # The defaults from args fill what a request leaves out.
    assert _solve(app, {"question": "What is 1+1?"})["config"] == {
        "n": 4, "beam_width": 4, "max_steps": 6, "temperature": 0.85, "aggregation": "min", "tie_break": "first",
        "retry_below": 0.9, "max_retries": 2, "seed": 0}


def _events(response) -> list[tuple[str, dict]]:
    return _sse_events(response.iter_lines(decode_unicode=True))


def _sse_events(lines) -> list[tuple[str, dict]]:
    events, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[len("data: "):])))
    return events


@pytest.mark.ray
@pytest.mark.slow
def test_the_stream_sends_each_step_then_done(app):
    body = {"question": "What is 2+3?", "strategy": "guided", "n": 2, "temperature": 0}
    with requests.post(app + "/v1/solve/stream", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    kinds = [kind for kind, _ in events]
    assert kinds == ["step"] * len(MEMORISED["What is 2+3?"]) + ["done"]
    steps, done = [data for _, data in events[:-1]], events[-1][1]
    plain = _solve(app, body)
    assert done["answer"] == plain["answer"] == "5" and done["usage"] == plain["usage"]
    # A step's score is streamed when the step is chosen; the final result holds the same
    # number from a later pass over the longer solution (equal up to float rounding).
    for other in (done["steps"], plain["steps"]):
        assert [s["text"] for s in other] == [s["text"] for s in steps] == list(MEMORISED["What is 2+3?"])
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(other, steps))
    with requests.post(app + "/v1/solve/stream", json={"question": "What is 2+3?", "n": 99}, timeout=60) as r:
        assert r.status_code == 422 and r.json()["field"] == "n"  # refused before the stream starts


@pytest.mark.ray
@pytest.mark.slow
def test_health_and_openapi(app):
    health = requests.get(app + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["limits"]["n"] == LIMITS["n"] and "guided" in health["strategies"]
    assert requests.get(app + "/docs", timeout=10).status_code == 200
    spec = requests.get(app + "/openapi.json", timeout=10).json()
    assert {"/v1/solve", "/v1/solve/stream", "/healthz"} <= set(spec["paths"])


# ----------------------------------------------------------------------------- the page


def _label_run(root: Path) -> Path:
    """A tree-search output under `root` as the labelling stage writes it
    (arith/mcts/labels/part-*.parquet, `parts.write_labels_file`): problem p1 with three
    labelled steps in one part file, p2 with none in another. Returns the labels folder."""
    from mathprm.data.problems import Problem
    from mathprm.labels.parts import problems_block, write_labels_file
    from mathprm.labels.steptable import StepLabel
    from mathprm.labels.treesearch import SearchStats

    q = "What is 2+3?"
    labels = [StepLabel("p1", q, (), "2 + 3 = 5", 1.0, 4, 4, 0, "omegaprm"),
              StepLabel("p1", q, ("2 + 3 = 5",), "The answer is 5", 1.0, 1, 1, 1, "omegaprm"),
              StepLabel("p1", q, (), "2 + 3 = 6", 0.25, 4, 1, 0, "omegaprm")]
    folder = root / "arith" / "mcts" / "labels"
    folder.mkdir(parents=True)
    for i, (pid, labs) in enumerate([("p1", labels), ("p2", [])]):
        block = problems_block([(Problem(pid, q, "5", "arith:any"), labs, SearchStats(n_rollouts=9), 0.1)],
                               "hf:tiny", 0)
        write_labels_file(block, folder / f"part-test-{i:05d}-000.parquet")
    return folder


def test_the_pages_args_are_made_absolute_and_a_missing_problems_file_is_named(model_dirs, tmp_path, monkeypatch):
    from mathprm.serve import load_serve_config

    monkeypatch.chdir(tmp_path)  # relative paths become absolute: replicas run in other directories
    _memorised_problems(tmp_path / "p.jsonl")
    cfg = load_serve_config(_args(*model_dirs, labels_dir="runs", problems="p.jsonl"))  # runs/ need not exist
    assert (cfg.labels_dir, cfg.problems) == (str(tmp_path.resolve() / "runs"), str(tmp_path.resolve() / "p.jsonl"))
    cfg = load_serve_config(_args(*model_dirs, labels_dir=None, problems="sample:math500"))
    assert (cfg.labels_dir, cfg.problems) == (None, "sample:math500")
    with pytest.raises(ValueError, match="problems: 'nowhere.jsonl'"):
        load_serve_config(_args(*model_dirs, problems="nowhere.jsonl"))


def test_the_labels_view_reads_label_datasets_and_refuses_paths_outside_labels_dir(tmp_path):
    from mathprm.serve import RequestError
    from mathprm.serve.page import label_datasets, label_problem, label_problems

    root = tmp_path / "runs"
    _label_run(root)
    (root / ".hidden" / "labels").mkdir(parents=True)  # skipped, as a run's temporaries would be
    (root / ".hidden" / "labels" / "part-0.parquet").write_bytes(b"x")
    outside = _label_run(tmp_path / "outside")
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a link to a folder out of labels_dir
    (root / "partlink").mkdir()
    (root / "partlink" / "part-0.parquet").symlink_to(next(outside.glob("part-*")))  # a file out of it

    assert label_datasets(str(root)) == [{"path": "arith/mcts/labels", "files": 2}, {"path": "partlink", "files": 1}]
    assert label_datasets(str(tmp_path / "none yet")) == []
    assert label_problems(str(root), "arith/mcts/labels") == [{"id": "p1", "n_labels": 3, "n_rollouts": 9},
                                                              {"id": "p2", "n_labels": 0, "n_rollouts": 9}]
    p1 = label_problem(str(root), "arith/mcts/labels", "p1")
    assert p1["question"] == "What is 2+3?"
    # By depth, the search's order within a depth.
    assert [(lab["depth"], lab["step"], lab["score"], lab["n_correct"], lab["n_rollouts"]) for lab in p1["labels"]] == [
        (0, "2 + 3 = 5", 1.0, 4, 4), (0, "2 + 3 = 6", 0.25, 1, 4), (1, "The answer is 5", 1.0, 1, 1)]
    assert p1["labels"][2]["prefix"] == ["2 + 3 = 5"] and p1["labels"][0]["method"] == "omegaprm"
    assert label_problem(str(root), "arith/mcts/labels", "p2") == {"id": "p2", "question": None, "labels": []}

    refused = {  # path -> (status, what the message says)
        "../outside/arith/mcts/labels": (400, "without '..'"), str(outside): (400, "relative path"),
        "arith/../../outside/arith/mcts/labels": (400, "'..'"), "": (400, "relative path"),
        "arith\\..\\..": (400, "relative path"), "a\x00b": (400, "relative path"),
        "linked": (400, "links outside labels_dir"), "partlink": (400, "links outside labels_dir"),
        "arith": (404, "not a label dataset"), "arith/mcts/labels/part-test-00000-000.parquet": (404, "not a label"),
        "nowhere": (404, "not a label dataset")}
    for path, (status, says) in refused.items():
        for call in (lambda: label_problems(str(root), path), lambda: label_problem(str(root), path, "p1")):
            with pytest.raises(RequestError) as e:
                call()
            assert (e.value.status, e.value.field) == (status, "path") and says in e.value.message, (path, e.value)
            assert e.value.message.startswith("path: ") and str(root) not in e.value.message.replace(path, "")
    with pytest.raises(RequestError) as e:
        label_problem(str(root), "arith/mcts/labels", "p3")
    assert (e.value.status, e.value.field) == (404, "id")
    for call in (lambda: label_datasets(None), lambda: label_problems(None, "arith/mcts/labels")):
        with pytest.raises(RequestError, match="labels view is off") as e:
            call()
        assert e.value.status == 404
    # A damaged part file: a 422 naming the path and the file, relative to labels_dir.
    (root / "arith" / "mcts" / "labels" / "part-test-00001-000.parquet").write_bytes(b"not parquet")
    with pytest.raises(RequestError) as e:
        label_problems(str(root), "arith/mcts/labels")
    assert (e.value.status, e.value.field) == (422, "path") and str(root) not in e.value.message
    assert "arith/mcts/labels/part-test-00001-000.parquet is not a readable Parquet file" in e.value.message


def test_the_page_samples_problems_with_their_gold_answers(tmp_path, monkeypatch):
    from mathprm.serve import RequestError
    from mathprm.serve.page import sample_problems

    arith = sample_problems("arith", 6)  # any level: each in turn
    assert [p["id"].split(":")[1] for p in arith] == ["easy", "medium", "hard"] * 2
    assert all(p["question"] and p["answer"].lstrip("-").isdigit() for p in arith)
    assert sample_problems("arith:hard", 2) == [p for p in arith if ":hard:" in p["id"]]
    file = _memorised_problems(tmp_path / "memorised.jsonl")
    assert [(p["question"], p["answer"]) for p in sample_problems(str(file), 5)] == [
        ("What is 1+1?", "2"), ("What is 2+3?", "5")]
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path))  # a data folder without gsm8k in it
    with pytest.raises(RequestError, match="dataset 'gsm8k' is not on this server") as e:
        sample_problems("gsm8k", 3)
    assert e.value.status == 404 and str(tmp_path) not in e.value.message


def _memorised_problems(path: Path) -> Path:
    """A problems file (.jsonl, question and gold answer) of the questions the tiny policy has memorised."""
    path.write_text("".join(json.dumps({"question": q, "answer": steps[-1].rsplit(" ", 1)[1]}) + "\n"
                            for q, steps in MEMORISED.items()))
    return path


@pytest.fixture(scope="module")
def page_data(tmp_path_factory) -> tuple[Path, Path]:
    """(a labels_dir holding `_label_run`, a problems file of the memorised questions: the
    page's examples are then questions the tiny policy answers right)."""
    root = tmp_path_factory.mktemp("page")
    _label_run(root / "runs")
    return root / "runs", _memorised_problems(root / "problems.jsonl")


@pytest.mark.ray
@pytest.mark.slow
def test_the_page_and_its_files_are_open_and_its_data_behind_the_key(keyed_app):
    base, key = keyed_app
    auth = {"Authorization": f"Bearer {key}"}
    page = requests.get(base + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:300]
    assert "default-src 'self'" in page.headers["content-security-policy"] and 'src="static/app.js"' in page.text
    # Without the slash the page's relative URLs would resolve beside /keyed: it is sent to /keyed/.
    r = requests.get(base, timeout=10, allow_redirects=False)
    assert r.status_code in (307, 308) and r.headers["location"].endswith("/keyed/"), (r.status_code, r.headers)
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = requests.get(f"{base}/static/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (name, r.headers)
    for text in [page.text] + [requests.get(f"{base}/static/{n}", timeout=10).text for n in ("app.js", "style.css")]:
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text)  # nothing from elsewhere: works offline
    for path in ("/static/nothing.js", "/static/..%2Fapp.py", "/static/%2e%2e%2Fpage.py", "/static/../page.py",
                 "/static/", "/static/app.js/x"):  # no file beyond the folder's own, with or without the key
        for headers in ({}, auth):
            r = requests.get(base + path, headers=headers, timeout=10)
            assert r.status_code in (401, 404) and "import" not in r.text, (path, r.status_code, r.text[:200])
    data = ["/v1/problems", "/v1/labels", "/v1/labels/problems?path=arith/mcts/labels",
            "/v1/labels/problem?path=arith/mcts/labels&id=p1"]
    for path in data:
        assert requests.get(base + path, timeout=10).status_code == 401, path
    answers = [requests.get(base + path, headers=auth, timeout=30) for path in data]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    problems, datasets, label_problems, p1 = (r.json() for r in answers)
    assert [(p["question"], p["answer"]) for p in problems["data"]] == [("What is 1+1?", "2"), ("What is 2+3?", "5")]
    assert datasets["data"] == [{"path": "arith/mcts/labels", "files": 2}]
    assert [p["id"] for p in label_problems["data"]] == ["p1", "p2"]
    assert (label_problems["total"], label_problems["has_more"]) == (2, False)
    pages = [requests.get(base + f"/v1/labels/problems?path=arith/mcts/labels&offset={o}&limit=1", headers=auth,
                          timeout=10).json() for o in (0, 1, 2)]
    assert [[p["id"] for p in page["data"]] for page in pages] == [["p1"], ["p2"], []]
    assert [(page["total"], page["has_more"]) for page in pages] == [(2, True), (2, False), (2, False)]
    assert [lab["score"] for lab in p1["labels"]] == [1.0, 0.25, 1.0] and p1["question"] == "What is 2+3?"
    p1_url = "/v1/labels/problem?path=arith/mcts/labels"
    refused = {"/v1/labels/problems?path=../runs": "path", "/v1/labels/problem?path=%2Fetc&id=p1": "path",
               p1_url + "&id=nope": "id", p1_url: "id", "/v1/problems?limit=0": "limit",
               "/v1/labels/problems?path=arith/mcts/labels&limit=0": "limit",
               "/v1/labels/problems?path=arith/mcts/labels&offset=-1": "offset"}
    for path, field in refused.items():
        r = requests.get(base + path, headers=auth, timeout=10)
        assert 400 <= r.status_code < 500 and r.json()["field"] == field, (path, r.text)
        assert r.json()["error"].startswith(field + ": "), (path, r.text)


@pytest.fixture
def chrome():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium or no chromedriver on PATH: `make install` installs them where it can "
                    "(apt-get install chromium chromium-driver, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see any Content-Security-Policy refusal
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def _screenshot(driver, name: str) -> None:
    """With MATHPRM_SCREENSHOT=docs/img/serve_page.png set, the whole page as that file (`name`
    "" ) or beside it (`name` "labels": serve_page_labels.png)."""
    target = os.environ.get("MATHPRM_SCREENSHOT")
    if target:
        path = REPO / target
        path = path.with_name(f"{path.stem}_{name}{path.suffix}") if name else path
        height = driver.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom) + 24")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1100, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(str(path))
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.mark.ray
@pytest.mark.slow
def test_the_page_in_a_headless_browser_solves_a_dataset_problem_and_shows_labels(keyed_app, chrome):
    """The page as a user drives it: refused without the key and with a wrong one, then a
    problem picked from the dataset, solved by guided@2 at temperature 0 with each step, its
    score and its candidates shown as they stream, the answer checked against the gold one;
    then the labels view shows a labelled step's Monte-Carlo score."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, key = keyed_app
    driver = chrome
    wait = WebDriverWait(driver, 60)
    find = driver.find_element
    driver.get(base + "/")
    wait.until(lambda d: find(By.ID, "notice").is_displayed())
    assert "this server needs an API key" in find(By.ID, "notice").text  # the strategies were refused
    find(By.ID, "api-key").send_keys("not-the-key" + Keys.TAB)  # the key is taken when the box is left
    wait.until(lambda d: "the one given was refused" in find(By.ID, "notice").text)
    find(By.ID, "api-key").clear()
    find(By.ID, "api-key").send_keys(key + Keys.TAB)
    wait.until(lambda d: not find(By.ID, "notice").is_displayed()
               and "guided" in [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#strategy option")])

    find(By.ID, "pick").click()
    wait.until(lambda d: find(By.ID, "question").get_attribute("value"))
    assert find(By.ID, "question").get_attribute("value") == "What is 1+1?"
    assert find(By.ID, "gold-answer").text == "2"
    Select(find(By.ID, "strategy")).select_by_value("guided")
    find(By.ID, "n").send_keys("2")
    find(By.ID, "temperature").send_keys("0")
    find(By.ID, "solve").click()
    wait.until(lambda d: find(By.ID, "final").is_displayed() or find(By.ID, "notice").is_displayed())
    assert not find(By.ID, "notice").is_displayed(), find(By.ID, "notice").text

    steps = driver.find_elements(By.CSS_SELECTOR, "#steps > li.step")
    assert [s.find_element(By.CSS_SELECTOR, ":scope > pre.text").text for s in steps] == list(
        MEMORISED["What is 1+1?"])
    for step in steps:
        assert 0 <= float(step.find_element(By.CSS_SELECTOR, ":scope > .score .value").text) <= 1
        candidates = step.find_elements(By.CSS_SELECTOR, ".candidates li.candidate")
        assert len(candidates) == 2 and len(step.find_elements(By.CSS_SELECTOR, "li.candidate.chosen")) == 1
        assert all(0 <= float(c.find_element(By.CSS_SELECTOR, ".value").get_attribute("textContent")) <= 1
                   for c in candidates)
        step.find_element(By.CSS_SELECTOR, "summary").click()  # open: the screenshot shows them
    assert find(By.ID, "answer").text == "2"
    assert find(By.ID, "check").get_attribute("class") == "right" and "\u2713" in find(By.ID, "check").text
    _screenshot(driver, "")

    find(By.ID, "tab-labels").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#label-table tbody tr"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#label-table tbody tr")
    assert find(By.ID, "label-question").text == "What is 2+3?"
    assert [r.find_element(By.CSS_SELECTOR, "pre.text").text for r in rows] == [
        "2 + 3 = 5", "2 + 3 = 6", "The answer is 5"]
    assert [r.find_element(By.CSS_SELECTOR, ".score .value").text for r in rows] == ["1.000", "0.250", "1.000"]
    assert "1 / 4" in rows[1].text
    _screenshot(driver, "labels")
    refusals = [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refusals, refusals


def _malformed() -> list[tuple[str, str, object, str | None]]:
    """(method, path, body: bytes or a JSON value, the field the answer must name or None).
    Every bad body goes to both /v1/solve and /v1/solve/stream."""
    q = "What is 1+1?"
    bodies: list[tuple[object, str]] = []
    for raw in (b"{", b"{'question': 'x'}", b"nul", b"\xff\xfe\x00", b"", b"[1, 2", b'{"question": "x",}',
                b'{"question": NaN', b"\x00" * 64, b"question=x", b"{}}", b'{"question": "x"} tail', b'"open',
                b'{"question": "x", "n": }', b"true", b"1e400", b" "):
        bodies.append((raw, "body"))
    for value in ([], [q], "x", 3, None, True, 2.5):
        bodies.append((value, "body"))
    wrong = {
        "question": [5, 2.5, True, ["x"], {"q": q}, None, "", " " * 5, "\n\t", "x" * (LIMITS["question_chars"] + 1),
                     "9" * 1_000_000],
        "strategy": ["bogus", "guided@0", "guided@x", "greedy@3", "GUIDED", "", 3, ["guided"], "beam@-1", "mcts@",
                     "@8", "guided@8@2", " guided"],
        "n": [0, -1, -(10**6), LIMITS["n"] + 1, 10**40, "3", 2.5, True, [2], {"n": 2}],
        "beam_width": [0, -1, LIMITS["beam_width"] + 1, 10**9, "2", 1.5, False, [1]],
        "max_steps": [0, -1, -5, LIMITS["max_steps"] + 1, 10**12, "4", 3.0, [4]],
        "temperature": [5, -5, -0.1, 2.0001, 1e9, "hot", "0.5", [0.5], True, {"t": 1}],
        "seed": [-1, 1 << 63, 10**30, "1", 1.5, [0]],
    }
    for name, values in wrong.items():
        for value in values:
            bodies.append(({"question": q} | {name: value}, name))
    for extra in ("foo", "Question", "top_p", "prm", "__class__"):
        bodies.append(({"question": q, extra: 1}, extra))
    bodies += [({"n": 2}, "question"), ({}, "question"), ({"question": q, "strategy": "guided@2", "n": 3}, "n"),
               ({"question": q, "strategy": f"guided@{LIMITS['n'] + 1}"}, "n")]
    cases = [("POST", path, body, name) for body, name in bodies for path in ("/v1/solve", "/v1/solve/stream")]
    return cases + [("GET", "/v1/solve", None, None), ("PUT", "/v1/solve", {"question": q}, None),
                    ("POST", "/v1/nothing", {"question": q}, None), ("POST", "/healthz", {}, None)]


@pytest.mark.ray
@pytest.mark.slow
def test_malformed_requests_are_4xx_naming_the_field(app):
    cases = _malformed()
    assert len(cases) >= 200
    with requests.Session() as session:
        for method, path, body, field in cases:
            if isinstance(body, bytes):
                r = session.request(method, app + path, data=body, headers={"content-type": "application/json"},
                                    timeout=30)
            else:
                r = session.request(method, app + path, json=body, timeout=30)
            assert 400 <= r.status_code < 500, (method, path, body, r.status_code, r.text[:300])
            if field is not None:
                answer = r.json()
                assert answer.get("field") == field and answer["error"].startswith(field), (path, body, answer)
        # Not JSON at all (a form post): refused, naming the body.
        r = session.post(app + "/v1/solve", data={"question": "What is 1+1?"}, timeout=30)
        assert r.status_code == 422 and r.json()["field"] == "body"
        assert session.get(app + "/healthz", timeout=10).status_code == 200
        assert _solve(app, {"question": "What is 1+1?", "temperature": 0}, session)["answer"] == "2"


# ----------------------------------------------------------------------------- nothing breaks, nothing leaks


def _raw_request(port: int, head: bytes, parts: list[bytes], gap_s: float) -> tuple[bytes, float]:
    """Send `head`, then each of `parts` `gap_s` apart, on a raw socket; what came back until
    the server closed the connection (30 s at most), and after how many seconds."""
    t0, got, parts = time.monotonic(), b"", list(parts)
    with socket.create_connection(("127.0.0.1", port), timeout=gap_s) as s:
        s.sendall(head)
        while time.monotonic() - t0 < 30:
            if parts:
                try:
                    s.sendall(parts.pop(0))
                except OSError:  # the server has closed its side
                    parts = []
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return got, time.monotonic() - t0


@pytest.mark.ray
@pytest.mark.slow
def test_a_body_short_of_its_content_length_or_sent_slowly_is_a_408_within_the_read_timeout(app):
    """A client that promises 100 bytes and sends 13, and one that sends a byte every 0.5 s,
    each get a 408 naming the body and a closed connection within limits.read_timeout_s,
    instead of holding a connection; a normal request after them is answered."""
    port = int(app.rsplit(":", 1)[1])
    head = (b"POST /v1/solve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")
    body = json.dumps({"question": "What is 1+1?", "strategy": "greedy"}).encode()
    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(_raw_request, port, head % 100, [b'{"question": '], 5.0)
        slow = pool.submit(_raw_request, port, head % len(body), [bytes([b]) for b in body], 0.5)
        for got, seconds in (short.result(), slow.result()):
            status, _, rest = got.partition(b"\r\n")
            assert status == b"HTTP/1.1 408 Request Timeout", got[:300]
            answer = json.loads(rest.partition(b"\r\n\r\n")[2])
            assert answer["field"] == "body" and "limits.read_timeout_s" in answer["error"], answer
            assert seconds < LIMITS["read_timeout_s"] + 5, seconds
    assert _solve(app, {"question": "What is 1+1?", "temperature": 0})["answer"] == "2"


# Listeners of the app's Ray cluster beyond loopback that no setting moves to loopback, by
# process title, each with why (cluster/README.md, "What listens where").
WILDCARD_ALLOWED = {
    # add_port_to_grpc_server(self._server, "[::]:0") in ray/serve/_private/replica.py (Ray
    # 2.60), no option or environment variable; Ray's token authentication guards it.
    "ray::ServeReplica:": "Serve's inter-deployment gRPC server, one per replica, binds [::]:0",
}


@pytest.mark.ray
@pytest.mark.slow
def test_the_apps_cluster_listens_on_loopback_only(app):
    """Every TCP listener of the Ray cluster the tests started (the Ray processes among this
    process's descendants: GCS, raylet, dashboard and its agents, Serve's controller, proxy and
    replicas; not this driver, nor a vLLM engine another test left running) is on loopback,
    except one per replica that Ray gives no setting for."""
    import ipaddress

    import psutil

    processes = psutil.Process().children(recursive=True)
    if not any(p.name() == "raylet" for p in processes):
        pytest.skip("the Ray cluster was not started by this run (RAY_ADDRESS)")
    listeners: list[tuple[int, str, str, int]] = []  # (pid, process title, address, port)
    for p in processes:
        try:
            title = " ".join(p.cmdline())
            if not (p.name() in ("gcs_server", "raylet") or title.startswith("ray::") or "/ray/" in title):
                continue
            listeners += [(p.pid, title, c.laddr.ip, c.laddr.port)
                          for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that has just exited
            continue

    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is loopback

    beyond = [(pid, title.strip(), address, port) for pid, title, address, port in listeners if not loopback(address)]
    assert not [b for b in beyond if not b[1].startswith(tuple(WILDCARD_ALLOWED))], (beyond, listeners)
    replicas = {pid for pid, title, _, _ in listeners if title.startswith("ray::ServeReplica:")}
    assert len(replicas) >= 3, listeners  # SolveAPI, GeneratorDeployment, PRMDeployment
    # One each (the gRPC server), so nothing else of a replica's slips through the allowance.
    assert sorted(pid for pid, *_ in beyond) == sorted(replicas), beyond


# What a response body must never hold: a traceback, a source path, Ray's actor / object ids.
LEAKS = re.compile(r'Traceback|File "|\.py"|\.py:\d|site-packages|ray::|RayTaskError|pid=\d|actor_id|ActorID|'
                   r'ObjectRef|0x[0-9a-f]{8,}')
# Questions the schema accepts though no policy can do much with them.
ODD_QUESTIONS = ["x", "\u200b\u200b", "?", "\u202e2+1 si tahW", "e\u0301\u0301\u0301", "\U0001f600 + \U0001f600 = ?",
                 "1+1\x00", "\ud800", "What is 1+1?\udfff", "\ufeff", "\u0661+\u0661", "\t x \n", "\\n\\n", "ß" * 150,
                 "What is 1+1?\n\n\n", "\u2028\u2029"]


def _check(r: requests.Response, case) -> None:
    """One response of the app to anything: under 500, no internals, errors in the short form
    naming their field, a 200 a well-formed answer (the stream's last event: done, or an error
    event under 500)."""
    assert r.status_code < 500, (case, r.status_code, r.text[:300])
    assert not LEAKS.search(r.text), (case, LEAKS.search(r.text), r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "field", "request_id"} and "\n" not in body["error"], (case, body)
        assert body["field"] is None or body["error"].startswith(body["field"]), (case, body)
        assert r.headers["x-request-id"] == body["request_id"], (case, body)  # Serve's id, as in its logs
    elif r.request.path_url.startswith("/v1/solve/stream"):
        events = _sse_events(r.text.splitlines())
        kind, last = events[-1]
        assert kind == "done" or (kind == "error" and last["status"] < 500), (case, events[-1])
        assert all(kind == "step" for kind, _ in events[:-1]), (case, events)
    elif r.request.path_url.startswith("/v1/solve"):
        body = r.json()
        assert isinstance(body["steps"], list) and body["strategy"] and isinstance(body["answer"], str | None), body


@pytest.mark.ray
@pytest.mark.slow
def test_odd_questions_get_an_answer_from_every_strategy_and_blank_ones_a_422(app):
    """Questions a policy can only write junk or nothing after ("x", two zero-width spaces)
    through every strategy, both endpoints: a 200 with a well-formed answer (the fuzz sends
    more odd questions). A blank question, or one holding a lone surrogate (the schema's strict
    str refuses it: no tokenizer could read it), is a 422 naming it."""
    from mathprm.search import RUNNABLE

    with requests.Session() as session:
        for strategy in RUNNABLE:
            for question, path in (("x", "/v1/solve"), ("\u200b\u200b", "/v1/solve/stream")):
                body = {"question": question, "strategy": strategy, "n": 2, "beam_width": 2, "max_steps": 2}
                r = session.post(app + path, json=body, timeout=60)
                _check(r, body)
                assert r.status_code == 200, (body, r.text[:300])
        for refused in (" ", "\t\n", "\u3000", "\ud800", "What is 1+1?\udfff"):  # blank; a lone surrogate
            r = session.post(app + "/v1/solve", json={"question": refused, "strategy": "greedy"}, timeout=30)
            assert r.status_code == 422 and r.json()["field"] == "question", (refused, r.text)


def _fuzz_cases(rng: random.Random) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) requests over every endpoint: mutated and malformed JSON,
    wrong types, huge and negative numbers, unknown fields, odd unicode, empty bodies, wrong
    methods and paths, odd content types, and accepted but odd input on tiny search budgets
    (n, beam_width, max_steps at most 2) so that the searches stay short."""
    from mathprm.search import RUNNABLE

    json_type = {"content-type": "application/json"}
    solve_paths = ("/v1/solve", "/v1/solve/stream")

    def encode(value) -> bytes:
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate sent raw is invalid UTF-8: a 4xx

    def tiny() -> dict:
        return {"question": rng.choice(ODD_QUESTIONS), "strategy": rng.choice(RUNNABLE), "n": rng.randint(1, 2),
                "beam_width": rng.randint(1, 2), "max_steps": rng.randint(1, 2)}

    odd_values = [None, True, False, 0, -1, 1 << 63, -(1 << 63), 10**400, -(10**30), 1e308, -1e308, 5e-324, -0.0,
                  0.5, "", " ", "1", "\u200b", "\ud800", "guided@\u00b2", "x" * 10_000, [], [1], {}, {"$gt": 0},
                  [None] * 100]
    cases: list[tuple[str, str, dict, bytes]] = []
    for _ in range(60):  # a valid body, mutated: truncated, a character dropped, doubled or inserted
        text = bytearray(encode(tiny()))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            what = rng.randrange(4)
            if what == 0:
                del text[i:]
            elif what == 1:
                del text[i]
            elif what == 2:
                text[i:i] = text[i:i + 1]
            else:
                text[i:i] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00", b"\xff", b" ", b"\n"])
            if not text:
                break
        cases.append(("POST", rng.choice(solve_paths), json_type, bytes(text)))
    for _ in range(60):  # one field of a tiny body set to a value of the wrong type or range
        body = tiny() | {rng.choice(["question", "strategy", "n", "beam_width", "max_steps", "temperature", "seed"]):
                         rng.choice(odd_values)}
        cases.append(("POST", rng.choice(solve_paths), json_type, encode(body)))
    for _ in range(30):  # numbers as JSON writes them but Python might not read them back
        number = rng.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 5000, "0.0000001e-400", "-0",
                             "2.0", "1e-5", "9223372036854775807", "1.5e1", "0x10", "01", "+1", ".5"])
        name = rng.choice(["n", "beam_width", "max_steps", "temperature", "seed"])
        text = encode(tiny())[:-1] + f', "{name}": {number}}}'.encode()
        cases.append(("POST", rng.choice(solve_paths), json_type, text))
    for _ in range(30):  # unknown fields, odd keys
        key = rng.choice(["foo", "", " ", "Question", "__proto__", "constructor", "n ", "\u200bn", "\ud800", "x" * 300,
                          "top_p", "prm", "policy", "stream"])
        cases.append(("POST", rng.choice(solve_paths), json_type, encode(tiny() | {key: rng.choice(odd_values)})))
    for _ in range(60):  # not an object, empty, deep nesting, random bytes, odd content types
        body = rng.choice([b"", b" ", b"{}", b"null", b"[]", b'""', b"0", b"[" * 5000 + b"]" * 5000,
                           b'{"question": ' * 3000, bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
                           encode(tiny())])
        headers = rng.choice([json_type, {}, {"content-type": "text/plain"}, {"content-type": "\u00e9"},
                              {"content-type": "application/json; charset=utf-16"},
                              {"content-type": "application/x-www-form-urlencoded"},
                              {"content-type": "multipart/form-data; boundary=x"},
                              {"content-type": "application/json", "content-encoding": "gzip"}])
        cases.append(("POST", rng.choice(solve_paths), headers, body))
    for _ in range(40):  # wrong methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"])
        path = rng.choice(["/v1/solve", "/v1/solve/stream", "/healthz", "/docs", "/openapi.json",
                           "/docs/oauth2-redirect", "/v1/solve/", "/v1/SOLVE", "/v1/solve/stream/x", "/%00",
                           "/" + "a" * 3000, "/%C3%A9", "/v1/solve?n=99", "/v1", "/healthz/..", "/;",
                           "/v1/solve%2Fstream"])
        cases.append((method, path, json_type, encode(tiny()) if method != "GET" else b""))
    for _ in range(20):  # accepted but odd: odd questions, extreme temperatures and seeds, name@N
        body = tiny() | rng.choice([{}, {"temperature": 0}, {"temperature": 1e-5}, {"temperature": 2.0},
                                    {"seed": (1 << 63) - 1}, {"strategy": rng.choice(RUNNABLE) + "@2", "n": 2}])
        cases.append(("POST", rng.choice(solve_paths), json_type, encode(body)))
    return cases


@pytest.mark.ray
@pytest.mark.slow
def test_fuzz_every_endpoint_no_5xx_no_internals_healthy_after(app):
    """A seeded fuzz: 300 requests over every endpoint (`_fuzz_cases`). Each answer is
    under 500, holds no traceback text, and an error is `{error, field, request_id}` naming its
    field; the app answers health and a normal question after."""
    cases = _fuzz_cases(random.Random(32))
    assert len(cases) >= 300
    _fuzz(app, cases, _check)


def _fuzz(app: str, cases: list[tuple[str, str, dict, bytes]], check) -> None:
    """Send every case, `check` each answer; then the app must answer health and a question."""
    with requests.Session() as session:
        for method, path, headers, body in cases:
            r = session.request(method, app + path, data=body, headers=headers, timeout=60)
            check(r, (method, path, body[:200]))
        assert session.get(app + "/healthz", timeout=10).status_code == 200
        assert _solve(app, {"question": "What is 1+1?", "temperature": 0}, session)["answer"] == "2"


# ----------------------------------------------------------------------------- the OpenAI face and per-step scores


def test_models_are_strategies_and_chat_requests_map_onto_the_solver(model_dirs):
    """Without Ray: the model list and names, the question taken from the messages, the
    OpenAI fields mapped onto the search or refused naming the field, and the score request's
    checks, each a RequestError naming the field."""
    from mathprm.serve import RequestError, Solver, load_serve_config
    from mathprm.serve.chat import ChatRequest, model_ids, plan
    from mathprm.serve.solver import ScoreStepsRequest, steps_to_score

    cfg = load_serve_config(_args(model_dirs[0], model_dirs[1]))
    ids = model_ids(cfg, has_prm=True)
    assert "mathprm-guided@4" in ids and "mathprm-beam@4" in ids and "mathprm-greedy" in ids
    assert "mathprm-pass@4" not in ids and "mathprm-guided@4" not in model_ids(cfg, has_prm=False)
    solver = Solver(cfg, _SlowGenerator(), object())
    q = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                                                 {"type": "text", "text": "1+1?"}]}]
    name, search, problem, graded = plan(solver, ChatRequest(model="mathprm-beam@3", messages=q, temperature=0.5,
                                                             top_p=0.9, max_tokens=20, seed=7, gold_answer="2"))
    assert (name, search.n, search.temperature, search.top_p, search.seed) == ("beam", 3, 0.5, 0.9, 7)
    assert (search.max_step_tokens, search.max_solution_tokens) == (20, 20) and problem.question == "What is 1+1?"
    assert problem.answer is None and graded.answer == "2"
    assert plan(solver, ChatRequest(model="mathprm", messages=q[1:]))[0] == cfg.strategy_name

    def refused(**body) -> RequestError:
        with pytest.raises(RequestError) as e:
            plan(solver, ChatRequest(**({"model": "mathprm-guided", "messages": q} | body)))
        assert e.value.message.startswith(e.value.field), e.value.message
        return e.value

    assert refused(model="gpt-4o").status == 404 and refused(model="mathprm-pass").field == "model"
    assert refused(model=f"mathprm-guided@{LIMITS['n'] + 1}").field == "model"
    assert refused(model="mathprm-guided@x").field == "model"
    assert refused(messages=q + [{"role": "assistant", "content": "2"}]).field == "messages.2.role"
    assert refused(messages=[{"role": "user", "content": " "}]).field == "messages.0.content"
    assert refused(messages=[{"role": "user", "content": "x" * 201}]).field == "messages.0.content"
    assert refused(messages=q * 3).field == "messages"  # over limits.messages
    assert refused(messages=[{"role": "system", "content": "x" * 400}, q[1]]).field == "messages"  # messages_chars
    assert refused(gold_answer="two").field == "gold_answer"  # the arithmetic world's answers are integers
    assert refused(temperature=1e-38).field == "temperature"

    def score_refused(**body) -> str:
        with pytest.raises(RequestError) as e:
            steps_to_score(ScoreStepsRequest(**({"question": "What is 1+1?"} | body)), cfg)
        assert e.value.status == 422 and e.value.message.startswith(e.value.field), e.value.message
        return e.value.field

    assert steps_to_score(ScoreStepsRequest(question="q", solution="a\nb\n\n \nc\n"), cfg) == ["a", "b", "c"]
    assert steps_to_score(ScoreStepsRequest(question="q", solution="a||b", separator="||"), cfg) == ["a", "b"]
    assert score_refused() == score_refused(steps=["a"], solution="a") == score_refused(steps=[]) == "steps"
    assert score_refused(steps=["a", " "]) == "steps.1" and score_refused(steps=["a\nb"]) == "steps.0"
    assert score_refused(steps=["a"] * 9) == "steps" and score_refused(steps=["x" * 101]) == "steps.0"
    assert score_refused(steps=["x" * 100] * 5) == "steps"  # solution_chars
    assert score_refused(solution="a||b\nc", separator="||") == "solution"  # a cut step holds the server's "\n"
    assert score_refused(solution="\n\n") == score_refused(solution="x" * 401) == "solution"
    assert score_refused(steps=["a"], separator="\n") == "separator" and score_refused(question=" ") == "question"


def _openai(base: str, key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.mark.ray
@pytest.mark.slow
def test_the_openai_client_lists_models_and_gets_a_guided_solution_plain_and_streamed(app):
    """The real `openai` package as the client: the model list, a completion (content = the
    chosen steps joined as the policy writes them, usage in tokens, the steps and their scores
    under `mathprm`, graded against a gold answer), and the same request streamed: one chunk
    per decided step with the candidates it was chosen from, then the finish, usage, [DONE]."""
    client = _openai(app)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "mathprm-greedy" and "mathprm-guided@4" in ids and "mathprm-mcts@4" in ids
    assert client.models.retrieve("mathprm-guided@4").id == "mathprm-guided@4"
    question = "What is 2+3?"
    steps = list(MEMORISED[question])
    msgs = [{"role": "user", "content": question}]
    done = client.chat.completions.create(model="mathprm-guided@3", messages=msgs, temperature=0, seed=1,
                                          extra_body={"gold_answer": "5"})
    ext = done.model_extra["mathprm"]
    assert done.object == "chat.completion" and done.model == "mathprm-guided@3"
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.content == "\n".join(steps) and [s["text"] for s in ext["steps"]] == steps
    assert ext["answer"] == "5" and ext["correct"] is True and all(0 <= s["score"] <= 1 for s in ext["steps"])
    assert done.usage.completion_tokens == ext["usage"]["generated_tokens"] > 0
    assert done.usage.prompt_tokens == ext["usage"]["prompt_tokens"] >= len(question)  # a char-level tokenizer
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.id.startswith("chatcmpl-")
    wrong = client.chat.completions.create(model="mathprm-greedy", messages=msgs, extra_body={"gold_answer": "6"})
    assert wrong.model_extra["mathprm"]["correct"] is False and wrong.model_extra["mathprm"]["usage"]["prm_calls"] == 0

    chunks = list(client.chat.completions.create(model="mathprm-guided@3", messages=msgs, temperature=0, seed=1,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    step_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in step_chunks) == done.choices[0].message.content
    assert len(step_chunks) == len(steps)
    for k, (c, want) in enumerate(zip(step_chunks, ext["steps"])):
        got = c.model_extra["mathprm"]
        assert got["step"]["index"] == k and got["step"]["text"] == want["text"]
        assert abs(got["step"]["score"] - want["score"]) < 1e-5
        cands = got["candidates"]
        assert len(cands) == 3 and sum(x["chosen"] for x in cands) == 1  # n = 3 candidates, one chosen
        chosen = next(x for x in cands if x["chosen"])
        assert chosen["text"] == want["text"] and chosen["score"] == max(x["score"] for x in cands)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "stop"
    assert final[0].model_extra["mathprm"]["answer"] == "5" and final[0].model_extra["mathprm"]["correct"] is None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens
    # A strategy that decides its steps at the end streams them then, without candidates.
    beam = list(client.chat.completions.create(model="mathprm-beam@2", messages=msgs, stream=True, temperature=0,
                                               extra_body={"beam_width": 2, "max_steps": 6}))
    assert all(c.model_extra["mathprm"]["candidates"] == [] for c in beam if c.choices and c.choices[0].delta.content)


@pytest.mark.ray
@pytest.mark.slow
def test_the_openai_client_gets_openai_errors_for_bad_requests(app):
    import openai

    client = _openai(app)
    msgs = [{"role": "user", "content": "What is 1+1?"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    bad = [({"model": "mathprm-guided", "messages": msgs, "n": 2}, "n"),
           ({"model": "mathprm-guided", "messages": []}, "messages"),
           ({"model": "mathprm-guided", "messages": msgs + [{"role": "assistant", "content": "2"}]}, "messages.1.role"),
           ({"model": "mathprm-guided", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
           ({"model": "mathprm-guided", "messages": msgs, "temperature": 3}, "temperature"),
           ({"model": "mathprm-guided", "messages": msgs, "stop": ["\n"]}, "stop"),
           ({"model": f"mathprm-guided@{LIMITS['n'] + 1}", "messages": msgs}, "model")]
    for body, param in bad:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(**body, stream=stream)
            err = e.value.body
            assert e.value.status_code == 400 and err["param"] == param, (body, err)
            assert err["type"] == "invalid_request_error" and err["message"].startswith(param), err
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mathprm-guided", messages=msgs, extra_body={"prm": "x"})
    assert e.value.body["param"] == "prm" and "unknown field" in e.value.body["message"]


@pytest.mark.ray
@pytest.mark.slow
def test_per_step_scores_are_the_searchs_scores_batched_with_it_and_limited(app):
    """/v1/score/steps gives each step the score guided search gave it (the same PRM, the
    same text), as steps or as a solution text, with the first step under the threshold;
    requests over the limits are 422s naming the field."""
    question, steps = "What is 2+3?", list(MEMORISED["What is 2+3?"])
    solved = _solve(app, {"question": question, "strategy": "guided", "n": 2, "temperature": 0})
    got = requests.post(app + "/v1/score/steps", json={"question": question, "steps": steps}, timeout=60).json()
    assert got["steps"] == steps and len(got["scores"]) == len(steps)
    assert all(abs(a - s["score"]) < 1e-5 for a, s in zip(got["scores"], solved["steps"])), (got, solved)
    below = [i for i, x in enumerate(got["scores"]) if x < got["threshold"]]
    assert got["first_below"] == (below[0] if below else None) and 0 < got["threshold"] < 1
    text = requests.post(app + "/v1/score/steps", json={"question": question, "solution": "||".join(steps),
                                                        "separator": "||"}, timeout=60).json()
    assert text["scores"] == got["scores"]
    for body, name in [({"question": question, "steps": ["a"] * (LIMITS["steps"] + 1)}, "steps"),
                       ({"question": question, "steps": ["ok", "x" * (LIMITS["step_chars"] + 1)]}, "steps.1"),
                       ({"question": question, "steps": ["a\nb"]}, "steps.0"),
                       ({"question": question}, "steps"), ({"steps": ["a"]}, "question"),
                       ({"question": question, "steps": "a"}, "steps"),
                       ({"question": question, "solution": "x" * (LIMITS["solution_chars"] + 1)}, "solution")]:
        r = requests.post(app + "/v1/score/steps", json=body, timeout=30)
        assert r.status_code == 422 and r.json()["field"] == name, (body, r.text)


_OPENAI_ERROR_KEYS = {"message", "type", "param", "code", "request_id"}


def _check_new(r: requests.Response, case) -> None:
    """One response of the OpenAI and score routes to anything: under 500, no internals; an
    error in the route's form (OpenAI's object on /v1/chat and /v1/models, the app's own on
    /v1/score/steps); a stream ends in [DONE] or an error under 500."""
    assert r.status_code < 500, (case, r.status_code, r.text[:300])
    assert not LEAKS.search(r.text), (case, LEAKS.search(r.text), r.text[:300])
    path = r.request.path_url
    if r.status_code >= 400:
        body = r.json()
        if path.startswith("/v1/score"):
            assert set(body) == {"error", "field", "request_id"}, (case, body)
            assert body["field"] is None or body["error"].startswith(body["field"]), (case, body)
        elif path.startswith(("/v1/chat/", "/v1/models")):
            err = body["error"]
            assert set(err) == _OPENAI_ERROR_KEYS and "\n" not in err["message"], (case, body)
            assert err["param"] is None or err["message"].startswith(err["param"]), (case, body)
            assert r.status_code != 422, (case, body)  # OpenAI's 400
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        last = json.loads(data[-2]) if data[-1] == "[DONE]" else json.loads(data[-1])
        assert data[-1] == "[DONE]" and "error" not in last or "error" in last and last["error"]["type"] != \
            "server_error", (case, data[-3:])
    elif path.startswith("/v1/chat/"):
        body = r.json()
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    elif path.startswith("/v1/score/"):
        body = r.json()
        assert len(body["scores"]) == len(body["steps"]) and all(0 <= x <= 1 for x in body["scores"]), (case, body)


def _new_fuzz_cases(rng: random.Random) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) over /v1/chat/completions (plain and streamed),
    /v1/models and /v1/score/steps: mutated JSON, wrong types and ranges in every field, odd
    messages and content parts, unknown fields, odd unicode, non-objects, odd content types,
    wrong methods, and accepted odd input on tiny budgets."""
    from mathprm.search import RUNNABLE

    json_type = {"content-type": "application/json"}

    def encode(value) -> bytes:
        return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")

    def chat() -> dict:
        strategy = rng.choice(RUNNABLE)
        return {"model": f"mathprm-{strategy}@{rng.randint(1, 2)}" if strategy != "greedy" else "mathprm-greedy",
                "messages": [{"role": "user", "content": rng.choice(ODD_QUESTIONS)}], "stream": rng.random() < 0.5,
                "max_steps": rng.randint(1, 2), "beam_width": rng.randint(1, 2)}

    def score() -> dict:
        return {"question": rng.choice(ODD_QUESTIONS), "steps": [rng.choice(ODD_QUESTIONS).replace("\n", " ")
                                                                for _ in range(rng.randint(1, 3))]}

    odd = [None, True, False, 0, -1, 1 << 63, 10**400, -1e308, 5e-324, 0.5, "", " ", "\u200b", "\ud800", "x" * 5000,
           [], [1], [None], {}, {"$gt": 0}, [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 5}],
           [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
           [{"role": "user", "content": [{"type": "text"}]}], [{"role": "tool", "content": "x"}], [""] * 50]
    cases: list[tuple[str, str, dict, bytes]] = []
    for _ in range(50):  # mutated valid bodies
        path, body = rng.choice([("/v1/chat/completions", chat), ("/v1/score/steps", score)])
        text = bytearray(encode(body()))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            text[i:i + rng.randint(0, 1)] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\x00", b"\xff",
                                                        b"", b"1"])
        cases.append(("POST", path, json_type, bytes(text)))
    chat_fields = ["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stream",
                   "stream_options", "n", "stop", "logprobs", "presence_penalty", "frequency_penalty", "user",
                   "gold_answer", "beam_width", "max_steps"]
    for _ in range(80):  # one field of a chat body set to an odd value
        cases.append(("POST", "/v1/chat/completions", json_type,
                      encode(chat() | {rng.choice(chat_fields): rng.choice(odd)})))
    for _ in range(40):  # one field of a score body set to an odd value
        cases.append(("POST", "/v1/score/steps", json_type,
                      encode(score() | {rng.choice(["question", "steps", "solution", "separator"]): rng.choice(odd)})))
    for _ in range(20):  # unknown fields and odd keys
        key = rng.choice(["foo", "", "Model", "__proto__", "\ud800", "x" * 300, "functions", "tools", "prm", "policy",
                          "response_format", "logit_bias"])
        path, body = rng.choice([("/v1/chat/completions", chat), ("/v1/score/steps", score)])
        cases.append(("POST", path, json_type, encode(body() | {key: rng.choice(odd)})))
    for _ in range(30):  # not an object, random bytes, odd content types
        body = rng.choice([b"", b"{}", b"null", b"[]", b"0", b"[" * 3000 + b"]" * 3000,
                           bytes(rng.randrange(256) for _ in range(rng.randint(1, 100))), encode(chat())])
        headers = rng.choice([json_type, {}, {"content-type": "text/plain"}, {"content-type": "application/json; "
                                                                              "charset=utf-16"}])
        cases.append(("POST", rng.choice(["/v1/chat/completions", "/v1/score/steps"]), headers, body))
    for _ in range(20):  # wrong methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST"])
        path = rng.choice(["/v1/models", "/v1/models/mathprm-guided@4", "/v1/models/nope", "/v1/models/%00",
                           "/v1/chat/completions", "/v1/chat", "/v1/completions", "/v1/score/steps",
                           "/v1/score", "/v1/models/" + "a" * 2000])
        cases.append((method, path, json_type, b"" if method == "GET" else encode(chat())))
    for _ in range(20):  # accepted but odd
        body = chat() | rng.choice([{}, {"temperature": 0}, {"temperature": 2.0}, {"top_p": 1e-9}, {"max_tokens": 1},
                                    {"seed": (1 << 63) - 1}, {"stream_options": {"include_usage": True}, "stream": True},
                                    {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "1+1"}]}])
        cases.append(("POST", "/v1/chat/completions", json_type, encode(body)))
    return cases


@pytest.mark.ray
@pytest.mark.slow
def test_fuzz_the_openai_and_score_routes_no_5xx_no_internals_healthy_after(app):
    """A seeded fuzz of 250 requests over the OpenAI and per-step score routes
    (`_new_fuzz_cases`), each answer checked by `_check_new`; healthy after."""
    cases = _new_fuzz_cases(random.Random(34))
    assert len(cases) >= 250
    _fuzz(app, cases, _check_new)


@pytest.mark.ray
@pytest.mark.slow
def test_concurrent_requests_share_prm_batches(app):
    from ray import serve

    prm = serve.get_deployment_handle("PRMDeployment", app_name="mathprm")
    before = prm.stats.remote().result()["batch_sizes"]
    n = 3
    bodies = [{"question": q, "strategy": "guided", "n": n, "temperature": 0.7, "seed": seed}
              for seed in range(4) for q in MEMORISED]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: _solve(app, b), bodies))
    for body, got in zip(bodies, answers):
        assert got["steps"] and got["config"]["seed"] == body["seed"]
        assert all(0.0 <= s["score"] <= 1.0 for s in got["steps"])
    after = prm.stats.remote().result()["batch_sizes"]
    new = {size for size, count in after.items() if count > before.get(size, 0)}
    # One request scores n candidates at a time; a larger batch holds other requests' solutions.
    assert max(new) > n, after
    # The candidates of a round share their prefix, computed once (the PRM's prefix cache).
    cache = prm.stats.remote().result()["prefix_cache"]
    assert cache["hits"] > 0 and 0 < cache["tokens_computed"] < cache["tokens_full"], cache
    # Each request's search released its prefixes when it ended: nothing is held now.
    assert cache["entries"] == 0 and cache["released"] > 0, cache


@pytest.mark.ray
@pytest.mark.slow
def test_serve_metrics_reach_the_metrics_endpoint(app, ray_cluster):
    from tests.conftest import metrics_text

    _solve(app, {"question": "What is 1+1?", "strategy": "guided", "n": 2, "temperature": 0})
    names = ["mathprm_serve_requests", "mathprm_serve_latency_ms", "mathprm_serve_tokens",
             "mathprm_serve_generator_batch", "mathprm_serve_prm_batch", "mathprm_serve_prefix_cache_tokens",
             "mathprm_serve_prefix_cache_saved"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds
        text = metrics_text(ray_cluster["metrics_export_port"])
        if all(n in text for n in names):
            break
        time.sleep(1)
    assert all(n in text for n in names), [n for n in names if n not in text]
    requests_lines = [line for line in text.splitlines() if line.startswith("ray_mathprm_serve_requests_total{")]
    assert any('strategy="guided"' in line and 'status="200"' in line for line in requests_lines), requests_lines
    saved = [line for line in text.splitlines() if line.startswith("ray_mathprm_serve_prefix_cache_saved{")]
    assert any('model="prm"' in line and 0 < float(line.rsplit(" ", 1)[1]) < 1 for line in saved), saved


# ----------------------------------------------------------------------------- the API key


ALLOWED_ORIGIN = "http://allowed.example:8080"


@pytest.fixture(scope="module")
def keyed_app(app, tiny_policy_dir, prm_dir, page_data):
    """A second ingress, at /keyed, with an API key, one CORS origin and the page's data
    (`page_data`), in front of `app`'s generator and PRM (two more model replicas would not fit
    the 2-CPU test cluster). Yields (base URL, key)."""
    from ray import serve

    from mathprm.serve import SolveAPI, api_key_digest, load_serve_config

    key = secrets.token_urlsafe(16)
    with pytest.MonkeyPatch.context() as env:  # build_app reads it the same way, where it runs
        env.setenv("MATHPRM_TEST_API_KEY", key)
        labels_dir, problems = page_data
        cfg = load_serve_config(_args(tiny_policy_dir, prm_dir, api_key_env="MATHPRM_TEST_API_KEY",
                                      cors_origins=[ALLOWED_ORIGIN], labels_dir=str(labels_dir),
                                      problems=str(problems)))
        digest = api_key_digest(cfg.api_key_env)
    generator = serve.get_deployment_handle("GeneratorDeployment", app_name="mathprm")
    prm = serve.get_deployment_handle("PRMDeployment", app_name="mathprm")
    serve.run(SolveAPI.bind(generator, prm, cfg, digest), name="keyed", route_prefix="/keyed", blocking=False)
    base = app + "/keyed"
    _wait_healthy(base + "/healthz", None, None)  # /healthz needs no key
    yield base, key
    serve.delete("keyed")


@pytest.mark.ray
@pytest.mark.slow
def test_the_api_key_guards_every_request_but_health_and_docs(keyed_app, app):
    base, key = keyed_app
    body = {"question": "What is 1+1?", "strategy": "greedy"}
    json_type = {"content-type": "application/json"}
    refused = [
        requests.post(base + "/v1/solve", json=body, timeout=30),
        requests.post(base + "/v1/solve", json=body, headers={"Authorization": f"Bearer {key}x"}, timeout=30),
        requests.post(base + "/v1/solve", json=body, headers={"X-API-Key": key[:-1]}, timeout=30),
        requests.post(base + "/v1/solve", json=body, headers={"Authorization": f"Basic {key}"}, timeout=30),
        requests.post(base + "/v1/solve/stream", json=body, timeout=30),
        requests.post(base + "/v1/solve", data=b"{", headers=json_type, timeout=30),  # 401, not the 422 of bad JSON
        requests.get(base + "/v1/nothing", timeout=30),  # 401, not 404: nothing is told without the key
    ]
    for r in refused:
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (r.request.url, r.text)
        assert r.json()["field"] is None and "API key" in r.json()["error"]
    for headers in ({"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}, {"X-API-Key": key}):
        r = requests.post(base + "/v1/solve", json=body, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["answer"] == "2", r.text
    with requests.post(base + "/v1/solve/stream", json=body, headers={"X-API-Key": key}, stream=True, timeout=60) as r:
        assert r.status_code == 200 and [kind for kind, _ in _events(r)][-1] == "done"
    health = requests.get(base + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["api_key_required"] is True
    assert requests.get(base + "/openapi.json", timeout=10).status_code == 200
    # The app built without a key stays open.
    assert requests.get(app + "/healthz", timeout=10).json()["api_key_required"] is False
    assert _solve(app, body)["answer"] == "2"


@pytest.mark.ray
@pytest.mark.slow
def test_the_key_guards_the_openai_and_score_routes_and_cors_answers_only_configured_origins(keyed_app, app):
    """The `openai` client's key is `Authorization: Bearer`: a wrong one is an
    AuthenticationError on every new route, the right one answers. CORS: the keyed app allows
    its one origin (a preflight needs no key; a refusal carries the CORS header, so a page can
    read it); another origin, or the app without `cors_origins`, gets no CORS header at all."""
    import openai

    base, key = keyed_app
    msgs = [{"role": "user", "content": "What is 1+1?"}]
    wrong = _openai(base, key + "x")
    for call in (lambda: wrong.models.list(), lambda: wrong.chat.completions.create(model="mathprm-greedy", messages=msgs),
                 lambda: wrong.chat.completions.create(model="mathprm-greedy", messages=msgs, stream=True)):
        with pytest.raises(openai.AuthenticationError) as e:
            call()
        assert e.value.body["type"] == "authentication_error" and "API key" in e.value.body["message"]
    r = requests.post(base + "/v1/score/steps", json={"question": "q", "steps": ["a"]}, timeout=30)
    assert r.status_code == 401 and set(r.json()) == {"error", "field", "request_id"}
    right = _openai(base, key)
    assert "mathprm-guided@4" in [m.id for m in right.models.list()]
    assert right.chat.completions.create(model="mathprm-greedy", messages=msgs).model_extra["mathprm"]["answer"] == "2"
    r = requests.post(base + "/v1/score/steps", json={"question": "q", "steps": ["a"]},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["scores"]) == 1

    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = requests.options(base + "/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = requests.get(base + "/v1/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)  # no key: 401, readable
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    for url, origin in ((base, "http://evil.example"), (app, ALLOWED_ORIGIN)):
        r = requests.options(url + "/v1/chat/completions", headers=preflight | {"Origin": origin}, timeout=30)
        assert "access-control-allow-origin" not in r.headers and r.status_code >= 400, (url, origin, r.headers)
        r = requests.get(url + "/healthz", headers={"Origin": origin}, timeout=30)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_server_left_at_its_default_dataset_reads_real_math(model_dirs):
    """A real model served without naming a dataset gets real-math answer reading and "\\n\\n"
    steps, not the arithmetic world's integers."""
    from mathprm.serve import load_serve_config

    args = {k: v for k, v in _args(model_dirs[0], None, strategy="majority@4").items() if k != "dataset"}
    cfg = load_serve_config(args)
    assert cfg.dataset == "math500" and cfg.source == "math500" and cfg.separator == "\n\n"
