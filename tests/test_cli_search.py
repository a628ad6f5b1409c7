"""`famevil-fast search` on a tiny checkpoint: text-to-image and text-guided rankings equal a brute-force
cosine ranking, the gallery's image list is read from the header or the file beside it, and every error
in what the user gave is one line with exit status 2."""

import json

import numpy as np
import pytest
import torch
from helpers import perturb_, save_micro_checkpoint
from PIL import Image
from safetensors.torch import save_file

from famevil_fast.cli import gallery_file
from famevil_fast.cli.gallery_file import model_fingerprint, read_gallery
from famevil_fast.cli.main import main
from famevil_fast.data.image_files import load_images
from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.text import tokenize

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)
TEXTS = ["red silk dress", "blue denim jacket"]
TASKS = ("itc", "tgir")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt"), std=0.05)


@pytest.fixture(scope="module")
def model(checkpoint):
    return FameViL.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _embed(checkpoint, images, out, task):
    assert main(["embed", str(checkpoint), "--images", str(images), "--task", task, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def galleries(checkpoint, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("galleries")
    return {task: _embed(checkpoint, images, folder / f"{task}.safetensors", task) for task in TASKS}


def _search(capsys, *args):
    status = main(["search", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _blocks(out):
    """{header: [(rank, score, path), ...]} of the tab-separated output."""
    blocks, header = {}, None
    for line in out.splitlines():
        if line.startswith("#"):
            header = line
            blocks[header] = []
        else:
            rank, score, path = line.split("\t")
            blocks[header].append((int(rank), float(score), path))
    return blocks


def _brute_force(queries, gallery, paths, k):
    scores = queries @ gallery.T
    order = scores.argsort(dim=1, descending=True)[:, :k]
    return [[(paths[i], float(row[i])) for i in rank] for row, rank in zip(scores, order)]


def _check_ranking(found, expected):
    assert [p for _, _, p in found] == [p for p, _ in expected]
    assert [r for r, _, _ in found] == list(range(1, len(expected) + 1))
    assert all(abs(s - e) <= 5e-5 for (_, s, _), (_, e) in zip(found, expected))


def test_text_search_ranks_as_brute_force(checkpoint, model, galleries, capsys):
    status, out, _ = _search(
        capsys, checkpoint, galleries["itc"], "--text", TEXTS[0], "--text", TEXTS[1], "--top-k", 3
    )
    assert status == 0
    gallery, paths, task = read_gallery(galleries["itc"])
    assert task == "itc" and len(paths) == 5
    with torch.no_grad():
        queries = model.encode_text(tokenize(TEXTS), "itc")
    expected = _brute_force(queries, gallery, paths, 3)
    blocks = _blocks(out)
    assert list(blocks) == [f"# text: {t}" for t in TEXTS]
    for found, want in zip(blocks.values(), expected):
        _check_ranking(found, want)


def test_tgir_search_ranks_as_brute_force(checkpoint, model, images, galleries, capsys):
    references = [images / "0.png", images / "3.png"]
    texts = ["is shorter and blue", "has long sleeves"]
    args = [a for ref, text in zip(references, texts) for a in ("--reference", ref, "--text", text)]
    status, out, _ = _search(capsys, checkpoint, galleries["tgir"], *args, "--top-k", 4)
    assert status == 0
    gallery, paths, _ = read_gallery(galleries["tgir"])
    with torch.no_grad():
        queries = model.compose(load_images(references, 32), tokenize(texts))
    blocks = _blocks(out)
    assert list(blocks) == [f"# reference: {r}\ttext: {t}" for r, t in zip(references, texts)]
    for found, want in zip(blocks.values(), _brute_force(queries, gallery, paths, 4)):
        _check_ranking(found, want)


def test_one_reference_serves_every_text(checkpoint, model, images, tmp_path, capsys):
    """The reference is read with the gallery's --eval-resize, which embed records (squash here)."""
    squashed = tmp_path / "squash.safetensors"
    argv = ["embed", checkpoint, "--images", images, "--task", "tgir", "--eval-resize", "squash"]
    assert main([*map(str, argv), "--out", str(squashed)]) == 0
    capsys.readouterr()
    reference = images / "2.png"
    texts = ["is shorter", "is darker", "has a collar"]
    args = [checkpoint, squashed, "--reference", reference, "--json"]
    status, out, _ = _search(capsys, *args, *[a for t in texts for a in ("--text", t)])
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["reference"], r["text"]) for r in rows] == [(str(reference), t) for t in texts]
    gallery, paths, _ = read_gallery(squashed)
    with torch.no_grad():
        pixels = load_images([reference] * 3, 32, "squash")
        queries = model.compose(pixels, tokenize(texts))
    for row, want in zip(rows, _brute_force(queries, gallery, paths, 10)):
        found = [(r["rank"], r["score"], r["path"]) for r in row["results"]]
        _check_ranking(found, want)


def test_top_k_larger_than_the_gallery_returns_it_all(checkpoint, galleries, images, capsys):
    status, out, _ = _search(capsys, checkpoint, galleries["itc"], "--text", TEXTS[0], "--top-k", 1000)
    assert status == 0
    ranked = _blocks(out)[f"# text: {TEXTS[0]}"]
    assert sorted(p for _, _, p in ranked) == sorted(map(str, images.iterdir()))
    scores = [s for _, s, _ in ranked]
    assert scores == sorted(scores, reverse=True)


def test_the_image_list_beside_the_file_is_read(checkpoint, images, galleries, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 10)
    out = _embed(checkpoint, images, tmp_path / "sidecar.safetensors", "itc")
    assert len(list(tmp_path.glob("sidecar.safetensors.images.*.txt"))) == 1
    gallery, paths, task = read_gallery(out)
    assert paths == sorted(map(str, images.iterdir())) and task == "itc" and gallery.shape == (5, 64)
    capsys.readouterr()
    searched = [_search(capsys, checkpoint, g, "--text", TEXTS[1])[1] for g in (out, galleries["itc"])]
    assert searched[0] == searched[1]


def _gallery(path, tensors, **meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _error(capsys, *args):
    status, out, err = _search(capsys, *args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("famevil-fast search: error: ")
    return err


def test_user_errors_are_one_line(checkpoint, images, galleries, tmp_path, capsys):
    ckpt, itc, tgir = checkpoint, galleries["itc"], galleries["tgir"]
    ref = images / "0.png"
    paths = "\n".join(map(str, sorted(images.iterdir())))
    assert "gallery file not found" in _error(capsys, ckpt, tmp_path / "none.safetensors", "--text", "a")
    texts_only = _gallery(tmp_path / "texts.safetensors", {"text": torch.randn(2, 64)}, task="itc")
    assert "no 'image' tensor" in _error(capsys, ckpt, texts_only, "--text", "a")
    assert "--task itc" in _error(capsys, ckpt, tgir, "--text", "a")
    assert "--task tgir" in _error(capsys, ckpt, itc, "--reference", ref, "--text", "a")
    narrow = _gallery(tmp_path / "narrow.st", {"image": torch.randn(5, 32)}, images=paths, task="itc")
    assert "32-wide" in _error(capsys, ckpt, narrow, "--text", "a")
    assert "no query" in _error(capsys, ckpt, itc)
    assert "needs --text" in _error(capsys, ckpt, tgir, "--reference", ref)
    assert "--top-k" in _error(capsys, ckpt, itc, "--text", "a", "--top-k", 0)
    assert "is empty" in _error(capsys, ckpt, itc, "--text", " ")
    short = _gallery(tmp_path / "short.st", {"image": torch.randn(4, 64)}, images=paths, task="itc")
    assert "5 image paths for 4 embeddings" in _error(capsys, ckpt, short, "--text", "a")
    pairs = ["--reference", ref, "--reference", ref, "--text", "a", "--text", "b", "--text", "c"]
    assert "2 --reference and 3 --text" in _error(capsys, ckpt, tgir, *pairs)
    missing = tmp_path / "x.png"
    assert "image file not found" in _error(capsys, ckpt, tgir, "--reference", missing, "--text", "a")
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    assert "cannot read gallery" in _error(capsys, ckpt, tmp_path / "junk.safetensors", "--text", "a")
    ints = _gallery(
        tmp_path / "ints.st", {"image": torch.ones(5, 64, dtype=torch.int64)}, images=paths, task="itc"
    )
    assert "'image' must hold floating-point embeddings, got torch.int64" in _error(
        capsys, ckpt, ints, "--text", "a"
    )
    squash = ["--reference", ref, "--text", "a", "--eval-resize", "squash"]
    assert f"{tgir} was embedded with --eval-resize keep_aspect" in _error(capsys, ckpt, tgir, *squash)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A model of the same sizes as ``checkpoint`` (same embedding width) with other weights."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other") / "model"
    perturb_(FameViL(MICRO), std=0.05, seed=1).save_pretrained(path)
    return path


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("task", TASKS)
def test_a_gallery_records_its_model_and_the_same_model_searches_it(
    checkpoint, model, images, galleries, task, capsys
):
    assert _header(galleries[task])["model_fingerprint"] == model_fingerprint(model, task)
    reference = ["--reference", images / "0.png"] if task == "tgir" else []
    status, out, err = _search(capsys, checkpoint, galleries[task], *reference, "--text", TEXTS[0])
    assert status == 0 and out and err == ""


def test_a_gallery_embedded_by_another_model_is_refused(checkpoint, other_checkpoint, galleries, capsys):
    err = _error(capsys, other_checkpoint, galleries["itc"], "--text", TEXTS[0])
    mine = model_fingerprint(FameViL.from_pretrained(checkpoint), "itc")
    theirs = model_fingerprint(FameViL.from_pretrained(other_checkpoint), "itc")
    assert mine != theirs
    assert f"was embedded by another model (fingerprint {mine[:12]}..., this model {theirs[:12]}...)" in err
    assert "--any-model" in err


def test_any_model_searches_a_gallery_of_another_model(other_checkpoint, galleries, capsys):
    status, out, err = _search(capsys, other_checkpoint, galleries["itc"], "--text", TEXTS[0], "--any-model")
    assert status == 0 and err == ""
    assert len(_blocks(out)[f"# text: {TEXTS[0]}"]) == 5


def test_a_gallery_without_a_fingerprint_is_searched_with_a_warning(checkpoint, galleries, tmp_path, capsys):
    gallery, paths, _ = read_gallery(galleries["itc"])
    old = _gallery(tmp_path / "old.safetensors", {"image": gallery}, images="\n".join(paths), task="itc")
    with pytest.warns(UserWarning) as caught:
        status, out, err = _search(capsys, checkpoint, old, "--text", TEXTS[0])
    assert status == 0 and out == _search(capsys, checkpoint, galleries["itc"], "--text", TEXTS[0])[1]
    assert [str(w.message) for w in caught] == [
        f"gallery {old} records no model fingerprint (embedded before embed recorded one), so whether this "
        "model embedded it cannot be checked"
    ]


def test_a_reference_over_pil_s_pixel_limit_is_one_line(checkpoint, galleries, tmp_path, monkeypatch, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    err = _error(capsys, checkpoint, galleries["tgir"], "--reference", bomb, "--text", "a")
    assert f"cannot read image {bomb}: it exceeds PIL's pixel limit" in err
    assert "raise PIL.Image.MAX_IMAGE_PIXELS to read it" in err


def test_help_names_both_kinds_of_query(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    options = ("--text", "--reference", "--top-k", "--json", "--any-model", "--eval-resize")
    assert all(option in out for option in options)
