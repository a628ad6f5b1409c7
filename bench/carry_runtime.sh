#!/usr/bin/env bash
# The pure-Python packages famevil_fast needs at run time that the lent GPU machines lack (the tokenizer's
# ftfy and wcwidth, open_clip's BPE vocabulary file, pycocoevalcap's BLEU, ROUGE-L and CIDEr scorers and PTB
# tokenizer), copied from an environment that has them into .carry/site (about 11 MB; pycocoevalcap
# without METEOR and SPICE, 96 MB of jars: the demo's caption metrics, BLEU-4, ROUGE-L and CIDEr, need
# neither).
# bench/gpu_check.sh puts .carry/site on the path when it is there; the call carries it (carry: .carry/site).
#
#   bash bench/carry_runtime.sh          # from .venv/bin/python (PYTHON=... picks another environment)
#
# CARRY_RUNTIME_OUT (default .carry/site) moves the folder; a folder there is replaced only when it holds
# nothing but these packages. Relative paths in PYTHON and CARRY_RUNTIME_OUT are the caller's.
set -euo pipefail
absolute() {  # a path relative to the caller's directory, made absolute
  case "$1" in /* | "") echo "$1" ;; *) echo "$PWD/$1" ;; esac
}
PY="${PYTHON:-}"
[[ "$PY" == */* ]] && PY=$(absolute "$PY")  # a bare command name stays one
OUT_DIR=$(absolute "${CARRY_RUNTIME_OUT:-}")
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT_DIR="${OUT_DIR:-.carry/site}"
"$PY" - "$OUT_DIR" <<'PYEOF'
import importlib.util, pathlib, shutil, sys

out = pathlib.Path(sys.argv[1])
# package -> the parts of it that travel (None: all of it)
PACKAGES = {
    "ftfy": None,
    "wcwidth": None,
    "open_clip": None,
    "pycocoevalcap": ("bleu", "cider", "rouge", "tokenizer", "eval.py"),
}
missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"carry_runtime: {', '.join(missing)} not installed in {sys.executable}")
if out.exists():
    foreign = sorted(p.name for p in out.iterdir() if p.name not in PACKAGES)
    if foreign or not out.is_dir():
        sys.exit(f"carry_runtime: {out} holds other files ({', '.join(foreign[:5]) or 'not a folder'}); not replaced")
    shutil.rmtree(out)
out.mkdir(parents=True)
skip = shutil.ignore_patterns("__pycache__", "*.pyc")
for name, parts in PACKAGES.items():
    source = pathlib.Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))
    if parts is None:
        shutil.copytree(source, out / name, ignore=skip)
        continue
    (out / name).mkdir()
    for part in parts:
        if (source / part).is_dir():
            shutil.copytree(source / part, out / name / part, ignore=skip)
        else:
            shutil.copy2(source / part, out / name / part)
size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
print(f"wrote {out} ({', '.join(PACKAGES)}; {size / 2**20:.1f} MiB)")
PYEOF
