"""Text handling: CLIP's BPE tokenizer (``tokenize``, ``decode``) and its normalisation and vocabulary."""

from famevil_fast.text.tokenizer import (
    CONTEXT_LENGTH,
    EOT_ID,
    SOT_ID,
    VOCAB_SIZE,
    TextInputError,
    Tokenizer,
    decode,
    get_tokenizer,
    tokenize,
)
from famevil_fast.text.vocab import VocabularyNotFoundError

__all__ = [
    "CONTEXT_LENGTH",
    "EOT_ID",
    "SOT_ID",
    "VOCAB_SIZE",
    "TextInputError",
    "Tokenizer",
    "VocabularyNotFoundError",
    "decode",
    "get_tokenizer",
    "tokenize",
]
