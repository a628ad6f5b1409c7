"""Compiled caption decoding (``generate(..., compiled=...)``): the static-shape step traces as one graph,
its logits equal the plain cached step's, and its tokens those of re-encoding, eagerly and graphed."""

import pytest
import torch
from helpers import captioning_model

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.compiled_decoding import StaticTextDecoder, static_step
from famevil_fast.model.generation import (
    EOT_ID,
    SOT_ID,
    TextDecoder,
    cached_decoder,
    compile_backend,
    generate,
    generate_by_reencoding,
)
from famevil_fast.model.graphed_decoding import Decoding, _key


@pytest.fixture(scope="module")
def model():
    return captioning_model(end_token_bias=3.0)  # some sequences end early, others run to the limit


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test starts without compiled variants, so none counts against another's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pixels(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=g)


def test_static_step_traces_as_one_graph(model):
    """No graph break: ``fullgraph=True`` would raise at the first."""
    step = torch.compile(static_step, backend="eager", fullgraph=True)
    with torch.no_grad():
        memory = model.vision_memory(_pixels(2), "cap")
        decoder = StaticTextDecoder(model, memory, 5, compile_backend=None)
        decoder._step = step
        plain = TextDecoder(model, memory, 5)
        tokens = torch.full((2,), SOT_ID)
        for _ in range(3):
            want = plain.step(tokens)
            torch.testing.assert_close(decoder.step(tokens), want, rtol=0, atol=1e-12)
            tokens = want.argmax(-1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_tokens", [4, 7])
def test_static_step_logits_equal_the_plain_step(model, batch, max_tokens):
    """Every position up to the last one the cache holds; then a step past it is refused."""
    with torch.no_grad():
        memory = model.vision_memory(_pixels(batch), "cap")
        static = StaticTextDecoder(model, memory, max_tokens, compile_backend=None)
        plain = TextDecoder(model, memory, max_tokens)
        tokens = torch.full((batch,), SOT_ID)
        for _ in range(max_tokens):
            want = plain.step(tokens)
            torch.testing.assert_close(static.step(tokens), want, rtol=0, atol=1e-12)
            tokens = want.argmax(-1)
        assert int(static.position) == static.length == max_tokens
        with pytest.raises(ValueError, match=f"holds {max_tokens} positions"):
            static.step(tokens)


def test_static_reorder_continues_like_the_plain_one(model):
    """Beam reordering (each row from a beam of its own image) then one more step: as TextDecoder's."""
    pixels = _pixels(2).repeat_interleave(3, dim=0)
    prefixes = torch.randint(0, 1000, (6, 4))
    prefixes[:, 0] = SOT_ID
    index = torch.tensor([2, 2, 0, 4, 3, 5])
    with torch.no_grad():
        memory = model.vision_memory(pixels, "cap")
        decoders = [StaticTextDecoder(model, memory, 8, compile_backend=None), TextDecoder(model, memory, 8)]
        for decoder in decoders:
            for t in range(3):
                decoder.step(prefixes[:, t])
            decoder.reorder(index)
        static, plain = (d.step(prefixes[:, 3]) for d in decoders)
        torch.testing.assert_close(static, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize(("batch", "beams"), [(1, 1), (3, 1), (2, 3)])
def test_compiled_decoding_gives_the_tokens_of_reencoding(model, cuda_graph, batch, beams):
    """Through aot_eager (the traced graph, run by ATen); the graphed loop under simulated capture."""
    for seed in range(2):
        pixels = _pixels(batch, seed)
        with torch.no_grad():
            got = generate(
                model, pixels, max_len=8, num_beams=beams, cuda_graph=cuda_graph, compiled="aot_eager"
            )
        assert torch.equal(got, generate_by_reencoding(model, pixels, max_len=8, num_beams=beams))


@pytest.mark.parametrize("beams", [1, 2])
def test_inductor_compiled_decoding_gives_the_tokens_of_reencoding(model, beams):
    """The default backend, Inductor (C++ code on the CPU), in the graphed loop; a second batch size
    recompiles and still matches. Greedy, some captions end early and others run to the limit."""
    ended = []
    for batch in (3, 2):
        pixels = _pixels(batch, batch)
        with torch.no_grad():
            got = model.caption(
                pixels, max_len=8, num_beams=beams, cuda_graph=True, compiled=True, return_ids=True
            )
        want = generate_by_reencoding(model, pixels, max_len=8, num_beams=beams)
        assert torch.equal(got, want)
        ended += [EOT_ID in row[1:] for row in want.tolist()]
    if beams == 1:
        assert any(ended) and not all(ended)


def test_compile_backend_is_checked():
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="not a torch.compile backend.*inductor"):
        compile_backend("fastest")
    with pytest.raises(TypeError, match="compiled must be a bool or a torch.compile backend name, got int"):
        compile_backend(1)


def test_bad_compiled_argument_is_refused_by_caption(model):
    with pytest.raises(ValueError, match="'nope' is not a torch.compile backend"):
        model.caption(_pixels(1), max_len=2, compiled="nope")


def test_cached_decoder_picks_the_static_decoder_only_when_compiled(model):
    with torch.no_grad():
        memory = model.vision_memory(_pixels(1), "cap")
    assert type(cached_decoder(model, memory, 3)) is TextDecoder
    assert type(cached_decoder(model, memory, 3, "aot_eager")) is StaticTextDecoder


def test_graph_key_tells_compiled_from_plain_decoding(model):
    pixels = _pixels(1)
    keys = {_key(model, pixels, Decoding(4, compiled=c)) for c in (None, "inductor", "aot_eager")}
    assert len(keys) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_decoding_gives_the_tokens_of_reencoding(model):
    """Inductor's CUDA code, eagerly and captured in the decode's graph (replayed for a second batch of
    images), greedy and beam search, float64. One test, so that the cases share their compiled variants
    (each test starts from empty compile caches)."""
    m = model.to("cuda")
    try:
        for cuda_graph in (False, True):
            for batch, beams in ((3, 1), (2, 2)):
                for seed in range(2):
                    pixels = _pixels(batch, seed).cuda()
                    with torch.no_grad():
                        got = generate(
                            m, pixels, max_len=8, num_beams=beams, cuda_graph=cuda_graph, compiled=True
                        )
                    want = generate_by_reencoding(m, pixels, max_len=8, num_beams=beams)
                    assert torch.equal(got, want), (cuda_graph, batch, beams, seed)
    finally:
        model.to("cpu")


def test_static_step_under_autocast_keeps_a_float32_cache(model):
    """Under CUDA autocast a float32 stream's memory, and so the cache, is float32 while the projections
    are 16-bit (here CPU autocast with a float32 memory, uncompiled): the new key and value are cast into
    the cache, as the plain step's assignment does."""
    m = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")).eval()
    with torch.no_grad():
        memory = [t.float() for t in m.vision_memory(_pixels(2).float(), "cap")]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            static = StaticTextDecoder(m, memory, 4, compile_backend=None)
            plain = TextDecoder(m, memory, 4)
            tokens = torch.full((2,), SOT_ID)
            for _ in range(3):
                want = plain.step(tokens)
                torch.testing.assert_close(static.step(tokens), want, rtol=0.05, atol=0.05)
                tokens = want.argmax(-1)
    assert static.caches[0].dtype == plain.cache.dtype == torch.float32


@pytest.mark.parametrize("batch", [1, 3])
def test_one_compiled_graph_serves_every_step(model, batch):
    """The start tokens (a column of the output table) and later tokens reach the step with one stride, and
    the position is a tensor: a whole decode traces the step once."""
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        generate(model, _pixels(batch), max_len=6, compiled="eager")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_beam_search_over_two_batch_sizes_traces_the_step_twice(model):
    """Beam search feeds the step a column of its (rows, 1) start table, a view, then fresh tensors: each
    reaches the step as a fresh tensor, so a second batch size traces the dynamic step once more and no
    step of it traces again (a view's base would fail the dynamic graph's guards at the next step)."""
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        for batch in (2, 3):
            generate(model, _pixels(batch), max_len=6, num_beams=2, compiled="eager")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
