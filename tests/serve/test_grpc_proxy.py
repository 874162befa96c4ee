"""gRPC through Ray Serve's own gRPC proxy: the moe-serve application (cluster.serve_app:build_app) on the
session's local Ray cluster, called by a real grpc client with the `application` metadata.

The app streams at most one message per second (STREAM_INTERVAL_S). Ray Serve's proxy forwards a
client's cancel or deadline to the replica only when it arrives while the proxy waits for the next
message; one that lands while the proxy is writing a message is lost (ray-project/ray#42665, never
merged), and the replica then runs the request to max_tokens. With a 1 s gap the proxy spends nearly
all its time waiting, so the cancel tests check our side (the replica's generator closing aborts the
engine request) and not that race."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from experts.config import load_spec
from protos import moe_serve_pb2 as pb
from protos import moe_serve_pb2_grpc
from tests.serve.conftest import MAX_MODEL_LEN, free_port, serving_model, wait_until

APP = "moe-grpc-test"
MODEL = "tiny-olmoe"
SERVICERS = ["protos.moe_serve_pb2_grpc.add_MoeServeServicer_to_server",
             "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
METADATA = (("application", APP),)
LONG = dict(max_tokens=MAX_MODEL_LEN - 8, temperature=0.0, ignore_eos=True)  # seconds of decoding
STREAM_INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model):
    """(gRPC channel to Serve's proxy, deployment handle); Serve runs only for this module."""
    from ray import serve

    from cluster.serve_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": SERVICERS})
    handle = serve.run(build_app({"model": str(serving_model(tiny_model)), "served_model_name": MODEL,
                                  "max_model_len": MAX_MODEL_LEN, "kv_cache_tokens": 2 * MAX_MODEL_LEN,
                                  "stream_interval_s": STREAM_INTERVAL_S}),
                       name=APP, route_prefix="/")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # serve.run returns once the replica is up; the proxy learns the route a moment later
        assert wait_until(lambda: _routed(channel), timeout=60), f"the gRPC proxy never routed {APP}"
        yield channel, handle
    serve.shutdown()


def _routed(channel: grpc.Channel) -> bool:
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    try:
        names = serve_pb2_grpc.RayServeAPIServiceStub(channel).ListApplications(serve_pb2.ListApplicationsRequest())
    except grpc.RpcError:
        return False
    return APP in names.application_names


@pytest.fixture
def stub(app):
    return moe_serve_pb2_grpc.MoeServeStub(app[0])


def stats(app) -> dict:
    return app[1].stats.remote().result(timeout_s=30)


def aborted(app) -> float:
    return stats(app)["metrics"].get("finished/abort", 0)


def test_generate_streams_what_the_engine_generates(stub, tiny_model):
    request = pb.GenerateRequest(text="hello", max_tokens=10, temperature=0.0, ignore_eos=True, request_id="p-1")
    responses = list(stub.Generate(request, metadata=METADATA))
    reference = LLMEngine(EngineConfig(model=str(serving_model(tiny_model)))).generate(
        ["hello"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert len(responses) > 1 and {r.request_id for r in responses} == {"p-1"}
    assert tuple(t for r in responses for t in r.new_token_ids) == reference.token_ids
    assert "".join(r.new_text for r in responses) == reference.text
    assert responses[-1].finished and responses[-1].finish_reason == "length"
    assert responses[-1].usage.completion_tokens == 10
    assert responses[-1].usage.prompt_tokens == reference.num_prompt_tokens


def test_model_info(stub, tiny_model):
    spec = load_spec(serving_model(tiny_model))
    info = stub.GetModelInfo(pb.ModelInfoRequest(), metadata=METADATA)
    assert (info.name, info.family, info.vocab_size, info.max_model_len) == (
        MODEL, spec.family, spec.vocab_size, MAX_MODEL_LEN)
    assert (info.num_layers, info.num_experts, info.top_k) == (spec.num_layers, spec.num_experts, spec.top_k)


@pytest.mark.parametrize("request_, code, words", [
    (pb.GenerateRequest(text="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    (pb.GenerateRequest(text="hi", max_tokens=MAX_MODEL_LEN), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
    (pb.GenerateRequest(text="hi", model="other"), grpc.StatusCode.NOT_FOUND, "'other'"),
])
def test_errors_keep_their_status_through_the_proxy(stub, request_, code, words):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, metadata=METADATA))
    assert info.value.code() == code and words in info.value.details()


def test_cancel_and_deadline_abort_the_engine_request(app, stub):
    before = aborted(app)
    call = stub.Generate(pb.GenerateRequest(text="hi", **LONG), metadata=METADATA)
    assert not next(call).finished
    time.sleep(STREAM_INTERVAL_S / 4)  # the proxy has finished writing that message and waits for the next
    call.cancel()
    assert wait_until(lambda: aborted(app) == before + 1), stats(app)
    call = stub.Generate(pb.GenerateRequest(text="hi", **LONG), metadata=METADATA,
                       timeout=1.5 * STREAM_INTERVAL_S)  # the deadline falls half-way between two messages
    assert not next(call).finished  # the engine has the request; the deadline passes mid-generation
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: aborted(app) == before + 2), stats(app)
    assert wait_until(lambda: stats(app)["num_requests"] == 0)


def test_standard_health_service(app):
    health = health_pb2_grpc.HealthStub(app[0])
    for service in ("", "moeserve.v1.MoeServe"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=METADATA)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=METADATA)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=METADATA)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_through_the_proxy(app):
    services = set(ProtoReflectionDescriptorDatabase(app[0]).get_services())
    assert {"moeserve.v1.MoeServe", "grpc.health.v1.Health"} <= services
