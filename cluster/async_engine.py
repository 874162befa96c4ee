"""AsyncLLMEngine: an LLMEngine stepped on one background thread, streamed to asyncio consumers.

Invariants:
  * only the engine thread touches the LLMEngine (it is not thread-safe); requests and aborts
    reach it through a thread-safe queue, outputs go back through each consumer's event loop;
  * a request is either rejected before its first output (validation error, overload) or
    streams outputs until one with ``finished=True``;
  * a consumer that stops iterating (break, cancellation, disconnect) aborts its request;
  * a consumer that falls behind gets the outputs waiting for it joined into one (the deltas of a
    request always add up to its tokens and text).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import AsyncIterator

from cluster.async_channels import AbortRequest, AddRequest, Stream, merge_outputs, settle
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.metrics import EngineMetrics
from cluster.request import RequestOutput
from cluster.sampling_params import SamplingParams

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5  # how long the idle engine thread sleeps between looks at the stop flag


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting for admission; the client should retry later."""


class EngineStopped(RuntimeError):
    """The engine has been shut down (or its thread died) and takes no more requests."""


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, *, model_name: str | None = None, max_waiting: int = 256,
                 stream_interval_s: float = 0.0) -> None:
        """`stream_interval_s`: after a request's first output, at most one (joined) output per interval
        reaches its consumer, so a fast engine cannot flood a slow transport with tiny deltas."""
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        if not 0.0 <= stream_interval_s <= 1.0:
            raise ValueError(f"stream_interval_s must be in [0, 1], got {stream_interval_s}")
        self.config, self.max_waiting, self.stream_interval_s = config, max_waiting, stream_interval_s
        self._inbox: queue.SimpleQueue[AddRequest | AbortRequest | None] = queue.SimpleQueue()
        self._live: dict[str, Stream] = {}  # engine thread only
        self._stopping = threading.Event()
        self._gate = threading.Lock()  # orders generate()'s enqueue against the final drain
        self._closed = False
        self._stats: dict = {}
        self.engine = self._build_on_engine_thread(config)
        try:
            self.model_name = model_name or Path(config.model).name
            self.spec, self.tokenizer = self.engine.spec, self.engine.tokenizer
            sched = self.engine.scheduler.config
            self.max_model_len = min(sched.max_model_len, sched.num_blocks * sched.block_size)
            self.metrics = EngineMetrics(self.model_name)
            self._publish()
        except BaseException:
            self._stopping.set()  # the engine thread ends at once instead of waiting for work
            raise
        finally:
            self._go.set()

    def _build_on_engine_thread(self, config: EngineConfig) -> LLMEngine:
        """Every torch call of the engine, its construction included, runs on the engine thread.
        Once the calling thread had run torch ops (loading the model), the engine thread's ran 1.6x
        slower (OpenMP on this 2-core VM); an engine stepped at 0.4x the speed of the same engine
        stepped where it was built. Raises what the construction raised."""
        built: Future[LLMEngine] = Future()  # the engine, or the error building it
        self._go = threading.Event()  # set once the rest of __init__ is done
        self._thread = threading.Thread(target=self._run, args=(config, built), name="moe-engine", daemon=True)
        self._thread.start()
        try:
            return built.result()
        except BaseException:
            self._thread.join()
            raise

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    # ---- the asyncio side ----------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; ValueError / AdmissionError / EngineOverloaded come before any."""
        loop = asyncio.get_running_loop()
        stream = Stream(loop, asyncio.Queue(), loop.create_future())
        request_id = request_id or uuid.uuid4().hex
        with self._gate:
            if self._closed or self._stopping.is_set():
                raise EngineStopped("the engine is not running")
            self._inbox.put(AddRequest(request_id, prompt, params, stream))
        await stream.accepted
        finished, last = False, None
        try:
            while not finished:
                out = await stream.queue.get()
                if last is not None and not out.finished and self.stream_interval_s:
                    await asyncio.sleep(max(0.0, last + self.stream_interval_s - loop.time()))
                while not out.finished and not stream.queue.empty():  # a slow consumer gets one delta
                    out = merge_outputs(out, stream.queue.get_nowait())
                finished = out.finished
                yield out
                last = loop.time()
        finally:
            if not finished:
                self._inbox.put(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    def stats(self) -> dict:
        """Latest engine-thread snapshot: running, waiting, kv_cache_usage, num_requests, ..."""
        return {**self._stats, "max_waiting": self.max_waiting, "ready": self.ready,
                "metrics": self.metrics.snapshot()}

    def shutdown(self) -> None:
        """Stop the engine thread; live requests end with finish_reason "abort"."""
        self._stopping.set()
        self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self, config: EngineConfig, built: Future) -> None:
        try:
            built.set_result(LLMEngine(config))
        except BaseException as exc:  # re-raised by the constructor
            built.set_exception(exc)
            return
        self._go.wait()
        try:
            while not self._stopping.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping.is_set():
                    self._step()
        except Exception:  # a bug here must not leave consumers waiting forever
            log.exception("engine thread failed")
        finally:
            self._stopping.set()
            self._close()

    def _drain(self, block: bool) -> None:
        """Apply every queued command; wait up to IDLE_POLL_S for the first when `block`."""
        try:
            cmds = [self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()]
        except queue.Empty:
            return
        while not self._inbox.empty():
            cmds.append(self._inbox.get_nowait())
        for cmd in cmds:
            if isinstance(cmd, AddRequest):
                self._add(cmd)
            elif isinstance(cmd, AbortRequest) and cmd.request_id in self._live:
                out = self.engine.abort(cmd.request_id)
                if out is not None:
                    self._deliver(out, time.monotonic())
        self._publish()

    def _add(self, cmd: AddRequest) -> None:
        try:
            if self._stopping.is_set():
                raise EngineStopped("the engine is shutting down")
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{self.max_waiting} requests are already waiting; retry later")
            self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id)
        except Exception as exc:  # handed to the caller of generate()
            self._post(cmd.stream, settle, cmd.stream.accepted, exc, None)
            return
        self._live[cmd.request_id] = cmd.stream
        self._post(cmd.stream, settle, cmd.stream.accepted, None, self._inbox_abort(cmd.request_id))

    def _inbox_abort(self, request_id: str):
        return lambda: self._inbox.put(AbortRequest(request_id))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the engine ends a failed step's requests itself; this is a bug
            log.exception("engine step raised")
            outputs = [self._error_output(rid, exc) for rid in list(self._live)]
        now = time.monotonic()
        self._publish(self.engine.last_step_stats)  # before consumers wake up and read stats()
        for out in outputs:
            self._deliver(out, now)
        self._publish()  # requests that just finished no longer count

    def _error_output(self, request_id: str, exc: Exception) -> RequestOutput:
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("abort after a failed step raised")
        return RequestOutput(request_id, (), "", (), "", 0, finished=True, finish_reason="error",
                             error=f"{type(exc).__name__}: {exc}")

    def _deliver(self, out: RequestOutput, now: float) -> None:
        stream = self._live.get(out.request_id)
        if stream is None:
            return
        if out.new_token_ids:
            if stream.first_at is None:
                stream.first_at = now
                self.metrics.on_first_token(now - stream.arrival, out.num_prompt_tokens)
            gap = None if stream.last_at is None else now - stream.last_at
            self.metrics.on_token(len(out.new_token_ids), gap)
            stream.last_at = now
        if out.finished:
            del self._live[out.request_id]
            self.metrics.on_finish(now - stream.arrival, out.finish_reason or "unknown")
        if not self._post(stream, stream.queue.put_nowait, out) and not out.finished:
            self._inbox.put(AbortRequest(out.request_id))  # the consumer's loop is gone

    def _post(self, stream: Stream, fn, *args) -> bool:
        try:
            stream.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # event loop closed
            return False

    def _publish(self, moe: dict | None = None) -> None:
        """Snapshot the engine's load; `moe`: the MoE statistics of the step just run (counted once)."""
        sched = self.engine.scheduler
        stats = {"running": len(sched.running), "waiting": len(sched.waiting),
                 "kv_cache_usage": sched.blocks.usage, "num_requests": len(self._live),
                 "num_preemptions": sched.num_preemptions, "moe": moe}
        if sched.config.prefix_caching:  # prompt tokens over all admissions: queried, and found cached
            stats["prefix_cache_queries"] = sched.prefix_query_tokens
            stats["prefix_cache_hits"] = sched.prefix_hit_tokens
        if sched.config.speculative.num_speculative_tokens:  # draft tokens over all steps, and those kept
            stats["spec_decode_draft_tokens"] = self.engine.num_draft_tokens
            stats["spec_decode_accepted_tokens"] = self.engine.num_accepted_tokens
        self.metrics.on_step(stats)
        self._stats = {k: v for k, v in stats.items() if k != "moe"}

    def _close(self) -> None:
        for request_id in list(self._live):
            self._deliver(RequestOutput(request_id, (), "", (), "", 0, finished=True, finish_reason="abort",
                                        error="the engine shut down"), time.monotonic())
        with self._gate:
            self._closed = True
            pending = []
            while not self._inbox.empty():
                pending.append(self._inbox.get_nowait())
        for cmd in pending:
            if isinstance(cmd, AddRequest):
                self._post(cmd.stream, settle, cmd.stream.accepted, EngineStopped("the engine shut down"), None)
        try:
            getattr(self.engine, "shutdown", lambda: None)()  # cluster mode stops its actors
        except Exception:
            log.exception("engine shutdown raised")
