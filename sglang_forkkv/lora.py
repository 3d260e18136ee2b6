"""QKV LoRA under forkkv: q gets its LoRA delta, k and v do not; their rank-r x·A goes to the cache.

The model then rotates q and the *base* k as usual, and the attention backend stores base k/v in
SGLang's KV pool and R in the residual pool, rebuilding K = base + RoPE(s R_k B_k) and
V = base + s R_v B_v for every key, the current tokens' included (DESIGN §5): one code path for new
and cached tokens, and the prefilling agent's own result is exact by construction.
"""

from __future__ import annotations

import torch

from sglang.kernels.ops.gemm.qkv_lora_b import qkv_lora_b_fwd

from sglang_forkkv.plan import CAPTURE


def split_qkv_lora_a(a_out: torch.Tensor, token_rank: torch.Tensor, max_rank: int):
    """Unpack SGLang's stacked x·A output [T, 3 R_MAX] (per token of rank r: q in [0, r), k in [r, 2r),
    v in [2r, 3r)) into the q part [T, 3 R_MAX] (other columns zeroed) and the residual [T, 2 R_MAX]."""
    cols = torch.arange(max_rank, device=a_out.device)
    r = token_rank.to(a_out.device).unsqueeze(1)
    valid = cols.unsqueeze(0) < r
    k_idx = (r + cols).clamp(max=a_out.shape[1] - 1)
    v_idx = (2 * r + cols).clamp(max=a_out.shape[1] - 1)
    zero = a_out.new_zeros(())
    residual = torch.cat(
        [torch.where(valid, a_out.gather(1, k_idx), zero), torch.where(valid, a_out.gather(1, v_idx), zero)], dim=1
    )
    q_only = torch.where(
        torch.arange(a_out.shape[1], device=a_out.device).unsqueeze(0) < r, a_out, zero
    )
    return q_only, residual


def eager_residual(a_buffer: torch.Tensor, x: torch.Tensor, write, max_rank: int) -> torch.Tensor:
    """x·A of another adapter's k and v for some tokens, in the residual layout [n, 2 R_MAX]."""
    r = write.rank
    a_kv = a_buffer[write.lora_slot, r : 3 * r]  # rows: k then v, r each
    # Scaled as this LoRA backend scales its own x·A (factor 1.0 where the scaling waits for B).
    kv = (x[write.rows] @ a_kv.T) * write.factor
    out = x.new_zeros(len(write.rows), 2 * max_rank)
    out[:, :r], out[:, max_rank : max_rank + r] = kv[:, :r], kv[:, r:]
    return out


def qkv_apply_lora(layer, base_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Replacement of QKVParallelLinearWithLoRA.apply_lora while a forkkv plan is active.

    Both LoRA backends forkkv supports pack the stacked x·A output per token of rank r as [q | k | v], r columns
    each (torch_native with the scaling folded into A, triton unscaled: it scales after B).
    """
    plan = CAPTURE.plan
    backend = layer.lora_backend
    a_out = backend.run_lora_a_sgemm(x=x, weights=layer.A_buffer_qkv, stack_num=3)
    max_rank = layer.A_buffer_qkv.shape[1] // 3
    q_only, CAPTURE.residual = split_qkv_lora_a(a_out, plan.token_rank, max_rank)
    CAPTURE.eager = [eager_residual(layer.A_buffer_qkv, x, write, max_rank) for write in plan.eager]
    if backend.name == "triton":
        # q's slice of the B buffer only (n_slices 1: columns [0, q_size)); the kernel scales per adapter
        return qkv_lora_b_fwd(
            q_only[:, :max_rank],
            layer.B_buffer_qkv,
            backend.batch_info,
            layer.output_offset[:2],
            layer.base_layer.q_proj_shard_size,
            base_output,
            n_slices=1,
        )
    return backend.run_lora_b_sgemm(
        x=q_only,
        weights=layer.B_buffer_qkv,
        output_offset_cpu=layer.output_offset_cpu,
        base_output=base_output,
    )
