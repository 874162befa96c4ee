"""The `moe-serve` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.config import BACKENDS, DTYPES
from cluster.engine_flags import engine_args, engine_kwargs


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:  # bad input, missing or unwritable files, ports in use
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Mixture-of-Experts models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate a completion in this process (streams to the terminal)")
    gen.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    gen.add_argument("--prompt", required=True, action="append",
                     help="repeatable: one prompt streams to the terminal; several run as one batch, each "
                          "completion printed under a '--- [i] prompt' line when all are done")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2], OpenAI's")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2], OpenAI's")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0, 1 = off (as transformers)")
    engine_args(gen)
    gen.add_argument("--address", help="(ray) Ray cluster to join; default: start a local one")
    gen.add_argument("--record-trace", type=Path, help="write every routing decision to this JSONL trace")
    gen.set_defaults(run=_generate)
    tiny = sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (via transformers)")
    tiny.add_argument("--family", required=True)
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=DTYPES)
    tiny.add_argument("--shards", type=int, default=1)
    tiny.set_defaults(run=_make_tiny)
    plan = sub.add_parser("plan", help="show where attention workers and expert shards would be placed")
    plan.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    plan.add_argument("--cluster", help="cluster description file or built-in name (default: local)")
    plan.add_argument("--dtype", default="float32", choices=DTYPES)
    plan.add_argument("--attention-workers", type=int, default=1)
    plan.add_argument("--expert-shards", type=int, help="default: one per node that may host experts")
    plan.add_argument("--kv-cache-tokens", type=int, default=16384)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_plan)
    _add_up(sub)
    _add_grpc(sub)
    _add_replay(sub)
    cal = sub.add_parser("calibrate", help="measure the expert cache's cost model on this node and print it")
    cal.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    cal.add_argument("--dtype", default="float32", choices=DTYPES)
    cal.add_argument("--device", default="cpu", help="the fast tier's device (cuda: pinned host memory below it)")
    cal.add_argument("--kernel-backend", default="auto", choices=BACKENDS)
    cal.add_argument("--json", action="store_true", help="print the model as JSON (for replay --cost-model)")
    cal.set_defaults(run=_calibrate)
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    import json

    import torch

    from cluster.engine import DTYPES as TORCH_DTYPES
    from experts.calibrate import calibrate
    from experts.checkpoint import Checkpoint
    from experts.config import load_spec
    from experts.slow_tier import slow_tier_for
    from kernels.dispatch import select_kernels

    model, device = Path(_model_dir(args)), torch.device(args.device)
    spec, ckpt, dtype = load_spec(model), Checkpoint(model), TORCH_DTYPES[args.dtype]
    ops = select_kernels(device, args.kernel_backend, dtype)
    cost = calibrate(slow_tier_for(ckpt, spec, dtype, device), spec, dtype, device, ops)
    print(json.dumps(cost.as_dict(), indent=2) if args.json else cost.describe())
    return 0


def _add_grpc(sub) -> None:
    g = sub.add_parser("grpc", help="serve the gRPC API as a standalone server (no Ray) until Ctrl-C")
    g.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    g.add_argument("--served-model-name", help="model name clients send (default: the directory's name)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=9000)
    engine_args(g)
    g.set_defaults(run=_grpc)


def _add_up(sub) -> None:
    up = sub.add_parser("up", help="serve over HTTP (OpenAI API) and gRPC through Ray Serve until Ctrl-C")
    up.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    up.add_argument("--served-model-name", help="model id clients send (default: the directory's name)")
    up.add_argument("--address", help="Ray cluster to join; default: start a local one (the engine uses the same)")
    up.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 for all interfaces)")
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--grpc-port", type=int, default=9000)
    engine_args(up)
    up.set_defaults(run=_up)


def _add_replay(sub) -> None:
    rp = sub.add_parser("replay", help="simulate expert placement (--nodes) or the expert cache (--cache-capacity) "
                                       "over a recorded routing trace")
    rp.add_argument("--trace", required=True, type=Path, help="routing trace (JSONL)")
    rp.add_argument("--nodes", type=int, default=4)
    rp.add_argument("--cache-capacity", type=float,
                    help="replay the expert cache instead: fraction of all experts the fast tier holds")
    rp.add_argument("--expert-bytes", type=int, help="(cache) bytes per expert (default: Mixtral-8x7B bf16); "
                                                        "the cost model is scaled to it")
    rp.add_argument("--cost-model", type=Path, help="(cache) JSON from `moe-serve calibrate --json` (default: "
                                                    "Mixtral on an H100 over PCIe 4.0 beside a host CPU, assumed)")
    rp.add_argument("--hidden-size", type=int, default=4096, help="bytes per token = hidden size x dtype bytes")
    rp.add_argument("--dtype-bytes", type=int, default=2)
    rp.add_argument("--kv-elems", type=int, default=2048,
                    help="K+V values a token writes per layer (Mixtral: 2 x 8 heads x 128), for schemes "
                         "that replicate KV")
    rp.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="(placement) expert copies per layer and node in the scheme with replicas")
    rp.add_argument("--fit-fraction", type=float, default=0.5,
                    help="share of each request's tokens that fit the statistics; the rest are reported")
    rp.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    rp.set_defaults(run=_replay)


def _model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from cluster.demo import ensure_demo_model
    return str(ensure_demo_model(progress=lambda m: print(m, file=sys.stderr)))


def _generate(args: argparse.Namespace) -> int:
    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from cluster.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty)
    engine = LLMEngine(EngineConfig(
        model=_model_dir(args), show_progress=True, address=args.address,
        record_trace=str(args.record_trace) if args.record_trace else None, **engine_kwargs(args)))
    try:
        if len(args.prompt) == 1:
            return _print_stream(engine, args.prompt[0], params)
        return _print_batch(engine, args.prompt, params)
    finally:
        engine.shutdown()


def _print_batch(engine, prompts: list[str], params) -> int:
    failed = 0
    for i, (prompt, out) in enumerate(zip(prompts, engine.generate(prompts, params))):
        print(f"--- [{i}] {prompt!r}\n{out.text}", flush=True)
        if out.error:
            print(f"moe-serve: error: request {i}: {out.error}", file=sys.stderr)
            failed += 1
        else:
            print(f"[{i}: {len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    _print_stats(engine)
    return 1 if failed else 0


def _print_stats(engine) -> None:
    """What the route predictors, the expert cache and speculative decoding did over the run, when on."""
    if engine.route_meter is not None:
        import json

        print(f"[route prediction recall: {json.dumps(engine.route_meter.report())}]", file=sys.stderr)
    if engine.cache_totals is not None:
        print(f"[{engine.cache_totals.describe()}]", file=sys.stderr)
    if engine.num_draft_tokens:
        print(f"[speculative decoding: {engine.num_accepted_tokens} of {engine.num_draft_tokens} draft tokens kept]",
              file=sys.stderr)


def _print_stream(engine, prompt: str, params) -> int:
    final = None
    for out in engine.stream(prompt, params):
        print(out.new_text, end="", flush=True)
        final = out
    print()
    if final is not None and final.error:
        print(f"moe-serve: error: {final.error}", file=sys.stderr)
        return 1
    print(f"[{len(final.token_ids)} tokens, finish_reason={final.finish_reason}]", file=sys.stderr)
    _print_stats(engine)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from cluster.placement import PlannerConfig
    from cluster.plan_cli import run_plan

    config = PlannerConfig(num_attention_workers=args.attention_workers, num_expert_shards=args.expert_shards,
                           kv_cache_tokens=args.kv_cache_tokens)
    print(run_plan(_model_dir(args), args.cluster, args.json, dtype=args.dtype, config=config))
    return 0


def _up(args: argparse.Namespace) -> int:
    from cluster.up import run_up

    app_args = {**engine_kwargs(args), "served_model_name": args.served_model_name}
    return run_up(args.model, args.address, args.http_port, args.grpc_port, host=args.host,
                  app_args={k: v for k, v in app_args.items() if v is not None})


def _grpc(args: argparse.Namespace) -> int:
    from cluster.config import EngineConfig
    from cluster.grpc_server import run_grpc_server

    model = _model_dir(args)
    config = EngineConfig(model=model, **engine_kwargs(args))
    name = args.served_model_name or ("moe-serve-demo" if args.model is None else Path(model).resolve().name)
    return run_grpc_server(config, name, args.host, args.port)


def _replay(args: argparse.Namespace) -> int:
    import json

    from router.traces import read_trace

    records = read_trace(args.trace)
    if args.cache_capacity is not None:
        from experts.cache_replay import DEFAULT_COST, MIXTRAL_EXPERT_BYTES, cache_summary, replay_cache
        from experts.cost_model import ExpertCostModel

        cost = DEFAULT_COST
        if args.cost_model is not None:
            try:
                cost = ExpertCostModel.from_dict(json.loads(args.cost_model.read_text()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{args.cost_model}: not JSON ({exc})") from exc
        cost = cost.scaled(args.expert_bytes or MIXTRAL_EXPERT_BYTES)
        report = replay_cache(records, args.cache_capacity, cost, fit_fraction=args.fit_fraction)
        print(json.dumps(report, indent=2) if args.json else cache_summary(report))
        return 0
    from router.replay import replay_placement
    from router.replay_report import summary

    if args.replicas < 0:
        raise ValueError(f"--replicas must be >= 0, got {args.replicas}")
    report = replay_placement(records, args.nodes, hidden_size=args.hidden_size, dtype_bytes=args.dtype_bytes,
                              fit_fraction=args.fit_fraction, kv_elems=args.kv_elems,
                              replicas_per_layer=args.replicas)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from experts.tiny import make_tiny

    out = make_tiny(args.family, args.out, seed=args.seed, dtype=args.dtype, shards=args.shards,
                    progress=lambda m: print(m, file=sys.stderr))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
