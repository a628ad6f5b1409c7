"""What the command line prints: output piped into a reader that stops early (``| head``) ends quietly, and
the demo's last lines say where the trained model is."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from famevil_fast.cli.main import CLOSED_STDOUT_STATUS, main

ROOT = Path(__file__).resolve().parents[1]


def test_output_into_a_closed_pipe_ends_quietly():
    """A reader that has gone (``famevil-fast info | head -0``): no traceback, no "Exception ignored"."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes anything: every write fails
    try:
        done = subprocess.run(
            [sys.executable, "-m", "famevil_fast", "info"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == CLOSED_STDOUT_STATUS == 141


def test_every_command_stops_quietly_when_its_stdout_is_closed(monkeypatch):
    """In process: stdout a pipe whose reader has gone; later writes (the exit's flush) go nowhere."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as writer:
        monkeypatch.setattr(sys, "stdout", writer)
        assert main(["info"]) == CLOSED_STDOUT_STATUS
        print("after the command", file=writer, flush=True)  # raises nothing now


def test_a_broken_pipe_with_a_stdout_that_cannot_be_asked_keeps_its_traceback(monkeypatch):
    """A stdout without a file descriptor (a notebook's) cannot tell a gone reader: the error stands."""
    import io

    from famevil_fast.cli.commands import info

    def broken_worker(args) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "run", broken_worker)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with pytest.raises(BrokenPipeError):
        main(["info"])


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback(monkeypatch, capsys):
    """A pipe to a worker process that broke is a failure, not a reader that stopped reading."""
    from famevil_fast.cli.commands import info

    def broken_worker(args) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "run", broken_worker)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end), os.fdopen(write_end, "w") as writer:
        monkeypatch.setattr(sys, "stdout", writer)  # a working pipe: its reader is still there
        with pytest.raises(BrokenPipeError):
            main(["info"])


@pytest.mark.slow
def test_demo_ends_by_naming_the_final_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    settings = [
        "--products",
        "12",
        "--updates",
        "1",
        "--set",
        "model.clip=micro",
        "--set",
        "data.image_size=32",
    ]
    settings += [
        "--set",
        "eval.max_samples=8",
        "--set",
        "eval.caption_beams=1",
        "--set",
        "eval.caption_max_len=4",
    ]
    settings += ["--set", "data.num_workers=0", "--set", "data.batch_size=4", "--set", "checkpoint.every=0"]
    settings += ["--set", "eval.caption_metrics=[bleu4]"]
    with pytest.warns(UserWarning, match="negatives"):  # 12 products cannot give sampled-100
        assert main(["demo", "--out", str(out), *settings]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    final = out / "run" / "final"
    assert any(final.iterdir())
    assert last.startswith(f"model: {final} ") and "eval, embed and caption" in last
    assert f"famevil-fast eval {final} --data {out / 'data'}" in last
