"""Standalone gRPC server (cluster.grpc_service.serve_grpc) with a real grpc client and a tiny OLMoE engine."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.async_engine import AsyncLLMEngine
from cluster.config import EngineConfig
from cluster.grpc_service import GrpcMethods, serve_grpc, to_engine_args
from cluster.sampling_params import SamplingParams
from experts.config import load_spec
from protos import moe_serve_pb2 as pb
from protos import moe_serve_pb2_grpc
from tests.serve.conftest import MAX_MODEL_LEN, free_port, serving_model

MODEL = "tiny-olmoe"
LONG = dict(max_tokens=MAX_MODEL_LEN - 8, temperature=0.0, ignore_eos=True)  # seconds of decoding here


@pytest.fixture(scope="module")
def loop():
    """The servers' event loop, on its own thread; tests talk to them with blocking clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def on(loop, coro, timeout: float = 30.0):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def make_engine(tiny_model) -> AsyncLLMEngine:
    config = EngineConfig(model=str(serving_model(tiny_model)), kv_cache_tokens=2 * MAX_MODEL_LEN, block_size=8,
                          max_model_len=MAX_MODEL_LEN)
    return AsyncLLMEngine(config, model_name=MODEL)


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = make_engine(tiny_model)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def channel(loop, engine):
    port = free_port()
    server = on(loop, serve_grpc(engine, MODEL, port, host="127.0.0.1"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    on(loop, server.stop(None))


@pytest.fixture
def stub(channel):
    return moe_serve_pb2_grpc.MoeServeStub(channel)


def direct(loop, engine, prompt, params):
    """The engine's own stream for the same request: (token ids, text)."""
    async def collect():
        outs = [o async for o in engine.generate(prompt, params)]
        return outs[-1].token_ids, outs[-1].text
    return on(loop, collect())


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---- conversion --------------------------------------------------------------------------------
def test_unset_fields_take_sampling_defaults_and_zero_temperature_is_kept():
    prompt, params = to_engine_args(pb.GenerateRequest(text="hi"))
    assert prompt == "hi" and params == SamplingParams()
    _, params = to_engine_args(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), temperature=0.0,
                                                  top_k=3, seed=7, stop=["x"], max_tokens=5))
    assert params.greedy and (params.top_k, params.seed, params.stop, params.max_tokens) == (3, 7, ("x",), 5)


# ---- Generate / GetModelInfo -------------------------------------------------------------------
def test_generate_streams_the_engine_output(loop, engine, stub):
    responses = list(stub.Generate(pb.GenerateRequest(text="hello", max_tokens=12, temperature=0.0,
                                                      ignore_eos=True, request_id="r-text")))
    ids, text = direct(loop, engine, "hello", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert len(responses) > 1 and all(r.request_id == "r-text" for r in responses)
    assert [r.finished for r in responses] == [False] * (len(responses) - 1) + [True]
    assert tuple(t for r in responses for t in r.new_token_ids) == ids
    assert "".join(r.new_text for r in responses) == text
    last = responses[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(engine.tokenizer.encode("hello")), 12)


def test_token_id_prompt(loop, engine, stub):
    prompt = [5, 6, 7, 200]
    responses = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=6,
                                                      temperature=0.0, ignore_eos=True)))
    ids, _ = direct(loop, engine, prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert tuple(t for r in responses for t in r.new_token_ids) == ids
    assert responses[-1].usage.prompt_tokens == len(prompt) and responses[0].request_id


def test_penalties_and_logit_bias_reach_the_engine(loop, engine, stub):
    request = pb.GenerateRequest(text="hello", max_tokens=8, temperature=0.0, ignore_eos=True, frequency_penalty=1.5,
                                 repetition_penalty=1.3, logit_bias={7: 3.0, 9: -100.0}, stop_token_ids=[11, 12],
                                 min_tokens=6)
    _, params = to_engine_args(request)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (1.5, 0.0, 1.3)
    assert (params.logit_bias, params.stop_token_ids, params.min_tokens) == (((7, 3.0), (9, -100.0)), (11, 12), 6)
    ids, _ = direct(loop, engine, "hello", params)
    plain, _ = direct(loop, engine, "hello", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert tuple(t for r in stub.Generate(request) for t in r.new_token_ids) == ids != plain


def test_logprobs_and_prompt_logprobs(loop, engine, stub):
    prompt = [5, 6, 7, 200, 9]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=6, temperature=0.0, ignore_eos=True,
                                 logprobs=2, prompt_logprobs=1)
    responses = list(stub.Generate(request))
    _, params = to_engine_args(request)

    async def final():
        return [o async for o in engine.generate(prompt, params)][-1]

    want = on(loop, final())
    got = [lp for r in responses for lp in r.new_logprobs]
    assert [lp.token_id for lp in got] == list(want.token_ids)
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-6)
    assert all([t.token_id for t in lp.top] == [t for t, _ in w.top] for lp, w in zip(got, want.logprobs))
    assert [len(r.prompt_logprobs) for r in responses] == [len(prompt) - 1] + [0] * (len(responses) - 1)
    assert [lp.token_id for lp in responses[0].prompt_logprobs] == prompt[1:]
    assert [lp.logprob for lp in responses[0].prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in want.prompt_logprobs], abs=1e-6)


def test_model_info(stub, tiny_model):
    spec = load_spec(serving_model(tiny_model))
    info = stub.GetModelInfo(pb.ModelInfoRequest())
    assert (info.name, info.family, info.vocab_size, info.max_model_len) == (
        MODEL, "olmoe", spec.vocab_size, MAX_MODEL_LEN)
    assert (info.num_layers, info.num_experts, info.top_k) == (spec.num_layers, spec.num_experts, spec.top_k)
    assert stub.GetModelInfo(pb.ModelInfoRequest(model=MODEL)) == info


BAD = {
    "temperature": (pb.GenerateRequest(text="hi", temperature=-1.0), "temperature"),
    "top_p": (pb.GenerateRequest(text="hi", top_p=0.0), "top_p"),
    "max_tokens": (pb.GenerateRequest(text="hi", max_tokens=-3), "max_tokens"),
    "empty_stop": (pb.GenerateRequest(text="hi", stop=[""]), "stop"),
    "token_range": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), "out of range"),
    "negative_token": (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "out of range"),
    "empty_text": (pb.GenerateRequest(text=""), "empty"),
    "empty_ids": (pb.GenerateRequest(token_ids=pb.TokenIds()), "empty"),
    "no_prompt": (pb.GenerateRequest(max_tokens=3), "prompt is required"),
    "too_long": (pb.GenerateRequest(text="hi", max_tokens=MAX_MODEL_LEN), "max_model_len"),
    "penalty": (pb.GenerateRequest(text="hi", presence_penalty=3.0), "presence_penalty"),
    "repetition": (pb.GenerateRequest(text="hi", repetition_penalty=-1.0), "repetition_penalty"),
    "bias_value": (pb.GenerateRequest(text="hi", logit_bias={5: 200.0}), "logit_bias"),
    "bias_token": (pb.GenerateRequest(text="hi", logit_bias={10**6: 1.0}), "logit_bias token ids out of range"),
    "stop_token": (pb.GenerateRequest(text="hi", stop_token_ids=[10**6]), "stop_token_ids token ids out of range"),
    "min_tokens": (pb.GenerateRequest(text="hi", max_tokens=4, min_tokens=5), "min_tokens"),
    "logprobs": (pb.GenerateRequest(text="hi", logprobs=21), "logprobs"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_invalid_argument(stub, name):
    request, words = BAD[name]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()


def test_unknown_model_is_not_found(stub):
    for call in (lambda: list(stub.Generate(pb.GenerateRequest(model="other", text="hi"))),
                 lambda: stub.GetModelInfo(pb.ModelInfoRequest(model="other"))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'other'" in info.value.details()


# ---- cancellation and deadlines abort the engine request ---------------------------------------
def aborted(engine) -> float:
    return engine.stats()["metrics"].get("finished/abort", 0)


def test_client_cancel_aborts_the_request(engine, stub):
    before = aborted(engine)
    call = stub.Generate(pb.GenerateRequest(text="hi", **LONG))
    first = next(call)
    assert not first.finished
    call.cancel()
    assert wait_until(lambda: aborted(engine) == before + 1), engine.stats()
    assert wait_until(lambda: engine.stats()["num_requests"] == 0 and engine.stats()["running"] == 0)


def test_deadline_aborts_the_request(engine, stub):
    before = aborted(engine)
    call = stub.Generate(pb.GenerateRequest(text="hi", **LONG), timeout=1.0)
    assert not next(call).finished  # the engine has the request; the deadline passes mid-generation
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: aborted(engine) == before + 1), engine.stats()
    assert wait_until(lambda: engine.stats()["num_requests"] == 0)


# ---- health and reflection ---------------------------------------------------------------------
def check(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_serving_and_unknown_service(channel):
    assert check(channel) == check(channel, "moeserve.v1.MoeServe") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        check(channel, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_follows_engine_loading_and_shutdown(loop, tiny_model):
    """NOT_SERVING (generate: UNAVAILABLE) while the engine loads, SERVING once loaded, NOT_SERVING after
    shutdown, which ends a running generate with ABORTED."""
    port = free_port()
    pending = on(loop, _future())
    server = on(loop, serve_grpc(pending, MODEL, port, host="127.0.0.1"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert check(channel) == check(channel, "moeserve.v1.MoeServe") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(moe_serve_pb2_grpc.MoeServeStub(channel).Generate(pb.GenerateRequest(text="hi")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
        engine = make_engine(tiny_model)
        loop.call_soon_threadsafe(pending.set_result, engine)
        assert wait_until(lambda: check(channel) == health_pb2.HealthCheckResponse.SERVING)
        statuses = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest()).statuses
        assert {k: v.status for k, v in statuses.items()} == {
            "": health_pb2.HealthCheckResponse.SERVING, "moeserve.v1.MoeServe": health_pb2.HealthCheckResponse.SERVING}
        call = moe_serve_pb2_grpc.MoeServeStub(channel).Generate(pb.GenerateRequest(text="hi", **LONG))
        assert not next(call).finished
        engine.shutdown()
        assert check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.ABORTED and "shut down" in info.value.details()
    on(loop, server.stop(None))


async def _future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


def test_reflection_lists_the_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"moeserve.v1.MoeServe", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("moeserve.v1.GenerateRequest").package == "moeserve.v1"


# ---- the Serve mixin's error path --------------------------------------------------------------
class RecordingContext:
    """The part of RayServegRPCContext the mixin uses."""

    def __init__(self) -> None:
        self.code, self.details = None, None

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Methods(GrpcMethods):
    def __init__(self, engine) -> None:
        self.engine, self.model_name = engine, MODEL


def test_mixin_sets_the_status_before_raising(loop, engine):
    methods, context = Methods(engine), RecordingContext()

    async def bad_generate():
        return [r async for r in methods.Generate(pb.GenerateRequest(text="hi", top_k=-1), grpc_context=context)]
    with pytest.raises(ValueError, match="top_k"):
        on(loop, bad_generate())
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in context.details
    info = on(loop, methods.GetModelInfo(pb.ModelInfoRequest(), grpc_context=RecordingContext()))
    assert info.name == MODEL and info.num_experts == engine.spec.num_experts
