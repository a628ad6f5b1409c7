"""Data for the four FAME-ViL tasks: readers, a synthetic dataset, decoding backends, cache and loaders.

Training::

    from famevil_fast.data import build_train_loader
    loader = build_train_loader("itc", root, batch_size=64, image_size=224, seed=0, rank=0, world_size=1)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # dict of tensors on the loader's device
            ...
    state = loader.state_dict()       # exact resume: loader.load_state_dict(state)

Batches per task (B = batch size, S = image size, ids are CLIP BPE ids padded with 0 to 77):

- ``itc`` (FashionGen): pixels (B, 3, S, S) float32 CLIP-normalised, input_ids (B, 77) int64,
  product_ids (B,) int64
- ``tgir`` (FashionIQ): ref_pixels, target_pixels (B, 3, S, S), input_ids (B, 77) of the two captions
  joined with ", ", target_ids (B,) int64, category (B,) int64 (0 dress, 1 shirt, 2 toptee)
- ``scr`` (FashionGen): pixels, input_ids, labels (B,) int64 sub-category in [0, 121)
- ``cap`` (FashionGen): pixels, input_ids (the target text)

FashionGen text is title + "." + description. Evaluation sets: :func:`build_eval_sets` (module
``eval_sets``). ``root`` holds ``FashionGen/``, ``FashionIQ/``, ``Fashion200k/``, ``PolyvoreOutfits/`` and/or
``BigFACAD/`` (or is one of them); ``fashionall`` is FashionViL's pre-training union of the four product
datasets' train splits (module ``fashionall``).

Modules: ``records`` (Product, Triplet, split-file rows), ``image_paths`` (split-file image paths relative to
the data root), ``fashiongen`` / ``fashioniq`` / ``fashion200k`` / ``polyvore`` /
``bigfacad`` (readers), ``fashionall`` (the union),
``fiq_convert`` (FashionIQ val gallery files), ``transforms`` (reference crops and resampling),
``images`` (file checks, skipped-image warning), ``backends`` (dali, torchvision, pil, cache),
``cache`` (pre-decoded shards), ``tokens`` (token ids with a disk cache), ``tasks`` (sample tables),
``loader`` (TrainLoader, EvalBatches), ``eval_sets``, ``synthetic`` (the built-in dataset), ``attributes``
(PAC pseudo-attributes) and ``pretrain`` (the pre-training tasks' tables and loaders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "build_train_loader": ("famevil_fast.data.loader", "build_train_loader"),
    "TrainLoader": ("famevil_fast.data.loader", "TrainLoader"),
    "EvalBatches": ("famevil_fast.data.loader", "EvalBatches"),
    "build_eval_sets": ("famevil_fast.data.eval_sets", "build_eval_sets"),
    "XMREval": ("famevil_fast.data.eval_sets", "XMREval"),
    "TGIREval": ("famevil_fast.data.eval_sets", "TGIREval"),
    "SCREval": ("famevil_fast.data.eval_sets", "SCREval"),
    "CapEval": ("famevil_fast.data.eval_sets", "CapEval"),
    "make_synthetic": ("famevil_fast.data.synthetic.generate", "make_synthetic"),
    "build_cache": ("famevil_fast.data.cache", "build_cache"),
    "ImageCache": ("famevil_fast.data.cache", "ImageCache"),
    "CacheCorruptError": ("famevil_fast.data.cache", "CacheCorruptError"),
    "convert_fashioniq_val": ("famevil_fast.data.fiq_convert", "convert_fashioniq_val"),
    "read_fashiongen": ("famevil_fast.data.fashiongen", "read_fashiongen"),
    "read_fashioniq": ("famevil_fast.data.fashioniq", "read_fashioniq"),
    "read_fashion200k": ("famevil_fast.data.fashion200k", "read_fashion200k"),
    "read_polyvore_outfits": ("famevil_fast.data.polyvore", "read_polyvore_outfits"),
    "read_bigfacad": ("famevil_fast.data.bigfacad", "read_bigfacad"),
    "read_fashionall": ("famevil_fast.data.fashionall", "read_fashionall"),
    "make_backend": ("famevil_fast.data.backends", "make_backend"),
    "available_backends": ("famevil_fast.data.backends", "available_backends"),
    "SkippedImagesWarning": ("famevil_fast.data.images", "SkippedImagesWarning"),
    "CLIP_MEAN": ("famevil_fast.data.transforms", "CLIP_MEAN"),
    "CLIP_STD": ("famevil_fast.data.transforms", "CLIP_STD"),
    "TASKS": ("famevil_fast.data.tasks", "TASKS"),
}

if TYPE_CHECKING:
    from famevil_fast.data.backends import available_backends, make_backend
    from famevil_fast.data.bigfacad import read_bigfacad
    from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache
    from famevil_fast.data.eval_sets import CapEval, SCREval, TGIREval, XMREval, build_eval_sets
    from famevil_fast.data.fashion200k import read_fashion200k
    from famevil_fast.data.fashionall import read_fashionall
    from famevil_fast.data.fashiongen import read_fashiongen
    from famevil_fast.data.fashioniq import read_fashioniq
    from famevil_fast.data.fiq_convert import convert_fashioniq_val
    from famevil_fast.data.images import SkippedImagesWarning
    from famevil_fast.data.loader import EvalBatches, TrainLoader, build_train_loader
    from famevil_fast.data.polyvore import read_polyvore_outfits
    from famevil_fast.data.synthetic.generate import make_synthetic
    from famevil_fast.data.tasks import TASKS
    from famevil_fast.data.transforms import CLIP_MEAN, CLIP_STD


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'famevil_fast.data' has no attribute {name!r}")


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CacheCorruptError",
    "CapEval",
    "EvalBatches",
    "ImageCache",
    "SCREval",
    "SkippedImagesWarning",
    "TASKS",
    "TGIREval",
    "TrainLoader",
    "XMREval",
    "available_backends",
    "build_cache",
    "build_eval_sets",
    "build_train_loader",
    "convert_fashioniq_val",
    "make_backend",
    "make_synthetic",
    "read_bigfacad",
    "read_fashion200k",
    "read_fashionall",
    "read_fashiongen",
    "read_fashioniq",
    "read_polyvore_outfits",
]
