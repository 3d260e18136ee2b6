"""DecodeGraphState (the decode CUDA-graph metadata) against the eager ForkKVPlan on the same random batches.

Runs on the CPU: the state is plain tensor code. The GPU check that graph replays give the tokens of the eager
path is bench/gpu/check_correctness.py --graphs (bench/RESULTS.md).
"""

from types import SimpleNamespace

import pytest
import torch

from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_forkkv.decode_graph import DecodeGraphState
from sglang_forkkv.plan import ForkKVPlan

MAX_REQS, MAX_CTX, LORA_SLOTS = 12, 64, 4
RANKS = {"a": 8, "b": 16, "c": 4}  # adapter -> rank; buffer slots 1..3, slot 0 holds "no adapter" (rank 0)


def fakes(gen):
    buffer_ids = {None: 0, "a": 1, "b": 2, "c": 3}
    loras = {uid: SimpleNamespace(config=SimpleNamespace(r=r), scaling=2.0) for uid, r in RANKS.items()}
    lora_manager = SimpleNamespace(memory_pool=SimpleNamespace(uid_to_buffer_id=buffer_ids), loras=loras)
    residual_pool = SimpleNamespace(
        attention_lora=True, eager_writes={},
        req_to_residual=torch.randint(1, 1000, (MAX_REQS, MAX_CTX), generator=gen, dtype=torch.int32),
        req_base_write_from=torch.zeros(MAX_REQS, dtype=torch.int64),
    )
    return lora_manager, residual_pool, buffer_ids


def lora_batch_info(lora_ids, buffer_ids, graph_rows, gen):
    """What SGLang's prepare_lora_batch leaves in the graph batch info: the real rows' slots, stale rows after."""
    weight_indices = torch.randint(0, LORA_SLOTS, (graph_rows,), generator=gen, dtype=torch.int32)  # stale
    weight_indices[: len(lora_ids)] = torch.tensor([buffer_ids[u] for u in lora_ids], dtype=torch.int32)
    ranks = torch.zeros(LORA_SLOTS, dtype=torch.int32)
    for uid, r in RANKS.items():
        ranks[buffer_ids[uid]] = r
    return SimpleNamespace(weight_indices=weight_indices, lora_ranks=ranks,
                           scalings=torch.full((LORA_SLOTS,), 2.0))


@pytest.mark.parametrize("seed", range(5))
def test_graph_state_matches_eager_plan_and_padding_writes_nothing_live(seed):
    gen = torch.Generator().manual_seed(seed)
    lora_manager, residual_pool, buffer_ids = fakes(gen)
    real = int(torch.randint(1, 7, (1,), generator=gen))
    padded = real + int(torch.randint(0, 4, (1,), generator=gen))
    choices = [None, "a", "b", "c"]
    lora_ids = [choices[int(i)] for i in torch.randint(0, 4, (real,), generator=gen)]
    rows = torch.randperm(MAX_REQS, generator=gen)[:real].to(torch.int32)
    seq_lens = torch.randint(1, MAX_CTX, (real,), generator=gen).to(torch.int64)

    eager = ForkKVPlan.build(
        SimpleNamespace(batch_size=real, lora_ids=lora_ids, req_pool_indices=rows, seq_lens=seq_lens,
                        forward_mode=ForwardMode.DECODE),
        lora_manager, residual_pool, scaling_folded=False)

    # the runner's padded view: fill values after the real rows (req row 0, seq_len 1)
    view = SimpleNamespace(
        batch_size=padded, num_padding=padded - real, forward_mode=ForwardMode.DECODE,
        req_pool_indices=torch.cat([rows, torch.zeros(padded - real, dtype=torch.int32)]),
        seq_lens=torch.cat([seq_lens, torch.ones(padded - real, dtype=torch.int64)]),
    )
    state = DecodeGraphState(16, "cpu")
    state.lora_slot.fill_(3)  # a previous step's values must not survive
    state.residual_slots.fill_(77)
    info = lora_batch_info(lora_ids, buffer_ids, 16, gen)
    state.refresh(view, info, residual_pool.req_to_residual, num_kv_heads=2, max_splits=8, num_sms=4)
    plan = state.plan(padded, residuals=True)

    assert state.lora_slot[:real].tolist() == eager.lora_slot
    assert state.token_rank[:real].tolist() == eager.token_rank.tolist()
    assert plan.positions[:real].tolist() == eager.positions.tolist()
    # the eager plan writes residuals for adapter rows only; the graph plan writes every row, the others into 0
    graph_slots = plan.residual_slots[plan.residual_rows]
    assert graph_slots[eager.residual_rows].tolist() == eager.residual_slots.tolist()
    no_residual = torch.ones(padded, dtype=torch.bool)
    no_residual[eager.residual_rows] = False
    assert graph_slots[no_residual].eq(0).all()
    assert state.lora_slot[real:padded].eq(-1).all() and state.token_rank[real:padded].eq(0).all()
    assert state.num_kv_splits[:padded].ge(1).all() and state.num_kv_splits[:padded].le(8).all()


def test_graph_state_without_attention_lora_plans_no_residual():
    state = DecodeGraphState(4, "cpu")
    view = SimpleNamespace(batch_size=3, forward_mode=ForwardMode.DECODE,
                           req_pool_indices=torch.tensor([2, 0, 1], dtype=torch.int32),
                           seq_lens=torch.tensor([5, 9, 1]))
    state.refresh(view, None, torch.ones(3, 16, dtype=torch.int32), num_kv_heads=1, max_splits=4, num_sms=2)
    plan = state.plan(3, residuals=False)
    assert not plan.any_adapter
    assert state.lora_slot[:3].eq(-1).all()
    assert plan.positions.tolist() == [4, 8, 0]


def test_refresh_refuses_a_batch_over_the_captured_maximum():
    state = DecodeGraphState(2, "cpu")
    view = SimpleNamespace(batch_size=3, req_pool_indices=torch.zeros(3, dtype=torch.int32),
                           seq_lens=torch.ones(3))
    with pytest.raises(ValueError, match="exceeds the captured maximum 2"):
        state.refresh(view, None, torch.ones(1, 4, dtype=torch.int32), num_kv_heads=1, max_splits=1, num_sms=1)
