"""Edge cases of the public Python API: incomplete weights, mixed batches of unequal text lengths, bad
configs and arguments get clear errors or the right results."""

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb_, token_batch

from famevil_fast.eval import blocked_topk, caption_scores
from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.clip import CLIP
from famevil_fast.model.config import CLIPConfig, TextConfig, VisionConfig

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


@pytest.mark.parametrize(
    "key", ["vision.class_embedding", "text.token_embed.weight", "text.blocks.0.mlp.fc1.weight"]
)
def test_config_less_weights_without_a_size_tensor_are_named(key, tmp_path):
    clip_state = CLIP(clip_preset("micro")).state_dict()
    del clip_state[key]
    with pytest.raises(ValueError, match=f"incomplete: it lacks \\['{key}'\\]"):
        FameViL.from_clip(clip_state)
    with pytest.raises(ValueError, match="incomplete"):
        CLIP.from_pretrained(clip_state)
    state = FameViL(MICRO).state_dict()
    del state[key]
    path = tmp_path / "model.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"checkpoint {path} is incomplete"):
        FameViL.from_pretrained(path)


def test_mixed_forward_takes_fusion_texts_of_different_lengths():
    model = perturb_(FameViL(MICRO), std=0.05).eval()
    g = torch.Generator().manual_seed(0)
    batches = {
        "tgir": {
            "ref_pixels": torch.randn(2, 3, 32, 32, generator=g),
            "target_pixels": torch.randn(2, 3, 32, 32, generator=g),
            "input_ids": token_batch(2, length=77, seed=1),
        },
        "scr": {
            "pixels": torch.randn(3, 3, 32, 32, generator=g),
            "input_ids": token_batch(3, length=12, seed=2),
            "labels": torch.tensor([0, 5, 7]),
        },
    }
    mixed = model.forward_mixed(batches)
    for task, batch in batches.items():
        torch.testing.assert_close(mixed[task].loss, model(batch, task).loss, rtol=1e-5, atol=1e-5)


def test_scr_takes_int32_labels_as_int64():
    model = FameViL(MICRO).eval()
    batch = {"pixels": torch.randn(2, 3, 32, 32), "input_ids": token_batch(2), "labels": torch.tensor([0, 3])}
    with torch.no_grad():
        want = model(batch, "scr").loss
        got = model({**batch, "labels": batch["labels"].int()}, "scr").loss
    torch.testing.assert_close(got, want)


def test_scr_labels_that_are_not_a_tensor_are_named():
    model = FameViL(MICRO).eval()
    batch = {"pixels": torch.randn(2, 3, 32, 32), "input_ids": token_batch(2), "labels": [0, 1]}
    with pytest.raises(ValueError, match="labels must be a tensor .* got list"):
        model(batch, "scr")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CLIPConfig(vision=VisionConfig(heads=0)), r"clip.vision.heads must be a positive int"),
        (lambda: CLIPConfig(vision=VisionConfig(patch_size=0)), r"clip.vision.patch_size must be a positive"),
        (lambda: CLIPConfig(text=TextConfig(layers=0)), r"clip.text.layers must be a positive int"),
        (lambda: CLIPConfig(embed_dim=0), r"clip.embed_dim must be a positive int"),
        (lambda: MICRO.replace(tasks="itc"), "not one string"),
        (lambda: MICRO.replace(num_classes=0), r"'scr' needs num_classes >= 1"),
        (lambda: MICRO.replace(adapter_dropout=1.5), r"adapter_dropout must lie in \[0, 1\)"),
        (lambda: MICRO.replace(adapter_dropout=-0.1), r"adapter_dropout must lie in \[0, 1\)"),
        (lambda: MICRO.replace(adapter_bottleneck=8.5), "adapter_bottleneck=8.5"),
    ],
)
def test_bad_model_configs_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_model_config_without_scr_needs_no_classes():
    assert FameViL(MICRO.replace(tasks=("itc",), num_classes=0)).config.num_classes == 0


def test_blocked_topk_refuses_a_bool_k():
    q, g = F.normalize(torch.randn(2, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    for backend in ("blocked", "torch"):
        with pytest.raises(ValueError, match="k must be a positive int, got True"):
            blocked_topk(q, g, True, backend=backend)


def test_caption_metrics_given_as_one_string_are_named():
    with pytest.raises(ValueError, match=r"not one string \(write \('cider',\)\)"):
        caption_scores(["a red dress"], ["a red dress"], metrics="cider", tokenizer="simple")


def test_trust_pickle_reaches_the_weights_file_of_a_directory(tmp_path):
    import argparse

    model = perturb_(FameViL(MICRO), std=0.05)
    (tmp_path / "run").mkdir()
    container = {"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}
    torch.save(container, tmp_path / "run" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        FameViL.from_pretrained(tmp_path / "run", clip=clip_preset("micro"))
    loaded = FameViL.from_pretrained(tmp_path / "run", trust_pickle=True, clip=clip_preset("micro"))
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_sharded_directory_with_a_bad_index_or_a_missing_shard_is_named(tmp_path):
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in FameViL(MICRO).state_dict().items()}
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, names in shards.items() for k in names}}))
    assert FameViL.from_pretrained(tmp_path, clip=clip_preset("micro")).config.tasks == MICRO.tasks
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard b.safetensors named by .*index.json not found"):
        FameViL.from_pretrained(tmp_path, clip=clip_preset("micro"))
    for content in ({"metadata": {}}, [1]):
        index.write_text(json.dumps(content))
        with pytest.raises(ValueError, match="must hold a JSON object with a 'weight_map'"):
            FameViL.from_pretrained(tmp_path, clip=clip_preset("micro"))


def test_from_clip_of_fame_vil_weights_warns_that_adapters_and_heads_are_discarded(tmp_path):
    import warnings

    from famevil_fast.model.famevil import DiscardedWeightsWarning

    trained = FameViL(MICRO)
    trained.save_pretrained(tmp_path / "trained")
    with pytest.warns(DiscardedWeightsWarning, match="keeps only its CLIP backbone") as record:
        model = FameViL.from_clip(tmp_path / "trained")
    (warning,) = record
    assert warning.filename == __file__  # it points at the caller of from_clip
    assert str(tmp_path / "trained") in str(warning.message)
    assert warning.message.kinds == "task adapters, cross-attention adapters, heads"
    assert any(k.startswith("heads.") for k in warning.message.keys)
    assert any(".tsa." in k for k in warning.message.keys)
    assert torch.equal(model.vision.class_embedding, trained.vision.class_embedding)  # the backbone is kept
    with pytest.warns(DiscardedWeightsWarning, match="the given state dict is a FAME-ViL checkpoint"):
        FameViL.from_clip(trained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CLIP weights: nothing discarded, no warning
        FameViL.from_clip(CLIP(clip_preset("micro")).state_dict())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_samples", 0, "max_samples must be at least 1, or None for no cap, got 0"),
        ("max_samples", -3, "max_samples must be at least 1"),
        ("max_samples", 2.5, "max_samples must be an int or None"),
        ("max_samples", True, "max_samples must be an int"),
        ("text_batch", 0, "text_batch must be at least 1"),
        ("caption_max_len", 0, "caption_max_len must be at least 1"),
        ("caption_beams", 0, "caption_beams must be at least 1"),
        ("caption_no_repeat_ngram", -1, "caption_no_repeat_ngram must be at least 0"),
    ],
)
def test_eval_options_refuse_bad_counts_at_construction(field, value, message):
    import dataclasses

    from famevil_fast.eval.runner import EvalOptions

    with pytest.raises(ValueError, match=f"EvalOptions.{message}"):
        EvalOptions(**{field: value})
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(EvalOptions(), **{field: value})
    assert EvalOptions(max_samples=None).max_samples is None and EvalOptions(max_samples=1).max_samples == 1


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_caption_ids_hold_at_most_max_len_plus_one_tokens(num_beams, cuda_graph):
    from famevil_fast.model.generation import EOT_ID

    torch.manual_seed(0)
    model = FameViL(MICRO.replace(tasks=("cap",))).eval()
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] = -1e4  # never ends: every step is taken
    size = MICRO.clip.vision.image_size
    pixels = torch.randn(2, 3, size, size)
    ids = model.caption(pixels, max_len=5, num_beams=num_beams, return_ids=True, cuda_graph=cuda_graph)
    assert ids.shape == (2, 5 + 1)  # the start token and max_len generated tokens
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] = 1e4  # ends at once: the start and end tokens
    ids = model.caption(pixels, max_len=5, num_beams=num_beams, return_ids=True, cuda_graph=cuda_graph)
    assert ids.shape == (2, 2) and (ids[:, 1] == EOT_ID).all()
    assert "<= max_len + 1" in FameViL.caption.__doc__ and "max_len + 2" not in FameViL.caption.__doc__


def test_dir_lists_the_lazily_loaded_names():
    import famevil_fast

    assert {"FameViL", "FameViLConfig", "CLIP", "CLIPConfig", "tokenize", "decode"} <= set(dir(famevil_fast))
    assert set(famevil_fast.__all__) <= set(dir(famevil_fast))
