"""Cached decoding with static shapes, compiled by ``torch.compile`` (``generate(..., compiled=True)``).

``TextDecoder``'s step attends over the first ``t + 1`` cached positions and writes the new key and value at
the host integer ``t``, so every step has shapes of its own. Here the position is a device tensor and the
self-attention spans the whole cache, masked past the position (the cache starts zeroed, so the masked
entries hold no NaN), so every step has the same shapes: one graph of the text stack, traced once by
``torch.compile`` and reused at every step, eagerly or captured under ``cuda_graph=True``. The compiler
fuses the LayerNorms, residual additions, activations, adapter scales and the cache write around the matrix
products, which stay library calls: on the CPU, Inductor's code for a text layer is 9 products, the
cross-attention and 9 fused kernels, against the plain step's 29 ATen calls. The arithmetic is the plain
step's, summed in another order: tokens match except where two logits tie to within rounding.

The masked self-attention is written out (two products and a softmax that the compiler fuses with the
mask): under the compiler, SDPA's memory-efficient kernel refuses a mask whose key dimension is not aligned,
and the cache's (77 positions for CLIP) is not.

A model of another architecture, another autocast setting, a second batch size or a second ``max_len`` (the
cache's length) compiles anew; from the second of each the size is dynamic, so later ones reuse that graph.
``torch._dynamo.config.recompile_limit`` bounds the variants, past which the step runs uncompiled, with
the same results. It runs the unfused text layers: a model with ``backend="triton"`` decodes compiled, not
through the fused step of ``decode_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from famevil_fast.model.attention import attention
from famevil_fast.model.generation import image_keys_and_layer_cache, text_layers

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL

_COMPILED = {}  # torch.compile backend -> the compiled step


def static_step(
    model: FameViL,
    tokens: torch.Tensor,
    position: torch.Tensor,
    caches: list[torch.Tensor],
    context_kv: list[tuple[torch.Tensor, torch.Tensor]],
    task: str,
) -> torch.Tensor:
    """Next-token logits (B, V) of ``tokens`` (B,) at ``position`` (0-d, on the device), writing each layer's
    new key and value into its cache (B, 2, H, T, Dh; keys, then values) and advancing ``position`` by one.
    Each layer's cache is a tensor of its own: written in place as a view of one buffer, it would be copied
    whole by the compiled graph at every step (a mutated view of an input is written back through a copy
    of the input)."""
    h = model.text.embed(tokens[:, None], start=position)
    keep = (torch.arange(caches[0].shape[3], device=position.device) <= position)[None, :]
    index = position.view(1)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = caches[layer]
        # under autocast the projections are 16-bit and a float32 stream's cache float32
        kv.index_copy_(3, index, torch.stack((k, v), dim=1).to(kv.dtype))
        return attention(q, kv[:, 0], kv[:, 1], mask=keep, impl="eager")

    logits = text_layers(model, h, task, context_kv, attend)
    position.add_(1)
    return logits


def compiled_step(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``static_step`` under ``torch.compile``, made once per backend. The step traces as one graph (a test
    compiles it with ``fullgraph=True``); here a break or a spent recompile limit falls back to running
    uncompiled rather than failing. A second batch size recompiles once for any size (automatic dynamic
    shapes)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(static_step, backend=backend)
    return _COMPILED[backend]


class StaticTextDecoder:
    """``TextDecoder``'s interface (``step``, ``reorder``, ``length``) over the compiled static step.
    ``compile_backend`` is ``torch.compile``'s backend ("inductor"; None runs the static step uncompiled)."""

    pick = None  # greedy decoding picks tokens eagerly

    def __init__(
        self,
        model: FameViL,
        memory: list[torch.Tensor],
        max_tokens: int,
        task: str = "cap",
        compile_backend: str | None = "inductor",
    ) -> None:
        self.model, self.task = model, task
        self.context_kv, shape = image_keys_and_layer_cache(model, memory, max_tokens)
        like = memory[0]
        self.caches = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in model.text.blocks]
        self.position = torch.zeros((), dtype=torch.long, device=memory[0].device)
        self.length = 0
        self._step = static_step if compile_backend is None else compiled_step(compile_backend)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (B,); returns next-token logits (B, V)."""
        held = self.caches[0].shape[3]
        if self.length >= held:
            raise ValueError(f"the decoder holds {held} positions; position {self.length} is past them")
        # a fresh tensor every step: a column of the output table has another stride (.contiguous() keeps a
        # (1,) one's), and a view (a (rows, 1) table's column, in beam search) a base, that the compiled
        # step's guards would see and recompile for; it is B integers
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        with torch.no_grad():  # decoding only: the compiled graph carries no backward
            logits = self._step(self.model, tokens, self.position, self.caches, self.context_kv, self.task)
        self.length += 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequences ``index`` (beam search): the filled positions of the caches are gathered."""
        for cache in self.caches:
            filled = cache[:, :, :, : self.length]
            filled.copy_(filled.index_select(0, index))
