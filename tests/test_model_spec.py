"""Conformance with the reference (docs: the FAME-ViL spec, section 1; the official checkpoint layout).

A checkpoint is built here in the OFFICIAL layout straight from the layout tables (HF CLIP names under
``clip.``, ``adapt_mlp.{task}``, ``cross_attn``, ``heads``; separate q/k/v, key/value projections), not
through famevil_fast's exporter, and a plain functional re-implementation of the reference model reads it by
those names. The model loaded by ``FameViL.from_pretrained`` must compute the same thing in each of the three
modes and through each head. The towers have different widths, head counts and bottlenecks, so that a
mapping mixing up the towers, the two LayerNorms of a cross-attention adapter, keys and values, or the
q/k/v order cannot go unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.model import FameViL, FameViLConfig
from famevil_fast.model.config import CLIPConfig, TextConfig, VisionConfig
from famevil_fast.model.export import to_official_famevil

SOT, EOT = 49406, 49407
TASKS = ("itc", "tgir", "scr", "cap")
# Vision and text differ in width, heads and MLP size; the cross-attention adapters' bottleneck is the
# reference's hard-coded 64, the task adapters' r another number.
CLIP_CFG = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=16, width=48, layers=2, heads=3, mlp_dim=96),
    text=TextConfig(vocab_size=49408, context_length=77, width=32, layers=2, heads=4, mlp_dim=64),
    embed_dim=24,
)
R, XAA_R, NUM_LABELS = 6, 64, 7


# ---------------------------------------------------------------- the official layout, from its tables
def _layer_shapes(d: int, ff: int, c: int | None, r: int, tasks, xaa_r: int) -> dict[str, tuple]:
    """the official checkpoint layout: one encoder layer (d: width, c: the other tower's width)."""
    out: dict[str, tuple] = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        out[f"self_attn.{proj}.weight"], out[f"self_attn.{proj}.bias"] = (d, d), (d,)
    out["layer_norm1.weight"] = out["layer_norm1.bias"] = (d,)
    out["mlp.fc1.weight"], out["mlp.fc1.bias"] = (ff, d), (ff,)
    out["mlp.fc2.weight"], out["mlp.fc2.bias"] = (d, ff), (d,)
    out["layer_norm2.weight"] = out["layer_norm2.bias"] = (d,)

    def adapter(prefix: str, bottleneck: int) -> None:
        out[prefix + "scale"] = (1,)
        for kind in ("weight", "bias"):
            out[f"{prefix}adapter_layer_norm_before.{kind}"] = (d,)
        out[prefix + "down_proj.weight"], out[prefix + "down_proj.bias"] = (bottleneck, d), (bottleneck,)
        out[prefix + "up_proj.weight"], out[prefix + "up_proj.bias"] = (d, bottleneck), (d,)

    for task in tasks:
        adapter(f"adapt_mlp.{task}.", r)
    if c is not None:
        out["cross_attn.query.weight"], out["cross_attn.query.bias"] = (d, d), (d,)
        out["cross_attn.key.weight"], out["cross_attn.key.bias"] = (d, c), (d,)
        out["cross_attn.value.weight"], out["cross_attn.value.bias"] = (d, c), (d,)
        adapter("cross_attn.xattn_adapter.", xaa_r)
        out["cross_attn.query_layernorm.weight"] = out["cross_attn.query_layernorm.bias"] = (d,)
        out["cross_attn.context_layernorm.weight"] = out["cross_attn.context_layernorm.bias"] = (c,)
    return out


def official_shapes(
    clip: CLIPConfig, r: int, tasks=TASKS, xaa: str = "both", num_labels: int = 121, xaa_r: int = 64
) -> dict[str, tuple]:
    """Key -> shape of an official student state dict (after the prefix), the official checkpoint layout."""
    v, t, e = clip.vision, clip.text, clip.embed_dim
    n = (v.image_size // v.patch_size) ** 2 + 1
    out: dict[str, tuple] = {"clip.logit_scale": ()}
    out["clip.text_model.embeddings.position_ids"] = (1, t.context_length)
    out["clip.text_model.embeddings.token_embedding.weight"] = (t.vocab_size, t.width)
    out["clip.text_model.embeddings.position_embedding.weight"] = (t.context_length, t.width)
    text_ctx = v.width if xaa in ("both", "text") else None
    vision_ctx = t.width if xaa == "both" else None
    for layer in range(t.layers):
        for k, s in _layer_shapes(t.width, t.mlp_dim, text_ctx, r, tasks, xaa_r).items():
            out[f"clip.text_model.encoder.layers.{layer}.{k}"] = s
    out["clip.text_model.final_layer_norm.weight"] = out["clip.text_model.final_layer_norm.bias"] = (t.width,)
    out["clip.vision_model.embeddings.class_embedding"] = (v.width,)
    out["clip.vision_model.embeddings.position_ids"] = (1, n)
    out["clip.vision_model.embeddings.patch_embedding.weight"] = (v.width, 3, v.patch_size, v.patch_size)
    out["clip.vision_model.embeddings.position_embedding.weight"] = (n, v.width)
    out["clip.vision_model.pre_layrnorm.weight"] = out["clip.vision_model.pre_layrnorm.bias"] = (v.width,)
    for layer in range(v.layers):
        for k, s in _layer_shapes(v.width, v.mlp_dim, vision_ctx, r, tasks, xaa_r).items():
            out[f"clip.vision_model.encoder.layers.{layer}.{k}"] = s
    out["clip.vision_model.post_layernorm.weight"] = out["clip.vision_model.post_layernorm.bias"] = (v.width,)
    out["clip.visual_projection.weight"] = (e, v.width)
    out["clip.text_projection.weight"] = (e, t.width)
    if "itc" in tasks:
        out["heads.itc.norm_s"] = (1,)
    if "tgir" in tasks:
        out["heads.tgir.norm_s"] = (1,)
    if "scr" in tasks:
        out["heads.scr.weight"], out["heads.scr.bias"] = (num_labels, e), (num_labels,)
    if "cap" in tasks:
        out["heads.cap.weight"], out["heads.cap.bias"] = (t.vocab_size, t.width), (t.vocab_size,)
    return out


def random_official_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the official layout, every weight away from any trivial value."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1])[None]
        elif key.endswith("norm_s"):
            state[key] = 4.0 + 0.3 * torch.randn(shape, generator=g)
        elif key.endswith("scale"):  # adapter scales (and CLIP's unused logit_scale)
            state[key] = 1.0 + 0.5 * torch.randn(shape, generator=g)
        elif "norm" in key and key.endswith(".weight"):  # every LayerNorm (incl. HF's pre_layrnorm)
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith(".bias") or len(shape) == 1:
            state[key] = 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            state[key] = torch.randn(shape, generator=g) * (1.5 / math.sqrt(fan_in))
    return state


# ---------------------------------------------------------------- the reference model, by official names
class Reference:
    """FAME-ViL as the reference describes it, reading an official state dict (prefix stripped)."""

    def __init__(self, state: dict[str, torch.Tensor], clip: CLIPConfig) -> None:
        self.s, self.cfg = state, clip

    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.s[name + ".weight"], self.s[name + ".bias"], 1e-5)

    def lin(self, x, name):
        return F.linear(x, self.s[name + ".weight"], self.s.get(name + ".bias"))

    @staticmethod
    def mha(q, k, v, heads, keep=None):
        """Scaled dot-product attention, heads of q/k/v's last dim split in order; keep (B, Lq, Lk) bool."""
        b, lq, d = q.shape
        dh = d // heads
        q, k, v = (x.view(b, x.shape[1], heads, dh).transpose(1, 2) for x in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)

    def adapter(self, x, p):
        """1.3: LayerNorm -> down -> ReLU -> (dropout 0) -> up -> x scale (not residual-added)."""
        h = F.relu(self.lin(self.ln(x, p + "adapter_layer_norm_before"), p + "down_proj"))
        return self.lin(h, p + "up_proj") * self.s[p + "scale"]

    def xaa(self, a, ctx, p, heads, ctx_keep=None):
        """1.4: LN_q(query side) -> Q; LN_c(context) -> K, V; MHA; no out-proj; bottleneck adapter."""
        q = self.lin(self.ln(a, p + "cross_attn.query_layernorm"), p + "cross_attn.query")
        c = self.ln(ctx, p + "cross_attn.context_layernorm")
        k, v = self.lin(c, p + "cross_attn.key"), self.lin(c, p + "cross_attn.value")
        keep = None if ctx_keep is None else ctx_keep[:, None, :].expand(-1, a.shape[1], -1)
        return self.adapter(self.mha(q, k, v, heads, keep), p + "cross_attn.xattn_adapter.")

    def attend(self, h, p, heads, keep=None):
        """1.2 step 1: a = h + SelfAttn(LN1(h)), separate q/k/v projections."""
        x = self.ln(h, p + "layer_norm1")
        q, k, v = (self.lin(x, p + f"self_attn.{n}_proj") for n in ("q", "k", "v"))
        return h + self.lin(self.mha(q, k, v, heads, keep), p + "self_attn.out_proj")

    def feed_forward(self, a, p, task, x=None):
        """1.2 step 2: h' = a + MLP(LN2(a)) + TSA_t(a) + XAA (all reading the same a); QuickGELU MLP."""
        m = self.lin(self.ln(a, p + "layer_norm2"), p + "mlp.fc1")
        out = (
            a
            + self.lin(m * torch.sigmoid(1.702 * m), p + "mlp.fc2")
            + self.adapter(a, p + f"adapt_mlp.{task}.")
        )
        return out if x is None else out + x

    # towers
    def vision_embed(self, pixels):
        e = "clip.vision_model.embeddings."
        x = F.conv2d(pixels, self.s[e + "patch_embedding.weight"], stride=self.cfg.vision.patch_size)
        x = x.flatten(2).transpose(1, 2)
        cls = self.s[e + "class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.s[e + "position_embedding.weight"]
        return self.ln(x, "clip.vision_model.pre_layrnorm")

    def text_embed(self, ids):
        e = "clip.text_model.embeddings."
        return (
            self.s[e + "token_embedding.weight"][ids]
            + self.s[e + "position_embedding.weight"][: ids.shape[1]]
        )

    @staticmethod
    def text_keep(ids):
        """Causal AND key padding (the tokenizer's attention mask: 1 up to and including the first EOT)."""
        length = ids.shape[1]
        first_eot = (ids == EOT).int().argmax(1)
        valid = torch.arange(length)[None] <= first_eot[:, None]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return causal[None] & valid[:, None, :], valid

    def vision_pool(self, h):
        return self.lin(self.ln(h[:, 0], "clip.vision_model.post_layernorm"), "clip.visual_projection")

    def text_pool(self, h, ids):
        eot = ids.argmax(-1)  # HF CLIP: argmax of the ids = the first <|endoftext|> (49407 is the top id)
        h = self.ln(h[torch.arange(h.shape[0]), eot], "clip.text_model.final_layer_norm")
        return self.lin(h, "clip.text_projection")

    def _v(self, layer):
        return f"clip.vision_model.encoder.layers.{layer}."

    def _t(self, layer):
        return f"clip.text_model.encoder.layers.{layer}."

    def image(self, pixels, task, memory=None):
        """Two-tower image embedding (1.5); ``memory`` collects every block's output."""
        h = self.vision_embed(pixels)
        for layer in range(self.cfg.vision.layers):
            p = self._v(layer)
            h = self.feed_forward(self.attend(h, p, self.cfg.vision.heads), p, task)
            if memory is not None:
                memory.append(h)
        return self.vision_pool(h)

    def text(self, ids, task):
        keep, _ = self.text_keep(ids)
        h = self.text_embed(ids)
        for layer in range(self.cfg.text.layers):
            p = self._t(layer)
            h = self.feed_forward(self.attend(h, p, self.cfg.text.heads, keep), p, task)
        return self.text_pool(h, ids)

    def fused(self, pixels, ids, task):
        """Fusion mode: lock-step, each XAA reads the other tower's post-self-attention state of layer l."""
        keep, valid = self.text_keep(ids)
        hv, ht = self.vision_embed(pixels), self.text_embed(ids)
        vh, th = self.cfg.vision.heads, self.cfg.text.heads
        for layer in range(self.cfg.vision.layers):
            pv, pt = self._v(layer), self._t(layer)
            av, at = self.attend(hv, pv, vh), self.attend(ht, pt, th, keep)
            xv = self.xaa(av, at, pv, vh, ctx_keep=valid)  # vision queries, text keys masked after EOT
            xt = self.xaa(at, av, pt, th)  # text queries see all vision tokens
            hv, ht = self.feed_forward(av, pv, task, xv), self.feed_forward(at, pt, task, xt)
        return self.vision_pool(hv), self.text_pool(ht, ids)

    def caption_logits(self, pixels, ids):
        """Generative mode: text layer l's XAA attends to the OUTPUT of vision block l; LM head on the
        final-LN text states."""
        memory: list[torch.Tensor] = []
        self.image(pixels, "cap", memory)
        keep, _ = self.text_keep(ids)
        h = self.text_embed(ids)
        for layer in range(self.cfg.text.layers):
            p = self._t(layer)
            a = self.attend(h, p, self.cfg.text.heads, keep)
            h = self.feed_forward(a, p, "cap", self.xaa(a, memory[layer], p, self.cfg.text.heads))
        return self.lin(self.ln(h, "clip.text_model.final_layer_norm"), "heads.cap")


def eot_padded_ids(batch: int, length: int = 77, seed: int = 0) -> torch.Tensor:
    """Ids as the official (Hugging Face) CLIP tokenizer gives them: SOT, content, EOT, EOT padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), EOT, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[i, 0] = SOT
        ids[i, 1 : n + 1] = torch.randint(1, SOT, (n,), generator=g)
    return ids


def zero_padded(ids: torch.Tensor) -> torch.Tensor:
    """The same texts padded with 0 after the first EOT, as famevil_fast's (open_clip's) tokenizer pads."""
    eot = (ids == EOT).int().argmax(1)
    after = torch.arange(ids.shape[1])[None] > eot[:, None]
    return ids.masked_fill(after, 0)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(loaded model, reference, path) from a bare DDP-prefixed student file with teachers and balances."""
    shapes = official_shapes(CLIP_CFG, R, num_labels=NUM_LABELS, xaa_r=XAA_R)
    state = random_official_state(shapes)
    file = {f"module.model.{k}": v for k, v in state.items()}
    file["module.model.balances.itc"] = torch.ones(1)
    file["module.model.teachers.scr.clip.logit_scale"] = torch.tensor(2.0)
    file["module.model.teachers.scr.heads.scr.bias"] = torch.zeros(NUM_LABELS)
    path = tmp_path_factory.mktemp("official") / "fashionclip_final.pth"
    torch.save(file, path)
    model = FameViL.from_pretrained(path, clip=CLIP_CFG, attention="eager")
    return model, Reference(state, CLIP_CFG), path


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), eot_padded_ids(b, seed=seed)


def test_inferred_config_of_an_official_file(official):
    model, _, _ = official
    c = model.config
    assert c.tasks == TASKS and c.xaa == "both"
    assert c.adapter_bottleneck == R  # from adapt_mlp.{t}.down_proj, never from the XAA's adapter
    assert c.xaa_bottleneck == XAA_R and c.num_classes == NUM_LABELS


def test_official_file_keys_and_shapes_are_those_of_the_exporter(official):
    model, _, _ = official
    exported = to_official_famevil(model.state_dict(), prefix="")
    want = official_shapes(CLIP_CFG, R, num_labels=NUM_LABELS, xaa_r=XAA_R)
    assert {k: tuple(v.shape) for k, v in exported.items()} == want
    assert exported["clip.text_model.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("task", TASKS)
def test_two_tower_mode_matches_the_reference(official, task):
    model, ref, _ = official
    pixels, ids = _batch()
    with torch.no_grad():
        assert torch.allclose(
            model.encode_image(pixels, task), F.normalize(ref.image(pixels, task), dim=-1), atol=1e-5
        )
        # the official tokenizer pads with EOT, ours with 0: both give the reference's embedding
        want = F.normalize(ref.text(ids, task), dim=-1)
        assert torch.allclose(model.encode_text(ids, task), want, atol=1e-5)
        assert torch.allclose(model.encode_text(zero_padded(ids), task), want, atol=1e-5)


@pytest.mark.parametrize("task", ["tgir", "scr"])
def test_fusion_mode_matches_the_reference(official, task):
    model, ref, _ = official
    pixels, ids = _batch()
    with torch.no_grad():
        v, t = ref.fused(pixels, ids, task)
        got_v, got_t = model.fused_features(pixels, zero_padded(ids), task)
        assert torch.allclose(got_v, v, atol=1e-5) and torch.allclose(got_t, t, atol=1e-5)
        if task == "tgir":
            assert torch.allclose(model.compose(pixels, ids), F.normalize(v + t, dim=-1), atol=1e-5)
        else:  # scr: Linear(E, num_labels) on v + t, no normalisation
            want = F.linear(v + t, ref.s["heads.scr.weight"], ref.s["heads.scr.bias"])
            assert torch.allclose(model.classify(pixels, ids), want, atol=1e-5)


def test_generative_mode_matches_the_reference(official):
    model, ref, _ = official
    pixels, ids = _batch(2)
    with torch.no_grad():
        want = ref.caption_logits(pixels, ids)
        got = model.caption_logits(model.caption_states(model.vision_memory(pixels, "cap"), ids))
    valid = torch.arange(ids.shape[1])[None] <= (ids == EOT).int().argmax(1)[:, None]
    assert torch.allclose(got[valid], want[valid], atol=1e-4)


def test_norm_heads_scale_both_sides_and_give_squared_logits(official):
    """1.6: L2-normalise then x s (one s per task for both sides); contrastive logits = s^2 cos."""
    model, ref, _ = official
    x = torch.randn(3, CLIP_CFG.embed_dim)
    for task in ("itc", "tgir"):
        s = ref.s[f"heads.{task}.norm_s"]
        head = model.heads[task]
        assert torch.allclose(head(x), F.normalize(x, dim=-1) * s)
        assert torch.allclose(head.logit_scale(), s.square().reshape(()))
    pixels, ids = _batch(4)
    with torch.no_grad():
        out = model({"pixels": pixels, "input_ids": ids}, "itc")
        image = F.normalize(ref.image(pixels, "itc"), dim=-1) * ref.s["heads.itc.norm_s"]
        text = F.normalize(ref.text(ids, "itc"), dim=-1) * ref.s["heads.itc.norm_s"]
        logits, labels = image @ text.T, torch.arange(4)
        want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert torch.allclose(out.loss, want, atol=1e-5)


@pytest.mark.parametrize("faithful", [False, True])
def test_caption_loss_matches_the_reference(official, faithful):
    """2.4: CE of token i+1 from the prefix <= i. Default: the positions up to the first EOT. Faithful
    (``caption_loss_on_padding``): all 76 positions of EOT-padded text, pads trained to predict EOT (9.2),
    whatever id the batch pads with."""
    _, ref, path = official
    model = FameViL.from_pretrained(path, clip=CLIP_CFG, attention="eager", caption_loss_on_padding=faithful)
    pixels, ids = _batch(2)
    with torch.no_grad():
        logits = ref.caption_logits(pixels, ids)[:, :-1]
        targets = ids[:, 1:]
        if faithful:
            want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        else:
            valid = torch.arange(1, ids.shape[1])[None] <= (ids == EOT).int().argmax(1)[:, None]
            want = F.cross_entropy(logits[valid], targets[valid])
        for batch_ids in (ids, zero_padded(ids)):
            got = model({"pixels": pixels, "input_ids": batch_ids}, "cap").loss
            assert torch.allclose(got, want, atol=1e-5), batch_ids[0, -1]


def test_training_container_with_model_prefix_loads_the_same_weights(official, tmp_path):
    model, ref, _ = official
    container = {
        "model": {f"model.{k}": v for k, v in ref.s.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "num_updates": 7,
        "best_metric_value": 0.5,
    }
    torch.save(container, tmp_path / "best.ckpt")
    loaded = FameViL.from_pretrained(tmp_path / "best.ckpt", clip=CLIP_CFG, attention="eager")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task, xaa", [("itc", "none"), ("tgir", "both"), ("scr", "both"), ("cap", "text")])
def test_single_task_teacher_file_matches_the_reference(tmp_path, task, xaa):
    """In the official checkpoint layout a teacher (single task) has adapt_mlp WITHOUT a task segment; itc
    without XAA, tgir/scr with both towers' XAA, cap with text-only XAA."""
    shapes = official_shapes(CLIP_CFG, R, tasks=(task,), xaa=xaa, num_labels=NUM_LABELS, xaa_r=XAA_R)
    state = random_official_state(shapes, seed=1)
    file = {"model." + k.replace(f".adapt_mlp.{task}.", ".adapt_mlp."): v for k, v in state.items()}
    torch.save(file, tmp_path / "teacher.pth")
    model = FameViL.from_pretrained(tmp_path / "teacher.pth", clip=CLIP_CFG, attention="eager")
    assert model.config.tasks == (task,) and model.config.xaa == xaa
    ref = Reference(state, CLIP_CFG)
    pixels, ids = _batch(2)
    with torch.no_grad():
        assert torch.allclose(model.image_features(pixels, task), ref.image(pixels, task), atol=1e-5)
        if task == "cap":
            got = model.caption_logits(model.caption_states(model.vision_memory(pixels), ids))
            valid = torch.arange(77)[None] <= (ids == EOT).int().argmax(1)[:, None]
            assert torch.allclose(got[valid], ref.caption_logits(pixels, ids)[valid], atol=1e-4)
        elif xaa == "both":
            v, t = model.fused_features(pixels, ids, task)
            rv, rt = ref.fused(pixels, ids, task)
            assert torch.allclose(v, rv, atol=1e-5) and torch.allclose(t, rt, atol=1e-5)
        else:
            assert torch.allclose(model.text_features(ids, task), ref.text(ids, task), atol=1e-5)


# ---------------------------------------------------------------- initialisation (1.3, 1.4, 1.6)
def test_fresh_adapters_follow_the_reference_initialisation():
    model = FameViL(FameViLConfig(clip=CLIP_CFG, adapter_bottleneck=R))
    block = model.text.blocks[0]
    for a in [*block.tsa.adapters.values(), block.xaa.adapter]:
        assert torch.equal(a.scale, torch.ones(1))  # learnable scalar, init 1 (not AdaptFormer's 0.1)
        assert not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
        assert a.down.weight.abs().max() <= 1 / math.sqrt(a.down.in_features)  # kaiming-uniform(a=sqrt 5)
        assert a.down.weight.std() > 0.3 / math.sqrt(a.down.in_features)
        assert torch.equal(a.ln.weight, torch.ones_like(a.ln.weight)) and not a.ln.bias.any()
    xaa = block.xaa
    assert not xaa.q.bias.any() and not xaa.kv.bias.any()  # biases zeroed by HF's post-init
    key, value = xaa.kv.weight.chunk(2)
    for w in (xaa.q.weight, key, value):  # default Linear init over each projection's own fan-in
        assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) and w.std() > 0.3 / math.sqrt(w.shape[1])
    assert not torch.equal(key, value)
    for task in ("itc", "tgir"):
        assert torch.equal(model.heads[task].norm_s, torch.full((1,), 4.0))
    assert model.heads["cap"].weight.shape == (49408, CLIP_CFG.text.width)
    assert model.heads["cap"].weight.data_ptr() != model.text.token_embed.weight.data_ptr()  # not tied
    assert model.heads["scr"].weight.shape == (121, CLIP_CFG.embed_dim)


# ---------------------------------------------------------------- parameter budget (1.7, layout 6-7)
def _counts(**changes):
    with torch.device("meta"):
        return FameViL(FameViLConfig(**changes)).parameter_counts()


def test_budget_components_of_the_release():
    counts = _counts(adapter_bottleneck=512)
    assert counts["clip"] == 149_620_737 and counts["xaa"] == 31_219_224
    assert sum(counts[f"tsa.{t}"] for t in TASKS) == 63_148_128
    assert counts["heads"] == 25_408_379  # cap 25,346,304 + scr 62,073 + two scalars
    assert counts["total"] - counts["clip"] == 119_775_731  # "newly added = 119.8M at r=512"
    with torch.device("meta"):
        state = to_official_famevil(FameViL(FameViLConfig(adapter_bottleneck=512)).state_dict(), prefix="")
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(CLIPConfig(), 512)
    payload = sum(v.numel() * v.element_size() for v in state.values())
    assert payload == 1_077_588_064  # The official checkpoint layout: 1,484 float32 tensors + 2 int64 buffers


@pytest.mark.parametrize("r", [64, 128, 512])
def test_budget_is_linear_in_r(r):
    assert _counts(adapter_bottleneck=r)["total"] == 206_432_756 + 122_976 * r


def test_sixty_one_and_a_half_percent_fewer_parameters():
    """1.7: four fully fine-tuned single-task models (XMR = CLIP, TGIR = CLIP + XAA, SCR = CLIP + XAA +
    classifier, FIC = CLIP + text-only XAA + LM head) against one FAME-ViL with r = 512."""
    single = {"itc": "none", "tgir": "both", "scr": "both", "cap": "text"}
    sizes = {}
    for task, xaa in single.items():
        c = _counts(tasks=(task,), xaa=xaa)
        sizes[task] = c["total"] - c[f"tsa.{task}"]  # no task adapters in a fully fine-tuned model
    assert [round(sizes[t] / 1e6, 2) for t in single] == [149.62, 180.84, 180.90, 188.40]
    baseline = sum(sizes.values())
    assert round(baseline / 1e6, 2) == 699.77
    assert round(100 * (1 - _counts(adapter_bottleneck=512)["total"] / baseline), 2) == 61.50


@pytest.mark.parametrize(
    "task, xaa, keys, params",
    [("itc", "none", 569, 151_634_458), ("tgir", "both", 977, 182_853_682),
     ("scr", "both", 978, 182_915_754), ("cap", "text", 774, 190_418_469)],
)  # fmt: skip
def test_teacher_sizes(task, xaa, keys, params):
    """The official checkpoint layout: each teacher is a single-task model with r = 64."""
    with torch.device("meta"):
        model = FameViL(FameViLConfig(tasks=(task,), xaa=xaa, adapter_bottleneck=64))
        assert len(to_official_famevil(model.state_dict(), prefix="")) == keys
    assert model.parameter_counts()["total"] == params


def test_a_single_task_model_is_written_as_the_teachers_are_and_reads_back(tmp_path):
    """One task's adapters go without the task in their names (``adapt_mlp.down_proj``: an empty
    ``adapter_name_list``), every floating tensor in float32; the file loads back to the same weights,
    also without its config beside it."""
    from famevil_fast.model.config import clip_preset
    from famevil_fast.model.export import save_official

    torch.manual_seed(0)
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), tasks=("scr",), adapter_bottleneck=8))
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    state = to_official_famevil(model.to(torch.bfloat16).state_dict(), prefix="")
    adapters = [k for k in state if ".adapt_mlp." in k]
    assert adapters and all(".adapt_mlp.scr." not in k for k in adapters), adapters[:3]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert any(".adapt_mlp.scr." in k for k in to_official_famevil(model.state_dict(), task_segment=True))
    (path,) = [p for p in save_official(model, tmp_path / "teacher.pth") if p.suffix == ".pth"]
    back = FameViL.from_pretrained(path)
    assert back.config.tasks == ("scr",)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value.float(), rtol=0, atol=0, msg=key)
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    assert FameViL.from_pretrained(bare, clip=clip_preset("micro")).config.tasks == ("scr",)
