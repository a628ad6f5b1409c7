"""Shared builders for tests: tiny random reference models in other libraries' formats."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def perturb_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (LayerNorms included) so that no weight sits at a trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def captioning_model(end_token_bias: float) -> torch.nn.Module:
    """The micro model with text cross-attention adapters, perturbed, in float64 (decoders then agree
    exactly), its end token's logit raised by ``end_token_bias`` (how early captions end)."""
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.generation import EOT_ID

    torch.manual_seed(0)
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")
    model = perturb_(FameViL(config), std=0.05)
    with torch.no_grad():
        model.heads["cap"].bias[EOT_ID] += end_token_bias
    return model.double().eval()


def hf_clip(
    width=64,
    layers=2,
    heads=2,
    mlp=128,
    image_size=32,
    patch=16,
    embed=48,
    text_width=None,
    text_heads=None,
    act="quick_gelu",
    text_mlp=None,
):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    text_width = text_width or width
    config = HFConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=text_width,
            intermediate_size=text_mlp or mlp,
            num_hidden_layers=layers,
            num_attention_heads=text_heads or heads,
            max_position_embeddings=77,
            hidden_act=act,
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch,
            hidden_act=act,
        ),
        projection_dim=embed,
    )
    return perturb_(CLIPModel(config).eval())


def open_clip_model(width=64, layers=2, head_width=32, image_size=32, patch=16, embed=48, mlp_ratio=2.0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=layers,
        width=width,
        head_width=head_width,
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        image_size=image_size,
    )
    text = CLIPTextCfg(
        context_length=77,
        vocab_size=49408,
        width=width,
        heads=width // head_width,
        layers=layers,
        mlp_ratio=mlp_ratio,
    )
    return perturb_(CLIP(embed_dim=embed, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval())


def token_batch(batch: int = 3, length: int = 77, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like the tokenizer's: start, random content, end, zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[i, 0] = 49406
        ids[i, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=g)
        ids[i, n + 1] = 49407
    return ids


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_no_worse_than_baseline(
    name: str,
    mine: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    factor: float = 1.5,
    floor: float | None = None,
) -> None:
    """Low-precision check: ``mine`` is within ``factor`` times the error of ``baseline`` (the PyTorch
    path in the same dtype), both measured against a float64 ``reference`` in the relative Frobenius norm.

    A fixed tolerance does not fit bf16 gradients behind a ReLU: an activation that rounds to the other
    side of zero switches a whole bottleneck unit, and PyTorch's own bf16 path shows such errors too.
    ``floor`` replaces the absolute allowance added to the bound (see below).
    """
    mine, baseline, ref = mine.detach(), baseline.detach(), reference.detach().double()
    norm = ref.norm().clamp_min(1e-12)
    err = float((mine.double() - ref).norm() / norm)
    base = float((baseline.double() - ref).norm() / norm)
    # a single value (the scale's gradient) rounds to one of two neighbours: allow one unit in the last place
    if floor is None:
        floor = torch.finfo(mine.dtype).eps if mine.numel() == 1 and mine.is_floating_point() else 2e-3
    assert err == err and err <= factor * base + floor, f"{name}: error {err:.2e}, PyTorch's {base:.2e}"


class RecordLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the kernel's name and runs nothing."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(self.name)

    @staticmethod
    def patch(monkeypatch: pytest.MonkeyPatch, module) -> list[str]:
        """Replace every ``*_kernel`` of ``module``; returns the list the launches are recorded in."""
        log: list[str] = []
        for name in dir(module):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, RecordLaunch(log, name))
        return log


class AtenLog(TorchDispatchMode):
    """Records the name of every aten op dispatched inside it (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _tiny_with_vocab():
    from famevil_fast.model import FameViLConfig, clip_preset

    return FameViLConfig(
        clip=clip_preset("tiny"),  # width 128 with 4 heads: the 64-wide-head guess would give 2
        adapter_bottleneck=8,
        xaa_bottleneck=8,
        caption_vocab=(*range(50), 49407),
    )


# A model whose settings no tensor shape carries (head count, caption vocabulary): for conversions
TINY_WITH_VOCAB = _tiny_with_vocab()


def stub_config(tasks: tuple[str, ...] = ()) -> SimpleNamespace:
    """What the evaluator reads of a model's config: its tasks and CLIP's text context (77 tokens)."""
    return SimpleNamespace(tasks=tasks, clip=SimpleNamespace(text=SimpleNamespace(context_length=77)))


class EmbeddingStub:
    """A model for the evaluator whose images and texts are given as their embeddings: the encoders only
    normalise them."""

    device = torch.device("cpu")
    config = stub_config()

    def encode_image(self, pixels: torch.Tensor, task: str) -> torch.Tensor:
        return torch.nn.functional.normalize(pixels.double(), dim=1)

    def encode_text(self, input_ids: torch.Tensor, task: str) -> torch.Tensor:
        return torch.nn.functional.normalize(input_ids.double(), dim=1)


def save_micro_checkpoint(directory: str | Path, std: float | None = None, seed: int = 0) -> Path:
    """A random micro FAME-ViL model (r = 8) saved with ``save_pretrained`` under ``directory/model``; with
    ``std``, every weight perturbed first (``perturb_``, so that zero-initialised adapters do work)."""
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset

    path = Path(directory) / "model"
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
    (model if std is None else perturb_(model, std=std, seed=seed)).save_pretrained(path)
    return path


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_torchrun(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give process ``rank`` of ``world`` on this host; a process left waiting
    on a collective fails after 120 s rather than hanging the test run."""
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        FAMEVIL_FAST_DIST_TIMEOUT="120",
    )


def leave_process_group() -> None:
    """End a spawned test process once its results are written: wait for the other processes, then exit
    at once. Interpreter shutdown with gloo's threads still alive can abort a process ("terminate called
    without an active exception") after its work has passed; the parent only needs the exit code."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
