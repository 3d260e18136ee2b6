"""Reference attention backend of forkkv in torch: the CPU serving path and the oracle for the kernels.

Replaces SGLang's `torch_native` backend when `--forkkv` is on. Per layer it stores the batch's base
K/V in SGLang's KV pool (except positions whose base entry the tree already holds) and the residuals
in the residual pool, then attends over keys rebuilt as

    K_j = K_base[j] + RoPE_j(s R_k[j] B_k)        V_j = V_base[j] + s R_v[j] B_v

for requests with an adapter, and over the base entries alone for requests without one.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_forkkv.attention_common import ForkKVAttnMixin
from sglang_forkkv.plan import ForkKVPlan


class ForkKVTorchAttnBackend(ForkKVAttnMixin, TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.init_forkkv(model_runner)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.build_plan(forward_batch)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache, decode: bool):
        self.check_layer(layer)
        plan = self.plan
        if save_kv_cache:
            self.store(layer, forward_batch, k, v)

        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q_)
        starts = [0] + (torch.cumsum(forward_batch.extend_seq_lens, 0).tolist() if not decode else [])
        for i in range(forward_batch.batch_size):
            seq_len = int(forward_batch.seq_lens[i])
            if decode:
                q_start, q_len = i, 1
            else:
                q_start, q_len = starts[i], int(forward_batch.extend_seq_lens[i])
            keys, values = self.rebuild_kv(layer, int(forward_batch.req_pool_indices[i]), seq_len, plan, i)
            o[q_start : q_start + q_len] = self._sdpa(q_[q_start : q_start + q_len], keys, values, layer, causal=not decode)
        return o.reshape(q.shape[0], -1)

    def rebuild_kv(self, layer, req_row: int, seq_len: int, plan: ForkKVPlan, i: int):
        """Keys and values [seq_len, H_kv, D] of one request, base plus its adapter's residual (or its private
        copy in a private layer)."""
        if plan.lora_slot[i] >= 0 and layer.layer_id in self.residual_pool.private_layers:
            entries = self.residual_pool.private_kv[layer.layer_id][self.residual_pool.req_to_residual[req_row, :seq_len].long()]
            return entries[:, 0], entries[:, 1]
        slots = self.req_to_token_pool.req_to_token[req_row, :seq_len]
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[slots]
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[slots]
        if plan.lora_slot[i] < 0:
            return keys, values
        res = self.residual_pool.buffers[layer.layer_id][self.residual_pool.req_to_residual[req_row, :seq_len].long()]
        dk, dv = self.lora_kv_delta(layer, i, res, torch.arange(seq_len, device=keys.device))
        return keys + dk.to(keys.dtype), values + dv.to(values.dtype)

    @staticmethod
    def _sdpa(q, keys, values, layer, causal: bool):
        """q [n, H_q, D] at the last n positions of keys/values [L, H_kv, D] (SGLang's padded-query form)."""
        n, seq_len = q.shape[0], keys.shape[0]
        if causal:
            padded = q.new_empty((seq_len, q.shape[1], q.shape[2]))
            padded[seq_len - n :] = q
            q = padded
        out = scaled_dot_product_attention(
            q.movedim(0, 1).unsqueeze(0),
            keys.movedim(0, 1).unsqueeze(0).to(q.dtype),
            values.movedim(0, 1).unsqueeze(0).to(q.dtype),
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            scale=layer.scaling,
            is_causal=causal,
        )
        return out.squeeze(0).movedim(1, 0)[-n:]
