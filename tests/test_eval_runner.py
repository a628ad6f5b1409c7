"""Evaluator glue: what the protocol functions receive from ``famevil_fast.eval.runner`` (stub models, no
encoder): the sampled XMR query count, the unseeded sampled protocol, and the caption decoding cap and
references of the official code's quirk in both their faithful and fixed forms."""

import pytest
import torch
from helpers import EmbeddingStub, stub_config

from famevil_fast.data.eval_sets import CapEval, XMREval
from famevil_fast.eval import TaskResult
from famevil_fast.eval import runner as runner_module
from famevil_fast.eval.runner import EvalOptions, evaluate_cap, evaluate_xmr, longest_reference
from famevil_fast.text import get_tokenizer, tokenize


def _xmr_set(products=12, views=3, dim=8, batch=10):
    product_ids = torch.arange(products) + 100
    image_ids = product_ids.repeat_interleave(views)
    images = torch.randn(len(image_ids), dim, dtype=torch.float64)
    sub = torch.zeros(len(image_ids), dtype=torch.long)
    batches = [
        {
            "pixels": images[i : i + batch],
            "product_ids": image_ids[i : i + batch],
            "subcategory": sub[i : i + batch],
        }
        for i in range(0, len(image_ids), batch)
    ]
    texts = {
        "input_ids": torch.randn(products, dim, dtype=torch.float64),
        "product_ids": product_ids,
        "subcategory": torch.zeros(products, dtype=torch.long),
    }
    return XMREval(batches, texts, [])


@pytest.mark.filterwarnings("ignore:XMR sampled protocol")  # 12 products: sampled-11
def test_sampled_xmr_draws_1000_queries_per_direction():
    """The official protocol: 1,000 random queries, all when fewer. The image-to-text queries are views, so
    with 12 products of 3 views all 36 views are queries (the runner used to cap both directions at the
    number of products: 12)."""
    (result,) = evaluate_xmr(EmbeddingStub(), _xmr_set(), EvalOptions(xmr_protocols=("sampled",)))
    assert result.details["num_queries_i2t"] == 36
    assert result.details["num_queries_t2i"] == 12
    assert result.details["num_negatives"] == 11  # every other product of the one subcategory


def test_a_set_too_small_for_100_negatives_is_said_once(recwarn):
    """12 products of one subcategory give 11 negatives: the protocol becomes sampled-11 (chance 1/12), and
    a warning says how many negatives and why; a set with 101 products or more draws 100, silently."""
    options = EvalOptions(xmr_protocols=("sampled",))
    with pytest.warns(UserWarning, match=r"11 negatives per query instead of 100.*12 products") as caught:
        (result,) = evaluate_xmr(EmbeddingStub(), _xmr_set(), options)
    assert len([w for w in caught if "negatives" in str(w.message)]) == 1
    assert result.protocol == "sampled-11" and result.chance["i2t_r@1"] == pytest.approx(100 / 12)
    capped = r"max_samples=6 \(--max-samples / eval.max_samples\) keeps only 2 products"
    with pytest.warns(UserWarning, match=capped) as caught:
        evaluate_xmr(
            EmbeddingStub(), _xmr_set(products=120), EvalOptions(xmr_protocols=("sampled",), max_samples=6)
        )
    assert caught[0].filename == __file__  # the caller outside the package, not the runner
    recwarn.clear()
    (full_size,) = evaluate_xmr(EmbeddingStub(), _xmr_set(products=102, views=1), options)
    assert full_size.protocol == "sampled-100"
    assert not [w for w in recwarn if "negatives" in str(w.message)]


def test_a_set_without_negatives_skips_the_sampled_protocol():
    """``--max-samples 3`` keeps the 3 views of one product: no query has a negative, so sampled-0 (every
    query ranked first, chance 100%) would be meaningless. The protocol is skipped, no result row, and the
    warning says why and how to get it; the full protocol still runs."""
    from famevil_fast.eval import EvalReport

    capped = EvalOptions(max_samples=3)
    skipped = r"XMR sampled protocol skipped.*no negatives.*keeps only 1 products.*raise --max-samples"
    with pytest.warns(UserWarning, match=skipped) as caught:
        results = evaluate_xmr(EmbeddingStub(), _xmr_set(), capped)
    assert [r.protocol for r in results] == ["full"]
    assert len([w for w in caught if "negatives" in str(w.message)]) == 1
    assert caught[0].filename == __file__
    report = EvalReport(results)
    assert [r["protocol"] for r in report.to_dict()["results"]] == ["full"]
    assert "sampled" not in report.to_text()
    with pytest.warns(UserWarning, match=r"skipped.*the evaluation set has only 1 products.*evaluate a set"):
        only = evaluate_xmr(EmbeddingStub(), _xmr_set(products=1), EvalOptions(xmr_protocols=("sampled",)))
    assert only == []
    with pytest.warns(UserWarning, match=r"1 negatives per query instead of 100"):  # one negative: kept
        (one,) = evaluate_xmr(EmbeddingStub(), _xmr_set(), EvalOptions(("sampled",), max_samples=4))
    assert one.protocol == "sampled-1"


@pytest.mark.filterwarnings("ignore:XMR sampled protocol")  # 12 products: sampled-11
def test_unseeded_sampled_xmr_through_the_runner():
    data = _xmr_set()
    torch.manual_seed(3)
    (unseeded,) = evaluate_xmr(
        EmbeddingStub(), data, EvalOptions(xmr_protocols=("sampled",), sampled_seed=None)
    )
    (seeded,) = evaluate_xmr(EmbeddingStub(), data, EvalOptions(xmr_protocols=("sampled",), sampled_seed=3))
    assert unseeded.details["seed"] is None and seeded.details["seed"] == 3
    assert unseeded.metrics == seeded.metrics  # the global RNG seeded with 3 draws what seed=3 draws


class CaptionStub:
    """Records the decoding length of every batch; always captions "a dress"."""

    device = torch.device("cpu")
    config = stub_config()

    def __init__(self):
        self.max_lens = []
        self.decoding = set()

    def caption(self, pixels, max_len, num_beams, no_repeat_ngram, cuda_graph, compiled):
        self.max_lens.append(max_len)
        self.decoding.add((cuda_graph, compiled))
        return ["a dress"] * pixels.shape[0]


LONG_TEXT = " ".join(["red"] * 80)  # 80 content tokens: the CLIP round trip keeps 75
TEXT_BATCHES = [["Red Dress", "A long black leather jacket with a zip"], ["Boots"], [LONG_TEXT, "Grey Coat"]]


def _cap_set():
    batches = [{"pixels": torch.zeros(len(texts), 1), "input_ids": tokenize(texts)} for texts in TEXT_BATCHES]
    return CapEval(batches, [t for texts in TEXT_BATCHES for t in texts])


@pytest.fixture
def scored(monkeypatch):
    """The arguments ``evaluate_cap`` hands to ``fic_result``."""
    calls = []

    def fake_fic_result(predictions, references, *, metrics=None):
        calls.append((list(predictions), list(references)))
        return TaskResult("fic", "coco-caption", {"bleu4": 0.0}, {"bleu4": None}, {})

    monkeypatch.setattr(runner_module, "fic_result", fake_fic_result)
    return calls


def test_caption_length_fixed_by_default_and_from_references_when_faithful(scored):
    model = CaptionStub()
    (result,) = evaluate_cap(model, _cap_set(), EvalOptions(caption_max_len=23))
    assert model.max_lens == [23, 23, 23] and result.details["max_len"] == 23
    assert model.decoding == {(False, False)}
    model = CaptionStub()
    (result,) = evaluate_cap(model, _cap_set(), EvalOptions(caption_len_from_references=True))
    # the longest reference of each batch in content tokens, counted with the tokenizer directly
    tokenizer = get_tokenizer()
    expected = [min(75, max(len(tokenizer.encode(t)) for t in texts)) for texts in TEXT_BATCHES]
    assert expected == [8, 1, 75]
    assert model.max_lens == expected and result.details["max_len"] == "longest reference"


def test_a_caption_length_beyond_the_text_context_is_refused_before_decoding(scored):
    model = CaptionStub()
    with pytest.raises(ValueError, match=r"caption_max_len must be at most 76 .* got 77"):
        evaluate_cap(model, _cap_set(), EvalOptions(caption_max_len=77))
    assert model.max_lens == []
    evaluate_cap(model, _cap_set(), EvalOptions(caption_max_len=77, caption_len_from_references=True))
    assert model.max_lens and max(model.max_lens) <= 76


def test_caption_references_clip_round_trip_by_default_or_raw(scored):
    evaluate_cap(CaptionStub(), _cap_set(), EvalOptions())
    evaluate_cap(CaptionStub(), _cap_set(), EvalOptions(caption_references="raw"))
    (predictions, clip), (_, raw) = scored
    assert predictions == ["a dress"] * 5
    assert clip == [
        "red dress",
        "a long black leather jacket with a zip",
        "boots",
        " ".join(["red"] * 75),
        "grey coat",
    ]
    assert raw == [t for texts in TEXT_BATCHES for t in texts]
    with pytest.raises(ValueError, match="caption_references"):
        evaluate_cap(CaptionStub(), _cap_set(), EvalOptions(caption_references="lower"))


def test_caption_decoding_switches_reach_the_model(scored):
    model = CaptionStub()
    evaluate_cap(model, _cap_set(), EvalOptions(caption_cuda_graph=True, caption_compile=True))
    assert model.decoding == {(True, True)}


def test_raw_references_follow_max_samples(scored):
    evaluate_cap(CaptionStub(), _cap_set(), EvalOptions(caption_references="raw", max_samples=2))
    (predictions, raw) = scored[0]
    assert len(predictions) == 2 and raw == TEXT_BATCHES[0]


def test_longest_reference_counts_content_tokens():
    ids = tokenize(["a b c", "a"])
    assert longest_reference(ids) == 3
    no_end = torch.tensor([[49406, 320, 321, 322]])  # cut without an end token: every token after the start
    assert longest_reference(no_end) == 3
    assert longest_reference(tokenize([""])) == 1  # an empty reference still allows one step


def test_raw_references_stay_with_their_samples_when_an_image_is_dropped(scored, tmp_path):
    """A sample whose image cannot be decoded leaves its batch: each caption is still scored against its
    own product's text (positional references would shift every later one)."""
    import warnings

    from famevil_fast.data import build_eval_sets
    from famevil_fast.data.fashiongen import read_fashiongen
    from famevil_fast.data.synthetic.generate import make_synthetic

    make_synthetic(tmp_path, products=12, image_size=32, seed=1)
    products = read_fashiongen(tmp_path, "val")
    broken = products[0].images[0]
    (tmp_path / broken).write_bytes(b"not an image")
    data = build_eval_sets("cap", tmp_path, image_size=32, batch_size=4, backend="pil", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_cap(CaptionStub(), data, EvalOptions(caption_references="raw"))
    text = {p.id: p.text for p in products}
    kept = [p.id for p in products for view in p.images if view != broken]
    (predictions, raw) = scored[0]
    assert len(predictions) == len(kept) and raw == [text[i] for i in kept]


def _emptied(batches: list[dict], at: int) -> list[dict]:
    """``batches`` with an empty batch inserted at ``at``: every image of a batch missing or undecodable."""
    return batches[:at] + [{k: v[:0] for k, v in batches[0].items()}] + batches[at:]


class RefusesEmpty(EmbeddingStub, CaptionStub):
    """Refuses an empty batch, as the model's encoders and decoder do."""

    def __init__(self):
        CaptionStub.__init__(self)

    def encode_image(self, pixels, task):
        if not pixels.shape[0]:
            raise ValueError("pixels is an empty batch")
        return super().encode_image(pixels, task)

    def caption(self, pixels, **kwargs):
        if not pixels.shape[0]:
            raise ValueError("pixels is an empty batch")
        return super().caption(pixels, **kwargs)


def test_a_batch_that_lost_every_image_is_skipped(scored):
    data = _xmr_set()
    emptied = XMREval(_emptied(data.images, 1), data.texts, [])
    options = EvalOptions(xmr_protocols=("full",))
    assert evaluate_xmr(RefusesEmpty(), emptied, options)[0].metrics == (
        evaluate_xmr(RefusesEmpty(), data, options)[0].metrics
    )
    cap = _cap_set()
    evaluate_cap(RefusesEmpty(), CapEval(_emptied(cap.samples, 2), cap.references), EvalOptions())
    evaluate_cap(RefusesEmpty(), cap, EvalOptions())
    assert scored[0] == scored[1]
    nothing = XMREval([{k: v[:0] for k, v in data.images[0].items()}], data.texts, [])
    with pytest.raises(ValueError, match="the XMR evaluation set has no samples"):
        evaluate_xmr(RefusesEmpty(), nothing, options)


class ComposeStub(RefusesEmpty):
    def compose(self, pixels, input_ids):
        return self.encode_image(pixels, "tgir")


def test_a_tgir_set_without_queries_or_gallery_images_is_named():
    from famevil_fast.data.eval_sets import TGIRCategoryEval, TGIREval
    from famevil_fast.eval.runner import evaluate_tgir

    query = {"ref_pixels": torch.randn(3, 4), "input_ids": torch.zeros(3, 2), "target_ids": torch.arange(3)}
    gallery = {"pixels": torch.randn(3, 4), "target_ids": torch.arange(3)}
    empty_query = {k: v[:0] for k, v in query.items()}
    empty_gallery = {k: v[:0] for k, v in gallery.items()}

    def tgir(queries, galleries):
        return TGIREval({"dress": TGIRCategoryEval("dress", queries, galleries)})

    (result,) = evaluate_tgir(
        ComposeStub(), tgir([query, empty_query], [empty_gallery, gallery]), EvalOptions()
    )
    assert result.metrics["dress_r@10"] == 100.0  # the emptied batches are skipped
    with pytest.raises(ValueError, match="the TGIR evaluation set's dress queries have no images"):
        evaluate_tgir(ComposeStub(), tgir([empty_query], [gallery]), EvalOptions())
    with pytest.raises(ValueError, match="the TGIR evaluation set's dress gallery has no images"):
        evaluate_tgir(ComposeStub(), tgir([query], [empty_gallery]), EvalOptions())
    categories = {
        "dress": TGIRCategoryEval("dress", [query], [gallery]),
        "shirt": TGIRCategoryEval("shirt", [empty_query], [gallery]),
    }
    with pytest.raises(ValueError, match="shirt queries have no images.*the average over the categories"):
        evaluate_tgir(ComposeStub(), TGIREval(categories), EvalOptions())  # not an average of dress alone


def test_tgir_queries_whose_target_image_was_skipped_are_left_out_with_a_warning():
    """A gallery image that could not be decoded (its row dropped while encoding) takes the queries that
    target it out of the evaluation, as a missing file does, instead of failing the whole evaluation."""
    from famevil_fast.data.eval_sets import TGIRCategoryEval, TGIREval
    from famevil_fast.data.images import SkippedImagesWarning
    from famevil_fast.eval.runner import evaluate_tgir

    torch.manual_seed(0)
    query = {"ref_pixels": torch.randn(4, 4), "input_ids": torch.zeros(4, 2), "target_ids": torch.arange(4)}
    gallery = {"pixels": query["ref_pixels"].clone(), "target_ids": torch.arange(4)}
    undecoded = {k: v[torch.tensor([0, 2, 3])] for k, v in gallery.items()}  # target 1's image skipped
    sets = TGIREval({"dress": TGIRCategoryEval("dress", [query], [undecoded])})
    with pytest.warns(SkippedImagesWarning, match="TGIR dress: 1 of 4 queries left out"):
        (result,) = evaluate_tgir(ComposeStub(), sets, EvalOptions())
    assert result.metrics["dress_r@10"] == 100.0  # the three others each find their own image
    only = {k: v[torch.tensor([1])] for k, v in query.items()}
    sets = TGIREval({"dress": TGIRCategoryEval("dress", [only], [undecoded])})
    with pytest.raises(ValueError, match="TGIR dress: none of the 1 queries has its target image"):
        evaluate_tgir(ComposeStub(), sets, EvalOptions())


class EveryTaskStub(ComposeStub):
    """A model of every task for ``Evaluator``: SCR logits are the pixels."""

    training = False
    config = stub_config(("itc", "tgir", "scr", "cap"))

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def classify(self, pixels, input_ids):
        return pixels.double()


@pytest.mark.filterwarnings("ignore:XMR sampled protocol")  # 12 products: sampled-11
def test_one_process_scores_without_any_collective(monkeypatch, scored):
    """Without a process group nothing is exchanged, the scoring included, and an error while scoring (a
    diverged model's NaN logits) is raised as it is."""
    import torch.distributed as dist

    from famevil_fast.data.eval_sets import SCREval, TGIRCategoryEval, TGIREval
    from famevil_fast.eval.runner import Evaluator, evaluate_scr, evaluate_tgir

    def collective(*args, **kwargs):
        raise AssertionError("a collective in a single-process evaluation")

    for name in ("all_gather_object", "gather_object", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, collective)
    model = EveryTaskStub()
    query = {"ref_pixels": torch.randn(3, 4), "input_ids": torch.zeros(3, 4), "target_ids": torch.arange(3)}
    gallery = {"pixels": torch.randn(3, 4), "target_ids": torch.arange(3)}
    samples = {"pixels": torch.randn(4, 3), "input_ids": torch.zeros(4, 2), "labels": torch.arange(4) % 3}
    assert len(evaluate_xmr(model, _xmr_set(), EvalOptions())) == 2
    tgir = TGIREval({"dress": TGIRCategoryEval("dress", [query], [gallery])})
    assert len(evaluate_tgir(model, tgir, EvalOptions())) == 1
    assert evaluate_scr(model, SCREval([samples]), EvalOptions())[0].details["num_samples"] == 4
    assert len(evaluate_cap(model, _cap_set(), EvalOptions())) == 1
    diverged = SCREval([{**samples, "pixels": torch.full((4, 3), float("nan"))}])
    for options in (EvalOptions(), EvalOptions(max_samples=2)):
        with pytest.raises(ValueError, match=r"^scr_result: logits contain NaN or Inf$"):
            Evaluator({"scr": diverged}, options).report(model)


def test_progress_bars_name_each_set_only_when_asked(capsys):
    data = _xmr_set()
    evaluate_xmr(EmbeddingStub(), data, EvalOptions(xmr_protocols=("full",), progress=True))
    shown = capsys.readouterr().err
    assert "XMR images" in shown and "/4 " in shown  # 36 views in batches of 10
    evaluate_xmr(EmbeddingStub(), data, EvalOptions(xmr_protocols=("full",)))
    assert "XMR images" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:XMR sampled protocol")  # a 40-product dataset: sampled-N
def test_the_documented_python_evaluation_runs(tmp_path, tmp_path_factory, monkeypatch):
    """docs/evaluation.md's example of evaluating a model from Python, on a micro model and a tiny dataset."""
    import re
    from pathlib import Path

    from helpers import save_micro_checkpoint
    from test_data_fixtures import synthetic

    docs = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
    block = re.search(r"From Python, `Evaluator`.*?```python\n(.*?)```", docs.read_text(), re.S).group(1)
    assert '"runs/demo/run/final"' in block and '"runs/demo/data"' in block
    block = block.replace('"runs/demo/run/final"', repr(str(save_micro_checkpoint(tmp_path))))
    block = block.replace('"runs/demo/data"', repr(str(synthetic(tmp_path_factory))))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)
    assert {r.task for r in scope["report"].results} == {"xmr", "tgir", "scr", "fic"}
    assert (tmp_path / "eval_report.json").is_file()


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"xmr_protocols": ("ful", "sampled-100")},
            r"xmr_protocols must be a non-empty list of full and sampled",
        ),
        ({"xmr_protocols": ()}, "xmr_protocols must be a non-empty list"),
        ({"xmr_protocols": "full"}, "xmr_protocols must be a non-empty list"),
        (
            {"sampled_seed": 2**64},
            r"sampled_seed must lie from -2\*\*63 to 2\*\*64 - 1 .*got 18446744073709551616",
        ),
        ({"sampled_seed": -(2**63) - 1}, "sampled_seed must lie from"),
        ({"sampled_seed": 1.0}, "sampled_seed must be an int or None"),
    ],
)
def test_eval_options_refuse_unknown_protocols_and_seeds_a_generator_cannot_take(options, message):
    """Checked at construction: an unknown protocol name would skip retrieval silently, a seed out of the
    generator's range would fail only once every embedding is computed."""
    with pytest.raises(ValueError, match=f"EvalOptions.{message}"):
        EvalOptions(**options)
    EvalOptions(sampled_seed=2**64 - 1)
    EvalOptions(sampled_seed=-(2**63))
