"""The actor classes without Ray: an attention worker and two expert shards in this process, on
threads, over the real tcp data plane, against the in-process model (on CUDA too when present)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from cluster.actors import ActorConfig, AttentionActor, Topology
from cluster.shard_actor import ShardActor
from cluster.batch import build_batch
from cluster.model import InProcessModel
from cluster.scheduler import ScheduledChunk, SchedulerOutput
from cluster.transport import free_endpoint
from experts.config import load_spec
from kernels.dispatch import select_kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
BLOCK = 4


@pytest.fixture
def restore_process_state():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # an actor sets its process's thread count and freezes its heap
    gc.unfreeze()


@pytest.mark.parametrize("device", DEVICES)
def test_attention_worker_and_two_shards_match_the_in_process_model(tiny_model, device, restore_process_state):
    path = tiny_model("olmoe")
    spec = load_spec(path)
    E = spec.num_experts
    cfg = ActorConfig(model=str(path), device=device, transport_timeout_s=20.0)
    attention = AttentionActor(cfg, num_kv_slots=64)
    shards = [ShardActor(cfg, {layer: tuple(e for e in range(E) if e % 2 == s) for layer in spec.moe_layers})
              for s in range(2)]
    topology = Topology(free_endpoint(), ("n0", "n1", "n2"), 1,
                        {layer: tuple(e % 2 for e in range(E)) for layer in spec.moe_layers})
    actors = [attention, *shards]
    connecting = [threading.Thread(target=a.connect, args=(rank, topology)) for rank, a in enumerate(actors)]
    for th in connecting:
        th.start()
    for th in connecting:
        th.join(timeout=60)

    prompt = tuple(range(3, 22))
    chunk = ScheduledChunk(0, prompt, 0, tuple(range(-(-len(prompt) // BLOCK))), True)
    batch = build_batch(SchedulerOutput((chunk,)), BLOCK, spec.sliding_window, torch.device("cpu"))  # as the driver
    served: list[dict] = []
    serving = [threading.Thread(target=lambda s=s: served.append(s.serve_step([1], len(prompt)))) for s in shards]
    for th in serving:
        th.start()
    result = attention.step([batch], record_routes=True, shard_hits=True)
    for th in serving:
        th.join(timeout=60)
    for a in actors:
        a.disconnect()

    reference = InProcessModel.load(path, torch.float32, torch.device(device), 64,
                                    select_kernels(torch.device(device), "auto", torch.float32), BLOCK)
    expected = reference.forward(batch.to(torch.device(device))).cpu()
    assert result.logits.device.type == "cpu" and result.logits.shape == expected.shape
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert result.logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    assert len(served) == 2 and all(s["bytes_recv"] > 0 for s in served)  # both shards served tokens
    hits = [[0, 0] for _ in prompt]  # per token: the MoE layers at which it reached each shard (e % 2)
    for ids, _ in result.routes[0].values():
        for t, experts in enumerate(ids):
            for s in {e % 2 for e in experts}:
                hits[t][s] += 1
    assert result.shard_hits[0].tolist() == hits and sum(map(sum, hits)) > len(prompt)
