"""Pre-training data: the attribute miner on a corpus with known answers, the attribute file and command,
the mvc / pac / itm loaders (views, targets, exact resume) and starting a model from another checkpoint."""

import json

import numpy as np
import pytest
import torch
from test_data_fixtures import synthetic

from famevil_fast.cli.main import main
from famevil_fast.data.attributes import (
    AttributeFile,
    load_attributes,
    mine_attributes,
    mine_dataset,
    read_attribute_file,
    singular_forms,
    words,
    write_attribute_file,
)
from famevil_fast.data.loader import _image_paths
from famevil_fast.data.pretrain import build_pretrain_loader, pretrain_table
from famevil_fast.data.tasks import read_products
from famevil_fast.data.transforms import counter_uniforms
from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.transfer import load_shared_weights

CORPUS = [
    "A black cotton t-shirt with long sleeves.",
    "Black wool dress. Long sleeve, beautifully cut.",
    "White cotton dresses, made in Italy.",
    "Striped shirt in white cotton; features two pockets.",
]


# ------------------------------------------------------------------------------------------ miner
def test_words_drop_function_words_verbs_and_adverbs():
    assert words(CORPUS[1]) == ["black", "wool", "dress", "long", "sleeve", "cut"]
    assert words(CORPUS[3]) == ["striped", "shirt", "white", "cotton", "pockets"]
    assert singular_forms("accessories") == ["accessory", "accessori", "accessorie"]
    assert singular_forms("dress") == [] and singular_forms("shoes") == ["sho", "shoe"]
    kept = ["italy", "butterfly", "print", "poly", "jersey"]  # nouns in -ly are not adverbs
    assert words("Made in Italy: butterfly print, poly jersey.") == kept


def test_garment_plurals_stay_apart_from_their_singulars():
    """ "shorts" (a garment) is not "short" (a length), nor "glasses" "glass"; "sleeves" still is "sleeve"."""
    corpus = ["black denim shorts", "short sleeve shirt", "short sleeves", "glasses case", "glass beads"] * 2
    vocab = mine_attributes(corpus, min_count=2)
    assert {"shorts", "short", "glasses", "glass", "sleeve"} <= set(vocab.attributes)
    assert "sleeves" not in vocab.attributes
    assert vocab.index["shorts"] in vocab.encode("black shorts")
    assert vocab.index["short"] not in vocab.encode("black shorts")


def test_miner_finds_the_known_vocabulary():
    vocab = mine_attributes(CORPUS, min_count=2)
    # sleeves -> sleeve and dresses -> dress (the singulars occur); "pockets" has no singular in the corpus
    assert vocab.attributes == ("cotton", "black", "dress", "long", "sleeve", "white")
    assert vocab.counts == (3, 2, 2, 2, 2, 2)
    assert vocab.encode(CORPUS[3]) == (0, 5)
    assert vocab.encode("Long-sleeve DRESSES, black.") == (1, 2)
    assert vocab.encode("nothing known here") == ()
    assert mine_attributes(CORPUS, min_count=2, max_attributes=3).attributes == ("cotton", "black", "dress")
    assert len(mine_attributes(CORPUS, min_count=1)) == 13  # "italy" among them


@pytest.mark.parametrize(
    "kwargs, message", [(dict(min_count=0), "min_count"), (dict(max_attributes=0), "max_attributes")]
)
def test_miner_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mine_attributes(CORPUS, **kwargs)


def test_attribute_file_round_trip_and_errors(tmp_path):
    vocab = mine_attributes(CORPUS, min_count=2)
    products = {"train": {7: (0, 5), 9: ()}}
    path = write_attribute_file(tmp_path / "a.json", vocab, products, "fashiongen")
    back = read_attribute_file(path)
    assert back.vocabulary == vocab and back.products == products
    with pytest.raises(FileNotFoundError, match="mine-attributes"):
        read_attribute_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_attribute_file(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not an attribute file"):
        read_attribute_file(tmp_path / "other.json")
    data = json.loads(path.read_text())
    data["products"]["train"]["7"] = [6]
    (tmp_path / "range.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"product 7 \(train\).*\[0, 6\)"):
        read_attribute_file(tmp_path / "range.json")


def test_mine_attributes_command(tmp_path_factory, capsys):
    root = synthetic(tmp_path_factory)
    out = tmp_path_factory.mktemp("attributes") / "attrs.json"
    assert main(["mine-attributes", str(root), "--out", str(out), "--min-count", "3"]) == 0
    assert "attributes" in capsys.readouterr().out
    mined = read_attribute_file(out)
    train = read_products("fashiongen", root, "train")
    assert sorted(mined.split("train")) == sorted(p.id for p in train)
    assert set(mined.products) == {"train", "val"}
    assert all(c >= 3 for c in mined.vocabulary.counts)
    first = train[0]
    assert mined.split("train")[first.id] == mined.vocabulary.encode(first.text) != ()


# ------------------------------------------------------------------------------------------ loaders
def _loader(root, task, **kw):
    return build_pretrain_loader(
        task, root, batch_size=4, image_size=32, seed=3, device="cpu", backend="pil", prefetch=0, **kw
    )


def test_mvc_draws_two_different_views_when_a_product_has_them(tmp_path_factory):
    root = synthetic(tmp_path_factory)
    table = pretrain_table("mvc", root)
    idx = np.arange(len(table))
    u = {s: counter_uniforms(1, 0, idx, slot=i) for i, s in enumerate(table.slots)}
    paths, _ = _image_paths(table, idx, u)
    view_a, view_b = paths[: len(idx)], paths[len(idx) :]
    counts = [len(v) for v in table.images["pixels"]]
    assert any(n == 1 for n in counts) and any(n > 1 for n in counts)
    for a, b, n, choices in zip(view_a, view_b, counts, table.images["pixels"]):
        assert a in choices and b in choices
        assert (a != b) == (n > 1)


def test_mvc_batch_augments_single_view_products(tmp_path_factory):
    root = synthetic(tmp_path_factory)
    loader = _loader(root, "mvc")
    batch = next(iter(loader))
    assert set(batch) == {"pixels", "fused_pixels", "input_ids", "product_ids"}
    assert batch["pixels"].shape == batch["fused_pixels"].shape == (4, 3, 32, 32)
    assert all(not torch.equal(a, b) for a, b in zip(batch["pixels"], batch["fused_pixels"]))


@pytest.mark.parametrize("task", ["mvc", "pac", "itm"])
def test_pretrain_loaders_resume_exactly(tmp_path_factory, task):
    root = synthetic(tmp_path_factory)
    first = _loader(root, task)
    stream = first.stream()
    next(stream)
    state = first.state_dict()
    want = next(stream)
    second = _loader(root, task)
    second.load_state_dict(state)
    got = next(second.stream())
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_pac_batches_carry_the_products_attribute_ids(tmp_path_factory):
    root = synthetic(tmp_path_factory)
    mined = mine_dataset(root, min_count=2)
    batch = next(iter(_loader(root, "pac", attributes=mined)))
    for pid, row in zip(batch["product_ids"].tolist(), batch["attribute_ids"].tolist()):
        assert tuple(a for a in row if a >= 0) == mined.split("train")[pid]
    partial = AttributeFile(
        mined.vocabulary, {"train": dict(list(mined.split("train").items())[:3])}, "partial"
    )
    with pytest.raises(ValueError, match="no attributes for"):
        pretrain_table("pac", root, attributes=partial)
    with pytest.raises(ValueError, match="unknown pre-training task"):
        pretrain_table("mlm", root)


# ------------------------------------------------------------------------------------------ transfer
def test_shared_weights_move_to_a_model_with_other_tasks(tmp_path):
    pre = FameViL(
        FameViLConfig(clip=clip_preset("micro"), tasks=("itc", "mvc", "pac", "itm"), num_attributes=5)
    )
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.1)
    pre.save_pretrained(tmp_path / "pre")
    fine = FameViL(FameViLConfig(clip=clip_preset("micro"), tasks=("itc", "scr"), num_classes=7))
    fresh_scr = fine.vision.blocks[0].tsa.adapters["scr"].down.weight.detach().clone()
    report = load_shared_weights(fine, tmp_path / "pre")
    own = pre.state_dict()
    for name, value in fine.state_dict().items():
        if name in own:
            assert torch.equal(value, own[name]), name
    assert torch.equal(fine.vision.blocks[0].tsa.adapters["scr"].down.weight, fresh_scr)
    assert any(".xaa." in n for n in report.loaded) and any(".adapters.scr." in n for n in report.fresh)
    assert any("heads.pac" in n for n in report.unused)
    one_line = (
        r"^the state dict cannot start this model: "
        r"backbone keys missing \(1, e\.g\. vision\.ln_pre\.weight\)$"
    )
    with pytest.raises(ValueError, match=one_line):
        load_shared_weights(fine, {k: v for k, v in own.items() if k != "vision.ln_pre.weight"})


def test_no_attribute_mined_or_read_is_named(tmp_path_factory, tmp_path, capsys):
    root = synthetic(tmp_path_factory)
    with pytest.raises(ValueError, match="no attribute mined .* min_count=100000"):
        load_attributes(root, min_count=100000)
    assert (
        main(["mine-attributes", str(root), "--out", str(tmp_path / "a.json"), "--min-count", "100000"]) == 2
    )
    assert "no attribute mined" in capsys.readouterr().err and not (tmp_path / "a.json").exists()
    empty = tmp_path / "empty.json"
    write_attribute_file(empty, mine_attributes(["a red dress"], min_count=5), {"train": {}}, "fashiongen")
    with pytest.raises(ValueError, match="empty.json holds no attribute"):
        load_attributes(root, empty)


def test_pac_on_the_datasets_own_attribute_ids(tmp_path_factory):
    root = synthetic(tmp_path_factory)
    attributes = load_attributes(root, "dataset")
    train = read_products("fashiongen", root, "train")
    assert attributes.split("train") == {p.id: tuple(sorted(set(p.attributes_id))) for p in train}
    largest = max(i for p in train for i in p.attributes_id)
    assert len(attributes.vocabulary) >= largest + 1
    assert sum(attributes.vocabulary.counts) == sum(len(set(p.attributes_id)) for p in train)
    table = pretrain_table("pac", root, "train", attributes=attributes)
    first = table.fields["attribute_ids"][0]
    assert table.fields["attribute_ids"].dtype == torch.int32  # half of int64's table in every process
    assert sorted(i for i in first.tolist() if i >= 0) == sorted(set(train[0].attributes_id))


def test_pac_on_dataset_ids_without_any_is_named(tmp_path):
    from famevil_fast.data.attributes import dataset_attributes

    (tmp_path / "FashionGen").mkdir()
    row = {"images": ["a.png"], "id": 1, "title": "t", "description": "d", "subcategory_id": 0}
    (tmp_path / "FashionGen" / "train_info.json").write_text(json.dumps([row]))
    with pytest.raises(ValueError, match="carries attributes_id"):
        dataset_attributes(tmp_path)


def test_dataset_attribute_ids_out_of_range_are_named(tmp_path):
    """A negative id (the padding's -1 among them) is refused where it is read; an id past any vocabulary
    (it would make a classifier of that many classes) where the classes are counted."""
    from famevil_fast.data.attributes import MAX_DATASET_ATTRIBUTES, dataset_attributes

    (tmp_path / "FashionGen").mkdir()
    row = {"images": ["a.png"], "title": "t", "description": "d", "subcategory_id": 0}
    rows = [dict(row, id=1, attributes_id=[0]), dict(row, id=2, images=["b.png"], attributes_id=[3])]
    info = tmp_path / "FashionGen" / "train_info.json"
    for bad, message in [
        (-1, r"train_info.json: entry 1 \(id 2\): field 'attributes_id' must be a list of integers from 0"),
        (MAX_DATASET_ATTRIBUTES, rf"fashiongen train product 2 .* has attribute id {MAX_DATASET_ATTRIBUTES}"),
    ]:
        rows[1]["attributes_id"] = [3, bad]
        info.write_text(json.dumps(rows))
        with pytest.raises(ValueError, match=message):
            dataset_attributes(tmp_path)
    rows[1]["attributes_id"] = [3, MAX_DATASET_ATTRIBUTES - 1]  # the largest id allowed
    info.write_text(json.dumps(rows))
    assert len(dataset_attributes(tmp_path).vocabulary) == MAX_DATASET_ATTRIBUTES
