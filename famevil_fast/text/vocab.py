"""CLIP's byte-level BPE vocabulary: where the file lives, how it is read, and the byte alphabet.

The vocabulary ships with open_clip as ``bpe_simple_vocab_16e6.txt.gz`` (a header line, then one merge
``"left right"`` per line). CLIP keeps the first 48,894 merges; the token table is the 256 byte symbols,
the same 256 symbols with the end-of-word suffix ``</w>``, one token per merge, then the two special
tokens, 49,408 entries in all.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_PACKAGE = "open_clip"
END_OF_WORD = "</w>"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2


class VocabularyNotFoundError(FileNotFoundError, ValueError):
    """The BPE vocabulary file could not be found."""


@cache
def byte_alphabet() -> tuple[str, ...]:
    """The printable stand-in for every byte value 0..255 (index = byte), as used by GPT-2 and CLIP.

    Bytes that are visible Latin-1 characters stand for themselves; the others (controls, space, a few
    Latin-1 gaps) are shifted, in byte order, to code points 256, 257, ...
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    visible_set = set(visible)
    symbols: list[str] = []
    shifted = 256
    for byte in range(256):
        if byte in visible_set:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return tuple(symbols)


def byte_order() -> list[int]:
    """Byte values in CLIP's vocabulary order: the visible bytes first, then the shifted ones."""
    alphabet = byte_alphabet()
    return sorted(range(256), key=lambda byte: (ord(alphabet[byte]) >= 256, ord(alphabet[byte])))


def default_vocab_path() -> Path:
    """The vocabulary file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise VocabularyNotFoundError(
            f"CLIP BPE vocabulary {VOCAB_FILE!r} not found: the {VOCAB_PACKAGE!r} package "
            "(pip install open_clip_torch) is not installed; pass vocab_path= to use a copy of the file"
        )
    for location in locations:
        path = Path(location) / VOCAB_FILE
        if path.is_file():
            return path
    raise VocabularyNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILE!r} not found in the installed {VOCAB_PACKAGE!r} package "
        f"({', '.join(locations)}); reinstall open_clip_torch or pass vocab_path="
    )


@dataclass(frozen=True)
class Vocabulary:
    """The token table (index = id) and the ranked merge list of CLIP's BPE."""

    tokens: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]

    def token_to_id(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}


def load_vocabulary(path: str | os.PathLike[str] | None = None) -> Vocabulary:
    """Read the gzip'd merges file and build CLIP's token table from it."""
    path = Path(path) if path is not None else default_vocab_path()
    if not path.is_file():
        raise VocabularyNotFoundError(f"CLIP BPE vocabulary file not found: {str(path)!r}")
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a gzip'd UTF-8 BPE merges file: {error}") from error
    body = lines[1 : NUM_MERGES + 1]
    while body and not body[-1].strip():
        body.pop()
    if len(body) != NUM_MERGES:
        raise ValueError(f"{str(path)!r} holds {len(body)} merges, CLIP needs {NUM_MERGES}")
    merges = tuple(_parse_merge(line, number, path) for number, line in enumerate(body, 2))
    alphabet = byte_alphabet()
    symbols = [alphabet[byte] for byte in byte_order()]
    tokens = (
        *symbols,
        *(s + END_OF_WORD for s in symbols),
        *(a + b for a, b in merges),
        SOT_TOKEN,
        EOT_TOKEN,
    )
    return Vocabulary(tokens=tokens, merges=merges)


def _parse_merge(line: str, number: int, path: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{str(path)!r} line {number}: expected a merge 'left right', got {line!r}")
    return parts[0], parts[1]
