"""Model loading through the real-weights path, memory checks, and the performance monitor."""

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.config import load_settings
from agent.engine.generation import estimate_llama_bytes
from agent.errors import InsufficientVRAMError, ModelInitializationError
from agent.models.memory import GPUMemoryManager, available_ram
from agent.models.monitor import PerformanceMonitor
from agent.models.orpheus import BOS, END_OF_HUMAN, EOT, START_OF_AI, START_OF_HUMAN, START_OF_SPEECH, VOCAB_SIZE, OrpheusDirectModel
from agent.models.snac import SNAC_24KHZ_CONFIG, load_snac
from agent.models.tiny import llama3_tokenizer_file, tiny_orpheus_dir, tiny_snac_dir


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
                             num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=False)
    needed = estimate_llama_bytes(orpheus_3b, torch.bfloat16)
    # Orpheus's head is untied: embeddings and head are each 156,940 x 3072 in bf16, plus 28 layers of
    # attention (q and o 3072 x 3072, k and v 3072 x 1024), MLP (3 x 3072 x 8192) and two norms, plus the final norm.
    layer = 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072
    assert needed == (2 * 156940 * 3072 + 28 * layer + 3072) * 2
    assert 6.95 * gib < needed < 7.1 * gib  # about 7.0 GiB in bf16 (6.15 if the head were tied)
    small_gpu = GPUMemoryManager(torch.device("cuda"), headroom_gb=2.0, mem_get_info=lambda: (8 * gib, 9 * gib))
    with pytest.raises(InsufficientVRAMError, match=r"needs 7\.0 GiB plus 2\.0 GiB headroom.*only 8\.0 GiB of 9\.0 GiB"):
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
    from agent.models.memory import resolve_dtype

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16  # an explicit choice stands


def test_the_memory_plan_counts_prefill_transients_and_cuda_graphs():
    """The figures in README's Hardware section, by arithmetic against the real configs."""
    from agent.models.manager import reply_engine_parts, speech_engine_parts
    from agent.models.memory import prefill_transient_bytes
    from agent.models.tiny import orpheus_3b_config, voxtral_mini_config

    gib, bf16, cuda = 1024**3, torch.bfloat16, torch.device("cuda")
    text = voxtral_mini_config().text_config
    # Whole prompts: one layer's attention scores for 4096 positions over 4096 keys, 32 heads, as bf16
    # scores, their masked copy, the float32 softmax and its bf16 cast (8 bytes an element), plus activations.
    assert prefill_transient_bytes(text, 4096, 4096, bf16) == (
        32 * 4096 * 4096 * 8 + 4096 * (6 * 3072 + 3 * 8192) * 2)
    settings = load_settings("default", env={})
    reply = dict(reply_engine_parts(text, bf16, settings, cuda))
    assert reply["reply KV cache (engine.reply_slots x engine.reply_max_seq_len)"] == 3.75 * gib
    assert 4.3 * gib < reply["reply whole-prompt prefill (engine.reply_max_seq_len)"] < 4.4 * gib
    assert 0.05 * gib < reply["reply CUDA graphs"] < 0.2 * gib
    speech = dict(speech_engine_parts(orpheus_3b_config(), bf16, settings, cuda))
    assert speech["speech KV cache (engine.max_streams x engine.max_seq_len)"] == 14 * gib
    assert 0.1 * gib < speech["speech CUDA graphs"] < 0.2 * gib
    assert "speech CUDA graphs" not in dict(speech_engine_parts(orpheus_3b_config(), bf16, settings,
                                                                torch.device("cpu")))  # no graphs on a CPU


def _plan(settings, device: str = "cuda") -> list[tuple[str, int]]:
    """UnifiedModelManager.memory_plan for the real architectures (the random profile's
    configs), as on a GPU, without one."""
    from agent.models.manager import UnifiedModelManager

    manager = UnifiedModelManager.__new__(UnifiedModelManager)
    manager.settings = settings.replace("voxtral", model="random:voxtral-mini").replace(
        "orpheus", model="random:orpheus-3b")
    manager.device, manager.dtype = torch.device(device), torch.bfloat16
    return manager.memory_plan()


def test_defaults_and_the_24_gb_advice_add_up():
    gib = 1024**3
    defaults = load_settings("default", env={})
    total = sum(n for _, n in _plan(defaults))
    assert 38.0 * gib < total < 39.0 * gib  # README: about 38.4 GiB, plus 2 GiB headroom
    small = defaults.replace("engine", max_streams=8, reply_slots=2, reply_max_seq_len=2048)
    total = sum(n for _, n in _plan(small))
    assert 19.0 * gib < total < 20.0 * gib  # README: about 19.6 GiB + 2 headroom = 21.6 of a 24 GB GPU's ~23.5 free
    # What the refusal says on a 24 GB GPU with the defaults: every part, by name.
    gpu_24 = GPUMemoryManager(torch.device("cuda"), 2.0, mem_get_info=lambda: (int(23.5 * gib), 24 * gib))
    with pytest.raises(InsufficientVRAMError, match=r"need 38\.\d GiB \(Voxtral 8\.71, reply KV cache.*"
                       r"reply whole-prompt prefill \(engine.reply_max_seq_len\) 4\.33, reply CUDA graphs 0\.10.*"
                       r"speech CUDA graphs.*only 23\.5 GiB of 24\.0 GiB"):
        gpu_24.check_plan(_plan(defaults))
    gpu_24.check_plan(_plan(small))


def test_load_refuses_before_the_first_model_when_the_plan_does_not_fit(monkeypatch, tiny_settings):
    from agent.models.manager import UnifiedModelManager
    from agent.models.voxtral import VoxtralModel

    loads = []
    monkeypatch.setattr(VoxtralModel, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    manager = UnifiedModelManager(tiny_settings)
    plan = manager.memory_plan()
    names = [name for name, _ in plan]
    assert names[0] == "Voxtral" and "Orpheus" in names and "reply whole-prompt prefill (engine.reply_max_seq_len)" in names
    need = sum(n for _, n in plan)
    manager.memory._mem_get_info = lambda: (need // 2, need)
    manager.memory.headroom_bytes = 0
    with pytest.raises(InsufficientVRAMError, match=r"the models need .*Voxtral .*available in RAM"):
        manager.load()
    assert loads == [] and manager.voxtral is None
    manager.unload()


def test_hub_and_local_loads_go_straight_to_the_device(monkeypatch):
    from agent.models import memory

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(memory, "accelerate_available", lambda: True)
    assert memory.placement(cuda) == {"device_map": cuda} and memory.placement(cpu) == {}
    monkeypatch.setattr(memory, "accelerate_available", lambda: False)
    assert memory.placement(cuda) == {}  # transformers needs accelerate for device_map: RAM first, then moved
    # The loaders pass it to from_pretrained (here a CPU "device" standing in for a GPU).
    seen = []
    original = LlamaForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.pop("device_map", None))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(memory, "placement", lambda device: {"device_map": device})
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(recording))
    OrpheusDirectModel.load(str(tiny_orpheus_dir()), cpu, torch.float32)
    assert seen == [cpu]
