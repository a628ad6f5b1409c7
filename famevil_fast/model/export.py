"""Writing famevil_fast weights in other layouts: Hugging Face CLIP names, and the official FAME-ViL
(mmf) layout of its released checkpoints, so checkpoints can move back to those code bases.

``save_official`` and ``save_huggingface`` write one file whose type follows its suffix (``.safetensors``,
or a torch pickle for ``.pth``/``.pt``/``.bin``/``.ckpt``). The settings that the weights do not carry
(head counts, ``caption_vocab``, ...) travel with it so that ``from_pretrained`` rebuilds the same model: in
the ``config`` metadata of a ``.safetensors`` file, else in a sidecar ``<file>.config.json`` beside it (the
tensors themselves keep exactly the official keys, which the official code loads unchanged).

``save_huggingface`` given a directory instead (no suffix, or an existing directory) writes a Hugging Face
model directory, ``model.safetensors`` plus a ``CLIPConfig`` ``config.json``, which
``transformers.CLIPModel.from_pretrained`` loads. Either way it holds the CLIP backbone alone: a
``CLIPModel`` has no place for FAME-ViL's task adapters, cross-attention adapters or heads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from famevil_fast.files import atomic_save_safetensors, atomic_write_together, json_writer, safetensors_writer
from famevil_fast.model.config import PRETRAIN_TASKS, CLIPConfig
from famevil_fast.model.weights import (
    _ADAPTER_PARTS,
    _HF_LAYER,
    _HF_NORMS,
    _HF_TOP,
    CONFIG_FILE,
    FORMAT_TAG,
    WEIGHTS_FILE,
    sidecar_path,
)
from famevil_fast.text.special_tokens import EOT_ID, SOT_ID

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# The special tokens of famevil_fast.text's tokenizer (as open_clip: padding with 0); the text tower pools
# at the first end token, which is what a Hugging Face CLIP text model does with eos_token_id = EOT_ID.
_PAD_ID = 0

_TOP = {v: k for k, v in _HF_TOP.items()}
_NORMS = {v: k for k, v in _HF_NORMS.items()}
_LAYER = {v: k for k, v in _HF_LAYER.items()}
_ADAPTER = {v: k for k, v in _ADAPTER_PARTS.items()}


def to_huggingface(state: dict[str, torch.Tensor], with_adapters: bool = False) -> dict[str, torch.Tensor]:
    """famevil_fast names -> Hugging Face CLIPModel names (plus FAME-ViL's adapter names when asked). The
    heads, and without ``with_adapters`` every adapter (Cross-Modal Adapters included), are left out."""
    out: dict[str, torch.Tensor] = {}
    cross_modal = sorted(k for k in state if ".xma." in k or k.startswith("xmodal_shared."))
    if with_adapters and cross_modal:
        raise ValueError(
            "the official FAME-ViL layout has no Cross-Modal Adapters (adapter_type='xmodal'), so this model "
            f"cannot be written in it (e.g. {cross_modal[0]}); save_pretrained keeps every weight"
        )
    for key, value in state.items():
        if key.startswith("heads.") or key in cross_modal:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        norm = next((n for n in _NORMS if key.startswith(n + ".")), None)
        if norm:
            out[_NORMS[norm] + key[len(norm) :]] = value
            continue
        m = re.match(r"(vision|text)\.blocks\.(\d+)\.(.+)", key)
        if not m:
            raise ValueError(f"cannot export key {key}")
        if not with_adapters and (".tsa." in key or ".xaa." in key):
            continue
        prefix = f"{m.group(1)}_model.encoder.layers.{m.group(2)}."
        out.update({prefix + k: v for k, v in _layer_entries(m.group(3), value).items()})
    return out


def _layer_entries(rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    kind = rest.rsplit(".", 1)[-1]
    if rest.startswith("attn.qkv."):
        q, k, v = value.chunk(3)
        return {f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v}
    if rest.startswith("xaa.kv."):
        k, v = value.chunk(2)
        return {f"cross_attn.key.{kind}": k, f"cross_attn.value.{kind}": v}
    if rest.startswith("tsa.adapters."):
        task, part, *tail = rest[len("tsa.adapters.") :].split(".")
        return {f"adapt_mlp.{task}.{_ADAPTER[part]}" + "".join("." + t for t in tail): value}
    for ours, theirs in _LAYER.items():
        if rest == ours or rest.startswith(ours + "."):
            return {theirs + rest[len(ours) :]: value}
    raise ValueError(f"cannot export layer key {rest}")


def to_official_famevil(
    state: dict[str, torch.Tensor], prefix: str = "model.", task_segment: bool | None = None
) -> dict[str, torch.Tensor]:
    """famevil_fast names -> the official FAME-ViL state dict (``prefix`` + ``clip.*`` / ``heads.*``),
    including the ``position_ids`` buffers that transformers 4.20 saved, every floating tensor in float32
    as the release holds them. FashionViL's pre-training tasks (``mvc``, ``pac``, ``itm``) have no place in
    that layout: a model holding their adapters or heads is refused.

    ``task_segment``: whether the task adapters' names carry their task (``adapt_mlp.{task}.``), as in the
    multi-task configs, or not (``adapt_mlp.``), as in the single-task configs and the teachers, whose
    ``adapter_name_list`` is empty. None: with the task unless the model has one task's adapters. False
    for a model with the adapters of several tasks is a ValueError (their names would collide).

    ``prefix``: empty, or ending in ``"."`` (``"model."``, ``"module.model."``); anything else is a
    ValueError."""
    check_official_prefix(prefix)
    pretraining = sorted(k for k in state if _pretraining_task(k))
    if pretraining:
        raise ValueError(
            f"the official FAME-ViL layout has no pre-training tasks {PRETRAIN_TASKS}, so this model cannot "
            f"be written in it (e.g. {pretraining[0]}); save_pretrained keeps every weight"
        )
    tasks = sorted({m.group(1) for k in state if (m := re.search(r"\.tsa\.adapters\.(\w+)\.", k))})
    if task_segment is False and len(tasks) > 1:
        raise ValueError(
            f"task_segment=False writes task adapters without their task (adapt_mlp.*), but this model has "
            f"the adapters of {len(tasks)} tasks {tasks}, whose names would collide; use task_segment=True "
            "(or None)"
        )
    clip = to_huggingface(state, with_adapters=True)
    out = {f"{prefix}clip.{k}": v for k, v in clip.items()}
    text_len = state["text.pos_embed"].shape[0]
    vision_len = state["vision.pos_embed"].shape[0]
    out[f"{prefix}clip.text_model.embeddings.position_ids"] = torch.arange(text_len)[None]
    out[f"{prefix}clip.vision_model.embeddings.position_ids"] = torch.arange(vision_len)[None]
    out.update({prefix + k: v for k, v in state.items() if k.startswith("heads.")})
    if not (len(tasks) != 1 if task_segment is None else task_segment):
        out = {re.sub(r"\.adapt_mlp\.\w+\.", ".adapt_mlp.", k, count=1): v for k, v in out.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def check_official_prefix(prefix: str) -> None:
    """Refuse a key prefix of the official layout that is neither empty nor ends in ``"."`` (``"foo"``
    would glue onto the names: ``fooclip.*``)."""
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise ValueError(
            f"the key prefix of the official layout must be empty or end in '.' (e.g. 'model.', "
            f"'module.model.'), got {prefix!r}"
        )


def _pretraining_task(key: str) -> bool:
    """Whether ``key`` belongs to a pre-training task's adapter or head."""
    m = re.match(r"heads\.(\w+)\.|(?:vision|text)\.blocks\.\d+\.tsa\.adapters\.(\w+)\.", key)
    return bool(m) and (m.group(1) or m.group(2)) in PRETRAIN_TASKS


# ---------------------------------------------------------------- writing files
def save_official(model: FameViL, path: str | Path, prefix: str = "model.") -> list[Path]:
    """Write ``model`` in the official FAME-ViL layout, with its full config beside it; returns the files."""
    config = {"format": FORMAT_TAG, "layout": "official", "famevil": model.config.to_dict()}
    return write_weights_file(to_official_famevil(model.state_dict(), prefix=prefix), path, config)


def save_huggingface(model: FameViL, path: str | Path) -> list[Path]:
    """Write the CLIP backbone of ``model`` with Hugging Face CLIPModel names: to a weights file with its
    CLIP config (a path with a weights suffix), or to a Hugging Face model directory (a path with no
    suffix, or an existing directory) that ``transformers.CLIPModel.from_pretrained`` loads. Returns the
    files written."""
    config = {"format": FORMAT_TAG, "layout": "huggingface", "clip": model.config.clip.to_dict()}
    tensors = to_huggingface(model.state_dict())
    if not is_directory_destination(path):
        return write_weights_file(tensors, path, config, directory_ok=True)
    directory = Path(path)
    hf_config = huggingface_config(model.config.clip, float(tensors["logit_scale"]))
    check_output_file(directory / WEIGHTS_FILE)
    writes = {
        directory / WEIGHTS_FILE: safetensors_writer(_plain(tensors), weights_metadata(config)),
        directory / CONFIG_FILE: json_writer(hf_config, 2),
    }
    atomic_write_together(writes)
    return list(writes)


def is_directory_destination(path: str | Path) -> bool:
    """Whether ``save_huggingface`` writes a model directory at ``path`` (no suffix, or a directory)."""
    path = Path(path)
    return path.is_dir() or (path.suffix == "" and not path.exists())


def huggingface_config(clip: CLIPConfig, logit_scale: float) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face ``CLIPModel`` of the sizes of ``clip`` (every field from it;
    ``logit_scale`` is the model's own, which the weights hold too)."""
    shared = {
        "hidden_act": clip.activation,  # "quick_gelu" (OpenAI CLIP) or "gelu", the same names
        "layer_norm_eps": clip.layer_norm_eps,
        "projection_dim": clip.embed_dim,
    }
    text = {
        "model_type": "clip_text_model",
        "vocab_size": clip.text.vocab_size,
        "max_position_embeddings": clip.text.context_length,
        "hidden_size": clip.text.width,
        "intermediate_size": clip.text.mlp_dim,
        "num_hidden_layers": clip.text.layers,
        "num_attention_heads": clip.text.heads,
        "bos_token_id": SOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": _PAD_ID,
        **shared,
    }
    vision = {
        "model_type": "clip_vision_model",
        "image_size": clip.vision.image_size,
        "patch_size": clip.vision.patch_size,
        "num_channels": 3,
        "hidden_size": clip.vision.width,
        "intermediate_size": clip.vision.mlp_dim,
        "num_hidden_layers": clip.vision.layers,
        "num_attention_heads": clip.vision.heads,
        **shared,
    }
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": clip.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": text,
        "vision_config": vision,
    }


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, as safetensors and ``torch.save`` files hold them."""
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_weights_file(
    tensors: dict[str, torch.Tensor], path: str | Path, config: dict[str, Any], directory_ok: bool = False
) -> list[Path]:
    """Write ``tensors`` in the file type of ``path``'s suffix (atomically, creating missing parent
    directories) and store ``config`` with them; returns the files written. ``directory_ok``: the caller
    also writes directories (the suffix error says so)."""
    path = Path(path)
    check_output_file(path, directory_ok)
    tensors = _plain(tensors)
    if path.suffix == ".safetensors":
        atomic_save_safetensors(path, tensors, weights_metadata(config))
        return [path]
    sidecar = sidecar_path(path)
    atomic_write_together({path: lambda p: torch.save(tensors, p), sidecar: json_writer(config, 2)})
    return [path, sidecar]


def weights_metadata(config: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of an exported weights file: its format and config."""
    return {"format": "pt", "config": json.dumps(config)}


def check_output_file(path: Path, directory_ok: bool = False) -> None:
    """A clear error before writing when ``path`` cannot be a weights file."""
    if path.suffix not in FILE_SUFFIXES:
        also = "; or give a directory name without a suffix" if directory_ok else ""
        raise ValueError(
            f"cannot tell which format to write {path} in: its name must end in one of {FILE_SUFFIXES} "
            f"(.safetensors writes safetensors, the others a torch pickle){also}"
        )
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    check_parents(path)


def check_parents(path: Path) -> None:
    """Refuse a ``path`` below an existing file (its missing parent directories are made when writing)."""
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"cannot write {path}: {blocking} is a file, not a directory")
