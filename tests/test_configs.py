"""Packaged recipes load and validate; the command line shows help for every command."""

import pytest
from famevil_fast.configs import available, resolve

from famevil_fast.cli.main import build_parser, main
from famevil_fast.train.config import describe_fields, load_config

RECIPES = [
    "demo_gpu",
    "mtl_distill",
    "mtl_full",
    "mtl_size_proportional",
    "pretrain_tiny_cpu",
    "teacher_cap",
    "teacher_itc",
    "teacher_scr",
    "teacher_tgir",
    "tiny_cpu",
]


def test_every_recipe_is_packaged_and_valid():
    assert sorted(available()) == RECIPES
    for name in RECIPES:
        cfg = load_config(resolve(name))
        assert cfg.model.tasks


def test_full_recipe_matches_the_reference():
    cfg = load_config(resolve("mtl_full"))
    assert (cfg.train.sampling, cfg.train.update_frequency, cfg.train.gradient_strategy) == (
        "round_robin",
        4,
        "imtlg",
    )
    assert cfg.distill.enabled and sorted(cfg.distill.teachers) == ["cap", "itc", "scr", "tgir"]
    assert cfg.schedule.decay_at == [12500, 20000] and cfg.train.updates == 22500


def test_every_field_is_documented():
    for line in describe_fields().splitlines():
        if line.startswith("  "):
            assert line.split("#", 1)[1].strip(), line


@pytest.mark.parametrize(
    "bad, message",
    [
        (["train.sampling=sometimes"], "train.sampling"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.colour=red"], "unknown key"),
        (["train.mixed_task_batches=true", "train.gradient_strategy=imtlg"], "mixed_task_batches"),
    ],
)
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, bad)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve("nowhere.yaml")


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in [
        "train",
        "eval",
        "demo",
        "info",
        "make-synthetic",
        "cache",
        "convert",
        "embed",
        "caption",
        "mine-attributes",
    ]:
        assert name in commands, name
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "usage" in text
        for empty in ("(default: None)", "(default: [])", "(default: False)"):
            assert empty not in text, f"{name} --help shows {empty}"


def test_model_section_sizes_reach_the_model():
    from famevil_fast.train.trainer import build_model

    cfg = load_config(
        None,
        ["model.clip=micro", "data.image_size=32", "model.adapter_bottleneck=8", "model.xaa_bottleneck=12"],
    )
    model = build_model(cfg)
    block = model.text.blocks[0]
    assert block.xaa.adapter.down.weight.shape[0] == 12
    assert model.vision.blocks[0].xaa.adapter.up.weight.shape[1] == 12
    assert block.tsa.adapters["itc"].down.weight.shape[0] == 8
