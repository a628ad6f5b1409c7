"""One layer of the text tower's one-token decoding step in seven kernels (the Triton backend).

The plain step (``TextDecoder.step``) runs each sub-layer through PyTorch modules: every LayerNorm,
projection, bias, activation and residual addition is a kernel of its own, about thirty a layer. With one
token per sequence none of them comes near filling a GPU, so the step lasts as long as its kernels are many,
under a CUDA graph as well. Fused, a layer ``h' = a + MLP(LN2(a)) + TSA(a) + XAA(a)``,
``a = h + Attn(LN1(h))``, is:

1. LN1 and the QKV projection (``ops.decoding.layer_norm_linear_act``);
2. the new key and value written into the layer's cache and the attention over it
   (``ops.decoding.cached_self_attention``);
3. the output projection adding ``h`` (``ops.decoding.linear_residual``);
4. the cross-attention adapter's LayerNorm, query projection and attention over the keys and values of the
   vision memory, computed once per image (``ops.decoding.cross_attention_query``);
5. its bottleneck adapter;
6. LN2, the MLP's first layer and its activation;
7. the task adapter, which adds ``a``, the MLP's second layer and the cross-attention output in its
   epilogue (``ops.decoding.adapter_with_linear``).

Both adapters spread their output columns over programs (``adapter_fwd_columns_kernel``), so that a step's
few rows do not leave them on a single multiprocessor. The final LayerNorm and the LM head (over the caption
shortlist, gathered once per decode) are one more kernel, and greedy decoding's choice of the token with the
next step's input embedding one more (``FusedPick``). The first step goes through the checked ops of
``ops.decoding``; later steps hand the same arguments to their launchers. The arithmetic is the plain
step's, in another order of summation: tokens match the plain decoder's except where two logits tie to
within rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from famevil_fast.kernels import launch
from famevil_fast.model.clip import QuickGELU
from famevil_fast.ops import AdapterParams, fused_adapter
from famevil_fast.ops._backend import select_backend
from famevil_fast.ops.decoding import (
    adapter_with_linear,
    cached_self_attention,
    cross_attention_query,
    greedy_pick,
    layer_norm_linear_act,
    linear_residual,
)

if TYPE_CHECKING:
    from famevil_fast.model.clip import Block
    from famevil_fast.model.famevil import FameViL

TRITON = "triton"


def mlp_activation(block: Block) -> str | None:
    """The MLP activation's name for ``layer_norm_linear_act``, or None when it has no fused form."""
    act = block.mlp.act
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    return None


def unfit_for_fusion(block: Block, task: str) -> str | None:
    """Why ``block`` cannot run the fused step for ``task``, or None when it can."""
    if mlp_activation(block) is None:
        return "fused decoding needs a QuickGELU or GELU MLP in every text block"
    if block.xaa is None or block.xma is not None or block.tsa is None or task not in block.tsa.adapters:
        return (
            f"fused decoding needs a cross-attention adapter and the {task!r} task adapter in every text "
            "block, and no Cross-Modal Adapter"
        )
    return None


def fused_step_applies(model: FameViL, task: str, like: torch.Tensor) -> bool:
    """Whether ``TextDecoder`` runs the fused layers: the model's backend resolves to Triton for the step
    (``backend="triton"``, or automatically under ``TRITON_INTERPRET=1``; on a GPU only when asked for) and
    every text block has the form above (a cross-attention adapter, the task's adapter, no Cross-Modal
    Adapters, a QuickGELU or GELU MLP). Not under autocast: the fused ops run in the dtype of
    their inputs, so a model decodes fused in its own dtype (float32, or cast to bf16 as a whole)."""
    if torch.is_autocast_enabled(like.device.type):
        return False
    backend = model.config.adapter_backend
    if select_backend("text decoding step", backend, ("torch", TRITON), like, False) != TRITON:
        return False
    return all(unfit_for_fusion(block, task) is None for block in model.text.blocks)


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


class FusedLayer:
    """One text block's fused step, h (B, d) -> h' (B, d), writing the new token's key and value at
    ``position`` of the layer's (B, 2, H, T, Dh) cache (keys, then values).

    The block's parameters are gathered once per decode. The first call runs the public ops of
    ``ops.decoding``, which check every argument (shapes, dtypes, devices, the cache, the context's keys and
    values); later calls hand the same arguments to the ops' launchers, skipping a host cost that an eager
    step pays on every one of its kernels: between steps nothing those checks look at changes but the
    position, which ``TextDecoder`` bounds."""

    def __init__(self, block: Block, task: str) -> None:
        reason = unfit_for_fusion(block, task)
        if reason is not None:
            raise ValueError(reason)
        activation = mlp_activation(block)
        attn, mlp, xaa = block.attn, block.mlp, block.xaa
        q_side, adapter = xaa.attn_params(), block.tsa.adapters[task]
        self.heads, self.activation = attn.heads, activation
        self.qkv = _contiguous(block.ln_1.weight, block.ln_1.bias, attn.qkv.weight, attn.qkv.bias)
        self.out = _contiguous(attn.out.weight, attn.out.bias)
        self.query = _contiguous(q_side.q_ln_weight, q_side.q_ln_bias, q_side.q_weight, q_side.q_bias)
        self.xaa_adapter = AdapterParams(*_contiguous(*xaa.adapter.params()))
        self.mlp_in = _contiguous(block.ln_2.weight, block.ln_2.bias, mlp.fc1.weight, mlp.fc1.bias)
        self.mlp_out = _contiguous(mlp.fc2.weight, mlp.fc2.bias)
        self.task_adapter = AdapterParams(*_contiguous(*adapter.params()))
        self.eps = (block.ln_1.eps, xaa.ln_q.eps, block.ln_2.eps, adapter.ln.eps)
        self.checked = False

    def __call__(
        self,
        h: torch.Tensor,
        cache: torch.Tensor,
        position: int,
        context_kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        if self.checked:
            return self._launch(h, cache, position, context_kv)
        out = self._through_ops(h[:, None], cache, position, context_kv)[:, 0]
        self.checked = True
        return out

    def _through_ops(self, h, cache, position, context_kv) -> torch.Tensor:
        """The step through the checked ops, on (B, 1, d) rows."""
        eps_1, eps_x, eps_2, eps_t = self.eps
        qkv = layer_norm_linear_act(h, *self.qkv, None, eps_1, TRITON)
        o = cached_self_attention(qkv, cache, position, self.heads, TRITON)
        a = linear_residual(o, *self.out, h, TRITON)
        q = cross_attention_query(a, *self.query, context_kv, eps_x, TRITON)
        x = fused_adapter(q, *self.xaa_adapter, backend=TRITON, eps=eps_x)
        hidden = layer_norm_linear_act(a, *self.mlp_in, self.activation, eps_2, TRITON)
        return adapter_with_linear(a, self.task_adapter, hidden, *self.mlp_out, [a, x], eps_t, TRITON)

    def _launch(self, h, cache, position, context_kv) -> torch.Tensor:
        """The same kernels on (B, d) rows, straight through their launchers."""
        eps_1, eps_x, eps_2, eps_t = self.eps
        qkv = launch.ln_linear_output(h, *self.qkv, eps_1)
        o = launch.decode_self_attention(qkv, cache, position, self.heads)
        a = launch.linear_residual(o, *self.out, h)
        q = launch.decode_cross_attention(a, 1, *self.query, *context_kv, eps_x)
        x = launch.adapter_output(q, self.xaa_adapter, [], launch.SINGLE_TASK, eps_x)
        hidden = launch.ln_linear_output(a, *self.mlp_in, eps_2, self.activation)
        linear = (hidden, *self.mlp_out)
        return launch.adapter_output(a, self.task_adapter, [a, x], launch.SINGLE_TASK, eps_t, linear)


class FusedHead:
    """The final LayerNorm and the LM head as one kernel, over the caption shortlist (gathered once); checked
    at the first call, as ``FusedLayer``."""

    def __init__(self, model: FameViL, task: str) -> None:
        head, vocab, ln = model.heads[task], model.caption_vocab, model.text.ln_final
        weight = head.weight if vocab is None else head.weight[vocab]
        bias = head.bias if vocab is None else head.bias[vocab]
        self.params = _contiguous(ln.weight, ln.bias, weight, bias)
        self.eps = ln.eps
        self.checked = False

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of rows h (B, d), in h's dtype."""
        if self.checked:
            return launch.ln_linear_output(h, *self.params, self.eps)
        self.checked = True
        return layer_norm_linear_act(h, *self.params, None, self.eps, TRITON)


class FusedPick:
    """A greedy step's bookkeeping and the next step's input embedding as one kernel
    (``ops.decoding.greedy_pick``): the argmax over the logits (a caption shortlist mapped back to token
    ids), the end token kept on finished sequences, the output column and the finished flags written, and
    ``token_embed[token] + pos_embed[position]`` for the next step. The shortlist's ids are checked against
    the embedding table once, at the first call."""

    def __init__(self, model: FameViL, end_token: int) -> None:
        text = model.text
        self.shortlist = model.caption_vocab
        self.tables = _contiguous(text.token_embed.weight, text.pos_embed)
        self.end_token = end_token
        self.checked = False

    def __call__(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        done: torch.Tensor,
        column: int,
        next_position: int | None,
    ) -> torch.Tensor | None:
        """Writes ``tokens[:, column]`` and updates ``done``; returns the (B, 1, width) input of the step at
        ``next_position``, or None when there is no next step. Every argument, and the shortlist's ids against
        the embedding table, is checked at the first call that embeds; after it, the column and position
        only."""
        embedding = None if next_position is None else (*self.tables, next_position)
        in_range = 0 <= column < tokens.shape[1] and (
            next_position is None or 0 <= next_position < self.tables[1].shape[0]
        )
        if self.checked and in_range:
            logits = logits.contiguous()  # n-gram bans leave a strided view
            h = launch.greedy_pick(logits, self.shortlist, tokens, done, column, self.end_token, embedding)
        else:
            h = greedy_pick(
                logits, tokens, done, column, self.end_token, self.shortlist, embedding, backend=TRITON
            )
        if h is None:
            return None
        self.checked = True
        return h[:, None]
