"""Beam search with every decision on the device and fixed shapes, so that a CUDA graph can capture it.

It returns exactly the sequences of ``generation._beam_search`` (Hugging Face's ``BeamSearchScorer``: 2 x
beams candidates a step, a sequence that ends scored by its sum of log-probs / its prefix's length, an input
closes when its worst kept hypothesis beats the step's best candidate score / the current length), with the
per-input Python bookkeeping replaced by masked tensor operations:

* the candidates an input looks at in a step are those ranked before its ``beams``-th non-end candidate;
  their end tokens among the top ``beams`` become hypotheses, the rest fill the next beams in rank order;
* the kept hypotheses are merged with the new ones by a stable descending sort (older first among equal
  scores, as repeated insertion into a sorted list keeps them), in float64 as the host version divides;
* every step runs; a finished input's candidates are masked, which is what skipping it did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from famevil_fast.model.generation import EOT_ID, SOT_ID, ban_repeated_ngrams_on_device, cached_decoder

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL

NEG_INF = float("-inf")


class _Finished:
    """The best ``beams`` finished hypotheses of each input: float64 scores, tokens and lengths."""

    def __init__(self, batch: int, beams: int, width: int, device: torch.device) -> None:
        self.scores = torch.full((batch, beams), NEG_INF, dtype=torch.float64, device=device)
        self.tokens = torch.full((batch, beams, width), EOT_ID, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.beams = beams

    def add(self, scores: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Merge candidates (B, C) scored float64 (-inf: not a candidate), in insertion order."""
        all_scores = torch.cat([self.scores, scores], dim=1)
        order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, : self.beams]
        self.scores = all_scores.gather(1, order)
        all_tokens = torch.cat([self.tokens, tokens], dim=1)
        self.tokens = all_tokens.gather(1, order[:, :, None].expand(-1, -1, all_tokens.shape[2]))
        self.lengths = torch.cat([self.lengths, lengths], dim=1).gather(1, order)
        self.count = (self.count + (scores > NEG_INF).sum(dim=1)).clamp_max(self.beams)

    def closed(self, best_candidate: torch.Tensor, length: int) -> torch.Tensor:
        full = self.count == self.beams
        return full & (self.scores[:, -1] >= best_candidate.double() / length)


def _select(top_scores, src_beam, token, done, beams):
    """Which of the 2K ranked candidates each input considers, and where its non-end ones go."""
    valid = top_scores > NEG_INF
    is_end = token == EOT_ID
    running = (valid & ~is_end).long()
    before = running.cumsum(dim=1) - running  # non-end candidates ranked ahead of each one
    considered = valid & (before < beams) & ~done[:, None]
    keep = considered & ~is_end
    slot = torch.where(keep, before, beams)  # slot `beams` is a discard column
    top = torch.arange(top_scores.shape[1], device=top_scores.device) < beams  # ends ranked in the top beams
    return considered & is_end & top, keep, slot


def beam_search_all_steps(
    model: FameViL,
    pixels: torch.Tensor,
    steps: int,
    beams: int,
    no_repeat_ngram: int = 0,
    compiled: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, 1 + steps), lengths (B,)): the best sequence of each input (end-token padded) and its
    length; no host read-backs, every step runs; ``compiled`` a ``torch.compile`` backend for the steps."""
    device, batch = pixels.device, pixels.shape[0]
    width = steps + 1
    memory = [m.repeat_interleave(beams, dim=0) for m in model.vision_memory(pixels, "cap")]
    decoder = cached_decoder(model, memory, width, compiled)
    scores = torch.full((batch, beams), NEG_INF, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    seqs = torch.full((batch * beams, width), EOT_ID, dtype=torch.long, device=device)
    seqs[:, 0] = SOT_ID
    finished = _Finished(batch, beams, width, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * beams
    lengths = torch.arange(width + 1, device=device)[:, None, None]  # lengths[n]: a (1, 1) view of n
    for t in range(steps):
        logp = torch.log_softmax(decoder.step(seqs[:, t]), dim=-1)
        logp = ban_repeated_ngrams_on_device(logp, seqs[:, : t + 1], no_repeat_ngram, model)
        vocab = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(batch, beams, vocab)).view(batch, -1)
        top_scores, top_idx = cand.topk(2 * beams, dim=1)
        src_beam, token = top_idx // vocab, model.caption_tokens(top_idx % vocab)
        ends, keep, slot = _select(top_scores, src_beam, token, done, beams)
        end_rows = seqs.index_select(0, (src_beam + offsets).view(-1)).view(batch, 2 * beams, width)
        end_scores = torch.where(ends, top_scores.double() / (t + 1), NEG_INF)  # over the prefix's length
        finished.add(end_scores, end_rows, lengths[t + 2].expand_as(src_beam))  # prefix + end token
        new_scores = torch.full((batch, beams + 1), NEG_INF, device=device)
        new_scores.scatter_(1, slot, torch.where(keep, top_scores, NEG_INF))
        new_src = torch.zeros(batch, beams + 1, dtype=torch.long, device=device).scatter_(1, slot, src_beam)
        new_tok = torch.full((batch, beams + 1), EOT_ID, dtype=torch.long, device=device)
        new_tok.scatter_(1, slot, torch.where(keep, token, EOT_ID))
        new_scores, new_src, new_tok = new_scores[:, :beams], new_src[:, :beams], new_tok[:, :beams]
        done = done | finished.closed(top_scores[:, 0], t + 1)
        index = (new_src + offsets).reshape(-1)
        seqs = seqs.index_select(0, index)
        seqs[:, t + 1] = new_tok.reshape(-1)
        decoder.reorder(index)
        scores = new_scores
    last = torch.where(
        (scores > NEG_INF) & ~done[:, None],
        scores.double() / width,
        torch.full_like(scores, NEG_INF, dtype=torch.float64),
    )
    finished.add(last, seqs.view(batch, beams, width), torch.full((batch, beams), width, device=device))
    return finished.tokens[:, 0], finished.lengths[:, 0]
