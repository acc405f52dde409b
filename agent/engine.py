"""The inference engine: one thread owns the device and serves every call.

`DeviceThread` runs model work off the event loop: jobs that callers queue (a Voxtral
step, tokenizing a prompt) and, between them, the steps of `SpeechBatcher`, which
advances every active speech stream together:

    admit -> prefill (chunked) -> [decode step: one forward for all streams, sample
    each with its own seed] -> frames of 7 codes -> SNAC windows, batched -> audio

The decode step runs the Orpheus Llama with a static, preallocated KV cache (one slot
per stream, `StaticLlama`), written out plainly in the manner of gpt-fast, and on CUDA
replays captured graphs for a set of batch sizes and context lengths. Results go back
to each call's event loop as they are made; the loop never waits on the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from .errors import AudioGenerationError
from .orpheus import (AUDIO_BASE, AUDIO_IDS, END_OF_SPEECH, EOS_COLUMN, FrameAssembler, SamplingParams,
                      column_to_token, sample_streams, stream_generator)
from .generation import head_dim
from .snac_codec import StreamingSNACDecoder, decode_batch

log = logging.getLogger(__name__)

_STOP = object()


class Stepper(Protocol):
    """Work the device thread advances whenever no job is waiting."""

    def has_work(self) -> bool: ...

    def step(self) -> None: ...


class DeviceThread:
    """The one thread that runs model work, in order: queued jobs first, then one step of
    each attached stepper, again and again; it sleeps when there is nothing to do.

    `busy_s` adds up the time spent working, so callers can tell model time from their own
    overhead."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._steppers: list[Stepper] = []
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="device", daemon=True)
        self._stopped = False
        self._thread.start()

    def attach(self, stepper: Stepper) -> None:
        self._steppers.append(stepper)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the device thread and return its result (or raise its error)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def open(self, fn: Callable[..., Any], *args: Any) -> Any:
        """run() for a function that starts something with a close() (a stream): if the
        caller is cancelled (barge-in, hang-up) before the result arrives, the result is
        closed when it does, so no stream is left running with nobody reading it."""
        future = self.submit(fn, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel():  # already running (or done): close what it returns
                future.add_done_callback(_close_result)
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._stopped:
            raise RuntimeError("the device thread has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, future))
        return future

    def _loop(self) -> None:
        while True:
            idle = not any(s.has_work() for s in self._steppers)
            try:
                job = self._jobs.get(block=idle)
            except queue.Empty:
                job = None
            while job is not None:
                if job is _STOP:
                    return
                self._run_job(*job)
                try:
                    job = self._jobs.get_nowait()  # every job queued so far goes before the next step
                except queue.Empty:
                    job = None
            for stepper in self._steppers:
                if stepper.has_work():
                    try:
                        self._timed(stepper.step)
                    except Exception:  # a stepper handles its own failures; never lose the thread
                        log.exception("device step failed")

    def _run_job(self, fn: Callable[..., Any], args: tuple, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            future.set_result(self._timed(fn, *args))
        except BaseException as e:
            future.set_exception(e)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - t0

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._jobs.put(_STOP)
            self._thread.join()


def _close_result(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


# -- the model step ---------------------------------------------------------------------

def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class StaticLlama:
    """A transformers Llama decoder run with a static KV cache of `slots` sequences of up
    to `max_len` tokens: (layers, slots, kv_heads, max_len, head_dim) keys and values.

    It reuses the decoder's own modules (norms, projections, MLP, rotary embedding) and
    writes out only the attention over the cache. Logits are computed for the rows of
    `head` only: Orpheus passes the audio ids and end_of_speech (28,673 rows of its
    156,940-row head, the only ids its sampler looks at; `audio_head`), Voxtral its whole
    head. Position max_len - 1 is scratch: rows of the batch without a stream write there,
    and no stream ever reads it.
    """

    LENGTH_STEP = 64  # eager steps attend over the longest context rounded up to this

    def __init__(self, decoder: torch.nn.Module, head: torch.Tensor, slots: int, max_len: int) -> None:
        cfg = decoder.config
        self.decoder = decoder  # a LlamaModel: embed_tokens, layers, norm, rotary_emb
        self.head = head
        self.slots = slots
        self.max_len = max_len
        self.scratch = max_len - 1
        self.head_dim = head_dim(cfg)
        self.device, self.dtype = head.device, head.dtype
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._rows = torch.arange(slots, device=self.device)
        self._keys = torch.arange(max_len, device=self.device)

    @staticmethod
    def cache_bytes(config, slots: int, max_len: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)
        return per_token * slots * max_len * torch.finfo(dtype).bits // 8

    def _blocks(self, h: torch.Tensor, positions: torch.Tensor, write: Callable, read: Callable,
                mask: torch.Tensor) -> torch.Tensor:
        """The decoder layers: h (B, T, hidden) at positions (B, T) -> the head's logits of
        each row's last position (B, head rows)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.decoder
        b, t, _ = h.shape
        cos, sin = m.rotary_emb(h, positions)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            write(i, k, v)
            keys, values = read(i)
            o = _attend(q, keys, values, mask, attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.norm(h[:, -1]) @ self.head.T

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One token for each of the first B slots: tokens and positions (B,); keys are read
        up to `length` (more than every real position). Returns (B, head rows) logits."""
        b = tokens.shape[0]
        rows = self._rows[:b]

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[i][rows, :, positions] = k[:, :, 0]
            self.v[i][rows, :, positions] = v[:, :, 0]

        def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.k[i, :b, :, :length], self.v[i, :b, :, :length]

        mask = (self._keys[:length][None, :] <= positions[:, None])[:, None, None, :]
        h = self.decoder.embed_tokens(tokens)[:, None]
        return self._blocks(h, positions[:, None], write, read, mask)

    def prefill(self, slot: int, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """Inputs of one sequence at positions start.. into `slot`: token ids (T,), or input
        embeddings (T, hidden) (Voxtral's audio is embedded by its encoder). Returns the last
        position's logits (head rows)."""
        t = inputs.shape[0]
        end = start + t
        positions = torch.arange(start, end, device=self.device)

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            self.k[i, slot, :, start:end] = k[0]
            self.v[i, slot, :, start:end] = v[0]

        def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.k[i, slot:slot + 1, :, :end], self.v[i, slot:slot + 1, :, :end]

        mask = (self._keys[:end][None, :] <= positions[:, None])[None, None]
        h = (inputs.to(self.dtype) if inputs.is_floating_point() else self.decoder.embed_tokens(inputs))[None]
        return self._blocks(h, positions[None], write, read, mask)[0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache to another slot (to keep active slots packed low)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def audio_head(model: torch.nn.Module) -> torch.Tensor:
    """The rows of Orpheus's head that its sampler reads: the 7 x 4096 audio ids, then
    end_of_speech (orpheus.audio_block's layout)."""
    weight = model.lm_head.weight
    return torch.cat([weight[AUDIO_BASE:AUDIO_BASE + AUDIO_IDS], weight[END_OF_SPEECH:END_OF_SPEECH + 1]]).contiguous()


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Grouped-query attention over the cache: q (B, heads, T, d), keys and values
    (B, kv_heads, L, d), mask (B, 1, T, L) of allowed keys -> (B, heads, T, d).

    The query heads that share a key/value head are stacked into one matrix product, so
    the cache is read once and never copied (repeating it per query head, as a generic
    kernel does, would move heads / kv_heads times more memory at every step)."""
    b, heads, t, d = q.shape
    kv = keys.shape[1]
    group = heads // kv
    scores = (q.reshape(b, kv, group * t, d) @ keys.transpose(-1, -2)) * scale  # (B, kv, g*T, L)
    scores = scores.view(b, kv, group, t, -1).masked_fill(~mask[:, :, None], -float("inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = weights.view(b, kv, group * t, -1) @ values  # (B, kv, g*T, d)
    return out.view(b, heads, t, d)


class GraphedDecode:
    """StaticLlama.decode in fixed (batch size, context length) buckets, replayed from
    CUDA graphs.

    A step copies its tokens and positions into static buffers and replays the graph of the
    smallest bucket that holds it (the rows past the step's batch write only the scratch
    position), which removes the per-kernel launch cost that dominates a small-batch decode
    step. The largest buckets are the cache's own size, so every step has one.

    `capture=False` runs each bucket eagerly through the same buffers: a CPU cannot
    capture graphs, and the tests check the bucketing and padding that way. Capture itself
    has not yet run on a GPU in this project (no GPU was lent; CI has none); a failed
    capture falls back to eager steps with a warning (SpeechBatcher).
    """

    def __init__(self, llama: StaticLlama, batch_sizes: Sequence[int], lengths: Sequence[int],
                 capture: bool = True) -> None:
        self.llama = llama
        self.batch_sizes, self.lengths = self.buckets(llama.slots, llama.max_len, batch_sizes, lengths)
        self._tokens = torch.zeros(llama.slots, dtype=torch.long, device=llama.device)
        self._positions = torch.full((llama.slots,), llama.scratch, dtype=torch.long, device=llama.device)
        self._steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        # One warm-up stream for every capture: cuBLAS keeps a workspace (32 MiB on Hopper)
        # for each stream it runs on, and a new stream per capture would hold dozens.
        self._side = torch.cuda.Stream() if capture else None
        for length in self.lengths:
            for b in reversed(self.batch_sizes):  # largest first: later graphs reuse its memory
                self._steps[(b, length)] = self._capture(b, length, pool) if capture else self._eager(b, length)
        if capture:
            log.info("captured %d decode graphs (batch %s x context %s) in %.1f s", len(self._steps),
                     self.batch_sizes, self.lengths, time.perf_counter() - t0)

    @staticmethod
    def buckets(slots: int, max_len: int, batch_sizes: Sequence[int],
                lengths: Sequence[int]) -> tuple[list[int], list[int]]:
        """The batch sizes and context lengths captured: those below the cache's size, and its size."""
        return (sorted({b for b in batch_sizes if 0 < b < slots} | {slots}),
                sorted({n for n in lengths if 0 < n < max_len} | {max_len}))

    def _eager(self, b: int, length: int) -> Callable[[], torch.Tensor]:
        tokens, positions = self._tokens[:b], self._positions[:b]
        return lambda: self.llama.decode(tokens, positions, length)

    def _capture(self, b: int, length: int, pool) -> Callable[[], torch.Tensor]:
        tokens, positions = self._tokens[:b], self._positions[:b]
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocator and kernel selection settle outside the graph
                self.llama.decode(tokens, positions, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.llama.decode(tokens, positions, length)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay

    def verify(self, tolerance: float = 1e-2) -> float:
        """Replay the smallest and the largest batch bucket against eager steps on the same
        input; raise RuntimeError when they differ by more than `tolerance` (relative to the
        logits' size), so a capture that runs but computes the wrong thing is never used.
        Writes only into the cache (free at start: every stream fills its own)."""
        length = self.lengths[0]
        worst = 0.0
        for b in (self.batch_sizes[0], self.batch_sizes[-1]):
            tokens = AUDIO_BASE + torch.arange(b, device=self.llama.device) * 7 % AUDIO_IDS
            positions = torch.arange(b, device=self.llama.device) % (length - 1)
            eager = self.llama.decode(tokens, positions, length).float()
            replayed = self.decode(tokens, positions, length).float()
            worst = max(worst, float((replayed - eager).abs().max() / eager.abs().max().clamp_min(1e-6)))
        if not worst <= tolerance:  # NaN fails too
            raise RuntimeError(f"decode graphs differ from eager steps (relative difference {worst:.3g})")
        return worst

    def bucket(self, b: int, length: int) -> tuple[int, int]:
        """The smallest (batch size, context length) bucket that holds a step."""
        return next(x for x in self.batch_sizes if x >= b), next(x for x in self.lengths if x >= length)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """As StaticLlama.decode; the result is a view that the next step overwrites."""
        b = tokens.shape[0]
        key = self.bucket(b, length)
        self._tokens[:b].copy_(tokens)
        self._positions[:b].copy_(positions)
        self._tokens[b:key[0]].zero_()
        self._positions[b:key[0]].fill_(self.llama.scratch)
        return self._steps[key]()[:b]


# Decode-step buckets: small batches in fine steps (a reply's first audio often runs with a
# few streams), large ones coarser; every row reads keys up to its bucket's length, so the
# lengths above 512 grow by at most 1.5x. The cache's own size is always added.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
GRAPH_LENGTHS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096)


# -- continuous batching ------------------------------------------------------------------

class SlotStream:
    """A generation holding a slot of a SlotBatcher's cache. The device thread fills it;
    the event loop reads what it makes with _next() and stops it with close()."""

    def __init__(self, prompt: torch.Tensor, max_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt = prompt  # on the device: token ids (T,) or input embeddings (T, hidden)
        self.max_tokens = max_tokens
        self.loop = loop
        self.tokens: list[int] = []  # sampled so far (the end token not included)
        self.slot: int | None = None
        self.prefilled = 0  # prompt positions already in the cache
        self.next_token: int | None = None  # the input of the next decode step
        self.first_token_at: float | None = None
        self.cancelled = False  # set by the event loop; the device thread drops it at the next step
        self.finished = False  # device side: nothing more will come
        self.done = False  # event-loop side: everything was read
        self._out: asyncio.Queue = asyncio.Queue()

    @property
    def context_len(self) -> int:
        """Positions in the cache once the pending input is written."""
        return self.prompt.shape[0] + len(self.tokens)

    def _take(self, token: int, now: float) -> None:
        """The token sampled for this stream (not its end token): the next step's input."""
        self.first_token_at = self.first_token_at or now
        self.tokens.append(token)
        self.next_token = token
        if len(self.tokens) >= self.max_tokens:
            self.finished = True

    def _deliver(self, item: Any) -> None:
        if not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self._out.put_nowait, item)
            except RuntimeError:  # its event loop has closed: nobody is reading any more
                self.cancelled = True

    async def _next(self) -> Any:
        """The next item delivered, or None at the end (then `done` is set)."""
        item = await self._out.get()
        if item is None:
            self.done = True
            return None
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        """Stop: the stream leaves the batch at the next step and its slot is freed."""
        self.cancelled = True
        self.done = True


@dataclass
class StepProfile:
    """Where the batcher's steps spent their time, phase by phase (admin: cancellations,
    slots and cache moves; prefill; forward: the decode step's model call; sample; snac;
    deliver: handing results to the calls' loops, releasing finished streams). On a GPU
    each phase ends with a device synchronize, so its GPU time lands in it."""

    steps: int = 0
    rows: int = 0  # decode rows, summed over steps
    max_rows: int = 0
    snac_calls: int = 0
    snac_frames: int = 0  # frames decoded in SNAC windows (context frames included)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("admin", "prefill", "forward", "sample", "snac", "deliver"), 0.0))
    _last: float = 0.0

    def begin(self) -> None:
        self.steps += 1
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        if self._last:  # 0: set in the middle of a step, which counts from the next one
            self.seconds[phase] += now - self._last
        self._last = now

    def summary(self) -> dict:
        """Per step: milliseconds in each phase, decode rows, SNAC calls."""
        n = max(self.steps, 1)
        return {"steps": self.steps, "mean_rows": round(self.rows / n, 2), "max_rows": self.max_rows,
                "ms_per_step": round(sum(self.seconds.values()) * 1000 / n, 3),
                "phase_ms_per_step": {k: round(v * 1000 / n, 3) for k, v in self.seconds.items()},
                "snac_calls_per_step": round(self.snac_calls / n, 3),
                "snac_frames_per_step": round(self.snac_frames / n, 3)}


class SlotBatcher:
    """Continuous batching over a StaticLlama, stepped by the device thread.

    Each step: drop cancelled streams, give waiting ones free slots, prefill (at most
    `prefill_chunk` prompt positions, so running streams never stall long), one decode step
    for every stream with its cache ready, then `_emit` for the streams that got a token.
    Active slots are kept packed low (cache rows moved) so decode steps stay small.
    Subclasses sample (`_sample`) and hand out what the tokens make (`_emit`).
    """

    def __init__(self, llama: StaticLlama, prefill_chunk: int, cuda_graphs: bool) -> None:
        self.llama = llama
        self.prefill_chunk = prefill_chunk
        self.graphs: GraphedDecode | None = None
        if cuda_graphs and llama.device.type == "cuda":
            try:
                with torch.inference_mode():
                    graphs = GraphedDecode(llama, GRAPH_BATCH_SIZES, GRAPH_LENGTHS)
                    log.info("decode graphs match eager steps (relative difference %.2g)", graphs.verify())
                    self.graphs = graphs
            except Exception as e:  # a driver or kernel that cannot be captured: run eager
                log.warning("CUDA graphs cannot be used (%s); decode steps run eagerly", e)
        self.slots: list[SlotStream | None] = [None] * llama.slots
        self.waiting: deque[SlotStream] = deque()  # admitted, no slot yet
        self.steps = 0
        self.profile: StepProfile | None = None  # set by the bench (and tests) to see where steps go
        # True: a prompt is fed whole in one step (at least one per step, more while the
        # prefill_chunk budget lasts), for a new stream's first token over the others' pace.
        self.whole_prompts = False

    def _enqueue(self, stream: SlotStream, what: str) -> None:
        room = self.llama.scratch - stream.prompt.shape[0]
        if room < 1:
            raise AudioGenerationError(f"{what} of {stream.prompt.shape[0]} positions does not fit "
                                       f"the engine's max_seq_len ({self.llama.max_len})")
        stream.max_tokens = min(stream.max_tokens, room)
        self.waiting.append(stream)

    @property
    def active(self) -> list:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @torch.inference_mode()
    def step(self) -> None:
        if self.profile is not None:
            self.profile.begin()
        self._drop_cancelled()
        self._assign_slots()
        self._mark("admin")
        try:
            due = self._prefill()
            self._mark("prefill")
            due += self._decode()
            self._emit(due)
        except Exception as e:  # a device failure fails the streams of this step, not the engine
            log.exception("batched step failed")
            for stream in self.active:
                stream._deliver(AudioGenerationError(f"generation step failed: {e}"))
                self._release(stream)
        self._mark("deliver")
        self.steps += 1

    def _mark(self, phase: str) -> None:
        """End of a phase of the step (only when profiling: it waits for the device)."""
        if self.profile is not None:
            if self.llama.device.type == "cuda":
                torch.cuda.synchronize(self.llama.device)
            self.profile.mark(phase)

    def _drop_cancelled(self) -> None:
        for stream in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(stream)
        for stream in self.active:
            if stream.cancelled:
                self._release(stream)

    def _assign_slots(self) -> None:
        while self.waiting and None in self.slots:
            stream = self.waiting.popleft()
            stream.slot = self.slots.index(None)
            self.slots[stream.slot] = stream
            self._on_assign(stream.slot)

    def _release(self, stream: SlotStream) -> None:
        stream.finished = True
        if stream.slot is None:
            return
        self.slots[stream.slot] = None
        stream.slot = None
        self._pack()

    def _pack(self) -> None:
        """Move the highest streams into free lower slots, so decode steps stay small."""
        while True:
            free = next((i for i, s in enumerate(self.slots) if s is None), None)
            last = max((i for i, s in enumerate(self.slots) if s is not None), default=None)
            if free is None or last is None or last < free:
                return
            stream = self.slots[last]
            self.llama.move(last, free, stream.context_len)
            self._on_move(last, free)
            self.slots[free], self.slots[last] = stream, None
            stream.slot = free

    def _prefill(self) -> list:
        """Feed waiting prompts into the cache, up to prefill_chunk positions this step
        (or whole prompts: whole_prompts). Returns the streams whose first token was sampled."""
        budget = self.prefill_chunk
        started = []
        for stream in self.active:
            if budget <= 0:
                break
            if stream.next_token is not None or stream.finished:
                continue
            if stream.prefilled == 0:
                self._prepare(stream)
            todo = stream.prompt[stream.prefilled:None if self.whole_prompts else stream.prefilled + budget]
            logits = self.llama.prefill(stream.slot, todo, stream.prefilled)
            stream.prefilled += todo.shape[0]
            budget -= todo.shape[0]
            if stream.prefilled == stream.prompt.shape[0]:
                self._sample([stream], logits[None])
                started.append(stream)
        return started

    def _decode(self) -> list:
        """One decode step for every stream whose prompt is in the cache."""
        rows = [s for s in self.active if s.next_token is not None and not s.finished]
        if not rows:
            return []
        b = max(s.slot for s in rows) + 1
        tokens = torch.zeros(b, dtype=torch.long)
        positions = torch.full((b,), self.llama.scratch, dtype=torch.long)
        for s in rows:
            tokens[s.slot] = s.next_token
            positions[s.slot] = s.context_len - 1
        length = max(s.context_len for s in rows)
        tokens, positions = tokens.to(self.llama.device), positions.to(self.llama.device)
        if self.graphs is not None:
            logits = self.graphs.decode(tokens, positions, length)
        else:
            logits = self.llama.decode(tokens, positions, _round_up(length, StaticLlama.LENGTH_STEP))
        self._mark("forward")
        index = torch.tensor([s.slot for s in rows], device=logits.device)
        self._sample(rows, logits.index_select(0, index))
        self._mark("sample")
        if self.profile is not None:
            self.profile.rows += len(rows)
            self.profile.max_rows = max(self.profile.max_rows, len(rows))
        return rows

    # -- what a subclass adds ------------------------------------------------------------

    def _prepare(self, stream: SlotStream) -> None:
        """Just before a stream's prefill starts (e.g. encode its audio into `prompt`)."""

    def _on_assign(self, slot: int) -> None:
        """A stream takes `slot` (reset per-slot state)."""

    def _on_move(self, src: int, dst: int) -> None:
        """A stream's cache moved from slot src to dst (move per-slot state along)."""

    def _sample(self, streams: list, logits: torch.Tensor) -> None:
        """One token for each stream from its row of logits: append it to stream.tokens and
        set stream.next_token, or set stream.finished."""
        raise NotImplementedError

    def _emit(self, streams: list) -> None:
        """Hand out what this step's tokens made; deliver None to and release the finished."""
        raise NotImplementedError


# -- speech streams -------------------------------------------------------------------------

class BatchedStream(SlotStream):
    """One sentence being spoken by the batcher. The device thread fills it; the event
    loop reads its audio with next_audio() and stops it with close()."""

    def __init__(self, prompt: torch.Tensor, params: SamplingParams, seed: int, decoder: StreamingSNACDecoder,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(prompt, params.max_tokens, loop)
        self.params = params
        self.generator = stream_generator(seed)
        self.decoder = decoder
        self.assembler = FrameAssembler()

    @property
    def position(self) -> int:
        """Audio tokens so far: the next token's place in its 7-token frame is position % 7."""
        return len(self.tokens)

    async def next_audio(self) -> np.ndarray | None:
        """The next chunk of float32 audio, or None at the end (then `done` is set)."""
        return await self._next()


class SpeechBatcher(SlotBatcher):
    """Continuous batching of Orpheus decoding: position-constrained sampling per stream,
    frames of 7 codes, and the SNAC windows that became due, decoded together. While a new
    stream waits for its first audio, streams more than `defer_lead_s` ahead of their
    listeners put off their windows, so the first audio of a new reply comes first.
    """

    def __init__(self, orpheus, snac, max_streams: int, max_seq_len: int, prefill_chunk: int,
                 defer_lead_s: float, snac_mode: str, max_frames_per_window: int, cuda_graphs: bool) -> None:
        llama = StaticLlama(orpheus.model.model, audio_head(orpheus.model), max_streams, max_seq_len)
        super().__init__(llama, prefill_chunk, cuda_graphs)
        self.snac = snac
        self.defer_lead_s = defer_lead_s
        self.snac_mode = snac_mode
        self.max_frames_per_window = max_frames_per_window
        self.pad_snac_windows = llama.device.type == "cuda"  # one SNAC call per step (decode_batch)
        self.seen = torch.zeros(max_streams, AUDIO_IDS + 1, dtype=torch.bool, device=llama.device)

    def admit(self, prompt_ids: list[int], params: SamplingParams, seed: int,
              loop: asyncio.AbstractEventLoop) -> BatchedStream:
        """A new stream (on the device thread); it starts at the next step with a free slot."""
        decoder = StreamingSNACDecoder(self.snac, self.snac_mode, self.max_frames_per_window)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.llama.device)
        stream = BatchedStream(prompt, params, seed, decoder, loop)
        self._enqueue(stream, "a speech prompt")
        return stream

    def _on_assign(self, slot: int) -> None:
        self.seen[slot] = False

    def _on_move(self, src: int, dst: int) -> None:
        self.seen[dst] = self.seen[src]

    def _sample(self, streams: list[BatchedStream], block: torch.Tensor) -> None:
        """Sample one token per stream from its logits block and feed its frame assembler."""
        slots = torch.tensor([s.slot for s in streams], device=block.device)
        columns = sample_streams(block, [s.position for s in streams], self.seen.index_select(0, slots),
                                 [s.params for s in streams], [s.generator for s in streams])
        self.seen[slots, columns] = True
        now = time.perf_counter()
        for stream, column in zip(streams, columns.tolist()):
            token = column_to_token(column)
            if column == EOS_COLUMN:
                stream.finished = True
                continue
            stream._take(token, now)
            if stream.finished:  # its token limit, not end_of_speech: the audio fades out
                stream.decoder.fade_at_end()
            frame = stream.assembler.push(token)
            if frame is not None:
                stream.decoder.add(frame)

    def _emit(self, streams: list[BatchedStream]) -> None:
        """Decode the SNAC windows now due, first audio before streams far ahead."""
        windows = []
        for stream in streams:
            if stream.finished or stream.assembler.partial_tokens == 0:
                window = stream.decoder.next_window(final=stream.finished)
                if window is not None:
                    windows.append((stream, window))
        if any(s.decoder.emitted == 0 and not s.finished for s in self.active):  # a new stream warms up
            windows = [(s, w) for s, w in windows
                       if s.finished or s.decoder.emitted == 0 or s.decoder.lead_s <= self.defer_lead_s]
        jobs = [(s.decoder, w) for s, w in windows]
        audio = decode_batch(self.snac, jobs, self.pad_snac_windows) if jobs else []
        if self.profile is not None:
            decoded = [s.decoder.last_window for s, _ in windows]
            self.profile.snac_calls += len({w.frames for w in decoded})  # one call per window length
            self.profile.snac_frames += sum(w.frames for w in decoded)
        self._mark("snac")
        for (stream, _), chunk in zip(windows, audio):
            if len(chunk):
                stream._deliver(chunk)
        for stream in streams:
            if stream.assembler.partial_tokens == 0:
                stream.decoder.mark_done()
            if stream.finished:
                stream._deliver(None)
                self._release(stream)
