"""The greedy choice of a decoding step, with the next step's input embedding, in one kernel.

After a step's logits, plain greedy decoding spends about nine small kernels on bookkeeping: the argmax, the
shortlist lookup of the token id, the end token forced on finished sequences, the write into the output,
the update of the finished flags and, at the next step, the token embedding and the position embedding
added to it. Program b does all of it for sequence b. The argmax keeps, per lane, the largest logit seen and
its first index while it walks the row in chunks, then takes the first index among the lanes holding the
row's maximum, so ties resolve to the lowest index as ``torch.argmax`` resolves them; a NaN counts as the
maximum, as there. The embedding sum is taken in float32 and stored in the tables' dtype.
"""

import triton
import triton.language as tl


@triton.jit
def greedy_pick_kernel(
    logits_ptr,
    shortlist_ptr,
    tokens_ptr,
    done_ptr,
    token_embed_ptr,
    pos_embed_ptr,
    embedded_ptr,
    n_logits,
    column,
    out_width,
    width,
    position,
    end_token,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SHORTLIST: tl.constexpr,
    EMBED: tl.constexpr,
):
    """Program b: i = argmax(logits[b]); token = shortlist[i] (or i); token = end_token where done[b];
    tokens[b, column] = token; done[b] |= token == end_token; with EMBED,
    embedded[b] = token_embed[token] + pos_embed[position]."""
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    row = logits_ptr + b * n_logits
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, n_logits, BLOCK_V):
        index = v0 + lanes
        x = tl.load(row + index, mask=index < n_logits, other=float("-inf")).to(tl.float32)
        # strictly greater keeps a lane's first index; a NaN replaces a number and is then kept
        better = (x > best) | ((x != x) & (best == best))
        best = tl.where(better, x, best)
        best_index = tl.where(better, index, best_index)
    nan = best != best
    top = tl.max(tl.where(nan, float("-inf"), best), axis=0)
    first_nan = tl.min(tl.where(nan, best_index, n_logits), axis=0)
    first_top = tl.min(tl.where(best == top, best_index, n_logits), axis=0)
    choice = tl.where(first_nan < n_logits, first_nan, first_top)
    if SHORTLIST:
        token = tl.load(shortlist_ptr + choice)
    else:
        token = choice.to(tl.int64)
    finished = tl.load(done_ptr + b) != 0
    token = tl.where(finished, end_token, token)
    tl.store(tokens_ptr + b * out_width + column, token)
    tl.store(done_ptr + b, (finished | (token == end_token)).to(tl.int1))
    if EMBED:
        for w0 in range(0, width, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            wmask = cols < width
            e = tl.load(token_embed_ptr + token * width + cols, mask=wmask, other=0.0).to(tl.float32)
            p = tl.load(pos_embed_ptr + position * width + cols, mask=wmask, other=0.0).to(tl.float32)
            tl.store(embedded_ptr + b * width + cols, (e + p).to(embedded_ptr.dtype.element_ty), mask=wmask)
