"""DecodeGraphState: what the Triton forkkv decode reads per step, in buffers a CUDA graph can replay over.

A captured graph replays fixed kernels on fixed addresses, so each request's LoRA buffer slot, rank, residual
slot and KV split count live in buffers allocated once (`init_cuda_graph_state`) and are refreshed in place
before every replay (`init_forward_metadata_out_graph`) from tensors already on the device: SGLang's LoRA batch
info (prepare_lora_batch fills its weight indices and ranks before the runner replays) and the runner's padded
req_pool_indices / seq_lens. Nothing is read back to the host, unlike the eager plan (plan.py), which builds
per-request Python lists.

The runner pads a batch to the next captured size; the padded rows are given no adapter and residual slot 0 (the
dummy no token owns), so they never write a live residual, whatever stale adapter index their LoRA rows hold.
"""

from __future__ import annotations

import torch

from sglang_forkkv.kernels.residual_decode import choose_num_kv_splits
from sglang_forkkv.plan import ForkKVPlan


class DecodeGraphState:
    def __init__(self, max_bs: int, device):
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.max_bs = max_bs
        self.rows = torch.arange(max_bs, **i64)
        self.req_pool_indices = torch.zeros(max_bs, **i32)
        self.seq_lens = torch.ones(max_bs, **i32)
        self.positions = torch.zeros(max_bs, **i64)
        self.lora_slot = torch.full((max_bs,), -1, **i32)
        self.token_rank = torch.zeros(max_bs, **i64)
        self.residual_slots = torch.zeros(max_bs, **i64)
        self.num_kv_splits = torch.ones(max_bs, **i32)

    def refresh(self, forward_batch, lora_info, req_to_residual: torch.Tensor, num_kv_heads: int,
                max_splits: int, num_sms: int) -> None:
        """Fill the first batch_size rows for this step. lora_info: SGLang's CUDA-graph LoRA batch info, or None
        when no request can carry a residual (LoRA off, or no adapter targets q/k/v)."""
        bs = forward_batch.batch_size
        if bs > self.max_bs:
            raise ValueError(f"decode graph batch {bs} exceeds the captured maximum {self.max_bs}")
        # the runner's view carries num_padding at replay; a capture batch has none
        real = bs - getattr(forward_batch, "num_padding", 0)
        self.req_pool_indices[:bs].copy_(forward_batch.req_pool_indices)
        self.seq_lens[:bs].copy_(forward_batch.seq_lens)
        torch.sub(self.seq_lens[:bs], 1, out=self.positions[:bs])
        if lora_info is None:
            self.token_rank[:bs].zero_()
            self.lora_slot[:bs].fill_(-1)
            self.residual_slots[:bs].zero_()
        else:
            slot = lora_info.weight_indices[:bs].to(torch.int64)
            rank = lora_info.lora_ranks[slot].to(torch.int64).masked_fill_(self.rows[:bs] >= real, 0)
            self.token_rank[:bs].copy_(rank)
            has = rank > 0
            self.lora_slot[:bs].copy_(torch.where(has, slot, -1))
            residual = req_to_residual[self.req_pool_indices[:bs].to(torch.int64), self.positions[:bs]]
            self.residual_slots[:bs].copy_(torch.where(has, residual.to(torch.int64), 0))
        choose_num_kv_splits(self.seq_lens[:bs], num_kv_heads, max_splits, num_sms, out=self.num_kv_splits)

    def plan(self, bs: int, residuals: bool) -> ForkKVPlan:
        """The step's ForkKVPlan over these buffers: every row writes a residual (rows without an adapter write
        zeros into the dummy slot 0) unless `residuals` is False (nothing captures x·A)."""
        rows = self.rows[:bs] if residuals else self.rows[:0]
        return ForkKVPlan(
            lora_slot=None, rank=None, scaling=None,  # on the device only (lora_slot / token_rank here)
            token_req=self.rows[:bs], positions=self.positions[:bs], token_rank=self.token_rank[:bs],
            write_base=None, residual_rows=rows, residual_slots=self.residual_slots[:len(rows)],
        )
