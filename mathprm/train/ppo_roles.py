"""PPO's rollout engines and reward workers as Ray actors, and the learners' clients for them.

The learners (Ray Train workers, `mathprm.train.ppo`) keep the maths; these roles take the two
jobs that do not need the learner's gradients:

- `RolloutEngine`: holds a copy of the policy in a `Generator` (`hf` or `vllm`), samples steps or
  whole solutions with their token ids and sampling log-probs, and answers with the weight
  version it held. `load_weights(version, state)` replaces its weights (hf: `load_state_dict`;
  vLLM: the state written as safetensors on the engine's node, then `reload_weights` and a
  prefix-cache reset: the CPU route; on GPU, vLLM's NCCL weight transfer is the fast one).
- `RewardWorker`: holds the step reward's `Scorer` (a mathprm PRM, a published PRM kind, the
  arithmetic oracle) and scores batches of episodes.

On the learner's side, `EngineGroup` is a `Generator` and `RewardGroup` a `Scorer` over their
actors, so `mathprm.train.ppo_episodes.collect_episodes` runs unchanged on either shape. A
group splits a call into one contiguous chunk per actor; every prefix carries its own seed, so
a sample does not depend on the split. Weight versions: rank 0 pushes the policy through the
object store after every update (`sync`); `EngineGroup.oldest` is the oldest version any sample
of the calls since `mark()` came from, which the learner checks against `max_staleness`.

Placement (`RolesConfig.placement`): `colocated` pins engine i and reward worker i to the node
of learner rank i mod world (the roles share those nodes' CPUs and GPUs, with fractional
`num_gpus`); `separate` lets Ray place them anywhere (SPREAD; `resources` names a node pool,
e.g. {"rollout": 1}). The actors are owned by the rank-0 learner: when a learner, an engine or a
reward worker dies, Ray Train restarts the whole group from the last checkpoint (`max_failures`)
and the roles are created again, their engines synced to the checkpoint's weights before the
first sample.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mathprm.generation import Prefix, Sampling
from mathprm.steps import StepFormat


@dataclasses.dataclass
class RoleConfig:
    """One role's actors: how many and what each gets from Ray. replicas 0: the learners do the
    job themselves (each samples with its own weights / holds its own Scorer)."""

    replicas: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional on a colocated placement: the role shares the learners' GPUs
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources: a node pool

    def check(self, name: str) -> None:
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 0:
            raise ValueError(f"{name}.replicas: must be an int >= 0, got {self.replicas!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{name}.num_cpus / num_gpus: must be >= 0, got {self.num_cpus} / {self.num_gpus}")


@dataclasses.dataclass
class RolloutConfig(RoleConfig):
    backend: Literal["hf", "vllm"] = "hf"
    # Updates an episode's weights may lag the learner's. 0: sample after every weight sync. 1:
    # the next update's episodes are sampled while the learners train (one version behind; the
    # ratio's old log-probs are the sampler's, so PPO corrects for it).
    max_staleness: int = 0
    cpu_kvcache_gib: int = 1  # vllm on CPU: the engine's KV cache

    def check(self, name: str) -> None:
        super().check(name)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"{name}.backend: must be hf or vllm, got {self.backend!r}")
        if not isinstance(self.max_staleness, int) or self.max_staleness not in (0, 1):
            raise ValueError(f"{name}.max_staleness: must be 0 (synchronous) or 1 (one update ahead), "
                             f"got {self.max_staleness!r}")
        if self.max_staleness and not self.replicas:
            raise ValueError(f"{name}.max_staleness: needs rollout engines ({name}.replicas >= 1)")


@dataclasses.dataclass
class RewardConfig(RoleConfig):
    batch_size: int = 32  # episodes per PRM forward pass in a worker


PLACEMENTS = ("colocated", "separate")
START_TIMEOUT_S = 900  # a 70B vLLM engine takes minutes to load; a role no node can hold, forever
NAMESPACE = "mathprm-ppo"  # the roles' Ray namespace (a Ray Train worker's own is anonymous)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the actors


def _set_threads(threads: int) -> None:
    """torch's CPU threads: `threads`, or (0: a role given no whole CPU, which takes turns with
    the learners on their cores) every core this process may run on."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


class RolloutEngine:
    """A policy copy that samples for the learners (wrapped by `ray.remote` in `create_roles`)."""

    def __init__(self, backend: str, policy: str, separator: str, system_prompt: str | None,
                 cpu_kvcache_gib: int = 1, dtype: str = "float32", threads: int = 0, gpu_share: float = 1.0) -> None:
        import tempfile

        from mathprm.generation import load_generator

        _set_threads(threads)
        # A folder on the engine's own node: vLLM's caches and sockets, the weights of a sync.
        self.backend, self.run_dir = backend, Path(tempfile.mkdtemp(prefix="mathprm-engine-"))
        options: dict[str, Any] = {"system_prompt": system_prompt}
        if backend == "vllm":
            # On a GPU shared with a learner (colocated), vLLM takes only its share of the memory.
            options.update(run_dir=str(self.run_dir / "vllm"), cpu_kvcache_gib=cpu_kvcache_gib, dtype=dtype,
                           gpu_memory_utilization=0.85 * min(gpu_share, 1.0))
        self.generator = load_generator(backend, policy, StepFormat(separator), **options)
        self.version = 0  # the initial policy's weights

    def get_version(self) -> int:
        return self.version

    def load_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Replace the policy's weights with `state` (HF parameter names) and tag them `version`."""
        if self.backend == "hf":
            missing, unexpected = self.generator.model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # a tied head is optional
                raise ValueError(f"weights do not fit the engine's policy: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
            self.generator.clear_prefix_cache()  # kept prompts' KV was computed with the old weights
        else:
            self._reload_vllm(state)
        self.version = version
        return version

    def _reload_vllm(self, state: dict[str, torch.Tensor]) -> None:
        import shutil

        from safetensors.torch import save_file

        folder = self.run_dir / "weights"
        shutil.rmtree(folder, ignore_errors=True)  # a sync that failed half-way
        folder.mkdir(parents=True)
        llm = self.generator.llm
        try:
            # Every tensor its own copy (safetensors refuses shared storage; a tied LM head shares
            # the embedding's, and vLLM's in-place reload wants the head's weight too).
            save_file({name: tensor.detach().clone().contiguous() for name, tensor in state.items()},
                      str(folder / "model.safetensors"))
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # a policy's size on disk, needed only while loading
        llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> tuple[int, list]:
        return self.version, self.generator.next_steps(prefixes, n, sampling)

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> tuple[int, list]:
        return self.version, self.generator.rollouts(prefixes, n, sampling)

    def logprobs(self, ids: list[int], temperature: float = 1.0) -> list[float]:
        """The log-prob of each of ids[1:] after ids[:k] under the engine's weights (the sync check)."""
        if self.backend == "hf":
            from mathprm.train.ppo_loss import token_logprobs

            with torch.inference_mode():
                logits = self.generator.model(input_ids=torch.tensor([ids], device=self.generator.device)).logits
            return token_logprobs(logits, torch.tensor([ids], device=logits.device), temperature)[0].tolist()
        from vllm import SamplingParams

        out = self.generator.llm.generate([{"prompt_token_ids": list(ids)}],
                                          SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0),
                                          use_tqdm=False)[0]
        return [float(entry[tok].logprob) for entry, tok in zip(out.prompt_logprobs[1:], ids[1:])]

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


class RewardWorker:
    """The step reward's Scorer for the learners (wrapped by `ray.remote` in `create_roles`)."""

    def __init__(self, config: dict[str, Any], batch_size: int, threads: int = 0) -> None:
        from mathprm.config import from_dict
        from mathprm.train.ppo import PPOConfig, load_pools, load_scorer

        _set_threads(threads)
        cfg = from_dict(PPOConfig, config)
        pool, _ = load_pools(cfg)
        self.scorer = load_scorer(cfg, pool, torch.device("cuda" if torch.cuda.is_available() else "cpu"), batch_size)

    def score(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        return self.scorer.score(questions, steps)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


# ----------------------------------------------------------------------------- the learners' clients


def _chunks(n_items: int, n_parts: int) -> list[range]:
    """`n_items` split into at most `n_parts` contiguous, near-equal, non-empty ranges."""
    parts = min(n_parts, n_items)
    bounds = [round(i * n_items / parts) for i in range(parts + 1)] if parts else [0]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


class EngineGroup:
    """A `Generator` over rollout-engine actors, for the learners. `prompter` and
    `context_length` are the learner's (the engines hold the same policy), so `room` needs no
    remote call."""

    def __init__(self, handles: Sequence[Any], prompter: Any, context_length: int) -> None:
        import threading

        self.handles, self.prompter, self.context_length = list(handles), prompter, context_length
        self.step_format: StepFormat = prompter.step_format
        self._seen = threading.local()  # per thread: a learner may sample the next update in another

    def mark(self) -> None:
        """Start a new count, in this thread, of the oldest weight version sampled with (`oldest`)."""
        self._seen.oldest = None

    @property
    def oldest(self) -> int | None:
        """The oldest weight version of any sample this thread got since its `mark()`."""
        return getattr(self._seen, "oldest", None)

    def room(self, prefix: Prefix) -> int:
        return self.prompter.room(prefix.question, prefix.steps, self.context_length)

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list]:
        return self._call("next_steps", prefixes, n, sampling)

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list]:
        return self._call("rollouts", prefixes, n, sampling)

    def _call(self, method: str, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list]:
        import ray

        # Each prefix keeps the seed it would have in one call, whichever engine samples it.
        seeded = [dataclasses.replace(p, seed=p.sample_seed(sampling, i)) for i, p in enumerate(prefixes)]
        parts = _chunks(len(seeded), len(self.handles))
        refs = [getattr(self.handles[k], method).remote(seeded[r.start : r.stop], n, sampling)
                for k, r in enumerate(parts)]
        out: list[list] = []
        for version, samples in ray.get(refs):
            self._seen.oldest = version if self.oldest is None else min(self.oldest, version)
            out.extend(samples)
        return out

    def versions(self) -> list[int]:
        import ray

        return ray.get([h.get_version.remote() for h in self.handles])

    def sync(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Every engine's weights to `state`, tagged `version` (one object-store copy, read by all)."""
        import ray

        ref = ray.put(state)
        ray.get([h.load_weights.remote(version, ref) for h in self.handles])

    def peak_rss_mb(self) -> float:
        import ray

        return max(ray.get([h.peak_rss_mb.remote() for h in self.handles]))


class RewardGroup:
    """A `Scorer` over reward-worker actors, for the learners."""

    def __init__(self, handles: Sequence[Any]) -> None:
        self.handles = list(handles)

    def score(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        import ray

        parts = _chunks(len(questions), len(self.handles))
        refs = [self.handles[k].score.remote(questions[r.start : r.stop], steps[r.start : r.stop])
                for k, r in enumerate(parts)]
        return [s for chunk in ray.get(refs) for s in chunk]

    def peak_rss_mb(self) -> float:
        import ray

        return max(ray.get([h.peak_rss_mb.remote() for h in self.handles]))


# ----------------------------------------------------------------------------- creating the roles


def create_roles(config: dict[str, Any], rollout: RolloutConfig, reward: RewardConfig, placement: str,
                 learner_nodes: Sequence[str]) -> tuple[dict[str, list[str]], list[Any]]:
    """Start the configured actors (called by the rank-0 learner, which owns them); returns their
    names per role, for the other learners to look up, and their handles, which the caller must
    keep: an actor lives while a handle to it does. `learner_nodes[r]` is rank r's node id."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:8]  # a restarted group must not meet its dead predecessor's names
    names: dict[str, list[str]] = {"rollout": [], "reward": []}

    def options(role: RoleConfig, i: int, name: str) -> dict[str, Any]:
        strategy: Any = "SPREAD"
        if placement == "colocated":
            strategy = NodeAffinitySchedulingStrategy(node_id=learner_nodes[i % len(learner_nodes)], soft=False)
        return {"name": name, "namespace": NAMESPACE, "num_cpus": role.num_cpus, "num_gpus": role.num_gpus,
                "resources": dict(role.resources), "scheduling_strategy": strategy, "max_restarts": 0}

    engines = []
    for i in range(rollout.replicas):
        name = f"mathprm-ppo-{token}-rollout-{i}"
        cls = ray.remote(RolloutEngine).options(**options(rollout, i, name))
        # The engine computes in the learners' precision, so its log-probs are theirs.
        dtype = "bfloat16" if config.get("precision") == "bf16" else "float32"
        engines.append(cls.remote(rollout.backend, config["policy"], config["separator"], config["system_prompt"],
                                  rollout.cpu_kvcache_gib, dtype, int(rollout.num_cpus), rollout.num_gpus or 1.0))
        names["rollout"].append(name)
    workers = []
    for i in range(reward.replicas):
        name = f"mathprm-ppo-{token}-reward-{i}"
        workers.append(ray.remote(RewardWorker).options(**options(reward, i, name)).remote(
            config, reward.batch_size, int(reward.num_cpus)))
        names["reward"].append(name)
    try:  # started, or a clear line instead of waiting forever for resources that never come
        ray.get([h.get_version.remote() for h in engines] + [h.peak_rss_mb.remote() for h in workers],
                timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the PPO roles did not start within {START_TIMEOUT_S} s: no node has what they ask "
                           f"(rollout: {rollout.num_cpus} CPU, {rollout.num_gpus} GPU, {rollout.resources}; reward: "
                           f"{reward.num_cpus} CPU, {reward.num_gpus} GPU, {reward.resources}; {placement})") from None
    return names, engines + workers


def lookup(names: Sequence[str]) -> list[Any]:
    import ray

    return [ray.get_actor(name, namespace=NAMESPACE) for name in names]
