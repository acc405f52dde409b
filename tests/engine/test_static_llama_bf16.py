"""StaticLlama (the engine's own Llama step over its static cache) against transformers'
forward pass of the same weights, in bf16: Orpheus 3B's architecture (llama3 rope
scaling) and Voxtral Mini's language model (plain rope), with random weights made on the
GPU (bench/gpu.sh run check). The CPU variant runs the same comparison on tiny configs,
so the code is checked everywhere.

It prints the relative logits difference (max |a - b| / max |b|) of the prefill and of
each decode step, and of both sides against a float32 forward pass. Tokens are not
compared: bf16 rounding differs between the two computations and flips near-ties, so no
test may expect equal tokens in bf16. What is asserted is that StaticLlama is about as
close to float32 as transformers itself is (a wrong mask, position or rope gives errors
of the logits' own size)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from agent.engine.llama import StaticLlama, round_up
from agent.models.orpheus import AUDIO_BASE, AUDIO_IDS, audio_block

PROMPT, STEPS = 200, 8
SHARPEN = 4.0


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@torch.inference_mode()
def compare(model, ids: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Prefill PROMPT positions into slot 1 (slot 0 idle, at the scratch position), then
    STEPS decode steps; the same sequence through transformers in one forward pass, in
    the model's dtype and in float32. `ids`: the vocabulary ids whose logits StaticLlama
    computes (Orpheus's engine: its audio ids and end_of_speech; Voxtral's: all)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 128000, (PROMPT,), generator=generator).to(device)
    steps = (AUDIO_BASE + torch.randint(0, AUDIO_IDS, (STEPS,), generator=generator)).to(device)
    if model.config.vocab_size <= AUDIO_BASE + AUDIO_IDS:  # Voxtral's vocabulary: ids it has
        steps = steps % model.config.vocab_size
    head = model.lm_head.weight.index_select(0, ids)

    def rows(logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, ids)

    llama = StaticLlama(model.model, head, slots=2, max_len=round_up(PROMPT + STEPS + 1, 64) + 64)
    ours = [llama.prefill(1, prompt, 0)]
    for i, token in enumerate(steps[:-1]):
        position = PROMPT + i
        tokens = torch.stack([torch.zeros_like(token), token])
        positions = torch.tensor([llama.scratch, position], device=device)
        ours.append(llama.decode(tokens, positions, round_up(position + 1, StaticLlama.LENGTH_STEP))[1])
    ours = torch.stack(ours)
    sequence = torch.cat([prompt, steps[:-1]])[None]
    theirs = rows(model(input_ids=sequence).logits[0, PROMPT - 1:])
    fp32 = copy.deepcopy(model).float()
    reference = rows(fp32(input_ids=sequence).logits[0, PROMPT - 1:])
    del fp32
    return {
        "static_vs_transformers": relative(ours, theirs),
        "static_prefill_vs_transformers": relative(ours[0], theirs[0]),
        "static_decode_vs_transformers": relative(ours[1:], theirs[1:]),
        "static_vs_fp32": relative(ours, reference),
        "transformers_vs_fp32": relative(theirs, reference),
    }


def _configs(tiny: bool):
    from agent.models import tiny as t

    if tiny:
        voxtral = t.tiny_voxtral_config().text_config
        return {"orpheus": t.tiny_orpheus_config(), "voxtral-text": voxtral}
    return {"orpheus-3b": t.orpheus_3b_config(), "voxtral-mini-text": t.voxtral_mini_config().text_config}


def _run(name: str, config, device: torch.device, capsys) -> dict[str, float]:
    from agent.models.tiny import random_llama

    model = random_llama(config, device, torch.bfloat16).eval()
    # Random weights attend almost uniformly, so a wrong position or mask would hardly
    # show; queries and keys 4x larger sharpen attention (an off-by-one decode position
    # then gives 5x transformers' own bf16 error on the tiny config, and fails _check).
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
            layer.self_attn.k_proj.weight.mul_(SHARPEN)
    vocab = torch.arange(config.vocab_size, device=device)
    ids = audio_block(vocab) if config.vocab_size > AUDIO_BASE + AUDIO_IDS else vocab
    result = compare(model, ids, device)
    result = {"model": name, "device": str(device), "dtype": "bfloat16", **{k: round(v, 5) for k, v in result.items()}}
    with capsys.disabled():
        print("\nstatic-llama-bf16", json.dumps(result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "static_llama_bf16.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")
    del model
    return result


def _check(result: dict[str, float]) -> None:
    # StaticLlama about as close to float32 as transformers' bf16 forward is, and close to it.
    assert result["static_vs_fp32"] <= 3 * result["transformers_vs_fp32"] + 1e-3, result
    assert result["static_vs_transformers"] < 0.1, result


@pytest.mark.parametrize("name", ["orpheus", "voxtral-text"])
def test_static_llama_bf16_on_cpu(name, capsys):
    _check(_run(name, _configs(tiny=True)[name], torch.device("cpu"), capsys))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real architectures in bf16)")
@pytest.mark.parametrize("name", ["orpheus-3b", "voxtral-mini-text"])
def test_static_llama_bf16_on_gpu(name, capsys):
    _check(_run(name, _configs(tiny=False)[name], torch.device("cuda"), capsys))
    torch.cuda.empty_cache()
