"""Device choice and memory: check before loading (GPU memory, or RAM on a CPU), report,
clean up after."""

from __future__ import annotations

import gc
import logging
import os
import resource
from collections.abc import Callable
from typing import Any

import torch

from agent.errors import ConfigError, InsufficientVRAMError

log = logging.getLogger(__name__)
GIB = 1024**3


def resolve_device(setting: str) -> torch.device:
    """"auto" picks CUDA when present and otherwise warns loudly that the CPU is slow;
    "cuda:N" pins this process to GPU N (one process per GPU)."""
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"setting device.device is {setting!r} but no CUDA GPU is available")
        index = int(setting.split(":")[1]) if ":" in setting else None
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"setting device.device is {setting!r} but this machine has "
                              f"{torch.cuda.device_count()} GPUs (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return torch.device(setting)
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    log.warning("=" * 72)
    log.warning("NO CUDA GPU FOUND: running the models on the CPU. This works, but speech")
    log.warning("will be far slower than real time with the real 3B model.")
    log.warning("=" * 72)
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that run it natively, float16 on other GPUs, float32 on the CPU."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type != "cuda":
        return torch.float32
    # The default (including_emulation=True) also says yes on GPUs that only emulate
    # bf16 (T4, V100: compute capability < 8), where it is many times slower than fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def placement(device: torch.device) -> dict[str, Any]:
    """from_pretrained's arguments that load a checkpoint straight onto `device`, shard by
    shard, instead of into RAM first and then across (slower, and it needs host RAM the
    size of the model). transformers takes device_map only with accelerate installed;
    without it the weights go through RAM, as before, and the log says how to avoid it."""
    if device.type == "cpu":
        return {}
    if not accelerate_available():
        log.info("accelerate is not installed: weights load into RAM, then move to %s "
                 "(pip install accelerate loads them straight to the device)", device)
        return {}
    return {"device_map": device}


def accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def available_ram() -> tuple[int, int]:
    """(available, total) bytes of RAM: what a CPU run can still allocate without the
    kernel killing the process."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):  # not Linux: free pages are the best guess
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def prefill_transient_bytes(config: Any, positions: int, keys: int, dtype: torch.dtype) -> int:
    """Peak memory, beyond weights and cache, of one StaticLlama forward pass of
    `positions` prompt positions attending over `keys` keys (agent/engine/llama.py).

    Its attention materializes one layer's scores at a time, (heads, positions, keys): the
    scores, their masked copy, the float32 softmax and its cast back, 2 x dtype + 4 bytes
    an element at the peak. Voxtral's reply engine feeds whole prompts, so at
    engine.reply_max_seq_len 4096 this alone is 4 GiB. The layer's activations come on top
    (hidden states, q/k/v/o, the MLP's gate, up and product)."""
    scores = config.num_attention_heads * positions * keys * (2 * dtype_bytes(dtype) + 4)
    activations = positions * (6 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes(dtype)
    return scores + activations


CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # per stream cuBLAS runs on (PyTorch's default on Hopper)


def graph_pool_bytes(config: Any, head_rows: int, batch_sizes: list[int], lengths: list[int],
                     dtype: torch.dtype) -> int:
    """Memory the CUDA graphs of GraphedDecode keep (engine.cuda_graphs): every captured
    (batch, length) bucket keeps its logits output (batch x head rows); their
    intermediates share one pool, as large as the largest bucket's step; cuBLAS keeps a
    workspace for the warm-up and the capture streams."""
    outputs = sum(b * head_rows for b in batch_sizes) * len(lengths) * dtype_bytes(dtype)
    largest = prefill_transient_bytes(config, 1, max(lengths), dtype) * max(batch_sizes)
    return outputs + largest + 2 * CUBLAS_WORKSPACE_BYTES


class GPUMemoryManager:
    """Checks free memory before each model loads and reports what the models use.

    `mem_get_info` returns (free, total) bytes; it defaults to torch's CUDA query on a GPU
    and to the available RAM on a CPU (a load too big for RAM would otherwise end in the
    kernel's out-of-memory kill, with no message), and can be given another source
    (tests pass one to exercise the refusal).
    """

    def __init__(self, device: torch.device, headroom_gb: float,
                 mem_get_info: Callable[[], tuple[int, int]] | None = None) -> None:
        self.device = device
        self.headroom_bytes = int(headroom_gb * GIB)
        if mem_get_info is None:
            mem_get_info = (lambda: torch.cuda.mem_get_info(device)) if device.type == "cuda" else available_ram
        self._mem_get_info: Callable[[], tuple[int, int]] = mem_get_info
        self.loaded: dict[str, int] = {}

    def check(self, name: str, needed_bytes: int) -> None:
        """Raise InsufficientVRAMError when `name` would not fit with the headroom."""
        self.loaded[name] = needed_bytes
        free, total = self._mem_get_info()
        if needed_bytes + self.headroom_bytes <= free:
            log.info("%s: %.2f GiB needed, %.1f GiB free on %s", name, needed_bytes / GIB, free / GIB, self.device)
            return
        if self.device.type == "cuda":
            where = f"free on {self.device}"
            advice = ("Free the GPU (other processes), lower device.headroom_gb, choose a smaller dtype "
                      "(device.dtype), or run on the CPU (VOICE_AGENT_DEVICE__DEVICE=cpu).")
        else:
            where = "available in RAM"
            advice = ("Close other programs, lower device.headroom_gb, or ask for less (engine.max_streams, "
                      "engine.max_seq_len, the tiny profile).")
        raise InsufficientVRAMError(
            f"{name} needs {needed_bytes / GIB:.1f} GiB plus {self.headroom_bytes / GIB:.1f} GiB headroom, "
            f"but only {free / GIB:.1f} GiB of {total / GIB:.1f} GiB is {where}. {advice}")

    def check_plan(self, items: list[tuple[str, int]]) -> None:
        """Raise InsufficientVRAMError, naming each part, when everything the models will
        take (weights, KV caches, prefill transients, CUDA graph pools) does not fit with
        the headroom: before the first model loads, not after the first 9 GB."""
        needed = sum(n for _, n in items)
        free, total = self._mem_get_info()
        if needed + self.headroom_bytes <= free:
            log.info("the models need about %.1f GiB, %.1f GiB free on %s", needed / GIB, free / GIB, self.device)
            return
        parts = ", ".join(f"{name} {n / GIB:.2f}" for name, n in items if n >= 0.005 * GIB)
        where = f"free on {self.device}" if self.device.type == "cuda" else "available in RAM"
        raise InsufficientVRAMError(
            f"the models need {needed / GIB:.1f} GiB ({parts} GiB) plus {self.headroom_bytes / GIB:.1f} GiB headroom, "
            f"but only {free / GIB:.1f} GiB of {total / GIB:.1f} GiB is {where}. Lower engine.max_streams, "
            "engine.reply_slots or engine.reply_max_seq_len (README, Hardware: settings for a 24 GB GPU), "
            "or lower device.headroom_gb.")

    def stats(self) -> dict[str, float]:
        """Allocated, reserved and peak memory in MiB (GPU), or the process's peak RSS (CPU)."""
        mib = 1024**2
        if self.device.type == "cuda":
            return {
                "allocated_mib": torch.cuda.memory_allocated(self.device) / mib,
                "reserved_mib": torch.cuda.memory_reserved(self.device) / mib,
                "peak_mib": torch.cuda.max_memory_allocated(self.device) / mib,
            }
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"allocated_mib": 0.0, "reserved_mib": 0.0, "peak_mib": 0.0, "process_peak_rss_mib": peak_kib / 1024}

    def cleanup(self) -> None:
        """Collect garbage and give cached GPU blocks back to the driver."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
