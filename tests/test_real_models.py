"""The real-model path on tiny random real architectures built offline (tests/tiny_models.py): a
Qwen2 instruct policy (BPE, chat template, two EOS ids) and a base Llama (BOS, no pad, no
template, 256 positions). Random weights prove paths, not quality: these tests check that the
template is applied, steps hold no template text, prompts are encoded once, and generation
stops on every EOS id.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mathprm.generation import Prefix, Sampling
from mathprm.models.gen_hf import HFGenerator
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.steps import StepFormat
from tests.tiny_models import build_qwen_policy, build_rlhflow_prm

FMT = StepFormat("\n\n")
QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
TEMPLATE_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "system\n")


def test_a_chat_model_is_prompted_through_its_template_and_its_steps_follow_the_assistant_turn(qwen_policy_dir):
    tok = AutoTokenizer.from_pretrained(qwen_policy_dir)
    prompter = Prompter(tok, FMT)
    assert prompter.chat
    head = prompter.head(QUESTION)
    assert head == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert prompter.text(QUESTION, ["She sold 48.", "So 48."]) == head + "She sold 48.\n\nSo 48.\n\n"
    assert prompter.ids(QUESTION) == tok(head, add_special_tokens=False)["input_ids"]
    # Another system prompt, or none (the template's own default), and plain prompts on request.
    assert "Be brief." in Prompter(tok, FMT, system="Be brief.").head(QUESTION)
    assert Prompter(tok, FMT, system=None).head(QUESTION).count("<|im_start|>system") == 1
    assert Prompter(tok, FMT, chat="off").text(QUESTION, ["a"]) == QUESTION + "\n\na\n\n"


def test_a_base_model_gets_plain_prompts_with_one_bos_and_a_chat_template_brings_its_own(llama_policy_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_policy_dir)
    prompter = Prompter(tok, FMT)
    assert not prompter.chat and prompter.text(QUESTION) == QUESTION + "\n\n"
    ids = prompter.ids(QUESTION)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match="^chat: on, but the model's tokenizer has no chat template"):
        Prompter(tok, FMT, chat="on")
    # Llama 3's template writes <|begin_of_text|> itself: encoding must not add a second one.
    llama3 = AutoTokenizer.from_pretrained(build_rlhflow_prm(tmp_path / "llama3"))
    ids = Prompter(llama3, FMT).ids(QUESTION)
    assert ids[0] == llama3.bos_token_id and ids.count(llama3.bos_token_id) == 1


def _greedy_by_hand(model, ids: list[int], eos: set[int], max_tokens: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            tok = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(tok)
            if tok in eos:
                break
    return out


def test_the_hf_generator_continues_the_chat_prompt_and_writes_clean_steps(qwen_policy_dir):
    gen = HFGenerator(str(qwen_policy_dir), FMT, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(qwen_policy_dir)
    prefix = Prefix(QUESTION, ("She sold 48 clips.",))
    greedy = Sampling(temperature=0.0, max_solution_tokens=12)
    (roll,) = gen.rollouts([prefix], 1, greedy)[0]
    expected = _greedy_by_hand(model, gen.prompter.ids(prefix.question, prefix.steps), gen.eos_ids, 12)
    assert roll.n_tokens == len(expected)
    assert roll.text == gen.tokenizer.decode(expected[:-1] if roll.finished else expected, skip_special_tokens=True)
    samples = gen.next_steps([prefix, Prefix(QUESTION)], 4, Sampling(temperature=1.0, max_step_tokens=16, seed=3))
    for sample in (s for group in samples for s in group):
        assert not any(mark in sample.text for mark in TEMPLATE_TEXT)
        assert FMT.separator not in sample.text


def test_generation_stops_on_every_eos_id_of_the_generation_config(qwen_policy_dir, tmp_path):
    """A model that always writes <|endoftext|> (id 0: the second EOS id, not the tokenizer's
    <|im_end|>) ends every step and rollout at its first token."""
    stuck = tmp_path / "stuck"
    shutil.copytree(qwen_policy_dir, stuck)
    weights = load_file(stuck / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])  # every logit 0: argmax = id 0
    save_file(weights, str(stuck / "model.safetensors"), metadata={"format": "pt"})
    gen = HFGenerator(str(stuck), FMT, device="cpu")
    assert gen.tokenizer.eos_token_id != 0 and 0 in gen.eos_ids
    greedy = Sampling(temperature=0.0, max_step_tokens=8, max_solution_tokens=8)
    (roll,) = gen.rollouts([Prefix(QUESTION)], 1, greedy)[0]
    (step,) = gen.next_steps([Prefix(QUESTION)], 1, greedy)[0]
    assert (roll.finished, roll.n_tokens, roll.text) == (True, 1, "")
    assert (step.finished, step.n_tokens, step.text, step.truncated) == (True, 1, "", False)


def test_the_context_is_read_once_and_no_sample_runs_past_it(llama_policy_dir):
    """A 256-position Llama: a question that leaves no room for a step is skipped by evaluation
    (counted, one line); a prefix near the end of the context gets steps cut at the end of it,
    and one with no room left empty cut steps, instead of running on past the model's positions."""
    gen = HFGenerator(str(llama_policy_dir), FMT, device="cpu")
    assert gen.context_length == 256
    long_question = " ".join(["How many clips did Natalia sell in April and May together?"] * 30)
    assert gen.room(Prefix(long_question)) < 0
    words = "Natalia sold clips to her friends in April and then half as many in May .".split() * 40
    near = next(Prefix(" ".join(words[:k])) for k in range(len(words)) if gen.room(Prefix(" ".join(words[:k]))) < 10)
    room = gen.room(near)
    assert 0 < room < 10
    sampling = Sampling(temperature=1.0, max_step_tokens=16, max_solution_tokens=16, seed=1)
    for sample in gen.next_steps([near], 3, sampling)[0]:
        assert sample.n_tokens <= room and (sample.finished or FMT.separator in sample.text + FMT.separator)
    for roll in gen.rollouts([near], 3, sampling)[0]:
        assert roll.n_tokens <= room
    (empty,) = gen.next_steps([Prefix(long_question)], 1, sampling)[0]
    assert (empty.text, empty.n_tokens, empty.truncated) == ("", 0, True)


def test_evaluation_skips_a_question_too_long_for_the_policy_and_counts_it(llama_policy_dir, tmp_path, capsys):
    from mathprm.data.problems import Problem
    from mathprm.eval.evaluate import EvalConfig, run_evaluation

    problems = [Problem("short", "What is 2 + 3?", "5", "table"),
                Problem("long", " ".join(["How many clips did Natalia sell?"] * 60), "72", "table")]
    cfg = EvalConfig(policy=str(llama_policy_dir), dataset="sample:gsm8k", strategies=["greedy", "majority@2"],
                     max_solution_tokens=16, max_step_tokens=16, out=str(tmp_path / "eval.json"), device="cpu")
    report = run_evaluation(cfg, problems=problems)
    assert report["n_problems"] == 1 and report["skipped_too_long"] == 1 and report["skipped"] == ["long"]
    assert report["strategies"]["greedy"]["n_problems"] == 1
    assert "[evaluate] skipped long: its prompt leaves 0 of the policy's 256 tokens" in capsys.readouterr().out


def test_labelling_skips_a_question_that_leaves_no_room_for_a_rollout_and_counts_it(llama_policy_dir, capsys):
    """The labelling actor on a 256-position Llama: a problem whose prompt leaves less than
    max_solution_tokens is not searched (its rollouts would be cut and graded wrong), one line
    and `skipped_too_long` in its costs; the other problem is labelled."""
    import pyarrow as pa

    from mathprm.data.problems import Problem
    from mathprm.labels.stage import Expander, MCTSConfig

    problems = [Problem("short", "Natalia sold 48 clips in April and half as many in May. How many in all?", "72",
                        "gsm8k"),
                Problem("long", " ".join(["Natalia sold clips to her friends in April."] * 30), "72", "gsm8k")]
    cfg = MCTSConfig(policy=str(llama_policy_dir), dataset="gsm8k", method="math_shepherd", num_solutions=2,
                     rollouts_per_step=1, max_solution_tokens=24, generator_options={"device": "cpu"})
    block = Expander(cfg)(pa.Table.from_pylist([p.to_dict() for p in problems]).to_pydict())
    rows = {r["problem_id"]: r for r in block.to_pylist()}
    assert rows["long"]["skipped_too_long"] == 1 and rows["long"]["labels"] == [] and rows["long"]["n_rollouts"] == 0
    assert rows["short"]["skipped_too_long"] == 0 and rows["short"]["n_rollouts"] > 0
    assert "[mcts] skipped long: its prompt leaves less than max_solution_tokens (24)" in capsys.readouterr().out


def test_ppo_trains_on_the_sampled_token_ids_not_on_the_text_encoded_again(qwen_policy_dir):
    """Token-exact PPO: a BPE tokenizer encodes the text of a sampled step into other ids than
    the sampler drew (here " the" drawn as " t" + "he"); the learner's batch holds the drawn
    ids, the step's reward sits on its last drawn token, and an EOS the sampler drew (the second
    EOS id, not the tokenizer's) is the one trained on."""
    from mathprm.train.ppo_episodes import Episode, encode_episode, make_batch

    tok = AutoTokenizer.from_pretrained(qwen_policy_dir)
    prompter = Prompter(tok, FMT)
    word = next(w for w in (" the", " that", " and", " for")  # one token in the merged text
                if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    drawn = tok(word[:2], add_special_tokens=False)["input_ids"] + tok(word[2:], add_special_tokens=False)["input_ids"]
    sep = tok(FMT.separator, add_special_tokens=False)["input_ids"]
    action = tuple(drawn + sep + drawn + [0])  # two steps; <|endoftext|> (id 0) ends the solution
    assert tok.decode(list(action), skip_special_tokens=True) == f"{word}\n\n{word}"
    ep = Episode(0, QUESTION, [], [word, word], True, False, rewards=[0.25, 1.0], action_ids=action)
    ids, n_prompt, ends = encode_episode(prompter, ep, 512)
    assert ids[:n_prompt] == prompter.ids(QUESTION) and ids[n_prompt:] == list(action)
    assert ends == [n_prompt + len(drawn) + len(sep) - 1, len(ids) - 1]
    as_text, _, _ = encode_episode(prompter, Episode(0, QUESTION, [], [word, word], True, False), 512)
    assert as_text[n_prompt:] != list(action)  # what re-encoding the text would have trained on
    batch = make_batch(prompter, [ep], 512)
    assert batch.ids[0, n_prompt:].tolist() == list(action)
    assert batch.step_rewards[0, ends[0] - 1] == 0.25 and batch.step_rewards[0, ends[1] - 1] == 1.0


def test_token_caps_follow_the_dataset_unless_set():
    from mathprm.eval.evaluate import EvalConfig
    from mathprm.eval.prm import PRMEvalConfig
    from mathprm.labels.stage import MCTSConfig
    from mathprm.train.ppo import PPOConfig

    assert (EvalConfig(dataset="math500").max_step_tokens, EvalConfig(dataset="math500").max_solution_tokens) == (512, 2048)
    assert EvalConfig(dataset="gsm8k").max_solution_tokens == 1024 and EvalConfig().max_solution_tokens == 384
    assert EvalConfig(dataset="math500", max_solution_tokens=100).max_solution_tokens == 100
    assert MCTSConfig(dataset="math500").max_solution_tokens == 2048 and MCTSConfig().max_solution_tokens == 384
    assert PRMEvalConfig(prm="oracle").max_solution_tokens == 384
    assert PPOConfig(prm="none", dataset="gsm8k", eval_dataset="gsm8k", mode="full_solution",
                     outcome_reward=1.0).max_step_tokens == 256
    with pytest.raises(ValueError, match="^eval_dataset: give held-out problems for gsm8k"):
        PPOConfig(prm="none", dataset="gsm8k", mode="full_solution", outcome_reward=1.0)


# ----------------------------------------------------------------------------- stages on real data


@pytest.fixture
def qwen_prm_dir(published_prms):
    return published_prms["qwen"]


def _clean(steps) -> bool:
    return all(not any(mark in s for mark in TEMPLATE_TEXT) and FMT.separator not in s for s in steps)


def test_evaluation_on_math500_with_the_chat_policy_and_a_published_prm(qwen_policy_dir, qwen_prm_dir, tmp_path):
    """greedy, best_of_n, guided and beam on MATH-500 questions: the chat policy's steps are
    clean, every PRM-scored step has a score in [0, 1], one over-long question is skipped."""
    import json

    from mathprm.data.problems import Problem, load_problems
    from mathprm.eval.evaluate import EvalConfig, run_evaluation

    problems = load_problems("sample:math500", limit=2)
    problems.append(Problem("too-long", " ".join(["Natalia sold clips to her friends."] * 200), "1", "math500"))
    cfg = EvalConfig(policy=str(qwen_policy_dir), prm=f"qwen:{qwen_prm_dir}", dataset="math500", device="cpu",
                     strategies=["greedy", "best_of_n@2", "guided@2", "beam@2"], beam_width=1, max_steps=3,
                     max_step_tokens=8, max_solution_tokens=24, temperature=1.0, out=str(tmp_path / "eval.json"))
    report = run_evaluation(cfg, problems=problems)
    assert report["n_problems"] == 2 and report["skipped"] == ["too-long"]
    assert set(report["strategies"]) == {"greedy", "best_of_n@2", "guided@2", "beam@2"}
    records = [json.loads(line) for line in (tmp_path / "eval.problems.jsonl").read_text().splitlines()]
    searched = [r for r in records if "search" in r]
    assert len(searched) == 2
    for r in searched:
        for name in ("guided@2", "beam@2"):
            s = r["search"][name]
            assert _clean(s["steps"]) and len(s["scores"]) == len(s["steps"])
            assert all(0.0 <= x <= 1.0 for x in s["scores"])
        for sample in r["samples"]:
            assert all(0.0 <= x <= 1.0 for x in sample.get("scores", []))


@pytest.mark.parametrize("mode", ["one_step", "full_solution"])
def test_a_ppo_update_of_the_chat_policy_on_gsm8k_with_a_published_prm_reward(qwen_policy_dir, qwen_prm_dir, mode):
    """PPO's episodes and update on the real path, in one process: the chat policy samples GSM8K
    steps, the published PRM rewards each, the learner's batch holds the sampled ids after the
    chat prompt, and one update gives finite losses."""
    import copy

    from mathprm.data.problems import load_problems
    from mathprm.scorer import build_scorer, parse_prm
    from mathprm.train.ppo import PPOConfig
    from mathprm.train.ppo_episodes import collect_episodes, make_batch
    from mathprm.train.ppo_loss import PolicyWithValue, param_groups, ppo_update, token_logprobs

    tok = AutoTokenizer.from_pretrained(qwen_policy_dir)
    lm = AutoModelForCausalLM.from_pretrained(qwen_policy_dir)
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    cfg = PPOConfig(policy=str(qwen_policy_dir), prm=f"qwen:{qwen_prm_dir}", dataset="gsm8k", eval_dataset="gsm8k",
                    mode=mode, advantage="grpo",
                    outcome_reward=1.0, group_size=2, prompts_per_update=2, minibatch_size=4, ppo_epochs=1,
                    max_step_tokens=8, max_solution_tokens=24, reference_prefix_fraction=1.0, lr=1e-4)
    problems = load_problems("sample:gsm8k", limit=2)
    generator = HFGenerator.from_model(lm, tok, FMT)
    scorer = build_scorer(parse_prm(cfg.prm), device="cpu")
    episodes = collect_episodes(generator, scorer, problems, cfg, FMT, seed=5)
    assert len(episodes) == 4 and all(ep.action_ids for ep in episodes)
    assert all(_clean(ep.prefix + ep.steps) for ep in episodes)
    assert all(len(ep.rewards) == len(ep.steps) for ep in episodes if ep.steps)
    prompter = Prompter(tok, FMT)
    batch = make_batch(prompter, [ep for ep in episodes if ep.steps], 512)
    head = prompter.ids(episodes[0].question, episodes[0].prefix)
    assert batch.ids[0, : len(head)].tolist() == head
    model = PolicyWithValue(lm, value_head=False)
    stats = ppo_update(model, lambda b: token_logprobs(reference(input_ids=b.ids, attention_mask=b.attention_mask).logits,
                                                       b.ids, cfg.temperature),
                       batch, torch.optim.AdamW(param_groups(model, cfg.lr, None)), cfg, cfg.kl_coef, seed=0)
    assert all(np_finite(stats[k]) for k in ("pg_loss", "kl", "entropy"))


def np_finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def test_a_lora_prm_on_the_chat_model_trains_on_gsm8k_paths_and_scores_with_its_prompts(qwen_policy_dir, tmp_path):
    """PRM training's steps on the real path, in one process: labelled GSM8K paths encoded after
    the chat prompt, LoRA adapters on the backbone, one optimiser step, merged and saved; the
    saved PRM scores with the same chat prompts."""
    from mathprm.data.problems import load_problems, reference_steps
    from mathprm.models.prm import PRMScorer, build_prm, collate, save_prm
    from mathprm.train.prm import prm_loss
    from mathprm.train.prm_data import to_example
    from mathprm.train.run import add_lora, optimizer_step

    tok = AutoTokenizer.from_pretrained(qwen_policy_dir)
    prompter = Prompter(tok, FMT)
    rows = [{"question": p.question, "steps": [s for s in reference_steps(p) if s.strip()][:3],
             "targets": [1.0, 0.5, 0.0]} for p in load_problems("sample:gsm8k", limit=3)]
    examples = [to_example(r, prompter) for r in rows]
    head = prompter.ids(rows[0]["question"])
    assert examples[0].input_ids[: len(head)] == head and examples[0].positions[0] > len(head)
    model = build_prm(str(qwen_policy_dir))
    model.lm = add_lora(model.lm, 4, 8, 0.0)
    batch = collate(examples, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = optimizer_step(model, opt, 1e-3, lambda: prm_loss(model, batch))
    assert np_finite(loss)
    model.lm = model.lm.merge_and_unload()
    save_prm(model, tok, FMT, tmp_path / "prm", {"base": str(qwen_policy_dir), **prompter.describe()})
    scorer = PRMScorer(tmp_path / "prm", device="cpu")
    assert scorer.prompter.chat and scorer.prompter.system == DEFAULT_SYSTEM
    scores = scorer.score([r["question"] for r in rows], [r["steps"] for r in rows])
    assert [len(s) for s in scores] == [len(r["steps"]) for r in rows] and all(0 <= x <= 1 for s in scores for x in s)


# ----------------------------------------------------------------------------- vLLM


def _scripted_qwen(path, after: dict[int, int]):
    """The tiny Qwen policy (one attention head: vLLM's CPU attention wants head size 32) made to
    write a fixed next token after given tokens: every layer adds nothing (o_proj and down_proj
    zero), so the last hidden state is the normalised embedding of the current token, and lm_head
    row `after[t]` is pointed at token t's."""
    path = build_qwen_policy(path, num_heads=1)
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
    emb = weights["model.embed_tokens.weight"]
    for current, nxt in after.items():
        e = emb[current]
        weights["lm_head.weight"][nxt] += 100 * e / e.pow(2).mean().sqrt() / e.norm()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.vllm
def test_vllm_takes_chat_prompts_as_ids_and_stops_at_a_merged_separator_and_at_every_eos_id(tmp_path):
    """A scripted chat policy writes ".\\n\\n" (one BPE token holding the separator) after the
    chat prompt, then <|endoftext|> (its second EOS id). On vLLM as on hf: the step stops at that
    token with the text before the separator, and the rollout ends at the second EOS id. Both
    labelling methods then run on the vLLM generator."""
    pytest.importorskip("vllm")
    from mathprm.data.answers import judge_grader
    from mathprm.data.problems import Problem
    from mathprm.generation import load_generator
    from mathprm.labels.treesearch import TreeSearchConfig, label_problems

    tok = AutoTokenizer.from_pretrained(build_qwen_policy(tmp_path / "probe", num_heads=1))
    merged = tok.convert_tokens_to_ids("." + "\u010a\u010a")  # ".\n\n" in byte-level BPE
    assert merged != tok.unk_token_id and tok.decode([merged]) == ".\n\n"
    last = Prompter(tok, FMT).ids(QUESTION)[-1]  # the chat prompt's last token: "\n" after "assistant"
    path = _scripted_qwen(tmp_path / "scripted", {last: merged, merged: 0})
    hf = HFGenerator(str(path), FMT, device="cpu")
    vllm = load_generator("vllm", str(path), FMT, run_dir=str(tmp_path / "vllm"))
    try:
        greedy = Sampling(temperature=0.0, max_step_tokens=8, max_solution_tokens=8)
        for gen in (hf, vllm):
            assert gen.prompter.chat and gen.context_length == 512
            (step,) = gen.next_steps([Prefix(QUESTION)], 1, greedy)[0]
            assert (step.text, step.n_tokens, step.finished, step.token_ids) == (".", 1, False, (merged,))
            (roll,) = gen.rollouts([Prefix(QUESTION)], 1, greedy)[0]
            assert (roll.finished, roll.token_ids, roll.steps) == (True, (merged, 0), [".", ""])
        # The labeller on vLLM: the steps the policy wrote are labelled as written (the empty
        # one after the separator that ended the sample included), graded wrong.
        for method in ("math_shepherd", "omegaprm"):
            tree = TreeSearchConfig(method=method, num_solutions=2, rollouts_per_step=2, rollout_budget=8,
                                    max_solution_tokens=8)
            ((labels, _),) = label_problems([Problem("q", QUESTION, "48", "gsm8k")], vllm, judge_grader, tree)
            assert {(lab.prefix, lab.step, lab.score) for lab in labels} <= {((), ".", 0.0), ((".",), "", 0.0)}, method
            assert labels or method == "omegaprm"  # OmegaPRM labels nothing when no rollout is right
    finally:
        vllm.llm.llm_engine.engine_core.shutdown()


@pytest.mark.ray
def test_one_serve_request_with_the_chat_policy_and_a_published_prm(ray_cluster, qwen_policy_dir, qwen_prm_dir):
    """The Serve app on the real path: a guided search by the chat policy scored by a published
    PRM answers 200 with clean steps and scores in [0, 1]; a question that leaves no room in the
    policy's context is a 422 naming the limit. The OpenAI route streams the same kind of search
    (the prompt's tokens counted through the chat template), the per-step score route reads the
    published PRM as the scorer does, and both models' prefix caches are empty once the searches
    ended."""
    import requests
    from ray import serve
    from transformers import AutoTokenizer

    from mathprm.prompts import Prompter
    from mathprm.scorer import load_scorer
    from mathprm.serve import build_app
    from mathprm.steps import StepFormat
    from tests.test_serve import _free_port, _openai, _wait_healthy

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"policy": str(qwen_policy_dir), "prm": f"qwen:{qwen_prm_dir}", "dataset": "math500", "device": "cpu",
            "strategy": "guided", "search": {"n": 2, "max_steps": 2, "max_step_tokens": 8, "max_solution_tokens": 16},
            "generator_options": {"prefix_cache_tokens": 4096}}
    try:
        serve.run(build_app(args), name="real", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base + "/healthz", None, None)
        r = requests.post(base + "/v1/solve", json={"question": QUESTION, "temperature": 1.0}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["strategy"] == "guided" and 1 <= len(body["steps"]) <= 2
        assert _clean([s["text"] for s in body["steps"]]) and all(0.0 <= s["score"] <= 1.0 for s in body["steps"])
        r = requests.post(base + "/v1/solve", json={"question": " ".join([QUESTION] * 30)}, timeout=60)
        assert r.status_code == 422 and "of the policy's context" in r.json()["error"]

        chunks = list(_openai(base).chat.completions.create(
            model="mathprm-guided@2", messages=[{"role": "user", "content": QUESTION}], temperature=1.0, seed=3,
            stream=True, stream_options={"include_usage": True}))
        decided = [c.model_extra["mathprm"] for c in chunks if "step" in (c.model_extra or {}).get("mathprm", {})]
        steps = [d["step"] for d in decided]
        assert 1 <= len(steps) <= 2 and _clean([s["text"] for s in steps])
        assert all(len(d["candidates"]) == 2 for d in decided)  # guided@2: each step chosen of two
        scorer = load_scorer("qwen", str(qwen_prm_dir), device="cpu")
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == scorer.separator.join(s["text"] for s in steps)
        chat_ids = Prompter(AutoTokenizer.from_pretrained(qwen_policy_dir), StepFormat(scorer.separator)).ids(QUESTION)
        assert chunks[-1].usage.prompt_tokens == len(chat_ids)  # the chat template's tokens, not the text's
        for name in ("GeneratorDeployment", "PRMDeployment"):  # the searches ended: their prefixes are freed
            cache = serve.get_deployment_handle(name, app_name="real").stats.remote().result()["prefix_cache"]
            assert cache["hits"] > 0 and cache["entries"] == 0 and cache["released"] > 0, (name, cache)

        r = requests.post(base + "/v1/score/steps", json={"question": QUESTION, "steps": [s["text"] for s in steps]},
                          timeout=60)
        assert r.status_code == 200, r.text
        want = scorer.score([QUESTION], [[s["text"] for s in steps]])[0]
        assert max(abs(a - b) for a, b in zip(r.json()["scores"], want)) < 1e-4
    finally:
        serve.shutdown()
