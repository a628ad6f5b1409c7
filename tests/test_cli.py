"""Inference commands end to end on a tiny checkpoint: convert, embed, caption, info."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_WITH_VOCAB as TINY
from helpers import perturb_, save_micro_checkpoint
from PIL import Image
from safetensors.torch import load_file

from famevil_fast.cli.main import main
from famevil_fast.model import FameViL, FameViLConfig, clip_preset

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt"), std=0.05)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_convert_to_official_and_back(checkpoint, tmp_path):
    assert main(["convert", str(checkpoint), str(tmp_path / "official.pth"), "--to", "official"]) == 0
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "back")]) == 0
    a, b = FameViL.from_pretrained(checkpoint), FameViL.from_pretrained(tmp_path / "back", clip=MICRO.clip)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_embed_images_and_texts(checkpoint, images, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("red silk dress\nblue denim jacket with pockets\n\n")  # a blank line at the end: no text
    out = tmp_path / "emb.safetensors"
    assert (
        main(["embed", str(checkpoint), "--images", str(images), "--texts", str(texts), "--out", str(out)])
        == 0
    )
    tensors = load_file(str(out))
    assert tensors["image"].shape == (3, 64) and tensors["text"].shape == (2, 64)
    assert torch.allclose(tensors["text"].norm(dim=-1), torch.ones(2))


def test_embed_keeps_a_long_image_list_beside_the_file(checkpoint, images, tmp_path, monkeypatch):
    from safetensors import safe_open

    from famevil_fast.cli import gallery_file

    out = tmp_path / "emb.safetensors"
    files = sorted(map(str, images.iterdir()))
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 10)
    assert main(["embed", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    listing = tmp_path / meta["images_file"]
    assert "images" not in meta and listing.name.startswith("emb.safetensors.images.")
    assert listing.read_text().splitlines() == files
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 1 << 20)
    assert main(["embed", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["images"].split("\n") == files
    assert not listing.exists()  # no stale list beside a file whose header holds its own


def test_a_failed_embed_leaves_the_earlier_gallery_readable(checkpoint, images, tmp_path, monkeypatch):
    """A later embed to the same name that fails while writing leaves the earlier gallery as it was: its
    list file is not replaced (each list has its own name) nor removed (until a header stops naming it)."""
    import famevil_fast.files
    from famevil_fast.cli import gallery_file
    from famevil_fast.cli.gallery_file import read_gallery

    out = tmp_path / "emb.safetensors"
    files = sorted(images.iterdir())
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 10)
    assert main(["embed", str(checkpoint), "--images", *map(str, files), "--out", str(out)]) == 0
    before = read_gallery(out)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(famevil_fast.files, "atomic_save_safetensors", no_space)
    for limit, chosen in ((10, files[:2]), (1 << 20, files)):  # a new list file; the list in the header
        monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", limit)
        with pytest.raises(OSError):
            main(["embed", str(checkpoint), "--images", *map(str, chosen), "--out", str(out)])
        embeddings, paths, task = read_gallery(out)
        assert torch.equal(embeddings, before[0]) and paths == list(map(str, files)) and task == before[2]


def test_only_the_files_own_stale_lists_are_removed(checkpoint, images, tmp_path, monkeypatch):
    from famevil_fast.cli import gallery_file
    from famevil_fast.cli.gallery_file import read_gallery

    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 10)
    other = tmp_path / "emb.safetensors.images.x.safetensors"  # a gallery named as this one's lists start
    assert main(["embed", str(checkpoint), "--images", str(images), "--out", str(other)]) == 0
    notes = tmp_path / "emb.safetensors.images.notes.txt"
    notes.write_text("mine")
    out = tmp_path / "emb.safetensors"
    for limit in (10, 1 << 20):  # a list file, then the list in the header: the first list is removed
        monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", limit)
        assert main(["embed", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    assert not list(tmp_path.glob("emb.safetensors.images.????????????????.txt"))
    assert notes.read_text() == "mine" and len(read_gallery(other)[1]) == len(list(images.iterdir()))


def test_a_list_file_that_is_not_the_headers_is_refused(checkpoint, images, tmp_path, monkeypatch):
    from famevil_fast.cli import gallery_file
    from famevil_fast.cli.gallery_file import read_gallery

    out = tmp_path / "emb.safetensors"
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 10)
    assert main(["embed", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    listing = next(tmp_path.glob("emb.safetensors.images.*.txt"))
    listing.write_text("\n".join(reversed(listing.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match="is not the one gallery .* was written with"):
        read_gallery(out)


def test_image_paths_a_gallery_cannot_list_are_refused_before_embedding(checkpoint, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (40, 48), "red").save(folder / "a\nb.png")
    out = tmp_path / "emb.safetensors"
    assert main(["embed", str(checkpoint), "--images", str(folder), "--out", str(out)]) == 2
    assert "holds a line break" in capsys.readouterr().err and not out.exists()


def test_a_list_file_keeps_paths_with_unusual_line_separators(checkpoint, tmp_path, monkeypatch):
    from famevil_fast.cli import gallery_file
    from famevil_fast.cli.gallery_file import read_gallery

    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("a\u2028b.png", "c\x85d.png", "plain.png"):
        Image.new("RGB", (40, 48), "blue").save(folder / name)
    out = tmp_path / "emb.safetensors"
    monkeypatch.setattr(gallery_file, "IMAGE_LIST_IN_HEADER_MAX", 0)
    assert main(["embed", str(checkpoint), "--images", str(folder), "--out", str(out)]) == 0
    assert read_gallery(out)[1] == sorted(str(p) for p in folder.iterdir())


def test_embed_resizes_as_asked(checkpoint, images, tmp_path):
    """--eval-resize reaches the transform: the 40 x 48 images keep their aspect by default and are squashed
    with `squash`, each giving the embedding of the reference transform in that mode."""
    from PIL import Image

    from famevil_fast.data.transforms import reference_transform

    model = FameViL.from_pretrained(checkpoint)
    files = sorted(images.iterdir())
    embeddings = {}
    for mode in ("keep_aspect", "squash"):
        out = tmp_path / f"{mode}.safetensors"
        args = ["embed", str(checkpoint), "--images", *map(str, files), "--eval-resize", mode]
        assert main([*args, "--out", str(out)]) == 0
        embeddings[mode] = load_file(str(out))["image"]
        with torch.no_grad():
            pixels = torch.stack([reference_transform(Image.open(f), 32, eval_resize=mode) for f in files])
            assert torch.allclose(embeddings[mode], model.encode_image(pixels, "itc"), atol=1e-5)
    assert not torch.allclose(embeddings["keep_aspect"], embeddings["squash"], atol=1e-4)
    default = tmp_path / "default.safetensors"
    assert main(["embed", str(checkpoint), "--images", *map(str, files), "--out", str(default)]) == 0
    assert torch.equal(load_file(str(default))["image"], embeddings["keep_aspect"])


def test_caption_prints_one_line_per_image(checkpoint, images, capsys):
    assert main(["caption", str(checkpoint), str(images), "--max-len", "5", "--beams", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("\t" in line for line in lines)
    assert (
        main(["caption", str(checkpoint), str(images), "--max-len", "5", "--beams", "2", "--cuda-graph"]) == 0
    )
    assert capsys.readouterr().out.strip().splitlines() == lines  # same captions through the graph path
    compiled = ["--beams", "2", "--cuda-graph", "--compile"]
    assert main(["caption", str(checkpoint), str(images), "--max-len", "5", *compiled]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines  # and through the compiled steps
    assert main(["caption", str(checkpoint), str(images), "--max-len", "5", "--op-backend", "triton"]) == 0
    fused = capsys.readouterr().out.strip().splitlines()  # greedy, each layer of a step fused
    assert main(["caption", str(checkpoint), str(images), "--max-len", "5"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == fused


def test_caption_blocks_repeated_ngrams(checkpoint, images, capsys):
    from famevil_fast.cli.images import collect_images
    from famevil_fast.data.image_files import load_images

    args = ["caption", str(checkpoint), str(images), "--max-len", "12", "--no-repeat-ngram", "1"]
    assert main(args) == 0
    printed = [line.split("\t", 1)[1] for line in capsys.readouterr().out.strip().splitlines()]
    model = FameViL.from_pretrained(checkpoint).eval()
    pixels = load_images(collect_images([str(images)]), model.config.clip.vision.image_size)
    with torch.no_grad():
        assert printed == model.caption(pixels, max_len=12, no_repeat_ngram=1)
        ids = model.caption(pixels, max_len=12, no_repeat_ngram=1, return_ids=True)
    for row in ids.tolist():
        tokens = row[1 : row.index(49407)] if 49407 in row else row[1:]
        assert len(tokens) == len(set(tokens))
    with pytest.raises(SystemExit, match="2"):
        main(["caption", str(checkpoint), str(images), "--no-repeat-ngram", "-1"])
    assert "argument --no-repeat-ngram: must be at least 0" in capsys.readouterr().err


def test_unreadable_image_is_named(checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["caption", str(checkpoint), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("famevil-fast caption: error: ") and "broken.png" in err[0]
    with pytest.raises(ValueError, match="broken.png"):
        main(["--traceback", "caption", str(checkpoint), str(bad)])


def test_missing_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nothing-here"
    assert main(["eval", str(missing), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    monkeypatch.setenv("FAMEVIL_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["eval", str(missing), "--data", str(tmp_path)])


def test_info_counts_a_checkpoint(checkpoint, capsys):
    assert main(["info", "--checkpoint", str(checkpoint)]) == 0
    assert "total" in capsys.readouterr().out


def test_print_config_shows_the_recipe_with_its_overrides(capsys):
    assert main(["train", "--config", "tiny_cpu", "--set", "optim.lr=0.01", "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  lr: 0.01  # ") for line in lines)
    from famevil_fast.configs import resolve

    from famevil_fast.train.config import TrainSection, load_config

    updates = load_config(resolve("tiny_cpu")).train.updates
    assert updates != TrainSection().updates
    assert any(line.startswith(f"  updates: {updates}  # ") for line in lines)  # the recipe's value


def test_eval_options_from_a_recipe_and_the_flags():
    from famevil_fast.cli.commands.eval import eval_options
    from famevil_fast.cli.main import build_parser

    def options(*extra):
        return eval_options(build_parser().parse_args(["eval", "ckpt", "--data", "d", *extra]))

    demo = options("--config", "tiny_cpu")
    assert (demo.caption_beams, demo.caption_max_len, demo.caption_no_repeat_ngram) == (3, 60, 2)
    assert list(demo.caption_metrics) == ["bleu4", "rouge_l", "cider"]
    mixed = options("--config", "tiny_cpu", "--beams", "1", "--xmr-protocols", "full", "--seed", "4")
    assert (mixed.caption_beams, mixed.caption_max_len, mixed.sampled_seed) == (1, 60, 4)
    assert list(mixed.xmr_protocols) == ["full"]
    plain = options("--cuda-graph")
    assert (plain.caption_beams, plain.caption_max_len, plain.caption_no_repeat_ngram) == (1, 75, 0)
    assert plain.caption_metrics is None and plain.caption_cuda_graph and not plain.caption_compile
    assert options("--compile").caption_compile
    assert plain.sampled_seed == 0 and not plain.caption_len_from_references
    assert plain.caption_references == "clip"
    assert (plain.eval_resize, plain.views) == ("keep_aspect", "all")
    assert (demo.eval_resize, demo.views) == ("keep_aspect", "all")
    other = options("--config", "tiny_cpu", "--eval-resize", "squash", "--views", "first")
    assert (other.eval_resize, other.views, other.caption_beams) == ("squash", "first", 3)
    faithful = options("--seed", "4", "--unseeded", "--max-len-from-references", "--references", "raw")
    assert faithful.sampled_seed is None and faithful.caption_len_from_references
    assert faithful.caption_references == "raw" and not faithful.caption_cuda_graph


def test_eval_scores_a_checkpoint_on_a_dataset(checkpoint, tmp_path_factory, tmp_path, capsys):
    from test_data_fixtures import synthetic

    data = synthetic(tmp_path_factory, products=40, image_size=48)
    out = tmp_path / "report.json"
    args = ["eval", str(checkpoint), "--data", str(data), "--tasks", "itc", "cap", "--config", "tiny_cpu"]
    assert (
        main([*args, "--max-len", "6", "--max-samples", "8", "--xmr-protocols", "full", "--out", str(out)])
        == 0
    )
    assert "FIC: fashion image captioning" in capsys.readouterr().out
    results = {r["task"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"xmr", "fic"}
    assert set(results["fic"]["metrics"]) == {"bleu4", "rouge_l", "cider"}  # the recipe's metrics
    fused = [*args, "--tasks", "cap", "--max-len", "6", "--max-samples", "8", "--op-backend", "triton"]
    assert main([*fused, "--out", str(out)]) == 0  # the Triton kernels, captions decoded by the fused step
    assert json.loads(out.read_text())["results"][0]["metrics"] == results["fic"]["metrics"]


def test_eval_scores_clip_zero_shot_on_retrieval(tmp_path_factory, tmp_path, capsys):
    """`eval --clip` scores a CLIP-only file (which `from_pretrained` refuses) on XMR and TGIR, the same
    numbers as the FAME-ViL model built from it, whose fresh adapters add nothing."""
    from test_data_fixtures import synthetic

    from famevil_fast.eval.runner import EvalOptions, Evaluator
    from famevil_fast.model.export import save_huggingface

    data = synthetic(tmp_path_factory, products=40, image_size=48)
    clip_file = tmp_path / "clip.safetensors"
    save_huggingface(perturb_(FameViL(MICRO), std=0.05), clip_file)
    out = tmp_path / "report.json"
    flags = ["--xmr-protocols", "full", "--max-samples", "8", "--batch-size", "4"]
    assert main(["eval", str(clip_file), "--clip", "--data", str(data), *flags, "--out", str(out)]) == 0
    results = {r["task"]: r["metrics"] for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"xmr", "tgir"}
    from famevil_fast.data import build_eval_sets

    model = FameViL.from_clip(clip_file)
    sets = {t: build_eval_sets(t, data, image_size=32, batch_size=4) for t in ("itc", "tgir")}
    options = EvalOptions(xmr_protocols=("full",), max_samples=8)
    expected = {r.task: r.metrics for r in Evaluator(sets, options).report(model).results}
    for task, metrics in results.items():
        assert metrics == pytest.approx(expected[task])
    assert main(["eval", str(clip_file), "--clip", "--data", str(data), "--tasks", "scr"]) == 2
    assert "no trained head for ['scr']" in capsys.readouterr().err
    assert main(["eval", str(clip_file), "--data", str(data)]) == 2  # a CLIP file without --clip
    assert "`famevil-fast eval --clip` scores it zero-shot" in capsys.readouterr().err


def test_eval_views_and_resize_reach_the_report(checkpoint, tmp_path_factory, tmp_path, capsys):
    from test_data_fixtures import synthetic

    from famevil_fast.data.fashiongen import read_fashiongen

    data = synthetic(tmp_path_factory, products=40, image_size=48)
    out = tmp_path / "report.json"
    args = ["eval", str(checkpoint), "--data", str(data), "--tasks", "scr", "tgir", "--out", str(out)]
    assert main([*args, "--views", "first", "--eval-resize", "squash"]) == 0
    scr, tgir = json.loads(out.read_text())["results"]
    assert scr["details"]["views"] == "first" and scr["details"]["eval_resize"] == "squash"
    assert scr["details"]["num_samples"] == len(read_fashiongen(data, "val"))  # one view per product
    assert {"category_accuracy", "category_macro_f1"} <= set(scr["metrics"])
    assert tgir["details"]["eval_resize"] == "squash"
    assert "views=first, eval_resize=squash" in capsys.readouterr().out
    assert main(args) == 0
    scr, tgir = json.loads(out.read_text())["results"]
    assert (scr["details"]["views"], scr["details"]["eval_resize"]) == ("all", "keep_aspect")
    assert tgir["details"]["eval_resize"] == "keep_aspect"
    with pytest.raises(SystemExit, match="2"):
        main([*args, "--eval-resize", "stretch"])
    assert "--eval-resize: invalid choice" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    perturb_(FameViL(TINY), std=0.05).save_pretrained(path)
    return path


def _same_embeddings(a, b):
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 49406, (2, 9))
    ids[:, 0], ids[:, -1] = 49406, 49407
    with torch.no_grad():
        return torch.equal(a.encode_image(pixels), b.encode_image(pixels)) and torch.equal(
            a.encode_text(ids), b.encode_text(ids)
        )


@pytest.mark.parametrize("name", ["official.pth", "official.safetensors"])
def test_convert_tiny_to_official_and_back_keeps_heads_and_caption_vocab(tiny_checkpoint, tmp_path, name):
    out = tmp_path / name
    assert main(["convert", str(tiny_checkpoint), str(out), "--to", "official"]) == 0
    if name.endswith(".safetensors"):
        assert "model.heads.cap.weight" in load_file(str(out))  # really safetensors, not a torch pickle
    assert main(["convert", str(out), str(tmp_path / "back")]) == 0
    a, b = FameViL.from_pretrained(tiny_checkpoint).eval(), FameViL.from_pretrained(tmp_path / "back").eval()
    assert b.config == TINY
    assert _same_embeddings(a, b)


def test_convert_tiny_to_huggingface_and_back_keeps_the_clip_config(tiny_checkpoint, tmp_path):
    from famevil_fast.model import CLIP

    out = tmp_path / "clip.safetensors"
    assert main(["convert", str(tiny_checkpoint), str(out), "--to", "huggingface"]) == 0
    assert main(["convert", str(out), str(tmp_path / "back"), "--from-clip", "--bottleneck", "8"]) == 0
    back = FameViL.from_pretrained(tmp_path / "back")
    assert back.config.clip == TINY.clip
    a, b = CLIP.from_pretrained(tiny_checkpoint).eval(), CLIP.from_pretrained(out).eval()
    assert _same_embeddings(a, b)


def test_convert_output_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    src = str(tiny_checkpoint)
    (tmp_path / "taken").write_text("")
    cases = {
        str(tmp_path / "out.zip"): "out.zip in: its name must end in one of",
        str(tmp_path / "taken" / "c.pth"): "taken is a file, not a directory",
    }
    for dest, message in cases.items():
        assert main(["convert", src, dest, "--to", "official"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("famevil-fast convert: error: cannot ") and message in err
        assert err.count("\n") == 1
    assert main(["convert", src, str(tmp_path / "d.pth")]) == 2
    assert "--to famevil_fast writes a directory" in capsys.readouterr().err
    # a missing output directory is created, for files as for famevil_fast directories
    assert main(["convert", src, str(tmp_path / "new" / "dir" / "c.pth"), "--to", "official"]) == 0
    assert (tmp_path / "new" / "dir" / "c.pth.config.json").exists()
    assert main(["convert", src, str(tmp_path / "new2" / "h.safetensors"), "--to", "huggingface"]) == 0


def test_convert_names_what_it_cannot_read(tiny_checkpoint, tmp_path, capsys):
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "c.pth"), "--to", "official"]) == 0
    (tmp_path / "c.pth.config.json").unlink()
    assert main(["convert", str(tmp_path / "c.pth"), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert "c.pth carries no model config" in err and "--clip PRESET" in err
    assert main(["convert", str(tmp_path / "c.pth"), str(tmp_path / "back"), "--clip", "tiny"]) == 0
    assert FameViL.from_pretrained(tmp_path / "back").config.clip == TINY.clip
    (tmp_path / "back" / "config.json").write_text("{\n")
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'back' / 'config.json'}: not valid JSON" in err


def test_op_backend_overrides_a_checkpoints_activation_backend(images, tmp_path, monkeypatch, capsys):
    """A checkpoint trained with the QuickGELU kernels (``activation_backend: triton``) embeds and searches
    on a CPU without the Triton interpreter once ``--op-backend torch`` puts every op on PyTorch."""
    perturb_(FameViL(MICRO.replace(activation_backend="triton"))).save_pretrained(tmp_path / "ckpt")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "gallery.safetensors"
    embed = ["embed", str(tmp_path / "ckpt"), "--images", str(images), "--out", str(out)]
    assert main(embed) != 0
    assert "quick_gelu: backend 'triton' runs on CUDA tensors" in capsys.readouterr().err
    assert main([*embed, "--op-backend", "torch"]) == 0
    search = ["search", str(tmp_path / "ckpt"), str(out), "--text", "red dress", "--op-backend", "torch"]
    assert main(search) == 0
