"""What every forkkv attention backend shares: the per-batch plan, the writes into both pools, B views.

Mixed into an SGLang AttentionBackend subclass (the torch reference in attention_torch.py, the Triton
serving path in attention_triton.py). Per layer a backend calls `store` (base K/V into SGLang's KV pool
except positions the tree already holds, residuals into the residual pool) and then attends over keys
rebuilt as K_j = K_base[j] + RoPE_j(s R_k[j] B_k), V_j = V_base[j] + s R_v[j] B_v.
"""

from __future__ import annotations

import torch

from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_forkkv.plan import CAPTURE, ForkKVPlan
from sglang_forkkv.rope import apply_rope, find_rotary


class ForkKVAttnMixin:
    """State and steps common to forkkv attention backends; `init_forkkv` must run in the backend's __init__."""

    def init_forkkv(self, model_runner):
        self.model_runner = model_runner
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.residual_pool = model_runner.forkkv_residual_pool
        rotary = find_rotary(model_runner.model)
        self.cos_sin_cache = rotary.cos_sin_cache
        self.rotary_dim = rotary.rotary_dim
        self.is_neox = rotary.is_neox_style
        self.plan = None

    @property
    def lora_manager(self):
        return getattr(self.model_runner, "lora_manager", None)

    def build_plan(self, forward_batch) -> ForkKVPlan:
        """The batch's ForkKVPlan, also handed to the QKV LoRA layers through CAPTURE."""
        lora_manager = self.lora_manager
        # torch_native folds the scaling into x·A; triton applies it after B (DESIGN §5)
        folded = lora_manager is not None and lora_manager.lora_backend.name == "torch_native"
        self.plan = ForkKVPlan.build(forward_batch, lora_manager, self.residual_pool, folded)
        CAPTURE.plan = self.plan
        return self.plan

    @staticmethod
    def check_layer(layer) -> None:
        if (layer.is_cross_attention or layer.qk_head_dim != layer.v_head_dim
                or layer.sliding_window_size not in (None, -1) or (layer.logit_cap or 0) > 0):
            raise ValueError(
                f"forkkv attention supports plain causal self-attention only (layer {layer.layer_id}: cross "
                f"{layer.is_cross_attention}, head dims {layer.qk_head_dim}/{layer.v_head_dim}, sliding window "
                f"{layer.sliding_window_size}, logit cap {layer.logit_cap})"
            )

    def store(self, layer, forward_batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this layer's base K/V and the residuals its QKV LoRA captured (this batch's and eager ones)."""
        plan = self.plan
        residual, eager = CAPTURE.take()
        loc = forward_batch.out_cache_loc
        k = k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim)
        v = v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim)
        if plan.any_adapter and layer.layer_id in self.residual_pool.private_layers:
            # this forward's own k/v, shared positions included: the adapter's exact entries for its private copy
            self.store_private(layer, k, v, residual)
        if plan.write_base is not None:
            # Shared positions keep the entry another adapter's prefill wrote (recompute mode).
            loc, k, v = loc[plan.write_base], k[plan.write_base], v[plan.write_base]
        if len(loc):  # a fork whose every token is shared writes no base entry (SGLang's store kernel needs >= 1)
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(loc, None), k, v)
        if plan.any_adapter:
            assert residual is not None, f"layer {layer.layer_id}: adapter tokens but no residual captured"
            self.residual_pool.write(layer.layer_id, plan.residual_slots, residual[plan.residual_rows])
        for write, values in zip(plan.eager, eager, strict=True):
            self.residual_pool.write(layer.layer_id, write.slots, values)

    def store_private(self, layer, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> None:
        """Whole K = base + RoPE(s R_k B_k) and V = base + s R_v B_v of the batch's adapter tokens, into the
        private copy of this layer."""
        plan = self.plan
        rows = plan.residual_rows
        full_k, full_v = k[rows].clone(), v[rows].clone()
        owners = plan.token_req[rows]
        for i in torch.unique(owners).tolist():
            sel = torch.nonzero(owners == i).flatten()
            dk, dv = self.lora_kv_delta(layer, i, residual[rows[sel]], plan.positions[rows[sel]])
            full_k[sel] += dk.to(full_k.dtype)
            full_v[sel] += dv.to(full_v.dtype)
        self.residual_pool.write_private(layer.layer_id, plan.residual_slots, full_k, full_v)

    def lora_kv_delta(self, layer, i: int, res: torch.Tensor, positions: torch.Tensor):
        """(RoPE(s R_k B_k), s R_v B_v) [n, H_kv, D] of request i's adapter for residual rows res [n, 2 R_MAX]."""
        plan, max_rank = self.plan, self.residual_pool.max_rank
        rank, scale = plan.rank[i], plan.scaling[i]
        b_k, b_v = self.lora_b_kv(layer)
        b_k, b_v = b_k[plan.lora_slot[i], :, :rank], b_v[plan.lora_slot[i], :, :rank]
        n = res.shape[0]
        dk = (scale * res[:, :rank].to(b_k.dtype) @ b_k.T).view(n, layer.tp_k_head_num, layer.qk_head_dim)
        dv = (scale * res[:, max_rank : max_rank + rank].to(b_v.dtype) @ b_v.T).view(n, layer.tp_v_head_num, layer.v_head_dim)
        return apply_rope(dk, positions, self.cos_sin_cache, self.rotary_dim, self.is_neox), dv

    def lora_b_kv(self, layer):
        """(B_k, B_v) of every LoRA buffer slot, views [S, H_kv * D, R_MAX] of SGLang's qkv B buffer."""
        b = self.lora_manager.memory_pool.B_buffer["qkv_proj"][layer.layer_id]
        q_size = layer.tp_q_head_num * layer.qk_head_dim
        kv_size = layer.tp_k_head_num * layer.qk_head_dim
        return b[:, q_size : q_size + kv_size], b[:, q_size + kv_size : q_size + 2 * kv_size]
