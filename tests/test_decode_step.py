"""The fused one-token decoding step: its two inference ops (Triton, under the interpreter on the CPU, against
the PyTorch reference), the layer against the plain decoder's, the tokens against re-encoding, and the
number of kernels a step launches."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import AtenLog, RecordLaunch, perturb_

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.decode_step import fused_step_applies
from famevil_fast.model.generation import (
    EOT_ID,
    SOT_ID,
    TextDecoder,
    generate,
    generate_by_reencoding,
    greedy_decode,
)
from famevil_fast.ops.adapter import AdapterParams
from famevil_fast.ops.cross_attention import CrossAttentionParams, context_key_values
from famevil_fast.ops.decoding import (
    adapter_with_linear,
    cached_self_attention,
    cross_attention_query,
    greedy_pick,
    layer_norm_linear_act,
    linear_residual,
)

pytest.importorskip("triton")


def _ln_params(d: int, n: int) -> tuple[torch.Tensor, ...]:
    return 1 + 0.2 * torch.randn(d), 0.2 * torch.randn(d), torch.randn(n, d) / d**0.5, torch.randn(n)


@pytest.mark.parametrize("activation", [None, "relu", "quick_gelu", "gelu"])
@pytest.mark.parametrize(("shape", "n"), [((1, 40), 70), ((3, 1, 96), 200), ((0, 40), 7), ((7, 2, 24), 1)])
def test_layer_norm_linear_act_matches_reference(
    shape: tuple[int, ...], n: int, activation: str | None
) -> None:
    x = torch.randn(*shape) * 1.5 + 0.3
    params = _ln_params(shape[-1], n)
    with torch.no_grad():
        got = layer_norm_linear_act(x, *params, activation, 1e-5, backend="triton")
    want = layer_norm_linear_act(x.double(), *(p.double() for p in params), activation, 1e-5, backend="torch")
    assert got.shape == (*shape[:-1], n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "k", "d"), [(1, 24, 33), (9, 130, 64), (0, 8, 8)])
def test_linear_residual_matches_reference(rows: int, k: int, d: int) -> None:
    x, w, b, res = (
        torch.randn(rows, 1, k),
        torch.randn(d, k) / k**0.5,
        torch.randn(d),
        torch.randn(rows, 1, d),
    )
    with torch.no_grad():
        got = linear_residual(x, w, b, res, backend="triton")
    want = res.double() + F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "position"), [(1, 2, 24, 0), (3, 2, 24, 5), (2, 4, 16, 7)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_self_attention_matches_reference(
    batch: int, heads: int, head_dim: int, position: int, dtype: torch.dtype
) -> None:
    """The new token's key and value land at ``position`` of the cache and the output is the attention
    over positions 0..position, as the PyTorch reference computes them (first position, a middle one, the
    last one of an 8-position cache; a head width that is not a power of two)."""
    width = heads * head_dim
    qkv = torch.randn(batch, 1, 3 * width).to(dtype)
    filled = torch.randn(batch, 2, heads, 8, head_dim).to(dtype)
    caches = {name: filled.clone() for name in ("torch", "triton")}
    with torch.no_grad():
        out = {
            name: cached_self_attention(qkv, caches[name], position, heads, backend=name) for name in caches
        }
    assert torch.equal(caches["triton"], caches["torch"])  # the same positions written, the rest kept
    assert out["triton"].shape == (batch, 1, width) and out["triton"].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out["triton"].float(), out["torch"].float(), rtol=tol, atol=tol)


def test_cached_self_attention_bad_arguments() -> None:
    qkv, cache = torch.randn(2, 1, 48), torch.randn(2, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="outside the cache's 4 positions"):
        cached_self_attention(qkv, cache, 4, 2)
    with pytest.raises(ValueError, match="cache must be"):
        cached_self_attention(qkv, cache, 0, 4)
    with pytest.raises(ValueError, match=r"qkv must be \(B, 1, 3d\)"):
        cached_self_attention(qkv[:, :, :47], cache, 0, 2)


def test_bad_arguments_raise_value_error() -> None:
    x = torch.randn(2, 16)
    ln_w, ln_b, w, b = _ln_params(16, 8)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        layer_norm_linear_act(x, ln_w, ln_b, w, b, "tanh")
    with pytest.raises(ValueError, match="does not take inputs of width 16"):
        layer_norm_linear_act(x, ln_w, ln_b, w.t(), b)
    with pytest.raises(ValueError, match="LayerNorm parameters"):
        layer_norm_linear_act(x, ln_w[:8], ln_b, w, b)
    with pytest.raises(ValueError, match="bias has dtype torch.float64"):
        layer_norm_linear_act(x, ln_w, ln_b, w, b.double(), backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        layer_norm_linear_act(x.requires_grad_(), ln_w, ln_b, w, b, backend="triton")
    with pytest.raises(ValueError, match="residual of shape"):
        linear_residual(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), torch.randn(2, 15))
    with pytest.raises(ValueError, match="unknown backend"):
        linear_residual(
            torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), torch.randn(2, 16), backend="cuda"
        )


def test_integer_arguments_must_be_python_ints() -> None:
    """A tensor, float or bool where an int belongs is refused on both backends, before any kernel."""
    qkv, cache = torch.randn(2, 1, 48), torch.randn(2, 2, 2, 4, 8)
    logits, tokens, done = torch.randn(2, 6), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=bool)
    tables = (torch.randn(EOT_ID + 1, 8), torch.randn(5, 8))
    for backend in ("torch", "triton"):
        for position in (torch.tensor(2), True, 2.0):
            with pytest.raises(TypeError, match="position must be a Python int"):
                cached_self_attention(qkv, cache, position, 2, backend=backend)
        with pytest.raises(TypeError, match="heads must be a Python int"):
            cached_self_attention(qkv, cache, 1, 2.0, backend=backend)
        with pytest.raises(TypeError, match="column must be a Python int"):
            greedy_pick(logits, tokens, done, 2.0, EOT_ID, backend=backend)
        with pytest.raises(TypeError, match="end_token must be a Python int"):
            greedy_pick(logits, tokens, done, 1, torch.tensor(EOT_ID), backend=backend)
        with pytest.raises(TypeError, match="embedding position must be a Python int"):
            greedy_pick(
                logits, tokens, done, 1, EOT_ID, embedding=(*tables, torch.tensor(3)), backend=backend
            )
    import numpy as np

    with torch.no_grad():  # integer scalars other than bool are ints
        cached_self_attention(qkv, cache, np.int64(1), 2, backend="torch")


def test_integer_tensors_are_refused() -> None:
    long = torch.ones(2, 16, dtype=torch.long)
    ln_w, ln_b, w, b = (t.long() for t in _ln_params(16, 8))
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
            linear_residual(long, w, b, long[:, :8], backend=backend)
        with pytest.raises(ValueError, match="floating-point"):
            layer_norm_linear_act(long, ln_w, ln_b, w, b, backend=backend)
        with pytest.raises(ValueError, match="floating-point"):
            cached_self_attention(
                torch.ones(2, 1, 48, dtype=torch.long),
                torch.ones(2, 2, 2, 4, 8, dtype=torch.long),
                0,
                2,
                backend=backend,
            )


@pytest.mark.parametrize("activation", ["relu", "quick_gelu"])
def test_non_finite_rows_stay_non_finite(activation: str) -> None:
    x = torch.randn(3, 16)
    x[1, 0] = float("nan")
    params = _ln_params(16, 8)
    hidden, weight, bias = torch.randn(3, 10), torch.randn(16, 10), torch.randn(16)
    adapter = _adapter_params(16, 4)
    with torch.no_grad():
        for backend in ("torch", "triton"):
            out = layer_norm_linear_act(x, *params, activation, backend=backend)
            assert out.isnan().any(1).tolist() == [False, True, False], backend
            out = adapter_with_linear(x, adapter, hidden, weight, bias, backend=backend)
            assert out.isnan().any(1).tolist() == [False, True, False], backend


def _query_side(d: int, heads: int, batch: int, length: int, dtype=torch.float32):
    """(LayerNorm and query parameters, context keys and values) of a cross-attention adapter, the keys and
    values as ``context_key_values`` returns them (strided views of one projection)."""
    c = 24
    attn = CrossAttentionParams(
        1 + 0.2 * torch.randn(d),
        0.2 * torch.randn(d),
        1 + 0.1 * torch.randn(c),
        0.1 * torch.randn(c),
        torch.randn(d, d) / d**0.5,
        torch.randn(d),
        torch.randn(2 * d, c) / c**0.5,
        torch.randn(2 * d),
    )
    attn = CrossAttentionParams(*(t.to(dtype) for t in attn))
    kv = context_key_values(torch.randn(batch, length, c).to(dtype), attn, heads, backend="torch")
    return (attn.q_ln_weight, attn.q_ln_bias, attn.q_weight, attn.q_bias), kv


@pytest.mark.parametrize(
    ("batch", "rows", "d", "heads", "length"),
    [(3, 1, 96, 4, 17), (1, 2, 40, 5, 3), (2, 1, 520, 8, 197), (1, 1, 40, 5, 1), (0, 1, 32, 2, 5)],
)
def test_cross_attention_query_matches_reference(
    batch: int, rows: int, d: int, heads: int, length: int
) -> None:
    """Against float64: several rows a batch entry (with contiguous keys beside the strided values), a
    single context position, a width of several chunks with a partial one and a ViT-B/16 memory's 197
    positions, no rows."""
    torch.manual_seed(batch + d)
    params, kv = _query_side(d, heads, batch, length)
    if rows == 2:  # keys and values of different strides
        kv = (kv[0].contiguous(), kv[1])
    x = torch.randn(batch, rows, d) * 1.5 + 0.3
    with torch.no_grad():
        got = cross_attention_query(x, *params, kv, backend="triton")
    want = cross_attention_query(
        x.double(), *(p.double() for p in params), tuple(t.double() for t in kv), backend="torch"
    )
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_cross_attention_query_in_bfloat16() -> None:
    params, kv = _query_side(64, 4, 3, 30, torch.bfloat16)
    x = torch.randn(3, 1, 64).bfloat16()
    want = cross_attention_query(
        x.double(), *(p.double() for p in params), tuple(t.double() for t in kv), backend="torch"
    )
    with torch.no_grad():
        got = cross_attention_query(x, *params, kv, backend="triton")
        torch_bf16 = cross_attention_query(x, *params, kv, backend="torch")
    assert got.dtype == torch.bfloat16
    error = (got.double() - want).norm() / want.norm()
    assert error <= 2 * (torch_bf16.double() - want).norm() / want.norm() + 1e-3


def test_cross_attention_query_rejects_bad_input() -> None:
    params, kv = _query_side(32, 4, 2, 5)
    x = torch.randn(2, 1, 32)
    with pytest.raises(ValueError, match="must be \\(B, L, d\\)"):
        cross_attention_query(x[0], *params, kv, backend="triton")
    with pytest.raises(ValueError, match="do not match width"):
        cross_attention_query(x, params[0][:31], *params[1:], kv, backend="triton")
    with pytest.raises(ValueError, match="q_weight must be"):
        cross_attention_query(x, *params[:2], torch.randn(16, 32), torch.randn(16), kv, backend="triton")
    with pytest.raises(ValueError, match="context keys must be"):
        cross_attention_query(x, *params, (kv[0][:1], kv[1][:1]), backend="triton")
    with pytest.raises(ValueError, match="no positions"):
        cross_attention_query(x, *params, (kv[0][:, :, :0], kv[1][:, :, :0]), backend="triton")
    with pytest.raises(ValueError, match="pair"):
        cross_attention_query(x, *params, kv[:1], backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        cross_attention_query(x, params[0].double(), *params[1:], kv, backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        cross_attention_query(x.requires_grad_(), *params, kv, backend="triton")


def _adapter_params(d: int, r: int) -> AdapterParams:
    return AdapterParams(
        1 + 0.2 * torch.randn(d),
        0.2 * torch.randn(d),
        torch.randn(r, d) / d**0.5,
        0.1 * torch.randn(r),
        torch.randn(d, r) / r**0.5,
        0.1 * torch.randn(d),
        torch.tensor([0.7]),
    )


@pytest.mark.parametrize(
    ("shape", "k", "r", "n_residuals"),
    [
        ((1, 1, 520), 600, 8, 2),  # one row; several column tiles, the last partial; two chunks of k
        ((7, 1, 96), 40, 100, 3),  # a step's few rows; r not a power of two; three residual terms
        ((300, 64), 70, 16, 0),  # more rows than a decoding step: 64-row blocks
        ((5, 48), 24, 160, 1),  # a bottleneck too wide to keep on chip: the branch is added as a term
        ((0, 32), 8, 8, 1),  # no rows
    ],
)
def test_adapter_with_linear_matches_reference(
    shape: tuple[int, ...], k: int, r: int, n_residuals: int
) -> None:
    d = shape[-1]
    x = torch.randn(*shape) * 1.5 + 0.3
    hidden = torch.randn(*shape[:-1], k)
    weight, bias = torch.randn(d, k) / k**0.5, torch.randn(d)
    residual = [torch.randn(*shape) for _ in range(n_residuals)]
    params = _adapter_params(d, r)
    with torch.no_grad():
        got = adapter_with_linear(x, params, hidden, weight, bias, residual, backend="triton")
    want = adapter_with_linear(
        x.double(),
        AdapterParams(*(p.double() for p in params)),
        hidden.double(),
        weight.double(),
        bias.double(),
        [t.double() for t in residual],
        backend="torch",
    )
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_adapter_with_linear_without_spread_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``configs.ADAPTER_FEW_ROWS_COLUMNS`` off the branch is one more residual term of the fused
    kernel: the same values, and that kernel launched."""
    from famevil_fast.kernels import configs, launch

    x, hidden, params = torch.randn(6, 1, 96), torch.randn(6, 1, 40), _adapter_params(96, 24)
    weight, bias, residual = torch.randn(96, 40) / 40**0.5, torch.randn(96), [torch.randn(6, 1, 96)]
    with torch.no_grad():
        spread = adapter_with_linear(x, params, hidden, weight, bias, residual, backend="triton")
        monkeypatch.setattr(configs, "ADAPTER_FEW_ROWS_COLUMNS", False)
        fused = adapter_with_linear(x, params, hidden, weight, bias, residual, backend="triton")
        torch.testing.assert_close(fused, spread, rtol=1e-5, atol=1e-5)
        launches = RecordLaunch.patch(monkeypatch, launch)
        adapter_with_linear(x, params, hidden, weight, bias, residual, backend="triton")
    assert launches == ["adapter_fwd_fused_kernel"]


def test_adapter_with_linear_in_bfloat16() -> None:
    """bf16 storage, float32 accumulation: within twice the error of PyTorch's own bf16 computation."""
    x, hidden = torch.randn(9, 256), torch.randn(9, 512)
    weight, bias, params = torch.randn(256, 512) / 512**0.5, torch.randn(256), _adapter_params(256, 64)
    residual = [torch.randn(9, 256)]
    want = adapter_with_linear(
        x.double(), AdapterParams(*(p.double() for p in params)), hidden.double(), weight.double(),
        bias.double(), [residual[0].double()], backend="torch",
    )  # fmt: skip
    bf = [t.bfloat16() for t in (x, hidden, weight, bias, residual[0])]
    bf_params = AdapterParams(*(p.bfloat16() for p in params))
    with torch.no_grad():
        got = adapter_with_linear(bf[0], bf_params, bf[1], bf[2], bf[3], [bf[4]], backend="triton")
        torch_bf16 = adapter_with_linear(bf[0], bf_params, bf[1], bf[2], bf[3], [bf[4]], backend="torch")
    assert got.dtype == torch.bfloat16
    error = (got.double() - want).norm() / want.norm()
    assert error <= 2 * (torch_bf16.double() - want).norm() / want.norm() + 1e-3


def test_adapter_with_linear_rejects_bad_input() -> None:
    x, hidden, params = torch.randn(3, 16), torch.randn(3, 8), _adapter_params(16, 4)
    weight, bias = torch.randn(16, 8), torch.randn(16)
    with pytest.raises(ValueError, match="maps"):
        adapter_with_linear(x, params, torch.randn(2, 8), weight, bias, backend="triton")
    with pytest.raises(ValueError, match="does not take inputs of width 9"):
        adapter_with_linear(x, params, torch.randn(3, 9), weight, bias, backend="triton")
    with pytest.raises(ValueError, match="maps"):
        adapter_with_linear(x, params, hidden, torch.randn(15, 8), torch.randn(15), backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        adapter_with_linear(x, params, hidden.double(), weight, bias, backend="triton")
    with pytest.raises(ValueError, match="down_weight has shape"):
        adapter_with_linear(x, params._replace(down_weight=torch.randn(4, 15)), hidden, weight, bias)
    with pytest.raises(ValueError, match="residual\\[0\\] has shape"):
        adapter_with_linear(x, params, hidden, weight, bias, [torch.randn(3, 15)], backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        adapter_with_linear(x, params, hidden, weight.requires_grad_(), bias, backend="triton")


def _pick_logits(batch: int, n_logits: int) -> torch.Tensor:
    """Random logits with the rows argmax must resolve by its rules: all -inf, a tie between the first
    and a later index, and NaNs (the first NaN wins)."""
    logits = torch.randn(batch, n_logits)
    if batch >= 4 and n_logits >= 3:
        logits[1] = float("-inf")
        logits[2, [1, n_logits - 1]] = 50.0
        logits[3, [n_logits - 1, 2]] = float("nan")
    return logits


@pytest.mark.parametrize("embed_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shortlist", [False, True])
@pytest.mark.parametrize(("batch", "n_logits"), [(1, 1), (5, 4099), (6, 37), (0, 9)])
def test_greedy_pick_matches_reference(
    batch: int, n_logits: int, shortlist: bool, embed_dtype: torch.dtype
) -> None:
    """The token written, the finished flags and the next input, against the PyTorch bookkeeping; finished
    rows keep the end token; every other column of the output is left alone."""
    torch.manual_seed(batch + n_logits)
    vocab, width, positions = 5000, 40, 9
    end = vocab - 1
    logits = _pick_logits(batch, n_logits)
    ids = torch.randint(0, vocab, (n_logits,)) if shortlist else None
    tables = (torch.randn(vocab, width).to(embed_dtype), torch.randn(positions, width).to(embed_dtype))
    tokens = torch.randint(0, vocab, (batch, 5))
    done = torch.rand(batch) < 0.3
    for embedding in (None, (*tables, positions - 1)):
        results = []
        for backend in ("torch", "triton"):
            out, flags = tokens.clone(), done.clone()
            nxt = greedy_pick(logits, out, flags, 3, end, ids, embedding, backend=backend)
            results.append((out, flags, nxt))
        (want_out, want_done, want_next), (out, flags, nxt) = results
        assert torch.equal(out, want_out) and torch.equal(flags, want_done)
        assert torch.equal(out[:, [0, 1, 2, 4]], tokens[:, [0, 1, 2, 4]])
        assert (out[done, 3] == end).all()
        if embedding is None:
            assert nxt is None and want_next is None
        elif embed_dtype == torch.float32:
            assert nxt.dtype == embed_dtype and torch.equal(nxt, want_next)
        else:  # the interpreter rounds float32 to bf16 towards zero, PyTorch to nearest: one ulp apart
            assert nxt.dtype == embed_dtype
            torch.testing.assert_close(nxt.float(), want_next.float(), rtol=2**-7, atol=0)


def test_greedy_pick_rejects_bad_input() -> None:
    logits, tokens, done = torch.randn(2, 6), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=bool)
    tables = (torch.randn(EOT_ID + 1, 8), torch.randn(5, 8))
    cases = [
        ((torch.randn(2, 0), tokens, done, 1, EOT_ID), {}, "V >= 1"),
        ((logits, tokens.int(), done, 1, EOT_ID), {}, "tokens must be int64"),
        ((logits, tokens, done, 4, EOT_ID), {}, "column 4 is outside"),
        ((logits, tokens, done.int(), 1, EOT_ID), {}, "done must be bool"),
        ((logits, tokens, done, 1, EOT_ID), {"shortlist": torch.arange(5)}, "one token id per logit"),
        (
            (logits, tokens, done, 1, EOT_ID),
            {"shortlist": torch.arange(6) + EOT_ID - 2, "embedding": (*tables, 1)},
            r"shortlist ids lie in \[49405, 49410\]",
        ),
        ((logits, tokens, done, 1, EOT_ID), {"embedding": (*tables, 5)}, "position 5 is outside"),
        ((logits, tokens, done, 1, EOT_ID), {"embedding": (tables[0], torch.randn(5, 7), 1)}, "disagree"),
        ((logits, tokens, done, 1, EOT_ID), {"embedding": (tables[0], tables[1].double(), 1)}, "dtype"),
        (
            (logits, tokens, done, 1, 3),
            {"embedding": (torch.randn(4, 8), tables[1], 1)},
            "6 logits but only 4 token embeddings",
        ),
        ((logits, tokens, done, 1, -1), {"embedding": (*tables, 1)}, "end token -1 is outside"),
        ((logits, tokens.t(), done, 1, EOT_ID), {}, "B = 2"),
        ((logits, tokens[:, ::2], done, 1, EOT_ID), {}, "must be contiguous"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            greedy_pick(*args, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="inference-only"):
        greedy_pick(logits, tokens, done, 1, EOT_ID, embedding=(tables[0].requires_grad_(), tables[1], 1))


@pytest.fixture(scope="module")
def model() -> FameViL:
    torch.manual_seed(0)
    m = perturb_(
        FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")), std=0.05
    )
    return m.eval()


def test_fused_layers_follow_the_plain_step(model) -> None:
    """Four steps of the fused decoder give the plain decoder's logits (float32 rounding apart)."""
    pixels = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(0, 1000, (4, 3))
    tokens[0] = SOT_ID
    with torch.no_grad():
        memory = model.vision_memory(pixels, "cap")
        fused = TextDecoder(model, memory, 8, fused=True)
        plain = TextDecoder(model, memory, 8, fused=False)
        for t in range(4):
            torch.testing.assert_close(fused.step(tokens[t]), plain.step(tokens[t]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["shortlist", "gelu"])
def test_fused_layers_follow_the_plain_step_in_other_model_forms(variant: str) -> None:
    """A caption shortlist (the fused head gathers its rows once per decode) and an MLP with GELU instead
    of QuickGELU."""
    torch.manual_seed(1)
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")
    if variant == "shortlist":
        config = config.replace(caption_vocab=(5, 17, 260, 1000, 49406, 49407))
    else:
        config = config.replace(clip=dataclasses.replace(config.clip, activation="gelu"))
    m = perturb_(FameViL(config), std=0.05).eval()
    tokens = torch.tensor([[SOT_ID, SOT_ID], [17, 260], [1000, 5]])
    with torch.no_grad():
        memory = m.vision_memory(torch.randn(2, 3, 32, 32), "cap")
        fused = TextDecoder(m, memory, 4, fused=True)
        plain = TextDecoder(m, memory, 4, fused=False)
        for t in range(3):
            torch.testing.assert_close(fused.step(tokens[t]), plain.step(tokens[t]), rtol=1e-4, atol=1e-4)


def fused_tokens_and_reference(model: FameViL, pixels: torch.Tensor, **options) -> tuple[torch.Tensor, ...]:
    """Tokens of ``generate`` with the fused step (the model's backend set to Triton), and of re-encoding
    with the plain PyTorch model."""
    reference = generate_by_reencoding(model, pixels, max_len=6, num_beams=options.get("num_beams", 1))
    model.set_runtime(backend="triton")
    try:
        assert fused_step_applies(model, "cap", pixels)
        with torch.no_grad():
            tokens = generate(model, pixels, max_len=6, **options)
    finally:
        model.set_runtime(backend=None)
    return tokens, reference


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}, {"cuda_graph": True}])
def test_fused_decoding_gives_the_tokens_of_reencoding(model, options: dict) -> None:
    """Greedy, beam search (caches reordered) and the capture-safe loop of graphed decoding (simulated
    capture on the CPU: no read-back, no host-made tensor inside the step)."""
    tokens, reference = fused_tokens_and_reference(model, torch.randn(2, 3, 32, 32), **options)
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("options", [{"no_repeat_ngram": 2}, {"no_repeat_ngram": 2, "cuda_graph": True}])
def test_fused_greedy_decoding_with_a_shortlist_gives_the_tokens_of_reencoding(options: dict) -> None:
    """The one-kernel greedy choice maps shortlist indices back to token ids and sees the n-gram bans."""
    torch.manual_seed(2)
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")
    config = config.replace(caption_vocab=(5, 17, 260, 1000, 2000, 3000, 49406, 49407))
    m = perturb_(FameViL(config), std=0.5).eval()
    pixels = torch.randn(4, 3, 32, 32)
    reference = generate_by_reencoding(m, pixels, max_len=6, no_repeat_ngram=2)
    tokens, _ = fused_tokens_and_reference(m, pixels, **options)
    assert torch.equal(tokens, reference)
    assert len(set(tokens[:, 1:].flatten().tolist())) > 2  # the choice varies: not a constant caption


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_gpu_fused_decoding_gives_the_tokens_of_reencoding(model, cuda_graph: bool) -> None:
    gpu_model = copy.deepcopy(model).cuda()
    pixels = torch.randn(6, 3, 32, 32, device="cuda")
    tokens, reference = fused_tokens_and_reference(gpu_model, pixels, cuda_graph=cuda_graph)
    assert torch.equal(tokens, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decoding_ops_follow_their_references(dtype: torch.dtype) -> None:
    """The compiled kernels of the step (ViT-B/16's text widths, 24 rows) against the PyTorch references on
    the same card: float32 to rounding, bf16 within a few of its units; the greedy choice exactly, its
    next input embedding to the storage's rounding."""
    torch.manual_seed(0)
    rows, d, hidden_width, heads, r = 24, 512, 2048, 8, 64
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}

    def both(fn, *args, **kwargs):
        with torch.no_grad():
            return fn(*args, backend="triton", **kwargs), fn(*args, backend="torch", **kwargs)

    def cuda(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to("cuda", dtype) for t in tensors]

    x, hidden = cuda(torch.randn(rows, 1, d), torch.randn(rows, 1, hidden_width))
    ln = cuda(1 + 0.2 * torch.randn(d), 0.2 * torch.randn(d))
    qkv_w, qkv_b = cuda(torch.randn(3 * d, d) / d**0.5, torch.randn(3 * d))
    got, want = both(layer_norm_linear_act, x, *ln, qkv_w, qkv_b, "quick_gelu")
    torch.testing.assert_close(got, want, **tol)
    cache = torch.randn(rows, 2, heads, 20, d // heads, device="cuda", dtype=dtype)
    qkv = cuda(torch.randn(rows, 1, 3 * d))[0]
    caches = [cache.clone(), cache.clone()]
    with torch.no_grad():
        got = cached_self_attention(qkv, caches[0], 11, heads, backend="triton")
        want = cached_self_attention(qkv, caches[1], 11, heads, backend="torch")
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(caches[0], caches[1])
    params, kv = _query_side(d, heads, rows, 197)
    params, kv = cuda(*params), tuple(cuda(*kv))
    got, want = both(cross_attention_query, x, *params, kv)
    torch.testing.assert_close(got, want, **tol)
    adapter = AdapterParams(*cuda(*_adapter_params(d, r)))
    fc2_w, fc2_b = cuda(torch.randn(d, hidden_width) / hidden_width**0.5, torch.randn(d))
    got, want = both(adapter_with_linear, x, adapter, hidden, fc2_w, fc2_b, [x, x])
    torch.testing.assert_close(got, want, **tol)
    logits = _pick_logits(rows, 4099).cuda()
    tables = cuda(torch.randn(EOT_ID + 1, d), torch.randn(77, d))
    outs = [torch.zeros(rows, 4, dtype=torch.long, device="cuda") for _ in range(2)]
    done = torch.rand(rows, device="cuda") < 0.3
    flags = [done.clone(), done.clone()]
    nexts = [
        greedy_pick(logits, outs[i], flags[i], 2, EOT_ID, None, (*tables, 5), backend=backend)
        for i, backend in enumerate(("triton", "torch"))
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(flags[0], flags[1])
    torch.testing.assert_close(nexts[0], nexts[1], rtol=0 if dtype == torch.float32 else 2**-7, atol=0)


def test_forced_fusion_of_an_unfit_model_is_refused(model) -> None:
    memory = model.vision_memory(torch.randn(2, 3, 32, 32), "cap")
    with pytest.raises(ValueError, match="'unknown' task adapter"):
        TextDecoder(model, memory, 4, task="unknown", fused=True)


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_past_the_cache_is_refused(model, fused: bool) -> None:
    """The fused step's later calls skip the ops' checks; the decoder itself bounds the position."""
    with torch.no_grad():
        decoder = TextDecoder(model, model.vision_memory(torch.randn(2, 3, 32, 32), "cap"), 2, fused=fused)
        start = torch.full((2,), SOT_ID)
        decoder.step(start)
        decoder.step(start)
        with pytest.raises(ValueError, match="holds 2 positions; position 2 is past them"):
            decoder.step(start)


def test_fused_step_needs_the_triton_backend_and_its_block_form(model) -> None:
    like = torch.zeros(1)
    assert not fused_step_applies(model, "cap", like)  # the tests pin automatic choices to PyTorch
    model.set_runtime(backend="triton")
    try:
        assert fused_step_applies(model, "cap", like)
        assert not fused_step_applies(model, "unknown task", like)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_step_applies(model, "cap", like)
        model.set_runtime(backend="cuda")  # names the contrastive losses' kernels: the step chooses itself
        assert not fused_step_applies(model, "cap", like)
    finally:
        model.set_runtime(backend=None)


VIEWS = {
    "view",
    "t",
    "transpose",
    "select",
    "slice",
    "split",
    "unsqueeze",
    "expand",
    "_unsafe_view",
    "detach",
}
ALLOCATIONS = {"empty", "empty_like", "new_empty"}


def test_a_fused_step_launches_seven_kernels_a_layer(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per layer seven Triton kernels (LN + QKV, cache write + self-attention, output projection +
    residual, LN + query + cross-attention, the cross-attention adapter, LN2 + fc1 + activation, the task
    adapter with fc2) and no PyTorch op; per step the embedding, the position and one kernel for the final
    LayerNorm and the head. (The launches are recorded, not run.)"""
    from famevil_fast.kernels import launch

    layers = len(model.text.blocks)
    with torch.no_grad():
        decoder = TextDecoder(model, model.vision_memory(torch.randn(2, 3, 32, 32), "cap"), 4, fused=True)
        start = torch.full((2,), SOT_ID)
        decoder.step(start)  # the first step also makes the kernels' constants
        launches = RecordLaunch.patch(monkeypatch, launch)
        with AtenLog() as log:
            decoder.step(start)
    per_layer = [
        "ln_linear_fwd_kernel",  # LN1 + QKV
        "decode_self_attention_kernel",  # cache write + attention
        "adapter_up_residual_kernel",  # output projection + h
        "decode_cross_attention_kernel",  # XAA: LN + query projection + attention over the memory
        "adapter_fwd_columns_kernel",  # XAA: bottleneck adapter
        "ln_linear_fwd_kernel",  # LN2 + fc1 + QuickGELU
        "adapter_fwd_columns_kernel",  # task adapter + fc2 + a + XAA
    ]
    assert launches == per_layer * layers + ["ln_linear_fwd_kernel"]
    compute = collections.Counter(op for op in log.ops if op not in VIEWS | ALLOCATIONS)
    assert compute == {"embedding": 1, "add": 1}


def test_a_fused_greedy_step_chooses_in_one_kernel(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy decoding with the fused step: one more step adds the layers' kernels, the head, and one kernel
    for the argmax, the output column, the finished flags and the next input embedding, and no PyTorch
    op. (The launches are recorded, not run.)"""
    from famevil_fast.kernels import launch

    layers = len(model.text.blocks)
    memory = model.vision_memory(torch.randn(2, 3, 32, 32), "cap")
    launches = RecordLaunch.patch(monkeypatch, launch)
    counts = {}
    for steps in (2, 3):
        launches.clear()
        with torch.no_grad(), AtenLog() as log:
            decoder = TextDecoder(model, memory, steps + 1, fused=True)
            greedy_decode(decoder, 2, steps, torch.device("cpu"), model, stop_early=False)
        compute = collections.Counter(op for op in log.ops if op not in VIEWS | ALLOCATIONS)
        counts[steps] = (list(launches), compute)
    (launches_2, compute_2), (launches_3, compute_3) = counts[2], counts[3]
    per_step = launches_3[len(launches_2) :]
    assert launches_3[: len(launches_2)] == launches_2 and launches_2 == per_step * 2
    assert per_step[-2:] == ["ln_linear_fwd_kernel", "greedy_pick_kernel"] and len(per_step) == 7 * layers + 2
    assert compute_3 == compute_2
