"""Training configuration: nested dataclasses loaded from YAML, every field documented in place.

``load_config(path, overrides)`` reads a YAML file (sections model, data, train, optim, schedule, distill,
eval, checkpoint, logging), applies ``section.field=value`` overrides from the command line and checks every
key: an unknown key or a value of the wrong type is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from famevil_fast.devices import DEVICE_PATTERN
from famevil_fast.model.config import ADAPTER_BACKENDS, ALL_TASKS, BACKENDS, PRETRAIN_TASKS
from famevil_fast.text.special_tokens import CAPTION_TOKENS


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelSection:
    clip: str = doc("CLIP size preset: ViT-B-16, ViT-B-32, ViT-L-14, tiny, micro", "ViT-B-16")
    init: str | None = doc(
        "CLIP weights to start from (OpenAI .pt, open_clip, Hugging Face dir; a config stored with them must "
        "be model.clip's); null = random",
        None,
    )
    resume_weights: str | None = doc(
        "FAME-ViL checkpoint to start from instead (famevil_fast or official)", None
    )
    tasks: list[str] = doc(
        "tasks to train, each with its adapters and head (itc, tgir, scr, cap; pre-training: mvc, pac, itm)",
        factory=lambda: ["itc", "tgir", "scr", "cap"],
    )
    init_from: str | None = doc(
        "FAME-ViL checkpoint (e.g. a pre-training run's final/) to take the "
        "backbone, cross-attention adapters and shared tasks' adapters, heads from",
        None,
    )
    adapter_bottleneck: int = doc(
        "task-adapter bottleneck r (64 in the recipes, 512 in the released model)", 64
    )
    adapter_dropout: float = doc("dropout inside the task adapters", 0.0)
    xaa: str = doc("cross-attention adapters: both, text or none", "both")
    xaa_bottleneck: int = doc("cross-attention adapters' output bottleneck r (64 in FAME-ViL)", 64)
    num_classes: int = doc("sub-category classes of the SCR head", 121)
    caption_loss_on_padding: bool = doc(
        "faithful quirk: train padded caption positions to predict the end token", False
    )
    caption_vocab: str | None = doc(
        "'corpus': the caption head scores only tokens of the training captions "
        "(much cheaper LM head); null: the whole vocabulary",
        None,
    )
    attention: str = doc("attention kernel: auto, sdpa, eager (faithful reference) or flash", "auto")
    backend: str | None = doc(
        "op backend of the model's adapters and losses: null (automatic), torch, triton, or cuda / cpu (the "
        "compiled contrastive losses; adapters automatic)",
        None,
    )
    activation_backend: str | None = doc(
        "op backend of the towers' QuickGELU: null (that of model.backend), torch, or triton (the fused "
        "kernels, one pass each way)",
        None,
    )
    residual_stream: str = doc(
        "dtype of the towers' residual stream under bf16 autocast: float32 (as autocast leaves it) or "
        "autocast (bf16: no casts between the stream and the products, LayerNorm statistics in float32)",
        "float32",
    )
    adapter_type: str = doc(
        "task adapters: tsa (FAME-ViL, parallel with the MLP) or xmodal (Cross-Modal "
        "Adapter: sequential after attention and MLP, channels shared by the towers)",
        "tsa",
    )
    xmodal_bottleneck: int = doc("Cross-Modal Adapter bottleneck r", 8)
    xmodal_shared: int = doc("Cross-Modal Adapter up-projection channels shared by the two towers (d_s)", 16)
    num_attributes: int | None = doc("PAC attribute classes; null = the attribute vocabulary's size", None)
    trust_pickle: bool = doc(
        "read model.init, init_from, resume_weights and the distillation teachers even where they are torch "
        "pickles holding non-tensor objects (a training container): only for files you trust",
        False,
    )

    def model_fields(self, caption_vocab: tuple[int, ...] | None, num_attributes: int) -> dict[str, Any]:
        """The ``FameViLConfig`` fields this section sets (all but ``clip``), with the caption vocabulary and
        the PAC classes that the training data decide."""
        return dict(
            caption_vocab=caption_vocab,
            tasks=tuple(self.tasks),
            adapter_bottleneck=self.adapter_bottleneck,
            adapter_dropout=self.adapter_dropout,
            xaa=self.xaa,
            xaa_bottleneck=self.xaa_bottleneck,
            num_classes=self.num_classes,
            caption_loss_on_padding=self.caption_loss_on_padding,
            attention=self.attention,
            backend=self.backend,
            activation_backend=self.activation_backend,
            residual_stream=self.residual_stream,
            num_attributes=num_attributes,
            adapter_type=self.adapter_type,
            xmodal_bottleneck=self.xmodal_bottleneck,
            xmodal_shared=self.xmodal_shared,
        )

    def check(self) -> None:
        """What the model would refuse when built, checked without the data: the CLIP preset and every
        field of the model's configuration (the corpus vocabulary and the PAC classes stand in)."""
        from famevil_fast.model.config import FameViLConfig, clip_preset

        try:
            FameViLConfig(clip=clip_preset(self.clip), **self.model_fields(None, self.num_attributes or 1))
        except ValueError as error:
            raise ValueError(f"model section: {error}") from None


@dataclass
class DataSection:
    root: str = doc(
        "dataset root holding FashionGen/ and FashionIQ/ (e.g. the synthetic dataset)", "data/synthetic"
    )
    image_size: int = doc("input resolution; must match the CLIP preset", 224)
    batch_size: int | None = doc(
        "micro-batch size per task and PROCESS (null = 64); under torchrun the global micro-batch is this x "
        "the number of processes. Set this or global_batch_size, not both",
        None,
    )
    global_batch_size: int | None = doc(
        "micro-batch size per task over ALL processes, as the reference counts it (64): each of N processes "
        "takes global_batch_size / N (N must divide it). Set this or batch_size, not both",
        None,
    )
    eval_batch_size: int = doc("batch size of evaluation passes", 128)
    num_workers: int = doc("decoding threads", 4)
    backend: str | None = doc(
        "image decoding backend: null (automatic), dali (GPU or CPU pipeline, following the device), "
        "torchvision, pil, cache (needs data.cache)",
        None,
    )
    cache: str | None = doc(
        "pre-decoded cache directory written by `famevil-fast cache` (used when set)", None
    )
    attributes: str | None = doc(
        "PAC attribute file from `famevil-fast mine-attributes`; null = mine the training texts at start-up; "
        "dataset = the products' own attributes_id (FashionViL's pseudo-attributes)",
        None,
    )
    attribute_min_count: int = doc("mining at start-up: keep words found in at least this many products", 5)
    dataset: str | None = doc(
        "product dataset of itc and the pre-training objectives (mvc, pac, itm): fashiongen, fashion200k, "
        "polyvoreoutfits, bigfacad, or fashionall (FashionViL's pre-training union of the train splits of "
        "those four found under data.root); null = fashiongen. scr and cap read FashionGen, tgir FashionIQ, "
        "and evaluation stays on FashionGen val / FashionIQ val",
        None,
    )


@dataclass
class TrainSection:
    updates: int = doc("optimizer updates to run", 22500)
    sampling: str = doc("task sampling: round_robin, size_proportional or uniform", "round_robin")
    task_weights: dict[str, float] = doc(
        "relative share of micro-batches per task (default 1 each): round robin repeats a task that "
        "many times per cycle (whole numbers), the random strategies scale its probability",
        factory=dict,
    )
    update_frequency: int = doc(
        "micro-batches per optimizer update (4 = one batch of each task in round robin)", 4
    )
    mixed_task_batches: bool = doc(
        "run the micro-batches of one update through shared backbone passes", False
    )
    gradient_strategy: str = doc(
        "combine task gradients: sum, imtlg (per tensor, faithful) or imtlg_global", "sum"
    )
    precision: str = doc("bf16 (autocast) or fp32 (faithful)", "bf16")
    master_weights: bool = doc(
        "keep the model's parameters in bf16 and the optimizer's float32 master copies beside them: "
        "autocast then casts no weight in a step (precision bf16; pays with model.residual_stream "
        "autocast; checkpoints hold the float32 masters)",
        False,
    )
    cuda_graphs: bool = doc(
        "replay each micro-step's forward and backward as a CUDA graph captured per batch layout "
        "(single process, gradient_strategy sum; on the CPU the step runs eagerly)",
        False,
    )
    compile: bool = doc(
        "compile each micro-step's forward with torch.compile (Inductor) before it is captured; needs "
        "cuda_graphs (one static batch layout per graph); the first step of each layout compiles",
        False,
    )
    freeze_backbone: bool | None = doc(
        "train only adapters, cross-attention adapters and heads; null = automatic: true with "
        "model.adapter_type xmodal (the Cross-Modal Adapter trains on a frozen backbone, as the reference), "
        "false with tsa (FAME-ViL fine-tunes the backbone)",
        None,
    )
    clip_grad_norm: float | None = doc("clip the gradient norm to this value; null = off", None)
    nonfinite: str = doc("on a non-finite loss: skip the update, or stop the run", "skip")
    seed: int = doc("seed of every random choice (sampling, data order, augmentation, initialisation)", 42)
    device: str | None = doc(
        "cuda (under torchrun: each process's LOCAL_RANK GPU), cuda:N (one GPU), cpu, or null (cuda when "
        "available)",
        None,
    )


@dataclass
class OptimSection:
    lr: float = doc("learning rate of the CLIP backbone", 1e-6)
    new_module_lr_multiplier: float = doc(
        "learning-rate factor of adapters, cross-attention adapters and heads", 100.0
    )
    weight_decay: float = doc(
        "AdamW weight decay (biases, LayerNorm weights, scales and embeddings never decay by default)", 1e-5
    )
    decay_norms_and_scales: bool = doc(
        "faithful quirk: decay every weight but the biases (LayerNorm weights, scales and embeddings "
        "included), as the official name filter did",
        False,
    )
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = doc("AdamW epsilon", 1e-8)
    step_untouched: bool = doc(
        "faithful: a parameter that was trained before but that no micro-batch of an update reached (another "
        "task's adapters and head) still takes the AdamW step, with a zero gradient (momentum and weight "
        "decay go on), as under the reference's zero_grad; false: it is left as it is",
        False,
    )


@dataclass
class ScheduleSection:
    warmup_updates: int = doc("linear warm-up length in updates", 2500)
    warmup_start_factor: float = doc("learning-rate factor at the first update of the warm-up", 0.25)
    decay_at: list[int] = doc(
        "updates at which the learning rate is multiplied by decay_factor", factory=lambda: [12500, 20000]
    )
    decay_factor: float = doc("multi-step decay factor", 0.1)
    new_module_decay_at: list[int] | None = doc(
        "decay points of the adapters, cross-attention adapters and heads; null = decay_at", None
    )


@dataclass
class DistillSection:
    enabled: bool = doc("multi-teacher distillation from single-task teachers", False)
    teachers: dict[str, str] = doc(
        "task -> teacher checkpoint (famevil_fast or official layout)", factory=dict
    )
    balance: float = doc("b in L = (2 - b) * L_gt + b * L_kd", 1.0)
    faithful_itc: bool = doc(
        "faithful quirk: retrieval teacher logits pair teacher and student embeddings", False
    )


@dataclass
class EvalSection:
    every: int = doc("evaluate every N updates (0 = only at the end)", 500)
    tasks: list[str] | None = doc(
        "tasks to evaluate; null = all trained tasks that have an evaluation set "
        "(the pre-training objectives have none)",
        None,
    )
    xmr_protocols: list[str] = doc(
        "cross-modal retrieval protocols: full, sampled", factory=lambda: ["full", "sampled"]
    )
    sampled_seed: int | None = doc(
        "seed of the sampled-100 protocol; null = the official code's unseeded draws from the global RNG", 0
    )
    caption_max_len: int = doc(
        f"longest generated caption in tokens ({CAPTION_TOKENS}: the longest reference after the CLIP round "
        "trip)",
        CAPTION_TOKENS,
    )
    caption_len_from_references: bool = doc(
        "cap each batch's captions at its longest reference's length, as the official code (it leaks the "
        "reference lengths; caption_max_len is then unused)",
        False,
    )
    caption_references: str = doc(
        "caption references: clip (the product text after a round trip through the CLIP tokenizer, as the "
        "official code) or raw (the text as written)",
        "clip",
    )
    caption_beams: int = doc("beam width of caption decoding (1 = greedy)", 1)
    caption_no_repeat_ngram: int = doc("forbid repeating any n-gram of this length in a caption (0 = off)", 0)
    caption_cuda_graph: bool = doc(
        "decode each caption batch by replaying one CUDA graph (same captions; on the CPU: eager)", False
    )
    caption_compile: bool = doc(
        "run each caption decoding step as one torch.compile (Inductor) graph, with or without "
        "caption_cuda_graph (the first batch of a new size or caption length compiles first; captions match "
        "except where two words tie to within rounding)",
        False,
    )
    caption_metrics: list[str] = doc(
        "caption metrics: bleu4, meteor, rouge_l, cider", factory=lambda: ["bleu4", "rouge_l", "cider"]
    )
    max_samples: int | None = doc(
        "cap every evaluation set at this many samples (quick checks); null = all", None
    )
    resize: str = doc(
        "evaluation image resize before the centre crop S: keep_aspect (shorter side to "
        "round(S * 256 / 224), aspect kept) or squash (faithful: every image to that size squared, aspect "
        "lost, as the official code; square images such as FashionGen's are unchanged)",
        "keep_aspect",
    )
    views: str = doc(
        "product views scored in SCR, FIC and on the XMR image side: all (every view is a sample, as the "
        "official protocol of the published numbers) or first (the first view of each product only)",
        "all",
    )


@dataclass
class CheckpointSection:
    dir: str = doc("run directory: checkpoints, metrics.jsonl and TensorBoard logs", "runs/famevil")
    every: int = doc("save every N updates (0 = only at the end and on interruption)", 1000)
    keep_last: int = doc("checkpoints to keep", 3)
    resume: bool = doc("continue from the newest checkpoint in dir when there is one", False)


@dataclass
class LoggingSection:
    every: int = doc(
        "log losses every N updates, the first and the last (train.updates or an interruption's); 0 = never",
        10,
    )
    tensorboard: bool = doc("also write TensorBoard event files (when tensorboard is installed)", True)
    progress: bool = doc("show a tqdm progress bar", True)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        _check_tasks(self.model.tasks)
        _choice("train.sampling", self.train.sampling, ("round_robin", "size_proportional", "uniform"))
        from famevil_fast.train.sampling import task_weights

        task_weights(self.model.tasks, self.train.task_weights, self.train.sampling == "round_robin")
        _choice("train.gradient_strategy", self.train.gradient_strategy, ("sum", "imtlg", "imtlg_global"))
        _choice("train.precision", self.train.precision, ("bf16", "fp32"))
        _choice("model.residual_stream", self.model.residual_stream, ("float32", "autocast"))
        _choice("model.backend", self.model.backend, BACKENDS)
        _choice("model.activation_backend", self.model.activation_backend, (*ADAPTER_BACKENDS, None))
        if self.model.residual_stream == "autocast" and self.train.precision != "bf16":
            raise ValueError(
                "model.residual_stream=autocast keeps the stream in the autocast dtype and needs "
                f"train.precision=bf16, got {self.train.precision}"
            )
        if self.train.master_weights and self.train.precision != "bf16":
            raise ValueError(
                "train.master_weights keeps a bf16 model for bf16 autocast and needs train.precision=bf16, "
                f"got {self.train.precision}"
            )
        _choice("train.nonfinite", self.train.nonfinite, ("skip", "stop"))
        _check_device(self.train.device)
        _check_data_backend(self.data)
        for name, value in (
            ("train.updates", self.train.updates),
            ("train.update_frequency", self.train.update_frequency),
            ("data.batch_size", self.data.batch_size),
            ("data.eval_batch_size", self.data.eval_batch_size),
            ("data.global_batch_size", self.data.global_batch_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.data.batch_size is not None and self.data.global_batch_size is not None:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size} per process) and data.global_batch_size "
                f"({self.data.global_batch_size} over all processes) are both set; keep one (the reference "
                "recipes set global_batch_size: override it, or set it to null to use batch_size)"
            )
        if self.train.mixed_task_batches and self.train.gradient_strategy != "sum":
            raise ValueError(
                "train.mixed_task_batches needs gradient_strategy 'sum' (IMTL-G needs each task's gradient)"
            )
        if self.train.compile and not self.train.cuda_graphs:
            raise ValueError(
                "train.compile needs train.cuda_graphs: the compiled step runs on the static batch layouts "
                "of the captured graphs"
            )
        if self.train.cuda_graphs and self.train.gradient_strategy != "sum":
            raise ValueError(
                "train.cuda_graphs needs gradient_strategy 'sum' (IMTL-G reads each task's gradient "
                "between micro-batches)"
            )
        if self.train.gradient_strategy != "sum" and self.train.update_frequency < 2:
            raise ValueError(
                "IMTL-G combines the gradients of several micro-batches: set train.update_frequency >= 2"
            )
        _check_numbers(self)
        _check_distill(self.distill, self.model.tasks)
        if self.model.caption_vocab not in (None, "corpus"):
            raise ValueError(
                f"model.caption_vocab must be 'corpus' or null, got {self.model.caption_vocab!r}"
            )
        self.model.check()
        _check_eval(self.eval, self.model.tasks)
        _check_caption_length(self.eval, self.model.clip)
        if self.eval.tasks is None and set(self.model.tasks) & set(PRETRAIN_TASKS):
            self.eval.tasks = [t for t in self.model.tasks if t not in PRETRAIN_TASKS]
        if self.train.freeze_backbone is None:
            self.train.freeze_backbone = default_freeze_backbone(self.model.adapter_type)
        return self


def _check_caption_length(section: EvalSection, clip: str) -> None:
    """eval.caption_max_len within the text context of the model's CLIP preset, less the start token."""
    from famevil_fast.model.config import clip_preset

    limit = clip_preset(clip).text.context_length - 1
    if section.caption_max_len > limit:
        raise ValueError(
            f"eval.caption_max_len must be at most {limit} (the {clip} text context, less the start token), "
            f"got {section.caption_max_len}"
        )


def default_freeze_backbone(adapter_type: str) -> bool:
    """``train.freeze_backbone: null`` resolved: the Cross-Modal Adapter (xmodal) trains on a frozen
    backbone, as the reference method does; FAME-ViL's task-specific adapters (tsa) train with it."""
    return adapter_type == "xmodal"


def _check_numbers(config: TrainConfig) -> None:
    """Numeric fields whose out-of-range values would run silently wrong (a negative clipping norm flips
    the gradient's sign; keep_last 0 would keep one checkpoint anyway)."""
    clip = config.train.clip_grad_norm
    if clip is not None and not clip > 0:
        raise ValueError(f"train.clip_grad_norm must be positive (or null = no clipping), got {clip}")
    optim, schedule = config.optim, config.schedule
    for name, value, low in (
        ("checkpoint.keep_last", config.checkpoint.keep_last, 1),
        ("checkpoint.every", config.checkpoint.every, 0),
        ("logging.every", config.logging.every, 0),
        ("train.seed", config.train.seed, 0),
        ("data.num_workers", config.data.num_workers, 0),
        ("data.attribute_min_count", config.data.attribute_min_count, 1),
        ("schedule.warmup_updates", schedule.warmup_updates, 0),
        ("schedule.decay_at", min(schedule.decay_at, default=0), 0),
        ("schedule.new_module_decay_at", min(schedule.new_module_decay_at or [], default=0), 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    for name, value in (  # a negative or non-finite factor would train with a negative or NaN rate
        ("optim.lr", optim.lr),
        ("optim.new_module_lr_multiplier", optim.new_module_lr_multiplier),
        ("optim.weight_decay", optim.weight_decay),
        ("optim.eps", optim.eps),
        ("schedule.warmup_start_factor", schedule.warmup_start_factor),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(schedule.decay_factor) and schedule.decay_factor > 0):
        raise ValueError(f"schedule.decay_factor must be a finite number > 0, got {schedule.decay_factor}")
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ValueError(
            f"optim.betas must be two numbers in [0, 1) (AdamW's beta1 and beta2), got {optim.betas}"
        )


def _check_distill(distill: DistillSection, tasks: list[str]) -> None:
    if not distill.enabled:
        return
    if not distill.teachers:
        raise ValueError("distill.enabled is true but distill.teachers names no teacher (task -> checkpoint)")
    unknown = set(distill.teachers) - set(tasks)
    if unknown:
        raise ValueError(f"distill.teachers names tasks that are not trained: {sorted(unknown)}")
    if not 0.0 <= distill.balance <= 2.0:
        raise ValueError(
            f"distill.balance must be in [0, 2] (L = (2 - b) L_gt + b L_kd: outside it one of the two terms "
            f"gets a negative weight), got {distill.balance}"
        )


def _choice(name: str, value: str | None, allowed: tuple[str | None, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_tasks(tasks: list[str]) -> None:
    """Task names first: a misspelt task must not be reported as a task_weights (or other) mistake."""
    if not tasks:
        raise ValueError(f"model.tasks must name at least one task; known tasks are {ALL_TASKS}")
    for task in tasks:
        if task not in ALL_TASKS:
            raise ValueError(f"model.tasks: unknown task {task!r}; known tasks are {ALL_TASKS}")


def _check_device(device: str | None) -> None:
    if device is not None and not DEVICE_PATTERN.match(device):
        raise ValueError(
            f"train.device must be null, 'cpu', 'cuda' or 'cuda:N' (N = 0, 1, ...), got {device!r}"
        )


def _check_data_backend(data: DataSection) -> None:
    from famevil_fast.data.backends import BACKENDS
    from famevil_fast.data.fashionall import NAME as UNION
    from famevil_fast.data.fashionall import UNION_DATASETS

    if data.dataset is not None:
        _choice("data.dataset", data.dataset, (*UNION_DATASETS, UNION))
    if data.backend is not None:
        _choice("data.backend", data.backend, BACKENDS)
    if data.backend == "cache" and data.cache is None:
        raise ValueError("data.backend 'cache' needs data.cache (build one with `famevil-fast cache`)")


def _check_eval(section: EvalSection, trained: list[str]) -> None:
    """Every eval field whose validity is known before training, so a bad one fails at start, not at the
    first evaluation (the lists of valid names are the evaluation code's own)."""
    from famevil_fast.data.eval_sets import EVAL_VIEWS
    from famevil_fast.data.transforms import EVAL_RESIZE_MODES
    from famevil_fast.eval.captioning import CAPTION_METRICS
    from famevil_fast.eval.runner import CAPTION_REFERENCES, EVALUATORS
    from famevil_fast.eval.xmr import XMR_PROTOCOLS, check_sampled_seed

    for task in section.tasks or []:
        if task not in EVALUATORS:
            raise ValueError(
                f"eval.tasks: task {task!r} has no evaluation; evaluable tasks are {tuple(EVALUATORS)}"
            )
        if task not in trained:
            raise ValueError(f"eval.tasks: task {task!r} is not trained (model.tasks: {trained})")
    if not section.xmr_protocols:
        raise ValueError(f"eval.xmr_protocols must name at least one protocol of {XMR_PROTOCOLS}")
    for p in section.xmr_protocols:
        _choice("eval.xmr_protocols", p, XMR_PROTOCOLS)
    check_sampled_seed(section.sampled_seed, "eval.sampled_seed")
    if not section.caption_metrics:
        raise ValueError(f"eval.caption_metrics must name at least one metric of {CAPTION_METRICS}")
    for metric in section.caption_metrics:
        _choice("eval.caption_metrics", metric, CAPTION_METRICS)
    _choice("eval.caption_references", section.caption_references, CAPTION_REFERENCES)
    _choice("eval.resize", section.resize, EVAL_RESIZE_MODES)
    _choice("eval.views", section.views, EVAL_VIEWS)
    for name, value, low in (
        ("eval.every", section.every, 0),
        ("eval.caption_max_len", section.caption_max_len, 1),
        ("eval.caption_beams", section.caption_beams, 1),
        ("eval.caption_no_repeat_ngram", section.caption_no_repeat_ngram, 0),
        ("eval.max_samples", section.max_samples, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


# ---------------------------------------------------------------- resume
RESUME_MAY_CHANGE = (
    "train.updates",  # extend (or shorten) a run
    "train.device",
    "train.nonfinite",
    "model.init",  # starting weights: the checkpoint's replace them
    "model.resume_weights",
    "model.init_from",
    "data.root",  # the same data at another place (a copy on a local disk)
    "data.num_workers",
    "data.eval_batch_size",
    "eval.*",
    "logging.*",
    "checkpoint.dir",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.resume",
)
"""Fields that may differ between a run's checkpoint and the recipe that resumes it: they do not change
what the resumed updates compute. Every other field must be equal (``resume_differences``)."""


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or f"{key.split('.')[0]}.*" in RESUME_MAY_CHANGE


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{name}": value
        for section, fields in config.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
    }


def resume_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``field: checkpoint value -> recipe value`` for every field outside ``RESUME_MAY_CHANGE`` that differs
    between a checkpoint's saved config and ``current`` (fields missing from either side are not compared:
    an older checkpoint lacks the newer fields)."""
    import json

    now = _flat(json.loads(json.dumps(current.to_dict())))
    before = _flat(saved)
    return [
        f"{key}: {before[key]!r} -> {now[key]!r}" + _resume_hint(key, before[key])
        for key in sorted(now.keys() & before.keys())
        if not _may_change(key) and before[key] != now[key]
    ]


def _resume_hint(key: str, saved: Any) -> str:
    """Where a difference that the recipe may not spell out comes from, and how to keep the saved value."""
    if key == "train.freeze_backbone":
        return (
            " (null, the default, means true with model.adapter_type xmodal and false with tsa; this run "
            f"continues with --set train.freeze_backbone={str(saved).lower()})"
        )
    return ""


# ---------------------------------------------------------------- YAML
def _section_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {
            _coerce(f"{where} key", k, key_hint): _coerce(f"{where}[{k!r}]", v, value_hint)
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{where} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    sections = _section_types()
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}")
    built = {}
    for name, cls in sections.items():
        values = data.get(name)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
        hints = typing.get_type_hints(cls)
        bad = sorted(set(values) - set(hints))
        if bad:
            raise ValueError(f"unknown key(s) {bad} in section {name!r}; known: {sorted(hints)}")
        built[name] = cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
    return TrainConfig(**built).validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _read_yaml(raw, f"--set {text!r}")


def _read_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose syntax errors name ``where`` (a file or a --set item) and the line/column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}: invalid YAML{at}: {problem}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        data = _read_yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections")
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise ValueError(f"override {text!r} must name section.key")
        if data.get(keys[0]) is None:  # absent, or an empty section in the YAML file
            data[keys[0]] = {}
        if not isinstance(data[keys[0]], dict):
            raise ValueError(f"section {keys[0]!r} is not a mapping")
        data[keys[0]][keys[1]] = value
    return config_from_dict(data)


class _OneLineDumper(yaml.SafeDumper):
    """A YAML dumper that writes a string holding a line break double-quoted, with escapes, on one line."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    if any(c in text for c in "\n\r\x85\u2028\u2029"):
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')
    return dumper.represent_str(text)


_OneLineDumper.add_representer(str, _represent_str)


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML that ``yaml.safe_load`` reads back to it: null for None, true and
    false, floats in a form YAML 1.1 reads as floats (1.0e-08, not 1e-08), lists and mappings in flow style,
    and strings quoted where YAML would read them as another type ('yes', 'null', '123')."""
    text = yaml.dump(
        value, Dumper=_OneLineDumper, default_flow_style=True, width=math.inf, allow_unicode=True
    )
    return text.removesuffix("\n").removesuffix("\n...")


def describe_fields(config: TrainConfig | None = None) -> str:
    """Every section and field with its documentation, and its value in ``config`` (default: the field
    defaults), for docs and ``train --print-config``: a YAML recipe (values in YAML, the documentation in
    comments) that ``load_config`` reads back to the same config."""
    lines = []
    for name, cls in _section_types().items():
        lines.append(f"{name}:")
        section = getattr(config, name) if config is not None else None
        for f in dataclasses.fields(cls):
            if section is not None:
                value = getattr(section, f.name)
            else:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {yaml_value(value)}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
