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
next step's input embedding one more (``FusedPick``). The arithmetic is the plain step's, in another order
of summation: tokens match the plain decoder's except where two logits tie to within rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from famevil_fast.model.clip import QuickGELU
from famevil_fast.ops import fused_adapter
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


def fused_step_applies(model: FameViL, task: str, like: torch.Tensor) -> bool:
    """Whether ``TextDecoder`` runs the fused layers: the model's backend resolves to Triton for the step
    (``backend="triton"``, or automatically under ``TRITON_INTERPRET=1``; on a GPU only when asked for) and
    every text block has the form above (a cross-attention adapter, the task's adapter, no Cross-Modal
    Adapters, a QuickGELU or GELU MLP). Not under autocast: the fused ops run in the dtype of
    their inputs, so a model decodes fused in its own dtype (float32, or cast to bf16 as a whole)."""
    if torch.is_autocast_enabled(like.device.type):
        return False
    backend = model.config.backend
    if backend not in ("torch", TRITON):  # None, or "cuda" / "cpu", which name the losses' kernels
        backend = None
    if select_backend("text decoding step", backend, ("torch", TRITON), like, False) != TRITON:
        return False
    for block in model.text.blocks:
        if block.xaa is None or block.xma is not None or mlp_activation(block) is None:
            return False
        if block.tsa is None or task not in block.tsa.adapters:
            return False
    return True


def fused_layer(
    block: Block,
    h: torch.Tensor,
    cache: torch.Tensor,
    position: int,
    context_kv: tuple[torch.Tensor, torch.Tensor],
    task: str,
    activation: str,
) -> torch.Tensor:
    """One block for one new token: h (B, 1, d) -> h' (B, 1, d); writes the token's key and value at
    ``position`` of the layer's (B, 2, H, T, Dh) cache (keys, then values). ``activation``: the block's
    ``mlp_activation``, resolved once per decode."""
    attn = block.attn
    ln1, ln2, mlp = block.ln_1, block.ln_2, block.mlp
    qkv = layer_norm_linear_act(
        h, ln1.weight, ln1.bias, attn.qkv.weight, attn.qkv.bias, None, ln1.eps, TRITON
    )
    o = cached_self_attention(qkv, cache, position, attn.heads, TRITON)
    a = linear_residual(o, attn.out.weight, attn.out.bias, h, TRITON)
    xaa, eps = block.xaa, block.xaa.ln_q.eps
    q_side = xaa.attn_params()
    o = cross_attention_query(
        a, q_side.q_ln_weight, q_side.q_ln_bias, q_side.q_weight, q_side.q_bias, context_kv, eps, TRITON
    )
    x = fused_adapter(o, *xaa.adapter.params(), backend=TRITON, eps=eps)
    hidden = layer_norm_linear_act(
        a, ln2.weight, ln2.bias, mlp.fc1.weight, mlp.fc1.bias, activation, ln2.eps, TRITON
    )
    adapter = block.tsa.adapters[task]
    return adapter_with_linear(
        a, adapter.params(), hidden, mlp.fc2.weight, mlp.fc2.bias, [a, x], adapter.ln.eps, TRITON
    )


class FusedHead:
    """The final LayerNorm and the LM head as one kernel, over the caption shortlist (gathered once)."""

    def __init__(self, model: FameViL, task: str) -> None:
        head, vocab = model.heads[task], model.caption_vocab
        self.ln = model.text.ln_final
        self.weight = head.weight if vocab is None else head.weight[vocab]
        self.bias = head.bias if vocab is None else head.bias[vocab]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        ln = self.ln
        return layer_norm_linear_act(h, ln.weight, ln.bias, self.weight, self.bias, None, ln.eps, TRITON)


class FusedPick:
    """A greedy step's bookkeeping and the next step's input embedding as one kernel
    (``ops.decoding.greedy_pick``): the argmax over the logits (a caption shortlist mapped back to token
    ids), the end token kept on finished sequences, the output column and the finished flags written, and
    ``token_embed[token] + pos_embed[position]`` for the next step. The shortlist's ids are checked against
    the embedding table once, at the first call."""

    def __init__(self, model: FameViL, end_token: int) -> None:
        text = model.text
        self.shortlist = model.caption_vocab
        self.tables = (text.token_embed.weight, text.pos_embed)
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
        ``next_position``, or None when there is no next step."""
        embedding = None if next_position is None else (*self.tables, next_position)
        h = greedy_pick(
            logits,
            tokens,
            done,
            column,
            self.end_token,
            self.shortlist,
            embedding,
            backend=TRITON,
            check_values=not self.checked,
        )
        if h is None:
            return None
        self.checked = True
        return h[:, None]
