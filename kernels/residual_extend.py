"""ResidualAttention extend: paged causal attention of new tokens over rebuilt per-adapter K and V (DESIGN.md s2).

Request b has extend_len = qo_indptr[b+1] - qo_indptr[b] new query tokens at positions [prefix_len, seq_len), with
prefix_len = seq_lens[b] - extend_len, and keys [0, seq_len) (key j at RoPE position j). Adapter slot s = lora_slot[b]:

    K_j = K_base[slot_j] + RoPE_j(scaling[s] * R_k[res_j] B_k[s]^T)
    o_t = softmax_{j <= pos_t}(sm_scale * q_t K^T) (V_base + scaling[s] * R_v B_v[s]^T)
        = (P V_base + scaling[s] * (P R_v) B_v[s]^T) / sum(P)

Unlike SGLang's extend kernel, every key (cached or new) is read from the pools: the caller writes the new tokens'
base K/V and residuals first, so one paged loop over [0, seq_len) with a causal mask on the last tiles suffices.
K is rebuilt per tile in registers exactly as in residual_decode.py (rotation pairs as two half-width tiles).

A program owns one KV head and BLOCK_M rows, each row one (token, query head of the group) pair, so the G query heads
sharing a KV head share every K/V tile and every K reconstruction (row m: token m // G, head m % G).

Shapes (T = sum of extend lengths; see residual_decode.py for the pools, tables, B and RoPE tensors):
    q, o              [T, H_q, D] pool dtype; o is written for every row
    qo_indptr         [B + 1] int32, seq_lens / req_pool_indices / lora_slot [B] int32
    max_extend_len    host int >= every extend_len (sets the grid, like SGLang's max_len_extend)

Defaults (H100, Llama-8B shapes, bench/RESULTS.md): 64 rows x 32 keys, 4 warps, 2 stages with K rebuilt; 128 x 32,
8 warps, 2 stages for V only; pass cos_sin_cache in the pool dtype, as for decode.

Not supported: page size > 1, custom masks, sliding window, logit cap, sinks, D not a power of two, R_MAX > 128,
block_n > 32 with a V residual (Triton 3.6 miscompiled it on sm_90; see residual_decode.check_block_n).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .residual_decode import (LOG2E, check_block_n, check_residual_inputs, residual_block_r, rope_blocks,
                              rope_pair_dims, softmax_tile, tensor_or_placeholder)



def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@triton.jit
def _residual_extend_kernel(
    Q, O, K_Buffer, V_Buffer, R_Buffer,
    Req_To_Token, Req_To_Residual, Req_Pool_Indices, Seq_Lens, Qo_Indptr, Lora_Slot,
    B_K, B_V, Scaling, Cos_Sin,
    sm_scale_log2,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_slot, stride_k_h,
    stride_v_slot, stride_v_h,
    stride_r_slot,
    stride_rtt_req, stride_rtr_req,
    stride_bk_s, stride_bk_row, stride_bk_r,
    stride_bv_s, stride_bv_row, stride_bv_r,
    stride_cs_pos,
    GROUP: tl.constexpr, D: tl.constexpr,
    ROT_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    R_MAX: tl.constexpr, BLOCK_R: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_K_RESIDUAL: tl.constexpr, HAS_V_RESIDUAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    cur_seq = tl.program_id(0)
    cur_kv_head = tl.program_id(1)
    cur_block = tl.program_id(2)

    qo_start = tl.load(Qo_Indptr + cur_seq)
    extend_len = tl.load(Qo_Indptr + cur_seq + 1) - qo_start
    if cur_block * TOKENS >= extend_len:
        return
    seq_len = tl.load(Seq_Lens + cur_seq)
    first_pos = seq_len - extend_len + cur_block * TOKENS  # position of this block's first query token
    req = tl.load(Req_Pool_Indices + cur_seq).to(tl.int64)

    # lora_slot -1: every residual load below is masked off (R and B read as zeros), so K = base and V = base
    lora = tl.load(Lora_Slot + cur_seq)
    has_res = lora >= 0
    lora_i = tl.maximum(lora, 0).to(tl.int64)
    scaling = tl.load(Scaling + lora_i, mask=has_res, other=0.0)

    offs_m = tl.arange(0, BLOCK_M)
    tok = cur_block * TOKENS + offs_m // GROUP
    mask_m = (offs_m < TOKENS * GROUP) & (tok < extend_len)
    q_pos = first_pos + offs_m // GROUP
    cur_q_head = cur_kv_head * GROUP + offs_m % GROUP
    q_row = Q + (qo_start + tok).to(tl.int64)[:, None] * stride_q_t + cur_q_head[:, None] * stride_q_h
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, BLOCK_R)
    # masks are built from integer bounds, not `& has_res`: the CPU interpreter mis-types a scalar bool in `&`
    mask_r = offs_r < tl.where(has_res, R_MAX, 0)
    k_head = K_Buffer + cur_kv_head * stride_k_h
    v_head = V_Buffer + cur_kv_head * stride_v_h

    # prologue: q (split into rotation-pair halves when K is rebuilt) and this head's B_k, held for the whole loop
    if HAS_K_RESIDUAL:
        offs_half, mask_half, idx_a, idx_b = rope_pair_dims(BLOCK_HALF, ROT_HALF, IS_NEOX)
        q_a = tl.load(q_row + idx_a[None, :], mask=mask_m[:, None] & mask_half[None, :], other=0.0)
        q_b = tl.load(q_row + idx_b[None, :], mask=mask_m[:, None] & mask_half[None, :], other=0.0)
        bk_head = B_K + lora_i * stride_bk_s + (cur_kv_head * D) * stride_bk_row + offs_r[None, :] * stride_bk_r
        bk_a = tl.load(bk_head + idx_a[:, None] * stride_bk_row, mask=mask_half[:, None] & mask_r[None, :], other=0.0)
        bk_b = tl.load(bk_head + idx_b[:, None] * stride_bk_row, mask=mask_half[:, None] & mask_r[None, :], other=0.0)
        # scaling folded into B once here rather than into every tile's product
        bk_a = (bk_a.to(tl.float32) * scaling).to(bk_a.dtype)
        bk_b = (bk_b.to(tl.float32) * scaling).to(bk_b.dtype)
        if BLOCK_PASS > 0:
            offs_p = 2 * ROT_HALF + tl.arange(0, BLOCK_PASS)
            mask_p = offs_p < D
            q_p = tl.load(q_row + offs_p[None, :], mask=mask_m[:, None] & mask_p[None, :], other=0.0)
            bk_p = tl.load(bk_head + offs_p[:, None] * stride_bk_row, mask=mask_p[:, None] & mask_r[None, :], other=0.0)
            bk_p = (bk_p.to(tl.float32) * scaling).to(bk_p.dtype)
    else:
        q = tl.load(q_row + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    acc_rv = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)

    # keys past the block's last query position are never visible; tiles below first_pos are visible to every row.
    # Phase 0 runs those tiles unmasked, phase 1 the rest with the causal mask; static_range unrolls the two phases
    # at compile time, so there is no branch in either loop.
    kv_end = tl.minimum(seq_len, first_pos + TOKENS)
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    res_end = tl.where(has_res, kv_end, 0)
    for phase in tl.static_range(2):
        if phase == 0:
            lo = 0
            hi = full_end
        else:
            lo = full_end
            hi = kv_end
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            kv_loc = tl.load(Req_To_Token + req * stride_rtt_req + offs_n, mask=mask_n, other=0).to(tl.int64)
            if HAS_RESIDUAL:
                res_loc = tl.load(Req_To_Residual + req * stride_rtr_req + offs_n, mask=offs_n < res_end, other=0)
                res_row = R_Buffer + res_loc.to(tl.int64) * stride_r_slot

            # stage 1: scores, with K = K_base + RoPE(s R_k B_k^T) built here, transposed ([dims, BLOCK_N])
            if HAS_K_RESIDUAL:
                rk = tl.load(res_row[None, :] + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                             other=0.0).to(bk_a.dtype)
                d_a = tl.dot(bk_a, rk, input_precision=DOT_PRECISION)
                d_b = tl.dot(bk_b, rk, input_precision=DOT_PRECISION)
                cs_row = Cos_Sin + offs_n[None, :] * stride_cs_pos
                mask_rot = mask_half[:, None] & mask_n[None, :]
                cos = tl.load(cs_row + offs_half[:, None], mask=mask_rot, other=0.0).to(tl.float32)
                sin = tl.load(cs_row + ROT_HALF + offs_half[:, None], mask=mask_rot, other=0.0).to(tl.float32)
                k_a = tl.load(k_head + kv_loc[None, :] * stride_k_slot + idx_a[:, None], mask=mask_rot, other=0.0)
                k_b = tl.load(k_head + kv_loc[None, :] * stride_k_slot + idx_b[:, None], mask=mask_rot, other=0.0)
                k_a = (k_a.to(tl.float32) + d_a * cos - d_b * sin).to(q_a.dtype)
                k_b = (k_b.to(tl.float32) + d_b * cos + d_a * sin).to(q_b.dtype)
                qk = tl.dot(q_a, k_a, input_precision=DOT_PRECISION)
                qk += tl.dot(q_b, k_b, input_precision=DOT_PRECISION)
                if BLOCK_PASS > 0:
                    d_p = tl.dot(bk_p, rk, input_precision=DOT_PRECISION)
                    k_p = tl.load(k_head + kv_loc[None, :] * stride_k_slot + offs_p[:, None],
                                  mask=mask_p[:, None] & mask_n[None, :], other=0.0)
                    k_p = (k_p.to(tl.float32) + d_p).to(q_p.dtype)
                    qk += tl.dot(q_p, k_p, input_precision=DOT_PRECISION)
            else:
                k = tl.load(k_head + kv_loc[None, :] * stride_k_slot + offs_d[:, None], mask=mask_n[None, :],
                            other=0.0)
                qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            qk = qk * sm_scale_log2
            if phase == 1:  # causal edge, and the tail past kv_end
                qk = tl.where((offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :], qk, float("-inf"))

            # stage 2: online softmax; P R_v rides beside P V_base under the same rescaling. Every row sees key 0
            # in the first tile, so m_i is finite from then on and exp2 never meets (-inf) - (-inf).
            m_new, alpha, p, l_i = softmax_tile(qk, m_i, l_i)
            v = tl.load(v_head + kv_loc[:, None] * stride_v_slot + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            if HAS_V_RESIDUAL:
                rv = tl.load(res_row[:, None] + R_MAX + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                             other=0.0)
                acc_rv = acc_rv * alpha[:, None] + tl.dot(p.to(v.dtype), rv.to(v.dtype),
                                                          input_precision=DOT_PRECISION)
            m_i = m_new

    # epilogue: V's residual term once, (P R_v) B_v^T, then normalise and store
    if HAS_V_RESIDUAL:
        bv = tl.load(B_V + lora_i * stride_bv_s + (cur_kv_head * D + offs_d)[None, :] * stride_bv_row
                     + offs_r[:, None] * stride_bv_r, mask=mask_r[:, None], other=0.0)
        acc += tl.dot(acc_rv.to(bv.dtype), bv, input_precision=DOT_PRECISION) * scaling
    o_row = O + (qo_start + tok).to(tl.int64)[:, None] * stride_o_t + cur_q_head[:, None] * stride_o_h
    tl.store(o_row + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_m[:, None])


def residual_extend(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, r_buffer: torch.Tensor,
    req_to_token: torch.Tensor, req_to_residual: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, qo_indptr: torch.Tensor, lora_slot: torch.Tensor,
    b_k: Optional[torch.Tensor], b_v: Optional[torch.Tensor], scaling: torch.Tensor,
    cos_sin_cache: torch.Tensor, is_neox: bool, sm_scale: float,
    o: torch.Tensor, max_extend_len: int,
    block_m: Optional[int] = None, block_n: Optional[int] = None, num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> torch.Tensor:
    """Causal extend attention over rebuilt per-adapter K/V (module docstring); writes and returns o [T, H_q, D]."""
    h_kv, d, r_max, rot_dim = check_residual_inputs(
        q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, b_k, b_v, scaling, cos_sin_cache, o)
    batch = seq_lens.shape[0]
    h_q = q.shape[1]
    for name, t in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens), ("lora_slot", lora_slot)):
        _check(t.dtype == torch.int32 and t.shape == (batch,),
               f"{name} must be int32 [{batch}], got {t.dtype} {tuple(t.shape)}")
    _check(qo_indptr.dtype == torch.int32 and qo_indptr.shape == (batch + 1,),
           f"qo_indptr must be int32 [{batch + 1}], got {qo_indptr.dtype} {tuple(qo_indptr.shape)}")
    _check(max_extend_len >= 1, f"max_extend_len must be >= 1, got {max_extend_len}")

    group = h_q // h_kv
    # defaults: the fastest correct tiles on an H100 at Llama-8B shapes (bench/kernels.py sweep); fp32 tiles need
    # twice the registers of 16-bit ones, so they get the small configuration
    if q.dtype == torch.float32:
        default = (64, 32, 4, 1)
    elif b_k is not None:
        default = (64, 32, 4, 2)
    else:
        default = (128, 32, 8, 2)
    block_m = max(block_m or default[0], triton.next_power_of_2(group))
    block_n = block_n or default[1]
    num_warps = num_warps or default[2]
    num_stages = num_stages or default[3]
    check_block_n(block_n, b_v)
    tokens_per_block = block_m // group
    rot_half, block_half, block_pass = rope_blocks(d, rot_dim)
    b_k_arg, b_v_arg = tensor_or_placeholder(b_k, r_buffer), tensor_or_placeholder(b_v, r_buffer)
    grid = (batch, h_kv, triton.cdiv(max_extend_len, tokens_per_block))
    _residual_extend_kernel[grid](
        q, o, k_buffer, v_buffer, r_buffer,
        req_to_token, req_to_residual, req_pool_indices, seq_lens, qo_indptr, lora_slot,
        b_k_arg, b_v_arg, scaling, cos_sin_cache,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        r_buffer.stride(0),
        req_to_token.stride(0), req_to_residual.stride(0),
        b_k_arg.stride(0), b_k_arg.stride(1), b_k_arg.stride(2),
        b_v_arg.stride(0), b_v_arg.stride(1), b_v_arg.stride(2),
        cos_sin_cache.stride(0),
        GROUP=group, D=d, ROT_HALF=rot_half, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        R_MAX=r_max, BLOCK_R=residual_block_r(r_max),
        IS_NEOX=bool(is_neox), HAS_K_RESIDUAL=b_k is not None, HAS_V_RESIDUAL=b_v is not None,
        HAS_RESIDUAL=b_k is not None or b_v is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return o
