"""Small trained models that run on onnxruntime on the CPU (Silero VAD, Smart Turn): where
their files are, and opening one with a clear error when it cannot be read."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import onnxruntime as ort

from agent.engine.generation import first_line
from agent.errors import ModelInitializationError


def packaged_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed distribution, found without importing it
    (importing pipecat would start its runtime and logging)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelInitializationError(f"model file {relative} not found: the {package} package is not installed "
                                       f"(pip install {package})") from None
    return Path(str(dist.locate_file(relative)))


def open_session(path: Path, what: str, provider: str) -> ort.InferenceSession:
    """An onnxruntime session on one CPU thread: these models are small, and a call's
    work must not take every core from the others. `provider` names where the file
    comes from, for the error message."""
    if not path.is_file():
        raise ModelInitializationError(f"{what} model file {path} not found (it comes from {provider})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise ModelInitializationError(f"{what} model file {path} cannot be read (it comes from {provider}): "
                                       f"{first_line(e)}") from None
