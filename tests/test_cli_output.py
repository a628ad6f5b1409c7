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


def test_torch_s_extension_builder_notes_stay_off_a_command_s_output(monkeypatch):
    """torch.compile imports torch's extension builder, which logs that a CUDA toolkit was found without a
    GPU: inside ``main`` that note is not shown; its logger's level is back afterwards."""
    import logging

    from famevil_fast.cli.commands import info

    builder = logging.getLogger("torch.utils.cpp_extension")
    level = builder.level
    seen = []

    def logging_worker(args) -> int:
        seen.append(builder.isEnabledFor(logging.WARNING))
        return 0

    monkeypatch.setattr(info, "run", logging_worker)
    assert main(["info"]) == 0
    assert seen == [False] and builder.level == level and builder.isEnabledFor(logging.WARNING)


def test_the_command_formats_warnings_as_one_line_and_restores_the_format(monkeypatch):
    """Inside ``main`` a warning reads ``famevil-fast: warning: MESSAGE`` (the category before the message
    when it is not UserWarning), with no file, line or source line; a recorder (``pytest.warns``) still gets
    it with its file, and Python's format is back afterwards, an error ending the command included."""
    import warnings

    from famevil_fast.cli.commands import info

    shown = []

    def warning_worker(args) -> int:
        shown.append(
            warnings.formatwarning("two\nlines", UserWarning, "/x/famevil-fast", 6, "sys.exit(main())")
        )
        shown.append(warnings.formatwarning("old", DeprecationWarning, "/x/y.py", 1))
        warnings.warn("from the command", UserWarning, stacklevel=1)
        return 0

    original = warnings.formatwarning
    monkeypatch.setattr(info, "run", warning_worker)
    with pytest.warns(UserWarning, match="from the command") as caught:
        assert main(["info"]) == 0
    assert caught[0].filename == __file__
    assert shown == ["famevil-fast: warning: two lines\n", "famevil-fast: warning: DeprecationWarning: old\n"]
    assert warnings.formatwarning is original

    def failing_worker(args) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(info, "run", failing_worker)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info"])
    assert warnings.formatwarning is original
    with pytest.raises(SystemExit):
        main(["info", "--no-such-option"])
    assert warnings.formatwarning is original


@pytest.fixture(scope="module")
def one_product_eval(tmp_path_factory):
    """``eval`` arguments for a micro checkpoint on a dataset cut to one view (``--max-samples 1``): the
    sampled XMR protocol has no negatives and is skipped, with a warning."""
    from helpers import save_micro_checkpoint
    from test_data_fixtures import synthetic

    model = save_micro_checkpoint(tmp_path_factory.mktemp("warned"))
    data = synthetic(tmp_path_factory, products=12, image_size=32)
    capped = ["--max-samples", "1", "--tasks", "itc", "--device", "cpu"]
    return ["eval", str(model), "--data", str(data), *capped]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["script", "torchrun"])
def test_a_warning_of_the_command_is_one_line_naming_the_command(one_product_eval, tmp_path, launch):
    """The installed ``famevil-fast`` script and every process of a torchrun launch print a library warning
    as one line, not attributed to the script's ``sys.exit(main())`` line."""
    import json

    from helpers import free_port

    script = Path(sys.executable).parent / "famevil-fast"
    if launch == "script":
        if not script.exists():
            pytest.skip("the famevil-fast script is not installed next to this Python")
        command = [str(script)]
    else:
        workers = ["--nproc_per_node", "2", "--master_port", str(free_port())]
        command = [sys.executable, "-m", "torch.distributed.run", *workers, "-m", "famevil_fast"]
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, *one_product_eval, "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "XMR sampled protocol" in line]
    assert len(warned) == 1  # rank 0 alone evaluates a capped set
    assert warned[0].startswith("famevil-fast: warning: XMR sampled protocol skipped (no result)")
    assert "raise --max-samples" in warned[0]
    assert "sys.exit" not in done.stderr and "UserWarning" not in done.stderr
    assert str(script) not in done.stderr
    assert [r["protocol"] for r in json.loads(out.read_text())["results"]] == ["full"]
