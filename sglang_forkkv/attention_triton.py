"""Triton attention backend of forkkv: the GPU serving path under `--forkkv --attention-backend triton`.

Same contract as the torch reference (attention_torch.py): per layer it stores the batch's base K/V in
SGLang's KV pool (except positions whose base entry the tree already holds) and the residuals in the
residual pool, then attends with the ResidualAttention kernels, which rebuild every key and value on chip:

    K_j = K_base[j] + RoPE_j(s R_k[j] B_k)        V_j = V_base[j] + s R_v[j] B_v

B_k / B_v are views of SGLang's qkv LoRA B buffer, indexed by each request's LoRA buffer slot (-1: no
adapter, plain attention over the base). Every key, the batch's own included, is read from the pools, so
the stores come first.

Decode runs under SGLang's decode CUDA graphs: the per-step metadata then lives in a DecodeGraphState
(decode_graph.py) refreshed on the device before each replay. Extend builds its plan on the host per batch
(eager fills, shared positions), so prefill CUDA graphs stay off (config.validate_server_args).
"""

from __future__ import annotations

import math

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_forkkv.attention_common import ForkKVAttnMixin
from sglang_forkkv.decode_graph import DecodeGraphState
from sglang_forkkv.plan import CAPTURE
from sglang_forkkv.kernels.residual_decode import PROGRAMS_PER_SM, choose_num_kv_splits, residual_decode
from sglang_forkkv.kernels.residual_extend import residual_extend

MAX_KV_SPLITS = 64  # decode splits per request at most (bench/RESULTS.md, Kernels: 32K x batch 1 uses 64)


class ForkKVTritonAttnBackend(ForkKVAttnMixin, AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.init_forkkv(model_runner)
        self.device = torch.device(model_runner.device)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 4)
        self.kv_dtype = self.token_to_kv_pool.get_key_buffer(0).dtype
        self.cos_sin = None  # the model's RoPE table in the pool dtype, made on first use (module docstring)
        self.decode_scratch = torch.empty(0, dtype=torch.float32, device=self.device)
        self.graph = None  # DecodeGraphState once SGLang's decode graph runner sets up
        self.meta = None

    def init_forward_metadata(self, forward_batch):
        """Plan plus the kernels' int32 per-request tensors, built once per batch for every layer."""
        plan = self.build_plan(forward_batch)
        self._make_cos_sin()
        bs = forward_batch.batch_size
        i32 = dict(dtype=torch.int32, device=self.device)
        meta = {
            "req_pool_indices": forward_batch.req_pool_indices.to(**i32),
            "seq_lens": forward_batch.seq_lens.to(**i32),
            "lora_slot": torch.tensor(plan.lora_slot, **i32),
            "scaling": None,
        }
        if plan.any_adapter:
            slots = self.lora_manager.memory_pool.B_buffer["qkv_proj"][0].shape[0]
            scaling = [1.0] * slots
            for slot, s in zip(plan.lora_slot, plan.scaling):
                if slot >= 0:
                    scaling[slot] = s
            meta["scaling"] = torch.tensor(scaling, dtype=torch.float32, device=self.device)
        if forward_batch.forward_mode.is_decode():
            splits = self._max_splits(bs)
            meta["num_kv_splits"] = choose_num_kv_splits(
                meta["seq_lens"], self.token_to_kv_pool.head_num, splits, self.num_sms)
            meta["max_splits"] = splits
        else:
            qo_indptr = torch.zeros(bs + 1, **i32)
            qo_indptr[1:] = torch.cumsum(forward_batch.extend_seq_lens, 0)
            meta["qo_indptr"] = qo_indptr
            meta["max_extend_len"] = max(forward_batch.extend_seq_lens_cpu)
        self.meta = meta

    def _make_cos_sin(self):
        if self.cos_sin is None:
            # bf16 table: half the bytes per K tile; 2-2.7x faster K+V decode than SGLang's fp32 table
            self.cos_sin = self.cos_sin_cache.to(self.device, self.kv_dtype).contiguous()

    def _max_splits(self, bs: int) -> int:
        """KV splits per request: enough stage-1 programs to fill the SMs, at most MAX_KV_SPLITS."""
        return max(1, min(MAX_KV_SPLITS, math.ceil(PROGRAMS_PER_SM * self.num_sms / (
            bs * self.token_to_kv_pool.head_num))))

    ##### Decode CUDA graphs (SGLang's decode graph runner calls these three) #####

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Static buffers every captured batch size shares; the split-KV scratch is sized for the largest
        bs x splits(bs) product and never reallocated (captured graphs hold its address)."""
        self.graph = DecodeGraphState(max_bs, self.device)
        h_q = self.model_runner.model_config.get_max_num_attention_heads()  # every rank's heads: an upper bound
        d = self.token_to_kv_pool.get_key_buffer(0).shape[-1]
        rows = max(bs * self._max_splits(bs) for bs in range(1, max_bs + 1))
        self.graph_scratch = torch.empty(rows * h_q * (d + 1), dtype=torch.float32, device=self.device)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before capture and before every replay: refresh the graph buffers for this step (on the device) and
        point the plan and meta at them. The eager path (init_forward_metadata) never comes here."""
        if not forward_batch.forward_mode.is_decode():
            raise ValueError(f"forkkv captures decode graphs only, got {forward_batch.forward_mode}")
        self._make_cos_sin()
        bs = forward_batch.batch_size
        lora_manager = self.lora_manager
        residuals = lora_manager is not None and self.residual_pool.attention_lora
        lora_info = lora_manager.lora_backend.cuda_graph_batch_info if residuals else None
        splits = self._max_splits(bs)
        graph = self.graph
        graph.refresh(forward_batch, lora_info, self.residual_pool.req_to_residual,
                      self.token_to_kv_pool.head_num, splits, self.num_sms)
        self.plan = graph.plan(bs, residuals)
        CAPTURE.plan = self.plan
        self.meta = {
            "req_pool_indices": graph.req_pool_indices[:bs], "seq_lens": graph.seq_lens[:bs],
            "lora_slot": graph.lora_slot[:bs], "scaling": lora_info.scalings if residuals else None,
            "num_kv_splits": graph.num_kv_splits, "max_splits": splits, "scratch": self.graph_scratch,
        }

    ##### Forward #####

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        q_, o, args = self._prepare(q, k, v, layer, forward_batch, save_kv_cache)
        residual_extend(q_, *args[:7], self.meta["qo_indptr"], *args[7:], o=o,
                        max_extend_len=self.meta["max_extend_len"])
        return o.view(q.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        q_, o, args = self._prepare(q, k, v, layer, forward_batch, save_kv_cache)
        bs, h_q, d = q_.shape
        splits = self.meta["max_splits"]
        logits_numel, lse_numel = bs * h_q * splits * d, bs * h_q * splits
        scratch = self.meta.get("scratch")
        if scratch is None:
            if self.decode_scratch.numel() < logits_numel + lse_numel:
                self.decode_scratch = torch.empty(logits_numel + lse_numel, dtype=torch.float32, device=self.device)
            scratch = self.decode_scratch
        attn_logits = scratch[:logits_numel].view(bs, h_q, splits, d)
        attn_lse = scratch[logits_numel : logits_numel + lse_numel].view(bs, h_q, splits)
        residual_decode(q_, *args, o=o, attn_logits=attn_logits, attn_lse=attn_lse,
                        num_kv_splits=self.meta["num_kv_splits"])
        return o.view(q.shape[0], -1)

    def _prepare(self, q, k, v, layer, forward_batch, save_kv_cache):
        """Store this layer's entries; return q [T, H_q, D], o and the kernels' shared arguments in order."""
        self.check_layer(layer)
        if not save_kv_cache:
            raise ValueError(f"forkkv triton attention reads every key from the pools; layer {layer.layer_id} "
                             f"was called with save_kv_cache=False")
        self.store(layer, forward_batch, k, v)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty(q_.shape, dtype=q_.dtype, device=q_.device)
        meta = self.meta
        if self.plan.any_adapter:
            b_k, b_v = self.lora_b_kv(layer)
            scaling = meta["scaling"]
        else:
            # no request of the batch has an adapter: plain paged attention (reconstruction compiled out)
            b_k = b_v = None
            scaling = torch.ones(1, dtype=torch.float32, device=q_.device)
        args = (
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.residual_pool.buffers[layer.layer_id],
            self.req_to_token_pool.req_to_token, self.residual_pool.req_to_residual,
            meta["req_pool_indices"], meta["seq_lens"], meta["lora_slot"],
            b_k, b_v, scaling, self.cos_sin, self.is_neox, layer.scaling,
        )
        return q_, o, args
