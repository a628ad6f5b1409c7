"""The model layer: CLIP towers, adapters, the FAME-ViL model, heads, checkpoint formats and decoding."""

from famevil_fast.model.clip import CLIP
from famevil_fast.model.config import (
    CLIP_PRESETS,
    CLIPConfig,
    FameViLConfig,
    TextConfig,
    VisionConfig,
    clip_preset,
)
from famevil_fast.model.famevil import FameViL, TaskOutput

__all__ = [
    "CLIP",
    "CLIP_PRESETS",
    "CLIPConfig",
    "FameViL",
    "FameViLConfig",
    "TaskOutput",
    "TextConfig",
    "VisionConfig",
    "clip_preset",
]
