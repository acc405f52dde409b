"""The batched speech engine on the tiny profile: the static-cache Llama step against
transformers, the same tokens batched as alone, joining and leaving, cancellation,
chunked prefill, batched SNAC, and first-audio priority."""

import asyncio

import numpy as np
import pytest
import torch

from agent.engine.batching import StepProfile
from agent.engine.device import DeviceThread
from agent.engine.llama import GraphedDecode, StaticLlama
from agent.errors import AudioGenerationError
from agent.models.orpheus import SamplingParams, audio_block, tokens_to_frames
from agent.models.snac import FADE_SAMPLES, FRAME_SAMPLES, decode_frames, fade_out, rel_l2
from agent.models.tts import SpeechBatcher, audio_head

TEXTS = ["Hello there, how are you today?", "Fine.", "A third sentence, somewhat longer than the others are.",
         "Four."]


def make_batcher(tts_models, max_streams=4, prefill_chunk=256, defer_lead_s=1.0, max_frames_per_window=16):
    orpheus, snac, _ = tts_models
    return SpeechBatcher(orpheus, snac, max_streams, 512, prefill_chunk, defer_lead_s, "default",
                         max_frames_per_window, cuda_graphs=False)


def single_tokens(orpheus, text: str, params: SamplingParams, seed: int) -> list[int]:
    stream = orpheus.stream(orpheus.prompt_ids("tara", text), params, seed)
    tokens = []
    while (t := stream.step()) is not None:
        tokens.append(t)
    return tokens


async def run_until_done(batcher, streams, max_steps=2000):
    """Step the batcher by hand, collecting each stream's audio chunks."""
    audio = {id(s): [] for s in streams}
    for _ in range(max_steps):
        if not batcher.has_work():
            break
        batcher.step()
        await asyncio.sleep(0)  # deliveries land on this loop
    for s in streams:
        while not s.done:
            chunk = await asyncio.wait_for(s.next_audio(), 5)
            if chunk is not None:
                audio[id(s)].append(chunk)
    return audio


@torch.inference_mode()
def test_static_llama_step_matches_transformers(tts_models):
    orpheus = tts_models[0]
    llama = StaticLlama(orpheus.model.model, audio_head(orpheus.model), slots=3, max_len=128)
    prompt = torch.tensor(orpheus.prompt_ids("tara", "Check the cache."))
    hf = orpheus.model(input_ids=prompt[None], use_cache=True)
    ours = llama.prefill(2, prompt, 0)
    assert torch.allclose(ours, audio_block(hf.logits[0, -1]), atol=1e-4)
    # One decode step for slot 2 (slots 0 and 1 idle) against transformers with its cache.
    token = 128266 + 17
    hf2 = orpheus.model(input_ids=torch.tensor([[token]]), past_key_values=hf.past_key_values, use_cache=True)
    tokens = torch.tensor([0, 0, token])
    positions = torch.tensor([llama.scratch, llama.scratch, len(prompt)])
    step = llama.decode(tokens, positions, 64)
    assert torch.allclose(step[2], audio_block(hf2.logits[0, -1]), atol=1e-4)


def _filled_cache(orpheus, device="cpu", slots=6, max_len=192):
    """A StaticLlama with three prompts of different lengths in slots 0-2."""
    llama = StaticLlama(orpheus.model.model, audio_head(orpheus.model), slots=slots, max_len=max_len)
    contexts = []
    for slot, text in enumerate(TEXTS[:3]):
        prompt = torch.tensor(orpheus.prompt_ids("tara", text), device=device)
        llama.prefill(slot, prompt, 0)
        contexts.append(len(prompt))
    tokens = torch.tensor([128266 + 5, 128266 + 4096 + 9, 128266 + 3], device=device)
    return llama, tokens, torch.tensor(contexts, device=device)


@torch.inference_mode()
def test_bucketed_decode_pads_without_changing_results(tts_models):
    """The static buffers and buckets that the CUDA graphs replay, run eagerly (a CPU
    cannot capture graphs): a step of 3 streams runs in the 4-row bucket and a longer
    context bucket, and gives what the exact-size step gives; the padding row writes only
    the scratch position of its slot."""
    llama, tokens, positions = _filled_cache(tts_models[0])
    graphs = GraphedDecode(llama, [1, 2, 4], [64, 128], capture=False)
    assert graphs.batch_sizes == [1, 2, 4, 6] and graphs.lengths == [64, 128, 192]
    assert graphs.bucket(3, 20) == (4, 64) and graphs.bucket(5, 150) == (6, 192)
    length = int(positions.max()) + 1
    exact = llama.decode(tokens, positions, length).clone()
    k3 = llama.k[:, 3].clone()
    padded = graphs.decode(tokens, positions, length)
    assert padded.shape == exact.shape
    assert torch.allclose(padded, exact, atol=1e-5)
    changed = (llama.k[:, 3] != k3).any(dim=(0, 1, 3)).nonzero().flatten().tolist()
    assert changed == [llama.scratch]
    # One row alone, in the smallest buckets.
    one = graphs.decode(tokens[:1], positions[:1], length)
    assert torch.allclose(one[0], exact[0], atol=1e-5)
    assert graphs.verify() < 1e-5  # the start-up check that guards captured graphs


def test_graph_check_refuses_a_bucket_that_computes_something_else(tts_models):
    llama, _, _ = _filled_cache(tts_models[0])
    graphs = GraphedDecode(llama, [1, 2], [64], capture=False)
    assert graphs.batch_sizes == [1, 2, 6]
    wrong = graphs._steps[(6, 64)]
    graphs._steps[(6, 64)] = lambda: wrong() * 1.5  # what a broken capture could give
    with pytest.raises(RuntimeError, match="differ from eager"):
        with torch.inference_mode():
            graphs.verify()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (capturing graphs)")
@torch.inference_mode()
def test_cuda_graph_replay_matches_eager_steps(tts_models):
    import copy

    orpheus = copy.copy(tts_models[0])
    orpheus.model = copy.deepcopy(orpheus.model).to("cuda")
    llama, tokens, positions = _filled_cache(orpheus, device="cuda")
    graphs = GraphedDecode(llama, [1, 2, 4], [64, 128], capture=True)
    for b in (1, 2, 3):
        length = int(positions[:b].max()) + 1
        eager = llama.decode(tokens[:b], positions[:b], 64).clone()
        assert torch.allclose(graphs.decode(tokens[:b], positions[:b], length), eager, atol=1e-3)
        positions = positions + 1  # the next step, one position on
    assert graphs.verify() < 1e-3


async def test_batched_streams_give_the_tokens_they_give_alone(tts_models):
    """Streams join at different steps, one waits for a slot, prompts are fed in chunks,
    and short streams leave early (the others move to lower slots): every stream still
    samples exactly the tokens of the single-stream path with the same seed."""
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models, max_streams=3, prefill_chunk=16)
    batcher.profile = StepProfile()
    loop = asyncio.get_running_loop()
    plans = [(TEXTS[0], 140, 1), (TEXTS[1], 35, 2), (TEXTS[2], 91, 3), (TEXTS[3], 140, 4)]
    streams = []
    for i, (text, max_tokens, seed) in enumerate(plans):
        params = SamplingParams(max_tokens=max_tokens)
        streams.append(batcher.admit(orpheus.prompt_ids("tara", text), params, seed, loop))
        for _ in range(5 * i):  # the next stream joins a few steps later
            batcher.step()
    assert len(batcher.waiting) == 1  # three slots, four streams
    await run_until_done(batcher, streams)
    profile = batcher.profile.summary()
    assert profile["max_rows"] == 3 and profile["steps"] == batcher.steps
    assert profile["snac_calls_per_step"] > 0 and profile["phase_ms_per_step"]["forward"] > 0
    for stream, (text, max_tokens, seed) in zip(streams, plans):
        assert stream.tokens == single_tokens(orpheus, text, SamplingParams(max_tokens=max_tokens), seed)
    assert not batcher.has_work() and batcher.active == []


async def test_background_streams_wait_behind_the_others_and_leave_a_slot_free(tts_models):
    """Caller transcripts run as background streams: a stream admitted after them still
    goes first, and they never take the last free slot."""
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models, max_streams=3, prefill_chunk=16)
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=35)

    def admit(i: int, background: bool):
        stream = batcher.admit(orpheus.prompt_ids("tara", TEXTS[i]), params, i, loop)
        if background:  # as VoxtralModel's ReplyBatcher.admit(background=True) marks it
            batcher.waiting.remove(stream)
            stream.background = True
            batcher._enqueue(stream, "a background stream")
        return stream

    first = admit(0, False)
    batcher.step()  # first takes slot 0
    low = [admit(1, True), admit(2, True)]
    urgent = admit(3, False)  # comes last, is served first
    assert list(batcher.waiting) == [urgent, *low]
    batcher.step()
    assert urgent.slot is not None and first.slot is not None
    assert low[0].slot is None and low[1].slot is None  # one slot free, and it stays free
    await run_until_done(batcher, [first, urgent, *low])
    assert all(s.tokens for s in (first, urgent, *low)) and not batcher.has_work()


@pytest.mark.parametrize("pad_snac_windows", [False, True], ids=["cpu-windows", "gpu-windows"])
async def test_batched_audio_is_every_frame_of_the_one_shot_decode(tts_models, pad_snac_windows):
    orpheus, snac, _ = tts_models
    batcher = make_batcher(tts_models)
    batcher.pad_snac_windows = pad_snac_windows  # on by default on a GPU only
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=140)
    streams = [batcher.admit(orpheus.prompt_ids("tara", t), params, i, loop) for i, t in enumerate(TEXTS[:3])]
    audio = await run_until_done(batcher, streams)
    for stream in streams:
        out = np.concatenate(audio[id(stream)])
        frames = tokens_to_frames(stream.tokens)
        assert len(out) == len(frames) * FRAME_SAMPLES  # nothing lost, nothing repeated
        # The tiny model never says end_of_speech: each stream is cut at max_tokens, so
        # its last samples fade out (as the single path's do).
        assert out[-1] == 0.0
        assert rel_l2(out, fade_out(decode_frames(snac, frames), FADE_SAMPLES)) < 5e-3


async def test_cancelled_stream_leaves_within_one_step(tts_models):
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models)
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=140)
    keep, cancel = (batcher.admit(orpheus.prompt_ids("tara", t), params, i, loop) for i, t in enumerate(TEXTS[:2]))
    for _ in range(10):
        batcher.step()
    assert len(batcher.active) == 2
    made = len(cancel.tokens)
    cancel.close()
    batcher.step()
    assert batcher.active == [keep] and keep.slot == 0
    assert cancel.slot is None and len(cancel.tokens) == made  # no token after the close
    await run_until_done(batcher, [keep])
    assert keep.tokens == single_tokens(orpheus, TEXTS[0], params, 0)


async def test_new_stream_first_audio_goes_before_streams_ahead(tts_models):
    """A stream far ahead of its listener puts off its SNAC windows while a new stream
    waits for its first audio, and takes them up again afterwards."""
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models, defer_lead_s=1.0, max_frames_per_window=1)  # a window every frame
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=140)
    ahead = batcher.admit(orpheus.prompt_ids("tara", TEXTS[0]), params, 0, loop)
    while ahead.decoder.emitted < 3:  # from here on, each new frame makes a window due
        batcher.step()
    ahead.decoder.clock = lambda: 0.0  # its listener is far behind: a lead of "forever"
    assert ahead.decoder.lead_s > 1.0
    new = batcher.admit(orpheus.prompt_ids("tara", TEXTS[2]), params, 1, loop)
    frames_before = len(ahead.decoder.frames)
    emitted_before = ahead.decoder.emitted
    while new.decoder.emitted == 0:
        batcher.step()
    assert len(ahead.decoder.frames) > frames_before  # it kept generating...
    assert ahead.decoder.emitted == emitted_before  # ...but decoded nothing meanwhile
    while ahead.decoder.emitted == emitted_before:
        batcher.step()  # and catches up once the new stream is heard
    ahead.close()
    await run_until_done(batcher, [new])


async def test_a_stream_opened_for_a_cancelled_caller_is_closed(tts_models):
    """A barge-in can cancel the task that is waiting for its stream to open: the stream
    the device thread then returns is closed, and leaves the batch at the next step."""
    import threading

    orpheus = tts_models[0]
    thread = DeviceThread()
    batcher = make_batcher(tts_models)
    thread.attach(batcher)
    started, release = threading.Event(), threading.Event()

    admitted = []

    def slow_admit(*args):
        started.set()
        release.wait(5)  # the caller is cancelled meanwhile
        admitted.append(batcher.admit(*args))
        return admitted[-1]

    try:
        loop = asyncio.get_running_loop()
        params = SamplingParams(max_tokens=140)
        task = asyncio.create_task(thread.open(slow_admit, orpheus.prompt_ids("tara", TEXTS[0]), params, 1, loop))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(200):  # the orphan is closed and dropped within a step or two
            if await thread.run(lambda: not batcher.has_work()):
                break
            await asyncio.sleep(0.01)
        assert not batcher.has_work()
        assert admitted[0].cancelled and len(admitted[0].tokens) < 140  # closed, not run to its end
    finally:
        thread.shutdown()


def test_delivery_to_a_closed_event_loop_cancels_only_that_stream(tts_models):
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models)
    gone = asyncio.new_event_loop()
    gone.close()
    stream = batcher.admit(orpheus.prompt_ids("tara", TEXTS[1]), SamplingParams(max_tokens=70), 1, gone)
    for _ in range(30):
        batcher.step()  # no error reaches the step
    assert stream.cancelled and not batcher.has_work()


async def test_device_thread_runs_jobs_between_steps(tts_models):
    """Jobs queued while streams are active run before the next step; the streams finish."""
    orpheus = tts_models[0]
    thread = DeviceThread()
    batcher = make_batcher(tts_models)
    thread.attach(batcher)
    try:
        loop = asyncio.get_running_loop()
        params = SamplingParams(max_tokens=70)
        stream = await thread.run(batcher.admit, orpheus.prompt_ids("tara", TEXTS[0]), params, 5, loop)
        steps_seen = []
        for _ in range(3):
            steps_seen.append(await thread.run(lambda: batcher.steps))
        chunks = []
        while not stream.done:
            chunk = await stream.next_audio()
            if chunk is not None:
                chunks.append(chunk)
        assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0
        assert sum(len(c) for c in chunks) == 70 // 7 * FRAME_SAMPLES
        assert stream.tokens == single_tokens(orpheus, TEXTS[0], params, 5)
        with pytest.raises(ZeroDivisionError):
            await thread.run(lambda: 1 / 0)  # a failing job fails its caller only
        assert await thread.run(lambda: 7) == 7
    finally:
        thread.shutdown()


async def test_a_failing_step_fails_its_streams_not_the_engine(tts_models):
    orpheus = tts_models[0]
    batcher = make_batcher(tts_models)
    loop = asyncio.get_running_loop()
    params = SamplingParams(max_tokens=70)
    doomed = batcher.admit(orpheus.prompt_ids("tara", TEXTS[0]), params, 0, loop)
    batcher.step()
    real_decode = batcher.llama.decode

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    batcher.llama.decode = broken
    batcher.step()
    batcher.llama.decode = real_decode
    await asyncio.sleep(0)
    with pytest.raises(AudioGenerationError, match="illegal memory access"):
        while not doomed.done:
            await doomed.next_audio()
    assert batcher.active == []
    fine = batcher.admit(orpheus.prompt_ids("tara", TEXTS[1]), params, 1, loop)
    await run_until_done(batcher, [fine])
    assert fine.tokens == single_tokens(orpheus, TEXTS[1], params, 1)
