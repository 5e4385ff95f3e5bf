"""The published PRM kinds (mathprm.models.published) on tiny random checkpoints saved in the
published layouts (tests/tiny_models.py): every score equals the one the authors' own recipe
gives, written out here step by step from their README / inference code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mathprm.scorer import SCORERS, PRMRef, TooLongError, build_scorer, load_scorer, parse_prm, trained_separator
from tests.tiny_models import build_math_shepherd_prm, build_qwen_prm

KINDS = ["qwen", "math_shepherd", "rlhflow", "skywork"]
QUESTIONS = [
    "Janet has 3 apples and buys 2 more. How many apples does she have?",
    "What is 2+3?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "What is 1+1?",
]
SOLUTIONS = [
    ["She starts with 3 apples.", "She buys 2 more, so 3 + 2 = 5.", "The answer is 5"],
    ["2 + 3 = 5.\nSo the sum is 5."],  # a step of two lines (Skywork reads it at its last line)
    ["It takes 2/2 = 1 bolt of white fiber.", "So the total is 2 + 1 = 3 bolts.", "#### 3", "The answer is 3"],
    [],
]


@pytest.fixture
def prm_dirs(published_prms):
    return published_prms


# ----------------------------------------------------------------------------- the published recipes


def _qwen2_backbone(path, state):
    from transformers import Qwen2Config, Qwen2Model

    model = Qwen2Model(Qwen2Config.from_pretrained(path)).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def _by_hand_qwen(path, question, steps):
    """The model card: chat template, encode, softmax of the head's logits at <extra_0>, label 1."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": question},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    input_ids = torch.tensor([tok.encode(tok.apply_chat_template(messages, tokenize=False))])
    h = _qwen2_backbone(path, state)(input_ids).last_hidden_state[0]
    hidden = torch.relu(h @ state["score.0.weight"].T + state["score.0.bias"])
    logits = hidden @ state["score.2.weight"].T + state["score.2.bias"]
    mask = input_ids[0] == tok.encode("<extra_0>")[0]
    return logits.softmax(-1)[mask, 1].tolist()


def _by_hand_skywork(path, question, steps):
    """skywork-o1-prm-inference: prepare_input(problem, "\\n".join(steps), step_token="\\n"), the
    value head at every flag, sigmoid; our step i is the flag of its last line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    input_ids = tok.encode(tok.bos_token + question + "\n")
    flags = [0] * len(input_ids)
    step_token_id = tok.encode("\n")[-1]
    for step in "\n".join(steps).split("\n"):
        step_ids = (tok.encode(step) if step != "" else []) + [step_token_id]
        input_ids += step_ids
        flags += [0] * (len(step_ids) - 1) + [1]
    h = _qwen2_backbone(path, state)(torch.tensor([input_ids])).last_hidden_state[0]
    rewards = torch.sigmoid(h @ state["v_head.summary.weight"].T + state["v_head.summary.bias"])[:, 0]
    per_line = rewards[torch.tensor(flags) == 1].tolist()
    last_line = torch.tensor([s.count("\n") + 1 for s in steps]).cumsum(0) - 1
    return [per_line[k] for k in last_line]


def _by_hand_math_shepherd(path, question, steps):
    """The README: f"{question} {output}", each step ending " ки"; softmax over the logits of the
    candidate tokens encode("+ -")[1:] at the tokens encode("ки")[-1], the "+" share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    candidate_tokens = tok.encode("+ -")[1:]
    step_tag_id = tok.encode("ки")[-1]
    output = "\n".join(f"{s} ки" for s in steps)
    input_id = torch.tensor([tok.encode(f"{question} {output}")])
    scores = model(input_id).logits[:, :, candidate_tokens].softmax(dim=-1)[:, :, 0]
    return scores[input_id == step_tag_id].tolist()


def _by_hand_rlhflow(path, question, steps):
    """math-rm/prm_evaluate.py: for each step, the conversation so far (stripped steps as user turns
    answered "+"), one forward pass, softmax over the "+" and "-" logits at position -3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    candidate_tokens = [tok.encode("+")[-1], tok.encode("-")[-1]]
    conversation, out = [], []
    for k, step in enumerate(j.strip() for j in steps):
        conversation.append({"content": question + " " + step if k == 0 else step, "role": "user"})
        conversation.append({"content": "+", "role": "assistant"})
        input_ids = torch.tensor([tok(tok.apply_chat_template(conversation, tokenize=False),
                                      add_special_tokens=False)["input_ids"]])
        logits = model(input_ids).logits[:, -3, candidate_tokens]
        out.append(logits.softmax(dim=-1)[0, 0].item())
    return out


BY_HAND = {"qwen": _by_hand_qwen, "skywork": _by_hand_skywork, "math_shepherd": _by_hand_math_shepherd,
           "rlhflow": _by_hand_rlhflow}


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_the_published_recipe_s(prm_dirs, kind):
    scorer = load_scorer(kind, str(prm_dirs[kind]), device="cpu", batch_size=2)
    got = scorer.score(QUESTIONS, SOLUTIONS)
    assert [len(s) for s in got] == [len(s) for s in SOLUTIONS]  # the empty solution gives []
    with torch.inference_mode():
        want = [BY_HAND[kind](prm_dirs[kind], q, steps) if steps else [] for q, steps in zip(QUESTIONS, SOLUTIONS)]
    for g, w in zip(got, want):
        assert len(g) == len(w)
        assert all(abs(a - b) < 1e-5 for a, b in zip(g, w)), (kind, g, w)
    flat = [x for s in got for x in s]
    assert all(0.0 <= x <= 1.0 for x in flat)
    assert max(flat) - min(flat) > 0.01  # the steps' scores differ, so a misplaced read would show


@pytest.mark.parametrize("kind", KINDS)
def test_a_solution_scores_the_same_alone_and_in_any_batch(prm_dirs, kind):
    ref = parse_prm(f"{kind}:{prm_dirs[kind]}")
    assert ref == PRMRef(kind, str(prm_dirs[kind]))
    scorer = build_scorer(ref, device="cpu", batch_size=4)
    assert type(scorer).__name__ == SCORERS[kind].split(":")[1]
    together = scorer.score(QUESTIONS, SOLUTIONS)
    alone = [scorer.score([q], [s])[0] for q, s in zip(QUESTIONS, SOLUTIONS)]
    reordered = scorer.score(QUESTIONS[::-1], SOLUTIONS[::-1])[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert len(a) == len(b) == len(c)
        assert all(abs(x - y) < 1e-5 and abs(x - z) < 1e-5 for x, y, z in zip(a, b, c))


def test_each_kind_declares_its_published_step_separator(prm_dirs):
    expected = {"qwen": "\n\n", "math_shepherd": "\n", "rlhflow": "\n\n", "skywork": "\n"}
    assert {kind: trained_separator(parse_prm(f"{kind}:{prm_dirs[kind]}")) for kind in KINDS} == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_solution_longer_than_the_context_is_refused_not_cut(prm_dirs, kind):
    scorer = load_scorer(kind, str(prm_dirs[kind]), device="cpu")
    long_steps = [f"Step {k}: 3 + {k} = {3 + k}." for k in range(120)]
    with pytest.raises(TooLongError, match=rf"^{kind}: solution 1 is \d+ tokens, longer than the model's context of 512"
                       ) as e:
        scorer.score(QUESTIONS[:2], [SOLUTIONS[0], long_steps])
    assert (e.value.index, e.value.context) == (1, 512) and e.value.tokens > 512  # what ProcessBench skips by


def _one_line_error(kind, path, match):
    with pytest.raises(ValueError, match=rf"^{kind}: .*{match}") as e:
        load_scorer(kind, str(path), device="cpu")
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_the_format_s_token_is_named(tmp_path):
    _one_line_error("qwen", build_qwen_prm(tmp_path / "qwen", step_token=False), "no <extra_0> token")
    _one_line_error("math_shepherd", build_math_shepherd_prm(tmp_path / "shepherd", tag=False),
                    "no single token for 'ки'")


def test_weights_or_config_not_in_the_published_layout_are_named(prm_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    qwen = shutil.copytree(prm_dirs["qwen"], tmp_path / "qwen")
    state = load_file(str(qwen / "model.safetensors"))
    state["score.3.weight"] = state.pop("score.2.weight")  # a head of another layout
    save_file(state, str(qwen / "model.safetensors"))
    _one_line_error("qwen", qwen,
                    r"published layout; weights missing \['score.2.weight'\], unexpected \['score.3.weight'\]")

    skywork = shutil.copytree(prm_dirs["skywork"], tmp_path / "skywork")
    state = torch.load(skywork / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("v_head.")}, skywork / "pytorch_model.bin")
    _one_line_error("skywork", skywork, r"missing \['v_head.summary.bias', 'v_head.summary.weight'\]")

    rlhflow = shutil.copytree(prm_dirs["rlhflow"], tmp_path / "rlhflow")
    config = json.loads((rlhflow / "config.json").read_text())
    (rlhflow / "config.json").write_text(json.dumps(config | {"architectures": ["LlamaModel"]}))
    _one_line_error("rlhflow", rlhflow, r"declares architectures \['LlamaModel'\], not one \*ForCausalLM")
    _one_line_error("skywork", prm_dirs["qwen"], "declares architectures .*, not Qwen2ForPrmModel")


def test_a_step_that_holds_the_tag_is_refused(prm_dirs):
    scorer = load_scorer("math_shepherd", str(prm_dirs["math_shepherd"]), device="cpu")
    with pytest.raises(ValueError, match=r"^math_shepherd: solution 0: the input holds 2 'ки' tokens for 1 steps"):
        scorer.score(["What is 1+1?"], [["1 + 1 = 2 ки"]])
