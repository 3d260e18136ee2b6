"""ResidualAttention kernels (kernels/residual_decode.py, residual_extend.py) against the float64 torch reference.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on small float32 cases (set below, before any kernel
module is imported). With CUDA the same cases run compiled on the GPU, plus bf16 / fp16 cases at larger shapes.

Error measure everywhere: rel_err = max|o - ref| / max|ref| over the whole output, ref in float64.
Tolerances: float32 1e-3; bf16 / fp16 1e-2. Outputs are pre-filled with NaN and must come back NaN-free.
Inputs are fresh random, non-zero draws: scattered slots (slot 0 never used), random request rows, adapters of
different ranks padded to R_MAX, requests without adapter (lora_slot -1) whose residual table rows hold garbage.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # The interpreter must be chosen before triton is first imported (its own @jit helpers are decorated then).
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set: set it in conftest.py (CPU runs)")
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from sglang_forkkv.kernels.residual_attention_ref import residual_decode_ref, residual_extend_ref
    from sglang_forkkv.kernels.residual_decode import choose_num_kv_splits, residual_decode
    from sglang_forkkv.kernels.residual_extend import residual_extend
except ImportError:  # not installed: import the repo's kernels/ directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels.residual_attention_ref import residual_decode_ref, residual_extend_ref
    from kernels.residual_decode import choose_num_kv_splits, residual_decode
    from kernels.residual_extend import residual_extend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 Triton needs the GPU (the CPU "
                                "interpreter's bf16 tl.dot is wrong)")
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_case(seed, h_q, h_kv, d, rot_dim, is_neox, seq_lens, lora_slot, ranks, r_max, dtype=torch.float32,
              k_lora=True, v_lora=True, num_queries=None):
    """Random pools, tables and adapters for one batch; returns the kernels' keyword arguments (q included).

    num_queries: per-request query count for extend (q is [sum, H_q, D]); None for decode (q is [B, H_q, D]).
    """
    g = torch.Generator().manual_seed(seed)
    batch, total = len(seq_lens), sum(seq_lens)
    num_slots, num_res = total + 9, total + 5
    max_reqs, max_ctx = batch + 3, max(seq_lens) + 7
    rows = torch.randperm(max_reqs, generator=g)[:batch]
    slots = torch.randperm(num_slots - 1, generator=g) + 1  # slot 0 is SGLang's padding slot
    res_slots = torch.randperm(num_res, generator=g)
    req_to_token = torch.zeros(max_reqs, max_ctx, dtype=torch.int32)
    req_to_residual = torch.full((max_reqs, max_ctx), 1 << 30, dtype=torch.int32)  # must never be read
    r_buffer = torch.randn(num_res, 2 * r_max, generator=g)
    off = 0
    for i, n in enumerate(seq_lens):
        req_to_token[rows[i], :n] = slots[off : off + n].int()
        if lora_slot[i] >= 0:
            mine = res_slots[off : off + n]
            req_to_residual[rows[i], :n] = mine.int()
            rank = ranks[lora_slot[i]]
            r_buffer[mine, rank:r_max] = 0  # columns past the adapter's rank are zero by contract
            r_buffer[mine, r_max + rank :] = 0
        off += n
    q_size, kv_size = h_q * d, h_kv * d
    # SGLang's qkv LoRA B buffer: [S, q + 2 kv, R_MAX]; b_k and b_v are strided views of it
    b_qkv = torch.randn(len(ranks), q_size + 2 * kv_size, r_max, generator=g) * 0.3
    for s, rank in enumerate(ranks):
        b_qkv[s, :, rank:] = 0
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2).double() / rot_dim))
    angles = torch.outer(torch.arange(max_ctx).double(), inv_freq)
    n_q = batch if num_queries is None else sum(num_queries)

    def dev(t):
        return t.to(device=DEVICE, dtype=dtype if t.is_floating_point() else t.dtype)

    b_qkv = dev(b_qkv)
    return dict(
        q=dev(torch.randn(n_q, h_q, d, generator=g)),
        k_buffer=dev(torch.randn(num_slots, h_kv, d, generator=g)),
        v_buffer=dev(torch.randn(num_slots, h_kv, d, generator=g)),
        r_buffer=dev(r_buffer),
        req_to_token=req_to_token.to(DEVICE),
        req_to_residual=req_to_residual.to(DEVICE),
        req_pool_indices=rows.int().to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        lora_slot=torch.tensor(lora_slot, dtype=torch.int32, device=DEVICE),
        b_k=b_qkv[:, q_size : q_size + kv_size] if k_lora else None,
        b_v=b_qkv[:, q_size + kv_size :] if v_lora else None,
        scaling=(torch.rand(len(ranks), generator=g) + 0.5).to(DEVICE),
        cos_sin_cache=torch.cat((angles.cos(), angles.sin()), dim=-1).float().to(DEVICE),
        is_neox=is_neox,
        sm_scale=d**-0.5,
    )


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def run_decode(case, num_kv_splits, max_splits, block_n=16):
    batch, h_q, d = case["q"].shape
    o = torch.full_like(case["q"], float("nan"))
    logits = torch.full((batch, h_q, max_splits, d), float("nan"), device=DEVICE)
    lse = torch.full((batch, h_q, max_splits), float("nan"), device=DEVICE)
    splits = torch.tensor(num_kv_splits, dtype=torch.int32, device=DEVICE)
    residual_decode(**case, o=o, attn_logits=logits, attn_lse=lse, num_kv_splits=splits, block_n=block_n)
    assert not o.isnan().any(), "some output element was never written"
    return o


def run_extend(case, extend_lens, **blocks):
    """Small tiles keep the CPU interpreter fast; on the GPU the launcher's default tiles are the ones tested."""
    if DEVICE == "cuda":
        blocks = {}
    qo_indptr = torch.tensor([0] + torch.tensor(extend_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    o = torch.full_like(case["q"], float("nan"))
    residual_extend(**case, qo_indptr=qo_indptr, o=o, max_extend_len=max(extend_lens), **blocks)
    assert not o.isnan().any(), "some output element was never written"
    return o, qo_indptr


# (h_q, h_kv, d, rot_dim, is_neox): SmolLM2 (9/3/64), GQA at D 128, partial rotary both layouts
SHAPES = [
    (9, 3, 64, 64, True),
    (4, 2, 128, 128, False),
    (9, 3, 64, 32, False),
    (4, 2, 128, 64, True),
]
# per-request lengths include 1 and lengths off the 16-key tile; lora_slot -1 mixed with adapters of rank 4 and 16
SEQ_LENS = [1, 37, 100, 20]
LORA_SLOT = [0, -1, 1, 1]
RANKS, R_MAX = [4, 16], 16


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_fp32(shape):
    case = make_case(1, *shape, SEQ_LENS, LORA_SLOT, RANKS, R_MAX)
    # splits: 1 for the 1-key request, uneven splits, and more splits than tiles (20 keys, 4 splits: 2 empty)
    o = run_decode(case, [1, 3, 4, 4], max_splits=4)
    ref = residual_decode_ref(**case)
    assert rel_err(o, ref) < TOL[torch.float32]
    # the residual must matter at this scale, or the comparison above would prove nothing
    no_res = residual_decode_ref(**{**case, "lora_slot": torch.full_like(case["lora_slot"], -1)})
    assert rel_err(no_res, ref) > 50 * TOL[torch.float32]


@pytest.mark.parametrize("k_lora,v_lora", [(False, True), (True, False), (False, False)])
def test_decode_fp32_partial_lora(k_lora, v_lora):
    """V-only (HAS_K_RESIDUAL off), K-only and no-LoRA builds of the kernel."""
    case = make_case(2, 9, 3, 64, 64, True, SEQ_LENS, LORA_SLOT, RANKS, R_MAX, k_lora=k_lora, v_lora=v_lora)
    o = run_decode(case, [1, 2, 3, 1], max_splits=3)
    assert rel_err(o, residual_decode_ref(**case)) < TOL[torch.float32]


def test_decode_fp32_rank64():
    """R_MAX 64 (the largest supported in serving), ranks 64 and 8."""
    case = make_case(3, 4, 2, 128, 128, True, [50, 17], [1, 0], [64, 8], 64)
    o = run_decode(case, [2, 1], max_splits=2)
    assert rel_err(o, residual_decode_ref(**case)) < TOL[torch.float32]


def _sdpa_base(case, q, q_pos_start, seq_len, row):
    """Plain attention of q [T, H_q, D] over base K/V of one request via torch SDPA (float64)."""
    slots = case["req_to_token"][row, :seq_len].long()
    k, v = case["k_buffer"][slots].double(), case["v_buffer"][slots].double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q_pos = torch.arange(q_pos_start, q_pos_start + q.shape[0], device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=case["sm_scale"])
    return out.transpose(0, 1)


def test_no_adapter_is_plain_attention():
    """lora_slot -1 everywhere gives plain attention over base K/V (torch SDPA), in decode and extend."""
    seq_lens, extend_lens = [33, 1, 70], [5, 1, 70]
    case = make_case(4, 4, 2, 128, 128, True, seq_lens, [-1, -1, -1], RANKS, R_MAX)
    o = run_decode(case, [2, 1, 3], max_splits=3)
    ref = torch.cat([_sdpa_base(case, case["q"][i : i + 1], n - 1, n, case["req_pool_indices"][i])
                     for i, n in enumerate(seq_lens)])
    assert rel_err(o, ref) < TOL[torch.float32]

    case = make_case(5, 4, 2, 128, 128, True, seq_lens, [-1, -1, -1], RANKS, R_MAX, num_queries=extend_lens)
    o, qo = run_extend(case, extend_lens, block_m=16, block_n=16)
    ref = torch.cat([_sdpa_base(case, case["q"][qo[i] : qo[i + 1]], n - e, n, case["req_pool_indices"][i])
                     for i, (n, e) in enumerate(zip(seq_lens, extend_lens))])
    assert rel_err(o, ref) < TOL[torch.float32]


# extend: a fresh prefill (extend = seq_len), a single new token, a chunk after a prefix not on a tile edge
EXTEND_SEQ = [23, 40, 61, 9]
EXTEND_LEN = [23, 1, 30, 9]


@pytest.mark.parametrize("shape", SHAPES)
def test_extend_fp32(shape):
    case = make_case(6, *shape, EXTEND_SEQ, LORA_SLOT, RANKS, R_MAX, num_queries=EXTEND_LEN)
    o, qo = run_extend(case, EXTEND_LEN, block_m=16, block_n=16)
    ref = residual_extend_ref(**case, qo_indptr=qo)
    assert rel_err(o, ref) < TOL[torch.float32]
    no_res = residual_extend_ref(**{**case, "lora_slot": torch.full_like(case["lora_slot"], -1)}, qo_indptr=qo)
    assert rel_err(no_res, ref) > 50 * TOL[torch.float32]


def test_extend_fp32_v_only_rank64():
    case = make_case(7, 9, 3, 64, 64, True, EXTEND_SEQ, LORA_SLOT, [64, 8], 64, k_lora=False,
                     num_queries=EXTEND_LEN)
    o, qo = run_extend(case, EXTEND_LEN, block_m=32, block_n=16)
    assert rel_err(o, residual_extend_ref(**case, qo_indptr=qo)) < TOL[torch.float32]


def test_choose_num_kv_splits():
    seq_lens = torch.tensor([1, 255, 257, 100000], dtype=torch.int32)
    splits = choose_num_kv_splits(seq_lens, num_kv_heads=8, max_kv_splits=16, num_sms=132)
    assert splits.dtype == torch.int32
    assert splits.tolist() == [1, 1, 2, 16]
    many = choose_num_kv_splits(torch.full((64,), 32768, dtype=torch.int32), 8, 16, 132)
    assert many.tolist() == [3] * 64  # 64 x 8 heads x 3 splits = 1536 programs >= 8 per SM


def test_launcher_rejects_bad_inputs():
    case = make_case(8, 4, 2, 128, 128, True, [5], [0], RANKS, R_MAX)
    batch, h_q, d = case["q"].shape
    scratch = dict(o=torch.empty_like(case["q"]), attn_logits=torch.empty(batch, h_q, 2, d, device=DEVICE),
                   attn_lse=torch.empty(batch, h_q, 2, device=DEVICE),
                   num_kv_splits=torch.ones(batch, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens"):
        residual_decode(**{**case, "seq_lens": case["seq_lens"].long()}, **scratch)
    with pytest.raises(ValueError, match="b_k"):
        residual_decode(**{**case, "b_k": case["b_k"][:, :, :8]}, **scratch)
    with pytest.raises(ValueError, match="attn_lse"):
        residual_decode(**case, **{**scratch, "attn_lse": torch.empty(batch, h_q, 3, device=DEVICE)})
    with pytest.raises(ValueError, match="cos_sin_cache"):
        residual_decode(**{**case, "cos_sin_cache": case["cos_sin_cache"][:, :3]}, **scratch)
    with pytest.raises(ValueError, match="block_n"):  # key tiles the V residual is not safe with (Triton 3.6)
        residual_decode(**case, **scratch, block_n=64)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_half_cuda(dtype, shape):
    seq_lens = [1, 300, 1029, 4096, 77]
    case = make_case(9, *shape, seq_lens, [0, -1, 1, 1, 0], RANKS, R_MAX, dtype=dtype)
    o = run_decode(case, [1, 3, 8, 16, 2], max_splits=16, block_n=32)
    assert rel_err(o, residual_decode_ref(**case)) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_extend_half_cuda(dtype, shape):
    seq_lens, extend_lens = [700, 1, 1500, 129], [700, 1, 300, 64]
    case = make_case(10, *shape, seq_lens, [1, -1, 0, 1], RANKS, R_MAX, dtype=dtype, num_queries=extend_lens)
    o, qo = run_extend(case, extend_lens)
    assert rel_err(o, residual_extend_ref(**case, qo_indptr=qo)) < TOL[dtype]
