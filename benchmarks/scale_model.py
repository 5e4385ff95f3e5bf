"""A scale model of mathprm on H100s: what tree-search labelling and PPO with a PRM cost on 8 to 64
GPUs for 1.5B / 7B / 72B policies and PRMs, and which placement of the PPO roles to pick.

    python benchmarks/scale_model.py                        # print the tables
    python benchmarks/scale_model.py --write                # and rewrite them in docs/SCALING.md
    python benchmarks/scale_model.py --measured runs/bench/ppo_scale.json --write

Arithmetic, not a simulator. Each input is a `Figure` marked **measured** (this repo: a
docs/BENCHMARKS.md row or a JSON file), **cited** (a public source, with the figure) or
**assumed**; the tables list them all. The figures measured on the 2-core CPU box are ratios that
carry over to GPUs (rollouts per labelled step, the tree search's speed against plain sampling) or
that the GPU model is compared with (the rollout share of a PPO update); CPU throughput never
stands in for GPU throughput.

The model, per role:
- generation (vLLM) is a roofline: one decode step of an engine of `tp` GPUs takes the longer of
  reading its weights from HBM once and `concurrency / saturated tokens/s`; a batch takes
  `decode steps x that`. So a small batch spread over many engines stops getting faster.
- PRM scoring, the reference forward and the learner are FLOPs (2 x params x tokens per forward,
  6 x for forward + backward) at a fixed MFU of the bf16 peak.
- a weight sync moves the policy's bf16 bytes over NVLink inside one node, InfiniBand across nodes.
- memory: full fine-tuning keeps 16 bytes a parameter (bf16 weights and gradients, fp32 master
  and two AdamW moments) sharded ZeRO-3 / FSDP over the learner GPUs; LoRA keeps the frozen bf16
  base and no separate reference (the base with adapters off is the reference).
Placements: `colocated` runs rollout engines, PRM and learner on every GPU in turn (OpenRLHF's
hybrid engine, verl), everything resident at once; `separate` gives each role its own GPUs and
overlaps them with one-update staleness, the update taking as long as the slowest role.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "SCALING.md"
MEASURED = REPO / "runs" / "bench" / "ppo_scale.json"  # written by benchmarks/bench_ppo_scale.py
START, END = "<!-- scale:start -->", "<!-- scale:end -->"

SIZES = {"1.5B": 1.5e9, "7B": 7e9, "72B": 72e9}  # nominal parameters; policy and PRM of one size
GPU_COUNTS = (8, 16, 32, 64)
GPUS_PER_NODE = 8
GB = 1e9


class InputError(Exception):
    """A bad input file or doc: the message is the one line the command prints."""


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    kind: str  # "measured", "cited" or "assumed"
    source: str  # where: a BENCHMARKS row, a file, a URL with the figure, or why it is assumed


BENCH = "docs/BENCHMARKS.md"
TITAN = "https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md"
LAMBDA = "https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md"
H100 = "https://glennklockwood.com/garden/processors/h100"

# H100 SXM 80 GB and the software on it.
PEAK_TFLOPS = Figure(989, "TFLOP/s bf16 dense", "cited", f"{H100}: BF16 matrix 989.4 TFLOPS (1978.9 with sparsity)")
HBM_GB = Figure(80, "GB", "cited", f"{H100}: 80 GB HBM3")
HBM_TBS = Figure(3.35, "TB/s", "cited", f"{H100}: 3.35 TB/s")
NVLINK_GBS = Figure(900, "GB/s, both directions", "cited", f"{H100}: 900 GB/s NVLink (D2D); half of it each way")
IB_GBITS = Figure(400, "Gb/s per GPU", "cited", f"{TITAN}: hosts inter-connected with RDMA at 400 Gb/s per GPU")
LINK_EFF = Figure(0.7, "of link peak", "assumed", "NCCL reaches well under peak on a broadcast; no source found")
MFU = Figure(0.35, "of bf16 peak", "cited",
             f"{TITAN}: Llama 3.1 8B FSDP on 8 or 128 H100s, 33% to 39% MFU without Float8; used for "
             "forward-only passes too")
USABLE = Figure(0.9, "of HBM", "assumed", "allocator fragmentation and CUDA context")
KV_GB = Figure(10, "GB per GPU", "assumed", "vLLM KV cache room for a rollout batch")
ACT_GB = Figure(8, "GB per GPU", "assumed", "learner activations with activation checkpointing")
SWITCH_S = Figure(2, "s per update", "assumed", "colocated: vLLM wake / sleep and allocator between phases")

# vLLM decode tokens/s per GPU at saturation (256 sequences), and its tensor-parallel degree.
DECODE = {
    "1.5B": Figure(20000, "tok/s per GPU", "assumed",
                   "no H100 figure found; 2.5x the 8B figure (FLOPs would say 5x; small models are "
                   "scheduler-bound, vLLM v0.6.0 notes)"),
    "7B": Figure(8088, "tok/s per GPU", "cited",
                 f"{LAMBDA}: Llama 3.1 8B, tp=1, vLLM v0.6.0, 10 scheduler steps, 256 seqs: 8,088 output tok/s"),
    "72B": Figure(886, "tok/s per GPU", "cited",
                  f"{LAMBDA}: Llama 3.1 70B, tp=4, same settings: 3,542.88 output tok/s over 4 GPUs"),
}
ROLLOUT_TP = {"1.5B": 1, "7B": 1, "72B": 4}  # 72B: 144 GB of bf16 weights need >= 2 GPUs; 4 as cited

# Measured on this repo's CPU box: docs/BENCHMARKS.md "Tree-search labels" table, K = 8, reused
# rollouts, 20 problems (bench_mcts, 2026-12-02). Rollouts per labelled step = rollouts/problem /
# (labels / 20); `vs raw` = the search's rollout tok/s over plain sampling of the same generator.
TREE = {
    "omegaprm": {
        "rollouts_per_label": Figure(72.4 / (175 / 20), "rollouts", "measured",
                                     f"{BENCH} 'Tree-search labels': omegaprm K=8 reused, 72.4 rollouts / problem, "
                                     "175 labels / 20 problems"),
        "vs_raw": Figure(0.69, "of plain sampling", "measured", f"{BENCH} 'Tree-search labels': omegaprm K=8 reused"),
    },
    "math_shepherd": {
        "rollouts_per_label": Figure(142.8 / (408 / 20), "rollouts", "measured",
                                     f"{BENCH} 'Tree-search labels': math_shepherd K=8 reused, 142.8 rollouts / "
                                     "problem, 408 labels / 20 problems"),
        "vs_raw": Figure(0.80, "of plain sampling", "measured",
                         f"{BENCH} 'Tree-search labels': math_shepherd K=8 reused"),
    },
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One PPO update and one tree-search rollout. The update's size is global (fixed as GPUs grow)."""

    rollout_tokens: int = 400  # L: tokens a labelling rollout writes from its prefix (assumed, MATH-level)
    prompts: int = 64  # ppo_gsm8k_gpu.yaml: 8 per worker x 8 workers
    group_size: int = 4  # ppo_gsm8k_gpu.yaml
    prompt_tokens: int = 256  # assumed: question + chat template
    response_tokens: int = 512  # T, decode steps of an update (its longest episode); assumed
    ppo_epochs: int = 1  # ppo_gsm8k_gpu.yaml


WORKLOAD_SOURCES = {
    "rollout_tokens": "assumed: a MATH-level completion from a mid-solution prefix (arith rollouts are ~50)",
    "prompts": "mathprm/configs/ppo_gsm8k_gpu.yaml: prompts_per_update 8 per worker x 8 workers",
    "group_size": "mathprm/configs/ppo_gsm8k_gpu.yaml",
    "prompt_tokens": "assumed",
    "response_tokens": "assumed: the longest episode of a GSM8K batch (the dataset's cap is 1024)",
    "ppo_epochs": "mathprm/configs/ppo_gsm8k_gpu.yaml",
}


# ---------------------------------------------------------------------------------------------
# Labelling


def labelling_gpu_hours(size: str, method: str, steps: float = 1e6, wl: Workload = Workload()) -> float:
    """GPU-hours of policy generation to label `steps` steps: steps x rollouts per label x L
    tokens at the saturated decode rate, slowed by the search's measured speed against plain
    sampling. Problems are independent, so the figure does not depend on the GPU count; prefix
    prefill (cached by vLLM) and grading (CPU) are left out."""
    tree = TREE[method]
    tokens = steps * tree["rollouts_per_label"].value * wl.rollout_tokens
    return tokens / (DECODE[size].value * tree["vs_raw"].value) / 3600


# ---------------------------------------------------------------------------------------------
# PPO: memory


def train_bytes_per_param(tuning: str) -> float:
    """Learner state per policy parameter: full = bf16 weights + bf16 grads + fp32 master + 2 fp32
    AdamW moments (16); LoRA = the frozen bf16 base plus adapters of ~1 % of the parameters at 16."""
    return 16.0 if tuning == "full" else 2.0 + 0.01 * 16


def ref_bytes_per_param(tuning: str) -> float:
    """The frozen reference: a bf16 copy for full fine-tuning; none for LoRA (adapters off)."""
    return 2.0 if tuning == "full" else 0.0


def usable_gb() -> float:
    return HBM_GB.value * USABLE.value


def min_tp(params: float, extra_gb: float) -> int | None:
    """Smallest tensor-parallel degree in one node whose bf16 weight shard plus `extra_gb` fits."""
    for tp in (1, 2, 4, 8):
        if 2 * params / tp / GB + extra_gb <= usable_gb():
            return tp
    return None


def colocated_memory(size: str, n: int, tuning: str) -> tuple[float, int | None]:
    """(GB per GPU resident all the time, rollout tp that fits or None). Resident: the learner's
    state, the reference and the PRM, FSDP-sharded over all `n` GPUs; on top, the larger of the
    rollout phase (vLLM's weight shard + KV cache) and the learning phase (activations)."""
    p = SIZES[size]
    resident = (train_bytes_per_param(tuning) + ref_bytes_per_param(tuning)) * p / n / GB + 2 * p / n / GB
    tp = min_tp(p, resident + KV_GB.value)
    if tp is None or resident + ACT_GB.value > usable_gb():
        return resident, None
    return resident, max(tp, ROLLOUT_TP[size])


def min_learner_gpus(size: str, tuning: str) -> int:
    """Fewest GPUs whose FSDP shards of the learner state and reference fit beside activations."""
    need = (train_bytes_per_param(tuning) + ref_bytes_per_param(tuning)) * SIZES[size] / GB
    return math.ceil(need / (usable_gb() - ACT_GB.value))


# ---------------------------------------------------------------------------------------------
# PPO: time


def rollout_s(size: str, gpus: int, tp: int, wl: Workload) -> float:
    """Decode time of one update's episodes on `gpus // tp` engines (roofline, module docstring)."""
    engines = gpus // tp
    p = SIZES[size]
    concurrency = wl.prompts * wl.group_size / engines
    weight_read = 2 * p / tp / (HBM_TBS.value * 1e12)
    return wl.response_tokens * max(weight_read, concurrency / (DECODE[size].value * tp))


def flops_s(flops: float, gpus: int) -> float:
    return flops / (gpus * PEAK_TFLOPS.value * 1e12 * MFU.value)


def seq_tokens(wl: Workload) -> float:
    return wl.prompts * wl.group_size * (wl.prompt_tokens + wl.response_tokens)


def reward_s(size: str, gpus: int, wl: Workload) -> float:
    """The PRM's one forward over prompt + solution of every episode."""
    return flops_s(2 * SIZES[size] * seq_tokens(wl), gpus)


def learner_s(size: str, gpus: int, tuning: str, wl: Workload) -> float:
    """Per token: forward + backward per epoch (6 x params; 4 x for LoRA, no weight gradients of the
    base), the reference forward (2 x) and the old log-probs forward (2 x, recomputed because
    vLLM's differ). A shared value head is one linear layer: left out."""
    per_epoch = 6 if tuning == "full" else 4
    return flops_s((per_epoch * wl.ppo_epochs + 2 + 2) * SIZES[size] * seq_tokens(wl), gpus)


def link_gbs(n: int) -> float:
    """Effective per-GPU bandwidth (GB/s) of a transfer that stays in one node or crosses nodes."""
    raw = NVLINK_GBS.value / 2 if n <= GPUS_PER_NODE else IB_GBITS.value / 8
    return raw * LINK_EFF.value


@dataclasses.dataclass(frozen=True)
class Plan:
    placement: str
    update_s: float  # wall seconds per update
    rollout_s: float
    reward_s: float
    learner_s: float
    sync_s: float
    tp: int
    split: tuple[int, int, int] | None = None  # separate: (rollout, reward, learner) GPUs

    def gpu_hours_per_1k(self, n: int) -> float:
        return n * self.update_s * 1000 / 3600


def colocated_plan(size: str, n: int, tuning: str, wl: Workload = Workload()) -> Plan | None:
    """Every role on all `n` GPUs in turn; None when its resident memory does not fit."""
    _, tp = colocated_memory(size, n, tuning)
    if tp is None:
        return None
    p = SIZES[size]
    # Each GPU gathers its vLLM shard (2P / tp bytes) from the FSDP shards, across nodes past one.
    sync = 2 * p / tp / GB / link_gbs(n)
    roll, rew, learn = rollout_s(size, n, tp, wl), reward_s(size, n, wl), learner_s(size, n, tuning, wl)
    return Plan("colocated", roll + rew + learn + sync + SWITCH_S.value, roll, rew, learn, sync, tp)


def separate_plan(size: str, n: int, tuning: str, wl: Workload = Workload()) -> Plan | None:
    """The best split of `n` GPUs into rollout engines, PRM replicas and learners that fits; the
    update takes as long as its slowest role (rollout + the weight sync on its path). None when no
    split fits."""
    p = SIZES[size]
    tp = min_tp(p, KV_GB.value)
    prm_tp = min_tp(p, ACT_GB.value)
    min_learn = min_learner_gpus(size, tuning)
    if tp is None or prm_tp is None:
        return None
    tp = max(tp, ROLLOUT_TP[size])
    sync = 2 * p / GB / link_gbs(n)  # NCCL broadcast from the learners' rank 0, pipelined
    best = None
    for r in range(tp, n, tp):
        for w in range(prm_tp, n - r, prm_tp):
            learn_gpus = n - r - w
            if learn_gpus < min_learn:
                break
            roll, rew = rollout_s(size, r, tp, wl), reward_s(size, w, wl)
            learn = learner_s(size, learn_gpus, tuning, wl)
            plan = Plan("separate", max(roll + sync, rew, learn), roll, rew, learn, sync, tp, (r, w, learn_gpus))
            if best is None or plan.update_s < best.update_s:
                best = plan
    return best


def pick(col: Plan | None, sep: Plan | None, n: int, size: str, tuning: str) -> tuple[str, str]:
    """(placement, why). Colocated unless it does not fit or separate saves more than 15 % of the
    GPU-hours: colocated has no staleness and one copy of each model to manage."""
    if col is None and sep is None:
        need = next((m for m in (*GPU_COUNTS, 128, 256)
                     if colocated_plan(size, m, tuning) or separate_plan(size, m, tuning)), None)
        return "neither fits", f"needs >= {need} GPUs" if need else "needs more than 256 GPUs"
    if col is None:
        resident = colocated_memory(size, n, tuning)[0]
        return "separate", (f"colocated does not fit: {resident:.0f} GB resident + a vLLM shard + KV "
                            f"> {usable_gb():.0f} GB")
    if sep is None:
        return "colocated", "no split of the GPUs fits every role"
    ratio = sep.gpu_hours_per_1k(n) / col.gpu_hours_per_1k(n)
    if ratio < 0.85:
        return "separate", f"{ratio:.2f}x the GPU-hours: rollout overlaps learning"
    return "colocated", f"separate would take {ratio:.2f}x the GPU-hours; no staleness"


# ---------------------------------------------------------------------------------------------
# CPU calibration


def load_measured(path: Path) -> dict:
    """The CPU PPO figures of `benchmarks/bench_ppo_scale.py` (schema in docs/SCALING.md)."""
    keys = ("episodes_per_s", "tokens_per_s", "rollout_s_per_update", "learner_s_per_update", "reward_s_per_update")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise InputError(f"--measured {path}: not a JSON object")
        modes = data["modes"]
        for mode in ("in_learner", "actors"):
            for k in keys:
                if not isinstance(modes[mode][k], (int, float)) or modes[mode][k] < 0:
                    raise ValueError(f"modes.{mode}.{k} is not a number >= 0")
        return data
    except OSError as e:
        raise InputError(f"--measured {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--measured {path}: not JSON ({e.msg}, line {e.lineno})") from None
    except (KeyError, TypeError) as e:
        raise InputError(f"--measured {path}: missing {e} (needs modes.in_learner and modes.actors)") from None
    except ValueError as e:
        raise InputError(f"--measured {path}: {e}") from None


def cpu_calibration(measured: dict | None, path: Path | None) -> dict[str, Figure]:
    """The CPU-box figures shown beside the GPU model: from the measured file when there is one,
    else the documented BENCHMARKS rows (which hold no per-phase split of a PPO update)."""
    if measured is None:
        src = f"{BENCH} 'Generation speed, hf vs vLLM': 64 prompts x 1, vllm 5,810 vs hf 3,049 tok/s"
        return {"vllm_over_hf": Figure(5810 / 3049, "x", "measured", src)}
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    where = f"{shown} ({measured.get('machine', '?')}, {measured.get('date', '?')})"
    out = {}
    for mode in ("in_learner", "actors"):
        m = measured["modes"][mode]
        total = m["rollout_s_per_update"] + m["learner_s_per_update"] + m["reward_s_per_update"]
        share = m["rollout_s_per_update"] / total if total else 0.0
        out[f"rollout_share_{mode}"] = Figure(share, "of an update", "measured", where)
        out[f"episodes_per_s_{mode}"] = Figure(m["episodes_per_s"], "episodes/s", "measured", where)
    base = measured["modes"]["in_learner"]["episodes_per_s"]
    if base > 0:
        ratio = measured["modes"]["actors"]["episodes_per_s"] / base
        out["actors_over_in_learner"] = Figure(ratio, "x episodes/s", "measured", where)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def render(cpu: dict[str, Figure], wl: Workload = Workload()) -> str:
    """The markdown block between the doc's markers (also what the command prints)."""
    out = ["### Labelling: GPU-hours per 1M labelled steps", "",
           "| policy | method | rollouts / label | decode tok/s / GPU | vs raw | GPU-hours | "
           + " | ".join(f"wall h on {n}" for n in GPU_COUNTS) + " |",
           "|---|---|---:|---:|---:|---:|" + "---:|" * len(GPU_COUNTS)]
    for size in SIZES:
        for method, tree in TREE.items():
            h = labelling_gpu_hours(size, method, wl=wl)
            out.append(f"| {size} | {method} | {tree['rollouts_per_label'].value:.2f} | {fmt(DECODE[size].value)} | "
                       f"{tree['vs_raw'].value:.2f} | {fmt(h)} | " + " | ".join(fmt(h / n) for n in GPU_COUNTS) + " |")
    out += ["", (f"### PPO: GPU-hours per 1k updates ({wl.prompts} prompts x {wl.group_size} = "
                 f"{wl.prompts * wl.group_size} episodes of {wl.prompt_tokens} + {wl.response_tokens} tokens, "
                 "policy and PRM of one size)"), "",
            ("| policy / PRM | tuning | GPUs | colocated GPU-h | colocated s / update (roll / PRM / learn / sync) | "
             "separate GPU-h | separate split (roll / PRM / learn GPUs) | rollout share (model) | pick | why |"),
            "|---|---|---:|---:|---|---:|---|---:|---|---|"]
    for size in SIZES:
        for tuning in ("full", "lora"):
            for n in GPU_COUNTS:
                col, sep = colocated_plan(size, n, tuning, wl), separate_plan(size, n, tuning, wl)
                choice, why = pick(col, sep, n, size, tuning)
                c = (f"{fmt(col.gpu_hours_per_1k(n))} | {col.update_s:.1f} ({col.rollout_s:.1f} / {col.reward_s:.2f} / "
                     f"{col.learner_s:.2f} / {col.sync_s:.2f}), tp {col.tp}") if col else "does not fit | -"
                s = (f"{fmt(sep.gpu_hours_per_1k(n))} | {' / '.join(map(str, sep.split))}, tp {sep.tp}"
                     if sep else "does not fit | -")
                plan = col or sep
                share = f"{plan.rollout_s / (plan.rollout_s + plan.reward_s + plan.learner_s):.0%}" if plan else "-"
                out.append(f"| {size} | {tuning} | {n} | {c} | {s} | {share} | {choice} | {why} |")
    out += ["", "### Memory per GPU, colocated (GB resident: learner state + reference + PRM, FSDP-sharded)", "",
            "| policy / PRM | tuning | bytes / param (learner + ref + PRM) | "
            + " | ".join(f"{n} GPUs" for n in GPU_COUNTS) + " | fewest learner GPUs (separate) |",
            "|---|---|---:|" + "---:|" * len(GPU_COUNTS) + "---:|"]
    for size in SIZES:
        for tuning in ("full", "lora"):
            bpp = train_bytes_per_param(tuning) + ref_bytes_per_param(tuning) + 2
            cells = []
            for n in GPU_COUNTS:
                gb, tp = colocated_memory(size, n, tuning)
                cells.append(f"{gb:.1f} (fits, tp {tp})" if tp else f"{gb:.1f} (no)")
            out.append(f"| {size} | {tuning} | {bpp:.2f} | " + " | ".join(cells)
                       + f" | {min_learner_gpus(size, tuning)} |")
    out += ["", (f"Fits: resident + max(vLLM shard + {KV_GB.value:g} GB KV, {ACT_GB.value:g} GB activations) "
                 f"<= {usable_gb():.0f} GB ({USABLE.value:.0%} of {HBM_GB.value:g} GB)."), "",
            "### CPU calibration (this repo's 2-core box)", "",
            "| figure | value | kind | source |", "|---|---:|---|---|"]
    for name, f in cpu.items():
        out.append(f"| {name} | {fmt(f.value)} {f.unit} | {f.kind} | {f.source} |")
    out += ["", "### Inputs", "", "| input | value | kind | source |", "|---|---:|---|---|"]
    rows = [("H100 bf16 peak", PEAK_TFLOPS), ("H100 memory", HBM_GB), ("HBM bandwidth", HBM_TBS),
            ("NVLink", NVLINK_GBS), ("InfiniBand", IB_GBITS), ("link efficiency", LINK_EFF), ("MFU", MFU),
            ("usable memory", USABLE), ("KV cache room", KV_GB), ("activations", ACT_GB),
            ("colocated phase switch", SWITCH_S)]
    rows += [(f"decode {size}", f) for size, f in DECODE.items()]
    rows += [(f"{m} {k.replace('_', ' ')}", f) for m, tree in TREE.items() for k, f in tree.items()]
    for name, f in rows:
        out.append(f"| {name} | {fmt(f.value)} {f.unit} | {f.kind} | {f.source} |")
    for k, src in WORKLOAD_SOURCES.items():
        kind = "assumed" if src.startswith("assumed") else "config"
        out.append(f"| workload {k.replace('_', ' ')} | {getattr(wl, k)} | {kind} | {src} |")
    return "\n".join(out) + "\n"


def replace_block(doc: str, block: str, name: str | Path = DOC) -> str:
    """`doc` (the text of file `name`) with the text between the scale markers replaced by
    `block`, the rest untouched."""
    start, end = doc.find(START), doc.find(END)
    if start < 0 or end < start:
        raise InputError(f"{name}: no {START} ... {END} block to rewrite")
    return doc[:start + len(START)] + "\n" + block + doc[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, default=None,
                    help=f"CPU PPO figures (default {MEASURED.relative_to(REPO)} when it exists)")
    ap.add_argument("--write", action="store_true", help=f"rewrite the marked block of {DOC.relative_to(REPO)}")
    ap.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)
    for field in dataclasses.fields(Workload):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default,
                        help=f"workload: {WORKLOAD_SOURCES[field.name]} (default {field.default})")
    args = ap.parse_args(argv)
    wl = Workload(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)})
    if min(dataclasses.astuple(wl)) < 1:
        ap.error("workload figures must be >= 1")
    try:
        path = args.measured if args.measured is not None else (MEASURED if MEASURED.exists() else None)
        measured = load_measured(path) if path is not None else None
        block = render(cpu_calibration(measured, path), wl)
        print(block, end="")
        if args.write:
            try:
                doc = args.doc.read_text(encoding="utf-8")
            except OSError as e:
                raise InputError(f"{args.doc}: cannot read it ({e.strerror})") from None
            from mathprm import atomic

            atomic.write_text(args.doc, replace_block(doc, block, args.doc))
            print(f"wrote the scale tables in {args.doc}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
