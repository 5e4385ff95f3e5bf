"""A character-level tokenizer for the arithmetic world, built locally and saved like any HF one.

No tokenizer can be downloaded here, so the embedded policy uses one token per character
(printable ASCII plus newline), built with the `tokenizers` library and wrapped as a
`PreTrainedTokenizerFast`: `save_pretrained` writes a `tokenizer.json` that
`AutoTokenizer.from_pretrained` and vLLM both load. One token per character makes digits
their own tokens, which is what a tiny model needs to learn carries. A real checkpoint
(e.g. Qwen2.5-Math) brings its own tokenizer; nothing else in mathprm assumes this one.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Printable ASCII without the form-feed family, plus newline (the arithmetic step separator).
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c")) 


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The arithmetic world's tokenizer: ids 0-3 special, then one id per character.

    Unknown characters map to <unk> rather than failing, so a word problem with a stray
    symbol still tokenizes. Encoding adds <s> in front; generation stops at </s>.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; `[\s\S]` matches the newline too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # batched generation continues every prompt from its last token
    )
    return tok
