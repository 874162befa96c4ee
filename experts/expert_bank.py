"""ExpertBank: one layer's local experts, each in one contiguous buffer row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from experts import huge_pages


@dataclass(slots=True)
class ExpertBank:
    """Rows of `buffer` are experts, so moving one is one copy. A row stores its matrices in the HF
    orientation, [gate (I x H) | up (I x H) | down (H x I)], so `w_gate_up` / `w_down` are
    contiguous per expert: the layout the CPU projections (kernels/linear.py) and the Triton kernel
    read fastest, and the one the checkpoint stores, so loading an expert is three plain copies."""

    layer: int
    expert_ids: tuple[int, ...]  # global expert id of each row
    buffer: torch.Tensor  # [n, 3*I*H]
    hidden: int
    intermediate: int
    slot_of: torch.Tensor  # [E] int64: row of each global expert, -1 when not local
    _views: tuple | None = field(default=None, init=False, repr=False, compare=False)  # see _split

    @classmethod
    def empty(cls, layer: int, expert_ids: tuple[int, ...], num_experts: int, hidden: int,
              intermediate: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              rows: int | None = None) -> "ExpertBank":
        """`rows` (default: one per expert id) lets a cache hold free rows beyond `expert_ids`."""
        rows = len(expert_ids) if rows is None else rows
        if rows < len(expert_ids):
            raise ValueError(f"{rows} rows cannot hold {len(expert_ids)} experts")
        buffer = huge_pages.empty((rows, 3 * intermediate * hidden), dtype, device)
        slot_of = torch.full((num_experts,), -1, dtype=torch.int64, device=device)
        slot_of[list(expert_ids)] = torch.arange(len(expert_ids), device=device)
        return cls(layer, expert_ids, buffer, hidden, intermediate, slot_of)

    @property
    def w_gate_up(self) -> torch.Tensor:  # [n, 2I, H] (rows :I gate, I: up), contiguous per expert
        return self._split()[1]

    @property
    def w_down(self) -> torch.Tensor:  # [n, H, I], contiguous per expert
        return self._split()[2]

    def _split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(buffer, its gate_up view, its down view), made once per buffer: views cost a few us a
        layer, and a decode step asks for them at every MoE layer. A new buffer (pinned) gets new ones."""
        if self._views is None or self._views[0] is not self.buffer:
            n, i, h = self.buffer.shape[0], self.intermediate, self.hidden
            self._views = (self.buffer, self.buffer[:, : 2 * i * h].view(n, 2 * i, h),
                           self.buffer[:, 2 * i * h:].view(n, h, i))
        return self._views

    def set_expert(self, row: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """gate, up: [I, H]; down: [H, I] (HF orientation)."""
        i, h = self.intermediate, self.hidden
        dst = self.buffer[row]
        dst[: i * h].view(i, h).copy_(gate)
        dst[i * h: 2 * i * h].view(i, h).copy_(up)
        dst[2 * i * h:].view(h, i).copy_(down)

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids [T, K] -> bank rows [T, K] (-1 where the expert is not local)."""
        return self.slot_of[topk_ids]

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
