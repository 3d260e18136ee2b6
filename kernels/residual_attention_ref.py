"""Plain torch references for ResidualAttention (DESIGN.md section 2); tests and benchmarks compare the kernels to them.

For request i with adapter slot s = lora_slot[i] and keys j = 0 .. seq_lens[i] - 1 (key j has RoPE position j):

    K_j = k_buffer[slot_j] + RoPE_j(scaling[s] * (R_k[res_j] @ b_k[s].T).view(H_kv, D))
    V_j = v_buffer[slot_j] + scaling[s] * (R_v[res_j] @ b_v[s].T).view(H_kv, D)
    o   = softmax(sm_scale * q K^T) V      per query head; query head h reads KV head h // (H_q // H_kv)

where slot_j = req_to_token[req_pool_indices[i], j], res_j = req_to_residual[req_pool_indices[i], j],
R_k = r_buffer[:, :R_MAX], R_v = r_buffer[:, R_MAX:]. lora_slot -1 means no residual (K = base, V = base).
b_k or b_v None means the adapters have no LoRA on that projection.

Shapes: k_buffer, v_buffer [num_slots, H_kv, D]; r_buffer [num_residual_slots, 2 * R_MAX]; req_to_token,
req_to_residual [max_reqs, max_ctx] int32; b_k, b_v [S, H_kv * D, R_MAX]; scaling [S]; cos_sin_cache [max_pos, ROT_DIM]
(cos in the first ROT_DIM / 2 columns, sin in the rest; only the first ROT_DIM dims of a head rotate).

Everything is computed in `dtype` (float64 by default) with no fusion or reordering: this is the definition the
Triton kernels in residual_decode.py and residual_extend.py must match.
"""

from typing import Optional, Tuple

import torch


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   is_neox: bool) -> torch.Tensor:
    """RoPE of x [N, H, D] at positions [N], rotating the first ROT_DIM = cos_sin_cache.shape[1] dims, in x's dtype.

    neox rotates the halves (x[:ROT/2], x[ROT/2:ROT]); non-neox the interleaved pairs (x[0:ROT:2], x[1:ROT:2]).
    """
    rot_dim = cos_sin_cache.shape[1]
    half = rot_dim // 2
    cs = cos_sin_cache[positions.long()].to(x.dtype)
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    if is_neox:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, x_pass), dim=-1)


def reconstruct_kv_ref(
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    r_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_to_residual: torch.Tensor,
    req_pool_index: int,
    seq_len: int,
    lora_slot: int,
    b_k: Optional[torch.Tensor],
    b_v: Optional[torch.Tensor],
    scaling: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full K and V [seq_len, H_kv, D] of one request, in `dtype` (the formula in the module docstring)."""
    _, h_kv, d = k_buffer.shape
    r_max = r_buffer.shape[1] // 2
    slots = req_to_token[req_pool_index, :seq_len].long()
    k = k_buffer[slots].to(dtype)
    v = v_buffer[slots].to(dtype)
    if lora_slot < 0:
        return k, v
    res = r_buffer[req_to_residual[req_pool_index, :seq_len].long()].to(dtype)
    s = scaling[lora_slot].to(dtype)
    if b_k is not None:
        delta_k = s * (res[:, :r_max] @ b_k[lora_slot].to(dtype).T).view(seq_len, h_kv, d)
        positions = torch.arange(seq_len, device=k_buffer.device)
        k = k + apply_rope_ref(delta_k, positions, cos_sin_cache.to(dtype), is_neox)
    if b_v is not None:
        v = v + s * (res[:, r_max:] @ b_v[lora_slot].to(dtype).T).view(seq_len, h_kv, d)
    return k, v


def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, sm_scale: float):
    """softmax(sm_scale q K^T) V with keys j <= q_positions; q [T, H_q, D], k/v [L, H_kv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * sm_scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(key_pos[None, None, :] > q_positions[None, :, None], float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(scores, dim=-1), v)


def residual_decode_ref(
    q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, req_pool_indices, seq_lens, lora_slot,
    b_k, b_v, scaling, cos_sin_cache, is_neox, sm_scale, dtype=torch.float64,
) -> torch.Tensor:
    """o [B, H_q, D] in `dtype` for one query token per request (at position seq_lens[i] - 1) over keys [0, seq_len)."""
    out = []
    for i in range(q.shape[0]):
        seq_len = int(seq_lens[i])
        k, v = reconstruct_kv_ref(
            k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, int(req_pool_indices[i]), seq_len,
            int(lora_slot[i]), b_k, b_v, scaling, cos_sin_cache, is_neox, dtype,
        )
        q_pos = torch.tensor([seq_len - 1], device=q.device)
        out.append(_attention_ref(q[i : i + 1].to(dtype), k, v, q_pos, sm_scale))
    return torch.cat(out, dim=0)


def residual_extend_ref(
    q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, req_pool_indices, seq_lens, qo_indptr,
    lora_slot, b_k, b_v, scaling, cos_sin_cache, is_neox, sm_scale, dtype=torch.float64,
) -> torch.Tensor:
    """o [sum(extend_len), H_q, D] in `dtype`; request i's queries q[qo_indptr[i]:qo_indptr[i+1]] sit at positions
    [prefix_len, seq_len) with prefix_len = seq_len - extend_len, causal over keys [0, seq_len)."""
    out = []
    for i in range(len(seq_lens)):
        seq_len = int(seq_lens[i])
        q_start, q_end = int(qo_indptr[i]), int(qo_indptr[i + 1])
        k, v = reconstruct_kv_ref(
            k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, int(req_pool_indices[i]), seq_len,
            int(lora_slot[i]), b_k, b_v, scaling, cos_sin_cache, is_neox, dtype,
        )
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=q.device)
        out.append(_attention_ref(q[q_start:q_end].to(dtype), k, v, q_pos, sm_scale))
    return torch.cat(out, dim=0)
