"""Orpheus TTS: the prompt, position-constrained sampling, and the token loop.

Orpheus is a Llama model whose vocabulary holds the Llama 3 text tokens followed by
7 x 4096 audio-code tokens. After start_of_speech it emits audio tokens in frames of
seven; token i of the stream belongs to slot i % 7, and slot k may only use its own
4096 ids (see ../shared/reference/orpheus-snac.md). The decode loop is written out
plainly: one prefill, then one forward per token with the KV cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agent.engine.generation import (
    CachedGeneration,
    InProcessModel,
    draw_uniforms,
    estimate_llama_bytes,
    load_failure,
    row_values,
    sample_rows,
)
from agent.errors import ModelInitializationError
from agent.models.snac import FRAME_TOKENS

log = logging.getLogger(__name__)

# Token ids of the Orpheus vocabulary.
BOS = 128000
EOT = 128009
START_OF_SPEECH = 128257
END_OF_SPEECH = 128258  # the stop token
START_OF_HUMAN = 128259
END_OF_HUMAN = 128260
START_OF_AI = 128261
AUDIO_BASE = 128266  # <custom_token_10>: code 0 of slot 0
CODEBOOK_SIZE = 4096
VOCAB_SIZE = 156940

EMOTIVE_TAGS = ("<laugh>", "<chuckle>", "<sigh>", "<cough>", "<sniffle>", "<groan>", "<yawn>", "<gasp>")


def token_to_code(token_id: int, position: int) -> int | None:
    """The SNAC code carried by audio token `token_id` at stream position `position`,
    or None when the token is not a valid audio token for that slot. Code 0 is valid."""
    code = token_id - AUDIO_BASE - (position % FRAME_TOKENS) * CODEBOOK_SIZE
    return code if 0 <= code < CODEBOOK_SIZE else None


class FrameAssembler:
    """Turns the audio token stream into frames of seven codes.

    Every token advances the position, valid or not, so one bad token can never shift
    the frames after it. An invalid token's code is replaced by the same slot's code of
    the previous frame (0 in the first frame), which keeps the frame decodable.
    """

    def __init__(self) -> None:
        self.position = 0
        self.invalid_tokens = 0
        self._current: list[int] = []
        self._previous: list[int] | None = None

    def push(self, token_id: int) -> list[int] | None:
        """Add one token; return the frame it completes, if any."""
        slot = self.position % FRAME_TOKENS
        code = token_to_code(token_id, self.position)
        if code is None:
            self.invalid_tokens += 1
            code = self._previous[slot] if self._previous else 0
        self.position += 1
        self._current.append(code)
        if len(self._current) < FRAME_TOKENS:
            return None
        frame, self._current = self._current, []
        self._previous = frame
        return frame

    @property
    def partial_tokens(self) -> int:
        """Tokens of an unfinished frame (dropped if the stream ends here)."""
        return len(self._current)


def tokens_to_frames(token_ids: Sequence[int]) -> list[list[int]]:
    """All complete frames of an audio token sequence (a trailing partial frame is dropped)."""
    assembler = FrameAssembler()
    frames = [f for f in (assembler.push(t) for t in token_ids) if f is not None]
    return frames


@dataclass(frozen=True)
class SamplingParams:
    """How Orpheus samples one reply's audio tokens."""
    temperature: float = 0.6
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    max_tokens: int = 1400  # audio tokens; a multiple of 7


AUDIO_IDS = FRAME_TOKENS * CODEBOOK_SIZE  # 28,672 audio ids from AUDIO_BASE on
EOS_COLUMN = AUDIO_IDS  # sampling sees the audio ids, then end_of_speech, as one block


def audio_block(logits: torch.Tensor) -> torch.Tensor:
    """The scores sampling looks at, from full-vocabulary logits (..., V): the 28,672
    audio ids, then end_of_speech (..., 28,673)."""
    return torch.cat([logits[..., AUDIO_BASE:AUDIO_BASE + AUDIO_IDS], logits[..., END_OF_SPEECH:END_OF_SPEECH + 1]], -1)


def column_to_token(column: int) -> int:
    return END_OF_SPEECH if column == EOS_COLUMN else AUDIO_BASE + column


def sample_audio(block: torch.Tensor, positions: torch.Tensor, seen: torch.Tensor, temperature: torch.Tensor,
                 top_p: torch.Tensor, repetition_penalty: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Position-constrained sampling for a batch of streams: the chosen block column per row.

    Row b may only choose among the 4096 ids of slot positions[b] % 7 (plus end_of_speech
    at a frame boundary), so a stream cannot misalign. `seen` (B, 28,673, on the block's
    device) marks the ids a stream already used: the repetition penalty applies to those
    as transformers' processor would to the full row. The per-row settings may come from
    any device (they are moved to the block's). The single-stream sampler is this with
    B = 1, so a stream gets the same tokens alone or batched.
    """
    device = block.device
    slot = positions.to(device) % FRAME_TOKENS
    cols = slot[:, None] * CODEBOOK_SIZE + torch.arange(CODEBOOK_SIZE, device=device)
    cols = torch.cat([cols, torch.full_like(cols[:, :1], EOS_COLUMN)], 1)  # (B, 4097)
    scores = block.gather(1, cols).float()
    scores[:, -1] = torch.where(slot == 0, scores[:, -1], torch.full_like(scores[:, -1], -float("inf")))
    rp = repetition_penalty.to(device, torch.float32)[:, None]
    penalised = torch.where(scores > 0, scores / rp, scores * rp)
    scores = torch.where(seen.gather(1, cols), penalised, scores)
    choice = sample_rows(scores, temperature, top_p, uniforms)
    return cols.gather(1, choice[:, None])[:, 0]


def sample_streams(block: torch.Tensor, positions: Sequence[int], seen: torch.Tensor,
                   params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """sample_audio with each stream's position, settings and generator, every tensor on
    the block's device: what the single stream and the batcher both sample with."""
    device = block.device
    return sample_audio(block, torch.tensor(list(positions), device=device), seen,
                        row_values([p.temperature for p in params], device),
                        row_values([p.top_p for p in params], device),
                        row_values([p.repetition_penalty for p in params], device),
                        draw_uniforms(generators, device))


class ConstrainedSampler:
    """Position-constrained sampling for one stream (sample_audio with one row)."""

    def __init__(self, params: SamplingParams, generator: torch.Generator, device: torch.device) -> None:
        self.params = params
        self.generator = generator
        self.seen = torch.zeros(1, AUDIO_IDS + 1, dtype=torch.bool, device=device)  # the prompt has no audio ids

    def __call__(self, logits: torch.Tensor, position: int) -> int:
        """The next token id, from one position's full-vocabulary logits."""
        block = audio_block(logits)[None]
        column = int(sample_streams(block, [position], self.seen, [self.params], [self.generator])[0])
        self.seen[0, column] = True
        return column_to_token(column)


def stream_generator(seed: int) -> torch.Generator:
    """A stream's own random numbers (CPU, so a seed means the same on every device)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


class TokenStream(CachedGeneration):
    """One generation: the prefill on the first step, then one token per step.

    Holds the KV cache until it finishes or is closed; close() frees it at once, which
    is how a cancelled request gives its memory back.
    """

    def __init__(self, model: OrpheusDirectModel, prompt_ids: Sequence[int], params: SamplingParams,
                 seed: int) -> None:
        super().__init__(torch.tensor([list(prompt_ids)], device=model.device))
        self.model = model
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.sampler = ConstrainedSampler(params, stream_generator(seed), model.device)
        self.position = 0  # audio tokens generated so far
        self.stopped_by_model = False  # True when the model chose end_of_speech

    @property
    def truncated(self) -> bool:
        """The stream reached max_tokens before the model ended it."""
        return not self.stopped_by_model and self.position >= self.params.max_tokens

    @torch.inference_mode()
    def step(self) -> int | None:
        """Run one forward pass and return the next audio token, or None when done."""
        logits = self._forward(self.model.forward, stop=self.position >= self.params.max_tokens)
        if logits is None:
            return None
        token = self.sampler(logits, self.position)
        if token == END_OF_SPEECH:
            self.stopped_by_model = True
            self.close()
            return None
        self.position += 1
        self._next_input = torch.tensor([[token]], device=self.model.device)
        return token


class OrpheusDirectModel(InProcessModel):
    """The Orpheus language model and its tokenizer, loaded in-process with transformers."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, source: str) -> None:
        super().__init__(model, source)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype,
             check_memory: Callable[[str, int], None] | None = None) -> OrpheusDirectModel:
        """Load from a Hub id or a local directory. `check_memory(name, bytes)` may refuse."""
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

        from agent.models.memory import placement

        try:
            config = AutoConfig.from_pretrained(source)
            if check_memory is not None:
                check_memory(f"Orpheus ({source})", estimate_llama_bytes(config, dtype))
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = LlamaForCausalLM.from_pretrained(source, dtype=dtype, **placement(device))
        except ModelInitializationError:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, HF errors...
            raise load_failure("Orpheus", source, e) from e
        return cls.ready(model, tokenizer, source, device)

    @classmethod
    def ready(cls, model: torch.nn.Module, tokenizer: Any, source: str, device: torch.device) -> OrpheusDirectModel:
        """A loaded (or built) Orpheus, checked and on its device."""
        config: Any = model.config  # a LlamaConfig (nn.Module types attributes as Tensor | Module)
        if getattr(config, "vocab_size", 0) < VOCAB_SIZE:
            raise ModelInitializationError(
                f"model {source!r} has vocab_size {config.vocab_size}, not Orpheus's {VOCAB_SIZE}")
        model.to(device).eval()
        return cls(model, tokenizer, source)

    def prompt_ids(self, voice: str, text: str) -> list[int]:
        """The reference layout: start_of_human, BOS + "voice: text", eot, end_of_human,
        start_of_ai, start_of_speech."""
        ids = self.tokenizer(f"{voice}: {text}").input_ids
        if not ids or ids[0] != BOS:
            ids = [BOS] + list(ids)
        return [START_OF_HUMAN, *ids, EOT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int) -> TokenStream:
        return TokenStream(self, prompt_ids, params, seed)

    def forward(self, input_ids: torch.Tensor, cache: Any) -> Any:
        return self._forward_cached(cache, input_ids=input_ids)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
