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
    with pytest.raises(FileNotFoundError, match="no such file"):
        EvalReport.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is not a file"):
        EvalReport.load(tmp_path)


def test_save_is_atomic_and_makes_its_directory(tmp_path, monkeypatch):
    path = tmp_path / "new" / "eval.json"
    _report().save(path)
    before = path.read_text()

    def fail(self, text, *args, **kwargs):
        self.open("w").write(text[:10])  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_text", fail)
    with pytest.raises(OSError, match="disk full"):
        EvalReport().save(path)
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_max_samples_caps_the_tgir_gallery_and_keeps_the_targets():
    from famevil_fast.eval.runner import _tgir_gallery

    class Encoder:
        device = torch.device("cpu")
        seen = 0

        def encode_image(self, pixels, task):
            self.seen += len(pixels)
            return pixels.flatten(1)

    ids = torch.arange(40)
    batches = [
        {"pixels": ids[i : i + 8, None].float(), "target_ids": ids[i : i + 8]} for i in range(0, 40, 8)
    ]
    model = Encoder()
    embeddings, kept = _tgir_gallery(model, batches, torch.tensor([33, 5]), limit=3)
    kept = torch.cat(kept).tolist()
    assert {33, 5} <= set(kept) and len(kept) <= 3 + 2 and model.seen == len(kept)
    everything = _tgir_gallery(Encoder(), batches, torch.tensor([33]), limit=None)[1]
    assert torch.cat(everything).tolist() == ids.tolist()
