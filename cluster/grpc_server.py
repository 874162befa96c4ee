"""`moe-serve grpc`: the gRPC service as a standalone server (no Ray), until Ctrl-C or SIGTERM.

The port opens at once; health reports NOT_SERVING and Generate answers UNAVAILABLE until the
model has loaded, then SERVING. A model that cannot load closes the port and exits with its error.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from cluster.async_engine import AsyncLLMEngine
from cluster.config import EngineConfig
from cluster.grpc_service import serve_grpc


def run_grpc_server(config: EngineConfig, model_name: str, host: str, port: int, out: TextIO = sys.stdout) -> int:
    return asyncio.run(_serve(config, model_name, host, port, out))


async def _serve(config: EngineConfig, model_name: str, host: str, port: int, out: TextIO) -> int:
    loading = asyncio.ensure_future(asyncio.to_thread(AsyncLLMEngine, config, model_name=model_name))
    server = await serve_grpc(loading, model_name, port, host=host)
    print(f"moe-serve gRPC: listening on {host}:{port} (moeserve.v1.MoeServe, grpc.health.v1, reflection); "
          f"loading {model_name!r}", file=out, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        engine = await loading
    except BaseException:
        await server.stop(None)  # a model that cannot load: close the port, then report the error
        raise
    print("moe-serve gRPC: model loaded, serving. Press Ctrl-C to stop.", file=out, flush=True)
    await stop.wait()
    print("moe-serve gRPC: shutting down", file=out, flush=True)
    await server.stop(grace=2.0)
    await asyncio.to_thread(engine.shutdown)
    print("moe-serve gRPC: stopped", file=out, flush=True)
    return 0
