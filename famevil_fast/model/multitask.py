"""Mixed-task forward: the micro-batches of several tasks share backbone passes.

Within one optimizer update, samples of different tasks that run the same tower in the same mode are
concatenated into one pass whose task adapters are chosen per sample (one call per task's rows, or one
fused adapter call per layer with the Triton adapters):
- one vision pass for the retrieval images (itc), the TGIR targets (tgir) and the captioning images (cap,
  whose per-layer outputs are kept as memory);
- one fusion pass for the TGIR queries (tgir) and the classification samples (scr);
- the retrieval texts and the caption texts keep their own text passes.
Losses are those of ``FameViL.forward`` for each task; their sum has the gradient of accumulating the
tasks' micro-batches one after another. Pre-training objectives (mvc, pac, itm) run their own passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from famevil_fast.capture import static_shapes_enabled
from famevil_fast.model import losses
from famevil_fast.model.config import PRETRAIN_TASKS
from famevil_fast.model.famevil import EOT_ID, TASK_BATCH_KEYS, FameViL, TaskOutput, text_valid_mask
from famevil_fast.model.task_mix import TaskMix, task_mix
from famevil_fast.model.validation import check_pixels, check_same_batch


def _task_layout(model, tasks: list[str], sizes: list[int], device) -> TaskMix:
    return task_mix([model.config.tasks.index(t) for t in tasks], sizes, device)


def _split(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes))


def _vision_pass(model, parts: list[tuple[str, torch.Tensor]], keep_memory_of: str | None):
    """One vision pass over several tasks' images; pooled features per part, and the memory of one part."""
    pixels = torch.cat([p for _, p in parts])
    sizes = [p.shape[0] for _, p in parts]
    task = _task_layout(model, [t for t, _ in parts], sizes, pixels.device)
    h = model.vision.embed(pixels)
    memory = []
    start = sum(sizes[: [t for t, _ in parts].index(keep_memory_of)]) if keep_memory_of else 0
    stop = start + (sizes[[t for t, _ in parts].index(keep_memory_of)] if keep_memory_of else 0)
    for block in model.vision.blocks:
        h = block(h, task)
        if keep_memory_of:
            memory.append(h[start:stop])
    pooled = _split(model.vision.pool(h), sizes)
    return dict(zip([t for t, _ in parts], pooled)), memory


def forward_mixed(
    model: FameViL, batches: dict[str, dict[str, torch.Tensor]], gather: losses.Gather | None = None
) -> dict[str, TaskOutput]:
    """Training forward of several tasks' batches at once; returns each task's ``TaskOutput``."""
    order = list(batches)
    own = {t: model(b, t, gather) for t, b in batches.items() if t in PRETRAIN_TASKS}
    batches = {t: b for t, b in batches.items() if t not in PRETRAIN_TASKS}
    for task, batch in batches.items():
        model._check_task(task)
        missing = [k for k in TASK_BATCH_KEYS[task] if k not in batch]
        if missing:
            raise ValueError(f"task {task!r} needs batch keys {TASK_BATCH_KEYS[task]}; missing {missing}")
        for key in TASK_BATCH_KEYS[task]:
            if "pixels" in key:
                check_pixels(batch[key], model.config.clip.vision, model.device, f"{task}.{key}")
        model._check_pair(
            batch[TASK_BATCH_KEYS[task][0]], batch["input_ids"], f"{task}.{TASK_BATCH_KEYS[task][0]}"
        )
    if "tgir" in batches:
        check_same_batch(
            ref_pixels=batches["tgir"]["ref_pixels"], target_pixels=batches["tgir"]["target_pixels"]
        )
    if "scr" in batches:
        model._check_labels(batches["scr"]["labels"], batches["scr"]["pixels"].shape[0])

    vision_parts = [
        (t, batches[t][k])
        for t, k in (("itc", "pixels"), ("tgir", "target_pixels"), ("cap", "pixels"))
        if t in batches
    ]
    pooled, memory = (
        _vision_pass(model, vision_parts, "cap" if "cap" in batches else None) if vision_parts else ({}, [])
    )
    fused = _fusion_pass(model, {t: batches[t] for t in ("tgir", "scr") if t in batches})
    outputs: dict[str, TaskOutput] = {}
    backend = model.config.backend
    if "itc" in batches:
        image = F.normalize(pooled["itc"], dim=-1)
        text = F.normalize(model.text_features(batches["itc"]["input_ids"], "itc"), dim=-1)
        scale = model.heads["itc"].logit_scale()
        outputs["itc"] = TaskOutput(
            losses.itc_loss(image, text, scale, gather, backend),
            {"image": image, "text": text, "scale": scale},
        )
    if "tgir" in batches:
        query = F.normalize(fused["tgir"][0] + fused["tgir"][1], dim=-1)
        target = F.normalize(pooled["tgir"], dim=-1)
        scale = model.heads["tgir"].logit_scale()
        outputs["tgir"] = TaskOutput(
            losses.tgir_loss(query, target, scale, gather, backend),
            {"query": query, "target": target, "scale": scale},
        )
    if "scr" in batches:
        logits = model.heads["scr"](fused["scr"][0] + fused["scr"][1])
        outputs["scr"] = TaskOutput(
            losses.scr_loss(logits, batches["scr"]["labels"], gather), {"logits": logits}
        )
    if "cap" in batches:
        outputs["cap"] = _caption_output(model, memory, batches["cap"]["input_ids"], gather)
    outputs.update(own)
    return {t: outputs[t] for t in order}


def _fusion_pass(
    model, batches: dict[str, dict[str, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not batches:
        return {}
    tasks = list(batches)
    pix_key = {"tgir": "ref_pixels", "scr": "pixels"}
    pixels = torch.cat([batches[t][pix_key[t]] for t in tasks])
    texts = [batches[t]["input_ids"] for t in tasks]
    length = max(x.shape[1] for x in texts)  # padding after the end token changes no output
    ids = torch.cat([F.pad(x, (0, length - x.shape[1])) for x in texts])
    sizes = [batches[t]["input_ids"].shape[0] for t in tasks]
    task = _task_layout(model, tasks, sizes, pixels.device)
    v, t = model.fused_features(pixels, ids, task if len(tasks) > 1 else tasks[0])
    return {name: (vv, tt) for name, vv, tt in zip(tasks, _split(v, sizes), _split(t, sizes))}


def _caption_output(model, memory, ids, gather) -> TaskOutput:
    ids = model.trim(ids)
    valid_ids = text_valid_mask(ids)
    if model.config.caption_loss_on_padding:
        # The official text is padded with the end token (pad == EOS): the padded positions are trained
        # here, so they read end tokens as their inputs and targets whatever id the batch pads with.
        ids = torch.where(valid_ids, ids, torch.full_like(ids, EOT_ID))
    states = model.caption_states(memory, ids, "cap")[:, :-1]
    targets = ids[:, 1:]
    valid = valid_ids[:, 1:]
    if not model.config.caption_loss_on_padding and not static_shapes_enabled():
        states, targets = states[valid], targets[valid]
    states, targets = states.reshape(-1, states.shape[-1]), model.caption_targets(targets.reshape(-1))
    trained = torch.ones_like(targets, dtype=torch.bool)  # the positions the losses average over
    if static_shapes_enabled() and not model.config.caption_loss_on_padding:
        trained = valid.reshape(-1)
        targets = torch.where(trained, targets, torch.full_like(targets, -100))  # padding ignored
    logits = model.caption_logits(states)
    outputs = {"logits": logits, "targets": targets, "trained": trained}
    return TaskOutput(losses.caption_loss(logits, targets, gather), outputs)
