"""Model configurations: CLIP tower sizes (with named presets) and the FAME-ViL options built on them.

Configs are frozen dataclasses that round-trip through plain dicts (``to_dict`` / ``from_dict``), which is
how they are stored beside checkpoints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from famevil_fast.text.special_tokens import EOT_ID

TASKS = ("itc", "tgir", "scr", "cap")
PRETRAIN_TASKS = ("mvc", "pac", "itm")  # FashionViL: multi-view contrastive, pseudo-attributes, matching
ALL_TASKS = TASKS + PRETRAIN_TASKS
ADAPTER_TYPES = ("tsa", "xmodal")
XAA_MODES = ("both", "text", "none")
ATTENTION_IMPLS = ("auto", "sdpa", "eager", "flash")
RESIDUAL_STREAMS = ("float32", "autocast")
ACTIVATIONS = ("quick_gelu", "gelu")
# The model's op backend (None = automatic): "torch" and "triton" name every op's implementation; "cuda" and
# "cpu" name the compiled contrastive losses, and leave the adapters to their automatic choice.
BACKENDS = (None, "torch", "triton", "cuda", "cpu")
ADAPTER_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048


@dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        sizes = [
            (f"{name}.{f.name}", getattr(tower, f.name))
            for name, tower in (("vision", self.vision), ("text", self.text))
            for f in dataclasses.fields(tower)
        ]
        for name, value in [*sizes, ("embed_dim", self.embed_dim)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"clip.{name} must be a positive int, got {value!r}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(f"{name} width {tower.width} is not divisible by its {tower.heads} heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.vision.image_size} is not a multiple of "
                f"patch_size {self.vision.patch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """The config of ``to_dict``; a missing, unknown or mistyped field raises a ValueError naming it."""
        d = _checked_fields(cls, d, "clip", required=("vision", "text"))
        vision = VisionConfig(**_checked_fields(VisionConfig, d.pop("vision"), "clip.vision"))
        text = TextConfig(**_checked_fields(TextConfig, d.pop("text"), "clip.text"))
        return cls(vision=vision, text=text, **d)


def _checked_fields(cls: type, d: Any, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of the stored dict ``d`` of dataclass ``cls``, every field known, present when ``required``,
    and of its declared type (nested configs excepted); lists stand for tuples."""
    if not isinstance(d, dict):
        raise ValueError(f"config field {where!r} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ValueError(f"unknown field(s) under {where!r}: {unknown}; known: {sorted(hints)}")
    missing = [name for name in required if name not in d]
    if missing:
        raise ValueError(f"config {where!r} lacks the field(s) {missing}")
    out = dict(d)
    for name, value in d.items():
        hint = hints[name]
        if hint in (CLIPConfig, VisionConfig, TextConfig):
            continue
        if not _has_type(value, hint):
            raise ValueError(
                f"config field {where}.{name} must be {_type_name(hint)}, "
                f"got {type(value).__name__} {value!r}"
            )
        if isinstance(value, list):
            out[name] = tuple(value)
    return out


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_has_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("NoneType", "None")


def _vit(image_size, patch, width, layers, heads, mlp) -> VisionConfig:
    return VisionConfig(
        image_size=image_size, patch_size=patch, width=width, layers=layers, heads=heads, mlp_dim=mlp
    )


def _txt(width, layers, heads, mlp, context_length=77) -> TextConfig:
    return TextConfig(width=width, layers=layers, heads=heads, mlp_dim=mlp, context_length=context_length)


CLIP_PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-16": CLIPConfig(_vit(224, 16, 768, 12, 12, 3072), _txt(512, 12, 8, 2048), 512),
    "ViT-B-32": CLIPConfig(_vit(224, 32, 768, 12, 12, 3072), _txt(512, 12, 8, 2048), 512),
    "ViT-L-14": CLIPConfig(_vit(224, 14, 1024, 24, 16, 4096), _txt(768, 12, 12, 3072), 768),
    # Small models for tests and CPU runs; equal tower depths so cross-attention adapters pair layers.
    "tiny": CLIPConfig(_vit(64, 16, 128, 4, 4, 512), _txt(128, 4, 4, 512), 128),
    "micro": CLIPConfig(_vit(32, 16, 64, 2, 2, 128), _txt(64, 2, 2, 128), 64),
}
PRESET_ALIASES = {"ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B-32", "ViT-L/14": "ViT-L-14"}


def clip_preset(name: str) -> CLIPConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP configuration {name!r}; known: {sorted(CLIP_PRESETS)}")
    return CLIP_PRESETS[key]


@dataclass(frozen=True)
class FameViLConfig:
    """FAME-ViL on top of a CLIP backbone.

    tasks: task keys with their own task-specific adapters (TSA) and heads.
    adapter_bottleneck: TSA width r (64 in the multi-task recipes, 512 in the released checkpoint).
    xaa: cross-attention adapters in "both" towers, the "text" tower only, or "none".
    caption_loss_on_padding: train padded positions to predict the end token, as the official code does
        (off by default: positions after the first end token are ignored). The official text is padded with
        the end token, so padded positions then read end tokens whatever id the batch pads with.
    caption_vocab: token ids the caption head scores (a shortlist, e.g. every token of the training
        captions; the end token must be in it); None = the whole vocabulary. Logits, the loss and decoding
        then cover only these tokens, which makes the LM head |V| / |shortlist| times cheaper.
    attention: "auto" (flash-attn when installed and applicable, else SDPA), "sdpa", "eager" (explicit
        softmax, the faithful reference) or "flash".
    backend: op backend for adapters and losses (None = automatic, "torch" = references, "triton" = the
        Triton kernels; "cuda" / "cpu" = the compiled contrastive losses, adapters automatic).
    activation_backend: op backend of the towers' QuickGELU ("torch", "triton"); None = that of ``backend``
        (automatic where it names none of theirs).
    residual_stream: "float32" (default) keeps both towers' residual stream in float32 under autocast, as
        autocast leaves it; "autocast" keeps it in the autocast dtype (bf16 or fp16), the pre-LayerNorms
        reading and writing that dtype (float32 statistics, the parameters rounded to it), which removes
        the casts between the stream and the products. Without autocast the stream is float32 either way.
    num_attributes: pseudo-attribute classes of the PAC head (needed when "pac" is a task).
    adapter_type: "tsa" (task-specific adapters parallel with the MLP) or "xmodal" (per-task Cross-Modal
        Adapters: sequential after the attention and MLP sub-layers of both towers, the last
        ``xmodal_shared`` up-projection channels shared between the towers; see ``model.xmodal``).
    xmodal_bottleneck, xmodal_shared: the Cross-Modal Adapter's r and d_s.
    """

    clip: CLIPConfig = field(default_factory=lambda: CLIP_PRESETS["ViT-B-16"])
    tasks: tuple[str, ...] = TASKS
    adapter_bottleneck: int = 64
    adapter_dropout: float = 0.0
    xaa: str = "both"
    xaa_bottleneck: int = 64
    num_classes: int = 121
    norm_scale_init: float = 4.0
    caption_loss_on_padding: bool = False
    caption_vocab: tuple[int, ...] | None = None
    attention: str = "auto"
    backend: str | None = None
    activation_backend: str | None = None
    residual_stream: str = "float32"
    num_attributes: int = 0
    adapter_type: str = "tsa"
    xmodal_bottleneck: int = 8
    xmodal_shared: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            raise ValueError(f"tasks must be a sequence of task names, not one string: got {self.tasks!r}")
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks are {ALL_TASKS}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks}")
        if self.xaa not in XAA_MODES:
            raise ValueError(f"xaa must be one of {XAA_MODES}, got {self.xaa!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (None = automatic), got {self.backend!r}")
        if self.activation_backend not in (*ADAPTER_BACKENDS, None):
            raise ValueError(
                f"activation_backend must be one of {ADAPTER_BACKENDS} or None (that of backend), got "
                f"{self.activation_backend!r}"
            )
        if self.residual_stream not in RESIDUAL_STREAMS:
            streams = RESIDUAL_STREAMS
            raise ValueError(f"residual_stream must be one of {streams}, got {self.residual_stream!r}")
        for name in ("adapter_bottleneck", "xaa_bottleneck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"adapter bottlenecks must be positive ints, got {name}={value!r}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must lie in [0, 1), got {self.adapter_dropout!r}")
        if "scr" in self.tasks and self.num_classes < 1:
            raise ValueError(f"task 'scr' needs num_classes >= 1, got {self.num_classes}")
        if self.caption_vocab is not None:
            vocab = self.clip.text.vocab_size
            if EOT_ID not in self.caption_vocab or any(not 0 <= t < vocab for t in self.caption_vocab):
                raise ValueError(
                    f"caption_vocab must hold token ids in [0, {vocab}) including the end token {EOT_ID}"
                )
            if len(set(self.caption_vocab)) != len(self.caption_vocab):
                raise ValueError("caption_vocab has repeated token ids")
        self._check_pretraining()
        self._check_xmodal()
        if self.xaa != "none" and self.clip.vision.layers != self.clip.text.layers:
            raise ValueError(
                "cross-attention adapters pair vision and text layers one to one, but the vision tower has "
                f"{self.clip.vision.layers} layers and the text tower {self.clip.text.layers}; use xaa='none'"
            )

    def _check_pretraining(self) -> None:
        if "pac" in self.tasks and self.num_attributes < 1:
            raise ValueError(
                f"task 'pac' needs num_attributes >= 1 (the attribute vocabulary), got {self.num_attributes}"
            )
        fused = [t for t in ("mvc", "itm") if t in self.tasks]
        if fused and self.xaa != "both":
            raise ValueError(f"task(s) {fused} run the fusion mode, which needs xaa='both', got {self.xaa!r}")

    def _check_xmodal(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}")
        if self.adapter_type != "xmodal":
            return
        r, d_s = self.xmodal_bottleneck, self.xmodal_shared
        widths = (self.clip.vision.width, self.clip.text.width)
        if r < 1 or not 0 <= d_s <= min(widths):
            raise ValueError(
                f"Cross-Modal Adapter needs xmodal_bottleneck >= 1 and 0 <= xmodal_shared <= "
                f"min(tower widths) = {min(widths)}; got r={r}, d_s={d_s}"
            )
        if self.clip.vision.layers != self.clip.text.layers:
            raise ValueError(
                "the Cross-Modal Adapter shares up-projection channels between the towers layer by layer, "
                f"but the vision tower has {self.clip.vision.layers} layers and the text tower "
                f"{self.clip.text.layers}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        if self.caption_vocab is not None:
            d["caption_vocab"] = list(self.caption_vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FameViLConfig:
        """The config of ``to_dict``; a missing, unknown or mistyped field raises a ValueError naming it."""
        d = _checked_fields(cls, d, "famevil", required=("clip",))
        clip = CLIPConfig.from_dict(d.pop("clip"))
        return cls(clip=clip, **d)

    def replace(self, **changes: Any) -> FameViLConfig:
        return dataclasses.replace(self, **changes)

    @property
    def adapter_backend(self) -> str | None:
        """The backend of the adapters and the decoding step: ``backend`` where it names one of theirs, else
        None (automatic; "cuda" / "cpu" name the contrastive losses' kernels)."""
        return self.backend if self.backend in ADAPTER_BACKENDS else None

    @property
    def quick_gelu_backend(self) -> str | None:
        """The backend of the towers' QuickGELU: ``activation_backend``, else ``adapter_backend``."""
        return self.activation_backend or self.adapter_backend
