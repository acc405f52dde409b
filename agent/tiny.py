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
from pathlib import Path

import torch

from .orpheus import BOS, END_OF_SPEECH, VOCAB_SIZE
from .snac_codec import SNAC_24KHZ_CONFIG

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


def build_orpheus_tokenizer():
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
