"""The PRM core: encoding, windows, the BCE step loss, saving and one-pass scoring."""

from __future__ import annotations

import math

import pytest
import torch

from mathprm.models.prm import (
    FEATURES,
    LOGP_FLOOR,
    PRMExample,
    PRMScorer,
    bce_step_loss,
    build_prm,
    collate,
    encode_solution,
    likelihood_features,
    load_prm,
    read_prm_config,
    save_prm,
    step_logits,
    windows,
)
from mathprm.models.tokenizer import build_char_tokenizer
from mathprm.prompts import Prompter
from mathprm.scorer import TooLongError
from mathprm.steps import StepFormat

FMT = StepFormat("\n")


def test_each_step_is_read_at_its_separator_token():
    tok = build_char_tokenizer()
    ids, positions = encode_solution(Prompter(tok, FMT), "1+2?", ["1 + 2 = 3", "The answer is 3"])
    text = tok.decode(ids)
    assert text == "<s>1+2?\n1 + 2 = 3\nThe answer is 3\n"
    assert [tok.convert_ids_to_tokens(ids[p]) for p in positions] == ["\n", "\n"]
    assert positions == [len(ids) - 1 - len("The answer is 3\n"), len(ids) - 1]
    with pytest.raises(ValueError, match="step 1: contains the separator"):
        encode_solution(Prompter(tok, FMT), "q", ["a", "b\nc"])


def test_windows_cover_every_step_once_and_end_at_step_ends():
    assert windows([3, 7, 9], 100) == [(0, 10, range(0, 3))]
    # Steps end at 4, 9, 14, 19 (five tokens each, prompt included in the first); windows of 10.
    cut = windows([4, 9, 14, 19], 10)
    assert cut == [(0, 10, range(0, 2)), (10, 20, range(2, 4))]
    # A step longer than the window is scored alone with its beginning cut.
    assert windows([2, 30, 33], 10) == [(0, 3, range(0, 1)), (21, 31, range(1, 2)), (24, 34, range(2, 3))]
    for start, end, which in cut:
        assert end - start <= 10


def test_bce_step_loss_by_hand():
    # Position 0: logit 0 (p = 0.5), label 0.5 -> ln 2 = 0.693147.
    # Position 2: logit ln 3 (p = 0.75), label 0.75 -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335.
    # Position 1 is not a step end: its huge logit and label 0 must not count.
    logits = torch.tensor([[0.0, 50.0, math.log(3)]])
    targets = torch.tensor([[0.5, 0.0, 0.75]])
    mask = torch.tensor([[True, False, True]])
    assert bce_step_loss(logits, targets, mask).item() == pytest.approx((0.693147 + 0.562335) / 2, abs=1e-5)
    # A soft label is learned as itself: the loss is lowest at p = y, not at a rounded label.
    grid = torch.linspace(-4, 4, 801)
    losses = [bce_step_loss(torch.tensor([[g]]), torch.tensor([[0.25]]), torch.tensor([[True]])) for g in grid]
    assert torch.sigmoid(grid[int(torch.stack(losses).argmin())]).item() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="no labelled step"):
        bce_step_loss(logits, targets, torch.zeros_like(mask))


def test_collate_places_targets_at_step_ends_only():
    batch = collate([PRMExample([1, 2, 3], [2], [0.25]), PRMExample([1, 2], [0, 1], [1.0, 0.0])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [1, 2, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.step_mask.tolist() == [[False, False, True], [True, True, False]]
    assert batch.targets[0, 2].item() == 0.25 and batch.targets[1].tolist() == [1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def prm_dir(tiny_policy_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    model = build_prm(tiny_policy_dir)
    out = tmp_path_factory.mktemp("prm")
    save_prm(model, AutoTokenizer.from_pretrained(tiny_policy_dir), FMT, out, {"base": str(tiny_policy_dir)})
    return out


def test_a_prm_starts_from_the_policy_backbone_and_saves_as_a_plain_hf_directory(tiny_policy_dir, prm_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    backbone = AutoModelForCausalLM.from_pretrained(prm_dir)  # the PRM's backbone loads as a causal LM
    assert torch.equal(backbone.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    prm = load_prm(prm_dir)
    assert prm.score.out_features == 1 and prm.features == FEATURES
    assert torch.equal(prm.lm.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    # The feature weights start as the base model's own confidence in the prefix, which comes from
    # a frozen copy saved beside the backbone.
    assert prm.feature_weights.weight[0].tolist() == [0.0, 0.0, 1.0]
    assert (prm_dir / "reference" / "config.json").is_file()
    assert not any(p.requires_grad for p in prm.reference.parameters())
    config = read_prm_config(prm_dir)
    assert config["separator"] == "\n" and config["features"] == list(FEATURES)
    assert config["kind"] == "mathprm.prm/v2"  # the format's name: PRMs saved before any refactor still load
    with pytest.raises(FileNotFoundError, match="not a PRM directory"):
        read_prm_config(tiny_policy_dir)
    with pytest.raises(ValueError, match="unknown.*bogus"):
        build_prm(tiny_policy_dir, features=["bogus"])
    plain = build_prm(tiny_policy_dir, features=[])
    assert plain.reference is None and plain.feature_weights is None


def test_training_the_backbone_leaves_the_features_alone(tiny_policy_dir):
    model = build_prm(tiny_policy_dir)
    batch = collate([PRMExample(list(range(3, 15)), [8, 11], [1.0, 0.0], step_ends=[8, 11], steps_from=4)], pad_id=0)
    before = step_logits(model, batch).detach()
    with torch.no_grad():
        model.score.weight.zero_()  # the head on the hidden state now says 0 (plus its zero bias)
    only_features = step_logits(model, batch).detach()
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p))  # wreck the trained backbone
    assert torch.equal(step_logits(model, batch).detach(), only_features)  # features: the frozen reference's
    assert not torch.equal(before, only_features)
    loss = bce_step_loss(step_logits(model, batch), batch.targets, batch.step_mask)
    loss.backward()
    assert model.feature_weights.weight.grad is not None and model.lm.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in model.reference.parameters())


def test_likelihood_features_by_hand():
    # Vocabulary of 2 tokens, 6 positions. Logits at position t predict token t + 1. Log-probs of
    # the tokens as read: token 0 (prompt) none, then ln(0.5), ln(0.2), ln(0.5), ln(0.8), ln(0.25).
    probs = torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.5, 0.5], [0.2, 0.8], [0.75, 0.25], [0.5, 0.5]])
    logits = probs.log()[None]
    ids = torch.tensor([[0, 0, 1, 1, 1, 1]])
    # Token 0 is the prompt; step 0 = tokens 1..3 (token 3 its separator), step 1 = tokens 4..5.
    step_index = torch.tensor([[-1, 0, 0, 0, 1, 1]])
    f = likelihood_features(logits, ids, step_index)
    ln = math.log
    step0 = [min(ln(0.5), ln(0.2)), (ln(0.5) + ln(0.2)) / 2, min(ln(0.5), ln(0.2))]  # the separator token 3 left out
    step1 = [ln(0.8), ln(0.8), ln(0.2)]  # token 5 is step 1's separator; the prefix minimum keeps step 0's
    assert f[0, 0].tolist() == [0.0, 0.0, 0.0]  # outside any step
    for t in (1, 2, 3):
        assert f[0, t].tolist() == pytest.approx(step0, abs=1e-6)
    for t in (4, 5):
        assert f[0, t].tolist() == pytest.approx(step1, abs=1e-6)
    assert likelihood_features(logits, ids, step_index, ["prefix_min_logp"])[0, 5].tolist() == pytest.approx([ln(0.2)])
    # A token the model gives ~0 probability is floored, so one absurd token cannot dominate.
    sure = torch.tensor([[[0.0, -100.0]] * 3])
    assert likelihood_features(sure, torch.tensor([[0, 1, 0]]), torch.tensor([[0, 0, 0]]))[0, 2, 0] == LOGP_FLOOR


def test_collate_marks_each_token_with_its_step():
    # Prompt of 2 tokens, steps ending at 4 and 6; only step 1 is labelled.
    batch = collate([PRMExample(list(range(7)), [6], [1.0], step_ends=[4, 6], steps_from=2)], pad_id=0)
    assert batch.step_index.tolist() == [[-1, -1, 0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="step_ends"):
        PRMExample([1, 2, 3], [2], [1.0], step_ends=[1])


def test_one_pass_gives_the_scores_of_one_pass_per_prefix(prm_dir):
    scorer = PRMScorer(prm_dir, device="cpu", batch_size=2)
    steps = ["12 + 5 = 17", "17 * 2 = 34", "34 - 4 = 30", "The answer is 30"]
    questions = ["Start with 12, add 5, multiply by 2, subtract 4.", "What is 2+3?"]
    one_pass = scorer.score(questions, [steps, steps[:2]])
    assert [len(s) for s in one_pass] == [4, 2]
    per_prefix = [scorer.score([questions[0]], [steps[: i + 1]])[0][-1] for i in range(len(steps))]
    assert one_pass[0] == pytest.approx(per_prefix, rel=1e-4)  # an untrained tiny PRM: scores ~1e-6
    assert all(0.0 < s < 1.0 for s in one_pass[0])
    # Windows: with a context too short for the whole solution, the steps of the first
    # window keep their scores and every step still gets one.
    full = scorer.score(["What is 2+3?"], [steps])[0]  # prompt 14 tokens, steps end at 25, 37, 49, 66
    scorer.max_length = 40
    windowed = scorer.score(["What is 2+3?"], [steps])[0]
    assert windowed[:2] == pytest.approx(full[:2], rel=1e-4) and windowed[2:] != pytest.approx(full[2:], rel=1e-2)
    assert len(windowed) == 4
    # Every window starts with the whole prompt: the oldest steps are cut, never the question.
    seen, forward = [], scorer.model.forward
    scorer.model.forward = lambda input_ids, attention_mask, **kw: (
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        or forward(input_ids, attention_mask, **kw))
    scorer.score(["What is 2+3?"], [steps])
    prompt = scorer.prompter.ids("What is 2+3?")
    assert len(seen) > 1 and all(row[: len(prompt)] == prompt and len(row) <= 40 for row in seen)
    scorer.model.forward = forward
    scorer.max_length = len(prompt)  # no room for a step: refused, not cut
    with pytest.raises(TooLongError, match="solution 0: its prompt alone is 14 tokens"):
        scorer.score(["What is 2+3?"], [steps])
    scorer.max_length = 40
    assert scorer.score(["q"], [[]]) == [[]]
    with pytest.raises(ValueError, match="solution 0: step 0: contains the separator"):
        scorer.score(["q"], [["a\nb"]])


def test_without_the_hidden_head_only_the_feature_weights_and_a_bias_train(tiny_policy_dir, tmp_path):
    from transformers import AutoTokenizer

    model = build_prm(tiny_policy_dir, hidden_head=False)
    assert model.reference is model.lm  # one frozen copy of the base: backbone and reference at once
    assert model.score.weight.abs().sum() == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"score.bias", "feature_weights.weight"}
    batch = collate([PRMExample(list(range(3, 15)), [8, 11], [1.0, 0.0], step_ends=[8, 11], steps_from=4)], pad_id=0)
    with torch.no_grad():
        model.score.bias.fill_(0.5)
        model.feature_weights.weight.copy_(torch.tensor([[0.25, -1.0, 2.0]]))
        phi = likelihood_features(model.lm(input_ids=batch.input_ids).logits, batch.input_ids, batch.step_index)
    logits = step_logits(model, batch)
    assert logits.detach()[0] == pytest.approx((0.5 + phi[0] @ torch.tensor([0.25, -1.0, 2.0])).tolist(), abs=1e-5)
    bce_step_loss(logits, batch.targets, batch.step_mask).backward()
    assert model.score.bias.grad is not None and model.feature_weights.weight.grad.abs().sum() > 0
    # Saved without a second copy of the base; loads back to the same scores.
    save_prm(model, AutoTokenizer.from_pretrained(tiny_policy_dir), FMT, tmp_path, {"base": "tiny"})
    assert not (tmp_path / "reference").exists() and read_prm_config(tmp_path)["hidden_head"] is False
    again = load_prm(tmp_path)
    assert not again.hidden_head and again.reference is again.lm
    assert step_logits(again, batch).detach()[0] == pytest.approx(logits.detach()[0].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="needs some"):
        build_prm(tiny_policy_dir, features=[], hidden_head=False)
