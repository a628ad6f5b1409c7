"""Bad command-line input ends a command with one line naming the problem: numeric options out of range,
devices this machine lacks, nothing to embed, a demo dataset that is not the one asked for."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import save_micro_checkpoint
from PIL import Image

from famevil_fast.cli.main import main
from famevil_fast.devices import resolve_device


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(path)
    return path


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"famevil-fast {command}: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["caption", "CKPT", "IMG", "--batch-size", "0"], "--batch-size"),
        (["caption", "CKPT", "IMG", "--beams", "-1"], "--beams"),
        (["caption", "CKPT", "IMG", "--no-repeat-ngram", "-2"], "--no-repeat-ngram"),
        (["embed", "CKPT", "--images", "IMG", "--out", "x.safetensors", "--batch-size", "0"], "--batch-size"),
        (["embed", "CKPT", "--images", "IMG", "--out", "x.safetensors", "--task", "cap"], "--task"),
        (["eval", "CKPT", "--data", "D", "--max-samples", "0"], "--max-samples"),
        (["eval", "CKPT", "--data", "D", "--max-len", "two"], "--max-len"),
        (["cache", "D", "OUT", "--max-side", "0"], "--max-side"),
        (["demo", "--updates", "0"], "--updates"),
        (["demo", "--products", "0"], "--products"),
        (["make-synthetic", "D", "--fiq-images", "0"], "--fiq-images"),
    ],
)
def test_numeric_options_out_of_range_are_refused_by_the_parser(argv, option, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", "foo"])
def test_a_malformed_device_is_named(device: str, checkpoint, image, capsys) -> None:
    assert main(["caption", str(checkpoint), str(image), "--device", device]) == 2
    assert f"--device='{device}': expected cpu, cuda or cuda:N" in one_error_line(capsys, "caption")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_named(checkpoint, image, tmp_path, capsys) -> None:
    out = str(tmp_path / "e.safetensors")
    assert main(["embed", str(checkpoint), "--images", str(image), "--out", out, "--device", "cuda"]) == 2
    assert "--device='cuda' but CUDA is not available" in one_error_line(capsys, "embed")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_resolve_device_accepts_the_machine_s_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_embed_without_inputs_or_with_an_empty_text_file(checkpoint, tmp_path, capsys) -> None:
    out = str(tmp_path / "e.safetensors")
    assert main(["embed", str(checkpoint), "--out", out]) == 2
    assert "nothing to embed" in one_error_line(capsys, "embed")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["embed", str(checkpoint), "--texts", str(empty), "--out", out]) == 2
    assert "empty.txt holds no text" in one_error_line(capsys, "embed")


def test_embed_texts_keep_their_line_numbers(checkpoint, tmp_path, capsys) -> None:
    """Row i of ``text`` is line i + 1: a blank line among the texts is refused (naming it), blank lines at
    the end are not texts; a file that is not UTF-8, or a folder, is named in one line."""
    from safetensors.torch import load_file

    out = str(tmp_path / "e.safetensors")
    gap = tmp_path / "gap.txt"
    gap.write_text("red dress\n\nblue coat\n")
    assert main(["embed", str(checkpoint), "--texts", str(gap), "--out", out]) == 2
    assert "gap.txt: line 2 is blank" in one_error_line(capsys, "embed")
    tail = tmp_path / "tail.txt"
    tail.write_text("red dress\nblue coat\n\n \n")
    assert main(["embed", str(checkpoint), "--texts", str(tail), "--out", out, "--device", "cpu"]) == 0
    capsys.readouterr()
    assert load_file(out)["text"].shape[0] == 2
    latin = tmp_path / "latin.txt"
    latin.write_bytes("robe rouge d'\xe9t\xe9\n".encode("latin-1"))
    assert main(["embed", str(checkpoint), "--texts", str(latin), "--out", out]) == 2
    assert "latin.txt is not UTF-8 text (invalid continuation byte" in one_error_line(capsys, "embed")
    assert main(["embed", str(checkpoint), "--texts", str(tmp_path), "--out", out]) == 2
    assert "--texts must name a text file" in one_error_line(capsys, "embed")


def test_an_image_over_pil_s_pixel_limit_is_one_line(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    out = str(tmp_path / "e.safetensors")
    for command, argv in (
        ("caption", ["caption", str(checkpoint), str(bomb), "--device", "cpu"]),
        ("embed", ["embed", str(checkpoint), "--images", str(bomb), "--out", out, "--device", "cpu"]),
    ):
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert f"cannot read image {bomb}: it exceeds PIL's pixel limit" in line
        assert line.endswith("; raise PIL.Image.MAX_IMAGE_PIXELS to read it")


def test_caption_refuses_a_max_len_beyond_the_text_context(checkpoint, image, capsys) -> None:
    from famevil_fast.cli.commands.caption import check_max_len

    assert main(["caption", str(checkpoint), str(image), "--max-len", "77", "--device", "cpu"]) == 2
    assert "--max-len must be at most 76" in one_error_line(capsys, "caption")
    assert main(["caption", str(checkpoint), str(image), "--max-len", "1000", "--device", "cpu"]) == 2
    assert one_error_line(capsys, "caption").endswith("got 1000")
    check_max_len(76, 77)
    with pytest.raises(ValueError, match=r"^--max-len must be at most 15 .*got 16$"):
        check_max_len(16, 16)
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "76" in capsys.readouterr().out


def test_eval_refuses_a_max_len_beyond_the_text_context_before_reading_data(checkpoint, tmp_path, capsys):
    argv = ["eval", str(checkpoint), "--data", str(tmp_path / "none"), "--tasks", "cap", "--max-len", "77"]
    assert main([*argv, "--device", "cpu"]) == 2
    assert one_error_line(capsys, "eval").endswith(
        "--max-len must be at most 76 (the model's text context of 77 tokens, less the start token), got 77"
    )


@pytest.mark.parametrize("name", ["j.npy", "j", "j.safetensors.npy", "j.st"])
def test_embed_refuses_an_output_not_named_safetensors(name, tmp_path, capsys) -> None:
    out = tmp_path / "x" / name
    argv = ["embed", str(tmp_path / "no_ckpt"), "--images", str(tmp_path / "none.png"), "--out", str(out)]
    assert main(argv) == 2  # before the checkpoint or images are looked at
    line = one_error_line(capsys, "embed")
    assert "--out must name a .safetensors file" in line and line.endswith(str(out))
    assert not (tmp_path / "x").exists()


# the keys every synthetic.json of make-synthetic holds, for a 40-product dataset
_RECORD = {
    "generator_version": 2,
    "seed": 0,
    "products_train": 34,
    "products_val": 6,
    "fashiongen_images": 97,
    "fashioniq_images": 40,
}


def test_demo_refuses_an_existing_dataset_of_another_size(tmp_path, capsys) -> None:
    from famevil_fast.cli.commands.demo import ensure_dataset

    data = tmp_path / "data"
    data.mkdir()
    (data / "synthetic.json").write_text(json.dumps(_RECORD))
    ensure_dataset(data, 2000, 0, image_size=96)  # the default size: the existing data is reused, and said so
    said = capsys.readouterr().out
    assert "using the synthetic dataset in" in said
    assert "note: the demo's own dataset is 2000 products of 96 px (seed 0), this one 40 products" in said
    ensure_dataset(data, 40, 0, image_size=96)
    assert "note:" not in capsys.readouterr().out  # the same dataset: nothing to say
    ensure_dataset(data, 40, 0, image_size=96, exact=True)
    with pytest.raises(
        ValueError, match="already holds a synthetic dataset of 40 products \\(seed 0\\), not 100"
    ):
        ensure_dataset(data, 100, 0, image_size=96, exact=True)
    with pytest.raises(ValueError, match="not 40 \\(seed 3\\)"):
        ensure_dataset(data, 40, 3, image_size=96, exact=True)
    (data / "synthetic.json").write_text('{"note": "mine"}')
    with pytest.raises(ValueError, match="synthetic.json was not written by make-synthetic"):
        ensure_dataset(data, 40, 0, image_size=96)


@pytest.mark.parametrize(
    "record",
    [
        {"products_train": 34, "products_val": 6, "seed": 0},  # no generator version, no image counts
        {**_RECORD, "products_train": "34", "products_val": "6"},
        {**_RECORD, "seed": 0.5},
    ],
)
def test_demo_refuses_a_synthetic_json_make_synthetic_would_refuse(tmp_path, capsys, record) -> None:
    """The demo reads the record as the generator does: a file the generator would not take for its own
    (and so refuses to overwrite) is not reused either, and the error names it."""
    from famevil_fast.cli.commands.demo import ensure_dataset
    from famevil_fast.data.synthetic.generate import make_synthetic

    data = tmp_path / "data"
    data.mkdir()
    path = data / "synthetic.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=re.escape(f"{path} was not written by make-synthetic")):
        make_synthetic(data, products=4, image_size=32, workers=1)
    with pytest.raises(ValueError, match=re.escape(f"{path} was not written by make-synthetic: remove it")):
        ensure_dataset(data, 40, 0, image_size=96)
    assert "using the synthetic dataset" not in capsys.readouterr().out


def test_a_refused_demo_leaves_the_previous_runs_as_they_were(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "synthetic.json").write_text(json.dumps(_RECORD))
    for name, text in (("run", "newer"), ("run.previous", "older")):
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text(text)
    assert main(["demo", "--out", str(out), "--seed", "1"]) == 2  # another dataset: refused
    assert "already holds a synthetic dataset" in capsys.readouterr().err
    assert (out / "run" / "metrics.jsonl").read_text() == "newer"
    assert (out / "run.previous" / "metrics.jsonl").read_text() == "older"


def test_image_file_batches_decode_ahead_in_order_and_name_a_corrupt_file(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from famevil_fast.cli.images import ImageFileBatches
    from famevil_fast.data.image_files import load_images

    files = []
    for i in range(7):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((20, 30 + i, 3), 30 * i, dtype=np.uint8)).save(files[-1])
    batches = ImageFileBatches(files, 3, 16, threads=2, prefetch=1)
    assert len(batches) == 3
    made = list(batches)
    assert [names for names, _ in made] == [files[0:3], files[3:6], files[6:7]]
    assert torch.equal(torch.cat([pixels for _, pixels in made]), load_images(files, 16))
    assert [step for step, _ in batches.iter_steps(range(1, 3, 2))] == [1]  # one process's share
    (tmp_path / "4.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*4\.png"):
        list(batches)


def test_an_inference_command_leaves_its_caller_s_process_group_alone(tmp_path, monkeypatch) -> None:
    import torch.distributed as dist

    from famevil_fast.cli.processes import command_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with command_processes("cpu") as (shard, device):
            assert (shard.rank, shard.world, device.type) == (0, 1, "cpu")
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="names one GPU, but torchrun runs 2 processes"):
            with command_processes("cuda:0"):
                pass


def test_embed_texts_end_lines_at_newlines_only(checkpoint, tmp_path, capsys) -> None:
    """A form feed, a carriage return or U+2028 inside a line does not split it: row i is still line i + 1
    (Windows line ends are read as line ends)."""
    from safetensors.torch import load_file

    texts = tmp_path / "texts.txt"
    texts.write_bytes("red dress\r\nblue\u2028jacket\ngreen\x0cskirt\nlast\rone\n".encode())
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(checkpoint), "--texts", str(texts), "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert load_file(out)["text"].shape[0] == 4


def test_embed_checks_its_output_before_embedding(checkpoint, image, tmp_path, monkeypatch, capsys) -> None:
    from famevil_fast.model import FameViL

    monkeypatch.setattr(FameViL, "encode_image", lambda *a, **k: pytest.fail("embedded before --out checked"))
    out = image / "x.safetensors"  # under a file
    argv = ["embed", str(checkpoint), "--images", str(image), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert f"--out {out}: {image} is not a directory" in one_error_line(capsys, "embed")


def test_image_folders_give_their_files_once_and_no_subfolders(image, tmp_path) -> None:
    from famevil_fast.cli.images import collect_images

    (tmp_path / "sub.jpg").mkdir()  # a folder named like an image is not one
    second = tmp_path / "b.jpg"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(second)
    assert collect_images([str(tmp_path)]) == [image, second]
    with pytest.warns(UserWarning, match=r"2 image paths name a file already listed \(e\.g\. .*a\.png\)"):
        files = collect_images([str(image), str(tmp_path), str(tmp_path / "sub.jpg" / ".." / "a.png")])
    assert files == [image, second]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", str(2**64)], r"EvalOptions\.sampled_seed must lie from -2\*\*63 to 2\*\*64 - 1"),
        (["--tasks", "itc", "pac"], r"--tasks pac: .* has no such task \(its tasks: "),
    ],
)
def test_eval_refuses_a_bad_seed_or_a_task_the_model_lacks_before_reading_data(
    checkpoint, tmp_path, capsys, extra, message
) -> None:
    argv = ["eval", str(checkpoint), "--data", str(tmp_path / "none"), *extra, "--device", "cpu"]
    assert main(argv) == 2
    assert re.search(message, one_error_line(capsys, "eval"))
