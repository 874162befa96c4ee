"""The data plane over plain TCP sockets, driven by the calling thread (no I/O threads).

Same interface and counters as the gloo `Transport`. Gloo moves every message through its own I/O
threads on both sides; on a small VM each of those wake-ups costs a context switch, and a 16 KB
round trip between two idle processes took 0.32 ms over gloo against 0.08 ms over a socket read
and written by the waiting thread itself (measured on the 2-core development VM). Here a send is
written at once as far as the socket takes it, and whatever is left, and every posted receive,
progresses while the thread waits for any operation (`poll` over the peers), so two peers that
send to each other at the same time cannot block each other as long as each has posted the
receive for the other's message first, which the data plane always does. The flip side: a
message larger than the socket buffers (SOCKET_BUFFER; a large prefill chunk) finishes leaving
only while its sender waits, not while it computes, as it would with gloo's I/O threads.

Framing: an 8-byte little-endian length, then the bytes; `isend_parts` writes a message whose
parts lie in several arrays with one gathering `sendmsg`, without joining them first. Messages on
a pair arrive in the order sent and fill the receives posted for that peer in the order posted,
as with gloo. Every rank listens, publishes its address in a `torch.distributed.TCPStore` hosted
by rank 0 at the topology's master endpoint, connects to every lower rank and accepts the higher
ones. A peer that dies closes its sockets, so the ranks talking to it fail at once; one that stops
answering fails them after `timeout_s`.
"""

from __future__ import annotations

import datetime
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from cluster.transport import Transport, TransportError

LENGTH = struct.Struct("<Q")
SOCKET_BUFFER = 4 << 20  # bytes the kernel may hold per direction, so decode-sized messages leave at once


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise TransportError(f"data plane: the tcp transport needs contiguous CPU tensors, got {t.device}")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()).cast("B")


class _Send:
    def __init__(self, data: list[memoryview], keep: object) -> None:
        self.keep = keep  # the memory behind `data`, alive until written
        self.nbytes = sum(len(d) for d in data)
        self.parts = [memoryview(LENGTH.pack(self.nbytes)), *(d for d in data if len(d))]
        self.done = False

    def write(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes (all parts in one gathering call); True once all is written."""
        while self.parts:
            n = sock.sendmsg(self.parts)
            while self.parts and n >= len(self.parts[0]):
                n -= len(self.parts.pop(0))
            if self.parts and n:
                self.parts[0] = self.parts[0][n:]
            if self.parts:
                return False
        self.done = True
        return True


class _Recv:
    def __init__(self, t: torch.Tensor, exact: bool) -> None:
        self.tensor, self.view, self.exact = t, _bytes(t), exact
        self.head, self.got_head = bytearray(LENGTH.size), 0
        self.size: int | None = None
        self.got = 0
        self.done = False

    def read(self, sock: socket.socket, peer: int) -> bool:
        """Read as much of this message as has arrived; True once it is complete."""
        while self.size is None:
            n = sock.recv_into(memoryview(self.head)[self.got_head:])
            if n == 0:
                raise TransportError(f"data plane: rank {peer} closed the connection")
            self.got_head += n
            if self.got_head == LENGTH.size:
                (self.size,) = LENGTH.unpack(self.head)
                if self.size > len(self.view) or (self.exact and self.size != len(self.view)):
                    raise TransportError(f"data plane: rank {peer} sent {self.size} bytes to a receive of "
                                         f"{len(self.view)}")
        while self.got < self.size:
            n = sock.recv_into(self.view[self.got:self.size])
            if n == 0:
                raise TransportError(f"data plane: rank {peer} closed the connection")
            self.got += n
        self.done = True
        return True


class _Peer:
    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank, self.sock = rank, sock
        self.sends: deque[_Send] = deque()
        self.recvs: deque[_Recv] = deque()

    def write(self) -> None:
        try:
            while self.sends and self.sends[0].write(self.sock):
                self.sends.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            raise TransportError(f"data plane: sending to rank {self.rank}: {exc}") from exc

    def read(self) -> None:
        try:
            while self.recvs and self.recvs[0].read(self.sock, self.rank):
                self.recvs.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            raise TransportError(f"data plane: receiving from rank {self.rank}: {exc}") from exc


class _Work:
    """What `isend`/`irecv` return; `wait()` drives the transport until the operation is done."""

    def __init__(self, transport: "SocketTransport", op: _Send | _Recv) -> None:
        self.transport, self.op = transport, op

    def wait(self) -> None:
        self.transport.progress_until(self.op)


class SocketTransport(Transport):
    """One rank of the data plane over TCP sockets; see the module docstring."""

    def __init__(self, rank: int, node_of: list[str], timeout_s: float) -> None:
        super().__init__(rank, node_of, timeout_s)
        self.peers: dict[int, _Peer] = {}
        self._by_fd: dict[int, _Peer] = {}
        self._store: dist.TCPStore | None = None

    def connect(self, master: tuple[str, int]) -> None:
        self.close()
        world, timeout = len(self.node_of), datetime.timedelta(seconds=self.timeout_s)
        self._store = dist.TCPStore(master[0], master[1], world, self.rank == 0, timeout=timeout)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("", 0))
            listener.listen(world)
            listener.settimeout(self.timeout_s)
            ip = socket.gethostbyname(socket.gethostname())
            self._store.set(f"moe-serve/data-plane/{self.rank}", f"{ip}:{listener.getsockname()[1]}")
            for lower in range(self.rank):  # connects complete in the peers' listen backlogs
                host, port = self._store.get(f"moe-serve/data-plane/{lower}").decode().rsplit(":", 1)
                sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
                sock.sendall(LENGTH.pack(self.rank))
                self._add(lower, sock)
            for _ in range(self.rank + 1, world):
                sock, _ = listener.accept()
                sock.settimeout(self.timeout_s)
                (higher,) = LENGTH.unpack(_recv_exactly(sock, LENGTH.size))
                self._add(higher, sock)

    def _add(self, rank: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setblocking(False)
        self.peers[rank] = _Peer(rank, sock)
        self._by_fd[sock.fileno()] = self.peers[rank]

    def close(self) -> None:
        for peer in self.peers.values():
            peer.sock.close()
        self.peers, self._by_fd, self._store = {}, {}, None

    def _peer(self, rank: int) -> _Peer:
        if rank not in self.peers:
            raise TransportError(f"data plane: rank {self.rank} has no connection to rank {rank}")
        return self.peers[rank]

    def isend(self, t: torch.Tensor, dst: int, layer: int | None = None) -> _Work:
        t = t.contiguous()
        return self._send([_bytes(t)], t, dst, layer)

    def isend_parts(self, parts: list[np.ndarray], dst: int, layer: int | None = None) -> _Work:
        """Send byte arrays as one message, gathered from where they lie (no joining copy)."""
        return self._send([memoryview(np.ascontiguousarray(p)).cast("B") for p in parts], parts, dst, layer)

    def _send(self, data: list[memoryview], keep: object, dst: int, layer: int | None) -> _Work:
        peer, op = self._peer(dst), _Send(data, keep)
        self._count_bytes(op.nbytes, dst, True, layer)
        peer.sends.append(op)
        peer.write()  # as far as the socket takes it now; the rest while someone waits
        return _Work(self, op)

    def irecv(self, t: torch.Tensor, src: int, layer: int | None = None) -> _Work:
        self._count(t, src, False, layer)
        return self._post(t, src, exact=True)

    def recv_message(self, buf: torch.Tensor, src: int, layer: int | None,
                     size_of: Callable[[torch.Tensor], int]) -> torch.Tensor:
        self._post(buf, src, exact=False).wait()
        self._count_bytes(size_of(buf), src, False, layer)
        return buf

    def _post(self, t: torch.Tensor, src: int, exact: bool) -> _Work:
        op = _Recv(t, exact)
        self._peer(src).recvs.append(op)
        return _Work(self, op)

    def progress_until(self, op: _Send | _Recv) -> None:
        """Move every pending send and posted receive until `op` is done (TransportError after
        timeout_s without it)."""
        deadline = time.monotonic() + self.timeout_s
        while not op.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"data plane: rank {self.rank} waited {self.timeout_s:g} s for a peer")
            if not self.peers:
                raise TransportError("data plane: the transport is closed")
            poller = select.poll()  # not select(): an actor process may hold descriptors above 1024
            for fd, peer in self._by_fd.items():
                events = (select.POLLIN if peer.recvs else 0) | (select.POLLOUT if peer.sends else 0)
                if events:
                    poller.register(fd, events)
            for fd, events in poller.poll(left * 1e3):
                peer = self._by_fd[fd]
                if events & select.POLLOUT:
                    peer.write()
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    peer.read()  # a hang-up or error shows as a failed or empty read


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TransportError("data plane: a peer closed the connection while connecting")
        data += chunk
    return data
