"""Scheduler-side hooks: residual slots beside SGLang's base slots, shared-base reuse, admission.

They wrap SGLang's `alloc_for_extend` / `alloc_for_decode` (as imported by schedule_batch) and
`PrefillAdder.add_one_req`; each does nothing unless the batch's tree cache is a DualRadixTree.
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from sglang_forkkv.metrics import STATS
from sglang_forkkv.req_state import EagerResidual, fork_state
from sglang_forkkv.tree import DualRadixTree, residual_extra_key

logger = logging.getLogger(__name__)


def has_adapter(req) -> bool:
    """Whether the request keeps residuals (it matched with an adapter)."""
    state = fork_state(req)
    return state is not None and state.residual_key is not None


def alloc_residual_slots(tree: DualRadixTree, n: int) -> torch.Tensor:
    """n residual slots, evicting unlocked residual entries (LRU) if the pool is short."""
    allocator = tree.residual_pool.allocator
    if not tree.make_residual_room(n):
        raise RuntimeError(
            f"forkkv residual pool exhausted: need {n} slots, {allocator.available_size()} free, "
            f"{tree.residual_evictable_size()} evictable; raise --forkkv-residual-ratio"
        )
    return allocator.alloc(n)


def after_alloc_for_extend(batch, result):
    """Point shared-base positions at the tree's slots and give adapter requests residual slots."""
    tree = batch.tree_cache
    if not isinstance(tree, DualRadixTree):
        return result
    out_cache_loc = result[0]
    pool = tree.residual_pool
    req_to_token = batch.req_to_token_pool.req_to_token
    pt = 0
    for req, prefix_len, extend_len in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        state = fork_state(req)
        idx = req.req_pool_idx
        shared = 0
        if state is not None and len(state.base_reuse):
            shared = min(len(state.base_reuse), extend_len)
            reuse = state.base_reuse[:shared]
            # The allocator handed out a slot for every extend token; the shared positions keep the
            # tree's slot instead, so theirs go straight back.
            tree.token_to_kv_pool_allocator.free(out_cache_loc[pt : pt + shared].clone())
            out_cache_loc[pt : pt + shared] = reuse.to(out_cache_loc.dtype)
            req_to_token[idx, prefix_len : prefix_len + shared] = reuse.to(req_to_token.dtype)
        pool.req_base_write_from[idx] = prefix_len + shared
        if state is not None and state.residual_key is not None:
            assert len(state.residual_prefix) == prefix_len, (len(state.residual_prefix), prefix_len)
            rtable = pool.req_to_residual
            rtable[idx, :prefix_len] = state.residual_prefix.to(rtable.dtype)
            rtable[idx, prefix_len : prefix_len + extend_len] = alloc_residual_slots(tree, extend_len).to(rtable.dtype)
        if state is not None and not state.hits_counted and not req.retracted_stain:
            state.hits_counted = True
            # cached_tokens counts base entries this request did not write; SGLang adds prefix_len later.
            req.cached_tokens += shared
            STATS.record_prefill(
                base_hit=prefix_len + shared,
                residual_hit=prefix_len if state.residual_key is not None else 0,
                has_adapter=state.residual_key is not None,
            )
        pt += extend_len
    if tree.config.mode == "eager":
        # Eager writes are best effort: only once every request of the batch has its own slots, and only from room
        # beyond what admission promised the admitted and running requests (their later chunks and decode tokens;
        # with --enable-mixed-chunk the running requests' decode slots are taken right after this, unchecked).
        own = sum(n for req, n in zip(batch.reqs, batch.extend_lens) if has_adapter(req))
        promised = max(tree.residual_promised - own, 0)
        for req, prefix_len, extend_len in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            state = fork_state(req)
            if state is not None:
                plan_eager_residuals(tree, req, state, prefix_len, extend_len, keep_free=promised)
    return result


def plan_eager_residuals(tree: DualRadixTree, req, state, start: int, count: int, keep_free: int = 0):
    """Eager mode: this prefill also writes x·A_j over its new tokens for every other resident adapter j
    whose residuals already cover [0, start); adapters that do not are left to recompute. Leaves `keep_free`
    slots free (or evictable) for what admission promised."""
    lora_manager = tree.lora_manager
    if lora_manager is None or count == 0 or not tree.residual_pool.attention_lora:
        return
    tokens = req.full_untruncated_fill_ids
    entries = []
    for uid in list(lora_manager.memory_pool.uid_to_buffer_id):
        if uid is None or uid == req.lora_id or uid in state.eager:
            continue
        key = residual_extra_key(req.extra_key, uid)
        have = tree.residual.match_prefix(MatchPrefixParams(key=RadixKey(tokens, key, limit=start + count)))
        if len(have.device_indices) >= start + count or len(have.device_indices) < start:
            continue
        prefix = tree.residual.match_prefix(MatchPrefixParams(key=RadixKey(tokens, key, limit=start)))
        tree.residual.inc_lock_ref(prefix.last_device_node)
        if not tree.make_residual_room(count + keep_free):
            tree.residual.dec_lock_ref(prefix.last_device_node)
            break
        slots = tree.residual_pool.allocator.alloc(count)
        state.eager[uid] = EagerResidual(key, prefix.device_indices, slots, start, prefix.last_device_node)
        entries.append((uid, slots))
    if entries:
        tree.residual_pool.eager_writes[req.req_pool_idx] = entries


def after_alloc_for_decode(batch, out_cache_loc):
    """One residual slot for the new token of every adapter request."""
    tree = batch.tree_cache
    if not isinstance(tree, DualRadixTree):
        return out_cache_loc
    rows, positions = [], []
    for req, seq_len in zip(batch.reqs, batch.seq_lens_cpu.tolist()):
        if has_adapter(req):
            rows.append(req.req_pool_idx)
            positions.append(seq_len)
    if rows:
        slots = alloc_residual_slots(tree, len(rows))
        rtable = tree.residual_pool.req_to_residual
        rtable[torch.tensor(rows), torch.tensor(positions)] = slots.to(rtable.dtype)
    return out_cache_loc


def residual_fits_decode(batch, selected_indices=None) -> bool:
    """Whether the next decode step's residual slots fit (evicting unlocked residuals if short); when not,
    SGLang's retraction takes requests out exactly as it does for base-pool pressure."""
    tree = batch.tree_cache
    if not isinstance(tree, DualRadixTree):
        return True
    reqs = batch.reqs if selected_indices is None else [batch.reqs[i] for i in selected_indices]
    return tree.make_residual_room(sum(1 for r in reqs if has_adapter(r)))


def residual_need(req) -> int:
    """Residual slots a waiting request takes until it finishes (0 without an adapter)."""
    if not has_adapter(req):
        return 0
    # Only the tokens still to generate, as SGLang's PrefillAdder counts base tokens: a retracted request's
    # outputs are already in its fill ids, and counting them twice could make it need more than the pool holds.
    remaining = max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
    return len(req.full_untruncated_fill_ids) - len(req.prefix_indices) + remaining


def bound_to_residual_pool(scheduler, req):
    """At arrival (after SGLang clips max_new_tokens to the base pool): a request with an adapter must fit the
    residual pool alone, else `residual_admits` refuses it forever and it blocks the queue. Clip its max_new_tokens
    like SGLang clips them for the base pool, and refuse a prompt that cannot fit at all with a clear error."""
    tree = scheduler.tree_cache
    if not isinstance(tree, DualRadixTree) or req.lora_id is None or req.to_finish is not None:
        return
    capacity = tree.residual_pool.allocator.size
    input_len = len(req.origin_input_ids)
    if input_len >= scheduler.max_req_input_len:
        return  # over the context length: SGLang refuses it right after this, with its own message
    if input_len + 1 > capacity:
        req.set_finish_with_abort(
            f"forkkv: the prompt ({input_len} tokens) needs {input_len} residual slots of its adapter, more than "
            f"the residual pool holds ({capacity}); raise --forkkv-residual-ratio or shorten the prompt"
        )
        req.sampling_params.max_new_tokens = 0  # the aborted request runs one one-token prefill; keep its need at 1
        return
    sp = req.sampling_params
    sp.max_new_tokens = min(sp.max_new_tokens, capacity - input_len - 1)
    sp.min_new_tokens = min(sp.min_new_tokens, sp.max_new_tokens)


def running_residual_reserve(running_batch) -> int:
    if running_batch is None:
        return 0
    total = 0
    for req in running_batch.reqs:
        if has_adapter(req):
            total += max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)
    return total


def _reserved(adder, tree) -> int:
    """Residual slots this scheduling round has promised so far (running requests' remaining outputs first)."""
    if not hasattr(adder, "_forkkv_reserved"):
        adder._forkkv_reserved = running_residual_reserve(adder.running_batch)
        tree.residual_promised = adder._forkkv_reserved
    return adder._forkkv_reserved


def _promise(adder, tree, need: int):
    adder._forkkv_reserved += need
    tree.residual_promised = adder._forkkv_reserved  # what this round's eager writes must leave alone


def reserve_chunked(adder, req):
    """The request SGLang continues in chunks skips add_one_req: reserve what it still takes (its next chunks and
    outputs) before other requests are admitted beside it, or they could take the room its next chunk needs."""
    tree = adder.tree_cache
    if isinstance(tree, DualRadixTree):
        _reserved(adder, tree)
        _promise(adder, tree, residual_need(req))


def residual_admits(adder, req) -> bool:
    """Whether the residual pool can hold this request beside what the adder already took."""
    tree = adder.tree_cache
    if not isinstance(tree, DualRadixTree):
        return True
    reserved = _reserved(adder, tree)
    need = residual_need(req)
    if need == 0:
        return True
    # Its own matched prefix is evictable now but locked from its admission on: not room it can use.
    room = (tree.residual_pool.allocator.available_size() + tree.residual_evictable_size()
            - tree.unlocked_residual_prefix(req.last_node))
    if reserved + need > room:
        return False
    _promise(adder, tree, need)
    return True
