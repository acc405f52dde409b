"""The environment a clean checkout installs: pyproject's ranges, constraints.txt's pins,
and a generation that uses no argument transformers has deprecated."""

import importlib.metadata
import logging
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def pins() -> dict[str, Version]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): Version(version) for name, version in pairs}


def test_every_dependency_has_a_floor_and_a_ceiling():
    for req in requirements():
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators and "<" in operators, f"{req} needs a tested floor and ceiling"


def test_floors_where_older_versions_are_known_to_break():
    ranges = {canonicalize_name(r.name): r.specifier for r in requirements()}
    # transformers before 5.10.1 lacks VoxtralForConditionalGeneration's .model / .lm_head
    # (the engine uses them), before 5.24 the forward's `cache` argument; transformers
    # treats mistral-common older than 1.11.5 as not installed.
    for name, broken in (("transformers", "5.9.0"), ("transformers", "5.23.0"), ("mistral-common", "1.11.4")):
        assert not ranges[name].contains(broken), f"{name} {broken} is allowed"


def test_constraints_pin_every_dependency_inside_its_range():
    pinned = pins()
    assert "torch" not in pinned  # the install command pins torch itself (CPU or CUDA build)
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {req.specifier}"


def test_the_installed_versions_are_the_pinned_ones():
    for name, version in pins().items():
        assert Version(importlib.metadata.version(name)) == version, name


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Warnings transformers logs meanwhile. Its deprecation notices go through
    `warning_once`, which remembers what it said: forget that first."""
    from transformers.utils import logging as hf_logging

    logging.Logger.warning_once.cache_clear()
    handler = _Records()
    root = hf_logging.get_logger()
    root.addHandler(handler)
    yield handler.messages
    root.removeHandler(handler)


def test_generation_uses_no_deprecated_argument(models, transformers_warnings):
    from agent.models.orpheus import SamplingParams
    from agent.models.voxtral import ReplyParams

    orpheus, voxtral = models.tts.orpheus, models.voxtral
    stream = orpheus.stream(orpheus.prompt_ids("tara", "Hi."), SamplingParams(max_tokens=14), seed=1)
    while stream.step() is not None:
        pass
    reply = voxtral.reply_stream(np.zeros(8000, dtype=np.float32), [], "", ReplyParams(max_new_tokens=3), seed=1)
    while reply.step() is not None:
        pass
    deprecated = [m for m in transformers_warnings if "deprecat" in m.lower()]
    assert not deprecated
