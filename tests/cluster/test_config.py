"""EngineConfig's checks, and the command line's engine flags: one set, one default per setting."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.cli import _parser
from cluster.engine_flags import ENGINE_FLAGS, engine_kwargs
from cluster.config import RAY_ONLY, EngineConfig
from cluster.serve_app import AppArgs, build_app

# A value away from the default for every Ray-only setting.
RAY_VALUES = {"cluster": "local", "address": "auto", "num_attention_workers": 2, "num_expert_shards": 2,
              "microbatches": 1, "min_microbatch_tokens": 8, "actor_threads": 2, "transport_timeout_s": 5.0,
              "transport": "gloo"}

# Every engine flag with a value away from its default, and the EngineConfig it must give.
FLAGS = ["--dtype", "bfloat16", "--device", "cuda:1", "--kernel-backend", "torch", "--max-model-len", "200",
         "--kv-cache-tokens", "4096", "--max-num-seqs", "4", "--route-prediction", "--expert-cache", "0.5",
         "--expert-cache-policy", "lru", "--expert-cache-prefetch", "--expert-cache-schedule", "load",
         "--engine", "ray", "--cluster", "local", "--expert-shards", "3", "--attention-workers", "2",
         "--replan-every", "7", "--expert-replicas", "1", "--shuffle-requests", "--shuffle-max-load", "1.5",
         "--microbatches", "1",
         "--transport", "gloo"]
WANT = {"dtype": "bfloat16", "device": "cuda:1", "kernel_backend": "torch", "max_model_len": 200,
        "kv_cache_tokens": 4096,
        "max_num_seqs": 4, "route_prediction": True, "expert_cache_fraction": 0.5, "expert_cache_policy": "lru",
        "expert_cache_prefetch": True, "expert_cache_schedule": "load", "engine": "ray", "cluster": "local",
        "num_expert_shards": 3, "num_attention_workers": 2, "replan_every_steps": 7, "expert_replicas": 1,
        "request_shuffling": True, "shuffle_max_load": 1.5, "microbatches": 1, "transport": "gloo"}
# Flags checked one at a time (speculative decoding refuses route_prediction, which FLAGS sets).
ALONE = {("--enable-prefix-caching",): ("enable_prefix_caching", True),
         ("--num-speculative-tokens", "3"): ("num_speculative_tokens", 3),
         ("--prompt-lookup-max", "5"): ("prompt_lookup_max", 5), ("--prompt-lookup-min", "1"): ("prompt_lookup_min", 1)}


def test_ray_only_settings_are_refused_in_process_naming_each():
    assert set(RAY_VALUES) == set(RAY_ONLY)
    for name, value in RAY_VALUES.items():
        with pytest.raises(ValueError, match=f"{name}={value!r} only apply with engine='ray'"):
            EngineConfig(model="m", **{name: value})
        assert getattr(EngineConfig(model="m", engine="ray", **{name: value}), name) == value
    with pytest.raises(ValueError, match="num_attention_workers=2, transport='gloo' only apply"):
        EngineConfig(model="m", num_attention_workers=2, transport="gloo")
    EngineConfig(model="m")  # the defaults are not "set"


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["up"], ["grpc"]])
def test_every_engine_command_takes_the_same_flags_to_the_same_fields(command):
    assert set(WANT) | {field for field, _ in ALONE.values()} == set(ENGINE_FLAGS)
    args = _parser().parse_args([*command, *FLAGS])
    assert engine_kwargs(args) == WANT
    for flag, (field, value) in ALONE.items():
        assert engine_kwargs(_parser().parse_args([*command, *flag])) == {field: value}
    assert engine_kwargs(_parser().parse_args(command)) == {}  # nothing given: EngineConfig's own defaults


def test_up_flags_reach_the_same_engine_config_as_generate():
    generate = EngineConfig(model="m", **engine_kwargs(_parser().parse_args(["generate", "--prompt", "x", *FLAGS])))
    up = AppArgs.parse(engine_kwargs(_parser().parse_args(["up", *FLAGS]))).engine_config("m")
    assert up == generate
    for field in dataclasses.fields(EngineConfig):
        if field.name in WANT:
            assert getattr(up, field.name) == WANT[field.name] != field.default, field.name
    for flag, (field, value) in ALONE.items():
        config = AppArgs.parse(engine_kwargs(_parser().parse_args(["up", *flag]))).engine_config("m")
        assert getattr(config, field) == value


def test_the_serve_builder_refuses_ray_only_settings_in_process():
    with pytest.raises(ValueError, match="num_expert_shards=2 only apply with engine='ray'"):
        build_app({"num_expert_shards": 2})


def test_the_context_length_fits_the_model_and_the_kv_cache(caplog):
    from cluster.config import context_length

    assert context_length(EngineConfig(model="m", kv_cache_tokens=4096), 2048) == 2048
    assert context_length(EngineConfig(model="m", kv_cache_tokens=4096), 32768) == 4096  # capped, and said
    assert "max_model_len set to 4096, the KV cache's tokens" in caplog.text
    assert context_length(EngineConfig(model="m", kv_cache_tokens=4096, max_model_len=1000), 2048) == 1000
    with pytest.raises(ValueError, match="max_model_len 3000 exceeds the model's max_position_embeddings 2048"):
        context_length(EngineConfig(model="m", max_model_len=3000), 2048)
    with pytest.raises(ValueError, match="max_model_len 5000 exceeds the KV cache's 4096 tokens"):
        context_length(EngineConfig(model="m", kv_cache_tokens=4096, max_model_len=5000), 8192)


def test_the_shuffling_load_limit_needs_shuffling_and_at_least_the_mean():
    with pytest.raises(ValueError, match="shuffle_max_load limits request shuffling: set request_shuffling"):
        EngineConfig(model="m", engine="ray", shuffle_max_load=1.5)
    with pytest.raises(ValueError, match="shuffle_max_load must be >= 1, got 0.9"):
        EngineConfig(model="m", engine="ray", request_shuffling=True, shuffle_max_load=0.9)
    assert EngineConfig(model="m", engine="ray", request_shuffling=True, shuffle_max_load=1.5).shuffle_max_load == 1.5
