"""Serving load benchmark: moe-serve against `transformers serve`, same model and requests, one run.

Each server is started as its user starts it (`moe-serve up`, `transformers serve MODEL`), warmed
with one request, then sent the same open-loop load: Poisson arrivals at `--rate` requests/s of
streaming `/v1/completions` (greedy), prompts cut from the Python standard library's source to
lengths drawn around `--prompt-tokens`, `max_tokens` drawn around `--output-tokens`. The servers
run one after the other, never side by side. Reported per server: time to first token and
inter-token latency (p50/p99; inter-token = gaps between streamed tokens), time per output token
after the first (TPOT), output tokens/s over the whole run, request throughput, and errors; then
the ratios of moe-serve to the peer. Prints one JSON object.

    python bench/serve.py [--rate 4] [--requests 48] [--model DIR] [--no-peer]

The peer needs `transformers[serving]` (`bash scripts/setup.sh bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cluster.demo import ensure_demo_model
from experts.tokenizer import load_tokenizer

STARTUP_S = 300


@dataclass(frozen=True, slots=True)
class Job:
    arrival_s: float  # offset from the start of the run
    prompt: str
    max_tokens: int


@dataclass(slots=True)
class Result:
    start: float
    token_times: list[float] = field(default_factory=list)  # one entry per streamed token
    completion_tokens: int = 0
    end: float = 0.0
    error: str | None = None


# ---- the workload --------------------------------------------------------------------------------
def workload(model: Path, n: int, rate: float, prompt_tokens: int, output_tokens: int, seed: int) -> list[Job]:
    """`n` jobs with exponential inter-arrival gaps; lengths uniform in [mean/2, 3 mean/2]."""
    rng = random.Random(seed)
    tok = load_tokenizer(model)
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4000)
    jobs, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        ids = tok.encode(rng.choice(files).read_text(errors="replace"))
        length = rng.randint(prompt_tokens // 2, prompt_tokens * 3 // 2)
        start = rng.randrange(max(1, len(ids) - length))
        prompt = tok.decode(ids[start:start + length])
        jobs.append(Job(t, prompt, rng.randint(max(1, output_tokens // 2), output_tokens * 3 // 2)))
    return jobs


# ---- one request, one run ------------------------------------------------------------------------
async def one(client: httpx.AsyncClient, model: str, job: Job, t0: float) -> Result:
    await asyncio.sleep(max(0.0, t0 + job.arrival_s - time.perf_counter()))
    res = Result(start=time.perf_counter())
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return res
            async for line in response.aiter_lines():
                _on_event(res, line)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.end = time.perf_counter()
    return res


def _on_event(res: Result, line: str) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[len("data: "):])
    if event.get("usage"):
        res.completion_tokens = event["usage"]["completion_tokens"]
    if any(c.get("text") for c in event.get("choices", [])):
        res.token_times.append(time.perf_counter())


async def run_load(url: str, model: str, jobs: list[Job], timeout_s: float) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await one(client, model, Job(0.0, "def main():", 4), time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, model, j, t0) for j in jobs))
        return list(results), time.perf_counter() - t0


def report(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None and r.token_times]
    ttft = [r.token_times[0] - r.start for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    tpot = [(r.end - r.token_times[0]) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    tokens = sum(r.completion_tokens or len(r.token_times) for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None),
            "ttft_s_p50": _pct(ttft, 50), "ttft_s_p99": _pct(ttft, 99),
            "itl_s_p50": _pct(gaps, 50), "itl_s_p99": _pct(gaps, 99), "tpot_s_mean": _mean(tpot),
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s, "requests_per_s": len(ok) / wall_s,
            "wall_s": wall_s}


def _pct(xs: list[float], q: float) -> float | None:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else None)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# ---- the servers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moe_serve(model: Path, port: int, max_model_len: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cluster.cli", "up", "--model", str(model), "--served-model-name", "bench",
           "--http-port", str(port), "--grpc-port", str(free_port()), "--max-model-len", str(max_model_len)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "Press Ctrl-C" in line:
            _drain(proc)  # keep reading its output, so the server never blocks on a full pipe
            return proc, "bench"
        if not line and proc.poll() is not None:
            break
    stop(proc)
    raise RuntimeError("moe-serve up did not start")


def start_transformers_serve(model: Path, port: int, batching: bool) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", str(model), "--port", str(port), "--host", "127.0.0.1"]
    if batching:
        cmd.append("--continuous-batching")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, str(model)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError("transformers serve did not start (is transformers[serving] installed?)")


def _drain(proc: subprocess.Popen) -> None:
    threading.Thread(target=proc.stdout.read, daemon=True).start()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(name: str, start, jobs: list[Job], timeout_s: float) -> dict:
    port = free_port()
    print(f"{name}: starting", file=sys.stderr, flush=True)
    proc, model = start(port)
    try:
        print(f"{name}: sending {len(jobs)} requests", file=sys.stderr, flush=True)
        results, wall = asyncio.run(run_load(f"http://127.0.0.1:{port}", model, jobs, timeout_s))
    finally:
        stop(proc)
    return report(results, wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: the built-in demo model)")
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="mean prompt length")
    ap.add_argument("--output-tokens", type=int, default=48, help="mean max_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument("--no-peer", action="store_true", help="measure moe-serve only")
    ap.add_argument("--peer-continuous-batching", action="store_true",
                    help="run transformers serve with --continuous-batching (paged attention)")
    args = ap.parse_args()
    model = (args.model or ensure_demo_model()).resolve()
    jobs = workload(model, args.requests, args.rate, args.prompt_tokens, args.output_tokens, args.seed)
    max_len = 2 * (args.prompt_tokens + args.output_tokens) + 64
    out = {"model": str(model), "workload": {"requests": args.requests, "rate_per_s": args.rate,
                                             "prompt_tokens_mean": args.prompt_tokens,
                                             "output_tokens_mean": args.output_tokens, "seed": args.seed}}
    out["moe_serve"] = measure("moe-serve", lambda p: start_moe_serve(model, p, max_len), jobs, args.timeout)
    if not args.no_peer:
        peer = lambda p: start_transformers_serve(model, p, args.peer_continuous_batching)  # noqa: E731
        out["transformers_serve"] = measure("transformers serve", peer, jobs, args.timeout)
        out["transformers_serve"]["continuous_batching"] = args.peer_continuous_batching
        out["vs_transformers"] = ratios(out["moe_serve"], out["transformers_serve"])
    print(json.dumps(out, indent=2))
    return 0


def ratios(ours: dict, peer: dict) -> dict:
    """Each > 1 means moe-serve is better: throughput ours/peer, latencies peer/ours."""
    def div(a, b):
        return a / b if a and b else None
    return {"output_tokens_per_s": div(ours["output_tokens_per_s"], peer["output_tokens_per_s"]),
            "ttft_p50": div(peer["ttft_s_p50"], ours["ttft_s_p50"]),
            "ttft_p99": div(peer["ttft_s_p99"], ours["ttft_s_p99"]),
            "itl_p50": div(peer["itl_s_p50"], ours["itl_s_p50"]),
            "itl_p99": div(peer["itl_s_p99"], ours["itl_s_p99"])}


if __name__ == "__main__":
    sys.exit(main())
