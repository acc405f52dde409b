"""Silero VAD: a small trained speech detector (the ONNX file the silero-vad package ships).

At 16 kHz it hears windows of 512 samples (32 ms), each with the 64 samples before it as
context, and carries a recurrent state from window to window: one `SileroStream` per
call, all sharing the process's one `SileroVAD` session (onnxruntime's run is thread-safe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.models.onnx import open_session, packaged_file
from agent.rates import IN_RATE

PACKAGE = "silero-vad"
MODEL_FILE = "silero_vad/data/silero_vad.onnx"
WINDOW = 512  # samples at 16 kHz: the only window size the 16 kHz model takes
CONTEXT = 64  # samples of the previous window fed in front of each window
STATE_SHAPE = (2, 1, 128)


class SileroVAD:
    """The loaded model. `path` None: the file in the installed silero-vad package."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or packaged_file(PACKAGE, MODEL_FILE)
        self.session = open_session(self.path, "Silero VAD", f"the {PACKAGE} package")
        self._sr = np.array(IN_RATE, dtype=np.int64)

    def stream(self) -> SileroStream:
        """A new detector state for one call's audio."""
        return SileroStream(self)

    def run(self, window: np.ndarray, context: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        x = np.concatenate([context, window])[None, :]
        prob, new_state = self.session.run(None, {"input": x, "state": state, "sr": self._sr})
        return float(prob[0, 0]), new_state


class SileroStream:
    """One call's speech probabilities, window by window."""

    def __init__(self, model: SileroVAD) -> None:
        self.model = model
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def probability(self, window: np.ndarray) -> float:
        """Speech probability of the next WINDOW samples (float32 in [-1, 1])."""
        window = np.asarray(window, dtype=np.float32)
        assert window.shape == (WINDOW,), window.shape  # the 16 kHz model takes exactly this
        prob, self._state = self.model.run(window, self._context, self._state)
        self._context = window[-CONTEXT:]
        return prob
