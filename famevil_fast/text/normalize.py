"""CLIP's text normalisation, step for step: ftfy repair, HTML unescaping (twice), whitespace collapse,
lower-casing.

ftfy is by far the slowest step, so it runs only on text it could change. On text made only of printable
ASCII and the whitespace controls tab, line feed, form feed and carriage return, ftfy's fixes have nothing
to act on (no mojibake, C1 controls, ligatures, wide or curly characters, terminal escapes or removable
control characters; NFC leaves ASCII alone) except two: HTML entities, which need both ``&`` and ``;``,
and line-break unification, whose effect the whitespace collapse erases. Everything else goes through
ftfy, with a bounded cache of its results.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache

import ftfy

_PLAIN_ASCII = re.compile(r"[\t\n\x0c\r\x20-\x7e]*")
FTFY_CACHE_SIZE = 1 << 14


def may_need_ftfy(text: str) -> bool:
    """False only when ``ftfy.fix_text`` provably changes nothing that survives the whitespace collapse."""
    if _PLAIN_ASCII.fullmatch(text) is None:
        return True
    return "&" in text and ";" in text


@lru_cache(maxsize=FTFY_CACHE_SIZE)
def _fix_text(text: str) -> str:
    return ftfy.fix_text(text)


def clean_text(text: str) -> str:
    """CLIP's ``lower`` cleaning: the text as the BPE sees it, words separated by single spaces."""
    if may_need_ftfy(text):
        text = _fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def clean_words(text: str) -> list[str]:
    """The words of ``clean_text(text)`` (its single-space-separated parts; none for an empty text).

    Plain ASCII without ``&`` is left alone by ftfy and HTML unescaping, and ASCII lower-casing maps
    characters one to one without creating whitespace, so such text is lower-cased and split directly.
    """
    if text.isascii() and "&" not in text and (text.isprintable() or _PLAIN_ASCII.fullmatch(text)):
        return text.lower().split()
    return clean_text(text).split()


def clear_cache() -> None:
    """Forget the cached ftfy results."""
    _fix_text.cache_clear()
