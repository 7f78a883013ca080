"""The stepwise engine that both pools drive.

Lifecycle of a request:
1. `add_request` validates it (a bad field raises ValueError and changes nothing)
   and queues it as WAITING.
2. Each `step()` schedules a batch, runs it, samples, and returns a RequestOutput
   for every request that produced a token or finished in that step.
3. A request finishes on EOS, a stop token, a stop string, max_tokens or
   max_model_len, or by `abort_request`; its blocks return to the pool at once.

On a decode instance of a disaggregated cluster, `reserve_remote_prefill` puts a
request in the scheduler's waiting-for-remote-KV queue, whose blocks a prefill instance
fills; `commit_remote_prefill` then adds the sequence to the running batch with the
first token that came with the KV, and `fail_remote_prefill` falls back to computing
the prompt locally (counted). `abort_request` frees it in any state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockManager
from engine.block_pool import BlockPool, CacheListener
from engine.config import EngineConfig, ModelConfig
from engine.forward_hooks import LayerHook
from engine.kv_cache import KVCache, KVCacheLayout
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.model_source import resolve_model
from engine.outputs import EngineLoad, RequestMetrics, RequestOutput
from engine.parallel.comm import RankGroups
from engine.resume import Resume
from engine.sampling import Sampler, SamplingParams, TokenLogprob, skip_draws
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

KVStorage = Callable[[KVCacheLayout], torch.Tensor]
# Sees each step's outputs on the engine thread before `step` returns them.
OutputHook = Callable[[list[RequestOutput]], None]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        layer_hook: LayerHook | None = None,
        kv_storage: KVStorage | None = None,
        cache_listener: CacheListener | None = None,
        groups: RankGroups | None = None,
        output_hook: OutputHook | None = None,
    ) -> None:
        """Build the engine. A TP/PP engine passes rank 0's `groups`; the other ranks
        run `engine.parallel.worker.run_rank` with the same config."""
        self.config = config
        self._output_hook = output_hook
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.tp * config.pp > 1 and (groups is None or groups.layout.rank != 0):
            raise ValueError("tp/pp > 1: the engine runs on rank 0 and needs its groups")
        self.device = torch.device(config.device)
        model_dir = resolve_model(config.model)
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({mc.max_position_embeddings})"
            )
        self.tokenizer = Tokenizer(model_dir)
        self.eos_token_ids = mc.eos_token_ids or self.tokenizer.eos_token_ids

        self.model, layout = load_model(config, model_dir, mc, self.max_model_len, groups)
        if layout.num_blocks * layout.block_size < self.max_model_len:
            raise ValueError(
                f"kv_cache_bytes ({config.kv_cache_bytes}) holds "
                f"{layout.num_blocks * layout.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}); raise kv_cache_bytes or lower max_model_len"
            )
        storage = kv_storage(layout) if kv_storage else None
        self.kv_cache = KVCache(layout, self.device, storage)
        self.block_pool = BlockPool(layout.num_blocks, cache_listener)
        self.scheduler = Scheduler(
            BlockManager(self.block_pool, config.block_size, config.enable_prefix_caching),
            config.max_num_batched_tokens,
            config.max_num_seqs,
        )
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.device, Sampler(), layer_hook, groups
        )
        self._seqs: dict[str, Sequence] = {}
        self.last_step_tokens = 0  # tokens the latest step computed (for metrics)
        self.num_remote_prefill_fallbacks = 0
        log.info(
            "engine ready: %s, %s, %d KV blocks of %d tokens",
            model_dir.name,
            config.dtype,
            layout.num_blocks,
            layout.block_size,
        )

    # -- requests -------------------------------------------------------------------

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the first bad field; side-effect free."""
        params.validate(
            self.model_config.vocab_size, self.config.max_stop_strings, self.config.max_logprobs
        )
        if not prompt:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt_token_ids: every id must be in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt)} tokens, but max_model_len is "
                f"{self.max_model_len} (prompt plus at least one output token)"
            )

    def _new_seq(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> Sequence:
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(prompt, params)
        done = list(resume.output_token_ids) if resume is not None else []
        if resume is not None:
            resume.validate(self.model_config.vocab_size, params.max_tokens)
            if len(prompt) + len(done) >= self.max_model_len:
                raise ValueError("resume.output_token_ids: no room left under max_model_len")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
            if not params.greedy:
                skip_draws(gen, self.model_config.vocab_size, len(done))
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop)
        if resume is not None:
            detok.resume(done, resume.text_chars_sent)
        tokens = list(prompt) + done
        seq = Sequence(request_id, tokens, params, self.config.block_size, detok, gen)
        seq.num_resumed = len(done)
        return seq

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> None:
        """Queue a request; with `resume`, one that another instance started
        (engine.resume): its tokens so far are computed with the prompt."""
        seq = self._new_seq(request_id, prompt, params, resume)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def shutdown(self) -> None:
        """Stop the other ranks of a TP/PP engine (no-op for one rank)."""
        self.runner.stop_workers()

    def check(self) -> None:
        """Raise if a TP/PP engine's other ranks are known to be unreachable."""
        self.runner.check_ranks()

    def load(self) -> EngineLoad:
        sched = self.scheduler
        # Preempted sequences recompute their output tokens too.
        queued = sum(s.num_tokens - s.num_computed for s in sched.waiting)
        queued += sum(s.num_tokens - s.num_computed for s in sched.running if s.is_prefill)
        return EngineLoad(
            waiting_seqs=len(sched.waiting),
            running_seqs=len(sched.running),
            queued_prefill_tokens=queued,
            free_blocks=self.block_pool.num_free,
            total_blocks=self.block_pool.num_blocks,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self._seqs)

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    # -- disaggregated prefill, decode side ------------------------------------------

    def reserve_remote_prefill(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        first_block: int = 0,
        resume: Resume | None = None,
    ) -> list[int]:
        """Queue a prompt that a prefill instance computes: the scheduler holds blocks
        for all of it, and returns those the transfer fills (prompt blocks
        `first_block...`; the ones before come from the prefix cache). With `resume`,
        the prompt the prefill instance computes is the prompt and the resumed tokens.

        Raises OutOfBlocksError, holding nothing, if the pool cannot hold it now.
        """
        seq = self._new_seq(request_id, prompt, params, resume)
        blocks = self.scheduler.add_remote(seq, first_block)
        self._seqs[request_id] = seq
        return blocks

    def commit_remote_prefill(
        self,
        request_id: str,
        first_token_id: int,
        logprob: TokenLogprob | None = None,
        sampler_draws: int = 0,
    ) -> RequestOutput:
        """The prompt's KV has landed: run the sequence from its first token.

        `logprob` and `sampler_draws` come from the prefill instance with the KV, so
        logprobs and a seeded request's random stream continue where it left off.
        """
        seq = self._remote(request_id)
        vocab = self.model_config.vocab_size
        if not 0 <= first_token_id < vocab:
            raise ValueError(f"first_token_id {first_token_id} is outside [0, {vocab})")
        if seq.generator is not None and not seq.params.greedy:
            # the draws the prefill instance made beyond those this generator skipped
            skip_draws(seq.generator, vocab, sampler_draws - _draws(seq))
        self.scheduler.remote_kv_landed(seq)
        out = self._append_token(seq, first_token_id, logprob, time.monotonic())
        if out.finished:
            self._seqs.pop(request_id, None)
        return out

    def fail_remote_prefill(self, request_id: str) -> None:
        """The KV will not come: compute the prompt here."""
        self.scheduler.remote_kv_failed(self._remote(request_id))
        self.num_remote_prefill_fallbacks += 1

    def _remote(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not Status.WAITING_FOR_REMOTE_KV:
            raise KeyError(f"no remote prefill pending for {request_id!r}")
        return seq

    # -- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.last_step_tokens = sched.num_tokens
        if not sched.scheduled:
            # Prompts may wait for blocks held outside running sequences (pins of
            # transfers still reading them, remote prefills): those come back through a
            # command. With nothing held, a prompt that does not fit cannot happen while
            # one max_model_len sequence fits the cache; fail loudly rather than spin.
            idle = self.scheduler.waiting and not self.scheduler.running
            if idle and self.block_pool.num_free == self.block_pool.num_blocks:
                raise RuntimeError("scheduler made no progress with an idle batch")
            return []
        sampling = [s.seq for s in sched.scheduled if s.samples]
        tokens, logprobs = self.runner.execute(sched)
        self.scheduler.advance(sched)
        now = time.monotonic()
        outputs = []
        for seq, tok, lp in zip(sampling, tokens, logprobs, strict=True):
            out = self._append_token(seq, tok, lp, now)
            outputs.append(out)
            if out.finished:
                self._seqs.pop(seq.request_id, None)
        if self._output_hook is not None and outputs:
            self._output_hook(outputs)
        return outputs

    def _append_token(
        self, seq: Sequence, token: int, lp: TokenLogprob | None, now: float
    ) -> RequestOutput:
        seq.output.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        reason, stop_reason = self._check_stop(seq, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq, stop_reason)

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, str | int | None]:
        p = seq.params
        assert seq.detok is not None
        if seq.detok.push(token):
            return "stop", seq.detok.stop_reason
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop", token
        if token in p.stop_token_ids:
            return "stop", token
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _output(self, seq: Sequence, stop_reason: str | int | None) -> RequestOutput:
        assert seq.detok is not None
        finished = seq.finished
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt[: len(seq.prompt) - seq.num_resumed],
            token_ids=seq.generated if seq.num_resumed else list(seq.output),
            text=seq.detok.text,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            new_token_ids=seq.take_new_tokens(),
            new_text=seq.detok.delta(finished),
            metrics=_metrics(seq) if finished else None,
            sampler_draws=_draws(seq),
        )


def _draws(seq: Sequence) -> int:
    """Tokens the request's own generator has sampled (each generated token is one,
    the resumed ones included)."""
    if seq.generator is None or seq.params.greedy:
        return 0
    return seq.num_generated


def _metrics(seq: Sequence) -> RequestMetrics:
    t = seq.timings
    first = t.first_token or t.arrival
    sched = t.first_scheduled or t.arrival
    end = t.finished or first
    n = len(seq.output)
    return RequestMetrics(
        queue_s=sched - t.arrival,
        prefill_s=first - sched,
        ttft_s=first - t.arrival,
        tpot_s=(end - first) / (n - 1) if n > 1 else 0.0,
        num_cached_tokens=seq.num_cached_prompt_tokens,
        first_token_at=first,
    )
