"""Caption decoding with key/value caches gives exactly the tokens of re-encoding the prefix."""

import pytest
import torch
from helpers import captioning_model, perturb_

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.generation import (
    EOT_ID,
    SOT_ID,
    TextDecoder,
    ban_repeated_ngrams,
    ban_repeated_ngrams_on_device,
    generate,
    generate_by_reencoding,
)


@pytest.fixture(scope="module")
def model():
    return captioning_model(end_token_bias=4.0)  # some sequences stop early


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_reencoding(model, num_beams):
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        fast = generate(model, pixels, max_len=10, num_beams=num_beams)
    slow = generate_by_reencoding(model, pixels, max_len=10, num_beams=num_beams)
    assert torch.equal(fast, slow)
    assert (fast[:, 0] == SOT_ID).all() and fast.shape[1] <= 11


def test_reordered_cache_continues_like_the_reordered_prefixes(model):
    """Beam reordering gathers only the filled cache positions and keeps the image keys and values: the
    next step equals a fresh decoder fed the reordered prefixes (2 images x 3 beams, beams permuted)."""
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64).repeat_interleave(3, dim=0)
    prefixes = torch.randint(0, 1000, (6, 4))
    prefixes[:, 0] = SOT_ID
    index = torch.tensor([2, 2, 0, 4, 3, 5])  # each row from a beam of its own image
    with torch.no_grad():
        memory = model.vision_memory(pixels, "cap")
        moved = TextDecoder(model, memory, max_tokens=8)
        for t in range(3):
            moved.step(prefixes[:, t])
        moved.reorder(index)
        fresh = TextDecoder(model, memory, max_tokens=8)
        for t in range(3):
            fresh.step(prefixes[index, t])
        torch.testing.assert_close(moved.step(prefixes[:, 3]), fresh.step(prefixes[:, 3]), rtol=0, atol=1e-12)


def test_greedy_stops_at_end_token_and_pads(model):
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ids = generate(model, pixels, max_len=20)
    for row in ids.tolist():
        if EOT_ID in row:
            first = row.index(EOT_ID)
            assert all(t == EOT_ID for t in row[first:])


def test_greedy_step_matches_the_training_forward(model):
    """The first greedy token is the argmax of the LM head after the start token in the training path."""
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ids = generate(model, pixels, max_len=1)
        states = model.caption_states(model.vision_memory(pixels), torch.full((2, 1), SOT_ID))
        assert torch.equal(ids[:, 1], model.heads["cap"](states[:, 0]).argmax(-1))


def test_bad_decoding_arguments(model):
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_beams"):
        model.caption(pixels, num_beams=0)
    with pytest.raises(ValueError, match="max_len"):
        model.caption(pixels, max_len=0)


def test_no_repeat_ngram_blocks_repeats_in_both_decoders(model):
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] -= 8.0  # long captions, so that repeats would occur
        try:
            plain = generate(model, pixels, max_len=24)
            for beams in (1, 2):
                ids = generate(model, pixels, max_len=24, num_beams=beams, no_repeat_ngram=2)
                ref = generate_by_reencoding(model, pixels, max_len=24, num_beams=beams, no_repeat_ngram=2)
                assert torch.equal(ids, ref)
                for row in ids.tolist():
                    body = [t for t in row[1:] if t != EOT_ID]
                    pairs = list(zip(body, body[1:]))
                    assert len(pairs) == len(set(pairs))
        finally:
            model.heads["cap"].bias[EOT_ID] += 8.0
    bodies = [[t for t in r[1:] if t != EOT_ID] for r in plain.tolist()]
    has_repeat = any(len(list(zip(b, b[1:]))) != len(set(zip(b, b[1:]))) for b in bodies)
    assert has_repeat  # the constraint had something to remove


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
# never ends; some beams and inputs end mid-way and others run to the limit (-1.3, -0.9); all end at once
@pytest.mark.parametrize("eot_bias", [-50.0, -1.3, -0.9, 0.0])
@pytest.mark.parametrize(("batch", "beams"), [(1, 1), (5, 1), (1, 2), (4, 3), (3, 5)])
def test_graphed_decoding_gives_the_same_tokens(model, device, eot_bias, batch, beams):
    m = model.to(device)
    with torch.no_grad():
        m.heads["cap"].bias[EOT_ID] += eot_bias
    mixed = []  # some sequences ended, others ran to the limit
    try:
        for seed in range(2):  # a second call replays the captured graph on new images
            g = torch.Generator().manual_seed(seed)
            pixels = torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=g).to(device)
            with torch.no_grad():
                want = generate(m, pixels, max_len=9, num_beams=beams)
                got = generate(m, pixels, max_len=9, num_beams=beams, cuda_graph=True)
                mixed.append(bool((want[:, 1:] == EOT_ID).any(dim=1).any() and want.shape[1] == 10))
            assert torch.equal(got, want)
        if (batch, beams, eot_bias) == (4, 3, -0.9):
            assert any(mixed), "the mixed case this parameter is for did not occur"
    finally:
        with torch.no_grad():
            m.heads["cap"].bias[EOT_ID] -= eot_bias
        model.to("cpu")


@pytest.mark.parametrize("shortlist", [None, (5, 6, 7, 49406, 49407)])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 3, 9])
def test_ngram_bans_on_the_device_equal_the_host_ones(shortlist, n, length):
    g = torch.Generator().manual_seed(n * 10 + length)
    history = torch.randint(5, 9, (6, length), generator=g)  # four tokens: repeats are frequent
    history[0] = 5  # one constant row
    history[:, 0] = SOT_ID
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, caption_vocab=shortlist))
    width = len(shortlist) if shortlist else 49408
    logits = torch.randn(6, width, generator=g)
    want = ban_repeated_ngrams(logits, history, n, model)
    got = ban_repeated_ngrams_on_device(logits, history, n, model)
    assert torch.equal(got, want)
    if length >= n + 1:  # row 0 is start, 5, 5, ...: another 5 would repeat an n-gram of fives
        assert got[0, shortlist.index(5) if shortlist else 5] == float("-inf")


@pytest.mark.parametrize("beams", [1, 3])
def test_graphed_decoding_with_ngram_bans_gives_the_same_tokens(model, beams):
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] -= 50.0  # long captions, where bans matter
        try:
            pixels = torch.randn(
                3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
            )
            for n in (1, 2, 3):
                want = generate(model, pixels, max_len=12, num_beams=beams, no_repeat_ngram=n)
                got = generate(model, pixels, max_len=12, num_beams=beams, no_repeat_ngram=n, cuda_graph=True)
                assert torch.equal(got, want), n
        finally:
            model.heads["cap"].bias[EOT_ID] += 50.0


def test_graph_key_sees_a_moved_tensor_beyond_the_first(model):
    from famevil_fast.model.graphed_decoding import storage_fingerprint

    before = storage_fingerprint(model)
    assert len(before) == len(list(model.parameters())) + len(list(model.buffers()))
    bias = model.heads["cap"].bias
    old = bias.data
    bias.data = old.clone()  # what moving a model away and back can do to a later tensor
    try:
        after = storage_fingerprint(model)
        assert after[0] == before[0] and after != before
    finally:
        bias.data = old
    assert storage_fingerprint(model) == before


def test_graph_key_sees_the_models_runtime_choices(model):
    """A graphed decode captured before ``set_runtime`` changed how the model computes is not replayed."""
    from famevil_fast.model.graphed_decoding import Decoding, _key

    pixels = torch.randn(2, 3, 32, 32)
    before = _key(model, pixels, Decoding(8))
    changes = ({"attention": "eager"}, {"backend": "triton"}, {"residual_stream": "autocast"})
    for change in (*changes, {"activation_backend": "triton"}):
        saved = model.config
        model.set_runtime(**change)
        try:
            assert _key(model, pixels, Decoding(8)) != before, change
        finally:
            model.set_runtime(
                attention=saved.attention,
                backend=saved.backend,
                residual_stream=saved.residual_stream,
                activation_backend=saved.activation_backend,
            )
    assert _key(model, pixels, Decoding(8)) == before


def test_graph_key_sees_tf32_and_the_models_mode(model):
    """A decode captured with float32 products in one precision, or in another mode, is not replayed."""
    from famevil_fast.model.graphed_decoding import Decoding, _key

    pixels = torch.randn(2, 3, 32, 32)
    before = _key(model, pixels, Decoding(8))
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not matmul
        assert _key(model, pixels, Decoding(8)) != before
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = not cudnn
        assert _key(model, pixels, Decoding(8)) != before
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    training = model.training
    model.train(not training)
    try:
        assert _key(model, pixels, Decoding(8)) != before
    finally:
        model.train(training)
    assert _key(model, pixels, Decoding(8)) == before


def test_caption_without_text_cross_attention_is_refused_clearly():
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="none")).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="captioning needs cross-attention adapters.*xaa='none'"):
        model.caption(pixels, max_len=3)
    with pytest.raises(ValueError, match="captioning needs cross-attention adapters"):
        generate(model, pixels, max_len=3, num_beams=2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_beams": 2.0}, "num_beams"),
        ({"num_beams": True}, "num_beams"),
        ({"max_len": 2.5}, "max_len"),
        ({"no_repeat_ngram": 1.5}, "no_repeat_ngram"),
    ],
)
def test_caption_arguments_must_be_ints(model, kwargs, name):
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match=f"{name} must be a Python int"):
        model.caption(pixels, **{"max_len": 4, **kwargs})


def test_beam_search_over_a_one_token_shortlist():
    """A shortlist of only the end token leaves one caption; beam search returns it as greedy does."""
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, caption_vocab=(EOT_ID,))
    model = perturb_(FameViL(config), std=0.05).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = torch.tensor([[SOT_ID, EOT_ID]] * 2)
    assert torch.equal(model.caption(pixels, max_len=6, num_beams=2, return_ids=True), expected)
    assert torch.equal(generate_by_reencoding(model, pixels, max_len=6, num_beams=3), expected)


def test_caption_docstring_states_the_max_len_cap():
    assert "capped by the text context" in FameViL.caption.__doc__


def _scorer_reference(model, pixels, beams, steps, no_repeat_ngram=0):
    """Beam search as Hugging Face's ``BeamSearchScorer`` does it (length penalty 1, no early stopping),
    one image at a time over the re-encoded prefix: 2 x beams candidates a step; an end candidate ranked in
    the top ``beams`` finishes its prefix, scored by its sum of log-probs / the prefix's length; the image
    is done once ``beams`` are finished and the worst beats the best candidate / the current length; at the
    limit the running beams are finished too; the best finished sequence wins (older first on ties)."""
    from famevil_fast.model.generation import ban_repeated_ngrams

    best = []
    for image in pixels:
        memory = [m.repeat_interleave(beams, 0) for m in model.vision_memory(image[None], "cap")]
        seqs, scores, finished = [[SOT_ID]] * beams, [0.0] + [float("-inf")] * (beams - 1), []
        for t in range(steps):
            ids = torch.tensor(seqs)
            states = model.caption_states(memory, ids, "cap")
            logp = torch.log_softmax(model.caption_logits(states[:, -1], "cap").float(), dim=-1)
            logp = ban_repeated_ngrams(logp, ids, no_repeat_ngram, model)
            vocab = logp.shape[1]
            top, index = (torch.tensor(scores)[:, None] + logp).view(-1).topk(2 * beams)
            running = []
            for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
                source, token = seqs[i // vocab], int(model.caption_tokens(torch.tensor(i % vocab)))
                if token == EOT_ID:
                    if rank < beams:
                        finished.append((score / len(source), source + [EOT_ID]))
                    continue
                running.append((score, source + [token]))
                if len(running) == beams:
                    break
            finished = sorted(finished, key=lambda item: -item[0])[:beams]
            if len(finished) == beams and finished[-1][0] >= top[0].item() / (t + 1):
                running = []
                break
            scores, seqs = [s for s, _ in running], [q for _, q in running]
        else:
            finished += [(s / len(q), q) for s, q in zip(scores, seqs)]
        best.append(sorted(finished, key=lambda item: -item[0])[0][1])
    return best


@pytest.mark.parametrize("beams", [2, 3])
@pytest.mark.parametrize("eot_bias", [-1.0, 0.0, 3.0])
def test_beam_search_scores_as_the_hugging_face_scorer(model, beams, eot_bias):
    """A finished caption is scored over its prefix's length, not counting its end token (which would favour
    the shortest captions, the empty one first); every decoder follows it, the graphed one too."""
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] += eot_bias - 4.0
    try:
        pixels = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = _scorer_reference(model, pixels, beams, steps=8)
            for ids in (
                generate(model, pixels, max_len=8, num_beams=beams),
                generate_by_reencoding(model, pixels, max_len=8, num_beams=beams),
                generate(model, pixels, max_len=8, num_beams=beams, cuda_graph=True),
            ):
                got = [row[: row.index(EOT_ID) + 1] if EOT_ID in row else row for row in ids.tolist()]
                assert got == want
    finally:
        with torch.no_grad():
            model.heads["cap"].bias[EOT_ID] -= eot_bias - 4.0


def test_beam_search_with_ngram_bans_scores_as_the_hugging_face_scorer(model):
    """n-gram bans apply to the log-probabilities, as Hugging Face's n-gram processor: the other tokens
    keep the scores the whole vocabulary gave them."""
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] -= 8.0  # long captions: bans matter
    try:
        pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = _scorer_reference(model, pixels, 3, steps=10, no_repeat_ngram=1)
            ids = generate(model, pixels, max_len=10, num_beams=3, no_repeat_ngram=1)
        assert [row[: row.index(EOT_ID) + 1] if EOT_ID in row else row for row in ids.tolist()] == want
    finally:
        with torch.no_grad():
            model.heads["cap"].bias[EOT_ID] += 8.0


@pytest.mark.parametrize("beams", [1, 2])
def test_non_finite_logits_stop_the_decode_with_a_clear_error(model, beams):
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pixels[1] = float("nan")
    with pytest.raises(ValueError, match="next-token logits are not finite"):
        generate(model, pixels, max_len=5, num_beams=beams)


def test_a_caption_cut_at_max_len_keeps_its_trailing_exclamation_marks(model, monkeypatch):
    """Token id 0 is "!": a row cut at max_len, without an end token, is not read as zero-padded."""
    import famevil_fast.model.generation as generation

    cut = torch.tensor([[SOT_ID, 0, 0, 0], [SOT_ID, 0, EOT_ID, EOT_ID]])
    monkeypatch.setattr(generation, "generate", lambda *args, **kwargs: cut)
    assert model.caption(torch.randn(2, 3, 32, 32, dtype=torch.float64), max_len=3) == ["!!!", "!"]


def test_generate_refuses_an_empty_batch_and_builds_no_autograd_graph(model, monkeypatch):
    with pytest.raises(ValueError, match="no images"):
        generate(model, torch.zeros(0, 3, 32, 32, dtype=torch.float64), num_beams=2)
    seen = []
    memory = model.vision_memory
    monkeypatch.setattr(model, "vision_memory", lambda *a: seen.append(torch.is_grad_enabled()) or memory(*a))
    generate(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), max_len=2)
    assert seen == [False]
