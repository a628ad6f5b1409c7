"""Blocked similarity scoring between query and gallery embeddings, and top-k search built on it.

Owns the block iteration that every retrieval metric shares: the (Q, G) score matrix ``queries @
gallery.T`` is never materialised; it is produced one (rows, cols) block at a time on the device of the
inputs, so memory is bounded by one block whatever Q and G are. Scores are float32 (float64 for float64
inputs); bfloat16 / float16 inputs are multiplied with float32 accumulation and output, so half-precision
rounding never creates artificial ties.

``blocked_topk`` keeps, per query, the running best k of the blocks seen so far. ``backend="torch"`` is
the plain reference that builds the full score matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from famevil_fast.ops._backend import check_backend, forced_backend

BACKENDS = ("blocked", "torch")
DEFAULT_BLOCK_SIZE = (512, 65536)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BlockSize = int | tuple[int, int]


def resolve_backend(op: str, backend: str | None) -> str:
    """Explicit ``backend`` wins; then ``FAMEVIL_FAST_BACKEND`` when it names one of ours; else "blocked"."""
    check_backend(op, backend, BACKENDS)
    if backend is not None:
        return backend
    forced = forced_backend()
    return forced if forced in BACKENDS else "blocked"


def resolve_block_size(op: str, block_size: BlockSize) -> tuple[int, int]:
    """``block_size`` is (rows, cols) or one int used for both; both must be positive."""
    rows, cols = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if not (isinstance(rows, int) and isinstance(cols, int)) or rows < 1 or cols < 1:
        raise ValueError(
            f"{op}: block_size must be a positive int or a pair of positive ints, got {block_size!r}"
        )
    return rows, cols


def check_embeddings(
    op: str, queries: torch.Tensor, gallery: torch.Tensor, *, allow_empty_queries: bool = True
) -> None:
    """Shapes (Q, D) and (G, D), one device, one supported floating dtype, finite values, G >= 1."""
    for name, t in (("queries", queries), ("gallery", gallery)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (N, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"{op}: embedding sizes differ: queries {tuple(queries.shape)}, gallery {tuple(gallery.shape)}"
        )
    if queries.device != gallery.device:
        raise ValueError(f"{op}: queries are on {queries.device} but gallery is on {gallery.device}")
    if queries.dtype != gallery.dtype:
        raise ValueError(f"{op}: queries are {queries.dtype} but gallery is {gallery.dtype}")
    if gallery.shape[0] == 0:
        raise ValueError(f"{op}: the gallery is empty")
    if queries.shape[0] == 0 and not allow_empty_queries:
        raise ValueError(f"{op}: there are no queries")
    for name, t in (("queries contain", queries), ("gallery contains", gallery)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} NaN or Inf")


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_HALF_MM_FP32_OUT: dict[torch.device, bool] = {}


def block_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(q, g) scores ``queries @ gallery.T`` in float32 (float64 for float64 inputs).

    On CUDA, float16 / bfloat16 inputs use the tensor cores with float32 output (``torch.mm(...,
    out_dtype=torch.float32)``); where a backend lacks that, the blocks are upcast instead.
    """
    half = queries.dtype in (torch.float16, torch.bfloat16)
    if half and queries.device.type == "cuda" and _HALF_MM_FP32_OUT.get(queries.device, True):
        try:
            return torch.mm(queries, gallery.T, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, TypeError):
            _HALF_MM_FP32_OUT[queries.device] = False
    out = score_dtype(queries.dtype)
    return queries.to(out) @ gallery.to(out).T


class FiniteScores:
    """Whether every score block seen so far is finite, with one read-back at ``check()``.

    Finite embeddings can still overflow into NaN / Inf dot products (e.g. components of 1e20), and a NaN
    score compares false with everything, so it would silently count as a hit or a miss. ``add`` costs one
    reduction per block (``torch.aminmax``, which propagates NaN) and keeps the flag on the device, so a
    GPU is not synchronised per block; ``check`` reads the flag back once and raises naming ``op``.
    """

    def __init__(self, op: str) -> None:
        self.op = op
        self.ok: torch.Tensor | None = None

    def add(self, scores: torch.Tensor) -> torch.Tensor:
        """Record ``scores``' finiteness; returns ``scores`` unchanged."""
        if scores.numel():
            low, high = torch.aminmax(scores)
            finite = torch.isfinite(low) & torch.isfinite(high)
            self.ok = finite if self.ok is None else self.ok & finite
        return scores

    def check(self) -> None:
        """Raise ValueError when some block held a NaN or infinite score."""
        if self.ok is not None and not bool(self.ok):
            raise ValueError(
                f"{self.op}: some similarity scores (queries @ gallery.T) are NaN or infinite although the "
                "embeddings are finite (their dot products overflow); normalise the embeddings"
            )


def row_blocks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def score_blocks(
    queries: torch.Tensor, gallery: torch.Tensor, cols: int, finite: FiniteScores | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (c0, c1, scores[:, c0:c1]) over the gallery, one column block at a time (each block recorded
    in ``finite`` when given)."""
    for c0, c1 in row_blocks(gallery.shape[0], cols):
        scores = block_scores(queries, gallery[c0:c1])
        yield c0, c1, finite.add(scores) if finite is not None else scores


def _merge_topk(
    best: tuple[torch.Tensor, torch.Tensor] | None,
    new: tuple[torch.Tensor, torch.Tensor],
    k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if best is None:
        return new
    values = torch.cat([best[0], new[0]], dim=1)
    indices = torch.cat([best[1], new[1]], dim=1)
    values, pos = values.topk(min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
    return values, indices.gather(1, pos)


def _topk_rows(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, cols: int, largest: bool, finite: FiniteScores
) -> tuple[torch.Tensor, torch.Tensor]:
    best = None
    for c0, c1, scores in score_blocks(queries, gallery, cols, finite):
        values, idx = scores.topk(min(k, c1 - c0), dim=1, largest=largest, sorted=True)
        best = _merge_topk(best, (values, idx + c0), k, largest)
        del scores
    return best


@torch.no_grad()
def blocked_topk_reference(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialises the full (Q, G) score matrix, then ``torch.topk`` (non-finite scores raise)."""
    k = min(k, gallery.shape[0])
    finite = FiniteScores("blocked_topk")
    result = finite.add(block_scores(queries, gallery)).topk(k, dim=1, largest=largest, sorted=True)
    finite.check()
    return result


@torch.no_grad()
def blocked_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    *,
    largest: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items of every query by dot-product score, sorted best first.

    queries (Q, D) and gallery (G, D) share a device and a dtype (float16, bfloat16, float32 or float64);
    normalise them first for cosine similarity. ``k`` larger than G is clipped to G. ``block_size`` is
    (rows, cols) of the largest score block ever held (one int: square blocks). Returns ``values`` (Q, k)
    float32 (float64 for float64 inputs) and ``indices`` (Q, k) int64 into the gallery. The order among
    exactly equal scores is that of ``torch.topk`` (unspecified); the recall metrics do not rely on it.
    Scores that overflow to NaN or Inf raise ValueError. ``backend``: "blocked", "torch" (full-matrix
    reference) or None (automatic).
    """
    op = "blocked_topk"
    chosen = resolve_backend(op, backend)
    check_embeddings(op, queries, gallery)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be a positive int, got {k!r}")
    rows, cols = resolve_block_size(op, block_size)
    if chosen == "torch":
        return blocked_topk_reference(queries, gallery, k, largest)
    k = min(k, gallery.shape[0])
    values = torch.empty(queries.shape[0], k, dtype=score_dtype(queries.dtype), device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.int64, device=queries.device)
    finite = FiniteScores(op)
    for r0, r1 in row_blocks(queries.shape[0], rows):
        values[r0:r1], indices[r0:r1] = _topk_rows(queries[r0:r1], gallery, k, cols, largest, finite)
    finite.check()
    return values, indices
