"""CLIP's BPE tokenizer: text to (B, context_length) token ids and ids back to text.

Ids are identical to ``open_clip.tokenize``: ``[SOT, content..., EOT]`` then zeros; over-long content is
cut to ``context_length - 2`` tokens so that SOT stays first and EOT lands in the last position.

How a text becomes ids:

1. ``normalize.clean_words``: ftfy (only when it could matter), HTML unescaping, whitespace collapse,
   lower-casing, exactly as CLIP does, then the cleaned text split at its single spaces into words.
2. CLIP's pre-tokenisation pattern never matches across a space, so a text's pieces are the
   concatenation of its words' pieces and every word can be encoded on its own and remembered:
   ``Tokenizer`` keeps a bounded word -> ids cache.
3. A word not yet in the cache is split with CLIP's pattern (the ``regex`` module, same flags); a piece
   that spells a special token becomes that token, every other piece goes through byte-level BPE in the
   ``tokenizers`` library, loaded with CLIP's token table and merges (end-of-word suffix ``</w>``).

Decoding maps ids back to their bytes, joins, decodes UTF-8 with replacement characters and turns each
``</w>`` into a space, like open_clip's ``SimpleTokenizer.decode``; see ``Tokenizer.decode`` for what is
dropped around the content.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import cache, cached_property
from itertools import chain, islice

import numpy as np
import regex
import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import models, pre_tokenizers

from famevil_fast.text import normalize
from famevil_fast.text.special_tokens import CONTEXT_LENGTH, EOT_ID, SOT_ID
from famevil_fast.text.vocab import END_OF_WORD, EOT_TOKEN, SOT_TOKEN, byte_alphabet, load_vocabulary

VOCAB_SIZE = 49408
WORD_CACHE_SIZE = 1 << 20

_PIECE = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


class TextInputError(TypeError, ValueError):
    """A text argument that is not a string (or a sequence of strings)."""


class Tokenizer:
    """CLIP BPE tokenizer with open_clip's vocabulary; ``Tokenizer()(texts)`` is ``tokenize(texts)``."""

    def __init__(
        self, vocab_path: str | os.PathLike[str] | None = None, word_cache_size: int = WORD_CACHE_SIZE
    ):
        vocabulary = load_vocabulary(vocab_path)
        if len(vocabulary.tokens) != VOCAB_SIZE:
            raise ValueError(f"vocabulary has {len(vocabulary.tokens)} tokens, expected {VOCAB_SIZE}")
        self._tokens = vocabulary.tokens
        token_to_id = vocabulary.token_to_id()
        self._special = {SOT_TOKEN: (token_to_id[SOT_TOKEN],), EOT_TOKEN: (token_to_id[EOT_TOKEN],)}
        if self._special != {SOT_TOKEN: (SOT_ID,), EOT_TOKEN: (EOT_ID,)}:
            raise ValueError(
                f"vocabulary puts the special tokens at {self._special}, expected {SOT_ID}/{EOT_ID}"
            )
        bpe = models.BPE(vocab=token_to_id, merges=list(vocabulary.merges), end_of_word_suffix=END_OF_WORD)
        self._bpe = _RustTokenizer(bpe)
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._word_cache_size = word_cache_size
        self._words: dict[str, tuple[int, ...]] = {}

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The content ids of one text, without SOT/EOT and without truncation."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The content ids of each text, without SOT/EOT and without truncation."""
        words_per_text = [normalize.clean_words(text) for text in texts]
        word_ids = iter(self._word_ids(list(chain.from_iterable(words_per_text))))
        return [list(chain.from_iterable(islice(word_ids, len(words)))) for words in words_per_text]

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = CONTEXT_LENGTH,
        truncate: bool = True,
        *,
        pad_id: int = 0,
    ) -> torch.LongTensor:
        """(B, context_length) int64 ids: SOT, content, EOT, then ``pad_id`` (0, as open_clip; Hugging
        Face's CLIP tokenizer pads with EOT_ID); see the module docstring."""
        texts = _as_text_list(texts)
        _check_context_length(context_length)
        _check_token_id(pad_id, "pad_id")
        words_per_text = [normalize.clean_words(text) for text in texts]
        word_ids = self._word_ids(list(chain.from_iterable(words_per_text)))
        flat, starts, lengths = _concatenate(word_ids, [len(words) for words in words_per_text])
        if not truncate and (lengths > context_length - 2).any():
            index = int(np.argmax(lengths > context_length - 2))
            raise ValueError(_too_long_message(index, texts[index], int(lengths[index]), context_length))
        packed = _pack(flat, starts, lengths, context_length, pad_id)
        return torch.from_numpy(packed)  # type: ignore[return-value]

    def clear_cache(self) -> None:
        """Forget every cached word encoding and ftfy result (the next texts are encoded from scratch)."""
        self._words.clear()
        normalize.clear_cache()

    def _word_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        """The ids of each word, from the cache (words not in it are encoded and cached first)."""
        try:
            return list(map(self._words.__getitem__, words))
        except KeyError:
            known = self._learn(set(words))
            return list(map(known.__getitem__, words))

    def _learn(self, words: set[str]) -> dict[str, tuple[int, ...]]:
        """The ids of each word; the ones not cached yet are encoded and cached (the cache starts over
        when it would outgrow its size)."""
        cache = self._words
        known = {word: ids for word in words if (ids := cache.get(word)) is not None}
        learned = self._encode_words([word for word in words if word not in known])
        if len(cache) + len(learned) > self._word_cache_size:
            cache.clear()
        cache.update(learned)
        known.update(learned)
        return known

    def _encode_words(self, words: list[str]) -> dict[str, tuple[int, ...]]:
        """CLIP's pieces of each word, special pieces to their ids and the others through the BPE."""
        pieces_per_word = [_PIECE.findall(word) for word in words]
        plain = [piece for pieces in pieces_per_word for piece in pieces if piece not in self._special]
        plain_ids = iter(self._bpe_pieces(plain))
        encoded = {}
        for word, pieces in zip(words, pieces_per_word):
            ids = [self._special[piece] if piece in self._special else next(plain_ids) for piece in pieces]
            encoded[word] = tuple(chain.from_iterable(ids))
        return encoded

    def _bpe_pieces(self, pieces: list[str]) -> list[tuple[int, ...]]:
        """Byte-level BPE of each piece, in one call to the tokenizers library."""
        if not pieces:
            return []
        encoding = self._bpe.encode(pieces, is_pretokenized=True, add_special_tokens=False)
        grouped: list[list[int]] = [[] for _ in pieces]
        for token_id, piece_index in zip(encoding.ids, encoding.word_ids):
            grouped[piece_index].append(token_id)
        return [tuple(ids) for ids in grouped]

    # ---- decoding -------------------------------------------------------------------------------

    def decode(self, ids: object) -> str | list[str]:
        """Text of one id sequence (1-D -> str) or of each row (2-D, or a list of sequences -> list[str]).

        A sequence is read up to its first EOT; SOT ids are dropped; a sequence without EOT ends at its
        last non-zero id (trailing zeros are padding). The text is what open_clip's
        ``SimpleTokenizer.decode`` gives for the remaining ids, without the space that it leaves after the
        last word.
        """
        rows, batched = _id_rows(ids)
        texts = [self._decode_row(row) for row in rows]
        return texts if batched else texts[0]

    @cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        byte_of = {symbol: byte for byte, symbol in enumerate(byte_alphabet())}
        return tuple(bytes(byte_of[char] for char in token) for token in self._tokens)

    def _decode_row(self, ids: list[int]) -> str:
        if EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID)]
        else:
            ids = ids[: len(ids) - next((n for n, i in enumerate(reversed(ids)) if i != 0), len(ids))]
        table = self._token_bytes
        raw = b"".join([table[i] for i in ids if i != SOT_ID])
        text = raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
        return text[:-1] if text.endswith(" ") else text


@cache
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer with open_clip's packaged vocabulary (built on first use)."""
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str],
    context_length: int = CONTEXT_LENGTH,
    truncate: bool = True,
    *,
    pad_id: int = 0,
) -> torch.LongTensor:
    """CLIP token ids of shape (B, context_length), identical to ``open_clip.tokenize``.

    ``truncate=False`` raises ValueError for a text whose content needs more than ``context_length - 2``
    tokens instead of cutting it.
    """
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate, pad_id=pad_id)


def decode(ids: object) -> str | list[str]:
    """Text of CLIP token ids: 1-D -> str, 2-D -> list of str (see ``Tokenizer.decode``)."""
    return get_tokenizer().decode(ids)


# ---- helpers ------------------------------------------------------------------------------------


def _concatenate(
    word_ids: list[tuple[int, ...]], words_per_text: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ids in one flat array, with each text's start offset and number of ids."""
    ids_per_word = np.fromiter(map(len, word_ids), dtype=np.int64, count=len(word_ids))
    ends_by_word = np.concatenate(([0], np.cumsum(ids_per_word)))
    word_bounds = np.concatenate(([0], np.cumsum(np.asarray(words_per_text, dtype=np.int64))))
    starts = ends_by_word[word_bounds[:-1]]
    lengths = ends_by_word[word_bounds[1:]] - starts
    flat = np.fromiter(chain.from_iterable(word_ids), dtype=np.int64, count=int(ends_by_word[-1]))
    return flat, starts, lengths


def _pack(
    flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, context_length: int, pad_id: int
) -> np.ndarray:
    """(B, context_length) array: SOT, each text's ids cut to ``context_length - 2``, EOT, padding."""
    kept = np.minimum(lengths, context_length - 2)
    out = np.full((len(starts), context_length), pad_id, dtype=np.int64)
    out[:, 0] = SOT_ID
    offsets = np.arange(context_length - 2)
    content = offsets < kept[:, None]
    out[:, 1:-1][content] = flat[(starts[:, None] + offsets)[content]]
    out[np.arange(len(starts)), kept + 1] = EOT_ID
    return out


def _as_text_list(texts: object) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TextInputError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    items = list(texts)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TextInputError(f"texts[{index}] is {type(item).__name__} ({item!r:.60}), expected str")
    return items


def _check_context_length(context_length: object) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise ValueError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (room for SOT and EOT), got {context_length}")


def _check_token_id(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < VOCAB_SIZE:
        raise ValueError(f"{name} must be a token id in [0, {VOCAB_SIZE}), got {value!r}")


def _too_long_message(index: int, text: str, n_content: int, context_length: int) -> str:
    return (
        f"texts[{index}] ({text!r:.80}) is too long: {n_content} content tokens + SOT/EOT = {n_content + 2} "
        f"> context_length {context_length}; pass truncate=True to cut it"
    )


def _id_rows(ids: object) -> tuple[list[list[int]], bool]:
    """Validated id rows and whether the input was a batch (2-D)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim not in (1, 2):
            raise ValueError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
        rows = [ids] if ids.ndim == 1 else list(ids)
        return [_id_row(row, index) for index, row in enumerate(rows)], ids.ndim == 2
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(
            f"token ids must be a tensor, an array or a sequence of ints, got {type(ids).__name__}"
        )
    if len(ids) > 0 and all(isinstance(row, (Sequence, np.ndarray, torch.Tensor)) for row in ids):
        return [_id_row(row, index) for index, row in enumerate(ids)], True
    return [_id_row(ids, 0)], False


def _id_row(row: object, index: int) -> list[int]:
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().numpy()
    try:
        array = np.asarray(row) if len(row) else np.zeros(0, dtype=np.int64)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"token id row {index} is not a flat sequence of ints: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"token id row {index} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"token id row {index} must hold integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= VOCAB_SIZE):
        bad = array[(array < 0) | (array >= VOCAB_SIZE)][0]
        raise ValueError(f"token id row {index} holds {bad}, outside the vocabulary [0, {VOCAB_SIZE})")
    return array.tolist()
