"""Triton kernels of famevil_fast (importable as ``famevil_fast.kernels``): the fused bottleneck adapter
(single-task and mixed-task batches, forward and backward) and LayerNorm fused into linear projections
(used by the cross-attention adapter). ``launch`` holds the host-side launchers, ``custom_ops`` registers
them as ``torch.library`` operators, ``aot`` lists every kernel for ahead-of-time compilation.
"""
