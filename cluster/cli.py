"""The `moe-serve` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.config import BACKENDS, DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"moe-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Mixture-of-Experts models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate a completion in this process (streams to the terminal)")
    gen.add_argument("--model", help="HF model directory (default: the built-in demo model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _engine_args(gen)
    gen.set_defaults(run=_generate)
    tiny = sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (via transformers)")
    tiny.add_argument("--family", required=True)
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=DTYPES)
    tiny.add_argument("--shards", type=int, default=1)
    tiny.set_defaults(run=_make_tiny)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-backend", default="auto", choices=BACKENDS)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)


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
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    engine = LLMEngine(EngineConfig(
        model=_model_dir(args), dtype=args.dtype, device=args.device, kernel_backend=args.kernel_backend,
        max_model_len=args.max_model_len, kv_cache_tokens=args.kv_cache_tokens, show_progress=True))
    final = None
    for out in engine.stream(args.prompt, params):
        print(out.new_text, end="", flush=True)
        final = out
    print()
    if final is not None and final.error:
        print(f"moe-serve: error: {final.error}", file=sys.stderr)
        return 1
    print(f"[{len(final.token_ids)} tokens, finish_reason={final.finish_reason}]", file=sys.stderr)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from experts.tiny import make_tiny

    out = make_tiny(args.family, args.out, seed=args.seed, dtype=args.dtype, shards=args.shards,
                    progress=lambda m: print(m, file=sys.stderr))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
