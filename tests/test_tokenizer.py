"""CLIP BPE tokenizer: ids identical to open_clip's, decoding, error handling, vocabulary lookup."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import famevil_fast
from famevil_fast.text import (
    CONTEXT_LENGTH,
    EOT_ID,
    SOT_ID,
    VOCAB_SIZE,
    TextInputError,
    Tokenizer,
    VocabularyNotFoundError,
    decode,
    get_tokenizer,
    normalize,
    tokenize,
)
from famevil_fast.text.vocab import VOCAB_FILE, default_vocab_path, load_vocabulary

CAPTIONS = [
    "Black Slim-Fit Wool Blazer. Long sleeve virgin wool blazer in black. Notched lapel. Single-button "
    "closure at front. Flap pockets at waist. Welt pocket at chest. Fully lined. Tonal stitching.",
    "White Logo T-Shirt Short sleeve cotton jersey t-shirt in white. Rib knit crewneck collar. Logo "
    "printed in black at chest. Tonal stitching.",
    "Crêpe de Chine Blouse in Ivory — relaxed fit, mother-of-pearl buttons, Hermès-inspired print.",
    "Comme des Garçons Play: striped cotton tee, heart appliqué at chest, façade graphic.",
    'Chloé café-au-lait suede boots, approx. 3" heel, size 40 ½, Made in Italy.',
    "It’s “oversized” — the sleeves are dropped … and the hem is raw.",
    "Ã©lÃ©gant mojibake dress: crÃ¨me colour, double-faced wool.",
    "black &amp; white checked coat, &lt;limited&gt; edition &#39;archive&#39; &quot;piece&quot;",
    "M&amp;amp;M print hoodie; &eacute;dition sp&eacute;ciale &copy; 2024",
    "Tote bag — 日本製 canvas tote with leather handles (made in Japan 日本), 한국 디자인, 中文字符",
    "🔥 bestseller 👗👠 dress with ✨sequins✨ and a 🇫🇷 flag patch 👩🏽‍🎤",
    "Fullwidth ＬＯＵＤ　ＮＯＩＳＥＳ sweatshirt with ﬂuorescent ﬁnish",
    "   Tabs\tand\nnew\r\nlines   and\u00a0non-breaking\u2003spaces\u3000everywhere   ",
    "100% virgin wool, 70% cotton / 30% polyamide, 5-pocket styling, 32x34, size XS-XXL, €250, $1,299.99",
    "Don't miss it: we've got the jacket you'll love, it's the one they'd pick, I'm sure.",
    "SHOUTING CAPS LOGO HOODIE WITH DRAWSTRING!!! ??? ... --- ___ ***",
    "<start_of_text> inside text, x<end_of_text>y, .<start_of_text> after punctuation, <START_OF_TEXT>",
    "Naïve piqué polo in Rose Pâle, Zürich edition, İstanbul capsule, ΣΑΣ Greek letters, ß and ẞ",
    "Control\x00chars\x07and\x0bvertical\x1btab\x7fdel and C1 \x85\x92 bytes",
    "Zero\u200bwidth\u200djoiners\ufeffand\u00adsoft hyphens",
    "",
    "   ",
    "!",
    "'s",
    "a",
    "Leather " * 120,
    "supercalifragilisticexpialidocious-pneumonoultramicroscopicsilicovolcanoconiosis " * 4,
]


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """open_clip's tokenizer module (loaded alone when the package is not imported yet: it is faster)."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].tokenizer
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", default_vocab_path().parent / "tokenizer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_ids(
    reference: ModuleType, texts: list[str], context_length: int = CONTEXT_LENGTH
) -> torch.Tensor:
    return reference.tokenize(texts, context_length=context_length)


def _assert_same_ids(ours: torch.Tensor, expected: torch.Tensor, texts: list[str]) -> None:
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    for row, text in enumerate(texts):
        assert ours[row].tolist() == expected[row].tolist(), f"ids differ for texts[{row}] = {text!r}"


def _reference_text(reference: ModuleType, text: str) -> str:
    return reference._tokenizer.decode(reference._tokenizer.encode(text))


# ---- ids identical to open_clip ----------------------------------------------------------------


@pytest.mark.parametrize("context_length", [77, 16, 3, 2])
def test_ids_match_open_clip(reference: ModuleType, context_length: int) -> None:
    ours = tokenize(CAPTIONS, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), context_length)
    _assert_same_ids(ours, _reference_ids(reference, CAPTIONS, context_length), CAPTIONS)


def test_layout_sot_eot_padding_truncation() -> None:
    ids = tokenize(["red dress", "", "red " * 100])
    assert ids[:, 0].eq(SOT_ID).all()
    n_red_dress = len(get_tokenizer().encode("red dress"))
    assert ids[0, n_red_dress + 1] == EOT_ID and ids[0, n_red_dress + 2 :].eq(0).all()
    assert ids[1, 1] == EOT_ID and ids[1, 2:].eq(0).all()
    assert ids[2, -1] == EOT_ID and ids[2, 1:-1].ne(EOT_ID).all() and ids[2].ne(0).all()


def test_pad_id() -> None:
    zero_padded = tokenize(CAPTIONS)
    eot_padded = tokenize(CAPTIONS, pad_id=EOT_ID)
    last_eot = CONTEXT_LENGTH - 1 - (zero_padded == EOT_ID).int().flip(1).argmax(1, keepdim=True)
    after_eot = torch.arange(CONTEXT_LENGTH) > last_eot
    assert torch.equal(eot_padded, torch.where(after_eot, EOT_ID, zero_padded))
    assert decode(eot_padded) == decode(zero_padded)
    for bad in (-1, VOCAB_SIZE, 1.0, None):
        with pytest.raises(ValueError, match="pad_id"):
            tokenize("red dress", pad_id=bad)  # type: ignore[arg-type]


def test_single_string_and_empty_batch(reference: ModuleType) -> None:
    _assert_same_ids(tokenize(CAPTIONS[0]), _reference_ids(reference, [CAPTIONS[0]]), CAPTIONS[:1])
    assert tokenize([]).shape == (0, CONTEXT_LENGTH)
    assert tokenize(c for c in CAPTIONS[:2]).shape == (2, CONTEXT_LENGTH)


def test_cache_gives_the_same_ids() -> None:
    tokenizer = Tokenizer(word_cache_size=8)
    first = tokenizer(CAPTIONS)
    assert torch.equal(tokenizer(CAPTIONS[::-1]), first.flip(0))
    tokenizer.clear_cache()
    assert torch.equal(tokenizer(CAPTIONS), first)


_ALPHABET = st.characters(
    categories=[
        "Lu",
        "Ll",
        "Lt",
        "Lm",
        "Lo",
        "Mn",
        "Mc",
        "Nd",
        "Nl",
        "No",
        "P",
        "S",
        "Zs",
        "Zl",
        "Zp",
        "Cc",
        "Cf",
    ],
    exclude_characters="\ud800",
)
_SNIPPETS = st.sampled_from(
    [
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u00a0",
        "&amp;",
        "&amp;amp;",
        "&lt;b&gt;",
        "&#233;",
        "&eacute",
        "'s",
        "'LL",
        "<start_of_text>",
        "<end_of_text>",
        "Ã©",
        "â€™",
        "ſ",
        "İ",
        "ΣΑΣ",
        "ﬁ",
        "Ｗ",
        "42",
        "x10",
        "...",
        "\U0001f469\U0001f3fd\u200d\U0001f3a4",
    ]
)
_TEXTS = st.lists(st.one_of(st.text(_ALPHABET, max_size=6), _SNIPPETS), max_size=12).map("".join)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXTS, min_size=1, max_size=4))
def test_random_unicode_matches_open_clip(reference: ModuleType, texts: list[str]) -> None:
    _assert_same_ids(tokenize(texts, context_length=40), _reference_ids(reference, texts, 40), texts)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(max_codepoint=0x7F), max_size=40) | _TEXTS)
def test_cleaning_matches_open_clip(reference: ModuleType, text: str) -> None:
    expected = reference._clean_lower(text)
    assert normalize.clean_text(text) == expected
    assert normalize.clean_words(text) == expected.split()


def test_plain_ascii_skips_ftfy() -> None:
    assert not normalize.may_need_ftfy("Red dress & black belt.\tSize 40\r\n")
    assert normalize.may_need_ftfy("black &amp; white")
    assert normalize.may_need_ftfy("crêpe")
    assert normalize.may_need_ftfy("vertical\x0btab")


# ---- decoding ------------------------------------------------------------------------------------


def test_decode_matches_open_clip_text(reference: ModuleType) -> None:
    ids = tokenize(CAPTIONS, context_length=400)
    texts = decode(ids)
    assert isinstance(texts, list) and len(texts) == len(CAPTIONS)
    for text, caption in zip(texts, CAPTIONS):
        if "_of_text>" in caption:
            continue  # special tokens inside the text: decoding stops at the first EOT, tested below
        expected = _reference_text(reference, caption)
        assert text == (expected[:-1] if expected.endswith(" ") else expected)


def test_decode_stops_at_an_eot_spelled_in_the_text() -> None:
    assert decode(tokenize("Red <start_of_text>dress<end_of_text>belt")[0]) == "red dress"


def test_decode_round_trip_of_plain_text() -> None:
    text = "long sleeve cotton poplin shirt in white . spread collar ."
    assert decode(tokenize(text)[0]) == text
    assert decode(tokenize([text, "red dress"])) == [text, "red dress"]
    assert famevil_fast.decode is decode and famevil_fast.tokenize is tokenize


def test_decode_input_forms() -> None:
    ids = tokenize("red silk dress")[0]
    content = ids[1 : int((ids == EOT_ID).nonzero()[0]) + 1].tolist()
    expected = "red silk dress"
    assert decode(ids.tolist()) == expected
    assert decode(ids.numpy().astype(np.int32)) == expected
    assert decode(content) == expected
    assert decode(content[:-1]) == expected  # no EOT: runs to the end
    assert decode([SOT_ID, *content[:-1], 0, 0]) == expected  # trailing zeros are padding
    assert decode([*content, *content]) == expected  # stops at the first EOT
    padded_with_eot = [SOT_ID, *content[:-1]] + [EOT_ID] * 10  # pad id == EOT, as HF pads CLIP text
    assert decode(torch.tensor([padded_with_eot, padded_with_eot])) == [expected, expected]
    assert decode([content, content[:2]]) == [expected, "red silk"]
    assert decode([]) == "" and decode(torch.zeros(0, 77, dtype=torch.long)) == []


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([1.0, 2.0]), "integer"),
        (torch.zeros(2, 3, 4, dtype=torch.long), "1-D or 2-D"),
        (torch.tensor(5), "1-D or 2-D"),
        ([1, VOCAB_SIZE], "outside the vocabulary"),
        ([[3, -1]], "outside the vocabulary"),
        ([1.5, 2.0], "integers"),
        ("text", "tensor, an array or a sequence"),
        ([1, [2, 3]], "flat sequence"),
    ],
)
def test_decode_rejects_bad_ids(ids: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode(ids)


# ---- errors --------------------------------------------------------------------------------------


def test_non_string_input_names_the_element() -> None:
    with pytest.raises(TextInputError, match=r"texts\[1\] is int"):
        tokenize(["ok", 3, "fine"])
    with pytest.raises(TypeError, match=r"texts\[0\] is bytes"):
        tokenize([b"bytes"])
    with pytest.raises(ValueError, match="got bytes"):
        tokenize(b"bytes")
    with pytest.raises(ValueError, match="got NoneType"):
        tokenize(None)  # type: ignore[arg-type]


def test_truncate_false_names_the_long_text() -> None:
    fits = "red dress " * 37  # 74 content tokens
    assert tokenize([fits], truncate=False)[0, -2] == EOT_ID
    with pytest.raises(ValueError, match=r"texts\[1\] \('red dress red dress.*is too long: 76 content"):
        tokenize(["short", fits + "red dress"], truncate=False)


@pytest.mark.parametrize("context_length", [1, 0, -5, 7.0, True])
def test_bad_context_length(context_length: object) -> None:
    with pytest.raises(ValueError, match="context_length"):
        tokenize("red dress", context_length=context_length)  # type: ignore[arg-type]


# ---- vocabulary ----------------------------------------------------------------------------------


def test_vocabulary_layout() -> None:
    vocabulary = load_vocabulary()
    assert len(vocabulary.tokens) == VOCAB_SIZE
    assert vocabulary.tokens[SOT_ID] == "<start_of_text>" and vocabulary.tokens[EOT_ID] == "<end_of_text>"
    assert vocabulary.tokens[0] == "!" and vocabulary.tokens[256] == "!</w>"
    assert default_vocab_path().name == VOCAB_FILE


def test_missing_vocabulary_names_the_file(tmp_path, monkeypatch) -> None:
    with pytest.raises(VocabularyNotFoundError, match="nowhere.txt.gz"):
        Tokenizer(vocab_path=tmp_path / "nowhere.txt.gz")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        default_vocab_path()


def test_truncated_vocabulary_is_rejected(tmp_path) -> None:
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\nh e\nt h\n"))
    with pytest.raises(ValueError, match="holds 2 merges"):
        Tokenizer(vocab_path=short)


def test_text_package_loads_the_tokenizer_on_first_use():
    """The model's modules take the special ids from ``famevil_fast.text`` without loading the tokenizer's
    libraries; every exported name still resolves, and an unknown one is an AttributeError."""
    import subprocess

    code = (
        "import sys, famevil_fast.model.config, famevil_fast.text as t; "
        "assert 'tokenizers' not in sys.modules and 'famevil_fast.text.tokenizer' not in sys.modules; "
        "assert (t.SOT_ID, t.EOT_ID) == (49406, 49407); "
        "[getattr(t, n) for n in t.__all__]; assert 'tokenizers' in sys.modules; "
        "assert set(t.__all__) <= set(dir(t))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'tokenise'"):
        famevil_fast.text.tokenise  # noqa: B018
