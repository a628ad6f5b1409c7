"""bf16 parameters with float32 master copies (``train.master_weights``).

Under bf16 autocast a float32 model pays, in every step, a cast of each weight to bf16 where a product
reads it and a cast of its gradient back: two kernels per parameter use (2,946 of the 9,013 calls of the
four-task ViT-B/16 step at batch 64, ``bench/step_floor.py``). Here the model's parameters are stored in
bf16, so autocast finds them in its dtype and casts nothing, and the optimizer updates float32 master copies
of them. Each step copies the bf16 gradients into float32 buffers, runs AdamW on the masters, and rounds
them back into the model; each copy is a multi-tensor operation per pair of dtypes (a handful of kernels
on a GPU).

The updates accumulate in float32, as in a float32 model. The forward and backward read the bf16 rounding
of every weight: autocast rounded those that products read, and now the LayerNorms' weights and the
embeddings are rounded too. The gradients are bf16, summed in bf16 where a backward or an update's
micro-batches add several. The temperatures stay float32 (0-d parameters such as ``logit_scale``, and
the heads' ``norm_s``): rounding ``logit_scale`` (a logarithm, about 4.6) to bf16 would move the
temperature by up to 1.6%, and no product reads them.

Checkpoints and exported weights hold the float32 masters: ``float32_state_dict`` is the model's state
dict with the masters in place of its parameters, and ``load_float32_state_dict`` loads such a dict into
the masters and the model. Neither changes a parameter's tensor (a dtype change through ``param.data``
would drop the gradient hooks that DDP and captured CUDA graphs rely on).
"""

from __future__ import annotations

import torch
from torch import nn

from famevil_fast.ops.layer_norm import LOW_PRECISION
from famevil_fast.train.tensor_lists import copy_grouped

TEMPERATURES = ("logit_scale", "norm_s")


def keeps_float32(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter stays float32 in a bf16 model: the temperatures (0-d, or named in
    ``TEMPERATURES``)."""
    return param.dim() == 0 or name.rsplit(".", 1)[-1] in TEMPERATURES


class MasterWeights:
    """The float32 masters of ``model``'s floating parameters; the model's own (but the temperatures)
    become ``dtype``. Build it after moving the model to its device and before building the optimizer, DDP
    and captured graphs."""

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
            if not keeps_float32(name, param):
                param.data = param.data.to(dtype)  # before any backward: no gradient hook exists yet

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """The float32 master of a parameter of the model."""
        try:
            return self.masters[self._index[id(param)]]
        except KeyError:
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is not one of the model's master-weighted ones"
            ) from None

    @torch.no_grad()
    def round_into_model(self) -> None:
        """Write the masters' rounding into the model's parameters, in place."""
        copy_grouped([p.data for p in self.params], self.masters)

    def float32_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with each master in place of its parameter (tied names included)."""
        state = model.state_dict(keep_vars=True)
        return {
            key: (self.master(value) if id(value) in self._index else value).detach()
            for key, value in state.items()
        }

    @torch.no_grad()
    def load_float32_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        """Load ``state`` (a float32 state dict, checked as ``load_into`` checks it) into the model, then
        its parameters' values into their masters, exactly."""
        from famevil_fast.model.weights import load_into

        load_into(model, state, what)
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) in self._index:
                self.master(value).copy_(state[key])
        self.round_into_model()

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Under torch.distributed: every process takes process ``src``'s masters (and their rounding), in
        one collective."""
        import torch.distributed as dist

        flat = torch.cat([m.reshape(-1) for m in self.masters])
        dist.broadcast(flat, src)
        parts = flat.split([m.numel() for m in self.masters])
        copy_grouped(self.masters, [part.view_as(m) for part, m in zip(parts, self.masters)])
        self.round_into_model()


class MasterAdamW(torch.optim.AdamW):
    """AdamW over the float32 masters of the model's parameters.

    ``params`` are parameter groups over the model's (bf16) parameters, as ``parameter_groups`` gives
    them; the optimizer holds the masters in their place, so its state (and a checkpoint of it) is that of
    AdamW over a float32 model. Its step is AdamW's, between two step hooks registered first: before it,
    the gradients of the parameters that have one are copied into float32 buffers (allocated once) that the
    masters take as theirs (the others, as in AdamW, are skipped: no decay, no moment update); after it,
    those masters are rounded back into the model. ``zero_grad`` clears the model's gradients."""

    def __init__(self, params: list[dict], weights: MasterWeights, **kwargs) -> None:
        self.weights = weights
        self.model_params: list[torch.Tensor] = []
        self._masters: list[torch.Tensor] = []  # aligned with model_params
        groups = []
        for group in params:
            model_params = list(group["params"])
            masters = [weights.master(p) for p in model_params]
            self.model_params += model_params
            self._masters += masters
            groups.append({**group, "params": masters})
        self._grad_buffers: dict[int, torch.Tensor] = {}
        self._stepped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, master) of this step
        super().__init__(groups, **kwargs)
        self.register_step_pre_hook(MasterAdamW._gradients_in)
        self.register_step_post_hook(MasterAdamW._weights_out)

    def state_key(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer's state of the model's ``param`` is kept under: its master."""
        return self.weights.master(param)

    @torch.no_grad()
    def _gradients_in(self, args: tuple, kwargs: dict) -> None:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0]: the optimizer itself
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure (the model's gradients are its input)")
        self._stepped = []
        for param, master in zip(self.model_params, self._masters):
            if param.grad is None:
                master.grad = None
                continue
            if id(param) not in self._grad_buffers:
                self._grad_buffers[id(param)] = torch.empty_like(master)
            master.grad = self._grad_buffers[id(param)]
            self._stepped.append((param, master))
        copy_grouped([m.grad for _, m in self._stepped], [p.grad for p, _ in self._stepped])

    @torch.no_grad()
    def _weights_out(self, args: tuple, kwargs: dict) -> None:
        copy_grouped([p.data for p, _ in self._stepped], [m for _, m in self._stepped])
        self._stepped = []

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
