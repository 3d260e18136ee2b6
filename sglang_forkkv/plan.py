"""ForkKVPlan: per-forward metadata shared by every layer, built once in init_forward_metadata.

Also the hand-off of the QKV LoRA layer's rank-r side output (`CAPTURE`) to the attention backend of
the same layer: the layer computes R = x·A for k and v, the backend stores it in the residual pool.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


class ResidualCapture:
    """Holds one layer's residual [num_tokens, 2 * R_MAX] from qkv_proj until that layer's attention."""

    def __init__(self):
        self.plan: Optional["ForkKVPlan"] = None
        self.residual: Optional[torch.Tensor] = None
        self.eager: list = []  # one [n, 2 * R_MAX] tensor per plan.eager entry

    def take(self):
        residual, eager = self.residual, self.eager
        self.residual, self.eager = None, []
        return residual, eager


CAPTURE = ResidualCapture()


@dataclasses.dataclass
class EagerWrite:
    """Eager mode: residuals of adapter `lora_slot` for batch tokens `rows`, into residual `slots`."""

    rows: torch.Tensor
    lora_slot: int
    rank: int
    factor: float  # multiplies x·A at write time: the adapter's scaling where the backend folds it
    slots: torch.Tensor


@dataclasses.dataclass
class ForkKVPlan:
    """Token and request metadata of one forward batch.

    Per request i: lora_slot[i] (LoRA buffer slot, -1 without adapter), rank[i], scaling[i]
    (1.0 where the LoRA backend already folds the scaling into x·A, as torch_native does); these three
    host lists are None in a CUDA-graph decode plan (decode_graph.py), which keeps them on the device.
    Per token t of the batch: token_req[t] (its request), positions[t], token_rank[t] (0 without adapter),
    write_base[t] (False where the position's base entry belongs to the tree, recompute mode),
    residual_rows / residual_slots: which tokens carry a residual and the residual slots they are written to.
    """

    lora_slot: Optional[list]
    rank: Optional[list]
    scaling: Optional[list]
    token_req: torch.Tensor
    positions: torch.Tensor
    token_rank: torch.Tensor
    write_base: Optional[torch.Tensor]  # None: every token writes its base entry
    residual_rows: torch.Tensor
    residual_slots: torch.Tensor
    eager: list = dataclasses.field(default_factory=list)  # [EagerWrite]

    @property
    def any_adapter(self) -> bool:
        return len(self.residual_rows) > 0

    @classmethod
    def build(cls, forward_batch, lora_manager, residual_pool, scaling_folded: bool) -> "ForkKVPlan":
        bs = forward_batch.batch_size
        lora_slot, rank, scaling = [-1] * bs, [0] * bs, [1.0] * bs
        buffer_ids = lora_manager.memory_pool.uid_to_buffer_id if lora_manager is not None else {}

        def adapter(uid):
            lora = lora_manager.loras[uid]
            return buffer_ids[uid], lora.config.r, 1.0 if scaling_folded else float(lora.scaling)

        # Without a QKV LoRA layer (MLP-only adapters) nothing captures x·A: every request reads base K/V alone.
        if forward_batch.lora_ids is not None and residual_pool.attention_lora:
            for i, uid in enumerate(forward_batch.lora_ids):
                if uid is not None and uid in buffer_ids:
                    lora_slot[i], rank[i], scaling[i] = adapter(uid)

        device = residual_pool.req_to_residual.device
        req_rows = forward_batch.req_pool_indices.to(torch.int64)
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        if forward_batch.forward_mode.is_decode():
            counts = torch.ones(bs, dtype=torch.int64, device=device)
            positions = seq_lens - 1
            write_base = None
        else:
            counts = forward_batch.extend_seq_lens.to(torch.int64)
            starts = forward_batch.extend_prefix_lens.to(torch.int64)
            positions = torch.cat(
                [torch.arange(s, s + c, device=device) for s, c in zip(starts.tolist(), counts.tolist())]
            ) if bs else torch.empty(0, dtype=torch.int64, device=device)
        token_req = torch.repeat_interleave(torch.arange(bs, device=device), counts)
        if not forward_batch.forward_mode.is_decode():
            write_from = residual_pool.req_base_write_from[req_rows][token_req]
            write_base = positions >= write_from
            if bool(write_base.all()):
                write_base = None

        token_rank = torch.tensor(rank, dtype=torch.int64, device=device)[token_req]
        residual_rows = torch.nonzero(token_rank > 0).flatten()
        residual_slots = residual_pool.req_to_residual[
            req_rows[token_req[residual_rows]], positions[residual_rows]
        ].to(torch.int64)
        eager = []
        if residual_pool.eager_writes and not forward_batch.forward_mode.is_decode():
            offsets = [0] + torch.cumsum(counts, 0).tolist()
            for i, row in enumerate(req_rows.tolist()):
                for uid, slots in residual_pool.eager_writes.pop(row, ()):
                    if uid not in buffer_ids:
                        residual_pool.eager_failed.add((row, uid))
                        continue
                    assert len(slots) == offsets[i + 1] - offsets[i], (len(slots), offsets[i + 1] - offsets[i])
                    rows = torch.arange(offsets[i], offsets[i + 1], device=device)
                    lora = lora_manager.loras[uid]
                    factor = float(lora.scaling) if scaling_folded else 1.0
                    eager.append(EagerWrite(rows, buffer_ids[uid], lora.config.r, factor, slots.to(device)))
        return cls(lora_slot, rank, scaling, token_req, positions, token_rank, write_base, residual_rows,
                   residual_slots, eager)
