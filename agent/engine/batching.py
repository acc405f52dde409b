"""Continuous batching over a StaticLlama: streams take a slot of the cache, are prefilled
(in chunks), then advance together, one forward pass for all of them per step:

    admit -> prefill (chunked) -> [decode step: one forward for all streams, sample
    each with its own seed] -> hand out what the tokens made

Each model brings its own batcher (a SlotBatcher subclass: how to sample, what to hand
out); this module knows no model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.engine.llama import GRAPH_BATCH_SIZES, GRAPH_LENGTHS, GraphedDecode, StaticLlama, round_up
from agent.errors import AudioGenerationError

log = logging.getLogger(__name__)

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
        # Background work (a caller transcript): queued behind every other stream, and given
        # a slot only while another one stays free for whatever comes next.
        self.background = False
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
        if stream.background:
            self.waiting.append(stream)
        else:  # ahead of the background streams
            first = next((i for i, s in enumerate(self.waiting) if s.background), len(self.waiting))
            self.waiting.insert(first, stream)

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
            free = self.slots.count(None)
            if self.waiting[0].background and free < min(2, len(self.slots)):
                break  # the last free slot is kept for a stream that is not background
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
            assert stream is not None  # `last` is an occupied slot
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
            logits = self.llama.decode(tokens, positions, round_up(length, StaticLlama.LENGTH_STEP))
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
