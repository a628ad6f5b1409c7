"""The multi-task trainer: exact resume, gradient strategies, distillation, non-finite handling, signals."""

import math
import os
import re
import signal

import pytest
import torch
from trainer_fixtures import RandomStream, micro_config, streams

from famevil_fast.model import FameViL
from famevil_fast.train.trainer import NonFiniteLoss, Trainer


def _losses(history):
    return [(r["update"], [tuple(x) for x in r["losses"]]) for r in history]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = Trainer(micro_config(tmp_path / "a", "train.updates=6"), streams())
    full.fit()
    interrupted = Trainer(micro_config(tmp_path / "b", "train.updates=3"), streams())
    interrupted.fit()
    resumed = Trainer(micro_config(tmp_path / "b", "train.updates=6", "checkpoint.resume=true"), streams())
    resumed.fit()
    assert _losses(resumed.history) == _losses(full.history)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_round_robin_update_sees_every_task_and_parameters_move(tmp_path):
    trainer = Trainer(micro_config(tmp_path, "train.updates=1"), streams())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    record = trainer.train_update()
    assert [t for t, _ in record["losses"]] == ["itc", "tgir", "scr", "cap"]
    assert record["applied"]
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    for task in ("itc", "tgir", "scr", "cap"):
        assert any(f".adapters.{task}." in n for n in moved)


@pytest.mark.parametrize("strategy", ["imtlg", "imtlg_global"])
def test_imtl_strategies_train(tmp_path, strategy):
    trainer = Trainer(
        micro_config(tmp_path, f"train.gradient_strategy={strategy}", "train.updates=2"), streams()
    )
    trainer.fit()
    assert all(r["applied"] for r in trainer.history)


def test_mixed_task_batches_match_sequential_accumulation(tmp_path):
    seq = Trainer(micro_config(tmp_path / "s", "train.updates=2"), streams())
    seq.fit()
    mixed = Trainer(
        micro_config(tmp_path / "m", "train.updates=2", "train.mixed_task_batches=true"), streams()
    )
    mixed.fit()
    for a, b in zip(seq.history, mixed.history):
        for (ta, va), (tb, vb) in zip(a["losses"], b["losses"]):
            assert ta == tb and math.isclose(va, vb, rel_tol=1e-4)


def test_non_finite_loss_skips_the_update_and_names_the_task(tmp_path):
    s = streams()
    s["tgir"] = RandomStream("tgir", 1, poison_at=0)
    trainer = Trainer(micro_config(tmp_path, "train.updates=1"), s)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert not trainer.history[0]["applied"]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    log = (tmp_path / "metrics.jsonl").read_text()
    assert "non-finite loss of task(s) ['tgir']" in log
    stopper = Trainer(
        micro_config(tmp_path / "stop", "train.updates=1", "train.nonfinite=stop"),
        {**streams(), "tgir": RandomStream("tgir", 1, poison_at=0)},
    )
    with pytest.raises(NonFiniteLoss, match="tgir"):
        stopper.fit()


def test_sigterm_saves_and_stops(tmp_path):
    class Killer(RandomStream):
        def next_batch(self):
            if self.position == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    s = streams()
    s["itc"] = Killer("itc", 0)
    trainer = Trainer(micro_config(tmp_path, "train.updates=50", "logging.every=10"), s)
    result = trainer.fit()
    assert result["status"].startswith("interrupted") and result["update"] == 2
    assert trainer.checkpoints.latest().name == "step_00000002"
    import json

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["update"] for r in logged if r["kind"] == "train"] == [1, 2]  # the last update, off the grid


def test_distillation_from_saved_teachers(tmp_path):
    cfg = micro_config(tmp_path / "run", "train.updates=1")
    teachers = {}
    for task in ("itc", "cap"):
        teacher = FameViL(
            Trainer(cfg, streams()).model.config.replace(
                tasks=(task,), xaa="none" if task == "itc" else "text"
            )
        )
        teacher.save_pretrained(tmp_path / f"teacher_{task}")
        teachers[task] = str(tmp_path / f"teacher_{task}")
    overrides = [
        "distill.enabled=true",
        f"distill.teachers={{itc: {teachers['itc']}, cap: {teachers['cap']}}}",
    ]
    trainer = Trainer(micro_config(tmp_path / "kd", "train.updates=1", *overrides), streams())
    plain = Trainer(micro_config(tmp_path / "plain", "train.updates=1"), streams())
    kd_losses = dict(trainer.train_update()["losses"])
    plain_losses = dict(plain.train_update()["losses"])
    assert kd_losses["tgir"] == plain_losses["tgir"] and kd_losses["scr"] == plain_losses["scr"]
    assert kd_losses["itc"] != plain_losses["itc"] and kd_losses["cap"] != plain_losses["cap"]
    graphed = Trainer(
        micro_config(tmp_path / "kd_graphs", "train.updates=1", "train.cuda_graphs=true", *overrides),
        streams(),
    )
    graphed_losses = dict(graphed.train_update()["losses"])  # teachers inside the (simulated) capture
    for task, value in kd_losses.items():
        assert math.isclose(graphed_losses[task], value, rel_tol=1e-5, abs_tol=1e-6), task


def test_checkpoints_keep_the_newest(tmp_path):
    trainer = Trainer(
        micro_config(tmp_path, "train.updates=5", "checkpoint.every=1", "checkpoint.keep_last=2"), streams()
    )
    trainer.fit()
    assert [p.name for p in trainer.checkpoints.list()] == ["step_00000004", "step_00000005"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mixed", ["false", "true"])
def test_cuda_graph_steps_match_eager_steps(tmp_path, mixed):
    """train.cuda_graphs (capture simulated on the CPU: the same code, checked for host read-backs)."""
    base = ("train.updates=3", f"train.mixed_task_batches={mixed}")
    eager = Trainer(micro_config(tmp_path / "e", *base), streams())
    eager.fit()
    graphed = Trainer(micro_config(tmp_path / "g", *base, "train.cuda_graphs=true"), streams())
    graphed.fit()
    assert len(graphed.graphed.graphs) == (1 if mixed == "true" else 4)
    for a, b in zip(eager.history, graphed.history):
        for (ta, va), (tb, vb) in zip(a["losses"], b["losses"]):
            assert ta == tb and math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6)
    # Adam turns float noise in near-zero gradients (e.g. attention's key bias) into steps of up to the lr
    # (2e-3 here), so elements whose true gradient is zero may differ by that much; the equal loss
    # sequences above show that the meaningful steps agree
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        assert float((a - b).detach().abs().max()) < 2e-3, name


def test_compiled_graph_steps_match_eager_steps(tmp_path):
    """train.compile: the captured micro-step's forward compiled by Inductor gives the eager losses."""
    base = ("train.updates=2", "model.tasks=[itc]")
    eager = Trainer(micro_config(tmp_path / "e", *base), streams())
    eager.fit()
    compiled = Trainer(
        micro_config(tmp_path / "c", *base, "train.cuda_graphs=true", "train.compile=true"), streams()
    )
    compiled.fit()
    for a, b in zip(eager.history, compiled.history):
        for (ta, va), (tb, vb) in zip(a["losses"], b["losses"]):
            assert ta == tb and math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-5)
    with pytest.raises(ValueError, match="train.compile needs train.cuda_graphs"):
        micro_config(tmp_path, "train.compile=true").validate()


def test_cuda_graphs_need_the_sum_strategy(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs needs gradient_strategy"):
        micro_config(tmp_path, "train.cuda_graphs=true", "train.gradient_strategy=imtlg").validate()


def test_a_loaded_model_trains_in_training_mode(tmp_path):
    """Loading returns a model in eval mode; the trainer switches it (and so adapter dropout) to training."""
    first = Trainer(micro_config(tmp_path / "a"), streams())
    first.model.save_pretrained(tmp_path / "weights")
    trainer = Trainer(micro_config(tmp_path / "b", f"model.resume_weights={tmp_path / 'weights'}"), streams())
    assert all(m.training for m in trainer.model.modules())


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_fails_at_construction(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"train.device='{device}' but CUDA is not available"):
        Trainer(micro_config(tmp_path, f"train.device={device}"), streams())


def test_training_device_checks_the_gpu_index(monkeypatch):
    from famevil_fast.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def training_device(name: str) -> torch.device:
        return resolve_device(name, "train.device")

    assert training_device("cuda:1") == torch.device("cuda:1")
    assert training_device("cuda") == torch.device("cuda")
    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"train.device='cuda:2' but this machine has 2 CUDA device\(s\)"):
        training_device("cuda:2")
    with pytest.raises(ValueError, match="train.device='gpu': expected cpu, cuda or cuda:N"):
        training_device("gpu")


def test_a_fixed_gpu_is_refused_under_torchrun():
    from famevil_fast.train.distributed import DistInfo
    from famevil_fast.train.trainer import process_device

    with pytest.raises(ValueError, match="use 'cuda'"):
        process_device(torch.device("cuda:1"), DistInfo(rank=0, world_size=2, local_rank=0))
    assert process_device(torch.device("cpu"), DistInfo(0, 2, 1)) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_n_puts_the_model_and_batches_on_that_gpu(tmp_path):
    index = torch.cuda.device_count() - 1
    trainer = Trainer(micro_config(tmp_path, f"train.device=cuda:{index}", "train.updates=1"), streams())
    assert trainer.device == torch.device("cuda", index) and torch.cuda.current_device() == index
    assert {p.device for p in trainer.model.parameters()} == {torch.device("cuda", index)}
    assert trainer.train_update()["applied"]


@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng.safetensors", "training_state.json"])
def test_truncated_checkpoint_file_is_named_on_resume(tmp_path, name):
    Trainer(micro_config(tmp_path, "train.updates=1"), streams()).fit()
    resumed = Trainer(micro_config(tmp_path, "train.updates=2"), streams())
    target = resumed.checkpoints.latest() / name
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read .*{name}: the file is corrupt or truncated"):
        resumed.resume()


def test_meteor_without_java_fails_before_training(tmp_path, monkeypatch):
    from famevil_fast.eval import caption_tokenize

    class CaptionEvaluator:
        sets = {"cap": None}

        def __call__(self, model):
            return {}

    monkeypatch.setattr(caption_tokenize, "find_java", lambda: None)
    trainer = Trainer(micro_config(tmp_path, "eval.caption_metrics=[bleu4, meteor]"), streams())
    trainer.evaluator = CaptionEvaluator()
    with pytest.raises(caption_tokenize.JavaNotFoundError, match="meteor"):
        trainer.fit()
    assert trainer.update == 0


def test_caption_metrics_without_pycocoevalcap_fail_before_training(tmp_path, monkeypatch, capsys):
    import sys

    from famevil_fast.cli.main import USER_ERRORS
    from famevil_fast.eval import caption_tokenize

    class CaptionEvaluator:
        sets = {"cap": None}

        def __call__(self, model):
            return {}

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # not installed
    trainer = Trainer(micro_config(tmp_path), streams())
    trainer.evaluator = CaptionEvaluator()
    with pytest.raises(caption_tokenize.CaptionMetricsUnavailable, match=r"famevil_fast\[eval\]") as raised:
        trainer.fit()
    assert trainer.update == 0
    assert isinstance(raised.value, USER_ERRORS)  # the command reports it in one line


def _poison_gradient(monkeypatch, bad_task):
    """``bad_task``'s loss stays finite but its gradient is NaN (d sqrt(x) / dx at 0 is inf, times 0)."""
    original = Trainer._task_loss

    def task_loss(self, task, out, batch):
        loss = original(self, task, out, batch)
        if task != bad_task:
            return loss
        p = next(self.model.parameters())
        return loss + 0 * torch.sqrt(p.sum() * 0)

    monkeypatch.setattr(Trainer, "_task_loss", task_loss)


@pytest.mark.parametrize(
    "bad_task, overrides",
    [
        ("scr", ()),
        ("cap", ()),  # the last micro-batch: no probe after it, the update's gradient norm covers it
        ("itc", ("train.cuda_graphs=true",)),  # simulated capture on the CPU
        ("tgir", ("train.gradient_strategy=imtlg",)),
        ("scr", ("train.gradient_strategy=imtlg_global",)),
    ],
)
def test_non_finite_gradient_names_the_task(tmp_path, monkeypatch, bad_task, overrides):
    _poison_gradient(monkeypatch, bad_task)
    trainer = Trainer(micro_config(tmp_path, "train.updates=1", *overrides), streams())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    record = trainer.history[0]
    assert not record["applied"] and all(math.isfinite(v) for _, v in record["losses"])
    assert record["nonfinite_gradient_tasks"] == [bad_task]
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    log = (tmp_path / "metrics.jsonl").read_text()
    assert f"update 1: non-finite gradient of task(s) ['{bad_task}'] with finite losses" in log


def test_gradient_probes_read_nothing_back_on_applied_updates(tmp_path, monkeypatch):
    """The per-micro-batch finiteness flags stay on the device; a good update reads back once."""
    from famevil_fast.train import trainer as trainer_module

    flags = []
    original = trainer_module.grads_finite
    monkeypatch.setattr(trainer_module, "grads_finite", lambda *a: flags.append(original(*a)) or flags[-1])
    trainer = Trainer(micro_config(tmp_path, "train.updates=1"), streams())
    assert trainer.train_update()["applied"]
    assert len(flags) == 3 and all(f.dtype == torch.bool and f.dim() == 0 for f in flags)


def test_nonfinite_stop_does_not_advance_or_checkpoint_the_failed_update(tmp_path):
    import json

    s = {**streams(), "tgir": RandomStream("tgir", 1, poison_at=2)}  # update 3's tgir batch is NaN
    cfg = micro_config(tmp_path, "train.updates=4", "train.nonfinite=stop", "checkpoint.every=1")
    trainer = Trainer(cfg, s)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss of task\(s\) \['tgir'\]; stopping at update 2"):
        trainer.fit()
    assert trainer.update == 2 and trainer.scheduler.last_epoch == 2 and len(trainer.history) == 2
    assert [p.name for p in trainer.checkpoints.list()] == ["step_00000001", "step_00000002"]
    assert json.loads((trainer.checkpoints.latest() / "training_state.json").read_text())["update"] == 2
    messages = [
        r["text"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if r["kind"] == "message"
    ]
    assert "skipped" not in " ".join(messages)
    assert messages[-1] == "training stopped (non-finite loss of task(s) ['tgir']) at update 2"


def test_metrics_jsonl_is_strict_json_and_marks_skipped_updates(tmp_path):
    import json

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    s = {**streams(), "tgir": RandomStream("tgir", 1, poison_at=0)}
    Trainer(micro_config(tmp_path, "train.updates=2", "logging.every=1"), s).fit()
    records = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["applied"] is False and train[0]["loss/tgir"] is None and train[0]["grad_norm"] is None
    assert "applied" not in train[1] and isinstance(train[1]["loss/tgir"], float)


def test_logged_loss_is_the_mean_over_a_tasks_micro_batches(tmp_path):
    import json

    cfg = micro_config(tmp_path, "model.tasks=[cap]", "train.update_frequency=2", "train.updates=1")
    trainer = Trainer(cfg, streams())
    trainer.fit()
    (first, a), (second, b) = trainer.history[0]["losses"]
    assert first == second == "cap" and a != b
    logged = next(r for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if r["kind"] == "train")
    assert logged["loss/cap"] == pytest.approx((a + b) / 2)


def test_the_first_and_last_updates_are_logged_and_a_resume_says_where_it_continues(tmp_path):
    import json

    first = micro_config(tmp_path, "train.updates=3", "logging.every=10", "checkpoint.every=2")
    Trainer(first, streams()).fit()
    cfg = micro_config(tmp_path, "train.updates=5", "logging.every=10", "checkpoint.resume=true")
    Trainer(cfg, streams()).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["update"] for r in records if r["kind"] == "train"] == [1, 3, 5]
    messages = [r["text"] for r in records if r["kind"] == "message"]
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000003'} at update 3" in messages
    by_caller = Trainer(micro_config(tmp_path, "train.updates=6", "logging.every=10"), streams())
    by_caller.resume(tmp_path / "checkpoints" / "step_00000005")  # resumed by the caller, not by fit
    by_caller.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000005'} at update 5" in [
        r["text"] for r in records if r["kind"] == "message"
    ]
    elsewhere = tmp_path / "other"  # a caller's resume from another run's checkpoint, checkpoint.resume on
    cfg = micro_config(elsewhere, "train.updates=7", "logging.every=10", "checkpoint.resume=true")
    other = Trainer(cfg, streams())
    other.resume(tmp_path / "checkpoints" / "step_00000006")
    other.fit()
    records = [json.loads(line) for line in (elsewhere / "metrics.jsonl").open()]
    messages = [r["text"] for r in records if r["kind"] == "message"]
    assert messages[0] == f"resumed from {tmp_path / 'checkpoints' / 'step_00000006'} at update 6"


def test_resume_refuses_a_recipe_that_changes_the_run(tmp_path):
    Trainer(micro_config(tmp_path, "train.updates=2", "schedule.decay_at=[5]"), streams()).fit()
    base = ("train.updates=4", "schedule.decay_at=[5]", "checkpoint.resume=true")
    for changed, field in (
        ("optim.lr=2e-3", "optim.lr: 0.001 -> 0.002"),
        ("train.sampling=uniform", "train.sampling: 'round_robin' -> 'uniform'"),
        ("train.update_frequency=2", "train.update_frequency: 4 -> 2"),
    ):
        trainer = Trainer(micro_config(tmp_path, *base, changed), streams())
        before = [p.detach().clone() for p in trainer.model.parameters()]
        with pytest.raises(ValueError, match=rf"cannot resume from .*step_00000002.*{re.escape(field)}"):
            trainer.fit()
        assert trainer.update == 0  # refused before anything of the checkpoint was restored
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    allowed = (
        "logging.every=1",
        "eval.every=3",
        "checkpoint.keep_last=5",
        "checkpoint.every=1",
        "data.num_workers=1",
        "train.nonfinite=stop",
        f"data.root={tmp_path / 'moved'}",  # the streams stand in for the data; only the field differs
    )
    resumed = Trainer(micro_config(tmp_path, *base, *allowed), streams())
    assert resumed.fit()["update"] == 4


def test_the_progress_bar_shows_each_updates_own_losses(tmp_path, monkeypatch):
    """The bar's losses are those of the update it shows, not the last logged one's (update 2 of a run
    that logs every 10 updates used to show update 1's), and they come from the update's record, whose
    losses are already host numbers (no read-back of their own)."""
    from tqdm import tqdm

    from famevil_fast.train import logging as logging_module

    drawn = []

    class Recording(tqdm):
        def update(self, n=1):
            drawn.append((self.n + n, self.postfix))
            return super().update(n)

    monkeypatch.setattr(logging_module, "tqdm", Recording)
    trainer = Trainer(
        micro_config(tmp_path, "train.updates=3", "logging.every=10", "logging.progress=true"), streams()
    )
    trainer.fit()
    assert [update for update, _ in drawn] == [1, 2, 3]
    for (update, postfix), record in zip(drawn, trainer.history):
        assert all(isinstance(v, float) for _, v in record["losses"])
        expected = ", ".join(f"loss/{t}={v:.3f}" for t, v in record["losses"])  # one micro-batch per task
        assert record["update"] == update and postfix == expected


def test_the_progress_bar_labels_losses_of_an_earlier_update(tmp_path, capsys):
    """Losses given by ``log`` alone stay on the bar until newer ones come, named by their update once the
    bar has moved past it."""
    from famevil_fast.train.logging import RunLogger

    logger = RunLogger(tmp_path, total=4, tensorboard=False)
    logger.log(1, {"lr": 0.1, "loss/itc": 0.5, "loss/cap": 2.0})
    logger.advance()
    assert logger.bar.postfix == "loss/itc=0.500, loss/cap=2.000"
    logger.advance()
    assert logger.bar.postfix == "update 1: loss/itc=0.500, loss/cap=2.000"
    logger.advance(losses={"itc": 0.25})
    assert logger.bar.postfix == "loss/itc=0.250"
    logger.advance(update=3, losses={"itc": 0.125})
    assert logger.bar.postfix == "update 3: loss/itc=0.125"
    logger.close()


@pytest.mark.parametrize(
    "precision",
    [
        ("train.precision=fp32",),
        ("train.precision=bf16", "train.master_weights=true"),
        ("train.precision=fp32", "train.cuda_graphs=true"),
    ],
)
def test_step_untouched_moves_what_an_update_did_not_reach_as_the_reference_did(tmp_path, precision):
    """Round-robin over single-task updates: the ITC adapter, trained at update 1, is not reached at update
    2. By default it stays as it is; with ``optim.step_untouched`` it takes AdamW's step with a zero gradient
    (momentum and decay), as under the reference's in-place zero_grad. Captioning's adapter, never trained
    yet, stays untouched either way."""
    itc, cap = "vision.blocks.0.tsa.adapters.itc.down.weight", "text.blocks.0.tsa.adapters.cap.down.weight"
    common = ("train.sampling=round_robin", "train.update_frequency=1", "optim.weight_decay=0.1", *precision)
    moved = {}
    for step_untouched in (False, True):
        flag = f"optim.step_untouched={step_untouched}"
        config = micro_config(tmp_path / str(step_untouched), *common, flag)
        trainer = Trainer(config, streams())
        assert trainer.train_update()["losses"][0][0] == "itc"
        after_first = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        assert trainer.train_update()["losses"][0][0] == "tgir"
        state = trainer.model.state_dict()
        moved[step_untouched] = not torch.equal(state[itc], after_first[itc])
        assert torch.equal(state[cap], after_first[cap])  # never trained: no optimizer state, no step
    assert moved == {False: False, True: True}


def test_model_init_refuses_weights_stored_with_another_clip_config(tmp_path):
    """Weights saved with their config (GELU here) are not silently run with the recipe's preset's
    (QuickGELU): the fields that differ are named; with the same config they load."""
    import dataclasses

    from famevil_fast.model import FameViLConfig, clip_preset
    from famevil_fast.model.famevil import DiscardedWeightsWarning

    micro = clip_preset("micro")
    FameViL(FameViLConfig(clip=dataclasses.replace(micro, activation="gelu"))).save_pretrained(
        tmp_path / "gelu"
    )
    with pytest.raises(ValueError, match=r"model.init .*differs from model.clip micro's in activation"):
        Trainer(micro_config(tmp_path / "a", f"model.init={tmp_path / 'gelu'}"), streams())
    FameViL(FameViLConfig(clip=micro)).save_pretrained(tmp_path / "same")
    with pytest.warns(DiscardedWeightsWarning):
        Trainer(micro_config(tmp_path / "b", f"model.init={tmp_path / 'same'}"), streams())


def test_model_trust_pickle_reads_a_trusted_training_container(tmp_path):
    """CLIP weights in a container that also pickles a non-tensor object: refused by weights-only loading,
    with the recipe field named, and read with ``model.trust_pickle``."""
    import argparse

    from famevil_fast.model import clip_preset
    from famevil_fast.model.clip import CLIP

    torch.manual_seed(0)
    clip = CLIP(clip_preset("micro"))
    path = tmp_path / "container.ckpt"
    torch.save({"model": clip.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="weights-only loading refused.*model.trust_pickle: true"):
        Trainer(micro_config(tmp_path / "a", f"model.init={path}"), streams())
    trusted = micro_config(tmp_path / "b", f"model.init={path}", "model.trust_pickle=true")
    trainer = Trainer(trusted, streams())
    torch.testing.assert_close(trainer.model.vision.ln_pre.weight, clip.vision.ln_pre.weight)
