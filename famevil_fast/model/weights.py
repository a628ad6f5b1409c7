"""Checkpoint formats: reading CLIP and FAME-ViL weights in every supported layout, and writing ours.

Supported inputs, detected from the keys:
- OpenAI CLIP ``.pt`` (TorchScript archive or state dict) and open_clip state dicts (same names);
- Hugging Face ``CLIPModel`` state dicts, ``.safetensors`` files and model directories;
- official FAME-ViL checkpoints (mmf; HF names under ``clip.`` plus ``adapt_mlp``/``cross_attn``/``heads``);
- famevil_fast's own layout (``save_pretrained``: ``config.json`` + ``model.safetensors``).
Everything is converted to famevil_fast's parameter names (fused QKV, ``vision.*``, ``text.*``, ``heads.*``).

The model config comes from the checkpoint when it carries one: ``config.json`` in a directory
(famevil_fast's, or a Hugging Face ``CLIPConfig``, whose head counts, ``hidden_act`` and ``layer_norm_eps``
are used), the ``config`` metadata of a ``.safetensors`` file, or a sidecar ``<file>.config.json`` beside a
single file (what ``famevil-fast convert`` writes next to official ``.pth`` files). A stored config comes
before any preset of the same sizes, and a preset given for weights stored with a different config is
refused (``preset`` of ``resolve_clip_config``; ``famevil-fast convert --clip``). Without a stored config,
sizes are inferred from the shapes; head counts are not in any shape, so they come from a preset with the
same sizes (the one the file is named after, or any preset for famevil_fast's own layout) or, for the
standard CLIP widths, from CLIP's 64-wide heads. Loading CLIP or FAME-ViL weights of any other width refuses
rather than guess (pass the config, or add the sidecar); see ``resolve_clip_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from famevil_fast.files import (
    atomic_write_together,
    json_writer,
    safetensors_writer,
)
from famevil_fast.model.config import (
    CLIP_PRESETS,
    PRESET_ALIASES,
    CLIPConfig,
    FameViLConfig,
    TextConfig,
    VisionConfig,
)

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL

CONFIG_FILE = "config.json"
SIDECAR_SUFFIX = ".config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = "famevil_fast"
TASK_ORDER = ("itc", "tgir", "scr", "cap")
# Tower widths where CLIP's convention of 64-wide attention heads holds (ViT-B, ViT-L); any other width
# leaves the head count of a config-less checkpoint unknown.
STANDARD_WIDTHS = (512, 768, 1024)


# ---------------------------------------------------------------- reading files
def read_state_dict(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a checkpoint file or directory, plus any config found beside them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_directory(path, trust_pickle)
    if path.suffix == ".safetensors":
        state, config = _read_safetensors(path)
    else:
        state, config = _read_torch_file(path, trust_pickle), {}
    sidecar = sidecar_path(path)
    if not config and sidecar.exists():
        config = read_config(sidecar)
    return state, config


def sidecar_path(path: str | Path) -> Path:
    """Where the config of a single weights file is kept: ``<file>.config.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_config(path: Path) -> dict:
    """A JSON model config; a file that is not a JSON object raises a ValueError naming it."""
    config = _parse_json(path.read_bytes(), str(path))
    if not isinstance(config, dict):
        raise ValueError(f"model config {path} must hold a JSON object, found {type(config).__name__}")
    return config


def _parse_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {where}: not valid JSON ({exc})") from exc


def _read_directory(path: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    config = read_config(path / CONFIG_FILE) if (path / CONFIG_FILE).exists() else {}
    singles = [path / WEIGHTS_FILE, path / "pytorch_model.bin"]
    for file in singles:
        if file.exists():
            state, meta = read_state_dict(file, trust_pickle)
            return state, config or meta
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _parse_json(index.read_bytes(), str(index))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(
                f"{index} must hold a JSON object with a 'weight_map' of tensor names to shard files"
            )
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named by {index} not found")
            state.update(_read_safetensors(path / shard)[0])
        return state, config
    raise FileNotFoundError(
        f"no weights in {path}: expected {WEIGHTS_FILE}, pytorch_model.bin or a sharded index"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc
    config = _parse_json(meta["config"], f"the config metadata of {path}") if "config" in meta else {}
    if not isinstance(config, dict):
        raise ValueError(
            f"the config metadata of {path} must be a JSON object, found {type(config).__name__}"
        )
    return state, config


def _read_torch_file(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        try:
            return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
        except RuntimeError as exc:
            raise ValueError(f"cannot read TorchScript archive {path}: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise _torch_load_error(path, exc, trust_pickle) from exc
    return unwrap_container(obj, str(path))


def _torch_load_error(path: Path, exc: Exception, trust_pickle: bool) -> ValueError:
    """One line for a failed ``torch.load``: a sound file that weights-only loading refused gets the
    ``trust_pickle`` hint; a file whose archive or pickles are broken (or that is no torch file at all) is
    called corrupt, since unpickling it with trust would not help."""
    damage = torch_file_damage(path)
    if damage is None and not trust_pickle and isinstance(exc, pickle.UnpicklingError):
        return ValueError(
            f"cannot read checkpoint {path}: weights-only loading refused an object in it: "
            f"{_refusal_cause(exc)} (if the file is trusted and holds non-tensor objects, pass "
            "trust_pickle=True; famevil-fast: --trust-pickle, or model.trust_pickle: true in a recipe)"
        )
    if damage is None and isinstance(exc, (ImportError, AttributeError)):
        return ValueError(f"cannot read checkpoint {path}: {_first_sentence(exc)}")
    return ValueError(
        f"cannot read checkpoint {path}: not a torch or safetensors file, or corrupt or truncated "
        f"({damage or _first_sentence(exc)})"
    )


def torch_file_damage(path: str | Path) -> str | None:
    """Why ``path`` is not a sound ``torch.save`` file, or None when it looks like one.

    Checks the structure without unpickling anything: a zip archive (torch >= 1.6) must open and hold a
    ``data.pkl`` that parses as a whole pickle; a legacy file must start with torch's magic-number pickle
    followed by the protocol, system-info, object and storage-key pickles. Tensor data is not checked."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
        if not head:
            return "the file is empty"
        if head == b"PK\x03\x04":
            return _zip_damage(path)
        f.seek(0)
        first = _pickle_damage(f)
        if first is not None or not _legacy_magic(f):
            return "neither a zip archive nor a pickle starting with torch's magic number"
        for what in ("protocol version", "system info", "object", "storage keys"):
            damage = _pickle_damage(f)
            if damage is not None:
                return f"broken {what} pickle: {damage}"
    return None


def _zip_damage(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "a zip archive without its central directory, as when the file is cut short"
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if not names:
                return "a zip archive without the data.pkl of a torch checkpoint"
            with z.open(names[0]) as f:
                damage = _pickle_damage(f)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        return f"broken zip archive: {exc}"
    return None if damage is None else f"broken pickle {names[0]}: {damage}"


def _pickle_damage(f: IO[bytes]) -> str | None:
    """Parse one pickle from ``f`` (opcodes only, nothing is built); why it is broken, or None."""
    start = f.tell()
    try:
        for _ in pickletools.genops(f):
            pass
    except (ValueError, EOFError, OverflowError, struct.error) as exc:
        return str(exc) or type(exc).__name__
    except MemoryError:  # a length field far beyond the file: reading it asks for more memory than exists
        return "a length field larger than the file (or than memory)"
    if f.tell() == start:
        return "no data"
    return None


def _legacy_magic(f: IO[bytes]) -> bool:
    """Whether the pickle just parsed from ``f`` is torch's legacy magic number (re-read, nothing built)."""
    end = f.tell()
    if end > 64:
        return False
    f.seek(0)
    data = f.read(end)
    f.seek(end)
    return any(arg == torch.serialization.MAGIC_NUMBER for _, arg, _ in pickletools.genops(data))


def _refusal_cause(exc: Exception) -> str:
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return _first_sentence(text)


def _first_sentence(exc: Exception | str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, Exception) else "unknown error"
    sentence = lines[0].split(". ", 1)[0].rstrip(".")
    return sentence if len(sentence) <= 200 else sentence[:197] + "..."


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive; a damaged zip is not (``torch.load`` then names it)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def unwrap_container(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a bare dict or a training container ({"model": ...} / {"state_dict": ...})."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_container(obj[key], where)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError(f"{where} holds no state dict (found {type(obj).__name__})")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove one leading ``module.`` (DDP) and then one leading ``model.`` (mmf) from every key."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------- detection
def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("vision.blocks.") for k in keys):
        return "famevil_fast"
    if any(k.startswith("clip.vision_model.") for k in keys):
        return "famevil_official"
    if any(k.startswith("vision_model.") for k in keys):
        return "huggingface"
    if any(k.startswith("visual.transformer.resblocks.") for k in keys):
        return "openai"
    if any(k.startswith("visual.trunk.") or k.startswith("text.transformer.") for k in keys):
        raise ValueError(
            "this open_clip model uses a timm or custom text tower, which is not a CLIP ViT layout"
        )
    raise ValueError(f"unrecognised checkpoint layout; first keys: {keys[:5]}")


# ---------------------------------------------------------------- conversions
def convert_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI / open_clip names -> famevil_fast names."""
    out: dict[str, torch.Tensor] = {}
    skip = {"attn_mask", "input_resolution", "context_length", "vocab_size"}
    for key, value in state.items():
        if key in skip or key.endswith("attn_mask"):
            continue
        out[_openai_name(key)] = value.T.contiguous() if key in ("visual.proj", "text_projection") else value
    return out


_OPENAI_BLOCK = {
    "ln_1": "ln_1",
    "ln_2": "ln_2",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.out.weight",
    "attn.out_proj.bias": "attn.out.bias",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENAI_TOP = {
    "visual.conv1.weight": "vision.patch_embed.weight",
    "visual.class_embedding": "vision.class_embedding",
    "visual.positional_embedding": "vision.pos_embed",
    "visual.proj": "vision.proj.weight",
    "token_embedding.weight": "text.token_embed.weight",
    "positional_embedding": "text.pos_embed",
    "text_projection": "text.proj.weight",
    "logit_scale": "logit_scale",
}


def _openai_name(key: str) -> str:
    if key in _OPENAI_TOP:
        return _OPENAI_TOP[key]
    m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
    if m:
        tower = "vision" if m.group(1) else "text"
        rest = m.group(3)
        for old, new in _OPENAI_BLOCK.items():
            if rest.startswith(old):
                return f"{tower}.blocks.{m.group(2)}.{new}{rest[len(old) :]}"
    for old, new in (
        ("visual.ln_pre", "vision.ln_pre"),
        ("visual.ln_post", "vision.ln_post"),
        ("ln_final", "text.ln_final"),
    ):
        if key.startswith(old + "."):
            return new + key[len(old) :]
    raise ValueError(f"unexpected key in an OpenAI/open_clip checkpoint: {key}")


_HF_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "cross_attn.query_layernorm": "xaa.ln_q",
    "cross_attn.context_layernorm": "xaa.ln_ctx",
    "cross_attn.query": "xaa.q",
    "cross_attn.xattn_adapter.adapter_layer_norm_before": "xaa.adapter.ln",
    "cross_attn.xattn_adapter.down_proj": "xaa.adapter.down",
    "cross_attn.xattn_adapter.up_proj": "xaa.adapter.up",
    "cross_attn.xattn_adapter.scale": "xaa.adapter.scale",
}
_HF_TOP = {
    "vision_model.embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "vision_model.embeddings.class_embedding": "vision.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "vision.pos_embed",
    "visual_projection.weight": "vision.proj.weight",
    "text_model.embeddings.token_embedding.weight": "text.token_embed.weight",
    "text_model.embeddings.position_embedding.weight": "text.pos_embed",
    "text_projection.weight": "text.proj.weight",
    "logit_scale": "logit_scale",
}
_HF_NORMS = {
    "vision_model.pre_layrnorm": "vision.ln_pre",
    "vision_model.post_layernorm": "vision.ln_post",
    "text_model.final_layer_norm": "text.ln_final",
}
_ADAPTER_PARTS = {"adapter_layer_norm_before": "ln", "down_proj": "down", "up_proj": "up", "scale": "scale"}


def convert_huggingface(
    state: dict[str, torch.Tensor], single_task: str | None = None
) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP names (optionally with FAME-ViL's adapt_mlp / cross_attn) -> famevil_fast names."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        norm = next((n for n in _HF_NORMS if key.startswith(n + ".")), None)
        if norm:
            out[_HF_NORMS[norm] + key[len(norm) :]] = value
            continue
        m = re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise ValueError(f"unexpected key in a Hugging Face CLIP checkpoint: {key}")
        prefix = f"{m.group(1)}.blocks.{m.group(2)}."
        rest = m.group(3)
        group = re.match(r"(self_attn\.(q|k|v)_proj|cross_attn\.(key|value))\.(weight|bias)$", rest)
        if group:
            slot = "attn.qkv" if rest.startswith("self_attn") else "xaa.kv"
            part = group.group(2) or group.group(3)
            fused.setdefault(f"{prefix}{slot}.{group.group(4)}", {})[part] = (key, value)
            continue
        out[prefix + _hf_layer_name(rest, single_task)] = value
    for name, parts in fused.items():
        out[name] = _fuse(name, parts)
    return out


def _fuse(name: str, parts: dict[str, tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Concatenate the separate q/k/v (or key/value) projections of one layer; they must all be present
    and of one shape."""
    order = ("q", "k", "v") if ".attn.qkv." in name else ("key", "value")
    missing = [p for p in order if p not in parts]
    if missing:
        raise ValueError(f"incomplete attention weights for {name}: missing {missing}")
    shapes = {parts[p][0]: tuple(parts[p][1].shape) for p in order}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"attention projections of one layer must have equal shapes, got {shapes}")
    return torch.cat([parts[p][1] for p in order])


def _hf_layer_name(rest: str, single_task: str | None) -> str:
    if rest.startswith("adapt_mlp."):
        parts = rest.split(".")[1:]
        if parts[0] in ("adapters", "controller"):
            raise ValueError(
                f"adapter key {rest} is from the official nas_adapter layout (adapt_mlp.adapters.{{i}} / "
                "adapt_mlp.controller), which famevil_fast does not support; expected adapt_mlp.{task}.*"
            )
        if parts[0] in TASK_ORDER:
            task, parts = parts[0], parts[1:]
        elif single_task is not None:
            task = single_task
        else:
            raise ValueError(f"adapter key {rest} has no task segment and the checkpoint's task is unknown")
        if not parts or parts[0] not in _ADAPTER_PARTS:
            raise ValueError(
                f"unexpected adapter key {rest}: after the task, expected one of {sorted(_ADAPTER_PARTS)}"
            )
        return f"tsa.adapters.{task}.{_ADAPTER_PARTS[parts[0]]}" + "".join("." + p for p in parts[1:])
    for old, new in _HF_LAYER.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ValueError(f"unexpected layer key in a Hugging Face/FAME-ViL checkpoint: {rest}")


def convert_official_famevil(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official FAME-ViL (mmf) -> famevil_fast names; teachers and balances are dropped."""
    state = {k: v for k, v in state.items() if not k.startswith(("teachers.", "balances."))}
    clip = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
    heads = {k: v for k, v in state.items() if k.startswith("heads.")}
    other = sorted(set(state) - {"clip." + k for k in clip} - set(heads))
    if other:
        raise ValueError(f"unexpected keys in a FAME-ViL checkpoint: {other[:10]}")
    head_tasks = [t for t in TASK_ORDER if any(k.startswith(f"heads.{t}.") for k in heads)]
    single = head_tasks[0] if len(head_tasks) == 1 else None
    out = convert_huggingface(clip, single_task=single)
    out.update(heads)
    return out


def to_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return canonical_with_layout(state)[0]


def named_canonical(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], str]:
    """``canonical_with_layout``, its errors naming the weights (``what``: the file, or the state dict)."""
    try:
        return canonical_with_layout(state)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def canonical_with_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """famevil_fast names for a state dict in any supported layout, and the layout it was in."""
    state = strip_prefixes(dict(state))
    fmt = detect_format(state)
    if fmt == "famevil_fast":
        return state, fmt
    if fmt == "famevil_official":
        return convert_official_famevil(state), fmt
    if fmt == "huggingface":
        return convert_huggingface(state), fmt
    return convert_openai(state), fmt


# ---------------------------------------------------------------- config inference
def _count_blocks(state: dict[str, torch.Tensor], tower: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{tower}\.blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_clip_config(state: dict[str, torch.Tensor], hints: dict | None = None) -> CLIPConfig:
    """CLIP sizes from canonical tensors; head counts and activation from ``hints`` (a Hugging Face config
    or a famevil_fast config) when present, else CLIP's convention of 64-wide heads and QuickGELU."""
    hints = hints or {}
    vision_hint, text_hint = _tower_hints(hints, "vision"), _tower_hints(hints, "text")
    vw = state["vision.class_embedding"].shape[0]
    tw = state["text.token_embed.weight"].shape[1]
    act = text_hint.get("hidden_act", "quick_gelu")
    act = "quick_gelu" if act == "quick_gelu" else "gelu"
    eps = text_hint.get("layer_norm_eps", 1e-5)
    return CLIPConfig(
        vision=_vision_config(state, vision_hint.get("num_attention_heads", vw // 64)),
        text=_text_config(state, text_hint.get("num_attention_heads", tw // 64)),
        embed_dim=state["text.proj.weight"].shape[0],
        activation=act,
        layer_norm_eps=eps,
    )


def _vision_config(state: dict[str, torch.Tensor], heads: int) -> VisionConfig:
    patch = state["vision.patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["vision.pos_embed"].shape[0] - 1)
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=state["vision.class_embedding"].shape[0],
        layers=_count_blocks(state, "vision"),
        heads=heads,
        mlp_dim=state["vision.blocks.0.mlp.fc1.weight"].shape[0],
    )


def _text_config(state: dict[str, torch.Tensor], heads: int) -> TextConfig:
    return TextConfig(
        vocab_size=state["text.token_embed.weight"].shape[0],
        context_length=state["text.pos_embed"].shape[0],
        width=state["text.token_embed.weight"].shape[1],
        layers=_count_blocks(state, "text"),
        heads=heads,
        mlp_dim=state["text.blocks.0.mlp.fc1.weight"].shape[0],
    )


def infer_famevil_config(state: dict[str, torch.Tensor], clip: CLIPConfig) -> FameViLConfig:
    """Tasks, bottleneck, cross-attention placement and class count from a converted FAME-ViL state dict."""
    tasks = tuple(
        t for t in TASK_ORDER if any(f".tsa.adapters.{t}." in k or k.startswith(f"heads.{t}.") for k in state)
    )
    downs = [v for k, v in state.items() if ".tsa.adapters." in k and k.endswith("down.weight")]
    has_vision_xaa = any(k.startswith("vision.") and ".xaa." in k for k in state)
    has_text_xaa = any(k.startswith("text.") and ".xaa." in k for k in state)
    xaa_down = [v for k, v in state.items() if k.endswith("xaa.adapter.down.weight")]
    kwargs: dict[str, Any] = dict(
        clip=clip,
        tasks=tasks,
        xaa="both" if has_vision_xaa else ("text" if has_text_xaa else "none"),
    )
    if downs:
        kwargs["adapter_bottleneck"] = downs[0].shape[0]
    if xaa_down:
        kwargs["xaa_bottleneck"] = xaa_down[0].shape[0]
    if "heads.scr.weight" in state:
        kwargs["num_classes"] = state["heads.scr.weight"].shape[0]
    return FameViLConfig(**kwargs)


# ---------------------------------------------------------------- public loaders
def load_clip_state_dict(
    source: str | Path | dict,
    clip: CLIPConfig | None = None,
    trust_pickle: bool = False,
    preset: CLIPConfig | None = None,
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Canonical CLIP backbone tensors (no adapters or heads) and the CLIP config: ``clip`` when given,
    else as ``resolve_clip_config`` finds it (a config-less file of a non-standard width is refused).
    ``trust_pickle`` as for ``read_state_dict``; ``preset`` as for ``resolve_clip_config``."""
    backbone, clip, _ = load_clip_backbone(source, clip, trust_pickle, preset)
    return backbone, clip


def load_clip_backbone(
    source: str | Path | dict,
    clip: CLIPConfig | None = None,
    trust_pickle: bool = False,
    preset: CLIPConfig | None = None,
) -> tuple[dict[str, torch.Tensor], CLIPConfig, list[str]]:
    """``load_clip_state_dict``, plus the keys left out of the backbone: the task adapters,
    cross-attention adapters and heads that ``source`` holds when it is a FAME-ViL checkpoint.
    ``trust_pickle`` as for ``read_state_dict``; ``preset`` as for ``resolve_clip_config``."""
    if isinstance(source, dict):
        raw, hints = unwrap_container(source), {}
    elif isinstance(source, str | Path):
        raw, hints = read_state_dict(source, trust_pickle)
    else:
        raise TypeError(f"CLIP weights must be a path or a state dict, got {type(source).__name__}")
    state, layout = named_canonical(raw, clip_weights_name(source))
    advice = (
        "pass config=... to CLIP.from_pretrained (FameViLConfig(clip=...) to FameViL.from_clip), "
        "e.g. clip_preset('tiny')"
    )
    clip = resolve_clip_config(state, hints, source, layout, clip, advice, preset)
    backbone = {k: v for k, v in state.items() if not is_new_module_key(k)}
    return backbone, clip, sorted(set(state) - set(backbone))


NEW_MODULE_KINDS = {
    "task adapters": (".tsa.",),
    "Cross-Modal Adapters": (".xma.", "xmodal_shared."),
    "cross-attention adapters": (".xaa.",),
    "heads": ("heads.",),
}


def new_module_kinds(keys: list[str]) -> list[str]:
    """The kinds of module (``NEW_MODULE_KINDS``) that ``keys`` hold, in that order."""
    return [
        kind
        for kind, marks in NEW_MODULE_KINDS.items()
        if any(mark in k if mark.startswith(".") else k.startswith(mark) for k in keys for mark in marks)
    ]


def clip_weights_name(source: str | Path | dict) -> str:
    """How errors name CLIP weights: the file, or "the given state dict"."""
    return "CLIP weights (the given state dict)" if isinstance(source, dict) else f"CLIP weights {source}"


def load_famevil_checkpoint(
    cls: type[FameViL],
    path: str | Path,
    trust_pickle: bool = False,
    *,
    preset: CLIPConfig | None = None,
    **overrides: Any,
) -> FameViL:
    """Build a FameViL from a checkpoint, in eval mode; missing or unexpected keys and shape mismatches are
    errors, and so is a CLIP-only checkpoint (no adapters, cross-attention adapters or heads).

    ``overrides`` replace config fields (``clip=...`` replaces even a stored CLIP config). ``preset`` is
    the CLIP config of a checkpoint that stores none; one that stores a different config is refused with
    a ``StoredConfigConflict`` (``famevil-fast convert --clip``)."""
    if not isinstance(path, str | Path):
        raise TypeError(f"path must be a file or directory path (str or Path), got {type(path).__name__}")
    raw, hints = read_state_dict(path, trust_pickle)
    state, layout = named_canonical(raw, f"checkpoint {path}")
    config = _checkpoint_config(state, hints, path, layout, overrides.get("clip"), preset)
    if overrides:
        config = config.replace(**overrides)
    model = cls(config)
    load_into(model, state, f"checkpoint {path}")
    return model.eval()


def _checkpoint_config(
    state: dict[str, torch.Tensor],
    hints: dict,
    path: str | Path,
    layout: str,
    clip: CLIPConfig | None,
    preset: CLIPConfig | None = None,
) -> FameViLConfig:
    """The stored FAME-ViL config, else one inferred from the shapes and the given or stored CLIP config
    (``preset`` as for ``resolve_clip_config``)."""
    if hints.get("format") == FORMAT_TAG and "famevil" in hints:
        config = _parse_config(lambda: FameViLConfig.from_dict(hints["famevil"]), path)
        if clip is None and preset is not None:
            check_preset(preset, config.clip, path)
        return config
    if not any(is_new_module_key(k) for k in state):
        raise ValueError(
            f"checkpoint {path} is a CLIP checkpoint ({layout} layout): it has no task adapters, "
            "cross-attention adapters or heads. Start a FAME-ViL model from it with FameViL.from_clip "
            "(`famevil-fast eval --clip` scores it zero-shot)"
        )
    advice = (
        f"put it in {sidecar_path(path).name} beside the file (as `famevil-fast convert` does), pass "
        "clip=... (e.g. clip_preset('tiny')) to FameViL.from_pretrained, or give famevil-fast convert "
        "(or info) --clip PRESET"
    )
    return infer_famevil_config(state, resolve_clip_config(state, hints, path, layout, clip, advice, preset))


def _parse_config(build: Callable[[], Any], source: str | Path | dict) -> Any:
    """``build()``; a malformed stored config becomes a ValueError naming the file it came from."""
    try:
        return build()
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"the model config stored with {config_location(source)} is invalid: {exc}") from exc


def config_location(source: str | Path | dict) -> str:
    """The file a checkpoint's stored config was read from (see ``read_state_dict``)."""
    if isinstance(source, dict):
        return "the given state dict"
    path = Path(source)
    if path.is_dir():
        return str(path / CONFIG_FILE) if (path / CONFIG_FILE).exists() else f"{path} (weights metadata)"
    if path.suffix != ".safetensors" and sidecar_path(path).exists():
        return str(sidecar_path(path))
    return f"{path} (its config metadata, or {sidecar_path(path).name})"


def resolve_clip_config(
    state: dict[str, torch.Tensor],
    hints: dict,
    source: str | Path | dict,
    layout: str,
    clip: CLIPConfig | None = None,
    advice: str = "pass the CLIP config explicitly",
    preset: CLIPConfig | None = None,
) -> CLIPConfig:
    """The CLIP config of canonical tensors. Head counts appear in no shape, so they come, in this order,
    from: ``clip`` (given explicitly); the config stored with the weights (famevil_fast's, or a Hugging Face
    config's ``num_attention_heads``, ``hidden_act`` and ``layer_norm_eps``, see ``stored_clip_config``);
    ``preset``, when given; a preset whose sizes equal the tensors' (the preset the file is named after,
    e.g. ``ViT-B-16.pt``, or any preset for famevil_fast's own layout, whose models are built from
    presets); CLIP's 64-wide heads for the standard widths (512, 768, 1024). Anything else is refused.

    ``preset`` only stands in for a missing config: weights stored with a config that differs from it
    raise a ``StoredConfigConflict`` naming the differing fields."""
    if clip is not None:
        return clip
    stored = stored_clip_config(state, hints, source)
    if preset is not None:
        check_preset(preset, stored, source)
        return preset
    if stored is not None:
        return stored
    check_size_keys(state, source, advice)
    named = matching_preset(state, source, layout)
    if named is not None:
        return named
    check_head_counts(state, hints, source, advice)
    return infer_clip_config(state, hints)


def stored_clip_config(
    state: dict[str, torch.Tensor], hints: dict, source: str | Path | dict
) -> CLIPConfig | None:
    """The CLIP config stored with the weights, or None: famevil_fast's own (see ``hinted_clip_config``),
    or the one a Hugging Face ``config.json`` (``vision_config`` / ``text_config``) gives with the sizes
    of the tensors, when it gives the head counts that the widths do not settle. A malformed stored
    config raises a ValueError naming the file it came from."""
    stored = _parse_config(lambda: hinted_clip_config(hints), source)
    if stored is not None:
        return stored
    if not (_tower_hints(hints, "vision") or _tower_hints(hints, "text")):
        return None
    if any(key not in state for key in SIZE_KEYS) or _unknown_head_counts(state, hints):
        return None
    return _parse_config(lambda: infer_clip_config(state, hints), source)


class StoredConfigConflict(ValueError):
    """A CLIP preset was given for weights stored with a config that differs from it. ``differences``
    names the differing fields (``vision.heads``, ``activation``, ...); ``location`` is where the stored
    config was read from."""

    def __init__(self, message: str, differences: list[str], location: str) -> None:
        super().__init__(message)
        self.differences, self.location = differences, location


def check_preset(preset: CLIPConfig, stored: CLIPConfig | None, source: str | Path | dict) -> None:
    """Refuse a CLIP ``preset`` for weights whose ``stored`` config (None: no config) differs from it."""
    differences = config_differences(stored, preset, "preset") if stored is not None else []
    if differences:
        location = config_location(source)
        raise StoredConfigConflict(
            f"the CLIP preset given differs from the model config stored with {location} in "
            f"{', '.join(differences)}; a preset only stands in for weights stored without a config",
            differences,
            location,
        )


def config_differences(stored: CLIPConfig, other: CLIPConfig, other_name: str = "given") -> list[str]:
    """The fields in which a stored CLIP config and ``other`` differ, each as
    ``name (stored X, <other_name> Y)``, e.g. ``vision.heads (stored 1, given 2)``."""
    a, b = _flat(stored.to_dict()), _flat(other.to_dict())
    return [
        f"{name} (stored {a[name]!r}, {other_name} {b.get(name)!r})" for name in a if a[name] != b.get(name)
    ]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


SIZE_KEYS = (
    "vision.patch_embed.weight",
    "vision.class_embedding",
    "vision.pos_embed",
    "vision.blocks.0.mlp.fc1.weight",
    "text.token_embed.weight",
    "text.pos_embed",
    "text.blocks.0.mlp.fc1.weight",
    "text.proj.weight",
)


def check_size_keys(
    state: dict[str, torch.Tensor], source: str | Path | dict, advice: str = "pass the CLIP config explicitly"
) -> None:
    """Refuse to infer the sizes of weights that lack a tensor the sizes are read from."""
    missing = [key for key in SIZE_KEYS if key not in state]
    if missing:
        what = "the given state dict" if isinstance(source, dict) else f"checkpoint {source}"
        raise ValueError(
            f"{what} is incomplete: it lacks {missing} (famevil_fast names), the tensors that the "
            f"model's sizes are read from when no config is stored with the weights ({advice})"
        )


def matching_preset(
    state: dict[str, torch.Tensor], source: str | Path | dict, layout: str
) -> CLIPConfig | None:
    """The preset named by the file (``ViT-B-16.pt``), or for famevil_fast's layout any preset, whose
    sizes (head counts aside) equal those of ``state``."""
    names = []
    if not isinstance(source, dict):
        stem = Path(source).name.split(".")[0]
        names.append(PRESET_ALIASES.get(stem, stem))
    if layout == "famevil_fast":
        names.extend(CLIP_PRESETS)
    sizes = _sizes(state)
    for name in names:
        preset = CLIP_PRESETS.get(name)
        if preset is not None and _preset_sizes(preset) == sizes:
            return preset
    return None


def _preset_sizes(c: CLIPConfig) -> tuple:
    return dataclasses.replace(c.vision, heads=1), dataclasses.replace(c.text, heads=1), c.embed_dim


def _sizes(state: dict[str, torch.Tensor]) -> tuple:
    """What the tensor shapes say of a CLIP config: towers with 1 head, and the embedding width."""
    return (
        _vision_config(state, heads=1),
        _text_config(state, heads=1),
        state["text.proj.weight"].shape[0],
    )


def hinted_clip_config(hints: dict) -> CLIPConfig | None:
    """The CLIP config famevil_fast stored with a checkpoint (full FAME-ViL config or CLIP only), if any."""
    if hints.get("format") != FORMAT_TAG:
        return None
    famevil = hints.get("famevil")
    if famevil is not None and not isinstance(famevil, dict):
        raise ValueError(f"config field 'famevil' must be a JSON object, got {type(famevil).__name__}")
    clip = famevil.get("clip") if famevil is not None else hints.get("clip")
    return CLIPConfig.from_dict(clip) if clip else None


def check_head_counts(
    state: dict[str, torch.Tensor],
    hints: dict,
    source: str | Path | dict,
    advice: str = "pass the CLIP config explicitly",
) -> None:
    """Refuse to guess attention-head counts (they appear in no tensor shape) for a tower whose width is
    not a standard CLIP width, unless ``hints`` (a Hugging Face style config) gives them."""
    unknown = _unknown_head_counts(state, hints)
    if unknown:
        what = "the given state dict" if isinstance(source, dict) else f"checkpoint {source}"
        raise ValueError(
            f"{what} carries no model config and its attention-head counts cannot be inferred "
            f"({', '.join(unknown)}: not a standard CLIP width {STANDARD_WIDTHS} nor the sizes of a preset "
            f"it is named after, so 64-wide heads would only be a guess). Give the config: {advice}"
        )


def _unknown_head_counts(state: dict[str, torch.Tensor], hints: dict) -> list[str]:
    """The towers (``"vision width 96"``) whose head counts neither their width nor ``hints`` settle."""
    widths = {
        "vision": state["vision.class_embedding"].shape[0],
        "text": state["text.token_embed.weight"].shape[1],
    }
    return [
        f"{tower} width {width}"
        for tower, width in widths.items()
        if width not in STANDARD_WIDTHS and "num_attention_heads" not in _tower_hints(hints, tower)
    ]


def _tower_hints(hints: dict, tower: str) -> dict:
    found = hints.get(f"{tower}_config")
    return found if isinstance(found, dict) else {}


def is_new_module_key(key: str) -> bool:
    """Keys that CLIP weights do not provide: task adapters (TSA or Cross-Modal), cross-attention adapters,
    heads."""
    return ".tsa." in key or ".xaa." in key or ".xma." in key or key.startswith(("heads.", "xmodal_shared."))


def load_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, backbone_only: bool = False
) -> None:
    """Copy ``state`` into ``model``; missing or unexpected keys and shape mismatches raise one ValueError
    that lists them. With ``backbone_only``, the model's adapters and heads may be absent from ``state``."""
    own = model.state_dict()
    wanted = {k for k in own if not (backbone_only and is_new_module_key(k))}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - set(own))
    shared = sorted(set(own) & set(state))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in shared
        if own[k].shape != state[k].shape
    ]
    mismatched += [
        f"{k}: file dtype {state[k].dtype}, the model needs floating point"
        for k in shared
        if own[k].is_floating_point() and not state[k].is_floating_point()
    ]
    if missing or unexpected or mismatched:
        found = mismatch_summary(
            (
                ("shape or dtype mismatches", mismatched),
                ("missing keys", missing),
                ("unexpected keys", unexpected),
            )
        )
        raise ValueError(f"{what} does not match the model (of another size or layout?): {found}")
    model.load_state_dict(state, strict=not backbone_only)


MISMATCH_EXAMPLES = 3  # keys named per kind of mismatch in a one-line loading error


def mismatch_summary(kinds: Iterable[tuple[str, list[str]]]) -> str:
    """One line for the kinds of mismatch found: each nonempty kind with its count and a few examples."""
    return "; ".join(
        f"{kind} ({len(items)}, e.g. {', '.join(items[:MISMATCH_EXAMPLES])})"
        for kind, items in kinds
        if items
    )


# ---------------------------------------------------------------- writing
def save_famevil(
    model: FameViL, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """``model``'s config and weights (``state_dict`` in place of its own, e.g. float32 masters) in
    ``directory``."""
    directory = Path(directory)
    config = {"format": FORMAT_TAG, "famevil": model.config.to_dict()}
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"config": json.dumps(config)}
    atomic_write_together(
        {
            directory / WEIGHTS_FILE: safetensors_writer(tensors, meta),
            directory / CONFIG_FILE: json_writer(config, 2),
        }
    )
    return directory
