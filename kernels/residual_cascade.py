"""Cascade decode: agents that share a base prefix read each base K/V tile once, for all of them (issue 8, step 2).

Forked agents of one workflow hold the same base slots for their shared context (the DualRadixTree's base nodes)
and differ only in their residuals and their own suffix. Plain ResidualAttention decode reads the shared base once
per agent; here one program serves up to AGENTS agents of a group over the shared prefix:

    rows      r = a * GROUP + h: agent a of the group, query head h of this KV head (ROWS = AGENTS * GROUP, >= 16)
    scores    S = Q K_base^T  +  sum_a [rows of a] Q RoPE(s_a R_k,a B_k,a)^T     one base tile, AGENTS residual tiles
    values    P V_base  +  sum_a [rows of a] (P R_v,a) s_a B_v,a                  B_v once per split, as in decode

so the base bytes are read once per group, not once per agent, while the reconstruction work per agent is what
plain decode does (a plain decode program already pads its GROUP query heads to 16 rows: up to 16 / GROUP agents
ride in those rows for free). Each program writes normalised partials and LSEs for its split of the shared prefix
[0, kv_start) into the first MAX_CASCADE_SPLITS split slots of each member's scratch; residual_decode then covers
each request's own keys [kv_start, seq_len) and merges both (residual_decode.py, `cascade=`).

Groups are found on the device (`plan_cascade`), with no host sync, so the plan can be refreshed before a CUDA-graph
replay: two requests share keys [0, p) exactly when their base slots agree up to p, because a tree-owned slot has one
path from the root and a request's own slots are never in another's row.

Not supported: partial rotary (ROT_DIM < D), and everything residual_decode does not support.
"""

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from .residual_decode import (LOG2E, MIN_SPLIT_TOKENS, PROGRAMS_PER_SM, check_block_n, residual_block_r,
                              residual_block_rk, rope_blocks, rope_pair_dims, softmax_tile, store_partial,
                              tensor_or_placeholder)

MIN_CASCADE_PREFIX = 256  # a shorter shared prefix saves less than its extra partials and merge cost
MAX_CASCADE_SPLITS = 32  # splits of a group's prefix at most: 32K keys / 32 = 1K keys a program


@dataclasses.dataclass
class CascadePlan:
    """Which requests of a decode batch share a base prefix, as the kernels read it (all on the device).

    members [B, AGENTS] int32: row g lists the batch indices of the group whose first member is g (-1 pads);
        rows of requests that lead no group are all -1.
    kv_start [B] int32: request b's keys [0, kv_start[b]) are its group's shared prefix (0: not in a group).
    splits [B] int32: how many splits its group's prefix is cut into (the same for every member).
    """

    members: torch.Tensor
    kv_start: torch.Tensor
    splits: torch.Tensor
    max_splits: int = MAX_CASCADE_SPLITS

    @property
    def agents(self) -> int:
        return self.members.shape[1]

    @classmethod
    def empty(cls, max_bs: int, agents: int, device) -> "CascadePlan":
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.full((max_bs, agents), -1, **i32), torch.zeros(max_bs, **i32), torch.ones(max_bs, **i32))

    def view(self, bs: int) -> "CascadePlan":
        return CascadePlan(self.members[:bs], self.kv_start[:bs], self.splits[:bs], self.max_splits)


def plan_cascade(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, agents: int,
                 num_kv_heads: int, num_sms: int, width: Optional[int] = None, num_real: Optional[int] = None,
                 min_prefix: int = MIN_CASCADE_PREFIX, max_splits: int = MAX_CASCADE_SPLITS,
                 out: Optional[CascadePlan] = None) -> CascadePlan:
    """Group a decode batch by shared base prefix, on the device (torch ops on [B, B] and [B, width] only).

    Requests whose base slot at position 0 agrees form a group under its first member; each member's shared length
    with that leader is where their slots first differ. A group of more than `agents` members is cut into subgroups
    of `agents` in batch order; a subgroup shares the smallest of its members' lengths. Subgroups of one request, or
    sharing fewer than min_prefix keys, are not cascaded. width: the longest seq_len if the caller knows it (bounds
    the row comparison); num_real: rows past it are CUDA-graph padding and never join a group.
    Written into `out` (a CascadePlan of at least B rows) when given.
    """
    batch = seq_lens.shape[0]
    device = seq_lens.device
    idx = torch.arange(batch, device=device)
    lens = seq_lens.to(torch.int64)
    rows = req_pool_indices.to(torch.int64)
    eligible = lens > min_prefix
    if num_real is not None:
        eligible &= idx < num_real
    width = req_to_token.shape[1] if width is None else min(width, req_to_token.shape[1])

    first = req_to_token[rows, 0]
    same = (first[:, None] == first[None, :]) & eligible[:, None] & eligible[None, :]
    same |= torch.eye(batch, dtype=torch.bool, device=device)
    leader = same.int().argmax(1)  # argmax returns the first maximum: the group's lowest batch index
    tok = req_to_token[rows, :width]
    min_len = torch.minimum(lens, lens[leader])
    # the last key of each request is its own new token: the shared part ends before it at the latest
    stop = (tok != tok[leader]) | (torch.arange(width, device=device)[None, :] >= (min_len - 1)[:, None])
    shared = stop.int().argmax(1)

    same_leader = leader[:, None] == leader[None, :]
    order = (same_leader & (idx[None, :] < idx[:, None])).sum(1)
    first_of_sub = (order // agents) * agents
    sub = (same_leader & (order[None, :] == first_of_sub[:, None])).int().argmax(1)
    big = torch.iinfo(torch.int64).max
    # a leader's own "shared" length is its full length: only the other members bound the group's prefix
    bound = torch.where(leader == idx, big, shared)
    prefix = torch.full((batch,), big, dtype=torch.int64, device=device).scatter_reduce(0, sub, bound, "amin")
    size = torch.zeros(batch, dtype=torch.int64, device=device).scatter_add_(0, sub, torch.ones_like(sub))
    prefix = torch.where((size >= 2) & (prefix >= min_prefix) & (prefix < big), prefix, 0)
    kv_start = prefix[sub]

    members = torch.full((batch * agents + 1,), -1, dtype=torch.int64, device=device)
    target = torch.where(kv_start > 0, sub * agents + order % agents, batch * agents)  # the extra slot: discarded
    members.scatter_(0, target, idx)
    members = members[: batch * agents].view(batch, agents)

    groups = ((sub == idx) & (kv_start > 0)).sum().clamp(min=1)
    programs = groups * num_kv_heads
    per_group = ((PROGRAMS_PER_SM * num_sms + programs - 1) // programs).clamp(1, max_splits)
    splits = torch.minimum(((kv_start + MIN_SPLIT_TOKENS - 1) // MIN_SPLIT_TOKENS).clamp(min=1), per_group)

    plan = out.view(batch) if out is not None else CascadePlan.empty(batch, agents, device)
    if plan.agents != agents or plan.max_splits != max_splits:
        raise ValueError(f"out holds {plan.agents} agents and {plan.max_splits} splits, "
                         f"asked {agents} and {max_splits}")
    plan.members.copy_(members)
    plan.kv_start.copy_(kv_start)
    plan.splits.copy_(splits)
    return plan


@triton.jit
def member_lora(members, a, Lora_Slot):
    """Batch index of a group's a-th member and its LoRA slot (-1: no such member, or no adapter)."""
    m_a = tl.load(members + a)
    return m_a, tl.load(Lora_Slot + tl.maximum(m_a, 0), mask=m_a >= 0, other=-1)


@triton.jit
def _residual_cascade_kernel(
    Q, K_Buffer, V_Buffer, R_Buffer,
    Req_To_Token, Req_To_Residual, Req_Pool_Indices, Lora_Slot,
    Members, Kv_Start, Cascade_Splits,
    B_K, B_V, Scaling, Cos_Sin,
    Att_Out, Att_Lse,
    sm_scale_log2,
    stride_q_b, stride_q_h,
    stride_k_slot, stride_k_h,
    stride_v_slot, stride_v_h,
    stride_r_slot,
    stride_rtt_req, stride_rtr_req,
    stride_mem,
    stride_bk_s, stride_bk_row, stride_bk_r,
    stride_bv_s, stride_bv_row, stride_bv_r,
    stride_cs_pos,
    stride_mid_b, stride_mid_h, stride_mid_s,
    stride_lse_b, stride_lse_h, stride_lse_s,
    GROUP: tl.constexpr, D: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    R_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RK: tl.constexpr, MAX_SPLITS: tl.constexpr,
    AGENTS: tl.constexpr, ROWS: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_K_RESIDUAL: tl.constexpr, HAS_V_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    group_row = tl.program_id(0)
    cur_kv_head = tl.program_id(1)
    split_id = tl.program_id(2)

    members = Members + group_row.to(tl.int64) * stride_mem
    lead = tl.load(members)
    if lead < 0:
        return
    prefix = tl.load(Kv_Start + lead)
    splits = tl.minimum(tl.maximum(tl.load(Cascade_Splits + lead), 1), MAX_SPLITS)
    split_len = tl.cdiv(tl.cdiv(prefix, splits), BLOCK_N) * BLOCK_N
    split_start = split_len * split_id
    split_end = tl.minimum(split_start + split_len, prefix)
    if split_end <= split_start:
        return
    lead_req = tl.load(Req_Pool_Indices + lead).to(tl.int64)  # the shared prefix's base slots: any member's row

    offs_row = tl.arange(0, ROWS)
    row_agent = offs_row // GROUP
    row_head = cur_kv_head * GROUP + offs_row % GROUP
    member = tl.load(members + row_agent, mask=row_agent < AGENTS, other=-1)
    row_ok = member >= 0
    member_i = tl.maximum(member, 0).to(tl.int64)
    q_row = Q + member_i[:, None] * stride_q_b + row_head[:, None] * stride_q_h
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R_MAX
    offs_rk = tl.arange(0, BLOCK_RK)
    mask_rk = offs_rk < R_MAX
    k_head = K_Buffer + cur_kv_head * stride_k_h
    v_head = V_Buffer + cur_kv_head * stride_v_h

    if HAS_K_RESIDUAL:
        offs_half, mask_half, idx_a, idx_b = rope_pair_dims(BLOCK_HALF, ROT_HALF, IS_NEOX)
        q_a = tl.load(q_row + idx_a[None, :], mask=row_ok[:, None] & mask_half[None, :], other=0.0)
        q_b = tl.load(q_row + idx_b[None, :], mask=row_ok[:, None] & mask_half[None, :], other=0.0)
    else:
        q = tl.load(q_row + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    acc_rv = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)

    for start_n in range(split_start, split_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        kv_loc = tl.load(Req_To_Token + lead_req * stride_rtt_req + offs_n, mask=mask_n, other=0).to(tl.int64)

        # scores: the base tile once for every row, then each agent's rotated residual keys on its own rows
        if HAS_K_RESIDUAL:
            mask_rot = mask_half[:, None] & mask_n[None, :]
            k_a = tl.load(k_head + kv_loc[None, :] * stride_k_slot + idx_a[:, None], mask=mask_rot, other=0.0)
            k_b = tl.load(k_head + kv_loc[None, :] * stride_k_slot + idx_b[:, None], mask=mask_rot, other=0.0)
            qk = tl.dot(q_a, k_a, input_precision=DOT_PRECISION)
            qk += tl.dot(q_b, k_b, input_precision=DOT_PRECISION)
            cs_row = Cos_Sin + offs_n[None, :] * stride_cs_pos
            cos = tl.load(cs_row + offs_half[:, None], mask=mask_rot, other=0.0).to(tl.float32)
            sin = tl.load(cs_row + ROT_HALF + offs_half[:, None], mask=mask_rot, other=0.0).to(tl.float32)
            for a in tl.static_range(AGENTS):
                m_a, lora_a = member_lora(members, a, Lora_Slot)
                if lora_a >= 0:
                    lora_ai = lora_a.to(tl.int64)
                    req_a = tl.load(Req_Pool_Indices + m_a).to(tl.int64)
                    res_loc = tl.load(Req_To_Residual + req_a * stride_rtr_req + offs_n, mask=mask_n, other=0)
                    rk = tl.load(R_Buffer + res_loc.to(tl.int64)[None, :] * stride_r_slot + offs_rk[:, None],
                                 mask=mask_rk[:, None] & mask_n[None, :], other=0.0).to(q_a.dtype)
                    bk_head = (B_K + lora_ai * stride_bk_s + (cur_kv_head * D) * stride_bk_row
                               + offs_rk[None, :] * stride_bk_r)
                    bk_a = tl.load(bk_head + idx_a[:, None] * stride_bk_row,
                                   mask=mask_half[:, None] & mask_rk[None, :], other=0.0)
                    bk_b = tl.load(bk_head + idx_b[:, None] * stride_bk_row,
                                   mask=mask_half[:, None] & mask_rk[None, :], other=0.0)
                    d_a = tl.dot(bk_a, rk, input_precision=DOT_PRECISION)
                    d_b = tl.dot(bk_b, rk, input_precision=DOT_PRECISION)
                    scale_a = tl.load(Scaling + lora_ai)
                    kr_a = ((d_a * cos - d_b * sin) * scale_a).to(q_a.dtype)
                    kr_b = ((d_b * cos + d_a * sin) * scale_a).to(q_b.dtype)
                    mine = (row_agent == a)[:, None]
                    qk += tl.dot(tl.where(mine, q_a, 0.0).to(q_a.dtype), kr_a, input_precision=DOT_PRECISION)
                    qk += tl.dot(tl.where(mine, q_b, 0.0).to(q_b.dtype), kr_b, input_precision=DOT_PRECISION)
        else:
            k = tl.load(k_head + kv_loc[None, :] * stride_k_slot + offs_d[:, None], mask=mask_n[None, :], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(mask_n[None, :], qk * sm_scale_log2, float("-inf"))

        # online softmax per row; each agent's P R_v rides on its own rows beside the shared P V_base
        m_new, alpha, p, l_i = softmax_tile(qk, m_i, l_i)
        v = tl.load(v_head + kv_loc[:, None] * stride_v_slot + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        p_lo = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p_lo, v, input_precision=DOT_PRECISION)
        if HAS_V_RESIDUAL:
            acc_rv = acc_rv * alpha[:, None]
            for a in tl.static_range(AGENTS):
                m_a, lora_a = member_lora(members, a, Lora_Slot)
                if lora_a >= 0:
                    req_a = tl.load(Req_Pool_Indices + m_a).to(tl.int64)
                    res_loc = tl.load(Req_To_Residual + req_a * stride_rtr_req + offs_n, mask=mask_n, other=0)
                    rv = tl.load(R_Buffer + res_loc.to(tl.int64)[:, None] * stride_r_slot + R_MAX + offs_r[None, :],
                                 mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(v.dtype)
                    mine = (row_agent == a)[:, None]
                    acc_rv += tl.dot(tl.where(mine, p_lo, 0.0).to(v.dtype), rv, input_precision=DOT_PRECISION)
        m_i = m_new

    # epilogue: each agent's (P R_v) s B_v^T on its rows, then every member's normalised partial and LSE
    if HAS_V_RESIDUAL:
        for a in tl.static_range(AGENTS):
            m_a, lora_a = member_lora(members, a, Lora_Slot)
            if lora_a >= 0:
                lora_ai = lora_a.to(tl.int64)
                bv = tl.load(B_V + lora_ai * stride_bv_s + (cur_kv_head * D + offs_d)[None, :] * stride_bv_row
                             + offs_r[:, None] * stride_bv_r, mask=mask_r[:, None], other=0.0)
                mine = (row_agent == a)[:, None]
                part = tl.where(mine, acc_rv * tl.load(Scaling + lora_ai), 0.0).to(bv.dtype)
                acc += tl.dot(part, bv, input_precision=DOT_PRECISION)
    mid = (Att_Out + member_i[:, None] * stride_mid_b + row_head[:, None] * stride_mid_h + split_id * stride_mid_s
           + offs_d[None, :])
    lse = Att_Lse + member_i * stride_lse_b + row_head * stride_lse_h + split_id * stride_lse_s
    store_partial(mid, lse, acc, m_i, l_i, row_ok)


def residual_cascade(q, k_buffer, v_buffer, r_buffer, req_to_token, req_to_residual, req_pool_indices, lora_slot,
                     b_k, b_v, scaling, cos_sin_cache, is_neox, sm_scale, plan: CascadePlan, attn_logits, attn_lse,
                     h_kv, d, r_max, rot_dim, block_n=32, num_warps=4, num_stages=2, block_rk=None):
    """Stage 1 over each group's shared prefix, into split slots [0, plan.max_splits) of the members' scratch.
    Called by residual_decode (which checks the common arguments) when given a plan."""
    if rot_dim != d:
        raise ValueError(f"cascade decode needs full rotary (ROT_DIM == D), got ROT_DIM {rot_dim}, D {d}")
    batch, h_q, _ = q.shape
    if plan.members.shape[0] < batch or plan.members.dtype != torch.int32 or plan.kv_start.dtype != torch.int32:
        raise ValueError(f"cascade plan must be int32 with >= {batch} rows, got members {plan.members.dtype} "
                         f"{tuple(plan.members.shape)}, kv_start {plan.kv_start.dtype}")
    check_block_n(block_n, b_v)
    group = h_q // h_kv
    rot_half, block_half, _ = rope_blocks(d, rot_dim)
    b_k_arg, b_v_arg = tensor_or_placeholder(b_k, r_buffer), tensor_or_placeholder(b_v, r_buffer)
    rows = max(16, triton.next_power_of_2(plan.agents * group))
    _residual_cascade_kernel[(batch, h_kv, plan.max_splits)](
        q, k_buffer, v_buffer, r_buffer,
        req_to_token, req_to_residual, req_pool_indices, lora_slot,
        plan.members, plan.kv_start, plan.splits,
        b_k_arg, b_v_arg, scaling, cos_sin_cache,
        attn_logits, attn_lse,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        r_buffer.stride(0),
        req_to_token.stride(0), req_to_residual.stride(0),
        plan.members.stride(0),
        b_k_arg.stride(0), b_k_arg.stride(1), b_k_arg.stride(2),
        b_v_arg.stride(0), b_v_arg.stride(1), b_v_arg.stride(2),
        cos_sin_cache.stride(0),
        attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
        attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2),
        GROUP=group, D=d, ROT_HALF=rot_half, BLOCK_HALF=block_half,
        R_MAX=r_max, BLOCK_R=residual_block_r(r_max), BLOCK_RK=block_rk or residual_block_rk(r_max),
        MAX_SPLITS=plan.max_splits,
        AGENTS=plan.agents, ROWS=rows,
        IS_NEOX=bool(is_neox), HAS_K_RESIDUAL=b_k is not None, HAS_V_RESIDUAL=b_v is not None,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
