"""The models of one process: loaded once, on one device, shared by every call.

`UnifiedModelManager` loads Voxtral, then Orpheus and SNAC, one after the other,
checking the memory budget before each, and owns the `DeviceThread` on which all model
work runs (agent/engine/device.py), so the asyncio event loop never waits on a model. With
`engine.mode = "batched"` the speech streams of every call share its decode steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agent.config import Settings
from agent.engine.device import DeviceThread
from agent.errors import ModelInitializationError
from agent.models import tiny
from agent.models.memory import GPUMemoryManager, dtype_bytes, graph_pool_bytes, prefill_transient_bytes, resolve_device, resolve_dtype
from agent.models.tiny import model_config, resolve_source

if TYPE_CHECKING:
    from agent.models.silero import SileroVAD
    from agent.models.smart_turn import SmartTurn
    from agent.models.tts import TTSServiceDirect
    from agent.models.voxtral import BatchedReply, ChatTurn, ReplyBatcher, ReplyParams, ReplyPrompt, TextStream, TurnAudio, VoxtralModel

log = logging.getLogger(__name__)


class UnifiedModelManager:
    """Voxtral + Orpheus + SNAC on one device, with a memory check before each load."""

    _instance: UnifiedModelManager | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device.device)
        self.dtype = resolve_dtype(settings.device.dtype, self.device)
        self.memory = GPUMemoryManager(self.device, settings.device.headroom_gb)
        self.device_thread = DeviceThread()
        self.voxtral: VoxtralModel | None = None
        self.replies: ReplyBatcher | None = None  # "batched" engine mode
        self.tts: TTSServiceDirect | None = None
        self.memory_by_model: dict[str, float] = {}  # MiB allocated by each model (GPU)
        # The turn-taking models (CPU, onnxruntime), loaded on first use; turn.model -> model.
        self._silero: SileroVAD | None = None
        self._smart_turns: dict[str, SmartTurn] = {}

    @classmethod
    def shared(cls, settings: Settings) -> UnifiedModelManager:
        """The process's one manager, loaded on first use."""
        if cls._instance is None:
            cls._instance = cls(settings)
            cls._instance.load()
        elif cls._instance.settings != settings:
            raise ModelInitializationError("the models are already loaded with other settings")
        return cls._instance

    @property
    def ready(self) -> bool:
        return self.voxtral is not None and self.tts is not None

    @property
    def loaded(self) -> dict[str, bool]:
        return {"voxtral": self.voxtral is not None, "tts": self.tts is not None}

    def load(self, listen: bool = True) -> None:
        """Load the models, with progress on stderr (logging). `listen=False` loads only
        the speaking half (Orpheus and SNAC), for `voice-agent say`."""
        from agent.models.orpheus import OrpheusDirectModel, SamplingParams
        from agent.models.snac import load_snac
        from agent.models.tts import TTSServiceDirect

        s = self.settings
        t0 = time.perf_counter()
        dtype_name = str(self.dtype).removeprefix("torch.")
        self._check_plan(listen)
        if listen:
            # First: they load in a moment, and a missing file stops the start at once.
            if s.vad.engine == "silero":
                self.silero_vad()
            if s.turn.engine == "smart_turn":
                self.smart_turn(s.turn.model)
            voxtral_source = resolve_source(s.voxtral.model, "voxtral")
            log.info("loading Voxtral from %s on %s (%s)...", voxtral_source, self.device, dtype_name)
            self.voxtral = self._measured("voxtral", lambda: self._with_fp32_fallback(
                lambda dtype: tiny.load_voxtral(voxtral_source, self.device, dtype, self.memory.check)))
            if s.engine.mode == "batched":
                self.replies = self._reply_batcher(self.voxtral)

        def orpheus_runs(orpheus: OrpheusDirectModel) -> None:
            # Some GPUs load half-precision weights but cannot run them: one real step.
            stream = orpheus.stream(orpheus.prompt_ids("tara", "hi"), SamplingParams(max_tokens=7), seed=0)
            stream.step()
            stream.close()

        orpheus_source = resolve_source(s.orpheus.model, "orpheus")
        log.info("loading Orpheus from %s on %s (%s)...", orpheus_source, self.device, dtype_name)
        orpheus = self._measured("orpheus", lambda: self._with_fp32_fallback(
            lambda dtype: tiny.load_orpheus(orpheus_source, self.device, dtype, self.memory.check),
            orpheus_runs))
        snac_source = resolve_source(s.snac.model, "snac")
        log.info("loading SNAC from %s...", snac_source)
        snac = self._measured("snac", lambda: load_snac(snac_source, self.device, s.snac.noise, self.memory.check))
        batcher = self._batcher(orpheus, snac) if s.engine.mode == "batched" else None
        self.tts = TTSServiceDirect(orpheus, snac, s, memory=self.memory, device_thread=self.device_thread,
                                    batcher=batcher)
        log.info("models ready in %.1f s: %s", time.perf_counter() - t0, self.memory_report())

    def _batcher(self, orpheus, snac):
        """The continuous-batching engine for speech, with its static KV cache."""
        from agent.models.tts import SpeechBatcher

        e, snac_settings = self.settings.engine, self.settings.snac
        return self._engine(
            "engine", speech_engine_parts(orpheus.model.config, orpheus.dtype, self.settings, self.device),
            lambda: SpeechBatcher(orpheus, snac, e.max_streams, e.max_seq_len, e.prefill_chunk, e.defer_lead_s,
                                  snac_settings.decoder_mode, snac_settings.max_frames_per_window, e.cuda_graphs))

    def _reply_batcher(self, voxtral):
        """Continuous batching of Voxtral's replies, with its static KV cache."""
        from agent.models.voxtral import ReplyBatcher

        e = self.settings.engine
        return self._engine(
            "replies", reply_engine_parts(voxtral.model.config.text_config, voxtral.dtype, self.settings, self.device),
            lambda: ReplyBatcher(voxtral, e.reply_slots, e.reply_max_seq_len, e.reply_prefill_chunk, e.cuda_graphs))

    def _engine(self, key: str, parts: list[tuple[str, int]], build: Callable[[], Any]):
        """Check memory for a batcher (its static KV cache, prefill transient and CUDA
        graphs: `parts`), build it (its memory measured under `key`) and attach it to the
        device thread."""
        need = sum(n for _, n in parts)
        what = ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in parts)
        self.memory.check(what, need)
        log.info("preparing %s...", what)
        batcher = self._measured(key, build)
        self.device_thread.attach(batcher)
        return batcher

    def memory_plan(self, listen: bool = True) -> list[tuple[str, int]]:
        """(what, bytes) for everything load() puts on the device, from the models' configs
        alone (config.json; no weights are read)."""
        s, dtype = self.settings, self.dtype
        plan = []
        if listen:
            voxtral = model_config(resolve_source(s.voxtral.model, "voxtral"))
            plan.append(("Voxtral", _voxtral_bytes(voxtral, dtype)))
            if s.engine.mode == "batched":
                plan += reply_engine_parts(voxtral.text_config, dtype, s, self.device)
        orpheus = model_config(resolve_source(s.orpheus.model, "orpheus"))
        plan.append(("Orpheus", _llama_bytes(orpheus, dtype)))
        plan.append(("SNAC", SNAC_BYTES))
        if s.engine.mode == "batched":
            plan += speech_engine_parts(orpheus, dtype, s, self.device)
        return plan

    def _check_plan(self, listen: bool) -> None:
        """Refuse before the first load when the whole plan cannot fit."""
        try:
            plan = self.memory_plan(listen)
        except Exception as e:  # a config that cannot be read: the load says why, with the way out
            log.debug("no memory plan (%s); each load is checked on its own", e)
            return
        self.memory.check_plan(plan)

    def silero_vad(self) -> SileroVAD:
        """The Silero VAD model every call's detector shares (loaded on first use)."""
        if self._silero is None:
            from agent.models.silero import SileroVAD

            self._silero = SileroVAD()
            log.info("loaded Silero VAD from %s", self._silero.path)
        return self._silero

    def smart_turn(self, model: str) -> SmartTurn:
        """The Smart Turn end-of-turn model named by turn.model (loaded on first use)."""
        if model not in self._smart_turns:
            from agent.models.smart_turn import SmartTurn

            loaded = SmartTurn(model)
            log.info("loaded Smart Turn from %s", loaded.path)
            self._smart_turns[model] = loaded
        return self._smart_turns[model]

    def free_engine_slots(self) -> dict[str, int | None]:
        """Free slots of the batched engines ("speech", "reply"); None for one not running
        (the single path, or not loaded). Read from the event loop: a snapshot."""
        speech = self.tts.batcher if self.tts is not None else None
        return {"speech": None if speech is None else speech.slots.count(None),
                "reply": None if self.replies is None else self.replies.slots.count(None)}

    @property
    def busy_s(self) -> float:
        """Seconds the device has worked so far (see DeviceThread.busy_s)."""
        return self.device_thread.busy_s

    def validate_voice(self, voice: str | None) -> str:
        """The voice to speak with (the default for None); InputError for an unknown one."""
        assert self.tts is not None, "the models are not loaded"
        return self.tts.validate_voice(voice)

    async def reply(self, audio: TurnAudio, history: list[ChatTurn], instructions: str, instructions_first: bool,
                    params: ReplyParams, seed: int) -> AsyncGenerator[str, None]:
        """Voxtral's reply to the caller's new turn `audio` after `history`, piece by piece
        as it is decoded. Close it (contextlib.aclosing) to stop the reply early."""
        # The prompt (tokens, the new audio's features) is CPU work: it is built in a worker
        # thread, so the device thread keeps every call's speech going meanwhile.
        assert self.voxtral is not None, "Voxtral is not loaded"
        prompt = await asyncio.to_thread(self.voxtral.reply_prompt, audio, history, instructions, instructions_first)
        stream = await self.device_thread.open(self.open_reply, prompt, params, seed, asyncio.get_running_loop())
        try:
            while (piece := await stream.next_piece()) is not None:
                yield piece
        finally:
            stream.close()

    async def transcribe(self, audio: TurnAudio, language: str | None, params: ReplyParams, seed: int) -> str:
        """Voxtral's transcript of a caller turn (transcription mode), decoded like a reply:
        in the reply engine when it has room, else on the single path. Cancel it to stop."""
        assert self.voxtral is not None, "Voxtral is not loaded"
        prompt = await asyncio.to_thread(self.voxtral.transcription_prompt, audio, language)
        stream = await self.device_thread.open(self.open_reply, prompt, params, seed, asyncio.get_running_loop(),
                                               True)
        text = ""
        try:
            while (piece := await stream.next_piece()) is not None:
                text += piece
        finally:
            stream.close()
        return text.strip()

    def speak(self, text: str, voice: str, seed: int) -> AsyncGenerator[np.ndarray, None]:
        """`text` spoken: 24 kHz mono int16 chunks as they are decoded (TTSServiceDirect.synthesize)."""
        assert self.tts is not None, "the models are not loaded"
        return self.tts.synthesize(text, voice, seed)

    def open_reply(self, prompt: ReplyPrompt, params: ReplyParams, seed: int,
                   loop: asyncio.AbstractEventLoop, background: bool = False) -> BatchedReply | TextStream:
        """Start Voxtral's reply to a prompt from VoxtralModel.reply_prompt (on the device
        thread): a BatchedReply where the reply engine has room for the prompt and the
        longest reply, else a TextStream (the single path). The event loop reads either
        with next_piece(). `background`: behind every reply, in a spare slot (transcripts)."""
        if self.replies is not None:
            length = prompt.input_ids.shape[-1]
            if length + params.max_new_tokens <= self.replies.llama.scratch:
                return self.replies.admit(prompt, params, seed, loop, background)
            log.info("a prompt of %d tokens leaves no room for a reply in engine.reply_max_seq_len (%d): "
                     "answered by the single path", length, self.settings.engine.reply_max_seq_len)
        assert self.voxtral is not None, "Voxtral is not loaded"
        return self.voxtral.text_stream(prompt, params, seed, self.device_thread)

    def _with_fp32_fallback(self, load: Callable[[torch.dtype], Any],
                            check: Callable[[Any], None] | None = None) -> Any:
        """Load in the chosen dtype; where half precision fails to load or run
        (`check` raises RuntimeError), load again in float32."""
        model = None
        try:
            model = load(self.dtype)
            if check is not None:
                check(model)
            return model
        except ModelInitializationError:
            raise
        except RuntimeError as e:
            if self.dtype == torch.float32:
                raise
            log.warning("%s does not work in %s here (%s); loading it in float32", type(model).__name__
                        if model is not None else "the model", self.dtype, e)
            del model
            self.memory.cleanup()
            return load(torch.float32)

    def _measured(self, name: str, load: Callable[[], Any]) -> Any:
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        model = load()
        after = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.memory_by_model[name] = (after - before) / 1024**2
        return model

    def memory_report(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "per_model_mib": {k: round(v, 1) for k, v in self.memory_by_model.items()},
                **{k: round(v, 1) for k, v in self.memory.stats().items()}}

    def unload(self) -> None:
        if self.tts is not None:
            self.tts.unload()
        if self.voxtral is not None:
            self.voxtral.unload()
        self.tts = self.voxtral = self.replies = None
        for smart_turn in self._smart_turns.values():
            smart_turn.close()
        self._smart_turns.clear()
        self._silero = None
        self.device_thread.shutdown()
        self.memory.cleanup()
        if UnifiedModelManager._instance is self:
            UnifiedModelManager._instance = None


SNAC_BYTES = 20_000_000 * 4  # 19.8 M parameters, kept in float32


def _voxtral_bytes(config, dtype: torch.dtype) -> int:
    from agent.models.voxtral import estimate_voxtral_bytes

    return estimate_voxtral_bytes(config, dtype)


def _llama_bytes(config, dtype: torch.dtype) -> int:
    from agent.engine.generation import estimate_llama_bytes

    return estimate_llama_bytes(config, dtype)


def _engine_parts(config, dtype: torch.dtype, device: torch.device, slots: int, max_len: int, prefill: int,
                  head_rows: int, cuda_graphs: bool, names: tuple[str, str, str]) -> list[tuple[str, int]]:
    """A batcher's memory beyond the weights: its static KV cache, the transient of its
    largest prefill (`prefill` positions over the whole cache length) and, on CUDA with
    graphs on, the graphs' pool."""
    from agent.engine.llama import GRAPH_BATCH_SIZES, GRAPH_LENGTHS, GraphedDecode, StaticLlama

    parts = [(names[0], StaticLlama.cache_bytes(config, slots, max_len, dtype)),
             (names[1], prefill_transient_bytes(config, min(prefill, max_len), max_len, dtype))]
    if cuda_graphs and device.type == "cuda":
        batch_sizes, lengths = GraphedDecode.buckets(slots, max_len, GRAPH_BATCH_SIZES, GRAPH_LENGTHS)
        parts.append((names[2], graph_pool_bytes(config, head_rows, batch_sizes, lengths, dtype)))
    return parts


def speech_engine_parts(config: Any, dtype: torch.dtype, settings: Settings, device: torch.device) -> list[tuple[str, int]]:
    """The speech engine: KV cache, a prefill chunk's transient, CUDA graphs, and its
    copy of the head's audio rows (28,673 of Orpheus's 156,940)."""
    from agent.models.orpheus import AUDIO_IDS

    e = settings.engine
    rows = AUDIO_IDS + 1  # the audio ids and end_of_speech
    return _engine_parts(config, dtype, device, e.max_streams, e.max_seq_len, e.prefill_chunk, rows, e.cuda_graphs,
                         ("speech KV cache (engine.max_streams x engine.max_seq_len)",
                          "speech prefill (engine.prefill_chunk)", "speech CUDA graphs")) + [
        ("speech engine's audio head", rows * config.hidden_size * dtype_bytes(dtype))]


def reply_engine_parts(config: Any, dtype: torch.dtype, settings: Settings, device: torch.device) -> list[tuple[str, int]]:
    """The reply engine (Voxtral's language model, `config` its text config): KV cache,
    a whole prompt's prefill (prompts are fed whole, up to the slot's length) and CUDA graphs."""
    e = settings.engine
    return _engine_parts(config, dtype, device, e.reply_slots, e.reply_max_seq_len, e.reply_max_seq_len,
                         config.vocab_size, e.cuda_graphs,
                         ("reply KV cache (engine.reply_slots x engine.reply_max_seq_len)",
                          "reply whole-prompt prefill (engine.reply_max_seq_len)", "reply CUDA graphs"))
