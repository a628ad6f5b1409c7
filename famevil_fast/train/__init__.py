"""The multi-task trainer: recipes (``config``), task sampling, distillation, IMTL-G, the optimizer and
schedule, checkpoints and exact resume, distributed training, the input feed, CUDA-graph steps, logging
and ``Trainer`` itself (``trainer``). See docs/training.md."""
