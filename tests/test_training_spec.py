"""Conformance of the training objectives and recipes with the reference (losses, training strategy and the
official code's quirks): each test checks one formula or number against a plain reference written here, on
small hand-checkable inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from famevil_fast.configs import resolve
from torch import nn
from trainer_fixtures import micro_config, streams

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.famevil import TaskOutput
from famevil_fast.model.losses import caption_loss, itc_loss, scr_loss, tgir_loss
from famevil_fast.train.config import OptimSection, load_config
from famevil_fast.train.distill import combine, distillation_cross_entropy, kd_loss
from famevil_fast.train.optim import build_optimizer, lr_factor, parameter_groups
from famevil_fast.train.sampling import TaskSampler
from famevil_fast.train.trainer import Trainer

E = torch.eye(2, dtype=torch.float64)  # two orthogonal unit embeddings


def _soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum softmax(teacher) * log_softmax(student) (temperature 1)."""
    return -(F.softmax(teacher, dim=1) * F.log_softmax(student, dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------- 2. task losses
def test_xmr_loss_is_symmetric_infonce_over_s_squared_cosine():
    """The reference: logits = s^2 cos with s = 4, mean of the two directions, no label smoothing."""
    scale = torch.tensor(16.0, dtype=torch.float64)  # s = 4 -> s^2
    # identical unit embeddings: logits [[16, 0], [0, 16]]: each row's CE is log(1 + e^-16), both ways
    assert itc_loss(E, E, scale).item() == pytest.approx(math.log1p(math.exp(-16.0)), rel=1e-12)
    # text 0 points half-way: i2t rows [16 cos45, 0], [16 cos45, 16]; t2i rows are the columns
    text = torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]], dtype=torch.float64)
    c = 16 / 2**0.5
    i2t = (math.log(math.exp(c) + 1) - c + math.log(math.exp(c) + math.exp(16)) - 16) / 2
    t2i = (math.log(math.exp(c) + math.exp(c)) - c + math.log(1 + math.exp(16)) - 16) / 2
    assert itc_loss(E, text, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)


def test_tgir_loss_is_one_way_and_keeps_duplicate_targets():
    """The reference: CE of each query against every target, query -> target only; duplicates not removed."""
    query = E
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # the same target twice
    # row 0: logits [16, 16], label 0 -> log 2; row 1: logits [0, 0], label 1 -> log 2
    assert tgir_loss(query, target, torch.tensor(16.0, dtype=torch.float64)).item() == pytest.approx(
        math.log(2.0)
    )


def test_scr_loss_is_plain_cross_entropy():
    """The reference: plain CE over the 121 classes, no label smoothing."""
    logits = torch.zeros(1, 121)
    logits[0, 0] = 2.0
    want = -(2.0 - math.log(math.exp(2.0) + 120))
    assert scr_loss(logits, torch.tensor([0])).item() == pytest.approx(want, rel=1e-6)


def test_caption_loss_averages_the_selected_positions_and_ignores_minus_100():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    targets = torch.tensor([0, 1, -100])  # the third position is ignored (padding in capture mode)
    want = -(math.log(0.5) + math.log(0.8)) / 2
    assert caption_loss(logits, targets).item() == pytest.approx(want, rel=1e-6)


MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


def _caption_batch() -> dict[str, torch.Tensor]:
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :4] = torch.tensor([49406, 320, 1125, 49407])  # SOT, 2 words, EOT
    ids[1, :3] = torch.tensor([49406, 539, 49407])  # SOT, 1 word, EOT
    return {"pixels": torch.randn(2, 3, 32, 32), "input_ids": ids}


def test_caption_positions_default_and_faithful():
    """The reference: default trains each next token up to and including the end token (3 + 2
    positions); the faithful flag trains all 76 positions, the padded ones to predict the end token. The
    distillation term averages over the same positions as the task loss."""
    batch = _caption_batch()
    out = FameViL(MICRO)(batch, "cap")
    assert out.outputs["targets"].tolist() == [320, 1125, 49407, 539, 49407]
    assert int(out.outputs["trained"].sum()) == 5
    faithful = FameViL(MICRO.replace(caption_loss_on_padding=True))(batch, "cap")
    targets = faithful.outputs["targets"].view(2, 76)
    assert targets[0, :3].tolist() == [320, 1125, 49407] and (targets[0, 3:] == 49407).all()
    assert targets[1, :2].tolist() == [539, 49407] and (targets[1, 2:] == 49407).all()
    assert int(faithful.outputs["trained"].sum()) == 152
    teacher = faithful.outputs["logits"].detach().flip(0)
    want = _soft_ce(faithful.outputs["logits"], teacher)  # every one of the 152 positions
    got = kd_loss("cap", faithful, TaskOutput(faithful.loss, {"logits": teacher}))
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- 3.2 distillation
def _pair(**tensors) -> TaskOutput:
    return TaskOutput(torch.zeros(()), tensors)


G = torch.Generator().manual_seed(3)
S_IMG, S_TXT, T_IMG, T_TXT = (
    F.normalize(torch.randn(4, 3, generator=G, dtype=torch.float64), dim=1) for _ in range(4)
)
S_SCALE, T_SCALE = torch.tensor(16.0, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64)


def test_itc_distillation_default_pairs_teacher_with_teacher():
    """The intended behaviour (the default): student i2t / t2i logits against the softmax of teacher
    image x teacher text, temperature 1, averaged over the two directions."""
    student = _pair(image=S_IMG, text=S_TXT, scale=S_SCALE)
    teacher = _pair(image=T_IMG, text=T_TXT, scale=T_SCALE)
    s, t = S_SCALE * S_IMG @ S_TXT.T, T_SCALE * T_IMG @ T_TXT.T
    want = 0.5 * (_soft_ce(s, t) + _soft_ce(s.T, t.T))
    torch.testing.assert_close(kd_loss("itc", student, teacher), want)


def test_itc_distillation_faithful_pairs_teacher_with_student():
    """Quirk 1: ``faithful_itc`` reproduces the official teacher logits teacher_img x student_txt (i2t) and
    teacher_txt x student_img (t2i): products of two heads' outputs, s_t t . s_s x, so the scale is
    s_t s_s (the outputs' logit scales are s_t^2 = 9 and s_s^2 = 16)."""
    student = _pair(image=S_IMG, text=S_TXT, scale=S_SCALE)
    teacher = _pair(image=T_IMG, text=T_TXT, scale=T_SCALE)
    mixed = 3.0 * 4.0
    i2t = _soft_ce(S_SCALE * S_IMG @ S_TXT.T, mixed * T_IMG @ S_TXT.T)
    t2i = _soft_ce(S_SCALE * S_TXT @ S_IMG.T, mixed * T_TXT @ S_IMG.T)
    torch.testing.assert_close(kd_loss("itc", student, teacher, faithful_itc=True), 0.5 * (i2t + t2i))
    assert not torch.allclose(kd_loss("itc", student, teacher), 0.5 * (i2t + t2i))


def test_tgir_distillation_is_one_way_teacher_with_teacher():
    student = _pair(query=S_IMG, target=S_TXT, scale=S_SCALE)
    teacher = _pair(query=T_IMG, target=T_TXT, scale=T_SCALE)
    want = _soft_ce(S_SCALE * S_IMG @ S_TXT.T, T_SCALE * T_IMG @ T_TXT.T)
    torch.testing.assert_close(kd_loss("tgir", student, teacher), want)


def test_class_and_token_distillation_is_soft_cross_entropy_over_trained_rows():
    student = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    teacher = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    # row 0: -(0.25 log 0.5 + 0.75 log 0.5) = log 2; row 1: -(0.5 log 0.9 + 0.5 log 0.1)
    row0, row1 = math.log(2), -0.5 * (math.log(0.9) + math.log(0.1))
    assert kd_loss("scr", _pair(logits=student), _pair(logits=teacher)).item() == pytest.approx(
        (row0 + row1) / 2, rel=1e-6
    )
    rows = torch.tensor([True, False])  # caption positions under capture: padding left out
    assert distillation_cross_entropy(student, teacher, rows).item() == pytest.approx(row0, rel=1e-6)


def test_task_and_distillation_losses_are_combined_with_balance_one():
    """The reference: L = (2 - b) L_gt + b L_kd, b = 1 in every recipe."""
    gt, kd = torch.tensor(2.0), torch.tensor(3.0)
    assert combine(gt, kd, 1.0).item() == 5.0
    assert combine(gt, kd, 0.5).item() == pytest.approx(1.5 * 2 + 0.5 * 3)
    for name in ("mtl_full", "mtl_distill"):
        assert load_config(resolve(name)).distill.balance == 1.0


# --------------------------------------------------------------------------- 3.1 sampling
def test_size_proportional_probabilities_match_the_spec():
    """The reference: FashionGen 60,147 products (once per FashionGen task) vs FashionIQ 18,000 triplets."""
    sizes = {"itc": 60_147, "tgir": 18_000, "scr": 60_147, "cap": 60_147}
    sampler = TaskSampler(list(sizes), "size_proportional", sizes, update_frequency=1)
    assert sampler.probabilities.round(3).tolist() == [0.303, 0.091, 0.303, 0.303]
    assert len(sampler.next_update()) == 1  # one optimizer step per batch


def test_round_robin_with_update_frequency_4_sees_each_task_once_per_update():
    sampler = TaskSampler(["itc", "tgir", "scr", "cap"], "round_robin", update_frequency=4)
    for _ in range(3):
        assert sorted(sampler.next_update()) == ["cap", "itc", "scr", "tgir"]


# --------------------------------------------------------------------------- 3.3 IMTL-G in the trainer
def _spec_imtlg(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    """IMTL-G on one parameter tensor, as the reference: drop absent and all-zero gradients; one task
    passes through; a scalar takes the mean; else alpha_{2..T} = (g_1 U^T)(D U^T)^-1, alpha_1 = 1 - sum."""
    present = [g for g in grads if g is not None and bool(g.ne(0).any())]
    if not present:
        return None
    shape = present[0].shape
    g = torch.stack([x.flatten().double() for x in present])
    if len(present) == 1:
        return g[0].view(shape)
    if g.shape[1] == 1:
        return g.mean(0).view(shape)
    u = g / g.norm(dim=1, keepdim=True)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = (g[0] @ uu.T) @ torch.linalg.inv(d @ uu.T)
    alpha = torch.cat([1 - rest.sum().reshape(1), rest])
    return (alpha @ g).view(shape)


def test_imtlg_update_combines_each_tensors_task_gradients_of_loss_over_update_frequency(tmp_path):
    """The reference (faithful, per tensor): each micro-batch loss is divided by update_frequency (4)
    before its gradient is buffered; the update's gradient is the per-tensor IMTL-G combination."""
    trainer = Trainer(micro_config(tmp_path, "train.gradient_strategy=imtlg"), streams())
    reference = copy.deepcopy(trainer.model)
    seen: dict[str, torch.Tensor] = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update({n: p.grad.clone() for n, p in trainer.trainable if p.grad is not None})
    )
    assert [t for t, _ in trainer.train_update()["losses"]] == ["itc", "tgir", "scr", "cap"]
    per_task = {}
    for task, stream in streams().items():
        reference.zero_grad(set_to_none=True)
        (reference(stream.next_batch(), task).loss / 4).backward()
        per_task[task] = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    expected = {}
    for name, _ in trainer.trainable:
        combined = _spec_imtlg([g.get(name) for g in per_task.values()])
        if combined is not None:
            expected[name] = combined
    assert set(seen) == set(expected)
    shared = [n for n in expected if sum(n in g and bool(g[n].ne(0).any()) for g in per_task.values()) == 4]
    assert shared  # the backbone: combined over all four tasks
    for name, want in expected.items():
        got = seen[name].double()
        assert (got - want).norm() <= 1e-4 * want.norm() + 1e-12, name


# --------------------------------------------------------------------------- 3.4 optimiser, schedule
def _norm_or_scale_or_embedding(model: nn.Module) -> set[str]:
    """Names of LayerNorm weights, one-element scale parameters and embeddings, found by module type."""
    out = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.LayerNorm | nn.Embedding):
            out.add(f"{dot}weight")
        for name, p in module.named_parameters(recurse=False):
            if p.numel() == 1 or name in ("class_embedding", "pos_embed"):
                out.add(f"{dot}{name}")
    return out


def test_adamw_groups_learning_rates_and_hyperparameters():
    """The reference: AdamW betas 0.9/0.999, eps 1e-8, wd 1e-5; CLIP at 1e-6, adapters, XAA and heads x100."""
    model = FameViL(MICRO)
    optimizer = build_optimizer(model, OptimSection())
    counts = model.parameter_counts()
    new = counts["xaa"] + counts["heads"] + sum(v for k, v in counts.items() if k.startswith("tsa."))
    by_lr: dict[float, int] = {}
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        assert group["weight_decay"] in (0.0, 1e-5)
        lr = round(group["lr"], 12)
        by_lr[lr] = by_lr.get(lr, 0) + sum(p.numel() for p in group["params"])
    assert by_lr == {1e-6: counts["clip"], 1e-4: new}


@pytest.mark.parametrize("faithful", [False, True])
def test_weight_decay_default_and_faithful(faithful):
    """Quirk 4: the official name filter decayed everything but biases (LayerNorm weights and the norm
    scales included): ``decay_norms_and_scales``. The default leaves biases, LayerNorm weights, scales and
    embeddings undecayed."""
    model = FameViL(MICRO)
    groups = parameter_groups(model, 1e-6, 100.0, 1e-5, decay_norms_and_scales=faithful)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    names = {n for n, _ in model.named_parameters()}
    undecayed = {n for n in names if n.endswith("bias")}
    if not faithful:
        undecayed |= _norm_or_scale_or_embedding(model)
    assert decayed == names - undecayed
    assert ("vision.blocks.0.ln_1.weight" in decayed) == faithful
    assert ("heads.itc.norm_s" in decayed) == faithful


@pytest.mark.parametrize(
    "update, factor",
    [(0, 0.25), (1250, 0.625), (2499, 0.25 + 0.75 * 2499 / 2500), (2500, 1.0), (12499, 1.0), (12500, 0.1),
     (19999, 0.1), (20000, 0.01), (22499, 0.01)],
)  # fmt: skip
def test_full_recipe_schedule(update, factor):
    """The reference: warm-up linear from 0.25x to 1x over 2,500 updates, then x0.1 at 12.5k and 20k."""
    s = load_config(resolve("mtl_full")).schedule
    got = lr_factor(update, s.warmup_updates, s.warmup_start_factor, s.decay_at, s.decay_factor)
    assert got == pytest.approx(factor, rel=1e-12)


# recipe: tasks, sampling, r, updates, warm-up, decay points, micro-batches/update, strategy, xaa, wd
SPEC_TABLE = {
    "teacher_itc": (["itc"], "round_robin", 64, 30_000, 0, [20_000], 1, "sum", "none", 0.0),
    "teacher_scr": (["scr"], "round_robin", 64, 30_000, 0, [20_000], 1, "sum", "both", 1e-5),
    "teacher_cap": (["cap"], "round_robin", 64, 30_000, 0, [20_000], 1, "sum", "text", 1e-5),
    "teacher_tgir": (["tgir"], "round_robin", 64, 6_000, 0, [4_000], 1, "sum", "both", 1e-5),
    "mtl_size_proportional": (
        ["itc", "tgir", "scr", "cap"], "size_proportional", 64, 90_000, 10_000, [50_000, 80_000], 1, "sum",
        "both", 1e-5,
    ),
    "mtl_distill": (
        ["itc", "tgir", "scr", "cap"], "size_proportional", 128, 90_000, 10_000, [50_000, 80_000], 1, "sum",
        "both", 1e-5,
    ),
    "mtl_full": (
        ["itc", "tgir", "scr", "cap"], "round_robin", 64, 22_500, 2_500, [12_500, 20_000], 4, "imtlg", "both",
        1e-5,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_reference_recipes_match_the_spec_table(name):
    tasks, sampling, r, updates, warmup, decay_at, freq, strategy, xaa, wd = SPEC_TABLE[name]
    cfg = load_config(resolve(name))
    assert cfg.model.tasks == tasks and cfg.model.xaa == xaa and cfg.model.adapter_bottleneck == r
    assert (cfg.train.sampling, cfg.train.updates, cfg.train.update_frequency) == (sampling, updates, freq)
    assert cfg.train.gradient_strategy == strategy and cfg.train.seed == 42
    assert (cfg.schedule.warmup_updates, cfg.schedule.decay_at, cfg.schedule.decay_factor) == (
        warmup,
        decay_at,
        0.1,
    )
    assert cfg.schedule.warmup_start_factor == 0.25 and cfg.schedule.new_module_decay_at is None
    o = cfg.optim
    assert (o.lr, o.new_module_lr_multiplier, o.weight_decay, o.betas, o.eps) == (
        1e-6,
        100.0,
        wd,
        [0.9, 0.999],
        1e-8,
    )
    assert not o.decay_norms_and_scales and cfg.train.clip_grad_norm is None
    assert cfg.data.global_batch_size == 64  # over all processes, as the reference counts it
    assert cfg.eval.every == (500 if name == "mtl_full" else 2000)
    assert cfg.distill.enabled == (name in ("mtl_full", "mtl_distill"))
    if cfg.distill.enabled:
        assert sorted(cfg.distill.teachers) == sorted(tasks) and not cfg.distill.faithful_itc
    if name.startswith("teacher_"):
        assert cfg.train.precision == "fp32"
