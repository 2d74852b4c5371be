"""The embedded scales' character-level tokenizer (one token per character).

Built with the ``tokenizers`` library (WordLevel over single characters, a one-character Split pre-tokenizer,
a Fuse decoder so decoding does not put spaces between characters) and saved in a directory of its own: a character
tokenizer saved beside a Qwen2 model reloads through AutoTokenizer as Qwen2Tokenizer and re-tokenizes differently,
which is why scales carry ``scale.tokenizer`` apart from ``scale.model``.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def build_char_tokenizer(out_dir: str | Path):
    """Build, save and return the character tokenizer (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  bos_token=None, padding_side="left", clean_up_tokenization_spaces=False)
    tok.model_max_length = 1024
    tok.save_pretrained(str(out_dir))
    return tok


assert set(string.digits) <= set(CHARS)
