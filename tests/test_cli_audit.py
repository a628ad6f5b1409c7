"""Findings of a command-line audit: make-synthetic's bounds (an image size that would fill the memory, too
few FashionIQ images), `train --print-config` output that `--config` reads back, eval's --out checked before
the evaluation, info's arguments checked before the build report, and parser errors as one line."""

from pathlib import Path

import pytest
from famevil_fast.configs import available, resolve

from famevil_fast.cli.main import build_parser, main
from famevil_fast.train.config import load_config


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"famevil-fast {command}: error: "), err
    assert captured.out == "", captured.out
    return err[0]


# ---------------------------------------------------------------- make-synthetic bounds
def test_make_synthetic_refuses_an_image_size_above_the_maximum(tmp_path, capsys):
    from famevil_fast.cli.commands.make_synthetic import check_sizes

    assert main(["make-synthetic", str(tmp_path / "d"), "--products", "2", "--image-size", "1025"]) == 2
    assert "--image-size must be at most 1024, got 1025" in one_error_line(capsys, "make-synthetic")
    assert not (tmp_path / "d").exists()
    huge = build_parser().parse_args(["make-synthetic", "d", "--products", "2", "--image-size", "100000"])
    with pytest.raises(ValueError, match="--image-size must be at most 1024, got 100000"):
        check_sizes(huge)  # checked alone: without the bound, the command would draw 50 GB images


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan"])
def test_make_synthetic_names_a_val_fraction_out_of_range(tmp_path, capsys, value):
    assert main(["make-synthetic", str(tmp_path / "d"), "--products", "2", "--val-fraction", value]) == 2
    line = one_error_line(capsys, "make-synthetic")
    assert line.endswith(f"--val-fraction must lie strictly between 0 and 1, got {float(value)}")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["10", "23", "0", "-1"])
def test_make_synthetic_refuses_fiq_images_below_the_minimum(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-synthetic", str(tmp_path / "d"), "--products", "2", "--fiq-images", value])
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "make-synthetic")
    assert f"argument --fiq-images: must be at least 24, got {value}" in line
    assert not (tmp_path / "d").exists()


def test_make_synthetic_accepts_the_bounds_themselves():
    from famevil_fast.cli.commands.make_synthetic import check_sizes

    for extra in (["--image-size", "1024", "--fiq-images", "24"], ["--image-size", "32"]):
        check_sizes(build_parser().parse_args(["make-synthetic", "d", "--products", "2", *extra]))


def test_make_synthetic_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        main(["make-synthetic", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "at most 1024" in help_text and "FashionGen's 256 px" in help_text
    assert "(at least 24; at most 11090, " in help_text
    assert "default: --products, raised to 24 when fewer and lowered to 11090 when more)" in help_text


# ---------------------------------------------------------------- train --print-config
def _print_config(capsys, *argv: str) -> str:
    assert main(["train", "--config", *argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted(available()))
def test_print_config_reads_back_to_the_same_config(recipe, tmp_path, capsys):
    printed = tmp_path / "r.yaml"
    printed.write_text(_print_config(capsys, recipe))
    assert load_config(printed) == load_config(resolve(recipe))
    assert _print_config(capsys, str(printed)) == printed.read_text()


def test_print_config_quotes_strings_yaml_would_misread(tmp_path, capsys):
    overrides = {
        "data.root": "'yes'",
        "data.cache": "'1e-4'",
        "model.init": "'null'",
        "checkpoint.dir": "'runs/a #1: b'",
        "model.resume_weights": '"two\\nlines"',
        "data.attributes": "'123'",
        "train.clip_grad_norm": "1.0e-4",
        "eval.tasks": "[itc, tgir]",
    }
    argv = ["tiny_cpu"] + [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    text = _print_config(capsys, *argv)
    assert "  num_attributes: null  #" in text and "  eps: 1.0e-08  #" in text
    assert "  progress: true  #" in text and "  tasks: [itc, tgir]  #" in text
    printed = tmp_path / "r.yaml"
    printed.write_text(text)
    back = load_config(printed)
    assert back == load_config(resolve("tiny_cpu"), [f"{k}={v}" for k, v in overrides.items()])
    assert (back.data.root, back.data.cache, back.model.init) == ("yes", "1e-4", "null")
    assert (back.checkpoint.dir, back.model.resume_weights) == ("runs/a #1: b", "two\nlines")


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "null"), (True, "true"), (1e-8, "1.0e-08"), ("no", "'no'"), ({"itc": 2.0}, "{itc: 2.0}")],
)
def test_yaml_value_is_one_line_of_yaml(value, text):
    from famevil_fast.train.config import yaml_value

    assert yaml_value(value) == text


# ---------------------------------------------------------------- eval --out
def _evaluation_must_not_start(monkeypatch) -> None:
    import famevil_fast.cli.commands.eval as command

    def started(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(command, "_evaluate", started)


def test_eval_out_under_a_file_is_refused_before_the_evaluation(tmp_path, capsys, monkeypatch):
    _evaluation_must_not_start(monkeypatch)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "r.json"
    assert main(["eval", str(tmp_path / "missing-ckpt"), "--data", str(tmp_path), "--out", str(out)]) == 2
    line = one_error_line(capsys, "eval")
    assert f"--out {out}: " in line and "is not a directory" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_eval_out_where_no_file_can_be_created_is_refused_first(tmp_path, capsys, monkeypatch):
    _evaluation_must_not_start(monkeypatch)
    assert main(["eval", str(tmp_path), "--data", str(tmp_path), "--out", "/proc/x/y.json"]) == 2
    line = one_error_line(capsys, "eval")
    assert "--out /proc/x/y.json: cannot create a file in /proc" in line


def test_eval_out_in_folders_still_to_make_is_accepted_and_makes_nothing(tmp_path):
    from famevil_fast.cli.commands.eval import check_output_file

    check_output_file(str(tmp_path / "new" / "dir" / "r.json"))
    check_output_file(str(tmp_path / "r.json"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- info
@pytest.mark.parametrize("argv", [["--checkpoint", "{tmp}/nonexist"], ["--clip", "bogus"]])
def test_info_checks_its_arguments_before_printing(argv, tmp_path, capsys):
    assert main(["info", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    line = one_error_line(capsys, "info")
    assert "nonexist" in line or "bogus" in line


# ---------------------------------------------------------------- parser errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["caption", "CKPT", "img", "--beams", "0"], "argument --beams: must be at least 1, got 0"),
        (["eval", "CKPT", "--data", "D", "--max-samples", "0"], "argument --max-samples: must be at least 1"),
        (["make-synthetic", "D", "--workers", "0"], "argument --workers: must be at least 1"),
        (["eval", "CKPT"], "the following arguments are required: --data"),
        (["caption", "CKPT", "img", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
        (["info", "--xaa", "q"], "argument --xaa: invalid choice: 'q'"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_parser_errors_are_one_line(argv, message, capsys):
    prog = "famevil-fast" if argv[:1] in ([], ["no-such-command"]) else f"famevil-fast {argv[0]}"
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ") and message in err[0]
    assert err[0].endswith(f"(see {prog} --help)")


def test_every_command_parser_reports_errors_in_one_line():
    from famevil_fast.cli.main import OneLineErrorParser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert isinstance(parser, OneLineErrorParser) and commands
    for name, command in commands.items():
        assert isinstance(command, OneLineErrorParser), name
        assert parser.commands[name] is command
