"""What ``famevil-fast demo`` settles before training: where its dataset lies, whether an existing one is the
demo's own, whether the product count fills a training batch, and how the caption ceilings are saved."""

import json
import re
from pathlib import Path

import pytest

from famevil_fast.cli.main import main

# what make-synthetic records for a 40-product dataset (version 2: with the settings its paths follow from)
_RECORD = {
    "generator_version": 2,
    "settings": {"products": 40, "seed": 0, "val_fraction": 0.15, "fiq_images": 40},
    "seed": 0,
    "products_train": 34,
    "products_val": 6,
    "fashiongen_images": 97,
    "fashioniq_images": 40,
    "triplets_train": 36,
    "image_size": 96,
}


class _Trained(Exception):
    """Raised by the stand-in trainer: the demo got as far as training."""


def _stop_at_training(monkeypatch) -> list:
    """The demo stops where it would build the trainer; the list receives the config it would train with."""
    from famevil_fast.train import trainer

    built = []

    def stand_in(cfg, *args, **kwargs):
        built.append(cfg)
        raise _Trained

    monkeypatch.setattr(trainer, "Trainer", stand_in)
    return built


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"famevil-fast {command}: error: "), err
    return err[0]


_SMALL = ["--config", "tiny_cpu", "--set", "data.batch_size=4", "--set", "data.image_size=32"]


def test_the_dataset_is_made_in_the_data_root_the_run_reads(tmp_path, monkeypatch, capsys):
    out, root = tmp_path / "demo", tmp_path / "elsewhere"
    built = _stop_at_training(monkeypatch)
    with pytest.raises(_Trained):
        main(["demo", "--out", str(out), "--products", "8", *_SMALL, "--set", f"data.root={root}"])
    assert Path(built[0].data.root) == root
    record = json.loads((root / "synthetic.json").read_text())
    assert record["products_train"] + record["products_val"] == 8
    assert not (out / "data").exists()
    assert f"generating 8 synthetic products in {root}" in capsys.readouterr().out
    # the one there is the one checked: another seed asked for is refused, naming the option that chose it
    again = ["--products", "8", "--seed", "1", *_SMALL, "--set", f"data.root={root}"]
    assert main(["demo", "--out", str(out), *again]) == 2
    line = one_error_line(capsys, "demo")
    assert f"{root} already holds a synthetic dataset of 8 products (seed 0)" in line
    assert line.endswith("choose another data.root")


@pytest.mark.parametrize(
    ("argv", "batch", "fewest", "got"),
    [
        (
            ["--products", "40"],
            32,
            63,
            "40",
        ),  # 34 FashionGen train products fill a batch of 32, the triplets not
        (["--products", "1"], 32, 63, "1"),
        (["--products", "4", "--set", "data.batch_size=4"], 4, 5, "4"),
        (["--set", "data.batch_size=4096"], 4096, 4819, "2000 (the default)"),
    ],
)
def test_too_few_products_for_a_training_batch_are_refused_before_anything_is_written(
    tmp_path, capsys, argv, batch, fewest, got
):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--config", "tiny_cpu", *argv]) == 2
    assert one_error_line(capsys, "demo").endswith(
        f"--products must be at least {fewest} for a training batch of {batch} (data.batch_size) of every "
        f"task, got {got}"
    )
    assert not out.exists()


def test_the_fewest_products_follow_the_batch_and_the_tasks():
    from famevil_fast.cli.commands.demo import fewest_products

    assert [fewest_products(batch) for batch in (1, 4, 32, 64)] == [2, 5, 63, 98]
    assert [fewest_products(batch, tgir=False) for batch in (32, 64)] == [38, 75]  # FashionGen's 85% only


@pytest.mark.parametrize("batch", [4, 16, 32, 64])
def test_the_fewest_products_fill_a_batch_of_every_task(batch):
    """At the fewest products the demo takes, FashionGen's train split and FashionIQ's training triplets each
    hold a batch, whatever the seed (a few tried)."""
    from famevil_fast.cli.commands.demo import DEMO_VAL_FRACTION, fewest_products
    from famevil_fast.data.synthetic.generate import _draw, _Settings, fiq_image_count

    products = fewest_products(batch)
    assert fewest_products(batch, tgir=False) <= products
    for seed in range(4):
        settings = _Settings(products, seed, DEMO_VAL_FRACTION, fiq_image_count(products))
        fg_rows, _, captions, *_ = _draw(settings, Path("/unused"), 32)
        assert len(fg_rows["train"]) >= batch
        assert sum(len(rows) for (_, split), rows in captions.items() if split == "train") >= batch


def test_a_batch_the_synthetic_dataset_cannot_fill_is_named(tmp_path, capsys):
    assert (
        main(["demo", "--out", str(tmp_path), "--config", "tiny_cpu", "--set", "data.batch_size=60000"]) == 2
    )
    line = one_error_line(capsys, "demo")
    assert "a training batch of 60000 is more than the synthetic dataset fills" in line
    assert line.endswith("lower data.batch_size")


def test_a_reused_dataset_too_small_for_a_batch_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "synthetic.json").write_text(json.dumps({**_RECORD, "triplets_train": 20}))
    (out / "run").mkdir()
    (out / "run" / "metrics.jsonl").write_text("earlier")
    assert main(["demo", "--out", str(out), "--config", "tiny_cpu"]) == 2
    line = one_error_line(capsys, "demo")
    assert (
        f"the synthetic dataset in {out / 'data'} holds 20 FashionIQ training triplets, fewer than one "
        in line
    )
    assert "batch of 32 (data.batch_size)" in line
    assert (out / "run" / "metrics.jsonl").read_text() == "earlier"  # no run set aside


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"val_fraction": 0.3}, "--val-fraction 0.3 (the default: 0.15)"),
        ({"fiq_images": 100}, "--fiq-images 100 (the default for 40 products: 40)"),
    ],
)
def test_a_dataset_made_with_other_generator_options_is_not_taken_for_the_demo_s(
    tmp_path, capsys, settings, said
):
    from famevil_fast.cli.commands.demo import ensure_dataset

    data = tmp_path / "data"
    data.mkdir()
    (data / "synthetic.json").write_text(json.dumps(_RECORD))
    ensure_dataset(data, 40, 0, image_size=96)
    assert "note:" not in capsys.readouterr().out  # the demo's own: nothing to say
    record = {**_RECORD, "settings": {**_RECORD["settings"], **settings}}
    (data / "synthetic.json").write_text(json.dumps(record))
    ensure_dataset(data, 40, 0, image_size=96)
    note = capsys.readouterr().out
    assert f"this one 40 products of 96 px (seed 0) made with {said}, so its scores differ" in note
    with pytest.raises(ValueError, match=re.escape(f"40 products (seed 0) made with {said}, not the demo's")):
        ensure_dataset(data, 40, 0, image_size=96, exact=True)


def test_the_caption_ceilings_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from famevil_fast.cli.commands.demo import caption_ceiling_text
    from famevil_fast.eval import caption_ceiling
    from famevil_fast.eval.report import TaskResult

    monkeypatch.setattr(caption_ceiling, "caption_ceiling", lambda *a, **k: {"nothing": {"cider": 1.5}})
    monkeypatch.setattr(caption_ceiling, "ceiling_table", lambda scores: "table")
    fic = TaskResult("fic", "coco-caption", {"cider": 12.5}, {"cider": 10.0}, {"tokenizer": "simple"})
    saved = tmp_path / "fic_ceiling.json"
    saved.write_text("earlier")
    write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(Path, "write_text", disk_full)
        caption_ceiling_text(fic, tmp_path, saved)
    assert saved.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["fic_ceiling.json"]
    caption_ceiling_text(fic, tmp_path, saved)
    assert json.loads(saved.read_text()) == {"nothing": {"cider": 1.5}}


def test_results_near_chance_are_flagged():
    from famevil_fast.cli.commands.demo import near_chance_warnings
    from famevil_fast.eval.report import TaskResult

    learnt = TaskResult(
        "scr", "fashiongen-val", {"accuracy": 40.0, "macro_f1": 3.0}, {"accuracy": 5.0, "macro_f1": 3.2}
    )
    stuck = TaskResult("xmr", "full", {"i2t_r@1": 1.1, "avg": 5.0}, {"i2t_r@1": 1.0, "avg": 4.5})
    unscored = TaskResult("fic", "coco-caption", {"cider": 3.0}, {"cider": None})
    lines = near_chance_warnings([learnt, stuck, unscored])
    assert lines == [
        "warning: xmr (full) scores near chance (best: avg 5.00 against 4.50); train longer (--updates) or "
        "check the data"
    ]
