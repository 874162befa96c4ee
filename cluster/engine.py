"""LLMEngine: continuous batching over the in-process model. Each step: schedule -> execute -> update."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch

from cluster.config import EngineConfig, context_length, expert_cache_config
from cluster.detokenizer import IncrementalText
from cluster.model import InProcessModel
from cluster.errors import ClusterRecovered
from cluster.logits_processors import adjust_logits
from cluster.request import Request, RequestOutput
from cluster.sampler import TokenLogprob, new_random, sample, token_logprobs
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from cluster.sequence import Sequence
from cluster.speculative import accept, draft_tokens, row_outputs
from experts.config import load_spec
from experts.cache_stats import CacheStats
from experts.tokenizer import load_tokenizer
from kernels.dispatch import select_kernels
from router.live import LiveRouteMeter
from router.recorder import TraceRecorder

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.ops = select_kernels(self.device, config.kernel_backend, DTYPES[config.dtype])
        self.tokenizer = load_tokenizer(config.model)
        max_len = context_length(config, load_spec(Path(config.model)).max_position_embeddings)
        self.model = _load_model(config, self.device, self.ops)
        self.spec = self.model.spec
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=config.num_blocks, max_model_len=max_len,
            prefix_caching=config.enable_prefix_caching, share_within_step=config.engine == "inprocess",
            attention_workers=config.num_attention_workers, speculative=config.speculative))
        eos = set(self.spec.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        self._seq_ids = itertools.count()
        self._failed_steps = 0  # consecutive steps the cluster recovered from
        self.last_step_stats: dict | None = None  # the model's MoE statistics of the last step
        self.cache_totals: CacheStats | None = None  # the expert cache's counters over the engine's life
        self.num_draft_tokens = self.num_accepted_tokens = 0  # speculative decoding: drafted, and kept
        self.recorder = TraceRecorder(config.record_trace) if config.record_trace else None
        self.route_meter = (LiveRouteMeter(self.spec.moe_layers, self.spec.num_experts, self.spec.top_k)
                            if config.route_prediction else None)
        if self.recorder is not None or self.route_meter is not None:
            self.model.record_routes = True
        if self.route_meter is not None:
            self.model.pregate = True

    # ---- requests in -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Text or token ids -> validated token ids (ValueError naming the problem)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass the prompt as token ids")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.spec.vocab_size}): {bad[:5]}")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        seq_id = next(self._seq_ids)
        request_id = request_id or f"req-{seq_id}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= self.spec.vocab_size]
            if bad:
                raise ValueError(f"{name} token ids out of range [0, {self.spec.vocab_size}): {bad[:5]}")
        seq = Sequence(seq_id, self.tokenize(prompt), params.max_tokens,
                       prompt_logits=params.prompt_logprobs is not None,
                       speculate=self.config.num_speculative_tokens > 0)
        self.scheduler.add(seq)
        text = IncrementalText(self.tokenizer.decode, params.stop) if self.tokenizer else None
        req = Request(request_id, seq, params, new_random(params), text, self.eos_ids)
        self.requests[request_id] = req
        self._by_seq[seq_id] = req
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        return self._finish(req, "abort") if req else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.last_step_stats = None
        out = self.scheduler.schedule()
        for seq_id in self.scheduler.preempted:  # their KV is gone: the cluster forgets where it was
            self._release(seq_id)
        if not out.chunks:
            return []
        drafts = draft_tokens(out.chunks)
        try:
            seq_ids, tokens = self._execute(out, drafts)
        except ClusterRecovered as exc:  # actors were restarted: recompute what was running
            self._failed_steps += 1
            if self._failed_steps <= self.config.max_step_retries:
                log.warning("%s; recomputing %d running requests", exc, len(self.scheduler.running))
                self.scheduler.recompute_running()
                return []
            return self._fail(out, exc)
        except Exception as exc:  # a failed step ends its requests, never the engine
            log.exception("engine step failed")
            return self._fail(out, exc)
        self._failed_steps = 0
        sampled, accepted = self._verify(drafts, seq_ids, tokens)
        self.scheduler.update(out, sampled, accepted)
        return [self._report(self._by_seq[sid]) for sid in sampled]

    def _verify(self, drafts: dict[int, tuple[int, ...]], seq_ids: tuple[int, ...],
                tokens: list[int]) -> tuple[dict[int, int], dict[int, tuple[int, ...]]]:
        """Rows' tokens -> (each sequence's new token, the drafts kept before it): a draft chunk's rows
        give the model's token after each of its tokens (cluster/speculative.py); a stop token or
        max_tokens among them ends the request there. The logprobs of dropped rows are dropped."""
        sampled, accepted, row = {}, {}, 0
        while row < len(seq_ids):
            sid = seq_ids[row]
            mine, req = drafts.get(sid, ()), self._by_seq[sid]
            new = req.cut(accept(mine, tokens[row:row + len(mine) + 1]))
            row += len(mine) + 1
            if req.params.logprobs is not None:
                del req.logprobs[len(req.logprobs) - (len(mine) + 1 - len(new)):]
            sampled[sid], accepted[sid] = new[-1], tuple(new[:-1])
            self.num_draft_tokens += len(mine)
            self.num_accepted_tokens += len(new) - 1
        return sampled, accepted

    def _execute(self, out: SchedulerOutput,
                 drafts: dict[int, tuple[int, ...]]) -> tuple[tuple[int, ...], list[int]]:
        logits, seq_ids = self.model.execute(out)
        for seq_id in self.model.moved:  # its K/V left the worker whose cached blocks it continues
            self.scheduler.stop_caching(seq_id)
        self.last_step_stats = self.model.step_stats()
        if self.last_step_stats.get("expert_cache"):
            self.cache_totals = self.cache_totals or CacheStats()
            self.cache_totals.add(self.last_step_stats["expert_cache"])
        if self.recorder is not None or self.route_meter is not None:
            self._observe_routes(out)
        reqs = [self._by_seq[sid] for sid in seq_ids]
        params = [r.params for r in reqs]
        outputs = row_outputs(seq_ids, [r.seq.output_ids for r in reqs], drafts)  # a draft's row: drafts before it
        adjusted = adjust_logits(logits, params, [r.seq.prompt_ids for r in reqs], outputs, [r.stop_ids for r in reqs])
        tokens = sample(adjusted, params, [r.random for r in reqs], [len(o) for o in outputs])
        self._record_logprobs(logits, reqs, tokens)  # the model's own distribution, before any adjustment
        if any(c.prompt_targets for c in out.chunks):
            self._record_prompt_logprobs(out)
        return seq_ids, tokens

    def _record_prompt_logprobs(self, out: SchedulerOutput) -> None:
        """The step's prompt scores, in chunk order, to their requests (each with its number of alternatives)."""
        chosen, values, ids = (t.tolist() for t in self.model.take_prompt_scores())
        row = 0
        for c in out.chunks:
            req = self._by_seq[c.seq_id]
            top = req.params.prompt_logprobs or 0
            for token in c.prompt_targets:
                alternatives = tuple(zip(ids[row][:top], values[row][:top]))
                req.prompt_logprobs.append(TokenLogprob(token, chosen[row], alternatives))
                row += 1

    def _observe_routes(self, out: SchedulerOutput) -> None:
        """The step's routes to the trace recorder and the live route predictors."""
        tokens = [(self._by_seq[c.seq_id].request_id, p) for c in out.chunks
                  for p in range(c.start, c.start + len(c.token_ids))]
        routes = self.model.take_routes()
        if self.recorder is not None:
            self.recorder.record_step(tokens, routes)
        if self.route_meter is not None:
            self.route_meter.observe_step(tokens, routes, self.model.take_pregate())
            self.last_step_stats["route_prediction_recall"] = self.route_meter.recall()

    def _record_logprobs(self, logits: torch.Tensor, reqs: list[Request], tokens: list[int]) -> None:
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if rows:
            found = token_logprobs(logits, rows, [tokens[i] for i in rows], [reqs[i].params.logprobs for i in rows])
            for i, lp in zip(rows, found):
                reqs[i].logprobs.append(lp)

    def _fail(self, out: SchedulerOutput, exc: BaseException) -> list[RequestOutput]:
        self._failed_steps = 0
        self.scheduler.discard_step()
        return [self._finish(self._by_seq[c.seq_id], "error", f"{type(exc).__name__}: {exc}")
                for c in out.chunks if c.seq_id in self._by_seq]

    def _report(self, req: Request) -> RequestOutput:
        new_text = ""
        if req.text is not None:
            text, stopped = req.text.update(req.seq.output_ids, check_stop=req.may_stop)
            new_text, req.released, req.stopped = req.released + text, "", req.stopped or stopped
        reason = req.finish_reason()
        if reason is not None:
            return self._finish(req, reason, prefix_text=new_text)
        return self._output(req, new_text)

    def _finish(self, req: Request, reason: str, error: str | None = None,
                prefix_text: str = "") -> RequestOutput:
        self.scheduler.finish(req.seq.seq_id, reason)
        self._release(req.seq.seq_id)
        self.requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)
        if req.text is not None and reason != "stop":
            prefix_text += req.text.update(req.seq.output_ids, final=True, check_stop=req.may_stop)[0]
        return self._output(req, prefix_text, reason, error)

    def _release(self, seq_id: int) -> None:
        release = getattr(self.model, "release", None)  # the cluster model tracks where sequences live
        if release is not None:
            release(seq_id)

    def _output(self, req: Request, new_text: str, reason: str | None = None,
                error: str | None = None) -> RequestOutput:
        ids = tuple(req.seq.output_ids)
        start, req.num_reported = req.num_reported, len(ids)
        logprobs = tuple(req.logprobs[:len(ids)]) if req.params.logprobs is not None else None
        prompt = tuple(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None
        return RequestOutput(req.request_id, ids[start:], new_text, ids,
                             req.text.text[:req.text.emitted] if req.text else "", len(req.seq.prompt_ids),
                             finished=reason is not None, finish_reason=reason, error=error,
                             new_logprobs=None if logprobs is None else logprobs[start:], logprobs=logprobs,
                             prompt_logprobs=prompt)

    def shutdown(self) -> None:
        """Close the routing trace; stop the model's actors (cluster mode)."""
        if self.recorder is not None:
            self.recorder.close()
        stop = getattr(self.model, "shutdown", None)
        if stop is not None:
            stop()

    # ---- convenience -------------------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Run prompts to completion together; final outputs in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Yield one request's updates as its tokens are produced (other requests keep running)."""
        rid = self.add_request(prompt, params)
        while True:
            for o in self.step():
                if o.request_id == rid:
                    yield o
                    if o.finished:
                        return


def _load_model(config: EngineConfig, device: torch.device, ops):
    if config.engine == "ray":
        from cluster.ray_setup import start_ray_model

        return start_ray_model(config)
    cache = expert_cache_config(config)
    return InProcessModel.load(
        Path(config.model), DTYPES[config.dtype], device, num_kv_slots=config.num_blocks * config.block_size,
        ops=ops, block_size=config.block_size, show_progress=config.show_progress, expert_cache=cache)
