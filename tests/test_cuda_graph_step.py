"""Graph-captured training steps: the model is capturable (no host read-backs, static shapes), and a
GraphedStep accumulates the same gradients and losses as eager steps (simulated capture on the CPU, the real
thing on a GPU)."""

import copy

import pytest
import torch
from helpers import token_batch
from test_famevil_model import micro_batch, micro_model

from famevil_fast.capture import HostSyncError, simulated_capture, static_shapes
from famevil_fast.train.cuda_graph import GraphedStep, batch_layout

TASKS = ("itc", "tgir", "scr", "cap")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batches(tasks, b=3, seed=0, device="cpu"):
    full = micro_batch(b, seed)
    keys = {
        "itc": ("pixels", "input_ids"),
        "tgir": ("ref_pixels", "input_ids", "target_pixels"),
        "scr": ("pixels", "input_ids", "labels"),
        "cap": ("pixels", "input_ids"),
    }
    return {t: {k: full[k].to(device) for k in keys[t]} for t in tasks}


def _loss_fn(model, mixed):
    def loss_fn(batches):
        outs = model.forward_mixed(batches) if mixed else {t: model(b, t) for t, b in batches.items()}
        losses = {t: o.loss for t, o in outs.items()}
        return sum(losses.values()) / len(losses), losses

    return loss_fn


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("mixed", [False, True])
def test_every_task_is_capturable(backend, mixed):
    model = micro_model().set_runtime(backend=backend)
    batches = _batches(TASKS)
    with simulated_capture():
        total, _ = _loss_fn(model, mixed)(batches)
        total.backward()


def test_simulated_capture_names_a_host_read_back():
    x = torch.randn(4)
    with pytest.raises(HostSyncError, match="item"), simulated_capture():
        x.sum().item()
    with pytest.raises(HostSyncError, match="shape depends on the data"), simulated_capture():
        x[x > 0]
    x.sum().item()  # outside, nothing is forbidden


@pytest.mark.parametrize("task", TASKS)
def test_static_shapes_give_the_same_losses_and_gradients(task):
    model = micro_model()
    batch = _batches([task])[task]
    batch["input_ids"] = torch.cat(
        [token_batch(3, length=20, seed=5), torch.zeros(3, 57, dtype=torch.long)], 1
    )
    eager = model(batch, task).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with static_shapes():
        static = model(batch, task).loss
    static.backward()
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_step_matches_eager_steps(device):
    """Two layouts (a mixed four-task step and a single-task step), replayed on new data, with gradient
    accumulation across calls: losses and gradients equal to eager steps on the same data."""
    torch.manual_seed(0)
    eager_model = micro_model().to(device)
    graphed_model = copy.deepcopy(eager_model)
    step = GraphedStep(_loss_fn(graphed_model, mixed=True), list(graphed_model.parameters()))
    eager_fn = _loss_fn(eager_model, mixed=True)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    for seed, tasks in enumerate([TASKS, TASKS, ("itc",), TASKS, ("itc",)]):
        batches = _batches(tasks, seed=seed, device=device)
        got = step(batches)
        total, want = eager_fn(batches)
        total.backward()
        for t in tasks:
            torch.testing.assert_close(got[t], want[t].detach().float(), **tol)
        if seed % 2:  # accumulate over two calls, then compare and clear
            for (n, pe), pg in zip(eager_model.named_parameters(), graphed_model.parameters()):
                if pe.grad is not None:
                    torch.testing.assert_close(pg.grad, pe.grad, **tol, msg=n)
            eager_model.zero_grad(set_to_none=True)
            step.zero_grad()
    assert len(step.graphs) == 2


def test_graphed_step_captures_once_per_layout_and_caps_the_count():
    model = micro_model()
    step = GraphedStep(_loss_fn(model, mixed=False), list(model.parameters()), max_graphs=1)
    step(_batches(["itc"], b=3))
    step(_batches(["itc"], b=3, seed=1))
    step(_batches(["itc"], b=2))  # a new layout beyond the cap runs eagerly
    assert len(step.graphs) == 1 and step.eager_calls == 1
    assert batch_layout(_batches(["itc"], b=3)) in step.graphs


def test_graphed_step_rejects_bad_arguments():
    model = micro_model()
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(_loss_fn(model, False), list(model.parameters()), warmup=0)
    step = GraphedStep(_loss_fn(model, False), list(model.parameters()))
    with pytest.raises(ValueError, match="itc.input_ids is a list"):
        step({"itc": {"pixels": torch.zeros(1, 3, 32, 32), "input_ids": [[1, 2]]}})
    frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    with pytest.raises(ValueError, match="requires a gradient"):
        GraphedStep(_loss_fn(model, False), frozen)


def test_parameters_no_call_reached_show_no_gradient_to_the_optimizer():
    model = micro_model()
    step = GraphedStep(_loss_fn(model, mixed=False), list(model.parameters()))
    step(_batches(["itc"]))
    names = {p: n for n, p in model.named_parameters()}
    with step.untouched_grads_hidden():
        visible = {names[p] for p in step.params if p.grad is not None}
    assert any(".adapters.itc." in n for n in visible)
    assert not any(".adapters.scr." in n or ".xaa." in n for n in visible)
    assert all(p.grad is not None for p in step.params)  # restored: the graphs accumulate into them
    step(_batches(["scr"]))
    with step.untouched_grads_hidden():
        visible = {names[p] for p in step.params if p.grad is not None}
    assert any(".adapters.scr." in n for n in visible) and any(".adapters.itc." in n for n in visible)
    step.zero_grad()
    with step.untouched_grads_hidden():
        assert all(p.grad is None for p in step.params)


def test_a_layout_beyond_the_cap_hides_the_parameters_it_does_not_reach():
    """An eager step past ``max_graphs`` shows the optimizer only what it reached, with eager gradients,
    accumulated into the tensors the captured graphs write to."""
    model = micro_model()
    reference = copy.deepcopy(model)
    step = GraphedStep(_loss_fn(model, mixed=False), list(model.parameters()), max_graphs=1)
    step(_batches(["itc"]))  # captured: every parameter now holds a gradient tensor
    tensors = [p.grad for p in step.params]
    step.zero_grad()
    step(_batches(["scr"]))  # a second layout: beyond the cap, eager
    assert step.eager_calls == 1
    names = {p: n for n, p in model.named_parameters()}
    with step.untouched_grads_hidden():
        visible = {names[p] for p in step.params if p.grad is not None}
    assert any(".adapters.scr." in n for n in visible)
    assert not any(".adapters.itc." in n or ".adapters.cap." in n for n in visible)
    assert all(p.grad is t for p, t in zip(step.params, tensors))
    total, _ = _loss_fn(reference, mixed=False)(_batches(["scr"]))
    total.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(p.grad, expected, msg=name)
