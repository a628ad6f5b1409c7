"""Writing famevil_fast weights in other layouts: Hugging Face CLIP names, and the official FAME-ViL
(mmf) layout of CHECKPOINT_LAYOUT.md, so checkpoints can move back to those code bases."""

from __future__ import annotations

import re

import torch

from famevil_fast.model.weights import _ADAPTER_PARTS, _HF_LAYER, _HF_NORMS, _HF_TOP

_TOP = {v: k for k, v in _HF_TOP.items()}
_NORMS = {v: k for k, v in _HF_NORMS.items()}
_LAYER = {v: k for k, v in _HF_LAYER.items()}
_ADAPTER = {v: k for k, v in _ADAPTER_PARTS.items()}


def to_huggingface(state: dict[str, torch.Tensor], with_adapters: bool = False) -> dict[str, torch.Tensor]:
    """famevil_fast names -> Hugging Face CLIPModel names (plus FAME-ViL's adapter names when asked)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("heads."):
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


def to_official_famevil(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """famevil_fast names -> the official FAME-ViL state dict (``prefix`` + ``clip.*`` / ``heads.*``),
    including the ``position_ids`` buffers that transformers 4.20 saved."""
    clip = to_huggingface(state, with_adapters=True)
    out = {f"{prefix}clip.{k}": v for k, v in clip.items()}
    text_len = state["text.pos_embed"].shape[0]
    vision_len = state["vision.pos_embed"].shape[0]
    out[f"{prefix}clip.text_model.embeddings.position_ids"] = torch.arange(text_len)[None]
    out[f"{prefix}clip.vision_model.embeddings.position_ids"] = torch.arange(vision_len)[None]
    out.update({prefix + k: v for k, v in state.items() if k.startswith("heads.")})
    return out
