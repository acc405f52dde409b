"""A Llama decoder run with a static, preallocated KV cache (one slot per stream),
written out plainly in the manner of gpt-fast, and on CUDA replayed from captured graphs
for a set of batch sizes and context lengths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from agent.engine.generation import head_dim

log = logging.getLogger(__name__)

# -- the model step ---------------------------------------------------------------------

def round_up(n: int, to: int) -> int:
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
        # nn.Module types its submodules and attributes as Tensor | Module; they are a
        # LlamaModel's: embed_tokens, layers, norm, rotary_emb, and a LlamaConfig.
        cfg: Any = decoder.config
        self.decoder: Any = decoder
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
    def cache_bytes(config: Any, slots: int, max_len: int, dtype: torch.dtype) -> int:
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
        assert side is not None  # made in __init__ when capturing
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
        vocab = self.llama.decoder.embed_tokens.num_embeddings
        worst = 0.0
        for b in (self.batch_sizes[0], self.batch_sizes[-1]):
            tokens = torch.arange(b, device=self.llama.device) * 7919 % vocab  # any ids of this decoder
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
