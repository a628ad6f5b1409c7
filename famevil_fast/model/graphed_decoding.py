"""Caption decoding (greedy or beam search) replayed as one CUDA graph per (batch shape, length, beams,
precision).

Cached decoding runs the text stack on one token per step, so at a few dozen images a step is a few hundred
small kernels and the GPU waits on their launches. Here the whole decode (vision memory, cross-attention
keys and values, every step of the key/value-cached text stack) is captured once and replayed with a single
launch. The captured loop runs all steps (a graph cannot stop early), forcing the end token after a
sequence ends exactly as ``generate`` does; the result is then cut where ``generate`` would have stopped,
so the tokens are identical. Beam search runs as ``static_beam_search`` (every decision on the device).
Parameters are read in place, so training between calls is seen; a model whose parameter storage changed
(moved, reloaded) is captured anew.

Without CUDA the same capture-safe loop runs eagerly under ``simulated_capture`` (a check on the CPU).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch

from famevil_fast.capture import simulated_capture, static_shapes
from famevil_fast.model.generation import EOT_ID, cached_decoder, greedy_decode, max_steps
from famevil_fast.model.static_beam_search import beam_search_all_steps

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL

_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: (graph, pixels, out)}


def greedy_all_steps(
    model: FameViL, pixels: torch.Tensor, steps: int, no_repeat_ngram: int = 0, compiled: str | None = None
) -> torch.Tensor:
    """(B, 1 + steps) greedy tokens without early stopping: no host read-backs, static shapes; ``compiled``
    a ``torch.compile`` backend for the steps (``generation.cached_decoder``)."""
    decoder = cached_decoder(model, model.vision_memory(pixels, "cap"), steps + 1, compiled)
    return greedy_decode(
        decoder, pixels.shape[0], steps, pixels.device, model, no_repeat_ngram, stop_early=False
    )


def greedy_lengths(out: torch.Tensor) -> torch.Tensor:
    """Per row: the columns step-by-step greedy decoding keeps for it (up to its first end token, or all);
    the batch's output is as wide as the longest."""
    ended = out[:, 1:] == EOT_ID
    first_end = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, out.shape[1] - 1)
    return first_end + 1


class Decoding(NamedTuple):
    """What a decode is asked for: steps, beams (1: greedy), the n-gram ban, and the ``torch.compile``
    backend of its steps (None: not compiled)."""

    steps: int
    beams: int = 1
    no_repeat_ngram: int = 0
    compiled: str | None = None


def decode_all_steps(
    model: FameViL, pixels: torch.Tensor, how: Decoding
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, 1 + steps), kept length per row): capture-safe greedy or beam decoding."""
    if how.beams == 1:
        out = greedy_all_steps(model, pixels, how.steps, how.no_repeat_ngram, how.compiled)
        return out, greedy_lengths(out)
    return beam_search_all_steps(model, pixels, how.steps, how.beams, how.no_repeat_ngram, how.compiled)


def cut(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return tokens[:, : int(lengths.max())]


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def storage_fingerprint(model: torch.nn.Module) -> tuple[int, ...]:
    """The addresses of every parameter and buffer: a captured graph reads exactly these. Moving a model
    away and back can give the first tensors their old addresses and the rest new ones, so all count."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _key(model, pixels: torch.Tensor, how: Decoding) -> tuple:
    """What a captured decode depends on: the inputs' layout, the decoding settings (the compile backend
    among them), autocast, TF32 (the products a capture records follow it), the model's mode and runtime
    choices (``set_runtime``) and where its tensors live."""
    runtime = model.config
    return (
        (runtime.attention, runtime.backend, runtime.residual_stream, runtime.activation_backend),
        (model.training, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        tuple(pixels.shape),
        pixels.dtype,
        pixels.device,
        how,
        _autocast_state(pixels.device),
        storage_fingerprint(model),
    )


def _capture(model, pixels: torch.Tensor, how: Decoding):
    static_pixels = pixels.clone()
    enabled, dtype = _autocast_state(pixels.device)
    autocast = (
        torch.autocast(pixels.device.type, dtype=dtype, cache_enabled=False)
        if enabled
        else contextlib.nullcontext()
    )
    side = torch.cuda.Stream(pixels.device)
    side.wait_stream(torch.cuda.current_stream(pixels.device))
    with (
        torch.cuda.stream(side),
        static_shapes(),
        autocast,
    ):  # warm-up: kernels compiled (the compiled steps traced), workspaces allocated
        decode_all_steps(model, static_pixels, how)
    torch.cuda.current_stream(pixels.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a data loader's thread may allocate or copy on its own stream meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast:
        out = decode_all_steps(model, static_pixels, how)
    return graph, static_pixels, out


@torch.no_grad()
def generate_graphed(
    model: FameViL,
    pixels: torch.Tensor,
    max_len: int = 76,
    num_beams: int = 1,
    no_repeat_ngram: int = 0,
    compiled: str | None = None,
) -> torch.Tensor:
    """Captions as ``generate(model, pixels, max_len, num_beams, no_repeat_ngram)`` returns them, decoded
    by one graph replay; ``compiled`` a ``torch.compile`` backend for the steps (captured compiled)."""
    how = Decoding(max_steps(model, max_len), num_beams, no_repeat_ngram, compiled)
    if pixels.device.type != "cuda":
        with simulated_capture():
            tokens, lengths = decode_all_steps(model, pixels, how)
        return cut(tokens, lengths)
    graphs = _GRAPHS.setdefault(model, {})
    key = _key(model, pixels, how)
    if key not in graphs:
        graphs.clear()  # one live graph per model: its memory pool holds a whole decode
        graphs[key] = _capture(model, pixels, how)
    graph, static_pixels, (tokens, lengths) = graphs[key]
    static_pixels.copy_(pixels)
    graph.replay()
    return cut(tokens, lengths).clone()
