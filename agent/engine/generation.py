"""What Orpheus's and Voxtral's decode loops share: sampling, the KV-cache lifecycle,
weight-size estimates and error messages."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from agent.errors import ModelInitializationError


def sample_rows(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One choice per row of `scores` (B, N logits), with per-row temperature and top-p
    (B,), drawn by inverse CDF from the given uniforms (B,) in [0, 1) (argmax where the
    temperature is 0). Each caller draws its uniforms from its own generator, so a row
    gets the same choice whether it is sampled alone or in a batch. The settings may come
    from any device: they are moved to the scores' (CUDA refuses a mix)."""
    device = scores.device
    scores = scores.float()
    temperature, top_p = temperature.to(device, torch.float32), top_p.to(device, torch.float32)
    greedy = temperature <= 0.0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(scores / t[:, None], dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always the first).
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p[:, None]
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = torch.cumsum(sorted_probs, dim=-1)
    target = uniforms.to(device, cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
    choice = order.gather(1, picked)[:, 0]
    return torch.where(greedy, scores.argmax(dim=-1), choice)


def draw_uniform(generator: torch.Generator) -> float:
    """The next uniform in [0, 1) of a (CPU) generator: one per sampled token."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


def row_values(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row settings (B,) as one float32 tensor on the sampling device."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def draw_uniforms(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform per row, each from its row's own CPU generator, on the sampling device."""
    return torch.tensor([draw_uniform(g) for g in generators], dtype=torch.float64).to(device)


def sample_choices(scores: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
                   generators: Sequence[torch.Generator]) -> torch.Tensor:
    """sample_rows with each row's settings and generator, every tensor on the scores' device."""
    device = scores.device
    return sample_rows(scores, row_values(temperatures, device), row_values(top_ps, device),
                       draw_uniforms(generators, device))


def sample_index(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Index of the choice drawn from one row of `scores` (see sample_rows)."""
    return int(sample_choices(scores[None], [temperature], [top_p], [generator])[0])


class CachedGeneration:
    """One generation holding a KV cache between forward passes.

    Subclasses write step(): they call _forward() for the next logits and put the next
    input in `_next_input`. close() frees the cache at once and is safe from any thread
    at any time (the event loop closes a stream while the device thread runs its step);
    a forward pass that fails closes the generation too, so nothing is kept.
    """

    def __init__(self, first_input: Any) -> None:
        self.finished = False
        self._cache = None
        self._next_input = first_input
        self._lock = threading.Lock()

    def _forward(self, forward: Callable[[Any, Any], Any], stop: bool = False) -> torch.Tensor | None:
        """The last position's logits of one forward pass on the pending input, or None
        when the generation is closed (before or during the pass). `stop` closes it."""
        with self._lock:
            if self.finished:
                return None
            if stop:
                self._close_locked()
                return None
            inputs, cache = self._next_input, self._cache
        try:
            out = forward(inputs, cache)
        except BaseException:
            self.close()
            raise
        with self._lock:
            if self.finished:  # closed (cancelled) while the forward pass ran
                return None
            self._cache = out.cache
            return out.logits[0, -1]

    def close(self) -> None:
        """Finish now and free the KV cache."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        self.finished = True
        self._cache = None
        self._next_input = None

    @property
    def holds_cache(self) -> bool:
        return self._cache is not None


class InProcessModel:
    """A transformers model run in this process. Forward passes run one at a time (steps
    of different streams interleave) and are counted: tests use the count to see that a
    cancelled generation really stopped."""

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        # Any: a transformers model, whose submodules and config nn.Module types as
        # Tensor | Module; unload() sets it to None.
        self.model: Any = model
        self.source = source
        self.forward_calls = 0
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward_cached(self, cache, **inputs: Any):
        with self._lock:
            self.forward_calls += 1
            # `cache`: transformers' name for it from 5.24 on (past_key_values before).
            return self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)


def load_failure(what: str, source: str, e: BaseException) -> ModelInitializationError:
    """The one-line error for a model that cannot be loaded, with the way out."""
    return ModelInitializationError(
        f"cannot load {what} model {source!r}: {first_line(e)}. "
        "To run without downloaded weights, use --profile tiny.")


def head_dim(config: Any) -> int:
    """A Llama config's attention head size (hidden / heads unless the config says)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def estimate_llama_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of a Llama model's weights, from its config alone (nothing is loaded)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = head_dim(config)
    attention = h * heads * d * 2 + h * kv * d * 2
    per_layer = attention + 3 * h * i + 2 * h
    embeddings = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    params = n * per_layer + embeddings + h
    return params * torch.finfo(dtype).bits // 8


def first_line(e: BaseException) -> str:
    """An exception as one line, for messages meant for the user."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].rstrip(".")
