"""The Cross-Modal Adapter, an alternative to the task-specific adapters.

Per task, every transformer layer of both towers gets two sequential adapters, one on the output of the
self-attention sub-layer and one on the output of the MLP sub-layer, each applied before the block adds
that output to the residual stream. One adapter computes ``y + Up(QuickGELU(Down(y)))``:

- ``Down`` (d -> r) belongs to its tower;
- ``Up`` (r -> d) is the concatenation of the tower's own projection onto the first d - d_s channels and a
  projection onto the last d_s channels whose weight and bias are shared with the other tower's adapter at
  the same (layer, site, task). The shared parts live once, in ``FameViL.xmodal_shared``.

Weights start truncated-normal with std 0.01, biases at zero; there is no LayerNorm and no scale. The fused
adapter kernels of ``famevil_fast.ops`` compute LayerNorm -> ReLU bottlenecks, which is different
arithmetic, so these adapters run as plain PyTorch (two projections and a QuickGELU per adapter).

Parameters per task (widths d_v, d_t, L layers): ``2 L (r (d_v + d_t) + 2 r + (d_v + d_t - d_s)(r + 1))``,
see :func:`xmodal_parameter_count`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model.task_mix import TaskMix, as_task_mix, equal_chunks, per_segment
from famevil_fast.ops.activation import quick_gelu_reference

SITES = ("attn", "mlp")
INIT_STD = 0.01


def _init_linear(layer: nn.Linear) -> None:
    nn.init.trunc_normal_(layer.weight, std=INIT_STD)
    nn.init.zeros_(layer.bias)


class SharedUp(nn.Module):
    """The last d_s up-projection channels of one (layer, site, task), shared by the two towers."""

    def __init__(self, bottleneck: int, shared: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shared, bottleneck))
        self.bias = nn.Parameter(torch.zeros(shared))
        nn.init.trunc_normal_(self.weight, std=INIT_STD)


class CrossModalAdapter(nn.Module):
    """One tower's adapter at one (layer, site, task): ``y + [up_own | up_shared](QuickGELU(down(y)))``."""

    def __init__(self, width: int, bottleneck: int, shared: int) -> None:
        super().__init__()
        if width < 1 or bottleneck < 1:
            raise ValueError(
                f"Cross-Modal Adapter needs width >= 1 and r >= 1, got width={width}, r={bottleneck}"
            )
        if not 0 <= shared <= width:
            raise ValueError(f"shared channels d_s={shared} must lie in [0, width={width}]")
        self.down = nn.Linear(width, bottleneck)
        with warnings.catch_warnings():  # d_s == d leaves no own up-projection channels
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.up = nn.Linear(bottleneck, width - shared)
        _init_linear(self.down)
        _init_linear(self.up)
        self._shared: list[SharedUp] = []  # a reference, not a submodule: the model owns the shared part

    def bind(self, shared: SharedUp) -> None:
        if shared.weight.shape != (self.width - self.up.out_features, self.down.out_features):
            raise ValueError(
                f"shared up-projection of shape {tuple(shared.weight.shape)} does not fit an adapter of "
                f"width {self.width} with r={self.down.out_features} and {self.up.out_features} own channels"
            )
        self._shared = [shared]

    @property
    def width(self) -> int:
        return self.down.in_features

    def up_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (d, r) up weight and (d,) bias: own channels first, shared channels last."""
        if not self._shared:
            raise ValueError("this Cross-Modal Adapter is not bound to its shared up-projection (bind() it)")
        shared = self._shared[0]
        return torch.cat([self.up.weight, shared.weight]), torch.cat([self.up.bias, shared.bias])

    def check_width(self, y: torch.Tensor) -> None:
        if y.shape[-1] != self.width:
            raise ValueError(f"Cross-Modal Adapter of width {self.width} got inputs of width {y.shape[-1]}")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.check_width(y)
        weight, bias = self.up_params()
        return y + F.linear(quick_gelu_reference(self.down(y)), weight, bias)


class CrossModalTaskAdapters(nn.Module):
    """One Cross-Modal Adapter per task at one site of one block of one tower.

    ``task`` is a task key, or a (B,) tensor of indices into ``tasks`` (each sample through its own task's
    adapter; absent tasks get no gradient): batched products over equal chunks of the batch where its
    segments split into a few (``equal_chunks``), else one call per segment."""

    def __init__(self, width: int, bottleneck: int, shared: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.adapters = nn.ModuleDict({t: CrossModalAdapter(width, bottleneck, shared) for t in tasks})

    def forward(self, y: torch.Tensor, task: str | torch.Tensor | TaskMix) -> torch.Tensor:
        if isinstance(task, str):
            return self.adapters[task](y)
        mix = as_task_mix(task, y.shape[0])
        if len(mix.present) == 1:
            return self.adapters[self.tasks[mix.present[0]]](y)
        chunk_tasks = equal_chunks(mix)
        if chunk_tasks is None:
            return per_segment(
                mix, [y], lambda position, parts: self.adapters[self.tasks[position]](parts[0])
            )
        return self._grouped(y, [self.adapters[self.tasks[position]] for position in chunk_tasks])

    @staticmethod
    def _grouped(y: torch.Tensor, adapters: list[CrossModalAdapter]) -> torch.Tensor:
        """y's leading dimension as ``len(adapters)`` equal chunks, chunk c through ``adapters[c]``: each
        projection one batched product with its bias for every chunk, no split or concatenation."""
        adapters[0].check_width(y)
        rows = y.reshape(len(adapters), -1, y.shape[-1])
        down_weight = torch.stack([a.down.weight for a in adapters]).transpose(1, 2)  # (C, d, r)
        down_bias = torch.stack([a.down.bias for a in adapters])[:, None]  # (C, 1, r)
        ups = [a.up_params() for a in adapters]
        up_weight = torch.stack([weight for weight, _ in ups]).transpose(1, 2)  # (C, r, d)
        up_bias = torch.stack([bias for _, bias in ups])[:, None]  # (C, 1, d)
        h = quick_gelu_reference(torch.baddbmm(down_bias, rows, down_weight))
        return y + torch.baddbmm(up_bias, h, up_weight).reshape(y.shape)


class CrossModalBlockAdapters(nn.Module):
    """The two sites of one block: ``attn`` (after self-attention) and ``mlp`` (after the MLP)."""

    def __init__(self, width: int, bottleneck: int, shared: int, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.attn = CrossModalTaskAdapters(width, bottleneck, shared, tasks)
        self.mlp = CrossModalTaskAdapters(width, bottleneck, shared, tasks)


def shared_layers(layers: int, bottleneck: int, shared: int, tasks: tuple[str, ...]) -> nn.ModuleList:
    """``[layer][site][task] -> SharedUp``: the parameters the two towers share."""
    return nn.ModuleList(
        nn.ModuleDict(
            {site: nn.ModuleDict({t: SharedUp(bottleneck, shared) for t in tasks}) for site in SITES}
        )
        for _ in range(layers)
    )


def attach_cross_modal_adapters(model: nn.Module) -> None:
    """Give every block of ``model.vision`` and ``model.text`` its ``xma`` adapters and register the shared
    up-projections as ``model.xmodal_shared``, binding each adapter to its (layer, site, task) share."""
    c = model.config
    r, d_s, tasks = c.xmodal_bottleneck, c.xmodal_shared, tuple(c.tasks)
    model.xmodal_shared = shared_layers(c.clip.vision.layers, r, d_s, tasks)
    for tower in (model.vision, model.text):
        for layer, block in enumerate(tower.blocks):
            block.xma = CrossModalBlockAdapters(tower.cfg.width, r, d_s, tasks)
            for site in SITES:
                for task in tasks:
                    getattr(block.xma, site).adapters[task].bind(model.xmodal_shared[layer][site][task])


def xmodal_parameter_count(
    vision_width: int, text_width: int, layers: int, bottleneck: int, shared: int, tasks: int = 1
) -> int:
    """Parameters of the Cross-Modal Adapters: per (layer, site, task), both towers' down-projections
    (d r + r each), own up-projections ((d - d_s)(r + 1) each) and one shared part (d_s (r + 1))."""
    if min(vision_width, text_width, layers, bottleneck, tasks) < 1:
        raise ValueError(
            "widths, layers, r and tasks must be at least 1, got "
            f"{vision_width}, {text_width}, {layers}, {bottleneck}, {tasks}"
        )
    if not 0 <= shared <= min(vision_width, text_width):
        raise ValueError(f"shared channels d_s={shared} must lie in [0, {min(vision_width, text_width)}]")
    r, d_s, widths = bottleneck, shared, vision_width + text_width
    per_site = r * widths + 2 * r + (widths - 2 * d_s) * (r + 1) + d_s * (r + 1)
    return 2 * layers * tasks * per_site
