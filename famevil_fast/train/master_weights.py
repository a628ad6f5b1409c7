"""bf16 parameters with float32 master copies (``train.master_weights``).

Under bf16 autocast a float32 model pays, in every step, a cast of each weight to bf16 where a product
reads it and a cast of its gradient back: two kernels per parameter use (2,946 of the 9,013 calls of the
four-task ViT-B/16 step at batch 64, ``bench/step_floor.py``). Here the model's parameters are stored in
bf16, so autocast finds them in its dtype and casts nothing, and the optimizer updates float32 master copies
of them: each step gathers the bf16 gradients into float32 buffers, runs AdamW on the masters, and rounds
them back into the model, each of the two copies one multi-tensor operation (a handful of kernels on a
GPU). The updates accumulate in float32, as in a float32 model; the forward and backward read the bf16
rounding of the weights, which autocast's casts computed before.

0-d parameters (the contrastive temperatures) stay float32: rounding ``logit_scale`` (about 4.6) to bf16
would move the temperature by up to 3%, and no product reads them.

Checkpoints and exported weights hold the float32 masters: ``MasterWeights.float32_weights()`` lends them
to the model (for ``save_famevil``, ``load_into``, ``save_pretrained``), so that a resume continues from
exactly the saved masters and an exported model equals a float32 run's layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from famevil_fast.ops.layer_norm import LOW_PRECISION


def copy_grouped(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, as one multi-tensor copy per pair of dtypes (and device): a
    copy that converts dtypes stays on the multi-tensor path only where every source shares one dtype and
    every destination another."""
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        pair = groups.setdefault((d.dtype, s.dtype, d.device), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    for d, s in groups.values():
        torch._foreach_copy_(d, s)


def keeps_float32(param: torch.Tensor) -> bool:
    """Whether a parameter stays float32 in a bf16 model: 0-d ones (the temperatures)."""
    return param.dim() == 0


class MasterWeights:
    """The float32 masters of ``model``'s floating parameters; the model's own (but 0-d ones) become
    ``dtype``. Build it after moving the model to its device and before building the optimizer."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in LOW_PRECISION:
            raise ValueError(f"master weights keep a 16-bit model beside float32 masters, got dtype {dtype}")
        self.dtype = dtype
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            if param.dtype != torch.float32:
                raise ValueError(
                    f"master weights start from a float32 model; parameter {name} is {param.dtype}"
                )
            self._index[id(param)] = len(self.params)
            self.params.append(param)
            self.masters.append(param.detach().clone())
            if not keeps_float32(param):
                param.data = param.data.to(dtype)

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """The float32 master of a parameter of the model."""
        try:
            return self.masters[self._index[id(param)]]
        except KeyError:
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is not one of the model's master-weighted ones"
            ) from None

    @torch.no_grad()
    def round_into_model(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Write the masters' rounding into the model's parameters (all, or ``params``), in place."""
        chosen = self.params if params is None else list(params)
        copy_grouped([p.data for p in chosen], [self.master(p) for p in chosen])

    @contextlib.contextmanager
    def float32_weights(self) -> Iterator[None]:
        """Within it, the model's parameters are the float32 masters themselves (save them, or load into
        them); on leaving, the model's own tensors are restored, in place, with the masters' rounding."""
        own = [p.data for p in self.params]
        for param, master in zip(self.params, self.masters):
            param.data = master
        try:
            yield
        finally:
            for param, data in zip(self.params, own):
                param.data = data
            self.round_into_model()

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Under torch.distributed: every process takes process ``src``'s masters (and their rounding)."""
        import torch.distributed as dist

        for master in self.masters:
            dist.broadcast(master, src)
        self.round_into_model()


class MasterAdamW(torch.optim.AdamW):
    """AdamW over the float32 masters of the model's parameters.

    ``params`` are parameter groups over the model's (bf16) parameters, as ``parameter_groups`` gives
    them; the optimizer holds the masters in their place, so its state (and a checkpoint of it) is that of
    AdamW over a float32 model. ``step`` copies the gradients of the parameters that have one into float32
    buffers (allocated once), steps the masters that got one (the others, as in AdamW, are skipped: no
    decay, no moment update), and rounds those masters back into the model. ``zero_grad`` clears the
    model's gradients."""

    def __init__(self, params: list[dict], weights: MasterWeights, **kwargs) -> None:
        self.weights = weights
        self.model_params: list[torch.Tensor] = []
        groups = []
        for group in params:
            model_params = list(group["params"])
            self.model_params += model_params
            groups.append({**group, "params": [weights.master(p) for p in model_params]})
        self._grad_buffers: dict[int, torch.Tensor] = {}
        super().__init__(groups, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure (the model's gradients are its input)")
        with_grad, grads, buffers = [], [], []
        for param in self.model_params:
            master = self.weights.master(param)
            if param.grad is None:
                master.grad = None
                continue
            buffer = self._grad_buffers.get(id(param))
            if buffer is None:
                buffer = self._grad_buffers[id(param)] = torch.empty_like(master)
            master.grad = buffer
            with_grad.append(param)
            grads.append(param.grad)
            buffers.append(buffer)
        copy_grouped(buffers, grads)
        super().step()
        self.weights.round_into_model(with_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (None, or zero in place) and the masters' references to them."""
        for param in self.model_params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()
        super().zero_grad(set_to_none=True)
