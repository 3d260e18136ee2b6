"""ResidualAttention decode: paged split-KV attention rebuilding each adapter's K and V on chip (DESIGN.md section 2).

For request b (one query token at position L - 1, L = seq_lens[b]), adapter slot s = lora_slot[b], KV head h:

    K_j = K_base[slot_j] + RoPE_j(scaling[s] * R_k[res_j] B_k[s]^T)        (j = 0 .. L - 1, RoPE position j)
    o   = softmax(sm_scale * q K^T) (V_base + scaling[s] * R_v B_v[s]^T)
        = (P V_base + scaling[s] * (P R_v) B_v[s]^T) / sum(P)                (exact reorder: B_v once per split)

K is never written to HBM: per tile of BLOCK_N keys the kernel loads R_k [BLOCK_N, R_MAX], multiplies it by this KV
head's scaled B_k (held in registers for the whole split), rotates the result with the tile's cos/sin and adds it to
the base K tile. The rotated dims are handled as two half-width tiles (the two members of each rotation pair), so the
base K tile and q are split the same way and q K^T is the sum of two or three narrower dots. A request without adapter
runs the same code with its residual loads masked off (same cost); a batch with no adapter at all should pass
b_k = b_v = None, which compiles plain paged attention.

Speed (H100, Llama-8B shapes, bench/RESULTS.md): pass cos_sin_cache in the pool dtype (a bf16 copy of SGLang's fp32
table): it halves the table bytes each K tile reads and cuts the 32K x 16 decode from 1.9 ms to 1.0 ms; the rounding
touches only the residual term. The defaults (block_n 32, 4 warps, 3 stages) were the fastest measured.

Two stages, like SGLang's triton decode kernel: stage 1 (grid B x H_kv x max_kv_splits) writes each split's
normalised partial output and natural-log LSE into caller-owned float32 scratch; stage 2 (grid B x H_q) merges them.
The caller owns o, the scratch and num_kv_splits, so the launch is CUDA-graph safe.

Shapes (B requests, H_q = G * H_kv query heads, head dim D, R_MAX residual columns per half):
    q                 [B, H_q, D]                fp16 / bf16 / fp32 (the KV pool's dtype)
    k_buffer, v_buffer [num_slots, H_kv, D]      base K (already rotated) and base V of one layer
    r_buffer          [num_res_slots, 2 * R_MAX] R_k in columns [0, R_MAX), R_v in [R_MAX, 2 R_MAX); fp16/bf16/fp32
                      (tiles are cast to the pool dtype on load)
    req_to_token, req_to_residual [max_reqs, max_ctx] int32
    req_pool_indices, seq_lens, lora_slot [B] int32 (lora_slot -1: no residual, plain attention over the base)
    b_k, b_v          [S, H_kv * D, R_MAX] or None (no LoRA on that projection: that reconstruction is compiled out);
                      any strides (views of SGLang's qkv LoRA B buffer)
    scaling           [S] float32
    cos_sin_cache     [max_pos, ROT_DIM], cos then sin; any float dtype; ROT_DIM <= D, the first ROT_DIM dims rotate
    o                 [B, H_q, D] pool dtype (written)
    attn_logits       [>= B, H_q, MAX_SPLITS, D] float32 scratch; attn_lse [>= B, H_q, MAX_SPLITS] float32 scratch
    num_kv_splits     [>= B] int32, each in [1, MAX_SPLITS] (values outside are clamped); see choose_num_kv_splits
    cascade           optional residual_cascade.CascadePlan: the first cascade.max_splits split slots then hold each
                      group's shared prefix, the rest each request's own keys (launcher docstring)

Not supported: page size > 1, logit cap, sinks, sliding window, D not a power of two, R_MAX > 128, seq_len 0,
block_n > 32 with a V residual (Triton 3.6 miscompiled it on sm_90; see check_block_n). Residual columns past an
adapter's rank must be zero in r_buffer (then stale B columns there do not matter).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
MIN_SPLIT_TOKENS = 256  # a split shorter than this spends more on its partial write and merge than it saves
PROGRAMS_PER_SM = 8  # stage-1 programs per SM: best overall on an H100 at 32K x batch 1/4/16 (bench/kernels.py)


@triton.jit
def rope_pair_dims(BLOCK_HALF: tl.constexpr, ROT_HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Head dims of the two members of each rotation pair (neox: the two halves; otherwise interleaved), padded to
    BLOCK_HALF: (offs_half, mask_half, idx_a, idx_b)."""
    offs_half = tl.arange(0, BLOCK_HALF)
    mask_half = offs_half < ROT_HALF
    if IS_NEOX:
        idx_a = offs_half
        idx_b = offs_half + ROT_HALF
    else:
        idx_a = 2 * offs_half
        idx_b = 2 * offs_half + 1
    return offs_half, mask_half, idx_a, idx_b


@triton.jit
def softmax_tile(qk, m_i, l_i):
    """Online softmax over one key tile of base-2 scores qk [rows, keys]: (new max, rescale of the old
    accumulators, probabilities, new sum)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_partial(mid, lse, acc, m_i, l_i, mask):
    """One split's normalised partial output (mid [rows, D] pointers) and its natural-log LSE (lse [rows]), the
    pair merge_partial folds back together."""
    tl.store(mid, acc / l_i[:, None], mask=mask[:, None])
    tl.store(lse, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask)


@triton.jit
def merge_partial(m_i, l_i, acc, part_lse, part):
    """Fold one split's normalised partial (and its natural-log LSE) into the running (max, sum, output)."""
    m_new = tl.maximum(m_i, part_lse)
    alpha = tl.exp(m_i - m_new)
    w = tl.exp(part_lse - m_new)
    return m_new, l_i * alpha + w, acc * alpha + w * part


@triton.jit
def _residual_decode_kernel(
    Q, K_Buffer, V_Buffer, R_Buffer,
    Req_To_Token, Req_To_Residual, Req_Pool_Indices, Seq_Lens, Kv_Start, Lora_Slot,
    B_K, B_V, Scaling, Cos_Sin, Num_Kv_Splits,
    Att_Out, Att_Lse,
    sm_scale_log2,
    stride_q_b, stride_q_h,
    stride_k_slot, stride_k_h,
    stride_v_slot, stride_v_h,
    stride_r_slot,
    stride_rtt_req, stride_rtr_req,
    stride_bk_s, stride_bk_row, stride_bk_r,
    stride_bv_s, stride_bv_row, stride_bv_r,
    stride_cs_pos,
    stride_mid_b, stride_mid_h, stride_mid_s,
    stride_lse_b, stride_lse_h, stride_lse_s,
    GROUP: tl.constexpr, D: tl.constexpr,
    ROT_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    R_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RK: tl.constexpr, MAX_SPLITS: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_K_RESIDUAL: tl.constexpr, HAS_V_RESIDUAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_START: tl.constexpr,
):
    cur_batch = tl.program_id(0)
    cur_kv_head = tl.program_id(1)
    split_id = tl.program_id(2)

    req = tl.load(Req_Pool_Indices + cur_batch).to(tl.int64)
    seq_len = tl.load(Seq_Lens + cur_batch)
    kv_splits = tl.minimum(tl.maximum(tl.load(Num_Kv_Splits + cur_batch), 1), MAX_SPLITS)
    kv_start = 0
    if HAS_START:  # keys [0, kv_start) are the cascade kernel's (a shared prefix read once for the group)
        kv_start = tl.load(Kv_Start + cur_batch)
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_start, kv_splits), BLOCK_N) * BLOCK_N
    split_start = kv_start + split_len * split_id
    split_end = tl.minimum(split_start + split_len, seq_len)
    if split_end <= split_start:
        return

    # A request without adapter (lora_slot -1) runs the same code with every residual load masked off: its R and B
    # tiles are zeros, so K = base and V = base, with no branch in the loop.
    lora = tl.load(Lora_Slot + cur_batch)
    has_res = lora >= 0
    lora_i = tl.maximum(lora, 0).to(tl.int64)
    scaling = tl.load(Scaling + lora_i, mask=has_res, other=0.0)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    q_row = Q + cur_batch.to(tl.int64) * stride_q_b + (cur_kv_head * GROUP + offs_h)[:, None] * stride_q_h
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, BLOCK_R)
    # masks are built from integer bounds, not `& has_res`: the CPU interpreter mis-types a scalar bool in `&`
    mask_r = offs_r < tl.where(has_res, R_MAX, 0)
    # K's residual columns are the reduction dim of B_k R_k, where 16 wide is fine (BLOCK_R's padding is for P R_v)
    offs_rk = tl.arange(0, BLOCK_RK)
    mask_rk = offs_rk < tl.where(has_res, R_MAX, 0)
    res_end = tl.where(has_res, split_end, 0)
    k_head = K_Buffer + cur_kv_head * stride_k_h
    v_head = V_Buffer + cur_kv_head * stride_v_h

    # prologue: q (split into rotation-pair halves when K is rebuilt) and this head's B_k, held for the whole split
    if HAS_K_RESIDUAL:
        offs_half, mask_half, idx_a, idx_b = rope_pair_dims(BLOCK_HALF, ROT_HALF, IS_NEOX)
        q_a = tl.load(q_row + idx_a[None, :], mask=mask_h[:, None] & mask_half[None, :], other=0.0)
        q_b = tl.load(q_row + idx_b[None, :], mask=mask_h[:, None] & mask_half[None, :], other=0.0)
        bk_head = B_K + lora_i * stride_bk_s + (cur_kv_head * D) * stride_bk_row + offs_rk[None, :] * stride_bk_r
        bk_a = tl.load(bk_head + idx_a[:, None] * stride_bk_row, mask=mask_half[:, None] & mask_rk[None, :], other=0.0)
        bk_b = tl.load(bk_head + idx_b[:, None] * stride_bk_row, mask=mask_half[:, None] & mask_rk[None, :], other=0.0)
        # scaling folded into B once here rather than into every tile's product
        bk_a = (bk_a.to(tl.float32) * scaling).to(bk_a.dtype)
        bk_b = (bk_b.to(tl.float32) * scaling).to(bk_b.dtype)
        if BLOCK_PASS > 0:
            offs_p = 2 * ROT_HALF + tl.arange(0, BLOCK_PASS)
            mask_p = offs_p < D
            q_p = tl.load(q_row + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0)
            bk_p = tl.load(bk_head + offs_p[:, None] * stride_bk_row, mask=mask_p[:, None] & mask_rk[None, :],
                           other=0.0)
            bk_p = (bk_p.to(tl.float32) * scaling).to(bk_p.dtype)
    else:
        q = tl.load(q_row + offs_d[None, :], mask=mask_h[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    acc_rv = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        kv_loc = tl.load(Req_To_Token + req * stride_rtt_req + offs_n, mask=mask_n, other=0).to(tl.int64)
        if HAS_RESIDUAL:
            res_loc = tl.load(Req_To_Residual + req * stride_rtr_req + offs_n, mask=offs_n < res_end, other=0)
            res_row = R_Buffer + res_loc.to(tl.int64) * stride_r_slot

        # stage 1: scores, with K = K_base + RoPE(s R_k B_k^T) built here, transposed ([dims, BLOCK_N])
        if HAS_K_RESIDUAL:
            rk = tl.load(res_row[None, :] + offs_rk[:, None], mask=mask_rk[:, None] & mask_n[None, :],
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
            k = tl.load(k_head + kv_loc[None, :] * stride_k_slot + offs_d[:, None], mask=mask_n[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * sm_scale_log2, float("-inf"))

        # stage 2: online softmax; P R_v rides beside P V_base under the same rescaling
        m_new, alpha, p, l_i = softmax_tile(qk, m_i, l_i)
        v = tl.load(v_head + kv_loc[:, None] * stride_v_slot + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_V_RESIDUAL:
            rv = tl.load(res_row[:, None] + R_MAX + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc_rv = acc_rv * alpha[:, None] + tl.dot(p.to(v.dtype), rv.to(v.dtype),
                                                      input_precision=DOT_PRECISION)
        m_i = m_new

    # epilogue: V's residual term once per split, (P R_v) B_v^T, then the normalised partial and its LSE
    if HAS_V_RESIDUAL:
        bv = tl.load(B_V + lora_i * stride_bv_s + (cur_kv_head * D + offs_d)[None, :] * stride_bv_row
                     + offs_r[:, None] * stride_bv_r, mask=mask_r[:, None], other=0.0)
        acc += tl.dot(acc_rv.to(bv.dtype), bv, input_precision=DOT_PRECISION) * scaling
    cur_q_head = cur_kv_head * GROUP + offs_h
    mid = (Att_Out + cur_batch.to(tl.int64) * stride_mid_b + cur_q_head[:, None] * stride_mid_h
           + split_id * stride_mid_s + offs_d[None, :])
    lse = Att_Lse + cur_batch.to(tl.int64) * stride_lse_b + cur_q_head * stride_lse_h + split_id * stride_lse_s
    store_partial(mid, lse, acc, m_i, l_i, mask_h)


@triton.jit
def _residual_decode_merge_kernel(
    Att_Out, Att_Lse, Seq_Lens, Num_Kv_Splits, Kv_Start, Cascade_Splits, O,
    stride_mid_b, stride_mid_h, stride_mid_s,
    stride_lse_b, stride_lse_h, stride_lse_s,
    stride_o_b, stride_o_h,
    D: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr, CASCADE_SPLITS: tl.constexpr,
):
    cur_batch = tl.program_id(0)
    cur_head = tl.program_id(1)
    seq_len = tl.load(Seq_Lens + cur_batch)
    offs_d = tl.arange(0, D)
    mid = Att_Out + cur_batch.to(tl.int64) * stride_mid_b + cur_head * stride_mid_h + offs_d
    lse = Att_Lse + cur_batch.to(tl.int64) * stride_lse_b + cur_head * stride_lse_h

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    kv_start = 0
    if CASCADE_SPLITS > 0:
        # the group's shared prefix, cut as the cascade kernel cut it, in split slots [0, CASCADE_SPLITS)
        kv_start = tl.load(Kv_Start + cur_batch)
        c_splits = tl.minimum(tl.maximum(tl.load(Cascade_Splits + cur_batch), 1), CASCADE_SPLITS)
        c_len = tl.cdiv(tl.cdiv(kv_start, c_splits), BLOCK_N) * BLOCK_N
        for split_id in range(0, c_splits):
            if c_len * split_id < kv_start:  # kv_start 0: no cascade part
                m_i, l_i, acc = merge_partial(m_i, l_i, acc, tl.load(lse + split_id * stride_lse_s),
                                              tl.load(mid + split_id * stride_mid_s))
    own_len = seq_len - kv_start
    kv_splits = tl.minimum(tl.maximum(tl.load(Num_Kv_Splits + cur_batch), 1), MAX_SPLITS)
    split_len = tl.cdiv(tl.cdiv(own_len, kv_splits), BLOCK_N) * BLOCK_N  # same split as stage 1
    for split_id in range(0, kv_splits):
        if split_len * split_id < own_len:  # empty splits wrote nothing
            m_i, l_i, acc = merge_partial(m_i, l_i, acc, tl.load(lse + (CASCADE_SPLITS + split_id) * stride_lse_s),
                                          tl.load(mid + (CASCADE_SPLITS + split_id) * stride_mid_s))
    o_row = O + cur_batch.to(tl.int64) * stride_o_b + cur_head * stride_o_h
    tl.store(o_row + offs_d, (acc / l_i).to(O.dtype.element_ty))


def choose_num_kv_splits(seq_lens: torch.Tensor, num_kv_heads: int, max_kv_splits: int, num_sms: int,
                         out: Optional[torch.Tensor] = None, programs_per_sm: int = PROGRAMS_PER_SM) -> torch.Tensor:
    """Per-request split counts [B] int32 for residual_decode, computed on the device (no host sync, graph-safe).

    Enough splits that B * H_kv * splits fills programs_per_sm stage-1 programs per SM, but none shorter than
    MIN_SPLIT_TOKENS keys, and at most max_kv_splits (the scratch buffers' third dim). Written into out[:B] if given.
    """
    batch = seq_lens.shape[0]
    per_request = max(1, min(max_kv_splits, math.ceil(programs_per_sm * num_sms / (batch * num_kv_heads))))
    splits = torch.clamp((seq_lens + (MIN_SPLIT_TOKENS - 1)) // MIN_SPLIT_TOKENS, 1, per_request).to(torch.int32)
    if out is None:
        return splits
    out[:batch].copy_(splits)
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_residual_inputs(q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, b_k, b_v, scaling,
                          cos_sin_cache, o):
    """Shared launcher checks for residual_decode / residual_extend; returns (H_kv, D, R_MAX, ROT_DIM)."""
    _check(q.dim() == 3 and k_buffer.dim() == 3 and v_buffer.dim() == 3,
           f"q, k_buffer, v_buffer must be 3-D, got {tuple(q.shape)}, {tuple(k_buffer.shape)}, {tuple(v_buffer.shape)}")
    _, h_kv, d = k_buffer.shape
    _, h_q, d_q = q.shape
    _check(tuple(v_buffer.shape[1:]) == (h_kv, d) and d_q == d,
           f"head dims differ: q {tuple(q.shape)}, k_buffer {tuple(k_buffer.shape)}, v_buffer {tuple(v_buffer.shape)}")
    _check(d >= 16 and d & (d - 1) == 0, f"head dim D must be a power of two >= 16, got {d}")
    _check(h_q % h_kv == 0, f"H_q ({h_q}) must be a multiple of H_kv ({h_kv})")
    dtype = k_buffer.dtype
    _check(dtype in (torch.float16, torch.bfloat16, torch.float32),
           f"KV pool dtype must be fp16/bf16/fp32, got {dtype}")
    for name, t in (("q", q), ("v_buffer", v_buffer), ("o", o)):
        _check(t.dtype == dtype, f"{name} dtype {t.dtype} differs from k_buffer's {dtype}")
    _check(r_buffer.dtype in (torch.float16, torch.bfloat16, torch.float32),
           f"r_buffer dtype must be fp16/bf16/fp32, got {r_buffer.dtype}")
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("r_buffer", r_buffer), ("o", o),
                    ("req_to_token", req_to_token), ("req_to_residual", req_to_residual),
                    ("cos_sin_cache", cos_sin_cache)):
        _check(t.stride(-1) == 1, f"{name} must have a contiguous last dim, got strides {t.stride()}")
    _check(o.shape == q.shape, f"o shape {tuple(o.shape)} must equal q shape {tuple(q.shape)}")
    _check(r_buffer.dim() == 2 and r_buffer.shape[1] % 2 == 0,
           f"r_buffer must be [slots, 2 * R_MAX], got {tuple(r_buffer.shape)}")
    r_max = r_buffer.shape[1] // 2
    _check(1 <= r_max <= 128, f"R_MAX must be in [1, 128], got {r_max}")
    for name, b in (("b_k", b_k), ("b_v", b_v)):
        if b is not None:
            _check(b.dim() == 3 and b.shape[1] == h_kv * d and b.shape[2] == r_max,
                   f"{name} must be [S, H_kv * D = {h_kv * d}, R_MAX = {r_max}], got {tuple(b.shape)}")
            _check(b.dtype == dtype, f"{name} dtype {b.dtype} differs from the pool's {dtype}")
            _check(b.shape[0] == scaling.shape[0], f"{name} has {b.shape[0]} slots, scaling {scaling.shape[0]}")
    _check(scaling.dtype == torch.float32 and scaling.dim() == 1,
           f"scaling must be 1-D float32, got {scaling.dtype} {tuple(scaling.shape)}")
    for name, t in (("req_to_token", req_to_token), ("req_to_residual", req_to_residual)):
        _check(t.dtype == torch.int32 and t.dim() == 2, f"{name} must be 2-D int32, got {t.dtype} {tuple(t.shape)}")
    rot_dim = cos_sin_cache.shape[1]
    _check(cos_sin_cache.dim() == 2 and rot_dim % 2 == 0 and 2 <= rot_dim <= d,
           f"cos_sin_cache must be [max_pos, ROT_DIM], ROT_DIM even and <= D = {d}, got {tuple(cos_sin_cache.shape)}")
    return h_kv, d, r_max, rot_dim


def residual_block_r(r_max: int) -> int:
    """Residual tile width: R_MAX padded to a power of two, at least 32 (Triton 3.6 on sm_90 gives a dot with 16
    output columns a layout that costs ~100 extra registers in decode and miscompiles it at 8 warps in extend)."""
    return max(32, triton.next_power_of_2(r_max))


def residual_block_rk(r_max: int) -> int:
    """K's residual tile width: the reduction dim of B_k R_k, R_MAX padded to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(r_max))


def check_block_n(block_n: int, b_v: Optional[torch.Tensor]) -> None:
    """Key tiles of 64 or more with the V residual on gave wrong results or faults on an H100 (Triton 3.6), in
    extend at 4 and 8 warps; 16 and 32 were right in every configuration tried (bench/RESULTS.md, Kernels)."""
    _check(block_n in (16, 32) or (b_v is None and block_n in (64, 128)),
           f"block_n must be 16 or 32 with a V residual (64/128 only without), got {block_n}")


def tensor_or_placeholder(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """An optional kernel operand: a pointer argument still needs a tensor when its HAS_* flag compiles it out
    (it is never read then)."""
    return t if t is not None else like.new_empty((1, 1, 1))


def rope_blocks(d: int, rot_dim: int):
    """(ROT_HALF, BLOCK_HALF, BLOCK_PASS): the two rotated half-tiles and the pass-through tile, padded for tl.dot."""
    rot_half = rot_dim // 2
    passthrough = d - rot_dim
    return rot_half, max(16, triton.next_power_of_2(rot_half)), (max(16, triton.next_power_of_2(passthrough))
                                                                 if passthrough else 0)


def residual_decode(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, r_buffer: torch.Tensor,
    req_to_token: torch.Tensor, req_to_residual: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, lora_slot: torch.Tensor,
    b_k: Optional[torch.Tensor], b_v: Optional[torch.Tensor], scaling: torch.Tensor,
    cos_sin_cache: torch.Tensor, is_neox: bool, sm_scale: float,
    o: torch.Tensor, attn_logits: torch.Tensor, attn_lse: torch.Tensor, num_kv_splits: torch.Tensor,
    block_n: int = 32, num_warps: int = 4, num_stages: int = 3, cascade=None, block_rk: Optional[int] = None,
) -> torch.Tensor:
    """Decode attention over rebuilt per-adapter K/V (module docstring); writes and returns o [B, H_q, D].

    cascade: a residual_cascade.CascadePlan: each group's shared prefix is read once by the cascade kernel into
    split slots [0, cascade.max_splits) and each request's own keys [kv_start, seq_len) into the slots after them
    (so attn_logits / attn_lse hold cascade.max_splits + the own-part splits); num_kv_splits then counts the own
    part's splits (choose_num_kv_splits over seq_lens - kv_start)."""
    h_kv, d, r_max, rot_dim = check_residual_inputs(
        q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, b_k, b_v, scaling, cos_sin_cache, o)
    batch, h_q, _ = q.shape
    for name, t in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens), ("lora_slot", lora_slot)):
        _check(t.dtype == torch.int32 and t.shape == (batch,), f"{name} must be int32 [{batch}], got {t.dtype} "
               f"{tuple(t.shape)}")
    _check(num_kv_splits.dtype == torch.int32 and num_kv_splits.shape[0] >= batch,
           f"num_kv_splits must be int32 [>= {batch}], got {num_kv_splits.dtype} {tuple(num_kv_splits.shape)}")
    _check(attn_logits.dtype == torch.float32 and attn_logits.dim() == 4 and attn_logits.shape[0] >= batch
           and attn_logits.shape[1] == h_q and attn_logits.shape[3] == d and attn_logits.stride(3) == 1,
           f"attn_logits must be float32 [>= {batch}, {h_q}, MAX_SPLITS, {d}], got {attn_logits.dtype} "
           f"{tuple(attn_logits.shape)}")
    max_splits = attn_logits.shape[2]
    c_splits = cascade.max_splits if cascade is not None else 0
    _check(max_splits > c_splits, f"attn_logits holds {max_splits} splits, the cascade alone takes {c_splits}")
    _check(attn_lse.dtype == torch.float32 and attn_lse.dim() == 3 and attn_lse.shape[0] >= batch
           and tuple(attn_lse.shape[1:]) == (h_q, max_splits),
           f"attn_lse must be float32 [>= {batch}, {h_q}, {max_splits}], got {attn_lse.dtype} {tuple(attn_lse.shape)}")

    check_block_n(block_n, b_v)
    group = h_q // h_kv
    rot_half, block_half, block_pass = rope_blocks(d, rot_dim)
    b_k_arg, b_v_arg = tensor_or_placeholder(b_k, r_buffer), tensor_or_placeholder(b_v, r_buffer)
    if cascade is not None:
        from .residual_cascade import residual_cascade  # imports this module's helpers

        residual_cascade(q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, req_pool_indices, lora_slot,
                         b_k, b_v, scaling, cos_sin_cache, is_neox, sm_scale, cascade, attn_logits, attn_lse,
                         h_kv, d, r_max, rot_dim, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                         block_rk=block_rk)
    own_logits, own_lse = attn_logits[:, :, c_splits:], attn_lse[:, :, c_splits:]
    kv_start = cascade.kv_start if cascade is not None else seq_lens
    _residual_decode_kernel[(batch, h_kv, max_splits - c_splits)](
        q, k_buffer, v_buffer, r_buffer,
        req_to_token, req_to_residual, req_pool_indices, seq_lens, kv_start, lora_slot,
        b_k_arg, b_v_arg, scaling, cos_sin_cache, num_kv_splits,
        own_logits, own_lse,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        r_buffer.stride(0),
        req_to_token.stride(0), req_to_residual.stride(0),
        b_k_arg.stride(0), b_k_arg.stride(1), b_k_arg.stride(2),
        b_v_arg.stride(0), b_v_arg.stride(1), b_v_arg.stride(2),
        cos_sin_cache.stride(0),
        attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
        attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2),
        GROUP=group, D=d, ROT_HALF=rot_half, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        R_MAX=r_max, BLOCK_R=residual_block_r(r_max), BLOCK_RK=block_rk or residual_block_rk(r_max),
        MAX_SPLITS=max_splits - c_splits,
        IS_NEOX=bool(is_neox), HAS_K_RESIDUAL=b_k is not None, HAS_V_RESIDUAL=b_v is not None,
        HAS_RESIDUAL=b_k is not None or b_v is not None,
        BLOCK_N=block_n, BLOCK_H=max(16, triton.next_power_of_2(group)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_START=cascade is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    _residual_decode_merge_kernel[(batch, h_q)](
        attn_logits, attn_lse, seq_lens, num_kv_splits, kv_start,
        cascade.splits if cascade is not None else num_kv_splits, o,
        attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
        attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2),
        o.stride(0), o.stride(1),
        D=d, BLOCK_N=block_n, MAX_SPLITS=max_splits - c_splits, CASCADE_SPLITS=c_splits,
        num_warps=4, num_stages=2,
    )
    return o
