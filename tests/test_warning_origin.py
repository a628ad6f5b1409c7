"""Skipped-image warnings point at the caller's line outside the package, however deep the call that
found the images is."""

import json
import warnings

import pytest

from famevil_fast.data import build_eval_sets, make_synthetic
from famevil_fast.data.images import SkippedImagesWarning


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory):
    """A tiny synthetic dataset whose first validation image is missing and second one corrupt."""
    root = tmp_path_factory.mktemp("warn") / "data"
    make_synthetic(root, products=40, seed=0, image_size=32, workers=1)
    rows = json.loads((root / "FashionGen" / "val_info.json").read_text())
    views = [view for row in rows for view in row["images"]]
    (root / "FashionGen" / views[0]).unlink()
    (root / "FashionGen" / views[1]).write_bytes(b"not a png")
    return root


def test_a_missing_image_found_while_building_is_attributed_to_the_caller(damaged_root):
    with pytest.warns(SkippedImagesWarning, match="skipped 1") as caught:
        build_eval_sets("scr", damaged_root, image_size=32, batch_size=4)
    assert {w.filename for w in caught if w.category is SkippedImagesWarning} == {__file__}


def test_a_corrupt_image_found_while_iterating_is_attributed_to_the_caller(damaged_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        samples = build_eval_sets("scr", damaged_root, image_size=32, batch_size=4).samples
    with pytest.warns(SkippedImagesWarning, match="cannot be decoded") as caught:
        rows = sum(batch["pixels"].shape[0] for batch in samples)
    assert rows > 0
    assert {w.filename for w in caught if w.category is SkippedImagesWarning} == {__file__}


def test_a_corrupt_image_found_while_evaluating_is_attributed_to_the_caller(damaged_root, tmp_path):
    from helpers import save_micro_checkpoint

    from famevil_fast.eval.runner import EvalOptions, Evaluator
    from famevil_fast.model import FameViL

    model = FameViL.from_pretrained(save_micro_checkpoint(tmp_path)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImagesWarning)
        evaluator = Evaluator.build(damaged_root, ["scr"], image_size=32, options=EvalOptions(progress=False))
    with pytest.warns(SkippedImagesWarning, match="cannot be decoded") as caught:
        evaluator.report(model)
    assert {w.filename for w in caught if w.category is SkippedImagesWarning} == {__file__}
