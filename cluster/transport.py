"""The per-layer data plane: point-to-point tensors between actors over torch.distributed.

Gloo on CPU (NCCL would serve GPU-resident tensors). Ray never carries hidden states: one process
group spans every attention worker and expert shard, rebuilt from scratch after a failure. Every
send and receive is counted, and what crosses a node boundary is counted apart.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


class TransportError(RuntimeError):
    """A peer did not answer within the transport timeout, or the connection broke."""


@dataclass(slots=True)
class TrafficStats:
    """Bytes and messages one rank sent and received; `cross_*` only over node boundaries."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    messages: int = 0
    cross_bytes_sent: int = 0
    cross_bytes_recv: int = 0
    cross_messages: int = 0
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # layer -> [cross sent, cross recv, cross msgs]

    def add(self, nbytes: int, sent: bool, cross: bool, layer: int | None) -> None:
        self.messages += 1
        if sent:
            self.bytes_sent += nbytes
        else:
            self.bytes_recv += nbytes
        if not cross:
            return
        self.cross_messages += 1
        if sent:
            self.cross_bytes_sent += nbytes
        else:
            self.cross_bytes_recv += nbytes
        if layer is not None:
            row = self.per_layer.setdefault(layer, [0, 0, 0])
            row[0 if sent else 1] += nbytes
            row[2] += 1

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("bytes_sent", "bytes_recv", "messages", "cross_bytes_sent",
                                           "cross_bytes_recv", "cross_messages")}
        d["per_layer"] = {layer: list(v) for layer, v in sorted(self.per_layer.items())}
        return d


def free_endpoint() -> tuple[str, int]:
    """An address of this host other actors can reach, and a port free right now."""
    ip = socket.gethostbyname(socket.gethostname())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


class Transport:
    """One rank of the data-plane group. `node_of[r]` is the Ray node id of rank r."""

    def __init__(self, rank: int, node_of: list[str], timeout_s: float) -> None:
        self.rank, self.node_of, self.timeout_s = rank, node_of, timeout_s
        self.stats = TrafficStats()

    def connect(self, master: tuple[str, int]) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=len(self.node_of),
                                timeout=datetime.timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _count(self, t: torch.Tensor, peer: int, sent: bool, layer: int | None) -> None:
        self._count_bytes(t.numel() * t.element_size(), peer, sent, layer)

    def _count_bytes(self, nbytes: int, peer: int, sent: bool, layer: int | None) -> None:
        cross = self.node_of[peer] != self.node_of[self.rank]
        self.stats.add(nbytes, sent, cross, layer)

    def isend(self, t: torch.Tensor, dst: int, layer: int | None = None):
        self._count(t, dst, True, layer)
        return dist.isend(t.contiguous(), dst)

    def isend_parts(self, parts: list[np.ndarray], dst: int, layer: int | None = None):
        """Send byte arrays as one message (here joined into one tensor first)."""
        return self.isend(torch.from_numpy(np.concatenate(parts)), dst, layer)

    def irecv(self, t: torch.Tensor, src: int, layer: int | None = None):
        self._count(t, src, False, layer)
        return dist.irecv(t, src)

    def recv_message(self, buf: torch.Tensor, src: int, layer: int | None,
                     size_of: Callable[[torch.Tensor], int]) -> torch.Tensor:
        """Receive a message of at most `buf`'s size into it (gloo accepts a shorter one); it counts
        as the `size_of(buf)` bytes the message says it holds."""
        wait(dist.irecv(buf, src))
        self._count_bytes(size_of(buf), src, False, layer)
        return buf

    def take_stats(self) -> TrafficStats:
        stats, self.stats = self.stats, TrafficStats()
        return stats


def wait(work) -> None:
    """Wait for a send/receive, turning gloo's timeout or broken-pipe errors into TransportError."""
    try:
        work.wait()
    except TransportError:
        raise
    except RuntimeError as exc:
        raise TransportError(f"data plane: {exc}") from exc
