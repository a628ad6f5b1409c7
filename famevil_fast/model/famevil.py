"""The FAME-ViL model: CLIP towers with task-specific adapters, cross-attention adapters and task heads.

Three ways of running the towers, as the official FAME-ViL code runs them:
- two-tower: image and text encoded independently with a task's adapters (retrieval, TGIR targets);
- fusion: both towers in lock-step, each layer's cross-attention adapters reading the other tower's
  post-self-attention states; output = projected image + projected text (TGIR queries, SCR);
- generative: the vision tower alone keeps every layer's output as memory; the causal text tower
  cross-attends layer by layer to that memory and an LM head predicts the next token (captioning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.capture import host_reads_allowed, static_shapes_enabled
from famevil_fast.model import losses
from famevil_fast.model.clip import TextTower, VisionTower, first_eot_positions
from famevil_fast.model.config import FameViLConfig
from famevil_fast.model.heads import build_heads
from famevil_fast.model.pretrain import FORWARDS as PRETRAIN_FORWARDS
from famevil_fast.model.pretrain import PRETRAIN_BATCH_KEYS, build_pretrain_heads
from famevil_fast.model.task_mix import TaskChoice
from famevil_fast.model.validation import (
    check_can_caption,
    check_input_ids,
    check_pixels,
    check_same_batch,
    check_task,
)
from famevil_fast.text.special_tokens import EOT_ID


class _Keep:
    """The default of ``set_runtime``'s ``backend``: leave it as it is (None means automatic)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


class DiscardedWeightsWarning(UserWarning):
    """``FameViL.from_clip`` or ``CLIP.from_pretrained`` was given a FAME-ViL checkpoint: it keeps the CLIP
    backbone and discards the trained adapters and heads. ``keys`` are the discarded keys, ``kinds`` says
    what they are."""

    def __init__(self, message: str, keys: list[str], kinds: str) -> None:
        super().__init__(message)
        self.keys, self.kinds = keys, kinds


def warn_discarded_weights(source: str | Path | dict, dropped: list[str], loader: str, fate: str) -> None:
    """Warn (``DiscardedWeightsWarning``, pointing at the loader's caller) that ``loader`` keeps only the CLIP
    backbone of the FAME-ViL checkpoint ``source``: its ``dropped`` keys are discarded (``fate``: what
    becomes of them)."""
    import warnings

    from famevil_fast.model.weights import new_module_kinds

    kinds = ", ".join(new_module_kinds(dropped))
    name = "the given state dict" if isinstance(source, dict) else source
    message = (
        f"{name} is a FAME-ViL checkpoint: {loader} keeps only its CLIP backbone; its trained {kinds} "
        f"({len(dropped)} tensors) are discarded{fate} (FameViL.from_pretrained keeps them)"
    )
    warnings.warn(DiscardedWeightsWarning(message, dropped, kinds), stacklevel=3)  # the loader's caller


TASK_BATCH_KEYS = {
    "itc": ("pixels", "input_ids"),
    "tgir": ("ref_pixels", "input_ids", "target_pixels"),
    "scr": ("pixels", "input_ids", "labels"),
    "cap": ("pixels", "input_ids"),
    **PRETRAIN_BATCH_KEYS,
}


@dataclass
class TaskOutput:
    """What a training forward returns: the task loss and the tensors a distillation loss or a metric
    needs."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def trim_text_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns after the last end token of the batch. Exact for every output the model
    uses: text attention is causal, and padded keys are masked wherever other tokens could see them."""
    if static_shapes_enabled():
        return input_ids
    has_eot = (input_ids == EOT_ID).any(dim=1)
    if not bool(has_eot.all()):
        return input_ids
    length = int(first_eot_positions(input_ids).max()) + 1
    return input_ids if length == input_ids.shape[1] else input_ids[:, :length]


def text_valid_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True up to and including the first end-of-text token (the attention mask of the text);
    a row without an end token (a decoding prefix) is valid throughout."""
    has_eot = (input_ids == EOT_ID).any(dim=1)
    eot = torch.where(has_eot, first_eot_positions(input_ids), input_ids.shape[1] - 1)
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= eot[:, None]


class FameViL(nn.Module):
    """FAME-ViL. Build it from CLIP weights (``from_clip``) or load a checkpoint (``from_pretrained``)."""

    def __init__(self, config: FameViLConfig | None = None) -> None:
        super().__init__()
        self.config = config or FameViLConfig()
        c, clip = self.config, self.config.clip
        adapter_tasks = c.tasks if c.adapter_type == "tsa" else ()
        common = dict(
            activation=clip.activation,
            eps=clip.layer_norm_eps,
            tasks=adapter_tasks,
            bottleneck=c.adapter_bottleneck,
            adapter_dropout=c.adapter_dropout,
            xaa_bottleneck=c.xaa_bottleneck,
        )
        vision_ctx = clip.text.width if c.xaa == "both" else None
        text_ctx = clip.vision.width if c.xaa in ("both", "text") else None
        self.vision = VisionTower(clip.vision, clip.embed_dim, context_width=vision_ctx, **common)
        self.text = TextTower(clip.text, clip.embed_dim, context_width=text_ctx, **common)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.heads = build_heads(
            c.tasks, clip.embed_dim, clip.text.width, clip.text.vocab_size, c.num_classes, c.norm_scale_init
        )
        self.heads.update(build_pretrain_heads(c))
        if c.adapter_type == "xmodal":
            from famevil_fast.model.xmodal import attach_cross_modal_adapters

            attach_cross_modal_adapters(self)
        if c.caption_vocab is not None:
            vocab = torch.tensor(c.caption_vocab, dtype=torch.long)
            self.register_buffer("caption_vocab", vocab, persistent=False)
        else:
            self.caption_vocab = None
        self.set_runtime(
            attention=c.attention,
            backend=c.backend,
            residual_stream=c.residual_stream,
            activation_backend=c.activation_backend,
        )

    # ------------------------------------------------------------------ construction and checkpoints
    def set_runtime(
        self,
        attention: str | None = None,
        backend: str | None | _Keep = KEEP,
        residual_stream: str | None = None,
        activation_backend: str | None | _Keep = KEEP,
    ) -> FameViL:
        """Choose the attention implementation, the op backend of every layer and the residual stream's
        dtype under autocast (no weights change). Only the arguments passed change: ``attention`` one of
        ``ATTENTION_IMPLS``, ``backend`` one of ``BACKENDS`` (None: automatic; "cuda" / "cpu" name the
        contrastive losses' kernels and leave the adapters automatic), ``residual_stream`` one of
        ``RESIDUAL_STREAMS``, ``activation_backend`` the QuickGELUs' ("torch", "triton", or None: that of
        ``backend``; see ``FameViLConfig``); a bad value raises ValueError at once."""
        from famevil_fast.model.adapters import BottleneckAdapter, CrossAttentionAdapter
        from famevil_fast.model.clip import QuickGELU, SelfAttention, StreamLayerNorm, TextTower, VisionTower

        changes: dict[str, Any] = {}
        if attention is not None:
            changes["attention"] = attention
        if not isinstance(backend, _Keep):
            changes["backend"] = backend
        if residual_stream is not None:
            changes["residual_stream"] = residual_stream
        if not isinstance(activation_backend, _Keep):
            changes["activation_backend"] = activation_backend
        self.config = self.config.replace(**changes)
        keep = self.config.residual_stream == "autocast"
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.impl = self.config.attention
            elif isinstance(module, BottleneckAdapter | CrossAttentionAdapter):
                module.backend = self.config.adapter_backend
            elif isinstance(module, QuickGELU):
                module.backend = self.config.quick_gelu_backend
            elif isinstance(module, StreamLayerNorm):
                module.keeps_dtype = keep
            elif isinstance(module, VisionTower | TextTower):
                module.keeps_stream_dtype = keep
        return self

    @classmethod
    def from_clip(
        cls,
        path_or_state_dict: str | Path | dict,
        config: FameViLConfig | None = None,
        trust_pickle: bool = False,
        *,
        match_stored_config: bool = False,
    ) -> FameViL:
        """Start from CLIP weights (OpenAI .pt, open_clip, Hugging Face or famevil_fast layout); adapters,
        cross-attention adapters and heads are freshly initialised (the model then behaves as CLIP). The
        model is returned in eval mode: call ``.train()`` before training it. Without ``config``, head counts
        come from the config stored with the weights, a preset of the same sizes (e.g. the file name
        ``ViT-B-16.pt``), or CLIP's 64-wide heads for the standard widths; any other width is refused.
        Given a FAME-ViL checkpoint, only its backbone is taken and its trained adapters and heads are
        discarded, with a ``DiscardedWeightsWarning``: ``from_pretrained`` keeps them, and a training
        recipe's ``model.init_from`` takes the backbone with the cross-attention adapters and the shared
        tasks' adapters and heads. Pass ``trust_pickle=True`` only for trusted files that hold non-tensor
        objects. ``config.clip`` replaces a config stored with the weights, unless ``match_stored_config``:
        then a stored config that differs from it is refused (``weights.StoredConfigConflict``, a ValueError
        naming the fields), as a training recipe's ``model.init`` is."""
        from famevil_fast.model.weights import clip_weights_name, load_clip_backbone, load_into

        clip = config.clip if config else None
        if match_stored_config and clip is not None:  # the config only stands in for a missing one
            explicit, preset = None, clip
        else:
            explicit, preset = clip, None
        state, clip_config, dropped = load_clip_backbone(path_or_state_dict, explicit, trust_pickle, preset)
        what = clip_weights_name(path_or_state_dict)
        if dropped:
            warn_discarded_weights(path_or_state_dict, dropped, "FameViL.from_clip", " and start fresh")
        model = cls(config or FameViLConfig(clip=clip_config))
        load_into(model, state, what, backbone_only=True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> FameViL:
        """Load an official FAME-ViL checkpoint (``.pth``/``.ckpt``, bare or in a training container, with or
        without teachers) or one written by ``save_pretrained``. Keyword ``overrides`` replace config fields
        (e.g. ``attention="eager"``, or ``clip=clip_preset(...)``). The official layout stores no head
        counts: the config written beside the file by ``famevil-fast convert`` supplies them, else a preset
        of the same sizes (see ``weights.resolve_clip_config``), else CLIP's 64-wide heads are assumed for
        the standard widths (512, 768, 1024) and any other width is refused.
        A CLIP-only checkpoint (no adapters or heads) is refused: use ``from_clip``. The model is returned in
        eval mode, as Hugging Face's ``from_pretrained`` does: call ``.train()`` before training it.
        Pass ``trust_pickle=True`` only for trusted files that hold non-tensor objects."""
        from famevil_fast.model.weights import load_famevil_checkpoint

        return load_famevil_checkpoint(cls, path, **overrides)

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically); ``state_dict``
        replaces the model's own weights (the trainer's float32 masters of a bf16 model)."""
        from famevil_fast.model.weights import save_famevil

        return save_famevil(self, directory, state_dict)

    # ------------------------------------------------------------------ the three modes
    def image_features(self, pixels: torch.Tensor, task: TaskChoice) -> torch.Tensor:
        """Two-tower image embedding (B, E), before normalisation."""
        return self.vision(pixels, task)

    def trim(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``trim_text_padding`` unless padded positions are trained (``caption_loss_on_padding``)."""
        return input_ids if self.config.caption_loss_on_padding else trim_text_padding(input_ids)

    def text_features(self, input_ids: torch.Tensor, task: TaskChoice) -> torch.Tensor:
        """Two-tower text embedding (B, E), before normalisation."""
        input_ids = self.trim(input_ids)
        return self.text(input_ids, task, mask=self._text_self_mask(input_ids))

    def fused_features(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, task: TaskChoice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion mode: towers in lock-step with cross-attention both ways; returns (v, t) projections."""
        if self.config.xaa != "both":
            raise ValueError(
                "fusion mode needs cross-attention adapters in both towers (xaa='both'), "
                f"this model has xaa={self.config.xaa!r}"
            )
        input_ids = self.trim(input_ids)
        valid = text_valid_mask(input_ids)
        self_mask = self._text_self_mask(input_ids)
        hv, ht = self.vision.embed(pixels), self.text.embed(input_ids)
        for vb, tb in zip(self.vision.blocks, self.text.blocks):
            av = vb.attend(hv, task=task)
            at = tb.attend(ht, causal=True, mask=self_mask, task=task)
            xv = vb.cross_attend(av, context=at, context_mask=valid)
            xt = tb.cross_attend(at, context=av)
            hv, ht = vb.feed_forward(av, task, xv), tb.feed_forward(at, task, xt)
        return self.vision.pool(hv), self.text.pool(ht, input_ids)

    def vision_memory(self, pixels: torch.Tensor, task: str = "cap") -> list[torch.Tensor]:
        """Generative mode, image side: the output of every vision block (B, N, width) as memory."""
        h = self.vision.embed(pixels)
        memory = []
        for block in self.vision.blocks:
            h = block(h, task)
            memory.append(h)
        return memory

    def caption_states(
        self, memory: list[torch.Tensor], input_ids: torch.Tensor, task: str = "cap"
    ) -> torch.Tensor:
        """Generative mode, text side: final-LN text states (B, L, width) conditioned on vision memory."""
        check_can_caption(self.config.xaa)
        self_mask = self._text_self_mask(input_ids)
        h = self.text.embed(input_ids)
        for block, mem in zip(self.text.blocks, memory):
            a = block.attend(h, causal=True, mask=self_mask, task=task)
            h = block.feed_forward(a, task, block.cross_attend(a, context=mem))
        return self.text.ln_final(h)

    def caption_logits(self, states: torch.Tensor, task: str = "cap") -> torch.Tensor:
        """LM-head logits of text states; over ``caption_vocab`` when the model has a shortlist."""
        head = self.heads[task]
        if self.caption_vocab is None:
            return head(states)
        return F.linear(states, head.weight[self.caption_vocab], head.bias[self.caption_vocab])

    def caption_targets(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> indices into the logits of ``caption_logits`` (-100, ignored, when not
        shortlisted)."""
        if self.caption_vocab is None:
            return token_ids
        table = torch.full(
            (self.config.clip.text.vocab_size,), -100, dtype=torch.long, device=token_ids.device
        )
        table[self.caption_vocab] = torch.arange(self.caption_vocab.numel(), device=token_ids.device)
        return table[token_ids]

    def caption_tokens(self, logit_index: torch.Tensor) -> torch.Tensor:
        """Indices into the logits of ``caption_logits`` -> token ids."""
        return logit_index if self.caption_vocab is None else self.caption_vocab[logit_index]

    def _text_self_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Key-padding mask for text self-attention, only where padded positions' outputs are used."""
        if not self.config.caption_loss_on_padding:
            return None
        return text_valid_mask(input_ids)[:, None, None, :]

    # ------------------------------------------------------------------ public inference API
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _check_task(self, task: str) -> None:
        check_task(task, self.config.tasks)

    def encode_image(self, pixels: torch.Tensor, task: str = "itc") -> torch.Tensor:
        """L2-normalised image embeddings (B, E) in two-tower mode with ``task``'s adapters."""
        self._check_task(task)
        check_pixels(pixels, self.config.clip.vision, self.device)
        return F.normalize(self.image_features(pixels, task), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, task: str = "itc") -> torch.Tensor:
        """L2-normalised text embeddings (B, E) in two-tower mode with ``task``'s adapters."""
        self._check_task(task)
        check_input_ids(input_ids, self.config.clip.text, self.device)
        return F.normalize(self.text_features(input_ids, task), dim=-1)

    def compose(self, ref_pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """TGIR query: reference image + modification text in fusion mode, L2-normalised (B, E).
        Compare with ``encode_image(target_pixels, task="tgir")``."""
        self._check_task("tgir")
        self._check_pair(ref_pixels, input_ids, "ref_pixels")
        v, t = self.fused_features(ref_pixels, input_ids, "tgir")
        return F.normalize(v + t, dim=-1)

    def classify(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Sub-category logits (B, num_classes) from image + text in fusion mode."""
        self._check_task("scr")
        self._check_pair(pixels, input_ids, "pixels")
        v, t = self.fused_features(pixels, input_ids, "scr")
        return self.heads["scr"](v + t)

    @torch.no_grad()
    def caption(
        self,
        pixels: torch.Tensor,
        max_len: int = 76,
        num_beams: int = 1,
        return_ids: bool = False,
        no_repeat_ngram: int = 0,
        cuda_graph: bool = False,
        compiled: bool | str = False,
    ) -> list[str] | torch.Tensor:
        """Captions of images: greedy (num_beams=1) or beam search, with key/value caches; strings, or the
        generated token ids (B, <= max_len + 1: the start token, then at most ``max_len`` generated tokens,
        the end token among them) when ``return_ids``. ``max_len`` is capped by the text context: at most
        ``context_length - 1`` (76) steps.
        ``no_repeat_ngram`` > 0 forbids repeating any n-gram of that length (off, as the reference).
        ``cuda_graph`` replays the whole decode as one CUDA graph (same tokens; see ``generate``).
        ``compiled`` runs each step as one ``torch.compile`` graph (True: Inductor; see ``generate``).
        ``max_len``, ``num_beams`` and ``no_repeat_ngram`` must be ints (TypeError otherwise); a model
        without cross-attention adapters in the text tower (xaa="none") cannot caption (ValueError)."""
        from famevil_fast.model.generation import generate

        self._check_task("cap")
        check_pixels(pixels, self.config.clip.vision, self.device)
        ids = generate(
            self,
            pixels,
            max_len=max_len,
            num_beams=num_beams,
            no_repeat_ngram=no_repeat_ngram,
            cuda_graph=cuda_graph,
            compiled=compiled,
        )
        if return_ids:
            return ids
        from famevil_fast.text import EOT_ID, decode

        # a caption cut at max_len ends without an end token: one is appended (as the reference's decoding
        # does), since the decoder reads a row without one as zero-padded and would drop trailing "!" (id 0)
        return decode(torch.cat([ids, ids.new_full((ids.shape[0], 1), EOT_ID)], dim=1))

    def _check_pair(self, pixels: torch.Tensor, input_ids: torch.Tensor, pixels_name: str) -> None:
        check_pixels(pixels, self.config.clip.vision, self.device, pixels_name)
        check_input_ids(input_ids, self.config.clip.text, self.device)
        check_same_batch(**{pixels_name: pixels, "input_ids": input_ids})

    # ------------------------------------------------------------------ training forward
    def forward(
        self, batch: dict[str, torch.Tensor], task: str, gather: losses.Gather | None = None
    ) -> TaskOutput:
        """Training forward of one task on a batch (keys per task in ``TASK_BATCH_KEYS``): loss + outputs.

        ``gather`` (distributed training) all-gathers features with gradient flow; see ``model.losses``.
        """
        self._check_task(task)
        missing = [k for k in TASK_BATCH_KEYS[task] if k not in batch]
        if missing:
            raise ValueError(f"task {task!r} needs batch keys {TASK_BATCH_KEYS[task]}; missing {missing}")
        if task in PRETRAIN_FORWARDS:
            return PRETRAIN_FORWARDS[task](self, batch, gather)
        return getattr(self, f"_forward_{task}")(batch, gather)

    def _forward_itc(self, batch, gather) -> TaskOutput:
        pixels, ids = batch["pixels"], batch["input_ids"]
        self._check_pair(pixels, ids, "pixels")
        image = F.normalize(self.image_features(pixels, "itc"), dim=-1)
        text = F.normalize(self.text_features(ids, "itc"), dim=-1)
        scale = self.heads["itc"].logit_scale()
        loss = losses.itc_loss(image, text, scale, gather, self.config.backend)
        return TaskOutput(loss, {"image": image, "text": text, "scale": scale})

    def _forward_tgir(self, batch, gather) -> TaskOutput:
        ref, ids, target = batch["ref_pixels"], batch["input_ids"], batch["target_pixels"]
        self._check_pair(ref, ids, "ref_pixels")
        check_pixels(target, self.config.clip.vision, self.device, "target_pixels")
        check_same_batch(ref_pixels=ref, target_pixels=target)
        v, t = self.fused_features(ref, ids, "tgir")
        query = F.normalize(v + t, dim=-1)
        target_emb = F.normalize(self.image_features(target, "tgir"), dim=-1)
        scale = self.heads["tgir"].logit_scale()
        loss = losses.tgir_loss(query, target_emb, scale, gather, self.config.backend)
        return TaskOutput(loss, {"query": query, "target": target_emb, "scale": scale})

    def _forward_scr(self, batch, gather) -> TaskOutput:
        pixels, ids, labels = batch["pixels"], batch["input_ids"], batch["labels"]
        self._check_pair(pixels, ids, "pixels")
        self._check_labels(labels, pixels.shape[0])
        v, t = self.fused_features(pixels, ids, "scr")
        logits = self.heads["scr"](v + t)
        return TaskOutput(losses.scr_loss(logits, labels, gather), {"logits": logits})

    def _forward_cap(self, batch, gather) -> TaskOutput:
        from famevil_fast.model.multitask import _caption_output

        pixels, ids = batch["pixels"], batch["input_ids"]
        self._check_pair(pixels, ids, "pixels")
        return _caption_output(self, self.vision_memory(pixels, "cap"), ids, gather)

    def _check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"labels must be a tensor of integer class ids of shape ({batch},), "
                f"got {type(labels).__name__}"
            )
        if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
            raise ValueError(
                f"labels must be integer class ids of shape ({batch},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        n = self.config.num_classes
        if labels.numel() and host_reads_allowed() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"labels must lie in [0, {n}), got [{int(labels.min())}, {int(labels.max())}]")

    def forward_mixed(
        self, batches: dict[str, dict[str, torch.Tensor]], gather: losses.Gather | None = None
    ) -> dict[str, TaskOutput]:
        """Several tasks' batches through shared backbone passes (see ``model.multitask``)."""
        from famevil_fast.model.multitask import forward_mixed

        return forward_mixed(self, batches, gather)

    # ------------------------------------------------------------------ introspection
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component: CLIP backbone, task adapters (per task; ``xmodal.<task>`` for
        Cross-Modal Adapters, shared up-projections included), cross-attention adapters, heads."""
        counts: dict[str, int] = {"clip": 0, "xaa": 0, "heads": 0}
        kind = "tsa" if self.config.adapter_type == "tsa" else "xmodal"
        for task in self.config.tasks:
            counts[f"{kind}.{task}"] = 0
        for name, p in self.named_parameters():
            counts[_component(name)] += p.numel()
        counts["total"] = sum(counts.values())
        return counts


def _component(name: str) -> str:
    if name.startswith("heads."):
        return "heads"
    if ".xaa." in name:
        return "xaa"
    if ".tsa." in name:
        return "tsa." + name.split(".tsa.adapters.")[1].split(".")[0]
    if ".xma." in name:
        return "xmodal." + name.split(".adapters.")[1].split(".")[0]
    if name.startswith("xmodal_shared."):
        return "xmodal." + name.split(".")[3]
    return "clip"
