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
# never ends; some beams and inputs end mid-way and others run to the limit (-1.3, -1.2); all end at once
@pytest.mark.parametrize("eot_bias", [-50.0, -1.3, -1.2, 0.0])
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
        if (batch, beams, eot_bias) == (4, 3, -1.2):
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
