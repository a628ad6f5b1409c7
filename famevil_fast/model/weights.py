"""Checkpoint formats: reading CLIP and FAME-ViL weights in every supported layout, and writing ours.

Supported inputs, detected from the keys:
- OpenAI CLIP ``.pt`` (TorchScript archive or state dict) and open_clip state dicts (same names);
- Hugging Face ``CLIPModel`` state dicts, ``.safetensors`` files and model directories;
- official FAME-ViL checkpoints (mmf; HF names under ``clip.`` plus ``adapt_mlp``/``cross_attn``/``heads``);
- famevil_fast's own layout (``save_pretrained``: ``config.json`` + ``model.safetensors``).
Everything is converted to famevil_fast's parameter names (fused QKV, ``vision.*``, ``text.*``, ``heads.*``).

The model config comes from the checkpoint when it carries one: ``config.json`` in a directory, the
``config`` metadata of a ``.safetensors`` file, or a sidecar ``<file>.config.json`` beside a single file
(what ``famevil-fast convert`` writes next to official ``.pth`` files). Without one, sizes are inferred from
the shapes; head counts are not in any shape, so loading a FAME-ViL checkpoint whose tower width is not a
standard CLIP width refuses rather than guess (pass ``clip=...`` or add the sidecar).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from famevil_fast.model.config import CLIPConfig, FameViLConfig, TextConfig, VisionConfig

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
        return _read_directory(path)
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


def _read_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = read_config(path / CONFIG_FILE) if (path / CONFIG_FILE).exists() else {}
    singles = [path / WEIGHTS_FILE, path / "pytorch_model.bin"]
    for file in singles:
        if file.exists():
            state, meta = read_state_dict(file)
            return state, config or meta
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_parse_json(index.read_bytes(), str(index))["weight_map"].values()))
        state = {}
        for shard in shards:
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
        hint = (
            ""
            if trust_pickle
            else " (if the file is trusted and holds non-tensor objects, pass trust_pickle=True)"
        )
        raise ValueError(f"cannot read checkpoint {path}: {exc}{hint}") from exc
    return unwrap_container(obj, str(path))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())


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
            fused.setdefault(f"{prefix}{slot}.{group.group(4)}", {})[part] = value
            continue
        out[prefix + _hf_layer_name(rest, single_task)] = value
    for name, parts in fused.items():
        order = ("q", "k", "v") if ".attn.qkv." in name else ("key", "value")
        missing = [p for p in order if p not in parts]
        if missing:
            raise ValueError(f"incomplete attention weights for {name}: missing {missing}")
        out[name] = torch.cat([parts[p] for p in order])
    return out


def _hf_layer_name(rest: str, single_task: str | None) -> str:
    if rest.startswith("adapt_mlp."):
        parts = rest.split(".")[1:]
        if parts[0] in TASK_ORDER:
            task, parts = parts[0], parts[1:]
        elif single_task is not None:
            task = single_task
        else:
            raise ValueError(f"adapter key {rest} has no task segment and the checkpoint's task is unknown")
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
    state = strip_prefixes(dict(state))
    fmt = detect_format(state)
    if fmt == "famevil_fast":
        return state
    if fmt == "famevil_official":
        return convert_official_famevil(state)
    if fmt == "huggingface":
        return convert_huggingface(state)
    return convert_openai(state)


# ---------------------------------------------------------------- config inference
def _count_blocks(state: dict[str, torch.Tensor], tower: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{tower}\.blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_clip_config(state: dict[str, torch.Tensor], hints: dict | None = None) -> CLIPConfig:
    """CLIP sizes from canonical tensors; head counts and activation from ``hints`` (a Hugging Face config
    or a famevil_fast config) when present, else CLIP's convention of 64-wide heads and QuickGELU."""
    hints = hints or {}
    vw = state["vision.class_embedding"].shape[0]
    patch = state["vision.patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["vision.pos_embed"].shape[0] - 1)
    tw = state["text.token_embed.weight"].shape[1]
    vision_hint, text_hint = hints.get("vision_config", {}), hints.get("text_config", {})
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=vw,
        layers=_count_blocks(state, "vision"),
        heads=vision_hint.get("num_attention_heads", vw // 64),
        mlp_dim=state["vision.blocks.0.mlp.fc1.weight"].shape[0],
    )
    text = TextConfig(
        vocab_size=state["text.token_embed.weight"].shape[0],
        context_length=state["text.pos_embed"].shape[0],
        width=tw,
        layers=_count_blocks(state, "text"),
        heads=text_hint.get("num_attention_heads", tw // 64),
        mlp_dim=state["text.blocks.0.mlp.fc1.weight"].shape[0],
    )
    act = text_hint.get("hidden_act", "quick_gelu")
    act = "quick_gelu" if act == "quick_gelu" else "gelu"
    eps = text_hint.get("layer_norm_eps", 1e-5)
    return CLIPConfig(
        vision=vision,
        text=text,
        embed_dim=state["text.proj.weight"].shape[0],
        activation=act,
        layer_norm_eps=eps,
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
def load_clip_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Canonical CLIP backbone tensors (no adapters or heads) and the inferred CLIP config."""
    if isinstance(source, dict):
        state, hints = unwrap_container(source), {}
    else:
        state, hints = read_state_dict(source)
    state = to_canonical(state)
    clip = hinted_clip_config(hints) or infer_clip_config(state, hints)
    backbone = {k: v for k, v in state.items() if not is_new_module_key(k)}
    return backbone, clip


def load_famevil_checkpoint(
    cls: type[FameViL], path: str | Path, trust_pickle: bool = False, **overrides: Any
) -> FameViL:
    """Build a FameViL from a checkpoint; missing or unexpected keys and shape mismatches are errors."""
    raw, hints = read_state_dict(path, trust_pickle)
    state = to_canonical(raw)
    config = _checkpoint_config(state, hints, path, overrides.get("clip"))
    if overrides:
        config = config.replace(**overrides)
    model = cls(config)
    load_into(model, state, f"checkpoint {path}")
    return model


def _checkpoint_config(
    state: dict[str, torch.Tensor], hints: dict, path: str | Path, clip: CLIPConfig | None
) -> FameViLConfig:
    """The stored FAME-ViL config, else one inferred from the shapes and the given or stored CLIP config."""
    if hints.get("format") == FORMAT_TAG and "famevil" in hints:
        return FameViLConfig.from_dict(hints["famevil"])
    clip = clip or hinted_clip_config(hints)
    if clip is None:
        check_head_counts(state, hints, path)
        clip = infer_clip_config(state, hints)
    return infer_famevil_config(state, clip)


def hinted_clip_config(hints: dict) -> CLIPConfig | None:
    """The CLIP config famevil_fast stored with a checkpoint (full FAME-ViL config or CLIP only), if any."""
    if hints.get("format") != FORMAT_TAG:
        return None
    clip = hints["famevil"]["clip"] if "famevil" in hints else hints.get("clip")
    return CLIPConfig.from_dict(clip) if clip else None


def check_head_counts(state: dict[str, torch.Tensor], hints: dict, path: str | Path) -> None:
    """Refuse to guess attention-head counts (they appear in no tensor shape) for a tower whose width is
    not a standard CLIP width, unless ``hints`` (a Hugging Face style config) gives them."""
    widths = {
        "vision": state["vision.class_embedding"].shape[0],
        "text": state["text.token_embed.weight"].shape[1],
    }
    unknown = [
        f"{tower} width {width}"
        for tower, width in widths.items()
        if width not in STANDARD_WIDTHS and "num_attention_heads" not in hints.get(f"{tower}_config", {})
    ]
    if unknown:
        raise ValueError(
            f"checkpoint {path} carries no model config and its attention-head counts cannot be inferred "
            f"({', '.join(unknown)}: not a standard CLIP width {STANDARD_WIDTHS}, so 64-wide heads would "
            f"only be a guess). Give the config: put it in {sidecar_path(path).name} beside the file (as "
            "`famevil-fast convert` does), pass clip=... (e.g. clip_preset('tiny')) to "
            "FameViL.from_pretrained, or use `famevil-fast convert --clip PRESET`"
        )


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
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what} does not match the model:\n"
            f"  missing keys ({len(missing)}): {missing[:20]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched[:20]}"
        )
    model.load_state_dict(state, strict=not backbone_only)


# ---------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_famevil(model: FameViL, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    config = {"format": FORMAT_TAG, "famevil": model.config.to_dict()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(config)}
    atomic_write_bytes(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    atomic_write_bytes(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return directory
