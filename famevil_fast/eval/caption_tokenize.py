"""Caption tokenisation before scoring: the coco-caption PTB tokeniser, and a pure-Python approximation.

``ptb_tokenize`` runs Stanford CoreNLP 3.4.1's PTBTokenizer from the jar shipped inside the
``pycocoevalcap`` wheel (``-preserveLines -lowerCase``, UTF-8, one caption per line, through stdin; no
network, no file written), then drops the punctuation tokens of coco-caption's list. That is the
tokenisation behind every published coco-caption score. It needs a Java runtime (``java`` on PATH);
without one it raises ``JavaNotFoundError``.

``simple_tokenize`` is the documented fallback without Java: lower-case, PTB-like splitting of
punctuation, contractions and brackets (``(`` -> ``-lrb-`` as the lower-cased PTB output), then the same
punctuation removal. It agrees with PTB on ordinary product text; it differs on abbreviations with a final
period, some symbol clusters and quote handling inside words.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

TOKENIZERS = ("ptb", "simple", "auto")
_JAR = "stanford-corenlp-3.4.1.jar"
_LINE_BREAKS = re.compile(r"[\r\n\u0085\u2028\u2029\x0b\x0c]")


class JavaNotFoundError(RuntimeError):
    """No Java runtime: the PTB tokeniser and METEOR 1.5 cannot run."""


class CaptionMetricsUnavailable(ImportError):
    """pycocoevalcap, which the caption metrics use, is not installed."""


def find_java() -> str | None:
    """Path of the ``java`` executable on PATH, or None."""
    return shutil.which("java")


def require_java(what: str) -> str:
    java = find_java()
    if java is None:
        raise JavaNotFoundError(
            f"{what} needs a Java runtime (8 or newer): install one "
            "(e.g. apt-get install default-jre-headless) "
            "and put java on PATH; without Java use tokenizer='simple' and leave 'meteor' out of the metrics"
        )
    return java


def pycocoevalcap_dir() -> Path:
    """Install folder of pycocoevalcap (a namespace package: no __init__.py, hence no __file__)."""
    try:
        import pycocoevalcap
    except ImportError as err:
        raise CaptionMetricsUnavailable(
            "caption metrics need pycocoevalcap: pip install 'famevil_fast[eval]' (or pycocoevalcap>=1.2)"
        ) from err
    return Path(next(iter(pycocoevalcap.__path__)))


def require_caption_metrics(metrics: Sequence[str] | None, what: str) -> None:
    """Raise before any work when the caption ``metrics`` cannot be computed here: pycocoevalcap
    (CaptionMetricsUnavailable) for all of them, a Java runtime (JavaNotFoundError) for METEOR asked for by
    name (None: every metric that can run, METEOR only where Java is found); ``what`` names the setting."""
    pycocoevalcap_dir()
    if metrics is not None and "meteor" in metrics:
        require_java(f"{what} 'meteor' (METEOR 1.5)")


def punctuation() -> frozenset[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


def _one_line(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"captions must be strings, got {type(text).__name__}")
    return _LINE_BREAKS.sub(" ", text).strip()


def _drop_punctuation(tokens: list[str], punct: frozenset[str]) -> str:
    return " ".join(t for t in tokens if t not in punct)


def ptb_tokenize(texts: list[str]) -> list[str]:
    """Lower-cased PTB tokens of each text joined by single spaces, coco-caption punctuation removed."""
    lines = [_one_line(t) for t in texts]
    if not lines:
        return []
    java = require_java("PTB tokenisation")
    jar = pycocoevalcap_dir() / "tokenizer" / _JAR
    if not jar.is_file():
        raise FileNotFoundError(f"PTB tokeniser jar missing from the pycocoevalcap install: {jar}")
    cmd = [
        java,
        "-cp",
        str(jar),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-encoding",
        "utf-8",
        "-preserveLines",
        "-lowerCase",
    ]
    done = subprocess.run(cmd, input="\n".join(lines).encode("utf-8"), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"PTB tokeniser failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
        )
    out = done.stdout.decode("utf-8").split("\n")
    if len(out) == len(lines) + 1 and out[-1] == "":
        out.pop()
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokeniser returned {len(out)} lines for {len(lines)} captions")
    punct = punctuation()
    return [_drop_punctuation(line.split(), punct) for line in out]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(
    r"""
    \w+(?=n't\b)                 # "do" of "don't"
  | n't\b                        # the negation
  | '(?:s|re|ve|ll|d|m)\b        # clitics
  | \d+(?:[.,]\d+)+              # 3.5, 1,000
  | \w+(?:[-/.]\w+)*             # words, e-mail, a/b, u.s.a
  | \.\.\.|--                    # multi-character punctuation
  | \S                           # any other symbol on its own
    """,
    re.VERBOSE,
)


def simple_tokenize(texts: list[str]) -> list[str]:
    """Pure-Python approximation of ``ptb_tokenize`` (see the module docstring for where they differ)."""
    punct = punctuation()
    out = []
    for text in texts:
        tokens = [
            _BRACKETS.get(t, t) for t in _TOKEN.findall(_one_line(text).lower().replace("\u2014", "--"))
        ]
        out.append(_drop_punctuation(tokens, punct | {'"'}))
    return out


def tokenize_captions(texts: list[str], tokenizer: str) -> tuple[list[str], str]:
    """Tokenise with ``tokenizer``: "ptb", "simple", or "auto" (ptb when Java exists).

    Returns (tokenised texts, name of the tokeniser used)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "auto":
        tokenizer = "ptb" if find_java() is not None else "simple"
    return (ptb_tokenize(texts) if tokenizer == "ptb" else simple_tokenize(texts)), tokenizer
