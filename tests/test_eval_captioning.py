"""Caption metrics: hand-computed values, equality with direct pycocoevalcap calls, tokenisers, no Java."""

import pytest

from famevil_fast.eval import JavaNotFoundError, caption_scores, fic_result, ptb_tokenize, simple_tokenize
from famevil_fast.eval import caption_tokenize as tokenize_module
from famevil_fast.eval.caption_tokenize import find_java
from famevil_fast.eval.captioning import _Scorers

needs_java = pytest.mark.skipif(find_java() is None, reason="needs a Java runtime")

PRODUCT_TEXTS = [
    "Long sleeve cotton T-shirt in black. Crewneck collar. Logo printed at chest.",
    "Slim-fit jeans in indigo (stretch denim). Five-pocket styling; zip-fly.",
    "Men's leather sneakers, 3.5cm rubber sole. Don't machine wash!",
    'Short sleeve silk blouse in "ivory": tonal stitching, 100% silk.',
    "",
]
PREDICTIONS = ["black cotton t-shirt with logo", "indigo slim jeans", "white leather sneakers", "silk blouse"]
REFERENCES = [
    ["long sleeve cotton t-shirt in black", "black tee with printed logo"],
    "slim-fit jeans in indigo stretch denim",
    ["leather sneakers with rubber sole"],
    "short sleeve silk blouse in ivory",
]


def _direct(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return {
        "bleu4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": 100 * Rouge().compute_score(gts, res)[0],
        "cider": 100 * Cider().compute_score(gts, res)[0],
    }


def _as_dicts(predictions, references, tokenize):
    """(gts, res) dicts as pycocoevalcap wants them, tokenised in one call."""
    refs = [[r] if isinstance(r, str) else r for r in references]
    tokens = tokenize(list(predictions) + [r for group in refs for r in group])
    res = {i: [tokens[i]] for i in range(len(predictions))}
    gts, start = {}, len(predictions)
    for i, group in enumerate(refs):
        gts[i] = tokens[start : start + len(group)]
        start += len(group)
    return gts, res


def test_hand_computed_bleu_and_rouge():
    # BLEU-4: every n-gram precision is 1, brevity penalty exp(1 - 5/4)
    bleu = caption_scores(["a b c d"], ["a b c d e"], metrics=("bleu4",), tokenizer="simple")
    assert bleu["bleu4"] == pytest.approx(100 * 0.7788007830714049, rel=1e-6)
    # ROUGE-L: LCS 2 of 3 tokens both ways -> P = R = F = 2/3
    rouge = caption_scores(["a b c"], ["a c d"], metrics=("rouge_l",), tokenizer="simple")
    assert rouge["rouge_l"] == pytest.approx(100 * 2 / 3)


def test_identical_captions():
    refs = ["red silk midi dress", "black leather boots with buckle", "grey wool coat with lapels"]
    scores = caption_scores(refs, refs, metrics=("bleu4", "rouge_l", "cider"), tokenizer="simple")
    assert scores["bleu4"] == pytest.approx(100.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(100.0)
    assert scores["cider"] == pytest.approx(_direct(*_as_dicts(refs, refs, simple_tokenize))["cider"])
    assert scores["cider"] == pytest.approx(1000.0)  # CIDEr-D is 10 for a perfect caption, x100


def test_matches_direct_library_calls_with_several_references():
    scores = caption_scores(
        PREDICTIONS, REFERENCES, metrics=("bleu4", "rouge_l", "cider"), tokenizer="simple"
    )
    expected = _direct(*_as_dicts(PREDICTIONS, REFERENCES, simple_tokenize))
    assert scores == pytest.approx(expected)
    bleus = caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu1", "bleu2"), tokenizer="simple")
    assert list(bleus) == ["bleu1", "bleu2"] and bleus["bleu1"] > bleus["bleu2"] > scores["bleu4"]


@needs_java
def test_ptb_tokenizer_equals_pycocoevalcap_and_simple_agrees():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ours = ptb_tokenize(PRODUCT_TEXTS)
    library = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(PRODUCT_TEXTS)})
    assert ours == [library[i][0] for i in range(len(PRODUCT_TEXTS))]
    assert ours[1] == "slim-fit jeans in indigo -lrb- stretch denim -rrb- five-pocket styling zip-fly"
    assert simple_tokenize(PRODUCT_TEXTS) == ours
    assert ptb_tokenize(["two\nlines", "x\u2028y"]) == ["two lines", "x y"]


@needs_java
def test_ptb_scores():
    scores = caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu4", "rouge_l", "cider"), tokenizer="ptb")
    assert scores == pytest.approx(_direct(*_as_dicts(PREDICTIONS, REFERENCES, ptb_tokenize)))


def test_without_java(monkeypatch):
    monkeypatch.setattr(tokenize_module.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="tokenizer='simple'"):
        ptb_tokenize(["a dress"])
    with pytest.raises(JavaNotFoundError, match="METEOR"):
        caption_scores(["a dress"], ["a dress"], metrics=("meteor",), tokenizer="simple")
    result = fic_result(PREDICTIONS, REFERENCES)
    assert result.details["tokenizer"] == "simple" and "meteor" in result.details["skipped"]
    assert list(result.metrics) == ["bleu4", "rouge_l", "cider"]


def test_fic_result_constant_caption_baseline():
    result = fic_result(PREDICTIONS, REFERENCES, metrics=("bleu4", "cider"), tokenizer="simple")
    # ties: the first reference seen; scored on the images it is no reference of (not on the first, whose
    # reference it copies)
    constant = ["long sleeve cotton t-shirt in black"] * (len(PREDICTIONS) - 1)
    baseline = caption_scores(constant, REFERENCES[1:], metrics=("bleu4", "cider"), tokenizer="simple")
    assert result.chance == pytest.approx(baseline)
    assert result.task == "fic" and result.details["chance"].startswith("constant caption")
    no_baseline = fic_result(PREDICTIONS, REFERENCES, metrics=("cider",), tokenizer="simple", baseline=False)
    assert no_baseline.chance == {"cider": None}


@pytest.mark.slow
@needs_java
def test_meteor_matches_the_library():
    # one METEOR process (its start-up dominates): our scorer, then the library's call on the same process
    gts, res = _as_dicts(PREDICTIONS, REFERENCES, ptb_tokenize)
    scorers = _Scorers(("meteor", "bleu4"))
    try:
        scores = scorers.score(gts, res)
        assert list(scores) == ["meteor", "bleu4"]
        assert scores["meteor"] == pytest.approx(100 * scorers.meteor.compute_score(gts, res)[0])
        assert scorers.score(gts, {i: gts[i][:1] for i in gts})["meteor"] > 95.0
    finally:
        scorers.close()
    assert scorers.meteor is None


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a"], ["a", "b"], "1 predictions but 2"),
        ([], [], "no predictions"),
        ("a dress", "a dress", "not one string"),
        (["a"], [[]], "non-empty list"),
        ([3], ["a"], "must be a string"),
        (["a"], [""], "every reference is empty"),
    ],
)
def test_bad_input(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(predictions, references, metrics=("bleu4",), tokenizer="simple")


def test_bad_options():
    with pytest.raises(ValueError, match="unknown or no metrics"):
        caption_scores(["a"], ["a"], metrics=("spice",), tokenizer="simple")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        caption_scores(["a"], ["a"], metrics=("bleu4",), tokenizer="nltk")


def test_sets_score_as_separate_calls():
    from famevil_fast.eval.captioning import caption_scores_of_sets

    other = list(reversed(PREDICTIONS))
    metrics = ("bleu4", "rouge_l", "cider")
    together = caption_scores_of_sets([PREDICTIONS, other], REFERENCES, metrics=metrics, tokenizer="simple")
    apart = [caption_scores(p, REFERENCES, metrics=metrics, tokenizer="simple") for p in (PREDICTIONS, other)]
    assert together == apart
    with pytest.raises(ValueError, match="no prediction sets"):
        caption_scores_of_sets([], REFERENCES, metrics=metrics, tokenizer="simple")


def test_bleu_is_corpus_level_not_a_mean_of_sentence_scores():
    """BLEU-4 as Hugging Face ``evaluate`` computes it (the official), over the corpus: n-gram matches and
    lengths are summed over all captions before the precisions are formed. Sentence 2 alone has no matching
    4-gram (sentence BLEU 0, a mean of sentence scores would be 50); the corpus precisions are 7/8, 5/6,
    3/4 and 1/2, with no brevity penalty."""
    scores = caption_scores(
        ["a b c d", "e f g h"], ["a b c d", "e f g x"], metrics=("bleu4",), tokenizer="simple"
    )
    assert scores["bleu4"] == pytest.approx(100 * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25, rel=1e-6)


def test_rouge_l_is_coco_captions_recall_weighted_f():
    """ROUGE-L as coco-caption computes it: LCS F-measure with beta 1.2 (the official cap_general used a
    Hugging Face ROUGE whose F has beta 1: 2/3 here; see docs/evaluation.md)."""
    precision, recall, beta = 1.0, 0.5, 1.2  # LCS "a b": 2 of 2 predicted tokens, 2 of 4 reference tokens
    scores = caption_scores(["a b"], ["a b c d"], metrics=("rouge_l",), tokenizer="simple")
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    assert scores["rouge_l"] == pytest.approx(100 * expected)


def test_cider_document_frequencies_come_from_the_evaluated_references():
    """CIDEr-D's idf is computed over the references being scored (corpus = val references): an n-gram in
    every reference weighs nothing, so one image alone scores 0 even when its caption is perfect."""
    captions = ["red silk midi dress", "blue wool long coat"]
    alone = caption_scores(captions[:1], captions[:1], metrics=("cider",), tokenizer="simple")
    assert alone["cider"] == 0.0
    pair = caption_scores(captions, captions, metrics=("cider",), tokenizer="simple")
    assert pair["cider"] == pytest.approx(1000.0)  # 10 per perfect caption, x100


def test_a_constant_caption_that_is_every_image_s_reference_is_scored_on_all():
    """With one reference for all images there is no other image to score it on: all images are used."""
    refs = ["long sleeve black cotton shirt with a printed logo"] * 3
    result = fic_result(["a", "b", "c"], refs, metrics=("bleu4",), tokenizer="simple")
    assert result.chance["bleu4"] == pytest.approx(100.0)
