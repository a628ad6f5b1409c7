"""Triton kernels of famevil_fast (importable as ``famevil_fast.kernels``): the fused bottleneck adapter
(single-task and mixed-task batches, forward and backward), LayerNorm fused into linear projections
(used by the cross-attention adapter) and the log-sum-exp sweeps of the contrastive loss. ``launch`` holds
the adapter's host-side launchers, ``custom_ops`` registers them as ``torch.library`` operators and
``autograd`` runs them in eager mode without the operator dispatch, ``contrastive_ops`` launches and
registers the contrastive kernels, ``aot`` lists every kernel for ahead-of-time compilation.
"""
