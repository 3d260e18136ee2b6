"""DualRadixTree: SGLang's RadixCache over base KV slots, plus a residual tree over (adapter, tokens).

The base tree (this class, a RadixCache) is keyed by token ids and the request's extra key *without*
the adapter (forkkv strips `lora_id` from `Req.extra_key`), so every agent reading one context finds
the same base entries. The residual tree (`ResidualTree`, also a RadixCache) is keyed by
(extra key + adapter, tokens) and its values are residual slots.

Invariant (DESIGN §4): every residual node *pins* the base node that ends at the same depth on the
same token path; base nodes are evicted leaf-first, so while a residual node lives, the base entries
of all its tokens live. Evicting a base leaf first evicts the residual nodes pinned to it (they are
unlocked: a request locking a residual node also locks the base path, see `DualHandle`).

A request's lock handle (`req.last_node`) is a `DualHandle(base, residual)`: the base node at the end
of the base match and the residual node at the end of the residual match. The base match may be
longer than the residual match (another adapter prefilled the context): SGLang then treats only the
residual-matched part as the cached prefix, and the scheduling hooks reuse the base slots of the rest
(`ReqForkState.base_reuse`) instead of writing new base entries.
"""

from __future__ import annotations

import heapq
import logging
import time
from array import array
from typing import NamedTuple, Optional

import torch

from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from sglang_forkkv.req_state import ReqForkState, fork_state

logger = logging.getLogger(__name__)


class DualHandle(NamedTuple):
    """What a request locks: the base path up to `base` and the residual path up to `residual`."""

    base: TreeNode
    residual: Optional[TreeNode]


def residual_extra_key(base_extra_key: Optional[str], lora_id: str) -> str:
    return f"{base_extra_key or ''}\x00forkkv-lora:{lora_id}"


def path_tokens(node: TreeNode) -> array:
    """Token ids from the root to the end of `node`."""
    parts = []
    while node.parent is not None:
        parts.append(node.key.token_ids[: len(node.key)])
        node = node.parent
    out = array("q")
    for part in reversed(parts):
        out.extend(part)
    return out


class ResidualTree(RadixCache):
    """Residual slots keyed by (adapter, tokens). Every node pins its base node (see module doc)."""

    def __init__(self, params: CacheInitParams, base_tree: "DualRadixTree"):
        self.base_tree = base_tree
        super().__init__(params)

    def _split_node(self, key, child, split_len):
        new_node = super()._split_node(key, child, split_len)
        new_node.base_extra_key = child.base_extra_key
        self.base_tree.pin(new_node)
        return new_node

    def _delete_leaf(self, node):
        super()._delete_leaf(node)
        self.base_tree.unpin(node)

    def pin_new_nodes(self, node: TreeNode, base_extra_key: Optional[str]):
        """Pin the nodes an insert just created (they are the ones without a pin) on the path to `node`."""
        while node is not self.root_node and getattr(node, "base_pin", None) is None:
            node.base_extra_key = base_extra_key
            self.base_tree.pin(node)
            node = node.parent

    def evict_unlocked_leaf(self, node: TreeNode) -> int:
        """Drop one leaf whose base is about to go; returns the residual slots freed."""
        assert node.lock_ref == 0 and not node.children, (node.lock_ref, len(node.children))
        # The residual tree owns its nodes' slots: they go back to the residual allocator here.
        self.token_to_kv_pool_allocator.free(node.value)
        self._delete_leaf(node)
        return len(node.value)

    def drop_namespace(self, extra_key: str) -> int:
        """Evict every unlocked node of one adapter namespace (adapter unloaded); returns slots freed."""
        freed = 0
        roots = [c for k, c in self.root_node.children.items() if isinstance(k, tuple) and k[0] == extra_key]
        for top in roots:
            stack, order = [top], []
            while stack:
                n = stack.pop()
                order.append(n)
                stack.extend(n.children.values())
            for n in reversed(order):
                if n.lock_ref == 0 and not n.children:
                    freed += self.evict_unlocked_leaf(n)
        return freed


class DualRadixTree(RadixCache):
    """Radix cache backend `forkkv`: shared base tree + per-adapter residual tree."""

    def __init__(self, params: CacheInitParams, residual_pool, config, lora_manager=None):
        self.residual_pool = residual_pool
        self.config = config
        self.lora_manager = lora_manager  # eager mode reads which adapters are resident
        # residual slots the current scheduling round promised to admitted and running requests (scheduling.py)
        self.residual_promised = 0
        # base node -> residual nodes pinned to it
        self._pins: dict[TreeNode, set] = {}
        super().__init__(params)
        self.residual = ResidualTree(
            CacheInitParams(
                disable=False,
                req_to_token_pool=None,
                token_to_kv_pool_allocator=residual_pool.allocator,
                page_size=1,
            ),
            base_tree=self,
        )

    ##### Public API #####

    def reset(self):
        super().reset()
        self._pins = {}
        if getattr(self, "residual", None) is not None:
            self.residual.reset()
            self.residual_pool.allocator.clear()

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """Longest base match, and the adapter's residual match inside it.

        Returns the residual-matched part as `device_indices` (what SGLang treats as computed) and a
        `DualHandle`; `cache_protected_len` covers the whole base match, whose slots are the tree's.
        The request's `ReqForkState` records the residual prefix and the base slots to reuse.
        Mutates: may split nodes of either tree (no data is copied).
        """
        base = super().match_prefix(MatchPrefixParams(key=params.key))
        base_len = len(base.device_indices)
        req = params.req
        lora_id = getattr(req, "lora_id", None) if req is not None else None
        if lora_id is None:
            handle = DualHandle(base.last_device_node, None)
            if req is not None:
                req.forkkv = ReqForkState.for_match(None, base_len, base.device_indices[:0], base.device_indices[base_len:])
            return base._replace(last_device_node=handle)

        rkey = RadixKey(
            params.key.token_ids, residual_extra_key(params.key.extra_key, lora_id), limit=base_len
        )
        res = self.residual.match_prefix(MatchPrefixParams(key=rkey))
        res_len = len(res.device_indices)
        assert res_len <= base_len, f"residual match {res_len} outlives its base {base_len}"
        req.forkkv = ReqForkState.for_match(
            rkey.extra_key, base_len, res.device_indices, base.device_indices[res_len:]
        )
        return MatchResult(
            device_indices=base.device_indices[:res_len],
            last_device_node=DualHandle(base.last_device_node, res.last_device_node),
            last_host_node=base.last_device_node,
            best_match_node=base.last_device_node,
            cache_protected_len=base_len,
        )

    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
        """Insert a finished request's base and residual entries; free what the trees do not take."""
        if self.disable_finished_insert:
            is_insert = False
        state = fork_state(req)
        token_ids = (req.origin_input_ids + req.output_ids)[:kv_len_to_handle]
        n = len(token_ids)
        kv = self.req_to_token_pool.req_to_token[req.req_pool_idx, :n].to(torch.int64, copy=True)
        key = RadixKey(token_ids, req.extra_key)
        protected = req.cache_protected_len
        # Slots below cache_protected_len are the tree's (matched, or shared from another adapter's
        # prefill); [protected, taken) duplicate entries the tree already had; the rest it now owns.
        if is_insert:
            taken = self.insert(InsertParams(key=key, value=kv)).prefix_len
            self.token_to_kv_pool_allocator.free(kv[protected : max(taken, protected)])
        else:
            self.token_to_kv_pool_allocator.free(kv[protected:])

        if state is not None and state.residual_key is not None:
            rv = self.residual_pool.req_to_residual[req.req_pool_idx, :n].to(torch.int64, copy=True)
            protected = state.residual_protected_len
            if is_insert:
                result = self.residual.insert(InsertParams(key=RadixKey(token_ids, state.residual_key), value=rv))
                self.residual.pin_new_nodes(result.last_device_node, req.extra_key)
                # [protected, taken) duplicate residuals the tree already had; the rest it now owns.
                self.residual_pool.allocator.free(rv[protected : max(result.prefix_len, protected)])
            else:
                self.residual_pool.allocator.free(rv[protected:])

        if state is not None:
            self._settle_eager(req, state, token_ids, is_insert)
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req, chunked=False):
        """Insert a running request's entries (chunked prefill) and re-point it at the tree's slots."""
        state = fork_state(req)
        token_ids = req.get_fill_ids()
        n = len(token_ids)
        table = self.req_to_token_pool.req_to_token
        kv = table[req.req_pool_idx, :n].to(torch.int64, copy=True)
        key = RadixKey(token_ids, req.extra_key)
        taken = self.insert(InsertParams(key=key, value=kv, chunked=chunked)).prefix_len
        self.token_to_kv_pool_allocator.free(kv[req.cache_protected_len : max(taken, req.cache_protected_len)])

        # Lock the base path as far as it is cached (possibly past n: shared entries the next chunk reuses).
        full = RadixKey(req.full_untruncated_fill_ids, req.extra_key, limit=max(n, state.base_len if state else 0))
        base_values, base_node = self._match_prefix_helper(self.root_node, full)
        base_indices = torch.cat(base_values) if base_values else kv[:0]
        assert len(base_indices) >= n, (len(base_indices), n)
        self.req_to_token_pool.write(
            (req.req_pool_idx, slice(req.cache_protected_len, n)), base_indices[req.cache_protected_len : n]
        )

        res_node = None
        if state is not None and state.residual_key is not None:
            rtable = self.residual_pool.req_to_residual
            rv = rtable[req.req_pool_idx, :n].to(torch.int64, copy=True)
            rkey = RadixKey(token_ids, state.residual_key)
            result = self.residual.insert(InsertParams(key=rkey, value=rv, chunked=chunked))
            self.residual.pin_new_nodes(result.last_device_node, req.extra_key)
            self.residual_pool.allocator.free(
                rv[state.residual_protected_len : max(result.prefix_len, state.residual_protected_len)]
            )
            rmatch = self.residual.match_prefix(MatchPrefixParams(key=rkey))
            assert len(rmatch.device_indices) == n, (len(rmatch.device_indices), n)
            rtable[req.req_pool_idx, state.residual_protected_len : n] = rmatch.device_indices[
                state.residual_protected_len :
            ].to(rtable.dtype)
            res_node = rmatch.last_device_node
            state.residual_prefix = rmatch.device_indices
            state.residual_protected_len = n
        if state is not None:
            self._settle_eager(req, state, token_ids, True)
            state.base_len = len(base_indices)
            state.base_reuse = base_indices[n:]

        self.dec_lock_ref(req.last_node)
        new_handle = DualHandle(base_node, res_node)
        self.inc_lock_ref(new_handle)
        req.cache_protected_len = len(base_indices)
        req.prefix_indices = base_indices[:n]
        req.last_node = new_handle

    def inc_lock_ref(self, node) -> IncLockRefResult:
        base, residual = _split_handle(node)
        if residual is not None:
            self.residual.inc_lock_ref(residual)
        return super().inc_lock_ref(base)

    def dec_lock_ref(self, node, params=None) -> DecLockRefResult:
        base, residual = _split_handle(node)
        if residual is not None:
            self.residual.dec_lock_ref(residual)
        return super().dec_lock_ref(base)

    def resolve_node_handle(self, node_handle):
        return _split_handle(node_handle)[0]

    def evict(self, params: EvictParams) -> EvictResult:
        """LRU over base leaves; a base leaf takes the residual nodes pinned to it along."""
        if self.disable:
            return EvictResult()
        start = time.perf_counter()
        heap = [(self.eviction_strategy.get_priority(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        evicted = 0
        while evicted < params.num_tokens and heap:
            _, node = heapq.heappop(heap)
            for dependent in list(self._pins.get(node, ())):
                self.residual.evict_unlocked_leaf(dependent)
            # The base tree owns its nodes' slots: back to SGLang's allocator.
            self.token_to_kv_pool_allocator.free(node.value)
            evicted += len(node.value)
            self._delete_leaf(node)
            self._pins.pop(node, None)
            parent = node.parent
            if len(parent.children) == 0 and parent.lock_ref == 0 and parent is not self.root_node:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
        self.update_eviction_metrics(evicted, start)
        return EvictResult(num_tokens_evicted=evicted)

    def evict_residual(self, num_slots: int) -> int:
        """Free at least `num_slots` residual slots by LRU over unlocked residual leaves, if possible."""
        return self.residual.evict(EvictParams(num_tokens=num_slots)).num_tokens_evicted

    def make_residual_room(self, num_slots: int) -> bool:
        """Evict unlocked residuals (LRU) for the shortfall, if any; whether `num_slots` slots are now free."""
        allocator = self.residual_pool.allocator
        if allocator.available_size() < num_slots:
            self.evict_residual(num_slots - allocator.available_size())
        return allocator.available_size() >= num_slots

    def residual_evictable_size(self) -> int:
        return self.residual.evictable_size()

    def unlocked_residual_prefix(self, handle) -> int:
        """Residual slots on the path to `handle`'s residual node that are still evictable: the part of
        `residual_evictable_size()` a request matched there stops being evictable once it is admitted and locks it."""
        node = _split_handle(handle)[1]
        n = 0
        while node is not None and node is not self.residual.root_node:
            if node.lock_ref == 0:
                n += len(node.key)
            node = node.parent
        return n

    def drop_adapter(self, lora_id: str) -> int:
        """Forget an adapter's residuals (unloaded or reloaded): frees its unlocked residual nodes."""
        freed = 0
        keys = {k[0] for k in self.residual.root_node.children if isinstance(k, tuple)}
        for extra in keys:
            if extra.endswith(f"\x00forkkv-lora:{lora_id}"):
                freed += self.residual.drop_namespace(extra)
        return freed

    ##### Pins #####

    def pin(self, res_node: TreeNode):
        """Attach a residual node to the base node ending at its depth (splitting base if needed)."""
        tokens = path_tokens(res_node)
        values, base_node = self._match_prefix_helper(
            self.root_node, RadixKey(tokens, res_node.base_extra_key)
        )
        matched = sum(len(v) for v in values)
        assert matched == len(tokens), f"residual of {len(tokens)} tokens has only {matched} base tokens"
        res_node.base_pin = base_node
        self._pins.setdefault(base_node, set()).add(res_node)

    def unpin(self, res_node: TreeNode):
        base_node = getattr(res_node, "base_pin", None)
        if base_node is not None:
            self._pins.get(base_node, set()).discard(res_node)
            res_node.base_pin = None

    ##### Eager residuals #####

    def _settle_eager(self, req, state, token_ids, insert: bool):
        """Insert the residuals a request wrote for other adapters (eager mode), or free them when the
        request is not inserted or the adapter left the LoRA buffer before the forward."""
        for uid, eager in list(state.eager.items()):
            end = eager.start + len(eager.slots)
            failed = (req.req_pool_idx, uid) in self.residual_pool.eager_failed
            self.residual_pool.eager_failed.discard((req.req_pool_idx, uid))
            # The adapter was unloaded between this request's scheduling and now (with the overlap scheduler the
            # unload can land between a batch's planning and its insert): its namespace is dead, insert nothing.
            unloaded = self.lora_manager is not None and uid not in self.lora_manager.loras
            if insert and not failed and not unloaded and end <= len(token_ids):
                value = torch.cat([eager.prefix.to(torch.int64), eager.slots.to(torch.int64)])
                result = self.residual.insert(InsertParams(key=RadixKey(token_ids[:end], eager.residual_key), value=value))
                self.residual.pin_new_nodes(result.last_device_node, req.extra_key)
                # Positions the adapter already had by now (another request inserted them) are duplicates.
                self.residual_pool.allocator.free(eager.slots[: max(result.prefix_len - eager.start, 0)])
            else:
                self.residual_pool.allocator.free(eager.slots)
            self.residual.dec_lock_ref(eager.lock)
            if unloaded:  # the unload's drop skipped the nodes this request locked; they are free to go now
                self.residual.drop_namespace(eager.residual_key)
            del state.eager[uid]

    ##### Introspection #####

    def stats(self) -> dict:
        """Token counts of both trees and what a per-adapter cache would hold for the same entries."""
        base_tokens = self.total_size()
        residual_tokens = self.residual.total_size()
        covered = self._covered_base_tokens()
        return {
            "base_tokens": base_tokens,
            "residual_tokens": residual_tokens,
            "base_only_tokens": base_tokens - covered,
            # Stock SGLang keys KV by (adapter, tokens): one full KV entry per residual entry, plus the
            # base entries no adapter uses.
            "per_adapter_equivalent_tokens": residual_tokens + base_tokens - covered,
        }

    def residual_tokens_by_adapter(self) -> dict:
        """Residual entries per adapter, by name where the adapter is loaded, else "<lora_id> (unloaded)"
        (what an unload should have dropped). Walks the residual tree: introspection only, not per batch."""
        refs = getattr(self.lora_manager, "lora_refs", None) or {}
        out: dict = {}
        for key, top in self.residual.root_node.children.items():
            lora_id = key[0].rsplit("\x00forkkv-lora:", 1)[-1] if isinstance(key, tuple) else None
            ref = refs.get(lora_id)
            name = ref.lora_name if ref is not None else f"{lora_id} (unloaded)"
            out[name] = out.get(name, 0) + len(top.value) + sum(len(n.value) for n in walk_nodes(top))
        return out

    def check_invariants(self):
        """Assert the module-doc invariants; used by tests after every operation."""
        for res_node in walk_nodes(self.residual.root_node):
            base_node = res_node.base_pin
            assert base_node is not None and not base_node.evicted, "residual node without a live base"
            assert res_node in self._pins.get(base_node, ()), "pin missing from the base side"
            assert len(path_tokens(base_node)) == len(path_tokens(res_node)), "pin at the wrong depth"
            assert res_node.lock_ref >= 0
        for base_node, deps in self._pins.items():
            for dep in deps:
                assert dep.base_pin is base_node
        for node in walk_nodes(self.root_node):
            assert node.lock_ref >= 0
        assert self.evictable_size_ + self.protected_size_ == self.total_size(), (
            self.evictable_size_, self.protected_size_, self.total_size())

    def _covered_base_tokens(self) -> int:
        covered = 0

        def visit(node) -> bool:
            nonlocal covered
            hit = bool(self._pins.get(node))
            for child in node.children.values():
                hit = visit(child) or hit
            if hit and node is not self.root_node:
                covered += len(node.value)
            return hit

        visit(self.root_node)
        return covered


def _split_handle(node):
    if isinstance(node, DualHandle):
        return node.base, node.residual
    return node, None


def walk_nodes(root):
    """Every node below `root` (not `root` itself), depth first."""
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())
