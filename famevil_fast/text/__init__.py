"""Text handling: CLIP's BPE tokenizer (``tokenize``, ``decode``) and its normalisation and vocabulary.

The special token ids load with the package; the tokenizer (and the libraries it needs) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from famevil_fast.text.special_tokens import EOT_ID, SOT_ID

_LAZY = {
    "CONTEXT_LENGTH": "famevil_fast.text.tokenizer",
    "VOCAB_SIZE": "famevil_fast.text.tokenizer",
    "TextInputError": "famevil_fast.text.tokenizer",
    "Tokenizer": "famevil_fast.text.tokenizer",
    "decode": "famevil_fast.text.tokenizer",
    "get_tokenizer": "famevil_fast.text.tokenizer",
    "tokenize": "famevil_fast.text.tokenizer",
    "VocabularyNotFoundError": "famevil_fast.text.vocab",
}

if TYPE_CHECKING:
    from famevil_fast.text.tokenizer import (
        CONTEXT_LENGTH,
        VOCAB_SIZE,
        TextInputError,
        Tokenizer,
        decode,
        get_tokenizer,
        tokenize,
    )
    from famevil_fast.text.vocab import VocabularyNotFoundError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'famevil_fast.text' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily loaded ones among them (for ``dir()`` and completion)."""
    return sorted({*globals(), *_LAZY})


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
