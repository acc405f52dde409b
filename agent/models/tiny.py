"""The tiny profile: the real model classes with small random weights, built offline.

The models are written to a cache directory with save_pretrained (SNAC in its Hub
layout) and then loaded through exactly the path a Hub id or a local checkout takes.
The audio they make is noise, but every stage runs for real.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agent.engine.generation import estimate_llama_bytes, load_failure
from agent.errors import ModelInitializationError
from agent.models.orpheus import BOS, END_OF_SPEECH, VOCAB_SIZE, OrpheusDirectModel
from agent.models.snac import SNAC_24KHZ_CONFIG
from agent.models.voxtral import VoxtralModel, estimate_voxtral_bytes
from agent.rates import IN_RATE

if TYPE_CHECKING:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PretrainedConfig,
        PreTrainedTokenizerFast,
        VoxtralConfig,
        VoxtralForConditionalGeneration,
    )

log = logging.getLogger(__name__)

WEIGHTS_SEED = 1234  # fixed, so every tiny build is the same model
FORMAT = "v1"  # bump when the tiny models change

LLAMA3_TEXT_VOCAB = 128256
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>",
]


def cache_root() -> Path:
    base = os.environ.get("VOICE_AGENT_CACHE") or Path.home() / ".cache" / "voice-agent"
    import transformers

    return Path(base) / f"tiny-{FORMAT}-transformers-{transformers.__version__}"


def tiny_orpheus_dir() -> Path:
    """A saved tiny Orpheus checkpoint (built on first use)."""
    return _build_once(cache_root() / "orpheus", _save_tiny_orpheus, "tiny Orpheus (Llama, 156,940 ids)")


def tiny_snac_dir() -> Path:
    """A saved SNAC 24 kHz checkpoint with random weights (built on first use)."""
    return _build_once(cache_root() / "snac", _save_tiny_snac, "SNAC 24 kHz with random weights")


def _build_once(target: Path, build, what: str) -> Path:
    if (target / "DONE").exists():
        return target
    log.info("building %s in %s (once)", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # built by another process meanwhile
            if not (target / "DONE").exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def llama3_tokenizer_file() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def build_orpheus_tokenizer() -> PreTrainedTokenizerFast:
    """The Llama 3 BPE (from llama-models) plus Orpheus's <custom_token_N> ids."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(llama3_tokenizer_file())).converted()
    specials = LLAMA3_SPECIALS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))
    ]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    tok.add_tokens([AddedToken(f"<custom_token_{i}>", normalized=False)
                    for i in range(VOCAB_SIZE - LLAMA3_TEXT_VOCAB)])
    assert tok.get_vocab_size() == VOCAB_SIZE
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")


def tiny_orpheus_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=BOS,
        eos_token_id=END_OF_SPEECH,
    )


def _save_tiny_orpheus(path: Path) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(WEIGHTS_SEED)
    LlamaForCausalLM(tiny_orpheus_config()).save_pretrained(path)
    build_orpheus_tokenizer().save_pretrained(path)


def _save_tiny_snac(path: Path) -> None:
    from snac import SNAC

    torch.manual_seed(WEIGHTS_SEED)
    model = SNAC(**SNAC_24KHZ_CONFIG)
    (path / "config.json").write_text(json.dumps(SNAC_24KHZ_CONFIG, indent=2))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


# --- Orpheus 3B with random weights (profile orpheus-3b-random) ------------------------

RANDOM_ORPHEUS_3B = "random:orpheus-3b"


def orpheus_3b_config() -> LlamaConfig:
    """canopylabs/orpheus-3b-0.1-ft's architecture (Llama 3.2 3B with Orpheus's vocabulary).
    Its output head is its own matrix, not tied to the embeddings (3.78 B parameters, 7.0
    GiB in bf16), so the random model takes the real one's memory."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=END_OF_SPEECH,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


def random_llama(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A LlamaForCausalLM with random weights made directly on `device` in `dtype` (a 3B
    model in seconds on a GPU; nothing is downloaded or written). Same compute as the
    trained model; the audio is noise."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    _randomize(model, device, dtype, config.initializer_range)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were left unset
    return model


def _randomize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Give a model built on the meta device real storage on `device` with random weights:
    normal(0, std) matrices, unit norm scales, zero biases."""
    model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(WEIGHTS_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


# --- Voxtral (speech understanding) ---------------------------------------------------

# Voxtral-Mini-3B-2507's tekken.json is a v7 Tekken file: the same 150,000-entry BPE as
# mistral-common's bundled tekken_240718.json (131,072 ids with 1,000 special ids first;
# "lang:en" encodes to Voxtral's 9909 1058 1262), every special id listed, and an "audio"
# section. Version, audio section and the ids 0-19, 24, 25 and 34 are Voxtral's; [ARGS]
# and [CALL_ID] sit where Mistral's v7 files put them (v7 prompts never use them).
VOXTRAL_TEKKEN_VERSION = "v7"
VOXTRAL_AUDIO_CONFIG = {
    "sampling_rate": IN_RATE,
    "frame_rate": 12.5,  # 375 audio tokens per 30 s chunk
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "chunk_length_s": 30.0,
}
VOXTRAL_SPECIALS = {  # rank -> token; the ranks in between are <SPECIAL_n> fillers
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]",
    16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]",
    24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[TRANSCRIBE]",
}
VOXTRAL_AUDIO_TOKEN = 24


def tiny_voxtral_dir() -> Path:
    """A saved tiny Voxtral checkpoint with its processor (built on first use)."""
    return _build_once(cache_root() / "voxtral", _save_tiny_voxtral, "tiny Voxtral (real Tekken tokenizer)")


def write_voxtral_tekken(target: Path) -> Path:
    """Write a Voxtral-style tekken.json: the real Tekken vocabulary shipped with
    mistral-common, with Voxtral's version, special ids and audio section."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    n_special = data["config"]["default_num_special_tokens"]
    data["config"]["version"] = VOXTRAL_TEKKEN_VERSION
    data["special_tokens"] = [
        {"rank": i, "token_str": VOXTRAL_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(n_special)
    ]
    data["audio"] = VOXTRAL_AUDIO_CONFIG
    target.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return target


def tiny_voxtral_config(vocab_size: int = 131072) -> VoxtralConfig:
    from transformers import VoxtralConfig

    text = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=32768, rope_theta=100000000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    # intermediate_size must be 4 x hidden_size: the projector takes 4 encoder frames per
    # audio token. max_source_positions stays 1500 (30 s), as the processor chunks audio so.
    audio = dict(
        model_type="voxtral_encoder", hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_mel_bins=128, max_source_positions=1500,
    )
    return VoxtralConfig(text_config=text, audio_config=audio, audio_token_id=VOXTRAL_AUDIO_TOKEN,
                         projector_hidden_act="gelu")


# Voxtral Mini with random weights (profile orpheus-3b-random): transformers' VoxtralConfig
# defaults are Voxtral-Mini-3B-2507's architecture (a 32-layer, 1280-wide audio encoder;
# a 30-layer Llama decoder, 3072 wide, 32 query and 8 key/value heads; 4.7 B parameters).
RANDOM_VOXTRAL_MINI = "random:voxtral-mini"


def voxtral_mini_config() -> VoxtralConfig:
    from transformers import VoxtralConfig

    return VoxtralConfig(audio_token_id=VOXTRAL_AUDIO_TOKEN)


def random_voxtral(config: Any, device: torch.device, dtype: torch.dtype) -> VoxtralForConditionalGeneration:
    """A VoxtralForConditionalGeneration with random weights made on `device` (see
    random_llama): Voxtral's compute for benchmarks, with no download."""
    from transformers import VoxtralForConditionalGeneration
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = VoxtralForConditionalGeneration(config)
    _randomize(model, device, dtype, config.text_config.initializer_range)
    model.model.language_model.rotary_emb = LlamaRotaryEmbedding(config.text_config).to(device)
    return model


def _save_tiny_voxtral(path: Path) -> None:
    # transformers exports MistralCommonBackend lazily only; its TYPE_CHECKING imports leave it out.
    from transformers import (  # type: ignore[attr-defined]
        MistralCommonBackend,
        VoxtralForConditionalGeneration,
        VoxtralProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = MistralCommonBackend(tokenizer_path=write_voxtral_tekken(path / "tekken.json"))
    # Voxtral's preprocessor_config.json: 128 mel bins, 30 s windows.
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=IN_RATE, hop_length=160, chunk_length=30,
                                       n_fft=400, padding_value=0.0, dither=0.0, return_attention_mask=False)
    VoxtralProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(WEIGHTS_SEED)
    VoxtralForConditionalGeneration(tiny_voxtral_config(len(tokenizer))).save_pretrained(path)


# -- resolving the built-in sources -------------------------------------------------------
# "tiny" and "random:..." name models this module builds; anything else is a Hub id or a
# directory, loaded by the model's own loader, which knows nothing of these.

def resolve_source(name: str, kind: str) -> str:
    """"tiny" means the tiny profile's saved checkpoint (built on first use); anything
    else is a Hub id, a path or a random: source, returned as it is."""
    if name != "tiny":
        return name
    build = {"orpheus": tiny_orpheus_dir, "snac": tiny_snac_dir, "voxtral": tiny_voxtral_dir}
    return str(build[kind]())


def model_config(source: str) -> PretrainedConfig:
    """A model's config without its weights: config.json, or the random profiles' own."""
    from transformers import AutoConfig

    if source == RANDOM_VOXTRAL_MINI:
        return voxtral_mini_config()
    if source == RANDOM_ORPHEUS_3B:
        return orpheus_3b_config()
    return AutoConfig.from_pretrained(source)


def load_orpheus(source: str, device: torch.device, dtype: torch.dtype,
                 check_memory: Callable[[str, int], None] | None = None) -> OrpheusDirectModel:
    """Orpheus from `source`: random:orpheus-3b is built here (the real architecture with
    random weights: benchmarks, no download); anything else is OrpheusDirectModel.load's."""
    if source != RANDOM_ORPHEUS_3B:
        return OrpheusDirectModel.load(source, device, dtype, check_memory)
    try:
        config = orpheus_3b_config()
        if check_memory is not None:
            check_memory(f"Orpheus ({source})", estimate_llama_bytes(config, dtype))
        tokenizer, model = build_orpheus_tokenizer(), random_llama(config, device, dtype)
    except ModelInitializationError:
        raise
    except Exception as e:
        raise load_failure("Orpheus", source, e) from e
    return OrpheusDirectModel.ready(model, tokenizer, source, device)


def load_voxtral(source: str, device: torch.device, dtype: torch.dtype,
                 check_memory: Callable[[str, int], None] | None = None) -> VoxtralModel:
    """Voxtral from `source`: random:voxtral-mini is built here (Voxtral Mini's
    architecture with random weights, and the real Tekken); anything else is
    VoxtralModel.load's."""
    if source != RANDOM_VOXTRAL_MINI:
        return VoxtralModel.load(source, device, dtype, check_memory)
    from transformers import VoxtralProcessor

    try:
        config = voxtral_mini_config()
        if check_memory is not None:
            check_memory(f"Voxtral ({source})", estimate_voxtral_bytes(config, dtype))
        processor = VoxtralProcessor.from_pretrained(str(tiny_voxtral_dir()))
        model = random_voxtral(config, device, dtype)
    except ModelInitializationError:
        raise
    except Exception as e:
        raise load_failure("Voxtral", source, e) from e
    return VoxtralModel.ready(model, processor, source, device)

