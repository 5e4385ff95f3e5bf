from __future__ import annotations

from transformers import AutoTokenizer

from mathprm.data.arith import generate
from mathprm.models.tokenizer import BOS, EOS, build_char_tokenizer


def test_one_token_per_character_and_exact_decode():
    tok = build_char_tokenizer()
    text = "Start with 17. Add 25.\n17 + 25 = 42\nThe answer is 42"
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_round_trips_real_world_text_after_save(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for p in generate("hard", 20, seed=0, word_problems=True):
        text = p.question + "\n" + p.solution
        assert again.decode(again(text).input_ids, skip_special_tokens=True) == text
    assert again.eos_token == EOS and again.padding_side == "left"


def test_unknown_character_is_unk_not_an_error():
    tok = build_char_tokenizer()
    ids = tok("5 € 3", add_special_tokens=False).input_ids
    assert ids[2] == tok.unk_token_id and len(ids) == 5


def test_left_padding_for_batched_generation():
    tok = build_char_tokenizer()
    batch = tok(["1 + 1", "12"], padding=True)
    assert batch.input_ids[1][:3] == [tok.pad_token_id] * 3
    assert batch.attention_mask[1] == [0, 0, 0, 1, 1, 1]
