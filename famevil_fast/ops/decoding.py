"""Inference ops that fuse the small sub-layers of a one-token decoding step, each with a Triton backend
and its plain-PyTorch reference:

* ``layer_norm_linear_act(x, ln_weight, ln_bias, weight, bias, activation, eps, backend)``:
  ``act(LN(x) W^T + b)`` in one kernel (a block's LayerNorm and QKV projection; its second LayerNorm, the
  MLP's first layer and its activation; the final LayerNorm and the LM head).
* ``linear_residual(x, weight, bias, residual, backend)``: ``residual + x W^T + b`` in one kernel (the
  attention output projection adding the residual stream in its epilogue).
* ``cached_self_attention(qkv, cache, position, heads, backend)``: the new token's key and value written into
  the key/value cache and its attention over the cache, in one kernel.
* ``cross_attention_query(x, ln_weight, ln_bias, q_weight, q_bias, context_kv, eps, backend)``: the
  cross-attention adapter's LayerNorm, query projection and attention over precomputed context keys and
  values, in one kernel.
* ``adapter_with_linear(x, params, hidden, weight, bias, residual, eps, backend)``: a bottleneck adapter whose
  output also carries a linear branch ``hidden W^T + b`` (the MLP's second layer) and the residual terms,
  in one kernel.
* ``greedy_pick(logits, tokens, done, column, end_token, ...)``: a greedy step's bookkeeping (argmax,
  shortlist lookup, end token of finished sequences, output write, finished flags) and the next step's
  input embedding, in one kernel.

At one token per sequence every kernel of a step is far too small to fill a GPU, so a step takes as long as
its kernels are many; these ops remove the separate LayerNorm, bias, activation and addition kernels.
They have no backward (decoding runs under ``torch.no_grad``): called on tensors that need gradients they
raise ValueError, as they do for mismatched shapes, dtypes or devices and for an unknown activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from famevil_fast.capture import host_reads_allowed
from famevil_fast.ops._backend import require_int, same_device_and_dtype, select_backend
from famevil_fast.ops.activation import quick_gelu_reference
from famevil_fast.ops.adapter import (
    AdapterParams,
    _scale_as_tensor,
    adapter_reference,
    check_adapter_args,
    check_residuals,
    residual_list,
)
from famevil_fast.ops.cross_attention import (
    check_context_kv,
    layer_norm_linear_reference,
    merge_heads,
    split_heads,
)

BACKENDS = ("torch", "triton")
ACTIVATIONS = (None, "relu", "quick_gelu", "gelu")


def _check_no_grad(op: str, tensors: dict[str, torch.Tensor]) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t.requires_grad:
                raise ValueError(
                    f"{op} is inference-only (no backward); {name} requires grad: use torch.no_grad()"
                )


def _check_layer_norm(op: str, ln_weight: torch.Tensor, ln_bias: torch.Tensor, d: int) -> None:
    if d == 0:
        raise ValueError(f"{op}: x has no features (width 0) to normalise")
    if ln_weight.shape != (d,) or ln_bias.shape != (d,):
        raise ValueError(
            f"{op}: LayerNorm parameters of shapes {tuple(ln_weight.shape)}, "
            f"{tuple(ln_bias.shape)} do not match width {d}"
        )


def _check_linear(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight of shape {tuple(weight.shape)} does not take inputs of width {x.shape[-1]}"
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias of shape {tuple(bias.shape)} does not match {weight.shape[0]} outputs")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "quick_gelu":
        return quick_gelu_reference(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def layer_norm_linear_act(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    activation: str | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(layer_norm(x) W^T + b)`` for x (..., d), LayerNorm parameters (d,), W (n, d), b (n,);
    ``activation`` is None, "relu", "quick_gelu" (x * sigmoid(1.702 x)) or "gelu" (erf form)."""
    op = "layer_norm_linear_act"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    d = x.shape[-1]
    _check_layer_norm(op, ln_weight, ln_bias, d)
    _check_linear(op, x, weight, bias)
    named = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "weight": weight, "bias": bias}
    same_device_and_dtype(op, named)
    _check_no_grad(op, named)
    if select_backend(op, backend, BACKENDS, x) == "torch":
        return _activate(F.linear(F.layer_norm(x, (d,), ln_weight, ln_bias, eps), weight, bias), activation)
    from famevil_fast.kernels import launch

    rows = x.reshape(-1, d).contiguous()
    params = (t.contiguous() for t in (ln_weight, ln_bias, weight, bias))
    out = launch.ln_linear_output(rows, *params, eps, activation)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + x W^T + b`` for x (..., k), W (d, k), b (d,), residual (..., d)."""
    op = "linear_residual"
    _check_linear(op, x, weight, bias)
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(
            f"{op}: residual of shape {tuple(residual.shape)} does not match the output "
            f"{(*x.shape[:-1], weight.shape[0])}"
        )
    named = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    same_device_and_dtype(op, named)
    _check_no_grad(op, named)
    if select_backend(op, backend, BACKENDS, x) == "torch":
        return residual + F.linear(x, weight, bias)
    from famevil_fast.kernels import launch

    k = x.shape[-1]
    res = residual.reshape(-1, weight.shape[0]).contiguous()
    rows = x.reshape(res.shape[0], k).contiguous()
    out = launch.linear_residual(rows, weight.contiguous(), bias.contiguous(), res)
    return out.view(residual.shape)


def cached_self_attention(
    qkv: torch.Tensor, cache: torch.Tensor, position: int, heads: int, backend: str | None = None
) -> torch.Tensor:
    """Self-attention of one new token per sequence: ``qkv`` (B, 1, 3d) holds its query, key and value;
    the key and value are written at ``position`` of ``cache`` (B, 2, H, T, d / H: keys, then values; it is
    modified) and the query attends over positions 0..position. Returns (B, 1, d), heads merged."""
    op = "cached_self_attention"
    if qkv.dim() != 3 or qkv.shape[1] != 1 or qkv.shape[2] % 3:
        raise ValueError(f"{op}: qkv must be (B, 1, 3d), got {tuple(qkv.shape)}")
    position, heads = require_int(op, "position", position), require_int(op, "heads", heads)
    batch, width = qkv.shape[0], qkv.shape[2] // 3
    if heads < 1 or width % heads:
        raise ValueError(f"{op}: width {width} is not divisible into {heads} heads")
    if cache.dim() != 5 or cache.shape[:3] != (batch, 2, heads) or cache.shape[4] != width // heads:
        raise ValueError(
            f"{op}: cache must be (B, 2, H, T, Dh) = ({batch}, 2, {heads}, T, {width // heads}), "
            f"got {tuple(cache.shape)}"
        )
    if not 0 <= position < cache.shape[3]:
        raise ValueError(f"{op}: position {position} is outside the cache's {cache.shape[3]} positions")
    if not cache.is_contiguous():
        raise ValueError(f"{op}: cache must be contiguous")
    same_device_and_dtype(op, {"qkv": qkv, "cache": cache})
    _check_no_grad(op, {"qkv": qkv, "cache": cache})
    if select_backend(op, backend, BACKENDS, qkv) == "torch":
        cache[:, :, :, position] = qkv.view(batch, 3, heads, width // heads)[:, 1:]
        keys, values = cache[:, 0, :, : position + 1], cache[:, 1, :, : position + 1]
        return merge_heads(F.scaled_dot_product_attention(split_heads(qkv[..., :width], heads), keys, values))
    from famevil_fast.kernels import launch

    return launch.decode_self_attention(
        qkv.reshape(batch, 3 * width).contiguous(), cache, position, heads
    ).view(batch, 1, width)


def cross_attention_query(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    context_kv: tuple[torch.Tensor, torch.Tensor],
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention of ``LN(x) W_q^T + b_q`` over precomputed keys and values: x (B, L, d), W_q
    (d, d), keys and values (B, H, Lc, d / H) as ``context_key_values`` returns them, Lc >= 1. Returns
    (B, L, d), heads merged: the cross-attention adapter's input to its bottleneck adapter."""
    op = "cross_attention_query"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, L, d), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    _check_layer_norm(op, ln_weight, ln_bias, d)
    _check_linear(op, x, q_weight, q_bias)
    if q_weight.shape[0] != d:
        raise ValueError(f"{op}: q_weight must be ({d}, {d}), got {tuple(q_weight.shape)}")
    if not isinstance(context_kv, (tuple, list)) or len(context_kv) != 2:
        raise ValueError(f"{op}: context_kv must be a (keys, values) pair")
    heads = context_kv[0].shape[1] if context_kv[0].dim() == 4 else 0
    if heads < 1 or d % heads:
        raise ValueError(
            f"{op}: keys of shape {tuple(context_kv[0].shape)} do not split width {d} into heads"
        )
    check_context_kv(op, x, context_kv, heads)
    keys, values = context_kv
    if keys.shape[2] == 0:
        raise ValueError(f"{op}: the context has no positions to attend")
    named = {"x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "q_weight": q_weight, "q_bias": q_bias}
    same_device_and_dtype(op, named)
    _check_no_grad(op, {**named, "keys": keys, "values": values})
    if select_backend(op, backend, BACKENDS, x) == "torch":
        q = layer_norm_linear_reference(x, ln_weight, ln_bias, q_weight, q_bias, eps)
        return merge_heads(F.scaled_dot_product_attention(split_heads(q, heads), keys, values))
    from famevil_fast.kernels import launch

    keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (keys, values))
    params = (t.contiguous() for t in (ln_weight, ln_bias, q_weight, q_bias))
    rows = x.reshape(-1, d).contiguous()
    out = launch.decode_cross_attention(rows, x.shape[1], *params, keys, values, eps)
    return out.view(x.shape)


def adapter_with_linear(
    x: torch.Tensor,
    params: AdapterParams,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | list[torch.Tensor] | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum(residual) + hidden W^T + b + scale * up(relu(down(layer_norm(x))))`` for x (..., d), one
    adapter's ``params`` (shapes as ``fused_adapter`` takes them), hidden (..., k) with x's leading shape, W
    (d, k), b (d,). In a decoding step: the task adapter adding the MLP's second layer, ``a`` and the
    cross-attention output, so that the second layer needs no launch of its own."""
    op = "adapter_with_linear"
    params = AdapterParams(*params)
    params = params._replace(scale=_scale_as_tensor(params.scale, params.ln_weight, per_task=False))
    check_adapter_args(x, params, None)
    residuals = residual_list(residual)
    check_residuals(x, residuals)
    _check_linear(op, hidden, weight, bias)
    if hidden.shape[:-1] != x.shape[:-1] or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: the linear branch maps {tuple(hidden.shape)} to width {weight.shape[0]}, "
            f"but x is {tuple(x.shape)}"
        )
    same_device_and_dtype(op, {"x": x, "hidden": hidden, "weight": weight, "bias": bias})
    _check_no_grad(op, {"x": x, "hidden": hidden, "weight": weight, "bias": bias, **params._asdict()})
    if select_backend(op, backend, BACKENDS, x) == "torch":
        return adapter_reference(x, params, [*residuals, F.linear(hidden, weight, bias)], eps=eps)
    from famevil_fast.kernels import launch

    d = x.shape[-1]
    rows = x.reshape(-1, d).contiguous()
    res = [t.reshape(-1, d).contiguous() for t in residuals]
    linear = (hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(), bias.contiguous())
    ps = tuple(p.contiguous() for p in params)
    y = launch.adapter_output(rows, ps, res, launch.SINGLE_TASK, eps, linear)
    return y.view(x.shape)


def _check_pick_args(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    done: torch.Tensor,
    column: int,
    shortlist: torch.Tensor | None,
) -> None:
    op = "greedy_pick"
    require_int(op, "column", column)
    if logits.dim() != 2 or logits.shape[1] == 0 or not logits.is_floating_point():
        raise ValueError(
            f"{op}: logits must be a floating (B, V) tensor with V >= 1, got "
            f"{tuple(logits.shape)} {logits.dtype}"
        )
    batch = logits.shape[0]
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[0] != batch:
        raise ValueError(
            f"{op}: tokens must be int64 (B, W) with B = {batch}, got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if not 0 <= column < tokens.shape[1]:
        raise ValueError(f"{op}: column {column} is outside the {tokens.shape[1]} columns of tokens")
    if done.dtype != torch.bool or done.shape != (batch,):
        raise ValueError(f"{op}: done must be bool ({batch},), got {tuple(done.shape)} {done.dtype}")
    if shortlist is not None and (shortlist.dtype != torch.int64 or shortlist.shape != (logits.shape[1],)):
        raise ValueError(
            f"{op}: shortlist must be int64 ({logits.shape[1]},): one token id per logit, got "
            f"{tuple(shortlist.shape)} {shortlist.dtype}"
        )
    for name, t in (("tokens", tokens), ("done", done)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is written in place)")
    named = {"logits": logits, "tokens": tokens, "done": done, "shortlist": shortlist}
    for name, t in named.items():
        if t is not None and t.device != logits.device:
            raise ValueError(f"{op}: {name} is on {t.device} but logits is on {logits.device}")


def _check_embedding(
    token_embed: torch.Tensor,
    pos_embed: torch.Tensor,
    position: int,
    end_token: int,
    like: torch.Tensor,
    shortlist: torch.Tensor | None,
    check_values: bool,
) -> None:
    op = "greedy_pick"
    if token_embed.dim() != 2 or pos_embed.dim() != 2 or token_embed.shape[1] != pos_embed.shape[1]:
        raise ValueError(
            f"{op}: token_embed (V, width) and pos_embed (T, width) disagree: "
            f"{tuple(token_embed.shape)} and {tuple(pos_embed.shape)}"
        )
    if not 0 <= position < pos_embed.shape[0]:
        raise ValueError(f"{op}: position {position} is outside the {pos_embed.shape[0]} positions")
    same_device_and_dtype(op, {"token_embed": token_embed, "pos_embed": pos_embed})
    if token_embed.device != like.device:
        raise ValueError(f"{op}: token_embed is on {token_embed.device} but logits is on {like.device}")
    _check_no_grad(op, {"token_embed": token_embed, "pos_embed": pos_embed})
    vocab = token_embed.shape[0]
    if not 0 <= end_token < vocab:
        raise ValueError(f"{op}: end token {end_token} is outside the {vocab} token embeddings")
    if shortlist is None:
        if like.shape[1] > vocab:
            raise ValueError(f"{op}: {like.shape[1]} logits but only {vocab} token embeddings")
    elif check_values and shortlist.numel() and host_reads_allowed():
        low, high = int(shortlist.min()), int(shortlist.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"{op}: shortlist ids lie in [{low}, {high}], outside the {vocab} embeddings")


def greedy_pick(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    done: torch.Tensor,
    column: int,
    end_token: int,
    shortlist: torch.Tensor | None = None,
    embedding: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> torch.Tensor | None:
    """One greedy decoding step's choice, in place: ``tokens[:, column]`` (int64, (B, W)) receives each
    row's token, the id of its largest logit (``shortlist[index]`` when the logits cover a shortlist;
    ties and NaNs resolve as ``torch.argmax``), or ``end_token`` where ``done`` (bool, (B,)) is set; then
    ``done |= token == end_token``. With ``embedding = (token_embed (V, width), pos_embed (T, width),
    position)`` it returns the next step's input ``token_embed[token] + pos_embed[position]`` (B, width),
    else None. ``check_values=False`` skips the range check of the shortlist's ids (a read-back), for
    callers that made it once."""
    _check_pick_args(logits, tokens, done, column, shortlist)
    column, end_token = int(column), require_int("greedy_pick", "end_token", end_token)
    if embedding is not None:
        if not isinstance(embedding, (tuple, list)) or len(embedding) != 3:
            raise ValueError("greedy_pick: embedding must be (token_embed, pos_embed, position)")
        embedding = (*embedding[:2], require_int("greedy_pick", "embedding position", embedding[2]))
        _check_embedding(*embedding, end_token, logits, shortlist, check_values)
    if select_backend("greedy_pick", backend, BACKENDS, logits) == "torch":
        index = logits.argmax(dim=-1)
        token = index if shortlist is None else shortlist[index]
        token = torch.where(done, torch.full_like(token, end_token), token)
        tokens[:, column] = token
        done |= token == end_token
        if embedding is None:
            return None
        token_embed, pos_embed, position = embedding
        return token_embed[token] + pos_embed[position]
    from famevil_fast.kernels import launch

    if embedding is not None:
        token_embed, pos_embed, position = embedding
        embedding = (token_embed.contiguous(), pos_embed.contiguous(), position)
    shortlist = None if shortlist is None else shortlist.contiguous()
    return launch.greedy_pick(logits.contiguous(), shortlist, tokens, done, column, end_token, embedding)
