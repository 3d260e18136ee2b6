"""Cascade decode (kernels/residual_cascade.py): the grouping plan and the kernel against the float64 reference.

Cases are test_kernels.make_case batches whose requests are then made to share base slots over a prefix, the way
forked agents share the tree's base nodes; residual slots stay per request. The reference knows nothing of the
sharing (it rebuilds each request's K/V from its own table rows), so the cascade must give the same output as
plain decode. Float32 under the CPU interpreter; bf16 too on the GPU.
"""

import pytest
import torch

from test_kernels import DEVICE, TOL, make_case, needs_cuda, rel_err, residual_decode, residual_decode_ref

try:
    from sglang_forkkv.kernels.residual_cascade import CascadePlan, plan_cascade
    from sglang_forkkv.kernels.residual_decode import choose_num_kv_splits
except ImportError:
    from kernels.residual_cascade import CascadePlan, plan_cascade
    from kernels.residual_decode import choose_num_kv_splits


def share(case, groups):
    """groups: (leader batch index, [(member batch index, shared length)]): each member's first shared-length base
    slots become the leader's (its residual slots stay its own)."""
    rtt, rows = case["req_to_token"], case["req_pool_indices"].long()
    for lead, members in groups:
        for b, n in members:
            rtt[rows[b], :n] = rtt[rows[lead], :n]
    return case


# 7 requests: 0, 2, 6, 5 share base slot 0 (one group under 0 in batch order 0, 2, 5, 6); 1 and 3 share 20 keys;
# 4 alone. With 2 agents per program: {0, 2} share 40 keys, {5, 6} only 3 (under min_prefix): not cascaded.
SEQ = [50, 30, 45, 26, 33, 60, 41]
LORA = [0, 1, -1, 1, 0, 1, 0]
GROUPS = [(0, [(2, 40), (5, 48), (6, 3)]), (1, [(3, 20)])]


def plan_for(case, agents, num_real=None, width=None):
    return plan_cascade(case["req_to_token"], case["req_pool_indices"], case["seq_lens"], agents,
                        num_kv_heads=case["k_buffer"].shape[1], num_sms=4, min_prefix=8, num_real=num_real,
                        width=width)


def test_plan_groups_by_shared_prefix():
    case = share(make_case(11, 4, 2, 64, 64, True, SEQ, LORA, [4, 16], 16), GROUPS)
    plan = plan_for(case, agents=2)
    assert plan.kv_start.tolist() == [40, 20, 40, 20, 0, 0, 0]
    members = plan.members.tolist()
    assert members[0] == [0, 2] and members[1] == [1, 3]
    assert all(row == [-1, -1] for i, row in enumerate(members) if i not in (0, 1))

    plan = plan_for(case, agents=4)  # one group of four: 6 shares 3 keys, below min_prefix: no cascade for it
    assert plan.kv_start.tolist() == [0, 20, 0, 20, 0, 0, 0]
    plan = plan_for(case, agents=4, width=64)  # a width past the rows' lengths changes nothing
    assert plan.kv_start.tolist() == [0, 20, 0, 20, 0, 0, 0]

    share(case, [(0, [(6, 41)])])  # now 6 shares all but its last key: the group of four shares min(40, 48, 40)
    plan = plan_for(case, agents=4)
    assert plan.kv_start.tolist() == [40, 20, 40, 20, 0, 40, 40]
    assert plan.members.tolist()[0] == [0, 2, 5, 6]
    # rows from 3 on are CUDA-graph padding: they never join, so 1's group loses 3 and 0's keeps only 2
    plan = plan_for(case, agents=4, num_real=3)
    assert plan.kv_start.tolist() == [40, 0, 40, 0, 0, 0, 0]
    assert plan.splits.min().item() >= 1


def run_cascade(case, plan, max_own_splits=3, block_n=16):
    batch, h_q, d = case["q"].shape
    total = plan.max_splits + max_own_splits
    o = torch.full_like(case["q"], float("nan"))
    logits = torch.full((batch, h_q, total, d), float("nan"), device=DEVICE)
    lse = torch.full((batch, h_q, total), float("nan"), device=DEVICE)
    own = choose_num_kv_splits(case["seq_lens"] - plan.kv_start, case["k_buffer"].shape[1], max_own_splits, 4)
    residual_decode(**case, o=o, attn_logits=logits, attn_lse=lse, num_kv_splits=own, block_n=block_n,
                    cascade=plan)
    assert not o.isnan().any(), "some output element was never written"
    return o


@pytest.mark.parametrize("shape,agents", [((4, 2, 64, 64, True), 2), ((8, 2, 128, 128, False), 4),
                                          ((9, 3, 64, 64, True), 4)])
def test_cascade_decode_fp32(shape, agents):
    """Mixed adapters (ranks 4 and 16, no adapter) inside groups, a group cut into subgroups, a request alone."""
    case = share(make_case(12, *shape, SEQ, LORA, [4, 16], 16), GROUPS + [(0, [(6, 40)])])
    plan = plan_for(case, agents)
    assert (plan.kv_start > 0).sum() >= 4, "the case must actually cascade"
    plan.max_splits = 3  # fewer, shorter cascade splits than the default: more than one split per group prefix
    plan.splits.fill_(2)
    ref = residual_decode_ref(**case)
    assert rel_err(run_cascade(case, plan), ref) < TOL[torch.float32]


@pytest.mark.parametrize("k_lora,v_lora", [(False, True), (True, False), (False, False)])
def test_cascade_decode_partial_lora(k_lora, v_lora):
    case = share(make_case(13, 4, 2, 64, 64, True, SEQ, LORA, [4, 16], 16, k_lora=k_lora, v_lora=v_lora),
                 GROUPS)
    plan = plan_for(case, agents=2)
    assert rel_err(run_cascade(case, plan), residual_decode_ref(**case)) < TOL[torch.float32]


def test_cascade_reads_each_members_residual():
    """Swapping two members' adapters changes the cascade output exactly as it changes the reference."""
    case = share(make_case(14, 4, 2, 64, 64, True, SEQ, LORA, [4, 16], 16), GROUPS + [(0, [(6, 40)])])
    plan = plan_for(case, agents=4)
    assert plan.members.tolist()[0] == [0, 2, 5, 6]
    swapped = dict(case, lora_slot=case["lora_slot"].clone())  # 0 and 5: both have residual rows
    swapped["lora_slot"][0], swapped["lora_slot"][5] = 1, 0
    out, out_swapped = run_cascade(case, plan), run_cascade(swapped, plan)
    ref, ref_swapped = residual_decode_ref(**case), residual_decode_ref(**swapped)
    assert rel_err(out_swapped, ref_swapped) < TOL[torch.float32]
    assert rel_err(ref_swapped, ref) > 50 * TOL[torch.float32]  # the swap must matter


def test_cascade_rejects_partial_rotary():
    case = share(make_case(15, 4, 2, 64, 32, True, SEQ, LORA, [4, 16], 16), GROUPS)
    with pytest.raises(ValueError, match="full rotary"):
        run_cascade(case, plan_for(case, agents=2))


def test_plan_out_buffers_are_reused():
    """A CUDA-graph plan is written in place into preallocated buffers of a larger batch."""
    case = share(make_case(16, 4, 2, 64, 64, True, SEQ, LORA, [4, 16], 16), GROUPS)
    out = CascadePlan.empty(16, 2, DEVICE)
    addr = out.members.data_ptr()
    plan = plan_cascade(case["req_to_token"], case["req_pool_indices"], case["seq_lens"], 2, 2, 4, min_prefix=8,
                        out=out)
    assert plan.members.data_ptr() == addr and out.kv_start[:7].tolist() == [40, 20, 40, 20, 0, 0, 0]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cascade_decode_half_cuda(dtype):
    """Llama-8B heads, 8 agents over a 3000-key prefix in subgroups of 4, plus two requests alone."""
    seq = [3000 + 17 * i for i in range(8)] + [700, 2500]
    lora = [i % 4 for i in range(8)] + [-1, 2]
    case = make_case(17, 32, 8, 128, 128, True, seq, lora, [16, 8, 16, 4], 16, dtype=dtype)
    share(case, [(0, [(i, 2990) for i in range(1, 8)])])
    plan = plan_cascade(case["req_to_token"], case["req_pool_indices"], case["seq_lens"], 4, 8, 132)
    assert plan.kv_start.tolist() == [2990] * 8 + [0, 0]
    o = run_cascade(case, plan, max_own_splits=8, block_n=32)
    assert rel_err(o, residual_decode_ref(**case)) < TOL[dtype]


def test_cascade_bench_smoke(tmp_path):
    """bench/cascade.py end to end on tiny fp32 shapes (interpreter on the CPU): it checks every configuration
    against the float64 reference and exits non-zero on a failure; no timing is asserted."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "cascade.md"
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "cascade.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "correctness: PASS" in text and "| 2 | 2 | 4 |" in text
