"""ExpertShard: owns some (layer, expert) FFNs and runs them on the tokens routed to them."""

from __future__ import annotations

import torch

from experts.expert_bank import ExpertBank
from kernels.dispatch import KernelOps


class ExpertShard:
    """Plain class; the cluster builder makes it a Ray actor. `banks[layer]` holds its experts."""

    def __init__(self, banks: dict[int, ExpertBank], ops: KernelOps) -> None:
        self.banks, self.ops = banks, ops

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; ids/weights: [T, K] global expert ids -> [T, H] sum over this shard's experts."""
        bank = self.banks[layer]
        return self.ops.fused_moe(x, bank.w_gate_up, bank.w_down, bank.local_ids(ids), weights)

    def pair_outputs(self, layer: int, x: torch.Tensor, pair_row: torch.Tensor,
                     pair_expert: torch.Tensor) -> torch.Tensor:
        """x: [n, H]; pair_row/pair_expert: [P] (global expert ids, all local) -> [P, H] unweighted."""
        bank = self.banks[layer]
        local = bank.slot_of[pair_expert]
        if bool((local < 0).any()):
            missing = sorted(set(pair_expert[local < 0].tolist()))
            raise ValueError(f"layer {layer}: experts {missing} are not on this shard")
        return self.ops.pair_outputs(x, bank.w_gate_up, bank.w_down, pair_row, local)

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.banks.values())
