"""Trainer edge cases: the logged record of an update, and teachers checked against the student."""

import dataclasses
import json
import re

import pytest
from trainer_fixtures import micro_config, streams

from famevil_fast.model import FameViL, clip_preset
from famevil_fast.train.optim import lr_factor
from famevil_fast.train.trainer import Trainer, build_model


def test_the_logged_learning_rate_is_the_one_the_update_used(tmp_path):
    """Warm-up over 2 updates and a decay at (0-based) update 3: update N's record shows the rate of its
    own optimizer step, not the next update's."""
    cfg = micro_config(tmp_path, "logging.every=1", "train.update_frequency=1")
    trainer = Trainer(cfg, streams())
    used = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.fit()
    s = cfg.schedule
    expected = [
        cfg.optim.lr * lr_factor(u, s.warmup_updates, s.warmup_start_factor, s.decay_at, s.decay_factor)
        for u in range(cfg.train.updates)
    ]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    logged = [r["lr"] for r in records if r["kind"] == "train"]
    assert [r["update"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert logged == used
    assert all(abs(a - b) <= 1e-12 for a, b in zip(logged, expected, strict=True))
    assert [r["lr"] for r in trainer.history] == used


NARROW = dataclasses.replace(clip_preset("micro"), embed_dim=32)  # the micro student's embeddings are 64-d


def _teacher(path, task: str, **changes) -> str:
    """A random single-task teacher: the micro student's model with ``changes`` to its config."""
    config = build_model(micro_config(f"{path}_unused")).config.replace(tasks=(task,), **changes)
    FameViL(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("task", "changes", "extra", "message"),
    [
        ("itc", {"clip": clip_preset("tiny")}, (), "takes 64 px images, the student's batches have 32 px"),
        ("scr", {"num_classes": 7}, (), "it has 7 classes, the student 121"),
        (
            "itc",
            {"clip": NARROW},
            ("distill.faithful_itc=true",),
            "its 32-d features with the student's 64-d",
        ),
    ],
)
def test_a_teacher_that_does_not_fit_the_student_is_refused_when_loaded(
    tmp_path, task, changes, extra, message
):
    """Refused before training, naming the teacher, rather than at the first update with an error about
    pixel shapes, label ranges or feature sizes."""
    path = _teacher(tmp_path / "teacher", task, **changes)
    cfg = micro_config(
        tmp_path / "run", "distill.enabled=true", f"distill.teachers={{{task}: {path}}}", *extra
    )
    with pytest.raises(ValueError, match=rf"distill.teachers.{task} .*{re.escape(message)}"):
        Trainer(cfg, streams())


def test_a_teacher_of_another_embedding_size_distils_its_own_logits(tmp_path):
    """Without faithful_itc the itc teacher's logits come from its own features: any width works."""
    path = _teacher(tmp_path / "teacher", "itc", clip=NARROW)
    cfg = micro_config(tmp_path / "run", "distill.enabled=true", f"distill.teachers={{itc: {path}}}")
    record = Trainer(cfg, streams()).train_update()
    assert record["applied"]


def test_a_missing_teacher_checkpoint_names_its_task(tmp_path):
    cfg = micro_config(tmp_path / "run", "distill.enabled=true", f"distill.teachers={{scr: {tmp_path}/none}}")
    with pytest.raises(FileNotFoundError, match="distill.teachers.scr"):
        Trainer(cfg, streams())


@pytest.mark.parametrize("field", ["init", "init_from", "resume_weights"])
def test_a_missing_model_checkpoint_names_its_field(tmp_path, field):
    relative = rf"^model\.{field}: checkpoint not found: nope\.pt \(a relative"
    with pytest.raises(FileNotFoundError, match=relative):
        build_model(micro_config(tmp_path, f"model.{field}=nope.pt"))
    with pytest.raises(FileNotFoundError, match=rf"^model\.{field}: checkpoint not found: /nope\.pt$"):
        build_model(micro_config(tmp_path, f"model.{field}=/nope.pt"))


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Resuming update 2 of a run that reached update 4: the later checkpoints move to superseded/, so that
    neither pruning nor a later --resume prefers the abandoned run, and the continued run is exact."""
    first = Trainer(micro_config(tmp_path, "checkpoint.every=1", "checkpoint.keep_last=4"), streams())
    first.fit()
    run = tmp_path / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == [f"step_{u:08d}" for u in (1, 2, 3, 4)]
    again = Trainer(micro_config(tmp_path, "checkpoint.every=1", "checkpoint.keep_last=1"), streams())
    with pytest.warns(UserWarning, match=r"the 2 later checkpoint\(s\) .*superseded"):
        assert again.resume(run / "step_00000002")
    assert sorted(p.name for p in (tmp_path / "superseded").iterdir()) == ["step_00000003", "step_00000004"]
    assert [p.name for p in again.checkpoints.list()] == ["step_00000001", "step_00000002"]
    again.fit()
    assert [p.name for p in again.checkpoints.list()] == ["step_00000004"]  # the continued run's own
    assert again.history == first.history


def test_building_a_trainer_parses_each_split_file_once(tmp_path, monkeypatch):
    """The caption vocabulary and the tables of every task read the same split files: one parse each."""
    import os
    import time
    from pathlib import Path

    from famevil_fast.data import fashiongen, records
    from famevil_fast.data.synthetic.generate import make_synthetic

    make_synthetic(tmp_path / "data", products=24, seed=0, image_size=32)
    for path in (tmp_path / "data").rglob("*.json"):
        os.utime(path, (time.time() - 3600,) * 2)  # settled files: a fresh one is never kept
    parsed = []
    real = records.load_json_list

    def counting(path, *args, **kwargs):
        parsed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(records, "load_json_list", counting)
    monkeypatch.setattr(fashiongen, "load_json_list", counting)
    settings = (f"data.root={tmp_path / 'data'}", "model.tasks=[itc,scr,cap]", "model.caption_vocab=corpus")
    Trainer(micro_config(tmp_path / "run", *settings, "data.num_workers=0"))
    assert parsed.count("train_info.json") == 1
    assert not records._READS  # nothing kept once the trainer is built
