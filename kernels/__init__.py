"""Triton kernels of famevil_fast (importable as ``famevil_fast.kernels``): the fused bottleneck adapter
(single-task and mixed-task batches, forward and backward; ``weight_grads`` for its weight gradients),
LayerNorm fused into linear projections (used by the cross-attention adapter and the decoding step), the
log-sum-exp sweeps of the contrastive loss, the fused decoding step's attention over the key/value cache
and the vision memory (``decode_attention``) and greedy choice (``decode_greedy``), and QuickGELU in one pass
each way (``activation``, with its launchers). ``launch`` holds the host-side launchers, ``configs`` the
launch configurations (tiles, warps, switches), ``custom_ops`` registers the adapter and QuickGELU as
``torch.library`` operators and ``autograd`` runs them in eager mode without the operator dispatch,
``contrastive_ops`` launches and registers the contrastive kernels, ``aot`` lists every kernel for
ahead-of-time compilation.
"""
