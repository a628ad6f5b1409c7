"""Pre-training in the multi-task trainer on the synthetic dataset: loaders of every objective, exact
resume, fine-tuning from the pre-trained weights, the packaged recipe, and the pre-training study."""

import math

import pytest
import torch
from famevil_fast.configs import resolve
from test_data_fixtures import synthetic
from trainer_fixtures import micro_config

from famevil_fast.train.config import load_config
from famevil_fast.train.trainer import Trainer

PRETRAIN = (
    "model.tasks=[itc,mvc,pac,itm]",
    "data.backend=pil",
    "data.num_workers=1",
    "data.attribute_min_count=2",
)


def _config(root, run_dir, *overrides):
    return micro_config(run_dir, f"data.root={root}", *PRETRAIN, *overrides)


def _losses(history):
    return [[tuple(x) for x in r["losses"]] for r in history]


def test_pretraining_resumes_exactly_and_fine_tuning_starts_from_it(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory)
    full = Trainer(_config(root, tmp_path / "a", "train.updates=2"))
    full.fit()
    record = full.history[0]
    assert [t for t, _ in record["losses"]] == ["itc", "mvc", "pac", "itm"]
    assert all(math.isfinite(v) for _, v in record["losses"]) and record["applied"]
    assert full.model.config.num_attributes == full.model.heads["pac"].weight.shape[0] > 0
    assert full.cfg.eval.tasks == ["itc"]
    half = Trainer(_config(root, tmp_path / "b", "train.updates=1"))
    half.fit()
    resumed = Trainer(_config(root, tmp_path / "b", "train.updates=2", "checkpoint.resume=true"))
    resumed.fit()
    assert _losses(resumed.history) == _losses(full.history)

    fine = Trainer(
        micro_config(
            tmp_path / "c",
            f"data.root={root}",
            "data.backend=pil",
            "model.tasks=[itc,scr]",
            "model.num_classes=121",
            "train.updates=1",
            f"model.init_from={tmp_path / 'a' / 'final'}",
        )
    )
    pre = full.model.state_dict()
    before = fine.model.state_dict()
    for name in ("vision.blocks.0.attn.qkv.weight", "text.blocks.1.xaa.q.weight", "heads.itc.norm_s"):
        assert torch.equal(before[name], pre[name]), name
    assert "heads.pac.weight" not in before
    fine.fit()


def test_pretraining_objectives_run_as_graph_captured_steps(tmp_path_factory, tmp_path):
    """mvc, pac and itm are capturable (on the CPU: simulated capture) and give the eager losses."""
    root = synthetic(tmp_path_factory)
    eager = Trainer(_config(root, tmp_path / "e", "train.updates=2"))
    eager.fit()
    graphed = Trainer(_config(root, tmp_path / "g", "train.updates=2", "train.cuda_graphs=true"))
    graphed.fit()
    for a, b in zip(eager.history, graphed.history):
        for (ta, va), (tb, vb) in zip(a["losses"], b["losses"]):
            assert ta == tb and math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6), ta


def test_cross_modal_adapter_training_freezes_the_backbone(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory)
    cfg = _config(
        root,
        tmp_path,
        "train.updates=1",
        "model.adapter_type=xmodal",
        "model.xmodal_bottleneck=4",
        "model.xmodal_shared=8",
        "train.freeze_backbone=true",
    )
    trainer = Trainer(cfg)
    backbone = trainer.model.vision.blocks[0].mlp.fc1.weight.detach().clone()
    shared = trainer.model.xmodal_shared[0]["mlp"]["mvc"].weight.detach().clone()
    trainer.fit()
    assert torch.equal(trainer.model.vision.blocks[0].mlp.fc1.weight, backbone)
    assert not torch.equal(trainer.model.xmodal_shared[0]["mlp"]["mvc"].weight, shared)


def test_recipe_and_bad_settings():
    cfg = load_config(resolve("pretrain_tiny_cpu"))
    assert cfg.model.tasks == ["itc", "mvc", "pac", "itm"] and cfg.eval.tasks == ["itc"]
    with pytest.raises(ValueError, match="model.adapter_bottleneck|unknown key"):
        load_config(None, ["model.adapter_size=3"])
    with pytest.raises(ValueError, match="init_from"):
        from famevil_fast.train.trainer import build_model

        build_model(
            load_config(
                None,
                [
                    "model.clip=micro",
                    "data.image_size=32",
                    "model.init=a.pt",
                    "model.init_from=b",
                    "model.tasks=[itc]",
                ],
            )
        )


@pytest.mark.slow
def test_pre_training_then_fine_tuning_beats_fine_tuning_alone(tmp_path_factory, tmp_path):
    """Micro model, 20 pre-training updates, then 30 retrieval updates, against 30 retrieval updates from
    scratch (same fine-tuning step count); both are scored with the full XMR protocol on the val split."""
    from famevil_fast.train.pretrain_study import run_study

    root = synthetic(tmp_path_factory, products=200, image_size=32)
    extra = ["model.adapter_bottleneck=8", "optim.lr=5e-4", "data.attribute_min_count=3"]
    study = run_study(
        str(root),
        tmp_path,
        20,
        30,
        clip="micro",
        image_size=32,
        batch_size=16,
        long_baseline=False,
        extra=extra,
    )
    scores = {arm: study["arms"][arm]["eval"]["xmr/full"]["avg"] for arm in ("pretrained", "scratch")}
    chance = study["arms"]["scratch"]["chance"]["xmr/full"]["avg"]
    assert scores["pretrained"] > max(scores["scratch"], 2 * chance)


def test_num_attributes_below_the_vocabulary_is_refused_at_start(tmp_path_factory, tmp_path):
    from famevil_fast.train.trainer import num_attributes

    cfg = _config(synthetic(tmp_path_factory), tmp_path, "model.num_attributes=3")
    with pytest.raises(ValueError, match="model.num_attributes=3 is smaller than the .* attributes of"):
        num_attributes(cfg)


def test_a_pretraining_only_run_builds_no_evaluator_and_its_checkpoint_is_named(tmp_path, capsys):
    from famevil_fast.cli.commands.train import build_evaluator
    from famevil_fast.cli.main import main
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset

    cfg = load_config(None, ["model.clip=micro", "data.image_size=32", "model.tasks=[mvc,pac,itm]"])
    assert cfg.eval.tasks == [] and build_evaluator(cfg, "cpu") is None
    config = FameViLConfig(clip=clip_preset("micro"), tasks=("mvc", "itm"), adapter_bottleneck=8)
    FameViL(config).save_pretrained(tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(tmp_path)]) == 2
    assert "holds only pre-training tasks ['mvc', 'itm']" in capsys.readouterr().err


def test_itm_negatives_are_chosen_in_eval_mode():
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.pretrain import matching_similarity

    torch.manual_seed(0)
    config = FameViLConfig(
        clip=clip_preset("micro"), tasks=("itc", "itm"), adapter_bottleneck=8, adapter_dropout=0.5
    )
    model = FameViL(config).train()
    for p in model.parameters():  # non-zero adapters, so that their dropout would show
        p.data.normal_(0, 0.05)
    model.text.blocks[0].eval()  # a module's own mode survives
    pixels, ids = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 10))
    ids[:, 0], ids[:, -1] = 49406, 49407
    first, second = matching_similarity(model, pixels, ids), matching_similarity(model, pixels, ids)
    assert torch.equal(first, second)
    assert model.training and not model.text.blocks[0].training and model.vision.blocks[0].training


def test_pac_trains_on_the_datasets_own_attribute_ids(tmp_path_factory, tmp_path):
    from famevil_fast.data.attributes import load_attributes
    from famevil_fast.train.trainer import num_attributes

    root = synthetic(tmp_path_factory)
    cfg = _config(root, tmp_path, "data.attributes=dataset", "model.tasks=[pac]", "train.updates=1")
    assert num_attributes(cfg) == len(load_attributes(root, "dataset").vocabulary)
    result = Trainer(cfg).fit()
    assert result["status"] == "finished" and result["update"] == 1


def test_the_study_run_again_into_the_same_directory_starts_afresh(tmp_path_factory, tmp_path, monkeypatch):
    from famevil_fast.train import pretrain_study

    monkeypatch.setattr(pretrain_study, "build_evaluator", lambda *args, **kwargs: None)
    root = synthetic(tmp_path_factory, products=40, image_size=32)
    extra = ["model.adapter_bottleneck=8", "data.attribute_min_count=2", "data.num_workers=1"]
    size = dict(clip="micro", image_size=32, batch_size=8, long_baseline=False, extra=extra)
    first = pretrain_study.run_study(str(root), tmp_path, 1, 1, **size)
    (tmp_path / "scratch" / "label").write_text("first")
    second = pretrain_study.run_study(str(root), tmp_path, 1, 2, **size)
    assert first["arms"]["scratch"]["updates"] == 1 and second["arms"]["scratch"]["updates"] == 2
    assert (tmp_path / "scratch.previous" / "label").read_text() == "first"
    assert not (tmp_path / "scratch" / "label").exists()
    for arm, update in (("pretrain", 1), ("pretrained", 2), ("scratch", 2)):
        assert [p.name for p in (tmp_path / f"{arm}.previous" / "checkpoints").iterdir()] == ["step_00000001"]
        assert [p.name for p in (tmp_path / arm / "checkpoints").iterdir()] == [f"step_{update:08d}"]
