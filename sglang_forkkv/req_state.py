"""ReqForkState: what forkkv remembers about one request between its prefix match and its insert.

Index regions of a request with an adapter, right after `match_prefix` (positions in the sequence):

    [0, residual_protected_len)          base and residual entries both cached: SGLang's prefix
    [residual_protected_len, base_len)   base cached (another adapter's prefill), residual missing:
                                         computed again by this request, base slots reused (recompute)
    [base_len, seq_len)                  new: base and residual written by this request

Slots of the first two regions belong to the trees; the request owns only what it allocates.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass
class EagerResidual:
    """Residuals one request writes for another resident adapter (eager mode) over [start, start + len(slots))."""

    residual_key: str
    prefix: torch.Tensor  # that adapter's residual slots of [0, start), locked via `lock`
    slots: torch.Tensor  # residual slots this request fills, owned by it until inserted
    start: int
    lock: object  # residual node at depth `start`, locked until the insert


@dataclasses.dataclass
class ReqForkState:
    residual_key: Optional[str]  # residual-tree namespace, None for a request without an adapter
    base_len: int  # positions [0, base_len) have base entries in the tree
    residual_prefix: torch.Tensor  # residual slots of [0, residual_protected_len)
    base_reuse: torch.Tensor  # base slots of [residual_protected_len, base_len)
    residual_protected_len: int
    hits_counted: bool = False
    eager: dict = dataclasses.field(default_factory=dict)  # lora_id -> EagerResidual

    @classmethod
    def for_match(cls, residual_key, base_len: int, residual_prefix: torch.Tensor, base_reuse: torch.Tensor):
        return cls(
            residual_key=residual_key,
            base_len=base_len,
            residual_prefix=residual_prefix,
            base_reuse=base_reuse,
            residual_protected_len=len(residual_prefix),
        )


def fork_state(req) -> Optional[ReqForkState]:
    return getattr(req, "forkkv", None)
