"""Report tables: text layout with chance levels, JSON round trip, bad input."""

import json

import pytest
import torch

from famevil_fast.eval import EvalReport, TaskResult, scr_result


def _report():
    xmr = TaskResult(
        "xmr",
        "full",
        {"i2t_r@1": 39.7, "avg": 50.0},
        {"i2t_r@1": 0.013, "avg": 0.07},
        {"num_views": 32528, "ties": "expected", "per_repeat": [1, 2]},
    )
    fic = TaskResult("fic", "coco-caption", {"cider": 150.4}, {"cider": None}, {"tokenizer": "ptb"})
    return EvalReport().add(xmr).add(fic).add(scr_result(torch.eye(3), torch.tensor([0, 1, 1])))


def test_text_table_shows_scores_beside_chance():
    text = _report().to_text()
    assert "XMR: cross-modal retrieval (FashionGen) -- protocol: full" in text
    assert "num_views=32528" in text and "per_repeat" not in text
    row = next(line for line in text.splitlines() if line.strip().startswith("i2t_r@1"))
    assert row.split() == ["i2t_r@1", "39.70", "0.01", "3053.8"]
    cider = next(line for line in text.splitlines() if line.strip().startswith("cider"))
    assert cider.split() == ["cider", "150.40", "-", "-"]
    assert "SCR: sub-category recognition" in text and "accuracy" in text


def test_json_round_trip(tmp_path):
    report = _report()
    again = EvalReport.from_json(report.to_json())
    assert again == report
    path = tmp_path / "eval.json"
    report.save(path)
    assert EvalReport.load(path) == report
    assert json.loads(path.read_text())["results"][1]["chance"] == {"cider": None}


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="TaskResult"):
        EvalReport().add({"task": "xmr"})
    with pytest.raises(ValueError, match="results"):
        EvalReport.from_json("[]")
    with pytest.raises(ValueError, match="missing keys"):
        EvalReport.from_json('{"results": [{"task": "xmr"}]}')
    with pytest.raises(ValueError, match="no such file"):
        EvalReport.load(tmp_path / "missing.json")
