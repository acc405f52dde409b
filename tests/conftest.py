"""Shared fixtures: the tiny profile's real models, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.config import Settings, load_settings
from agent.models.manager import UnifiedModelManager
from agent.models.tts import TTSServiceDirect

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    # Noise off: streamed audio is compared against one-shot decodes. The silence timer
    # ends turns: Smart Turn hears the fixture question's "Hello," (espeak-ng's comma pause)
    # as a finished turn, and the tests of the other parts count one turn per question.
    # tests/call/test_turns.py tests the end-of-turn model, and the default settings.
    return load_settings("tiny", env={}).replace("snac", noise=False).replace("turn", engine="silence")


@pytest.fixture(scope="session")
def tts_models(tiny_settings):
    """(Orpheus, SNAC, memory manager) of the tiny profile."""
    manager = UnifiedModelManager(tiny_settings)
    manager.load(listen=False)
    return manager.tts.orpheus, manager.tts.snac, manager.memory


@pytest.fixture(scope="session")
def models(tiny_settings):
    """The tiny profile's UnifiedModelManager (Voxtral, Orpheus, SNAC), loaded once."""
    manager = UnifiedModelManager(tiny_settings)
    manager.load()
    yield manager
    manager.unload()


@pytest.fixture(scope="session")
def speech():
    """Two spoken questions (espeak-ng), 16 kHz mono int16."""
    from agent.audio import read_audio  # PyAV: imported here so model-only runs need no media stack

    fixtures = Path(__file__).parent / "fixtures"
    return [read_audio(fixtures / f"question{i}.wav", 16000) for i in (1, 2)]


@pytest.fixture
def make_service(tts_models, tiny_settings):
    """Build a TTSServiceDirect on the shared tiny models, optionally with changed settings."""
    services = []

    def make(settings: Settings | None = None) -> TTSServiceDirect:
        orpheus, snac, memory = tts_models
        service = TTSServiceDirect(orpheus, snac, settings or tiny_settings, memory=memory)
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()
