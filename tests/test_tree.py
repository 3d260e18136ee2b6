"""DualRadixTree against a reference model: random request lifecycles over several adapters.

Each request matches, locks, takes slots for what it computes, optionally inserts part-way (chunked
prefill) and finishes; base and residual evictions interleave. After every step:
- `check_invariants()` (every residual node pinned to a live base node at its depth, sizes add up);
- every slot is exactly one of free / held by a tree / owned by a running request (no leak, no double free);
- every matched slot holds the entry of that very (token prefix[, adapter]) (no stale or mixed data), and
  matches are never longer than what was inserted.
"""

from array import array

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402

from sglang_forkkv.config import ForkKVConfig  # noqa: E402
from sglang_forkkv.pool import ResidualAllocator, ResidualPool  # noqa: E402
from sglang_forkkv.req_state import fork_state  # noqa: E402
from sglang_forkkv.tree import DualRadixTree, walk_nodes  # noqa: E402

MAX_LEN = 12
ROWS = 6


class CheckedAllocator(ResidualAllocator):
    """Free list that refuses double frees and frees of slots it never handed out."""

    def __init__(self, size):
        super().__init__(size, "cpu")
        self.out = set()

    def alloc(self, n):
        slots = super().alloc(n)
        if slots is not None:
            self.out.update(slots.tolist())
        return slots

    def free(self, slots):
        for s in slots.tolist():
            assert s in self.out, f"slot {s} freed twice or never allocated"
            self.out.remove(s)
        super().free(slots)


class FakeReqToTokenPool:
    def __init__(self):
        self.req_to_token = torch.zeros(ROWS, MAX_LEN + 1, dtype=torch.int32)

    def write(self, index, values):
        self.req_to_token[index] = values.to(torch.int32)


class FakeReq:
    def __init__(self, tokens, lora_id, row):
        self.origin_input_ids = array("q", tokens)
        self.full_untruncated_fill_ids = self.origin_input_ids
        self.output_ids = array("q")
        self.lora_id = lora_id
        self.extra_key = None
        self.req_pool_idx = row
        self.last_node = None
        self.cache_protected_len = 0
        self.prefix_indices = None
        self.fill_len = 0

    def get_fill_ids(self):
        return self.origin_input_ids[: self.fill_len]


class Harness:
    def __init__(self, base_slots=64, residual_slots=96):
        self.base_alloc = CheckedAllocator(base_slots)
        self.pool = ResidualPool(residual_slots, max_rank=1, num_layers=1, dtype=torch.float32, device="cpu",
                                 max_reqs=ROWS, max_context_len=MAX_LEN + 1)
        self.pool.allocator = CheckedAllocator(residual_slots)
        self.r2t = FakeReqToTokenPool()
        params = CacheInitParams(disable=False, req_to_token_pool=self.r2t,
                                 token_to_kv_pool_allocator=self.base_alloc, page_size=1)
        self.tree = DualRadixTree(params, self.pool, ForkKVConfig())
        self.running = {}  # row -> FakeReq
        # slot -> the entry it holds: base: token prefix; residual: (adapter, token prefix)
        self.base_content, self.res_content = {}, {}
        self.inserted = []  # (adapter or None, tokens) of every insert

    # -- request lifecycle, as SGLang's scheduler drives it --
    def start(self, tokens, lora_id):
        row = next((r for r in range(ROWS) if r not in self.running), None)
        if row is None:
            return
        req = FakeReq(tokens, lora_id, row)
        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens), None, limit=len(tokens) - 1), req=req))
        state = fork_state(req)
        p, n = len(m.device_indices), len(tokens)
        self.check_match(tokens, lora_id, m.device_indices, state)
        self.tree.inc_lock_ref(m.last_device_node)
        reuse = state.base_reuse
        if self.tree.evictable_size() + self.base_alloc.available_size() < n - p - len(reuse):
            self.tree.dec_lock_ref(m.last_device_node)
            return
        self.tree.evict(EvictParams(num_tokens=max(0, n - p - len(reuse) - self.base_alloc.available_size())))
        new = self.base_alloc.alloc(n - p - len(reuse))
        for i, s in enumerate(new.tolist()):
            self.base_content[s] = tuple(tokens[: p + len(reuse) + i + 1])
        self.r2t.req_to_token[row, :n] = torch.cat([m.device_indices, reuse, new]).to(torch.int32)
        if lora_id is not None:
            need = n - p
            if self.pool.allocator.available_size() < need:
                self.tree.evict_residual(need - self.pool.allocator.available_size())
            rnew = self.pool.allocator.alloc(need)
            if rnew is None:  # the scheduler's admission check refuses such a request
                self.base_alloc.free(new)
                self.tree.dec_lock_ref(m.last_device_node)
                return
            for i, s in enumerate(rnew.tolist()):
                self.res_content[s] = (lora_id, tuple(tokens[: p + i + 1]))
            self.pool.req_to_residual[row, :n] = torch.cat([state.residual_prefix, rnew]).to(torch.int32)
        req.prefix_indices, req.last_node = m.device_indices, m.last_device_node
        req.cache_protected_len = m.cache_protected_len if m.cache_protected_len is not None else p
        req.fill_len = n
        self.running[row] = req

    def chunk(self, row):
        if row in self.running:
            self.tree.cache_unfinished_req(self.running[row])
            self.inserted.append((self.running[row].lora_id, tuple(self.running[row].origin_input_ids)))

    def finish(self, row, insert=True):
        req = self.running.pop(row, None)
        if req is not None:
            self.tree.cache_finished_req(req, is_insert=insert, kv_len_to_handle=len(req.origin_input_ids))
            if insert:
                self.inserted.append((req.lora_id, tuple(req.origin_input_ids)))

    # -- checks --
    def check_match(self, tokens, lora_id, prefix, state):
        base = torch.cat([prefix, state.base_reuse]).tolist()
        longest = max((_lcp(tokens, t) for _, t in self.inserted), default=0)
        assert len(base) <= longest, "base match longer than anything inserted"
        for i, s in enumerate(base):
            assert self.base_content[s] == tuple(tokens[: i + 1]), "base slot holds another prefix"
        if lora_id is not None:
            longest_r = max((_lcp(tokens, t) for a, t in self.inserted if a == lora_id), default=0)
            assert len(state.residual_prefix) <= longest_r, "residual match longer than inserted"
            for i, s in enumerate(state.residual_prefix.tolist()):
                assert self.res_content[s] == (lora_id, tuple(tokens[: i + 1])), "residual slot of another entry"

    def check(self):
        self.tree.check_invariants()
        base_owned, res_owned = set(), set()
        for req in self.running.values():
            n = len(req.origin_input_ids)
            base_owned.update(self.r2t.req_to_token[req.req_pool_idx, req.cache_protected_len:n].tolist())
            if req.lora_id is not None:
                st_ = fork_state(req)
                res_owned.update(self.pool.req_to_residual[req.req_pool_idx, st_.residual_protected_len:n].tolist())
        base_tree = set(torch.cat([n.value for n in walk_nodes(self.tree.root_node)] or [torch.empty(0)]).long().tolist())
        res_tree = set(torch.cat([n.value for n in walk_nodes(self.tree.residual.root_node)] or [torch.empty(0)]).long().tolist())
        assert not base_owned & base_tree and not res_owned & res_tree
        assert base_owned | base_tree == self.base_alloc.out, "base slot leaked or double-owned"
        assert res_owned | res_tree == self.pool.allocator.out, "residual slot leaked or double-owned"


def _lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


ADAPTERS = [None, "a", "b", "c"]
op = st.one_of(
    st.tuples(st.just("start"), st.lists(st.integers(1, 3), min_size=2, max_size=MAX_LEN), st.sampled_from(ADAPTERS)),
    st.tuples(st.just("finish"), st.integers(0, ROWS - 1), st.booleans()),
    st.tuples(st.just("chunk"), st.integers(0, ROWS - 1)),
    st.tuples(st.just("evict"), st.integers(1, 20)),
    st.tuples(st.just("evict_residual"), st.integers(1, 20)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_lifecycles_keep_invariants(ops):
    h = Harness()
    for o in ops:
        if o[0] == "start":
            h.start(o[1], o[2])
        elif o[0] == "finish":
            h.finish(o[1], o[2])
        elif o[0] == "chunk":
            h.chunk(o[1])
        elif o[0] == "evict":
            h.tree.evict(EvictParams(num_tokens=o[1]))
        else:
            h.tree.evict_residual(o[1])
        h.check()
    for row in list(h.running):
        h.finish(row)
    h.check()
    # at idle nothing is locked, and evicting everything returns every slot
    assert h.tree.protected_size() == 0 and h.tree.residual.protected_size() == 0
    h.tree.evict(EvictParams(num_tokens=10**6))
    assert h.tree.total_size() == 0 and h.tree.residual.total_size() == 0
    assert not h.base_alloc.out and not h.pool.allocator.out


def test_second_adapter_reuses_base_and_pins_it():
    h = Harness()
    ctx = [1, 2, 3, 1, 2, 3, 1, 2]
    h.start(ctx, "a")
    h.finish(0)
    h.start(ctx, "b")  # base cached by "a", residual of "b" missing: recompute with shared base
    req = h.running[0]
    state = fork_state(req)
    assert len(req.prefix_indices) == 0 and len(state.base_reuse) == len(ctx) - 1
    h.finish(0)
    h.check()
    assert h.tree.total_size() == len(ctx)  # one base copy
    assert h.tree.residual.total_size() == 2 * len(ctx)  # a residual per adapter
    # the base is pinned: evicting base takes the residuals along, never leaves them orphaned
    h.tree.evict(EvictParams(num_tokens=1))
    h.check()
    assert h.tree.residual.total_size() < 2 * len(ctx)


def test_drop_adapter_frees_only_its_unlocked_residuals():
    h = Harness()
    ctx = [1, 2, 3, 3, 2, 1]
    for adapter in ("a", "b"):
        h.start(ctx, adapter)
        h.finish(0)
    h.start(ctx + [1], "a")  # a running request of "a" keeps its matched residuals locked
    h.check()
    freed = h.tree.drop_adapter("b")
    assert freed == len(ctx)
    h.check()
    assert h.tree.residual.total_size() == len(ctx)  # "a" keeps its residuals
    assert h.tree.drop_adapter("a") == 0  # locked by the running request
    h.finish(0)
    h.check()
