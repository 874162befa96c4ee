"""`moe-serve up` as a user runs it: a subprocess that starts its own Ray cluster, serves, stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from tests.serve.conftest import free_port

STARTUP_S = 180


def wait_for_line(proc: subprocess.Popen, marker: str, seen: list[str]) -> bool:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            return False
        seen.append(line)
        if marker in line:
            return True
    return False


@contextmanager
def cli_process(*args: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`moe-serve ARGS` as a subprocess (stdout and stderr merged), killed if still running at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("engine", ["inprocess", "ray"])
def test_up_serves_http_and_stops_cleanly_on_ctrl_c(tiny_model, engine):
    """With engine ray the replica starts attention and shard actors beside itself on the local cluster."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    seen: list[str] = []
    with cli_process("up", "--model", str(tiny_model("olmoe")), "--served-model-name", "tiny", "--http-port",
                     str(http_port), "--grpc-port", str(grpc_port), "--max-model-len", "256", "--expert-cache", "0.5",
                     "--expert-cache-prefetch", "--route-prediction", "--engine", engine, env=env) as proc:
        assert wait_for_line(proc, "Press Ctrl-C", seen), "".join(seen)
        banner = "".join(seen)
        assert f"http://127.0.0.1:{http_port}/v1" in banner and f"127.0.0.1:{grpc_port}" in banner
        assert "curl http://127.0.0.1" in banner
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
            done = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
            metrics = client.get("/v1/stats").json()["metrics"]  # the MoE metrics of the options above
            assert 0.0 <= metrics["expert_cache_hit_rate"] <= 1.0 and 0.0 <= metrics["route_prediction_recall/1"] <= 1.0
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "moe-serve: stopped" in out


def test_up_refuses_bad_args_before_starting_anything(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--model", str(tmp_path), "--max-model-len",
                          "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "max_model_len" in res.stderr, res.stderr
    assert "Ray" not in res.stdout + res.stderr.split("error:")[0]  # no cluster was started


def test_standalone_grpc_server_serves_and_stops_on_sigterm(tiny_model):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos import moe_serve_pb2 as pb
    from protos import moe_serve_pb2_grpc

    port = free_port()
    seen: list[str] = []
    with cli_process("grpc", "--model", str(tiny_model("olmoe")), "--served-model-name", "tiny", "--port",
                     str(port), "--max-model-len", "256") as proc:
        assert wait_for_line(proc, "serving", seen), "".join(seen)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            outs = list(moe_serve_pb2_grpc.MoeServeStub(channel).Generate(
                pb.GenerateRequest(model="tiny", text="hi", max_tokens=4, temperature=0.0, ignore_eos=True)))
            assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 4
            assert outs[-1].usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out, out


def test_standalone_grpc_server_with_a_bad_model_says_why_and_exits(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "grpc", "--model", str(tmp_path), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "missing config.json" in res.stderr, res.stderr
