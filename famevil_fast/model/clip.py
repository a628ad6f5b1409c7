"""CLIP towers: the vision transformer, the causal text transformer and the two-tower CLIP model.

Pre-LN transformer blocks with QuickGELU (or GELU), fused QKV projections and attention through
``model.attention``. A block can carry task-specific adapters (parallel with its MLP) and a cross-attention
adapter; plain CLIP has neither. Each block exposes its two halves, ``attend`` (the self-attention
sub-layer) and ``feed_forward`` (MLP plus adapter branches), so the FAME-ViL model can run two towers in
lock-step with cross-attention between them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model.adapters import CrossAttentionAdapter, TaskAdapters
from famevil_fast.model.attention import attention
from famevil_fast.model.config import CLIPConfig, TextConfig, VisionConfig
from famevil_fast.model.task_mix import TaskChoice
from famevil_fast.model.validation import check_input_ids, check_pixels
from famevil_fast.ops.activation import quick_gelu
from famevil_fast.ops.cross_attention import merge_heads, split_heads
from famevil_fast.ops.layer_norm import autocast_dtype, keeps_input_dtype, layer_norm_in_dtype
from famevil_fast.text.special_tokens import EOT_ID


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` through ``ops.quick_gelu`` on the model's op backend (``set_runtime``)."""

    def __init__(self) -> None:
        super().__init__()
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x, backend=self.backend)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose parameters may be narrower than its input: a bf16 model's (``train.
    master_weights``) on the float32 residual stream. They are widened to the input's dtype, as CUDA
    autocast widens them (CPU's LayerNorm refuses a float32 input with 16-bit parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight is not None and self.weight.dtype != torch.float32:
            return layer_norm_in_dtype(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class StreamLayerNorm(LayerNorm):
    """A LayerNorm on the residual stream. With ``keeps_dtype`` set (``FameViL.set_runtime(residual_stream=
    "autocast")``), a 16-bit input under autocast is normalised in its own dtype (``ops.layer_norm``:
    float32 statistics, the parameters rounded to that dtype), where autocast would write float32 (and the
    product after it cast it back). Otherwise a ``LayerNorm``."""

    keeps_dtype = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keeps_dtype and keeps_input_dtype(x):
            return layer_norm_in_dtype(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def stream_under_autocast(h: torch.Tensor, keep: bool) -> torch.Tensor:
    """The residual stream ``h`` as it enters the blocks. Where autocast is on for its device: in the
    autocast dtype when ``keep`` (the ``residual_stream="autocast"`` setting), else in float32 (the default
    setting: a bf16 model's embeddings are bf16, a float32 model's already float32). Without autocast,
    ``h`` itself."""
    dtype = autocast_dtype(h)
    if dtype is None:
        return h
    return h.to(dtype) if keep else h.float()


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.impl = "auto"

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, d) -> q, k, v, each (B, H, L, Dh)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)

    def combine(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.out(merge_heads(attention(q, k, v, causal=causal, mask=mask, impl=self.impl)))

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.combine(*self.project(x), causal=causal, mask=mask)


class Block(nn.Module):
    """Pre-LN transformer block; optional task adapters (parallel with the MLP) and cross-attention adapter.

    h' = a + MLP(LN2(a)) + TSA_task(a) + XAA(a, context),  a = h + SelfAttn(LN1(h)).
    With Cross-Modal Adapters (``xma``, attached by the FAME-ViL model) the attention and MLP outputs each go
    through the task's sequential adapter before they are added: a = h + XMA_attn(SelfAttn(LN1(h))),
    h' = a + XMA_mlp(MLP(LN2(a))) + XAA(a, context).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        activation: str,
        eps: float,
        tasks: tuple[str, ...] = (),
        bottleneck: int = 64,
        adapter_dropout: float = 0.0,
        context_width: int | None = None,
        xaa_bottleneck: int = 64,
    ) -> None:
        super().__init__()
        self.ln_1 = StreamLayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = StreamLayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, activation)
        self.tsa = TaskAdapters(width, bottleneck, tasks, adapter_dropout, eps) if tasks else None
        self.xaa = (
            CrossAttentionAdapter(width, context_width, heads, xaa_bottleneck, eps) if context_width else None
        )
        self.xma: nn.Module | None = None

    def attend(
        self,
        h: torch.Tensor,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        task: TaskChoice | None = None,
    ) -> torch.Tensor:
        return h + self.attention_output(self.attn(self.ln_1(h), causal=causal, mask=mask), task)

    def attention_output(self, y: torch.Tensor, task: TaskChoice | None = None) -> torch.Tensor:
        """The self-attention output after the task's sequential adapter (when the block has one)."""
        return y if self.xma is None or task is None else self.xma.attn(y, task)

    def feed_forward(
        self, a: torch.Tensor, task: TaskChoice | None = None, xaa_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        branches = [a, self.mlp(self.ln_2(a))]
        if self.xma is not None and task is not None:
            branches[1] = self.xma.mlp(branches[1], task)
        if xaa_out is not None:
            branches.append(xaa_out)
        if self.tsa is not None and task is not None:
            return self.tsa(a, task, residual=branches)
        out = branches[0] + branches[1]
        return out if xaa_out is None else out + xaa_out

    def cross_attend(
        self,
        a: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The XAA branch output (not yet added to the stream)."""
        if self.xaa is None:
            raise ValueError("this block has no cross-attention adapter")
        return self.xaa(a, context=context, context_mask=context_mask, context_kv=context_kv)

    def forward(
        self,
        h: torch.Tensor,
        task: TaskChoice | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.feed_forward(self.attend(h, causal, mask, task), task)


def _blocks(cfg, activation, eps, tasks, bottleneck, dropout, context_width, xaa_bottleneck) -> nn.ModuleList:
    return nn.ModuleList(
        Block(
            cfg.width,
            cfg.heads,
            cfg.mlp_dim,
            activation,
            eps,
            tasks,
            bottleneck,
            dropout,
            context_width,
            xaa_bottleneck,
        )
        for _ in range(cfg.layers)
    )


class VisionTower(nn.Module):
    """ViT: patch embedding, class token, positions, pre-LN, blocks, post-LN on the class token,
    projection."""

    def __init__(
        self,
        cfg: VisionConfig,
        embed_dim: int,
        activation: str = "quick_gelu",
        eps: float = 1e-5,
        tasks: tuple[str, ...] = (),
        bottleneck: int = 64,
        adapter_dropout: float = 0.0,
        context_width: int | None = None,
        xaa_bottleneck: int = 64,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_tokens, w) * w**-0.5)
        self.ln_pre = StreamLayerNorm(w, eps=eps)
        self.keeps_stream_dtype = False  # residual_stream="autocast" (FameViL.set_runtime)
        self.blocks = _blocks(
            cfg, activation, eps, tasks, bottleneck, adapter_dropout, context_width, xaa_bottleneck
        )
        self.ln_post = LayerNorm(w, eps=eps)
        self.proj = nn.Linear(w, embed_dim, bias=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        h = self.ln_pre(torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype))
        return stream_under_autocast(h, self.keeps_stream_dtype)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln_post(h[:, 0]))

    def forward(self, pixels: torch.Tensor, task: TaskChoice | None = None) -> torch.Tensor:
        h = self.embed(pixels)
        for block in self.blocks:
            h = block(h, task)
        return self.pool(h)


def first_eot_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first end-of-text token of each row (rows are checked to contain one)."""
    return (input_ids == EOT_ID).int().argmax(dim=-1)


class TextTower(nn.Module):
    """Causal text transformer pooled at the first end-of-text token, then projected."""

    def __init__(
        self,
        cfg: TextConfig,
        embed_dim: int,
        activation: str = "quick_gelu",
        eps: float = 1e-5,
        tasks: tuple[str, ...] = (),
        bottleneck: int = 64,
        adapter_dropout: float = 0.0,
        context_width: int | None = None,
        xaa_bottleneck: int = 64,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = _blocks(
            cfg, activation, eps, tasks, bottleneck, adapter_dropout, context_width, xaa_bottleneck
        )
        self.ln_final = LayerNorm(cfg.width, eps=eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.keeps_stream_dtype = False  # residual_stream="autocast" (FameViL.set_runtime)

    def embed(self, input_ids: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """Token plus position embeddings of ``input_ids`` (B, L) placed at positions ``start`` onwards
        (an int, or a 0-d tensor on the device, read there)."""
        length = input_ids.shape[1]
        if isinstance(start, torch.Tensor):
            positions = self.pos_embed[start + torch.arange(length, device=start.device)]
        else:
            positions = self.pos_embed[start : start + length]
        h = self.token_embed(input_ids) + positions
        return stream_under_autocast(h, self.keeps_stream_dtype)

    def pool(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        eot = first_eot_positions(input_ids)
        return self.proj(self.ln_final(h[torch.arange(h.shape[0], device=h.device), eot]))

    def forward(
        self,
        input_ids: torch.Tensor,
        task: TaskChoice | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, task, causal=True, mask=mask)
        return self.pool(h, input_ids)


class CLIP(nn.Module):
    """The two CLIP towers and the (unused by FAME-ViL) logit scale; state-dict names are famevil_fast's."""

    def __init__(self, config: CLIPConfig | None = None) -> None:
        super().__init__()
        self.config = config or CLIPConfig()
        c = self.config
        self.vision = VisionTower(c.vision, c.embed_dim, c.activation, c.layer_norm_eps)
        self.text = TextTower(c.text, c.embed_dim, c.activation, c.layer_norm_eps)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings (B, E) of normalised pixels (B, 3, S, S)."""
        check_pixels(pixels, self.config.vision, self.device)
        out = self.vision(pixels)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings (B, E) of token ids (B, L) from ``famevil_fast.tokenize``."""
        check_input_ids(input_ids, self.config.text, self.device)
        out = self.text(input_ids)
        return F.normalize(out, dim=-1) if normalize else out

    @classmethod
    def from_pretrained(
        cls,
        path_or_state_dict: str | Path | dict,
        config: CLIPConfig | None = None,
        trust_pickle: bool = False,
    ) -> CLIP:
        """CLIP weights in any supported layout (OpenAI .pt, open_clip, Hugging Face, famevil_fast), in eval
        mode (call ``.train()`` to train it). Without ``config``, head counts come from the config stored
        with the weights, a preset of the same sizes, or CLIP's 64-wide heads for the standard widths; any
        other width is refused (see ``weights.resolve_clip_config``). Given a FAME-ViL checkpoint, only its
        backbone is taken: its adapters and heads are discarded with a ``DiscardedWeightsWarning``. Pass
        ``trust_pickle=True`` only for trusted files that hold non-tensor objects."""
        from famevil_fast.model.famevil import warn_discarded_weights
        from famevil_fast.model.weights import clip_weights_name, load_clip_backbone, load_into

        state, config, dropped = load_clip_backbone(path_or_state_dict, config, trust_pickle)
        if dropped:
            warn_discarded_weights(path_or_state_dict, dropped, "CLIP.from_pretrained", "")
        model = cls(config)
        load_into(model, state, clip_weights_name(path_or_state_dict))
        return model.eval()
