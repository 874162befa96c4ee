"""The TCP data plane between real sockets: ranks on threads of this process, as actors use it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cluster.socket_transport import SocketTransport
from cluster.transport import TransportError, free_endpoint, wait


def _group(world: int, timeout_s: float = 5.0, nodes: list[str] | None = None) -> list[SocketTransport]:
    """`world` connected ranks (they connect concurrently, as the actors do)."""
    ranks = [SocketTransport(r, nodes or [f"n{r}" for r in range(world)], timeout_s) for r in range(world)]
    master = free_endpoint()
    threads = [threading.Thread(target=t.connect, args=(master,)) for t in ranks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert all(len(t.peers) == world - 1 for t in ranks)
    return ranks


def _run(*jobs):
    """Run each job on its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def guard(job):
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(j,)) for j in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    if errors:
        raise errors[0]


def test_messages_of_every_size_arrive_in_order_with_their_bytes_counted():
    a, b = _group(2)
    sizes = [0, 1, 17, 4096, 9 << 20]  # 9 MiB: more than the kernel holds, so it needs both sides to progress
    sent = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    floats = torch.randn(33, 7, dtype=torch.bfloat16)
    got = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    got_floats = torch.empty_like(floats)

    def sender():
        works = [a.isend(t, 1, layer=3) for t in sent] + [a.isend(floats, 1)]
        for w in works:
            wait(w)

    def receiver():
        works = [b.irecv(t, 0, layer=3) for t in got] + [b.irecv(got_floats, 0)]
        for w in reversed(works):  # waiting on the last drives the earlier ones too
            wait(w)

    _run(sender, receiver)
    assert all(torch.equal(x, y) for x, y in zip(sent, got)) and torch.equal(floats, got_floats)
    total = sum(sizes) + floats.numel() * 2
    sa, sb = a.take_stats(), b.take_stats()
    assert (sa.cross_bytes_sent, sb.cross_bytes_recv, sa.messages, sb.messages) == (total, total, 6, 6)
    assert sa.per_layer == {3: [sum(sizes), 0, 5]}


@pytest.mark.parametrize("big", [False, True])
def test_a_message_sent_in_parts_arrives_as_their_concatenation(big):
    """isend_parts gathers arrays from where they lie (one sendmsg); 6 MiB parts need several calls
    that stop inside a part and inside the list, and both sides to progress."""
    a, b = _group(2)
    rng = np.random.default_rng(0)
    sizes = (24, 0, 6 << 20, 5, 6 << 20) if big else (24, 0, 100, 5)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    parts[0] = parts[0].reshape(3, 8)  # a 2-D part goes row by row
    expected = np.concatenate([p.reshape(-1) for p in parts])
    inbox = torch.empty(expected.size + 64, dtype=torch.uint8)  # larger than the message, as a shard's

    def sender():
        wait(a.isend_parts(parts, 1, layer=2))

    def receiver():
        b.recv_message(inbox, 0, 2, lambda m: expected.size)

    _run(sender, receiver)
    assert np.array_equal(inbox[: expected.size].numpy(), expected)
    assert a.take_stats().per_layer == {2: [expected.size, 0, 1]} and b.take_stats().bytes_recv == expected.size


def test_two_ranks_sending_large_messages_to_each_other_do_not_block():
    """Each posts its receive first, then sends 16 MiB; neither waits for the other to stop sending."""
    a, b = _group(2)
    big = [torch.full((16 << 20,), r, dtype=torch.uint8) for r in (1, 2)]
    inbox = [torch.empty(16 << 20, dtype=torch.uint8) for _ in range(2)]

    def exchange(me: SocketTransport, peer: int):
        recv = me.irecv(inbox[me.rank], peer)
        send = me.isend(big[me.rank], peer)
        wait(send)
        wait(recv)

    _run(lambda: exchange(a, 1), lambda: exchange(b, 0))
    assert bool((inbox[0] == 2).all()) and bool((inbox[1] == 1).all())


def test_a_shorter_message_fills_a_larger_buffer_and_an_exact_receive_refuses_a_wrong_size():
    a, b = _group(2)
    buf = torch.zeros(64, dtype=torch.uint8)
    wait(a.isend(torch.arange(10, dtype=torch.uint8), 1))
    b.recv_message(buf, 0, layer=None, size_of=lambda m: 10)
    assert buf[:10].tolist() == list(range(10)) and int(buf[10:].sum()) == 0
    wait(a.isend(torch.arange(10, dtype=torch.uint8), 1))
    with pytest.raises(TransportError, match="sent 10 bytes to a receive of 8"):
        wait(b.irecv(torch.empty(8, dtype=torch.uint8), 0))


def test_a_peer_that_closes_fails_the_waiter_at_once_and_a_silent_one_after_the_timeout():
    a, b, c = _group(3, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(TransportError, match="waited 1 s"):
        wait(a.irecv(torch.empty(4, dtype=torch.uint8), 1))  # rank 1 never sends
    assert 0.9 < time.monotonic() - start < 3
    c.close()  # as a killed actor's sockets are
    start = time.monotonic()
    with pytest.raises(TransportError, match="rank 2 closed the connection"):
        wait(a.irecv(torch.empty(4, dtype=torch.uint8), 2))
    assert time.monotonic() - start < 0.5
    b.close()


def test_a_rank_can_reconnect_to_a_new_group():
    a, b = _group(2)
    old = list(a.peers.values())[0].sock
    master = free_endpoint()
    _run(lambda: a.connect(master), lambda: b.connect(master))  # as after a recovery
    assert old.fileno() == -1  # the old connection is closed
    wait(a.isend(torch.ones(3, dtype=torch.uint8), 1))
    got = torch.empty(3, dtype=torch.uint8)
    wait(b.irecv(got, 0))
    assert got.tolist() == [1, 1, 1]


def test_an_unknown_transport_is_refused_by_name():
    from cluster.config import EngineConfig

    with pytest.raises(ValueError, match="transport must be one of tcp, gloo, got 'mpi'"):
        EngineConfig(model="m", transport="mpi")
