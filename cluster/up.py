"""`moe-serve up`: start a local Ray cluster (or join one), serve the app over HTTP and gRPC, stop on Ctrl-C."""

from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

APP_NAME = "moe-serve"
GRPC_SERVICER = "protos.moe_serve_pb2_grpc.add_MoeServeServicer_to_server"


def run_up(model: str | None, address: str | None, http_port: int, grpc_port: int, host: str = "127.0.0.1",
           app_args: dict | None = None, out: TextIO = sys.stdout) -> int:
    """Deploy `cluster.serve_app:build_app` and block until Ctrl-C (or SIGTERM); 0 after a clean stop.

    `address`: a Ray cluster to join; None starts a new local one (stopped again on exit).
    `app_args`: further application args (AppArgs), e.g. {"engine": "ray", "max_model_len": 4096}."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.ray_setup import start_local
    from cluster.serve_app import AppArgs, build_app

    args = {**(app_args or {}), "model": model}
    args = {k: v for k, v in args.items() if v is not None}
    app = build_app(args)  # bad args fail here, before anything starts
    if address is None:
        start_local(include_dashboard=None)  # the dashboard's metrics endpoint is announced in the banner
    else:
        ray.init(address=address, logging_level="WARNING")
    try:
        serve.start(http_options=HTTPOptions(host=host, port=http_port),
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
        serve.run(app, name=APP_NAME, route_prefix="/")
        parsed = AppArgs.parse(args)
        _banner(out, parsed.served_name, parsed.engine, host, http_port, grpc_port)
        _wait_for_interrupt()
    except KeyboardInterrupt:
        pass
    finally:
        print("moe-serve: shutting down", file=out, flush=True)
        _stop(serve, ray, joined=address is not None)
    print("moe-serve: stopped", file=out, flush=True)
    return 0


def _banner(out: TextIO, model: str, engine: str, host: str, http_port: int, grpc_port: int) -> None:
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}' % model)
    lines = [
        f"moe-serve is up: model {model!r}, engine {engine!r}",
        f"  HTTP (OpenAI API): http://{local}:{http_port}/v1",
        f"  gRPC (moeserve.v1.MoeServe, via Serve's gRPC proxy): {local}:{grpc_port}",
        *_metrics_lines(),
        "Try:",
        f"  curl http://{local}:{http_port}/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), file=out, flush=True)


def _metrics_lines() -> list[str]:
    """Where Prometheus can scrape each node's metrics (moe_* are exported as ray_moe_*)."""
    import ray

    ports = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
             if n.get("Alive") and n.get("MetricsExportPort")]
    return [f"  Prometheus metrics: {', '.join(f'http://{p}/metrics' for p in ports)}"] if ports else []


def _wait_for_interrupt() -> None:
    """Sleep until Ctrl-C or SIGTERM, both raised as KeyboardInterrupt (SIGINT is set explicitly: a
    process started in the background by a shell begins with SIGINT ignored)."""
    def on_signal(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        time.sleep(3600)


def _stop(serve, ray, joined: bool) -> None:
    """Our own cluster: stop Serve and Ray. A joined cluster: remove only this app, then disconnect."""
    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
