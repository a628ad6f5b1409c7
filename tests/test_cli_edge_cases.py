"""Edge cases of the command line and the trainer: a run directory that already holds a run, a run stopped by
a non-finite loss, recipe sections and values of the wrong shape or out of range, outputs that name a
directory, make-synthetic over a dataset it did not write, options that would have no effect, convert
--from-clip of FAME-ViL weights, and cache --verify with the cache directory alone."""

import json
from pathlib import Path

import pytest
from helpers import save_micro_checkpoint
from trainer_fixtures import micro_config, streams

from famevil_fast.cli.main import main
from famevil_fast.train.config import load_config
from famevil_fast.train.trainer import NonFiniteLoss, Trainer


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"famevil-fast {command}: error: "), err
    return err[0]


# ---------------------------------------------------------------- run directories
def test_a_new_run_refuses_a_directory_holding_another_run(tmp_path):
    Trainer(micro_config(tmp_path, "train.updates=2", "checkpoint.every=1"), streams()).fit()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"already holds the checkpoints of a run \(newest: step_00000002\)"):
        Trainer(micro_config(tmp_path, "train.updates=1"), streams()).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    resumed = Trainer(micro_config(tmp_path, "train.updates=3", "checkpoint.resume=true"), streams())
    assert resumed.fit()["update"] == 3


def test_resume_without_a_checkpoint_says_it_starts_a_new_run(tmp_path):
    Trainer(micro_config(tmp_path, "train.updates=1", "checkpoint.resume=true"), streams()).fit()
    messages = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("no checkpoint to resume" in m.get("text", "") for m in messages)


def test_a_checkpoint_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="checkpoint.dir .* is a file"):
        Trainer(micro_config(path), streams())


def test_train_refuses_a_directory_holding_a_run_before_building_anything(tmp_path, monkeypatch, capsys):
    import famevil_fast.train.trainer as trainer_module

    class Built(Exception):
        pass

    class NotToBeBuilt:
        def __init__(self, cfg) -> None:
            raise Built

    monkeypatch.setattr(trainer_module, "Trainer", NotToBeBuilt)
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000004" / "training_state.json").write_text("{}")
    argv = ["train", "--config", "tiny_cpu", "--set", f"checkpoint.dir={tmp_path}"]
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert "already holds the checkpoints of a run (newest: step_00000004)" in line and "--resume" in line
    with pytest.raises(Built):  # continuing the run goes on to build it
        main([*argv, "--resume"])
    with pytest.raises(Built):  # as does a new run in an empty directory
        main(["train", "--config", "tiny_cpu", "--set", f"checkpoint.dir={tmp_path / 'new'}"])


def test_train_stopped_by_a_non_finite_loss_is_one_line(monkeypatch, capsys):
    import famevil_fast.train.trainer as trainer_module

    class StoppingTrainer:
        def __init__(self, cfg) -> None:
            self.device = "cpu"

        def fit(self):
            raise NonFiniteLoss("update 2: non-finite loss of task(s) ['scr']; stopping at update 1")

    monkeypatch.setattr(trainer_module, "Trainer", StoppingTrainer)
    assert main(["train", "--config", "tiny_cpu", "--no-eval"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "famevil-fast train: stopped: update 2: non-finite loss of task(s) ['scr']; stopping at update 1"
    ]


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.task_weights={itc: abc}"], r"train.task_weights\['itc'\] must be of type float"),
        (["train.task_weights={itc: .inf}"], r"task weights must be positive finite"),
        (["distill.teachers={itc: 5}"], r"distill.teachers\['itc'\] must be of type str"),
        (["optim.betas=[0.9]"], r"optim.betas must be two numbers in \[0, 1\)"),
        (["optim.betas=[0.9, 1.5]"], r"optim.betas must be two numbers"),
        (["optim.lr=-1"], r"optim.lr must be a finite number >= 0, got -1.0"),
        (["optim.lr=.nan"], r"optim.lr must be a finite number >= 0, got nan"),
        (["optim.weight_decay=-0.1"], r"optim.weight_decay must be"),
        (["optim.eps=-1"], r"optim.eps must be"),
        (["schedule.warmup_updates=-3"], r"schedule.warmup_updates must be at least 0"),
        (["schedule.warmup_start_factor=-0.5"], r"schedule.warmup_start_factor must be"),
        (["schedule.decay_factor=-1"], r"schedule.decay_factor must be a finite number > 0"),
        (["schedule.decay_at=[-1]"], r"schedule.decay_at must be at least 0"),
        (["schedule.new_module_decay_at=[-2]"], r"schedule.new_module_decay_at must be at least 0"),
        (["train.seed=-1"], r"train.seed must be at least 0, got -1"),
        (["data.num_workers=-1"], r"data.num_workers must be at least 0"),
    ],
)
def test_recipe_values_out_of_range_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_section_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ValueError, match="config section 'train' must be a mapping"):
        load_config(path)


def test_an_empty_section_takes_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\nmodel:\n  clip: tiny\n")
    assert load_config(path, ["train.updates=3"]).train.updates == 3


def test_task_weights_are_read_as_numbers():
    cfg = load_config(None, ["train.task_weights={itc: 2}"])
    assert cfg.train.task_weights == {"itc": 2.0}


# ---------------------------------------------------------------- outputs and datasets
@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "CKPT", "--texts", "T", "--out", "{dir}"],
        ["eval", "CKPT", "--data", "D", "--out", "{dir}"],
        ["mine-attributes", "ROOT", "--out", "{dir}"],
    ],
)
def test_an_output_file_that_is_a_directory_is_refused_by_the_parser(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(dir=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "is a directory" in err and "Traceback" not in err


def test_embed_creates_the_output_s_parent_directories(tmp_path, capsys):
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset

    ckpt = tmp_path / "model"
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)
    FameViL(config).save_pretrained(ckpt)
    texts = tmp_path / "t.txt"
    texts.write_text("red dress\n")
    out = tmp_path / "new" / "dir" / "e.safetensors"
    assert main(["embed", str(ckpt), "--texts", str(texts), "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("command", ["make-synthetic", "demo"])
def test_a_negative_seed_is_refused_by_the_parser(command, capsys):
    argv = [command, "D", "--seed", "-1"] if command == "make-synthetic" else [command, "--seed", "-1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "argument --seed: must be at least 0" in capsys.readouterr().err


def test_make_synthetic_does_not_overwrite_a_dataset_it_did_not_write(tmp_path, capsys):
    info = tmp_path / "FashionGen" / "train_info.json"
    info.parent.mkdir()
    info.write_text("[]")
    assert main(["make-synthetic", str(tmp_path), "--products", "4"]) == 2
    assert "not written by make-synthetic" in one_error_line(capsys, "make-synthetic")
    assert info.read_text() == "[]"


def test_make_synthetic_into_a_file_is_named(tmp_path, capsys):
    path = tmp_path / "f.txt"
    path.write_text("x")
    assert main(["make-synthetic", str(path), "--products", "4"]) == 2
    assert "is not a directory" in one_error_line(capsys, "make-synthetic")


def test_make_synthetic_rewrites_its_own_dataset(tmp_path, capsys):
    assert main(["make-synthetic", str(tmp_path), "--products", "4", "--workers", "1"]) == 0
    assert main(["make-synthetic", str(tmp_path), "--products", "6", "--workers", "1"]) == 0
    record = json.loads((tmp_path / "synthetic.json").read_text())
    assert record["products_train"] + record["products_val"] == 6


def _dataset_files(root: Path) -> tuple[set[str], set[str], set[str], set[str]]:
    """The PNGs and JPEGs on disk under ``root``, and those the dataset's JSON files name."""
    on_disk_png = {str(p.relative_to(root / "FashionGen")) for p in root.glob("FashionGen/*/*.png")}
    on_disk_jpg = {p.stem for p in root.glob("FashionIQ/images/*.jpg")}
    named_png = {
        image
        for split in ("train", "val")
        for row in json.loads((root / "FashionGen" / f"{split}_info.json").read_text())
        for image in row["images"]
    }
    named_jpg = {n for f in root.glob("FashionIQ/image_splits/*.json") for n in json.loads(f.read_text())}
    return on_disk_png, named_png, on_disk_jpg, named_jpg


def test_make_synthetic_rewrite_leaves_only_the_new_dataset_s_files(tmp_path, capsys):
    base = ["make-synthetic", str(tmp_path), "--image-size", "32", "--workers", "1"]
    assert main([*base, "--products", "14", "--fiq-images", "30"]) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    own_photo = tmp_path / "FashionIQ" / "images" / "my_photo.jpg"
    own_photo.write_bytes(b"not generated")
    capsys.readouterr()
    assert main([*base, "--products", "8", "--seed", "3"]) == 0
    on_disk_png, named_png, on_disk_jpg, named_jpg = _dataset_files(tmp_path)
    assert on_disk_png == named_png
    assert on_disk_jpg - {"my_photo"} == named_jpg
    record = json.loads((tmp_path / "synthetic.json").read_text())
    assert len(on_disk_png) == record["fashiongen_images"] and len(named_jpg) == record["fashioniq_images"]
    # files make-synthetic does not write are left where they are, and those among the dataset are named
    assert notes.read_text() == "mine" and own_photo.read_bytes() == b"not generated"
    out = capsys.readouterr().out
    assert "left 1 file that make-synthetic does not write" in out and "FashionIQ/images/my_photo.jpg" in out


@pytest.mark.parametrize(
    ("option", "value", "minimum"),
    [("--products", "0", 2), ("--products", "1", 2), ("--products", "-3", 2), ("--image-size", "0", 32)],
)
def test_make_synthetic_sizes_below_the_minimum_are_one_line(tmp_path, capsys, option, value, minimum):
    assert main(["make-synthetic", str(tmp_path / "d"), option, value]) == 2
    line = one_error_line(capsys, "make-synthetic")
    assert f"{option} must be at least {minimum}, got {value}" in line
    assert not (tmp_path / "d").exists()


def test_make_synthetic_checks_the_generator_s_minimums():
    from famevil_fast.cli.commands import make_synthetic as command
    from famevil_fast.data.synthetic import generate

    assert (command.MIN_PRODUCTS, command.MIN_IMAGE_SIZE) == (generate.MIN_PRODUCTS, generate.MIN_IMAGE_SIZE)


def _interrupt_before_the_record(monkeypatch) -> None:
    """make_synthetic stops (as on Ctrl-C) after the dataset's files, before synthetic.json."""
    import famevil_fast.data.synthetic.generate as generate

    write = generate.atomic_write_json

    def interrupted(path, obj, *args, **kwargs) -> None:
        if Path(path).name == "synthetic.json":
            raise KeyboardInterrupt
        write(path, obj, *args, **kwargs)

    monkeypatch.setattr(generate, "atomic_write_json", interrupted)


def test_make_synthetic_completes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    argv = ["make-synthetic", str(tmp_path), "--products", "4", "--workers", "1"]
    with monkeypatch.context() as patch:
        _interrupt_before_the_record(patch)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    assert (tmp_path / "FashionGen" / "train_info.json").is_file()
    assert not (tmp_path / "synthetic.json").exists() and (tmp_path / "synthetic.writing").is_file()
    assert main(argv) == 0
    assert (tmp_path / "synthetic.json").is_file() and not (tmp_path / "synthetic.writing").exists()


def test_make_synthetic_keeps_a_user_s_file_with_a_generated_name_and_names_it(tmp_path, capsys):
    own = tmp_path / "FashionGen" / "val" / "7_3.png"  # there before the first run
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    argv = ["make-synthetic", str(tmp_path), "--products", "4", "--image-size", "32", "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert own.read_bytes() == b"mine"
    out = capsys.readouterr().out
    assert "left 1 file that make-synthetic does not write" in out and "FashionGen/val/7_3.png" in out


def test_make_synthetic_refuses_a_synthetic_json_it_did_not_write(tmp_path, capsys):
    (tmp_path / "synthetic.json").write_text('{"note": "mine"}')
    mine = [tmp_path / name for name in ("FashionGen/train/123_0.png", "FashionIQ/images/B000000042.jpg")]
    for path in mine:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"mine")
    assert main(["make-synthetic", str(tmp_path), "--products", "4", "--workers", "1"]) == 2
    assert "synthetic.json was not written by make-synthetic" in one_error_line(capsys, "make-synthetic")
    assert (tmp_path / "synthetic.json").read_text() == '{"note": "mine"}'
    assert all(path.read_bytes() == b"mine" for path in mine)


def _tree(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_make_synthetic_refuses_a_synthetic_json_it_did_not_write_beside_its_marker(
    tmp_path, monkeypatch, capsys
):
    base = ["make-synthetic", str(tmp_path), "--image-size", "32", "--workers", "1"]
    with monkeypatch.context() as patch:
        _interrupt_before_the_record(patch)
        with pytest.raises(KeyboardInterrupt):
            main([*base, "--products", "4"])
    (tmp_path / "synthetic.json").write_text('{"note": "mine"}')  # beside the generator's synthetic.writing
    before = _tree(tmp_path)
    assert main([*base, "--products", "6"]) == 2
    assert "synthetic.json was not written by make-synthetic" in one_error_line(capsys, "make-synthetic")
    assert _tree(tmp_path) == before


def test_make_synthetic_refuses_a_dataset_folder_linked_out_of_it(tmp_path, capsys):
    options = ["--image-size", "32", "--workers", "1"]
    assert main(["make-synthetic", str(tmp_path / "a"), "--products", "4", *options]) == 0
    assert main(["make-synthetic", str(tmp_path / "other"), "--products", "4", "--seed", "1", *options]) == 0
    images, other = tmp_path / "a" / "FashionIQ" / "images", tmp_path / "other"
    images.rename(tmp_path / "moved")
    images.symlink_to(other / "FashionIQ" / "images", target_is_directory=True)
    before = _tree(other)
    capsys.readouterr()
    assert main(["make-synthetic", str(tmp_path / "a"), "--products", "2", "--seed", "5", *options]) == 2
    line = one_error_line(capsys, "make-synthetic")
    assert f"{images} is a link to {other.resolve()}" in line and "remove the link" in line
    assert _tree(other) == before and (tmp_path / "a" / "synthetic.json").is_file()


def test_make_synthetic_removes_an_interrupted_run_s_files_it_does_not_write(tmp_path, monkeypatch, capsys):
    own = tmp_path / "FashionGen" / "val" / "7_3.png"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    base = ["make-synthetic", str(tmp_path), "--image-size", "32", "--workers", "1"]
    with monkeypatch.context() as patch:
        _interrupt_before_the_record(patch)
        with pytest.raises(KeyboardInterrupt):
            main([*base, "--products", "14", "--fiq-images", "30"])
    marker = json.loads((tmp_path / "synthetic.writing").read_text())
    assert marker["settings"] == {"products": 14, "seed": 0, "val_fraction": 0.15, "fiq_images": 30}
    assert main([*base, "--products", "4", "--seed", "3"]) == 0
    on_disk_png, named_png, on_disk_jpg, named_jpg = _dataset_files(tmp_path)
    assert on_disk_png - {"val/7_3.png"} == named_png and on_disk_jpg == named_jpg
    assert own.read_bytes() == b"mine"
    assert "FashionGen/val/7_3.png" in capsys.readouterr().out


def test_make_synthetic_looks_for_dataset_files_where_they_lie(tmp_path, capsys):
    from famevil_fast.data.synthetic.generate import make_synthetic

    image_tree = tmp_path / "a" / "FashionIQ" / "images" / "dress"
    image_tree.mkdir(parents=True)
    (image_tree / "notes.json").write_text("{}")
    make_synthetic(tmp_path / "a", products=2, image_size=32, workers=1)  # not a dataset file: written
    assert (tmp_path / "a" / "synthetic.json").is_file() and (image_tree / "notes.json").read_text() == "{}"
    captions = tmp_path / "b" / "FashionIQ" / "captions" / "cap.dress.train.json"
    captions.parent.mkdir(parents=True)
    captions.write_text("[]")
    with pytest.raises(ValueError, match=r"already holds FashionIQ/ not written by make-synthetic"):
        make_synthetic(tmp_path / "b", products=2, image_size=32, workers=1)
    assert captions.read_text() == "[]" and not (tmp_path / "b" / "FashionGen").exists()


@pytest.mark.parametrize("interrupted", [False, True])
def test_make_synthetic_reads_the_earlier_record_once(tmp_path, monkeypatch, capsys, interrupted):
    """A rewrite reads the earlier dataset's synthetic.json (or the marker of an interrupted run) once: the
    refusals and the removal of its files go by that one reading."""
    argv = ["make-synthetic", str(tmp_path), "--products", "4", "--image-size", "32", "--workers", "1"]
    with monkeypatch.context() as patch:
        if interrupted:
            _interrupt_before_the_record(patch)
        try:
            main(argv)
        except KeyboardInterrupt:
            assert interrupted
    read = Path.read_text
    reads: list[str] = []

    def counted(path: Path, *args, **kwargs) -> str:
        text = read(path, *args, **kwargs)
        if path.name in ("synthetic.json", "synthetic.writing") and path.parent == tmp_path:
            reads.append(path.name)
        return text

    monkeypatch.setattr(Path, "read_text", counted)
    assert main([*argv[:3], "6", *argv[4:]]) == 0
    assert reads == ["synthetic.writing" if interrupted else "synthetic.json"]
    record = json.loads(read(tmp_path / "synthetic.json"))
    assert record["products_train"] + record["products_val"] == 6


def test_demo_writes_again_an_interrupted_dataset_and_refuses_another(tmp_path, monkeypatch, capsys):
    from famevil_fast.cli.commands.demo import ensure_dataset

    data = tmp_path / "data"
    assert main(["make-synthetic", str(data), "--products", "4", "--workers", "1"]) == 0
    with monkeypatch.context() as patch:  # a rewrite with other settings, interrupted
        _interrupt_before_the_record(patch)
        with pytest.raises(KeyboardInterrupt):
            main(["make-synthetic", str(data), "--products", "6", "--workers", "1"])
    capsys.readouterr()
    ensure_dataset(data, 6, 0, image_size=32)  # not taken for the complete 4-product dataset
    assert "generating 6 synthetic products" in capsys.readouterr().out
    record = json.loads((data / "synthetic.json").read_text())
    assert record["products_train"] + record["products_val"] == 6
    assert not (data / "synthetic.writing").exists()
    real = tmp_path / "real"
    (real / "FashionGen").mkdir(parents=True)
    (real / "FashionGen" / "train_info.json").write_text("[]")
    with pytest.raises(ValueError, match="not written by make-synthetic"):
        ensure_dataset(real, 6, 0, image_size=32)
    assert (real / "FashionGen" / "train_info.json").read_text() == "[]"


def test_demo_sets_a_previous_run_aside(tmp_path, capsys):
    from famevil_fast.train.checkpoint import set_aside_run_dir

    run = tmp_path / "run"
    assert set_aside_run_dir(run, "demo run") is None  # nothing there yet
    assert not run.exists() and not (tmp_path / "run.previous").exists()
    for label in ("first", "second"):
        (run / "step-00000004").mkdir(parents=True)
        (run / "metrics.jsonl").write_text(label)
        assert set_aside_run_dir(run, "demo run") == tmp_path / "run.previous"
        assert not run.exists()
        assert (tmp_path / "run.previous" / "metrics.jsonl").read_text() == label  # the older one replaced
    assert "run.previous" in capsys.readouterr().out


def test_trust_pickle_reaches_the_checkpoint_commands(tmp_path, capsys):
    import argparse

    import torch

    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.export import to_official_famevil

    model = FameViL(FameViLConfig(clip=clip_preset("micro"), tasks=("itc",)))
    path = (
        tmp_path / "micro.pth"
    )  # named after its preset; a training container: tensors and a pickled config object
    torch.save(
        {"model": to_official_famevil(model.state_dict(), prefix=""), "config": argparse.Namespace()}, path
    )
    assert main(["info", "--checkpoint", str(path)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["info", "--checkpoint", str(path), "--trust-pickle"]) == 0
    for command in ("eval", "embed", "caption", "convert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--trust-pickle" in capsys.readouterr().out


# ---------------------------------------------------------------- options that would have no effect
@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("micro"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--bottleneck", "8"],
            "--bottleneck sets the size of the fresh task adapters that --from-clip adds",
        ),
        (["--bottleneck", "8", "--to", "official"], "--bottleneck sets the size"),
        (
            ["--from-clip", "--bottleneck", "8", "--to", "huggingface"],
            "--bottleneck has no effect with --to huggingface",
        ),
        (["--prefix", "net."], "--prefix .* applies only with --to official, not --to famevil_fast"),
        (["--prefix", "", "--to", "huggingface"], "--prefix .* not --to huggingface"),
        (["--from-clip", "--prefix", "net."], "--prefix"),
    ],
)
def test_convert_refuses_options_that_do_not_apply(micro_checkpoint, tmp_path, capsys, extra, message):
    import re

    suffix = ".safetensors" if "huggingface" in extra else (".pth" if "official" in extra else "")
    dest = tmp_path / f"out{suffix}"
    assert main(["convert", str(micro_checkpoint), str(dest), *extra]) == 2
    assert re.search(message, one_error_line(capsys, "convert"))
    assert not dest.exists()


def test_convert_applies_the_defaults_where_the_options_apply(micro_checkpoint, tmp_path, capsys):
    import torch

    from famevil_fast.model import FameViL

    official = tmp_path / "official.pth"
    assert main(["convert", str(micro_checkpoint), str(official), "--to", "official"]) == 0
    assert all(k.startswith("model.") for k in torch.load(official, weights_only=True))
    assert (
        main(
            [
                "convert",
                str(micro_checkpoint),
                str(tmp_path / "net.pth"),
                "--to",
                "official",
                "--prefix",
                "net.",
            ]
        )
        == 0
    )
    assert all(k.startswith("net.") for k in torch.load(tmp_path / "net.pth", weights_only=True))
    clip = tmp_path / "clip.safetensors"
    assert main(["convert", str(micro_checkpoint), str(clip), "--to", "huggingface"]) == 0
    assert main(["convert", str(clip), str(tmp_path / "r64"), "--from-clip"]) == 0
    assert FameViL.from_pretrained(tmp_path / "r64").config.adapter_bottleneck == 64
    assert (
        main(
            [
                "convert",
                str(clip),
                str(tmp_path / "r4.pth"),
                "--from-clip",
                "--bottleneck",
                "4",
                "--to",
                "official",
            ]
        )
        == 0
    )
    assert FameViL.from_pretrained(tmp_path / "r4.pth").config.adapter_bottleneck == 4


@pytest.mark.parametrize(
    "extra",
    [["--clip", "tiny"], ["--bottleneck", "8"], ["--xaa", "none"], ["--clip", "micro", "--xaa", "both"]],
)
def test_info_with_a_checkpoint_refuses_the_model_options(micro_checkpoint, capsys, extra):
    assert main(["info", "--checkpoint", str(micro_checkpoint), *extra]) == 2
    line = one_error_line(capsys, "info")
    named = [a for a in extra if a.startswith("--")]
    assert all(n in line for n in named) and "cannot be used with --checkpoint" in line, line


def test_info_counts_the_default_model_without_a_checkpoint(capsys):
    assert main(["info"]) == 0
    assert "parameters of FAME-ViL (ViT-B-16, r=64, xaa=both)" in capsys.readouterr().out
    assert main(["info", "--clip", "micro", "--bottleneck", "8", "--xaa", "text"]) == 0
    assert "parameters of FAME-ViL (micro, r=8, xaa=text)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("convert", ["(default: 64)", "(default: 'model.')"]),
        ("info", ["(default: ViT-B-16)", "(default: 64)", "(default: both)"]),
        ("cache", ["(default: 1024)", "--verify [--threads THREADS] out"]),
    ],
)
def test_help_shows_the_effective_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in shown:
        assert item in text, item


# ---------------------------------------------------------------- convert --from-clip of FAME-ViL weights
def test_convert_from_clip_refuses_a_fame_vil_checkpoint(micro_checkpoint, tmp_path, capsys):
    dest = tmp_path / "fresh"
    assert main(["convert", str(micro_checkpoint), str(dest), "--from-clip"]) == 2
    line = one_error_line(capsys, "convert")
    assert f"{micro_checkpoint} is a FAME-ViL checkpoint" in line
    assert "task adapters, cross-attention adapters, heads" in line and "without --from-clip" in line
    assert not dest.exists()
    official = tmp_path / "official.pth"  # the official layout too
    assert main(["convert", str(micro_checkpoint), str(official), "--to", "official"]) == 0
    assert main(["convert", str(official), str(dest), "--from-clip"]) == 2
    assert "is a FAME-ViL checkpoint" in one_error_line(capsys, "convert")
    assert main(["convert", str(official), str(dest)]) == 0  # as the message advises


# ---------------------------------------------------------------- cache --verify OUT
def _tiny_data_root(root):
    from test_data_fixtures import noise_image

    rows = []
    for i in range(2):
        noise_image(root / "FashionGen" / f"train/{i}.png", 20, 24, seed=i)
        rows.append(
            {"images": [f"train/{i}.png"], "id": i, "title": "t", "description": "d", "subcategory_id": i}
        )
    (root / "FashionGen" / "train_info.json").write_text(json.dumps(rows))
    return root


def test_cache_verify_takes_the_cache_directory_alone(tmp_path, capsys):
    root, out = _tiny_data_root(tmp_path / "data"), tmp_path / "cache"
    assert main(["cache", str(root), str(out), "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["cache", "--verify", str(out)]) == 0
    assert "2 images, 1 shards, checksums match" in capsys.readouterr().out
    assert main(["cache", str(out), "--verify", "--threads", "1"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cache", "--verify", "ROOT", "OUT"], "--verify checks the existing cache and reads no dataset"),
        (["cache", "--verify", "--max-side", "64", "OUT"], "--max-side only applies when building a cache"),
        (["cache", "--verify", "--shard-mb", "8", "--no-progress", "OUT"], "--shard-mb and --no-progress"),
        (["cache", "OUT"], "building a cache needs the dataset directory and the cache directory"),
    ],
)
def test_cache_arguments_that_do_not_fit_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in one_error_line(capsys, "cache")


def test_trust_pickle_reaches_from_clip(tmp_path):
    import argparse

    import torch

    from famevil_fast.model import FameViL, clip_preset
    from famevil_fast.model.clip import CLIP

    path = tmp_path / "micro.pth"  # CLIP weights in a container with a pickled object
    torch.save({"model": CLIP(clip_preset("micro")).state_dict(), "config": argparse.Namespace()}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        FameViL.from_clip(path)
    assert FameViL.from_clip(path, trust_pickle=True).config.clip == clip_preset("micro")
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out), "--from-clip"]) == 2
    assert main(["convert", str(path), str(out), "--from-clip", "--trust-pickle"]) == 0


def test_eval_without_pycocoevalcap_stops_before_encoding(tmp_path, monkeypatch, capsys):
    import sys

    from famevil_fast.model import FameViL, FameViLConfig, clip_preset

    def no_eval_sets(*args, **kwargs):
        raise AssertionError("the evaluation sets were built")

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # not installed
    monkeypatch.setattr("famevil_fast.data.build_eval_sets", no_eval_sets)
    config = FameViLConfig(clip=clip_preset("micro"), tasks=("cap",), adapter_bottleneck=8, xaa_bottleneck=8)
    FameViL(config).save_pretrained(tmp_path / "cap")
    assert main(["eval", str(tmp_path / "cap"), "--data", str(tmp_path)]) == 2
    assert "caption metrics need pycocoevalcap" in capsys.readouterr().err
