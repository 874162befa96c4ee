"""One Ray Serve application per test module, on the session's local Ray cluster (tests/conftest.py)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "tiny-olmoe"
MAX_MODEL_LEN = 8192  # LONG requests decode for seconds, so cancellations reliably land mid-request
MAX_NUM_SEQS = 4
MAX_WAITING = 8
GRPC_SERVICER = "protos.moe_serve_pb2_grpc.add_MoeServeServicer_to_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServeApp:
    url: str  # http://host:port
    grpc_address: str  # host:port of Serve's gRPC proxy
    model: str
    model_dir: Path


def serving_model(tiny_model) -> Path:
    """The tiny OLMoE every serving test serves, with room for MAX_MODEL_LEN positions."""
    return tiny_model("olmoe", max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def serve_app(ray_cluster, tiny_model):
    """The moe-serve application (tiny OLMoE) behind Serve's HTTP and gRPC proxies on free ports."""
    from ray import serve

    from cluster.serve_app import build_app

    model_dir = serving_model(tiny_model)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]})
    serve.run(build_app({"model": str(model_dir), "served_model_name": MODEL, "max_model_len": MAX_MODEL_LEN,
                         "kv_cache_tokens": MAX_NUM_SEQS * MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS,
                         "max_waiting": MAX_WAITING}),
              name="moe-serve-test", route_prefix="/")
    yield ServeApp(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", MODEL, model_dir)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=60.0) as c:
        yield c


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def engine_stats(client: httpx.Client) -> dict:
    response = client.get("/v1/stats")
    response.raise_for_status()
    return response.json()


def idle(client: httpx.Client) -> bool:
    s = engine_stats(client)
    return s["running"] == 0 and s["waiting"] == 0 and s["num_requests"] == 0
