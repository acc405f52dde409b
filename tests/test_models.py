"""Model loading through the real-weights path, memory checks, and the performance monitor."""

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.config import load_settings
from agent.errors import InsufficientVRAMError, ModelInitializationError
from agent.memory import GPUMemoryManager, available_ram
from agent.monitor import PerformanceMonitor
from agent.orpheus import (BOS, EOT, END_OF_HUMAN, START_OF_AI, START_OF_HUMAN, START_OF_SPEECH, VOCAB_SIZE,
                           OrpheusDirectModel)
from agent.generation import estimate_llama_bytes
from agent.snac_codec import SNAC_24KHZ_CONFIG, load_snac
from agent.tiny import llama3_tokenizer_file, tiny_orpheus_dir, tiny_snac_dir


def test_tiny_checkpoints_are_saved_like_hub_repos():
    orpheus_dir, snac_dir = tiny_orpheus_dir(), tiny_snac_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (orpheus_dir / name).exists(), name
    assert json.loads((snac_dir / "config.json").read_text()) == SNAC_24KHZ_CONFIG
    assert (snac_dir / "pytorch_model.bin").exists()


def test_loads_from_a_local_directory_as_real_weights_do(tts_models):
    orpheus, snac, _ = tts_models
    assert isinstance(orpheus.model, LlamaForCausalLM)
    assert orpheus.model.config.vocab_size == VOCAB_SIZE and orpheus.source == str(tiny_orpheus_dir())
    assert len(orpheus.tokenizer) == VOCAB_SIZE
    assert orpheus.tokenizer.convert_ids_to_tokens(128266) == "<custom_token_10>"
    assert sum(p.numel() for p in snac.parameters()) > 19_000_000  # the real 24 kHz architecture


def test_prompt_layout_matches_the_reference(tts_models):
    from llama_models.llama3.tokenizer import Tokenizer

    orpheus = tts_models[0]
    text = "tara: Hello, world! <laugh> It's 3:45."
    ids = orpheus.prompt_ids("tara", "Hello, world! <laugh> It's 3:45.")
    # The text part is exactly what the real Llama 3 tokenizer produces.
    reference = Tokenizer(llama3_tokenizer_file()).encode(text, bos=True, eos=False)
    assert ids == [START_OF_HUMAN, *reference, EOT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]
    assert ids[1] == BOS


def test_missing_weights_name_the_model_and_the_way_out(monkeypatch, tmp_path):
    import huggingface_hub

    # huggingface_hub reads HF_HUB_OFFLINE at import; set the constant too, or it retries the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelInitializationError, match=r"'canopylabs/orpheus-3b-0\.1-ft'.*--profile tiny"):
        OrpheusDirectModel.load("canopylabs/orpheus-3b-0.1-ft", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelInitializationError, match=r"no/such/dir.*--profile tiny"):
        load_snac(str(tmp_path / "no/such/dir"), torch.device("cpu"))


def test_memory_check_refuses_what_does_not_fit():
    gib = 1024**3
    orpheus_3b = LlamaConfig(vocab_size=156940, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                             num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)
    needed = estimate_llama_bytes(orpheus_3b, torch.bfloat16)
    assert 6.0 * gib < needed < 6.6 * gib  # about 6.2 GiB in bf16
    small_gpu = GPUMemoryManager(torch.device("cuda"), headroom_gb=2.0, mem_get_info=lambda: (7 * gib, 8 * gib))
    with pytest.raises(InsufficientVRAMError, match=r"needs 6\.\d GiB plus 2\.0 GiB headroom.*only 7\.0 GiB of 8\.0 GiB"):
        small_gpu.check("Orpheus", needed)
    GPUMemoryManager(torch.device("cuda"), 2.0, mem_get_info=lambda: (40 * gib, 80 * gib)).check("Orpheus", needed)
    # On a CPU the check is against available RAM: an out-of-memory kill gives no message.
    small_ram = GPUMemoryManager(torch.device("cpu"), headroom_gb=2.0, mem_get_info=lambda: (5 * gib, 24 * gib))
    with pytest.raises(InsufficientVRAMError, match=r"only 5\.0 GiB of 24\.0 GiB is available in RAM"):
        small_ram.check("the speech engine's KV cache", 28 * gib)
    available, total = available_ram()
    assert 0 < available <= total
    GPUMemoryManager(torch.device("cpu"), 0.0).check("a small model", 1024)  # the real RAM query, passes
    stats = GPUMemoryManager(torch.device("cpu"), 2.0).stats()
    assert stats["process_peak_rss_mib"] > 0


def test_monitor_warns_on_missed_targets_and_reports(caplog):
    settings = load_settings("default", env={})
    monitor = PerformanceMonitor(settings.monitor)
    fast = monitor.start("tara", "hi")
    fast.first_token, fast.first_audio = fast.start + 0.05, fast.start + 0.1
    fast.tokens, fast.audio_samples, fast.end = 140, 24000 * 2, fast.start + 1.0
    slow = monitor.start("tara", "hi")
    slow.first_token, slow.first_audio = slow.start + 0.5, slow.start + 0.9
    slow.tokens, slow.audio_samples, slow.end = 14, 24000, slow.start + 3.0
    with caplog.at_level(logging.WARNING):
        monitor.finish(fast)
        monitor.finish(slow)
    assert "missed its ttfa_ms target" in caplog.text and "missed its rtf target" in caplog.text
    assert fast.rtf == pytest.approx(0.5) and fast.tokens_per_s == pytest.approx(140)
    report = json.loads(monitor.report_json())
    assert report["requests"] == 2
    assert report["missed"] == {"ttft_ms": 1, "ttfa_ms": 1, "rtf": 1}
    assert report["ttfa_ms"]["p50"] == pytest.approx(500, abs=1)


@pytest.mark.parametrize("native, expected", [(False, torch.float16), (True, torch.bfloat16)])
def test_auto_dtype_uses_float16_where_bf16_is_only_emulated(monkeypatch, native, expected):
    """A T4 or V100 (compute capability 7.x) emulates bf16: torch's is_bf16_supported()
    says yes by default and no with including_emulation=False."""
    from agent.memory import resolve_dtype

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16  # an explicit choice stands
