"""Smart Turn v3.2: a trained end-of-turn model (BSD-2, pipecat-ai/smart-turn).

It hears the last 8 s of the caller's turn (Whisper log-mel features, zero-padded at
the front) and gives the probability that the turn is complete. The CPU ONNX file ships
in the pipecat-ai wheel; it is read from the installed files (pipecat's runtime is never
imported), or from a path or a Hub repository named in turn.model. Inference runs on a
small pool of threads shared by every call, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from transformers import WhisperFeatureExtractor

from agent.engine.generation import first_line
from agent.errors import ModelInitializationError
from agent.models.onnx import open_session, packaged_file
from agent.rates import IN_RATE

PACKAGE = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
HUB_FILE = "smart-turn-v3.2-cpu.onnx"
SECONDS = 8  # the model hears exactly this much audio
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+\.onnx)?$")


def resolve_model(setting: str) -> tuple[Path, str]:
    """turn.model -> (the ONNX file, where it comes from, for messages): "" the pipecat-ai
    package's file, an existing path, or a Hub repository "owner/repo[/file.onnx]"."""
    if not setting:
        return packaged_file(PACKAGE, MODEL_FILE), f"the {PACKAGE} package"
    path = Path(setting).expanduser()
    if path.exists() or not _HUB_ID.match(setting) or setting.startswith((".", "/", "~")):
        return path, "turn.model"
    owner, name, *rest = setting.split("/", 2)
    repo, filename = f"{owner}/{name}", rest[0] if rest else HUB_FILE
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo, filename)), f"the Hub repository {repo}"
    except Exception as e:  # offline, unknown repository or file
        raise ModelInitializationError(f"Smart Turn model {filename} could not be fetched from the Hub "
                                       f"repository {repo} (turn.model): {first_line(e)}") from None


class SmartTurn:
    """The loaded end-of-turn model."""

    def __init__(self, setting: str = "", workers: int | None = None) -> None:
        self.path, source = resolve_model(setting)
        self.session = open_session(self.path, "Smart Turn", source)
        self.features = WhisperFeatureExtractor(chunk_length=SECONDS)
        # A few threads for every call: an inference takes tens of milliseconds on one
        # core, so no call waits on another's for long, and the pool never grows.
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="smart-turn")

    def probability(self, audio: np.ndarray) -> float:
        """The probability that the turn in `audio` (16 kHz mono int16, from its start) is
        complete. Blocking: call it through `predict` on the event loop."""
        pcm = np.asarray(audio, dtype=np.float32).reshape(-1)[-SECONDS * IN_RATE:] / 32768.0
        padded = np.zeros(SECONDS * IN_RATE, dtype=np.float32)
        padded[len(padded) - len(pcm):] = pcm  # the model was trained with the padding in front
        features = self.features(padded, sampling_rate=IN_RATE, return_tensors="np", do_normalize=True).input_features
        (logits,) = self.session.run(None, {"input_features": features.astype(np.float32)})
        return float(logits[0, 0])  # the file's output is already a sigmoid

    async def predict(self, audio: np.ndarray) -> float:
        """`probability` on the shared pool, awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.probability, audio)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
