"""ResidualPool: per-layer rank-r residual buffers, their slot allocator and the per-request tables.

Layout (DESIGN §4), read directly by the attention backends and the Triton kernels:
  buffers[layer]       [num_slots + 1, 2 * R_MAX]  columns [0, R_MAX) = R_k, [R_MAX, 2 R_MAX) = R_v;
                       an adapter of rank r fills the first r columns of each half, the rest stay zero.
                       Slot 0 is a dummy that no token owns (as in SGLang's KV pool).
  req_to_residual      [max_reqs, max_context_len] int32  residual slot of each (request row, position),
                       parallel to SGLang's req_to_token; meaningless for requests without an adapter.
  req_base_write_from  [max_reqs] int64  positions below this value use base entries some other request
                       wrote (recompute mode): the attention backend must not overwrite them.
  private_kv[layer]    [num_slots + 1, 2, H_kv, D]  only for the private layers (--forkkv-private-layers): the
                       adapter's whole K (after RoPE) and V of each residual slot, written by its own forward and
                       read instead of base + residual in those layers.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def lora_max_rank(model: torch.nn.Module) -> int:
    """R_MAX: the rank SGLang's LoRA buffers are padded to (0 when LoRA is off), read off the qkv A buffer."""
    for module in model.modules():
        a_buffer = getattr(module, "A_buffer_qkv", None)
        if a_buffer is not None:
            return a_buffer.shape[1] // 3
    return 0


class ResidualAllocator:
    """Free list of residual slots 1..size (slot 0 is the dummy)."""

    def __init__(self, size: int, device):
        self.size = size
        self.device = device
        self.clear()

    def clear(self):
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, n: int):
        """n slots, or None when fewer are free (the caller evicts and retries)."""
        if n > len(self.free_slots):
            return None
        out, self.free_slots = self.free_slots[:n], self.free_slots[n:]
        return out

    def free(self, slots: torch.Tensor):
        if slots.numel():
            self.free_slots = torch.cat([self.free_slots, slots.to(self.free_slots)])

    # SGLang's RadixCache frees through these two names.
    def free_segment(self, slots: torch.Tensor, start_pos: int = 0):
        self.free(slots)

    def free_segments(self, segments):
        for slots, _ in segments:
            self.free(slots)


class ResidualPool:
    """Residual buffers of every layer plus the tables that index them."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        num_layers: int,
        dtype: torch.dtype,
        device,
        max_reqs: int,
        max_context_len: int,
        private_layers: frozenset = frozenset(),
        kv_head_shape: tuple[int, int] = (0, 0),
    ):
        if max_rank <= 0:
            raise ValueError(f"residual pool needs a LoRA rank > 0, got {max_rank}")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device
        self.buffers = [
            torch.zeros(num_slots + 1, 2 * max_rank, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.private_layers = frozenset(private_layers)
        self.private_kv = {
            layer: torch.zeros(num_slots + 1, 2, *kv_head_shape, dtype=dtype, device=device)
            for layer in sorted(self.private_layers)
        }
        self.allocator = ResidualAllocator(num_slots, device)
        self.req_to_residual = torch.zeros(max_reqs, max_context_len, dtype=torch.int32, device=device)
        self.req_base_write_from = torch.zeros(max_reqs, dtype=torch.int64, device=device)
        # Eager mode hand-offs between the scheduler and the next forward, keyed by request row:
        # [(lora_id, residual slots of the row's extend tokens)] to write, and the rows whose adapter
        # left the LoRA buffer before the forward (their slots are freed, not inserted).
        self.eager_writes: dict[int, list] = {}
        self.eager_failed: set = set()
        # False where no loaded adapter can target q/k/v (no QKV LoRA buffer, e.g. MLP-only adapters): adapters then
        # add nothing to K and V, and requests attend over the base entries alone (set by the plugin).
        self.attention_lora = True
        logger.info(
            "forkkv residual pool: %d slots x %d layers x %d columns (%s) = %.1f MiB",
            num_slots, num_layers, 2 * max_rank, dtype, self.nbytes() / 2**20,
        )

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in [*self.buffers, *self.private_kv.values()])

    @staticmethod
    def bytes_per_slot(max_rank: int, num_layers: int, dtype: torch.dtype, private_kv_cells: int = 0) -> int:
        """Bytes of one residual slot over all layers; ``private_kv_cells``: K and V elements of the private
        layers (2 * H_kv * D each)."""
        return (2 * max_rank * num_layers + private_kv_cells) * torch.tensor([], dtype=dtype).element_size()

    def write(self, layer_id: int, slots: torch.Tensor, residual: torch.Tensor):
        """residual [n, 2 * R_MAX] into slots [n] of one layer."""
        self.buffers[layer_id][slots] = residual.to(self.dtype)

    def write_private(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """An adapter's whole k, v [n, H_kv, D] into slots [n] of a private layer."""
        buffer = self.private_kv[layer_id]
        buffer[slots, 0] = k.to(self.dtype)
        buffer[slots, 1] = v.to(self.dtype)
