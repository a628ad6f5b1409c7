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
        (["model.activation_backend=cuda"], "model.activation_backend must be one of"),
        (["model.backend=fast"], "model.backend must be one of"),
        (["train.master_weights=true", "train.precision=fp32"], "train.master_weights"),
        (["model.clip=ViT-Z"], "model section: unknown CLIP configuration 'ViT-Z'"),
        (["model.adapter_bottleneck=0"], "model section: adapter bottlenecks must be positive"),
        (["model.num_classes=0"], "model section: task 'scr' needs num_classes >= 1"),
        (["eval.caption_max_len=77"], r"eval.caption_max_len must be at most 76 \(the ViT-B-16 text context"),
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


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_train_device_accepts_cpu_cuda_and_cuda_n(device):
    assert load_config(None, [f"train.device={device}"]).train.device == device
    assert load_config(None, ["train.device=null"]).train.device is None


@pytest.mark.parametrize("device", ["foo", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "mps"])
def test_unknown_train_device_is_rejected(device):
    with pytest.raises(ValueError, match="train.device"):
        load_config(None, [f"train.device={device}"])


def test_yaml_syntax_error_names_the_file_and_position(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  updates: 10\n  decay_at: [1, 2\n  seed: 3\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: invalid YAML at line 4, column 7") as info:
        load_config(path)
    assert "<unicode string>" not in str(info.value)


def test_yaml_syntax_error_in_an_override_names_the_item():
    with pytest.raises(ValueError, match=r"--set 'schedule.decay_at=\[1, 2': invalid YAML at line 1"):
        load_config(None, ["train.updates=5", "schedule.decay_at=[1, 2"])


def test_unknown_task_is_named_before_task_weights():
    with pytest.raises(ValueError, match=r"unknown task 'tgirr'; known tasks are \('itc', 'tgir'") as info:
        load_config(resolve("tiny_cpu"), ["model.tasks=[itc, tgirr]"])
    assert "task weights" not in str(info.value)
    with pytest.raises(ValueError, match="model.tasks must name at least one task"):
        load_config(None, ["model.tasks=[]"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("eval.caption_metrics=[bleu5]", "eval.caption_metrics must be one of .*'bleu4'.*got 'bleu5'"),
        ("eval.caption_metrics=[]", "eval.caption_metrics must name at least one metric"),
        ("eval.caption_beams=0", "eval.caption_beams must be at least 1, got 0"),
        ("eval.max_samples=0", "eval.max_samples must be at least 1, got 0"),
        ("eval.caption_max_len=0", "eval.caption_max_len must be at least 1"),
        ("eval.caption_no_repeat_ngram=-1", "eval.caption_no_repeat_ngram must be at least 0"),
        ("eval.every=-5", "eval.every must be at least 0"),
        ("eval.xmr_protocols=[full, sampeld]", "eval.xmr_protocols"),
        ("eval.tasks=[mvc]", "eval.tasks: task 'mvc' has no evaluation"),
        ("eval.tasks=[capp]", "eval.tasks: task 'capp' has no evaluation"),
        ("eval.caption_references=coco", "eval.caption_references must be one of .*'raw'.*got 'coco'"),
        ("eval.sampled_seed=1.5", "eval.sampled_seed"),
        (
            "eval.sampled_seed=18446744073709551616",
            r"eval.sampled_seed must lie from -2\*\*63 to 2\*\*64 - 1",
        ),
        ("eval.xmr_protocols=[]", "eval.xmr_protocols must name at least one protocol"),
        ("eval.resize=stretch", r"eval.resize must be one of \('keep_aspect', 'squash'\), got 'stretch'"),
        ("eval.views=second", r"eval.views must be one of \('all', 'first'\), got 'second'"),
    ],
)
def test_bad_eval_fields_fail_when_the_config_loads(bad, message):
    """Eval mistakes stop `train` at start, not after the training has run."""
    with pytest.raises(ValueError, match=message):
        load_config(resolve("tiny_cpu"), [bad])


def test_the_official_evaluation_quirks_reach_the_evaluator():
    from famevil_fast.eval.runner import EvalOptions

    overrides = [
        "eval.sampled_seed=null",
        "eval.caption_len_from_references=true",
        "eval.caption_references=raw",
    ]
    options = EvalOptions.from_section(load_config(resolve("tiny_cpu"), overrides).eval)
    assert options.sampled_seed is None and options.caption_len_from_references
    assert options.caption_references == "raw"
    default = EvalOptions.from_section(load_config(resolve("tiny_cpu")).eval)
    assert default.sampled_seed == 0 and not default.caption_len_from_references
    assert default.caption_references == "clip"


def test_eval_resize_and_views_reach_the_evaluator():
    """The official code's eval resize fixed by default (aspect kept), its squash behind eval.resize; its
    every-view protocol by default, one view per product behind eval.views. Every recipe keeps the
    defaults."""
    from famevil_fast.eval.runner import EvalOptions

    for name in RECIPES:
        options = EvalOptions.from_section(load_config(resolve(name)).eval)
        assert (options.eval_resize, options.views) == ("keep_aspect", "all"), name
    cfg = load_config(resolve("tiny_cpu"), ["eval.resize=squash", "eval.views=first"])
    options = EvalOptions.from_section(cfg.eval)
    assert (options.eval_resize, options.views) == ("squash", "first")
    assert EvalOptions().eval_resize == "keep_aspect" and EvalOptions().views == "all"


def test_eval_tasks_must_be_trained_and_metric_names_come_from_the_eval_code():
    from famevil_fast.eval.captioning import CAPTION_METRICS

    with pytest.raises(ValueError, match="eval.tasks: task 'cap' is not trained"):
        load_config(None, ["model.tasks=[itc, scr]", "eval.tasks=[itc, cap]"])
    metrics = "[" + ", ".join(CAPTION_METRICS) + "]"
    cfg = load_config(None, [f"eval.caption_metrics={metrics}"])
    assert cfg.eval.caption_metrics == list(CAPTION_METRICS)


def test_data_backend_doc_names_exactly_the_backends_that_exist():
    import dataclasses

    from famevil_fast.data.backends import BACKENDS
    from famevil_fast.train.config import DataSection

    text = {f.name: f.metadata["doc"] for f in dataclasses.fields(DataSection)}["backend"]
    assert "dali_cpu" not in text
    for name in BACKENDS:
        assert name in text
        load_config(None, [f"data.backend={name}", "data.cache=runs/cache"])
    with pytest.raises(ValueError, match=r"data.backend must be one of .*got 'dali_cpu'"):
        load_config(None, ["data.backend=dali_cpu"])
    with pytest.raises(ValueError, match="data.backend 'cache' needs data.cache"):
        load_config(None, ["data.backend=cache"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (["train.clip_grad_norm=-1"], r"train.clip_grad_norm must be positive .*got -1"),
        (["train.clip_grad_norm=0"], r"train.clip_grad_norm must be positive"),
        (["distill.enabled=true"], r"distill.teachers names no teacher"),
        (
            ["distill.enabled=true", "distill.teachers={itc: t}", "distill.balance=2.5"],
            r"distill.balance .*\[0, 2\]",
        ),
        (["distill.enabled=true", "distill.teachers={itc: t}", "distill.balance=-0.1"], r"distill.balance"),
        (["checkpoint.keep_last=0"], r"checkpoint.keep_last must be at least 1, got 0"),
        (["checkpoint.keep_last=-2"], r"checkpoint.keep_last must be at least 1"),
        (["checkpoint.every=-1"], r"checkpoint.every must be at least 0, got -1"),
        (["logging.every=-5"], r"logging.every must be at least 0"),
    ],
)
def test_out_of_range_values_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, bad)


def test_in_range_edge_values_are_accepted():
    for ok in (
        ["train.clip_grad_norm=0.5"],
        ["distill.enabled=true", "distill.teachers={itc: t}", "distill.balance=0"],
        ["distill.enabled=true", "distill.teachers={itc: t}", "distill.balance=2"],
        ["checkpoint.keep_last=1", "checkpoint.every=0", "logging.every=0"],
    ):
        load_config(None, ok)


def test_global_batch_size_is_split_over_the_processes(tmp_path_factory):
    """The reference counts its micro-batch over all GPUs: data.global_batch_size reproduces that under
    torchrun, each process taking its share."""
    import torch
    from test_data_fixtures import synthetic

    from famevil_fast.train.data_feed import build_streams, process_batch_size
    from famevil_fast.train.distributed import DistInfo

    per_process = load_config(resolve("tiny_cpu"))
    assert process_batch_size(per_process, 4) == per_process.data.batch_size == 32
    cfg = load_config(resolve("tiny_cpu"), ["data.batch_size=null", "data.global_batch_size=64"])
    assert [process_batch_size(cfg, n) for n in (1, 2, 4)] == [64, 32, 16]
    with pytest.raises(ValueError, match="data.global_batch_size 64 does not split over 3 processes"):
        process_batch_size(cfg, 3)
    with pytest.raises(ValueError, match="data.global_batch_size must be at least 1, got 0"):
        load_config(resolve("tiny_cpu"), ["data.batch_size=null", "data.global_batch_size=0"])
    # a recipe that counts the global batch: a per-process override is refused, not silently ignored
    with pytest.raises(ValueError, match=r"data.batch_size \(16 per process\) and data.global_batch_size"):
        load_config(resolve("mtl_full"), ["data.batch_size=16"])
    assert process_batch_size(load_config(resolve("mtl_full"), ["data.global_batch_size=32"]), 2) == 16
    assert process_batch_size(load_config(None, []), 1) == 64  # neither set
    root = synthetic(tmp_path_factory, products=40, image_size=48)
    small = load_config(
        resolve("tiny_cpu"),
        [f"data.root={root}", "data.batch_size=null", "data.global_batch_size=8", "model.tasks=[itc, tgir]"]
        + ["train.task_weights={}"],
    )
    streams = build_streams(small, DistInfo(rank=1, world_size=4), torch.device("cpu"))
    try:
        assert {task: stream.loader.batch_size for task, stream in streams.items()} == {"itc": 2, "tgir": 2}
    finally:
        for stream in streams.values():
            stream.close()
