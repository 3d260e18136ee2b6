"""Triton kernels of sglang-forkkv (imported as sglang_forkkv.kernels.<module>), each beside its torch reference.

residual_decode     paged split-KV decode attention that rebuilds each adapter's K and V on chip
residual_extend     paged causal extend attention, same reconstruction
residual_cascade    decode that reads a base prefix shared by several agents once (measured slower: bench/RESULTS.md)
residual_attention_ref  float64 torch references for both
"""
