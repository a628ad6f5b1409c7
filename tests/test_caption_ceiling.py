"""Captions redrawn from the synthetic products' specs: the spec round trip, what each knowledge level keeps,
the ordering of the scores, and the demo's table."""

import json

import numpy as np
import pytest
from test_data_fixtures import synthetic

from famevil_fast.cli.commands.demo import caption_ceiling_text
from famevil_fast.data.synthetic.generate import attribute_ids, sample_product, spec_from_attribute_ids
from famevil_fast.eval.caption_ceiling import LEVELS, caption_ceiling, redrawn_captions
from famevil_fast.eval.report import TaskResult


def test_attribute_ids_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = sample_product(rng)
        assert spec_from_attribute_ids(attribute_ids(spec)) == spec
    with pytest.raises(ValueError, match="attribute id 99999"):
        spec_from_attribute_ids([99999])
    with pytest.raises(ValueError, match="no colour, garment, material, pattern"):
        spec_from_attribute_ids([])


def test_each_level_keeps_what_it_knows():
    rng = np.random.default_rng(1)
    for _ in range(200):
        spec = sample_product(rng)
        assert LEVELS["every attribute"](spec, rng) == spec
        full = LEVELS["garment, colour, pattern"](spec, rng)
        assert (full.garment, full.colour, full.pattern, full.second) == (
            spec.garment,
            spec.colour,
            spec.pattern,
            spec.second,
        )
        assert LEVELS["garment"](spec, rng).garment == spec.garment
        coloured = LEVELS["colour"](spec, rng)
        assert coloured.colour == spec.colour and coloured.second != spec.colour
    with pytest.raises(ValueError, match="unknown knowledge level 'shape'"):
        redrawn_captions([spec], "shape")


def test_more_knowledge_scores_higher(tmp_path_factory):
    root = synthetic(tmp_path_factory, products=160, image_size=32)
    scores = caption_ceiling(root, metrics=["cider", "bleu4"], tokenizer="simple")
    assert list(scores) == list(LEVELS)
    cider = [scores[level]["cider"] for level in ("every attribute", "garment, colour", "colour", "nothing")]
    assert cider == sorted(cider, reverse=True) and cider[0] > 3 * cider[-1], scores


def test_demo_prints_the_model_beside_the_levels(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory, products=160, image_size=32)
    fic = TaskResult("fic", "coco-caption", {"cider": 12.5}, {"cider": 10.0}, {"tokenizer": "simple"})
    text = caption_ceiling_text(fic, root, tmp_path / "ceiling.json")
    assert "every attribute" in text and "this model" in text and "12.50" in text
    assert set(json.loads((tmp_path / "ceiling.json").read_text())) == set(LEVELS)

    plain = tmp_path / "plain" / "FashionGen"
    plain.mkdir(parents=True)
    row = {"images": ["val/1.png"], "id": 1, "title": "red dress", "description": "Red.", "subcategory_id": 0}
    (plain / "val_info.json").write_text(json.dumps([row]))
    message = caption_ceiling_text(fic, plain.parent)
    assert "not computed" in message and "not a synthetic catalogue" in message, message
    (plain.parent / "synthetic.json").write_text("{}")  # marked synthetic, but the products carry no specs
    message = caption_ceiling_text(fic, plain.parent)
    assert "not computed" in message and "no colour, garment" in message, message
