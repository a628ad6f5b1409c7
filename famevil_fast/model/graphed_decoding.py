"""Greedy caption decoding replayed as one CUDA graph per (batch shape, length, precision).

Cached decoding runs the text stack on one token per step, so at a few dozen images a step is a few hundred
small kernels and the GPU waits on their launches. Here the whole decode (vision memory, cross-attention
keys and values, every step of the key/value-cached text stack) is captured once and replayed with a single
launch. The captured loop runs all steps (a graph cannot stop early), forcing the end token after a
sequence ends exactly as ``generate`` does; the result is then cut where ``generate`` would have stopped,
so the tokens are identical. Parameters are read in place, so training between calls is seen; a model
whose parameter storage changed (moved, reloaded) is captured anew.

Without CUDA the same capture-safe loop runs eagerly under ``simulated_capture`` (a check on the CPU).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from famevil_fast.capture import simulated_capture, static_shapes
from famevil_fast.model.generation import EOT_ID, SOT_ID, TextDecoder, max_steps

_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: (graph, pixels, out)}


def greedy_all_steps(model, pixels: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, 1 + steps) greedy tokens without early stopping: no host read-backs, static shapes."""
    memory = model.vision_memory(pixels, "cap")
    decoder = TextDecoder(model, memory, steps + 1)
    batch = pixels.shape[0]
    out = torch.full((batch, steps + 1), EOT_ID, dtype=torch.long, device=pixels.device)
    out[:, 0] = SOT_ID
    done = torch.zeros(batch, dtype=torch.bool, device=pixels.device)
    token = out[:, 0]
    for t in range(steps):
        token = model.caption_tokens(decoder.step(token).argmax(dim=-1))
        token = torch.where(done, torch.full_like(token, EOT_ID), token)
        out[:, t + 1] = token
        done |= token == EOT_ID
    return out


def cut_after_last_end(out: torch.Tensor) -> torch.Tensor:
    """Drop the columns after every row has ended (where step-by-step decoding stops)."""
    ended = out[:, 1:] == EOT_ID
    if not bool(ended.any(dim=1).all()):
        return out
    first_end = ended.int().argmax(dim=1) + 1
    return out[:, : int(first_end.max()) + 1]


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _key(model, pixels: torch.Tensor, steps: int) -> tuple:
    first = next(model.parameters())
    return (
        tuple(pixels.shape),
        pixels.dtype,
        pixels.device,
        steps,
        _autocast_state(pixels.device),
        first.data_ptr(),
    )


def _capture(model, pixels: torch.Tensor, steps: int):
    static_pixels = pixels.clone()
    enabled, dtype = _autocast_state(pixels.device)
    autocast = (
        torch.autocast(pixels.device.type, dtype=dtype, cache_enabled=False)
        if enabled
        else contextlib.nullcontext()
    )
    side = torch.cuda.Stream(pixels.device)
    side.wait_stream(torch.cuda.current_stream(pixels.device))
    with torch.cuda.stream(side), static_shapes(), autocast:
        greedy_all_steps(model, static_pixels, steps)  # warm-up: kernels compiled, workspaces allocated
    torch.cuda.current_stream(pixels.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast:
        out = greedy_all_steps(model, static_pixels, steps)
    return graph, static_pixels, out


@torch.no_grad()
def generate_graphed(model, pixels: torch.Tensor, max_len: int = 76) -> torch.Tensor:
    """Greedy captions as ``generate(model, pixels, max_len)`` returns them, decoded by one graph replay."""
    steps = max_steps(model, max_len)
    if pixels.device.type != "cuda":
        with simulated_capture():
            out = greedy_all_steps(model, pixels, steps)
        return cut_after_last_end(out)
    graphs = _GRAPHS.setdefault(model, {})
    key = _key(model, pixels, steps)
    if key not in graphs:
        graphs.clear()  # one live graph per model: its memory pool holds a whole decode
        graphs[key] = _capture(model, pixels, steps)
    graph, static_pixels, out = graphs[key]
    static_pixels.copy_(pixels)
    graph.replay()
    return cut_after_last_end(out).clone()
