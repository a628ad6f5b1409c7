"""Caption decoding: greedy and beam search with key/value caches.

The vision memory is computed once per image, the cross-attention keys and values over it once per layer,
and the text tower's self-attention keys and values are cached in preallocated buffers, so each step runs
the text stack on one new token. ``generate_by_reencoding`` is the plain reference (re-running the whole
prefix every step, as the official code does); both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from famevil_fast.model.attention import attention
from famevil_fast.model.decode_step import FusedHead, FusedLayer, FusedPick, fused_step_applies
from famevil_fast.model.validation import check_can_caption
from famevil_fast.ops._backend import require_int
from famevil_fast.ops.cross_attention import merge_heads
from famevil_fast.text.special_tokens import EOT_ID, SOT_ID

if TYPE_CHECKING:
    from famevil_fast.model.compiled_decoding import StaticTextDecoder
    from famevil_fast.model.famevil import FameViL


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, q, k, v) of the new token -> its self-attention output, the key and value cached by the callee."""


def text_layers(
    model: FameViL,
    h: torch.Tensor,
    task: str,
    context_kv: list[tuple[torch.Tensor, torch.Tensor]],
    attend: Attend,
) -> torch.Tensor:
    """The text stack on one new token per sequence, h (B, 1, width) -> next-token logits (B, V): each
    block's self-attention through ``attend``, its cross-attention adapter over the image keys and values
    ``context_kv``, the MLP and the task's adapter."""
    for layer, (block, kv) in enumerate(zip(model.text.blocks, context_kv)):
        q, k, v = block.attn.project(block.ln_1(h))
        o = attend(layer, q, k, v)
        a = h + block.attention_output(block.attn.out(merge_heads(o)), task)
        h = block.feed_forward(a, task, block.cross_attend(a, context_kv=kv))
    return model.caption_logits(model.text.ln_final(h[:, 0]), task).float()


def image_keys_and_layer_cache(
    model: FameViL, memory: list[torch.Tensor], max_tokens: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[int, ...]]:
    """What a cached decoder of ``memory`` holds: each text block's cross-attention keys and values over
    its vision memory (computed once), and the shape of one layer's key/value cache, (B, 2, H, T, Dh) with
    keys at [:, 0] and values at [:, 1]."""
    blocks = model.text.blocks
    context_kv = [block.xaa.context_kv(mem) for block, mem in zip(blocks, memory)]
    heads = blocks[0].attn.heads
    return context_kv, (memory[0].shape[0], 2, heads, max_tokens, model.text.cfg.width // heads)


class TextDecoder:
    """Incremental text-tower state for a batch of sequences conditioned on vision memory. Where the model's
    backend resolves to Triton, each layer runs fused (``decode_step``, seven kernels instead of about
    thirty); ``fused`` forces the choice."""

    def __init__(
        self, model, memory: list[torch.Tensor], max_tokens: int, task: str = "cap", fused: bool | None = None
    ) -> None:
        self.model, self.task = model, task
        self.blocks = model.text.blocks
        self.context_kv, layer_shape = image_keys_and_layer_cache(model, memory, max_tokens)
        # one buffer, (layers, B, 2, H, T, Dh), a contiguous view per layer, so that beam search reorders
        # every layer's cache in one gather
        shape = (len(self.blocks), *layer_shape)
        self.cache = torch.empty(shape, dtype=memory[0].dtype, device=memory[0].device)
        self.caches = [self.cache[i] for i in range(len(self.blocks))]
        self.length = 0
        self.fused = fused_step_applies(model, task, memory[0]) if fused is None else fused
        self.layers = [FusedLayer(block, task) for block in self.blocks] if self.fused else []
        self.head = FusedHead(model, task) if self.fused else None
        self.pick = FusedPick(model, EOT_ID) if self.fused else None  # greedy bookkeeping as one kernel

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (B,); returns next-token logits (B, V)."""
        return self.step_embedded(self.model.text.embed(tokens[:, None], start=self.length))

    def step_embedded(self, h: torch.Tensor) -> torch.Tensor:
        """Feed one input embedding per sequence (B, 1, width), position embedding included; returns
        next-token logits (B, V)."""
        t = self.length
        if t >= self.cache.shape[4]:
            raise ValueError(f"the decoder holds {self.cache.shape[4]} positions; position {t} is past them")
        if self.fused:
            rows = h.reshape(h.shape[0], -1)
            for layer, cache, context_kv in zip(self.layers, self.caches, self.context_kv):
                rows = layer(rows, cache, t, context_kv)
            self.length += 1
            return self.head(rows).float()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache = self.caches[layer]
            cache[:, 0, :, t] = k[:, :, 0]
            cache[:, 1, :, t] = v[:, :, 0]
            impl = self.blocks[layer].attn.impl
            return attention(q, cache[:, 0, :, : t + 1], cache[:, 1, :, : t + 1], impl=impl)

        logits = text_layers(self.model, h, self.task, self.context_kv, attend)
        self.length += 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequences ``index`` (beam search), each taken from a beam of its own image.

        Only the filled positions of the text caches are gathered. The image keys and values are the same
        for every beam of an image, so they stay as they are."""
        filled = self.cache[:, :, :, :, : self.length]
        filled.copy_(filled.index_select(1, index))


def compile_backend(compiled: bool | str) -> str | None:
    """``generate``'s ``compiled`` as a ``torch.compile`` backend name (None: not compiled); an unknown
    backend or a value of another type is refused."""
    if isinstance(compiled, bool):
        return "inductor" if compiled else None
    if not isinstance(compiled, str):
        kind = type(compiled).__name__
        raise TypeError(f"compiled must be a bool or a torch.compile backend name, got {kind}")
    known = torch._dynamo.list_backends(exclude_tags=())
    if compiled not in known:
        raise ValueError(f"compiled={compiled!r} is not a torch.compile backend; known: {', '.join(known)}")
    return compiled


def cached_decoder(
    model: FameViL, memory: list[torch.Tensor], max_tokens: int, compile_with: str | None = None
) -> TextDecoder | StaticTextDecoder:
    """The key/value-cached decoder of ``memory``: ``TextDecoder``, or with a ``torch.compile`` backend
    (``compile_backend``) the static-shape ``StaticTextDecoder``, which has the same interface."""
    if compile_with is None:
        return TextDecoder(model, memory, max_tokens)
    from famevil_fast.model.compiled_decoding import StaticTextDecoder

    return StaticTextDecoder(model, memory, max_tokens, compile_backend=compile_with)


def max_steps(model: FameViL, max_len: int) -> int:
    """Decoding steps: ``max_len``, capped by the text context (``context_length - 1``, 76 for CLIP)."""
    max_len = require_int("caption", "max_len", max_len)
    limit = model.config.clip.text.context_length - 1
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    return min(max_len, limit)


@torch.no_grad()
def generate(
    model: FameViL,
    pixels: torch.Tensor,
    max_len: int = 76,
    num_beams: int = 1,
    no_repeat_ngram: int = 0,
    cuda_graph: bool = False,
    compiled: bool | str = False,
) -> torch.Tensor:
    """Token ids (B, 1 + steps): start token, generated tokens, end-of-text padding after a sequence ends.
    ``no_repeat_ngram`` > 0 forbids any n-gram of that length from occurring twice in a caption (off by
    default, as in the reference decoding). ``cuda_graph=True`` replays the whole decode, greedy or beam
    search, as one CUDA graph (``model.graphed_decoding``), same tokens. ``compiled=True`` runs each step
    as one ``torch.compile`` graph with static shapes (``model.compiled_decoding``; a string names another
    ``torch.compile`` backend), alone or under ``cuda_graph``, in place of the fused step a model with
    ``backend="triton"`` otherwise decodes with. ``max_len``, ``num_beams`` and
    ``no_repeat_ngram`` must be ints (TypeError); a model with xaa="none" cannot caption, and an empty
    batch has nothing to caption (ValueError). The eager decodes raise ValueError on non-finite logits
    (``check_caption_logits``); the graphed one, which reads nothing back while it runs, does not check.
    Beam search follows Hugging Face's ``BeamSearchScorer`` (length penalty 1, no early stopping); n-gram
    bans apply to the log-probabilities, as its n-gram processor does."""
    check_can_caption(model.config.xaa)
    compiled = compile_backend(compiled)
    num_beams = require_int("caption", "num_beams", num_beams)
    no_repeat_ngram = require_int("caption", "no_repeat_ngram", no_repeat_ngram)
    max_len = require_int("caption", "max_len", max_len)
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")
    if isinstance(pixels, torch.Tensor) and pixels.dim() > 0 and pixels.shape[0] == 0:
        raise ValueError("caption: no images (pixels has batch size 0)")
    if model.caption_vocab is not None and model.caption_vocab.numel() == 1:
        num_beams = 1  # a one-token shortlist (the end token) allows one caption: beams would all be it
    if cuda_graph:
        from famevil_fast.model.graphed_decoding import generate_graphed

        return generate_graphed(model, pixels, max_len, num_beams, no_repeat_ngram, compiled)
    steps = max_steps(model, max_len)
    memory = model.vision_memory(pixels, "cap")
    if num_beams == 1:
        decoder = cached_decoder(model, memory, steps + 1, compiled)
        return greedy_decode(decoder, pixels.shape[0], steps, pixels.device, model, no_repeat_ngram)
    memory = [m.repeat_interleave(num_beams, dim=0) for m in memory]
    decoder = cached_decoder(model, memory, steps + 1, compiled)
    return _beam_search(decoder, pixels.shape[0], num_beams, steps, pixels.device, model, no_repeat_ngram)


def ban_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int, model: FameViL) -> torch.Tensor:
    """Set to -inf the logits of tokens that would repeat an n-gram already in each row's ``history``."""
    if n <= 0 or history.shape[1] < n - 1:
        return logits
    banned_rows, banned_tokens = [], []
    for row, tokens in enumerate(history.tolist()):
        prefix = tuple(tokens[len(tokens) - (n - 1) :]) if n > 1 else ()
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n - 1]) == prefix:
                banned_rows.append(row)
                banned_tokens.append(tokens[i + n - 1])
    if not banned_rows:
        return logits
    index = model.caption_targets(torch.tensor(banned_tokens, device=logits.device))
    rows = torch.tensor(banned_rows, device=logits.device)
    keep = index >= 0
    return logits.index_put((rows[keep], index[keep]), torch.tensor(float("-inf"), device=logits.device))


def ban_repeated_ngrams_on_device(
    logits: torch.Tensor, history: torch.Tensor, n: int, model: FameViL
) -> torch.Tensor:
    """``ban_repeated_ngrams`` without reading the history back: every window of the history is compared
    with its last n - 1 tokens at once, and the tokens that followed matching windows are set to -inf
    (shapes depend only on the history's length, so a CUDA graph can capture it)."""
    length = history.shape[1]
    if n <= 0 or length < n:
        return logits
    windows = history.unfold(1, n, 1)  # (B, length - n + 1, n)
    match = (windows[:, :, : n - 1] == history[:, None, length - n + 1 :]).all(dim=-1)
    index = model.caption_targets(windows[:, :, n - 1])  # -100 where the shortlist lacks the token
    column = torch.where(match & (index >= 0), index, logits.shape[1])  # one past the end: discarded
    padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)
    return padded.scatter(1, column, float("-inf"))[:, :-1]


def check_caption_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (rows of next-token logits) unless one holds NaN or +inf or has no finite entry:
    ValueError then (diverged weights or non-finite pixels), rather than a caption of arbitrary tokens.
    Reads one flag back from the device."""
    bad = torch.isnan(logits).any() | torch.isposinf(logits).any() | ~(logits > float("-inf")).any(-1).all()
    if bool(bad):
        raise ValueError(
            "caption: the model's next-token logits are not finite (NaN or inf): its weights or the pixels "
            "hold non-finite values"
        )
    return logits


def greedy_decode(
    decoder: TextDecoder | _Reencoder,
    batch: int,
    steps: int,
    device: torch.device,
    model: FameViL,
    no_repeat_ngram: int = 0,
    stop_early: bool = True,
) -> torch.Tensor:
    """Greedy tokens (B, <= 1 + steps), end-token padded after a sequence ends. ``stop_early`` returns once
    every sequence has ended (a read-back each step); without it every step runs and the n-gram bans stay
    on the device, so a CUDA graph can capture the loop (the columns after the last end are all end
    tokens, which ``graphed_decoding`` cuts)."""
    ban = ban_repeated_ngrams if stop_early else ban_repeated_ngrams_on_device
    out = torch.full((batch, steps + 1), EOT_ID, dtype=torch.long, device=device)
    out[:, 0] = SOT_ID
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pick = getattr(decoder, "pick", None)  # the fused decoder's one-kernel choice and next input
    token, embedded = out[:, 0], None
    for t in range(steps):
        logits = decoder.step(token) if embedded is None else decoder.step_embedded(embedded)
        if stop_early:  # a read-back each step already: non-finite logits stop the decode
            check_caption_logits(logits)
        logits = ban(logits, out[:, : t + 1], no_repeat_ngram, model)
        if pick is not None:
            embedded = pick(logits, out, done, t + 1, decoder.length if t + 1 < steps else None)
        else:
            token = model.caption_tokens(logits.argmax(dim=-1))
            token = torch.where(done, torch.full_like(token, EOT_ID), token)
            out[:, t + 1] = token
            done |= token == EOT_ID
        if stop_early and bool(done.all()):
            return out[:, : t + 2]
    return out


class _Hypotheses:
    """The best finished sequences of one input, as Hugging Face's ``BeamSearchScorer`` (length penalty 1)
    keeps them: a sequence that ends is scored by its sum of log-probs / the length of its prefix (start
    token included, the end token not), and stored with its end token."""

    def __init__(self, beams: int) -> None:
        self.beams = beams
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], logprob: float, length: int | None = None) -> None:
        """Keep ``tokens`` scored ``logprob / length`` (default: ``len(tokens)``) if among the best."""
        self.items.append((logprob / (length or len(tokens)), tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.beams :]

    def closed(self, best_candidate: float, length: int) -> bool:
        """Whether no running sequence can do better: every slot is filled and the worst kept score beats the
        step's best candidate score / the current length (the scorer's ``is_done``, no early stopping)."""
        return len(self.items) == self.beams and self.items[-1][0] >= best_candidate / length


def _beam_search(
    decoder, batch: int, beams: int, steps: int, device, model, no_repeat_ngram: int = 0
) -> torch.Tensor:
    next_logits = decoder.step
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    seqs = torch.full((batch * beams, 1), SOT_ID, dtype=torch.long, device=device)
    hyps = [_Hypotheses(beams) for _ in range(batch)]
    done = [False] * batch
    for t in range(steps):
        logits = check_caption_logits(next_logits(seqs[:, -1]))
        # banned after the softmax, as Hugging Face's n-gram processor: the other tokens keep their scores
        logp = ban_repeated_ngrams(torch.log_softmax(logits, dim=-1), seqs, no_repeat_ngram, model)
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(batch, beams, vocab)).view(batch, -1)
        # at most every candidate (a caption shortlist can be smaller than 2 * beams)
        top_scores, top_idx = cand.topk(min(2 * beams, cand.shape[1]), dim=1)
        src_beam, token = top_idx // vocab, model.caption_tokens(top_idx % vocab)
        new_scores = torch.full((batch, beams), float("-inf"), device=device)
        new_src = torch.zeros(batch, beams, dtype=torch.long, device=device)
        new_tok = torch.full((batch, beams), EOT_ID, dtype=torch.long, device=device)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            ranked = zip(top_scores[b].tolist(), src_beam[b].tolist(), token[b].tolist())
            for rank, (s, src, tok) in enumerate(ranked):
                if s == float("-inf"):
                    break
                if tok == EOT_ID:
                    if rank < beams:  # an end ranked below the top ``beams`` candidates is passed over
                        prefix = seqs[b * beams + src].tolist()
                        hyps[b].add(prefix + [EOT_ID], s, length=len(prefix))
                    continue
                new_scores[b, kept], new_src[b, kept], new_tok[b, kept] = s, src, tok
                kept += 1
                if kept == beams:
                    break
            # no running beam left (every candidate ended): nothing more to search
            done[b] = kept == 0 or hyps[b].closed(top_scores[b, 0].item(), t + 1)
        if all(done):
            break
        index = (new_src + torch.arange(batch, device=device)[:, None] * beams).view(-1)
        seqs = torch.cat([seqs.index_select(0, index), new_tok.view(-1, 1)], dim=1)
        decoder.reorder(index)
        scores = new_scores
    for b in range(batch):
        if not done[b]:
            for k in range(beams):
                if scores[b, k] > float("-inf"):
                    hyps[b].add(seqs[b * beams + k].tolist(), scores[b, k].item())
    best = [h.items[0][1] for h in hyps]
    out = torch.full((batch, max(len(s) for s in best)), EOT_ID, dtype=torch.long, device=device)
    for b, tokens in enumerate(best):
        out[b, : len(tokens)] = torch.tensor(tokens, device=device)
    return out


class _Reencoder:
    """Reference decoder: re-runs the whole text stack over the growing prefix at every step."""

    def __init__(self, model, memory: list[torch.Tensor], task: str = "cap") -> None:
        self.model, self.memory, self.task = model, memory, task
        self.prefix: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, None]
        self.prefix = tokens if self.prefix is None else torch.cat([self.prefix, tokens], dim=1)
        states = self.model.caption_states(self.memory, self.prefix, self.task)
        return self.model.caption_logits(states[:, -1], self.task).float()

    def reorder(self, index: torch.Tensor) -> None:
        self.memory = [m.index_select(0, index) for m in self.memory]
        self.prefix = self.prefix.index_select(0, index)


@torch.no_grad()
def generate_by_reencoding(
    model: FameViL, pixels: torch.Tensor, max_len: int = 76, num_beams: int = 1, no_repeat_ngram: int = 0
) -> torch.Tensor:
    """Same output as ``generate`` without caches (the reference for tests and benchmarks)."""
    steps = max_steps(model, max_len)
    memory = model.vision_memory(pixels, "cap")
    b = pixels.shape[0]
    if num_beams == 1:
        return greedy_decode(_Reencoder(model, memory), b, steps, pixels.device, model, no_repeat_ngram)
    memory = [m.repeat_interleave(num_beams, dim=0) for m in memory]
    return _beam_search(_Reencoder(model, memory), b, num_beams, steps, pixels.device, model, no_repeat_ngram)
