"""Evaluation metrics and protocols of the four FAME-ViL tasks: pure functions over embeddings, logits and
caption strings that score, and ``runner`` (``Evaluator``), which encodes an evaluation set with a model
and hands the outputs to them.

- ``topk``: blocked similarity search (``blocked_topk``); the score matrix is never materialised.
- ``ranks``: rank of each query's best positive with an explicit ties rule; Recall@K.
- ``xmr``: FashionGen cross-modal retrieval, full protocol (``xmr_full``) and sampled-100 (``xmr_sampled``);
  ``candidates`` draws the sampled protocol's candidate sets.
- ``tgir``: FashionIQ text-guided image retrieval (``tgir_fashioniq``).
- ``classification``: sub-category recognition accuracy and macro-F1 (``scr_result``).
- ``captioning`` / ``caption_tokenize``: BLEU, METEOR, ROUGE-L, CIDEr via pycocoevalcap (``fic_result``).
- ``report``: ``TaskResult`` / ``EvalReport``, the final tables with chance levels, text and JSON.
- ``sharding``: ``EvalShard``, an evaluation's batches shared over the processes of a distributed run.
- ``caption_ceiling``: the synthetic data's FIC scores of captions written knowing part of each product.

Every score is a percentage. See docs/evaluation.md for the protocols and how they differ.
"""

from famevil_fast.eval.candidates import sample_candidates
from famevil_fast.eval.caption_tokenize import JavaNotFoundError, ptb_tokenize, simple_tokenize
from famevil_fast.eval.captioning import CAPTION_METRICS, caption_scores, fic_result
from famevil_fast.eval.classification import accuracy, macro_f1, scr_result
from famevil_fast.eval.ranks import RankStats, candidate_rank_stats, gallery_rank_stats
from famevil_fast.eval.report import EvalReport, TaskResult
from famevil_fast.eval.tgir import (
    FASHIONIQ_CATEGORIES,
    TgirCategory,
    tgir_fashioniq,
    tgir_recall,
    unique_gallery,
)
from famevil_fast.eval.topk import blocked_topk
from famevil_fast.eval.xmr import xmr_full, xmr_sampled

__all__ = [
    "CAPTION_METRICS",
    "FASHIONIQ_CATEGORIES",
    "EvalReport",
    "JavaNotFoundError",
    "RankStats",
    "TaskResult",
    "TgirCategory",
    "accuracy",
    "blocked_topk",
    "candidate_rank_stats",
    "caption_scores",
    "fic_result",
    "gallery_rank_stats",
    "macro_f1",
    "ptb_tokenize",
    "sample_candidates",
    "scr_result",
    "simple_tokenize",
    "tgir_fashioniq",
    "tgir_recall",
    "unique_gallery",
    "xmr_full",
    "xmr_sampled",
]
