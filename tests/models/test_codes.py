"""Audio tokens to SNAC codes: the formula, the frame layout, invalid tokens."""

import torch

from agent.models.orpheus import AUDIO_BASE, CODEBOOK_SIZE, END_OF_SPEECH, FrameAssembler, token_to_code, tokens_to_frames
from agent.models.snac import frames_to_codes


def tok(code: int, position: int) -> int:
    return AUDIO_BASE + (position % 7) * CODEBOOK_SIZE + code


def test_formula_on_known_ids():
    assert token_to_code(128266, 0) == 0  # code 0 is valid
    assert token_to_code(128266 + 4095, 0) == 4095
    assert token_to_code(128266 + 4096, 0) is None  # slot 1's id at slot 0
    assert token_to_code(128266 + 4096, 1) == 0
    assert token_to_code(128266 + 6 * 4096 + 17, 13) == 17  # position 13 is slot 6
    assert token_to_code(128266 + 6 * 4096 + 17, 6) == 17
    assert token_to_code(128265, 0) is None  # just below the audio range
    assert token_to_code(END_OF_SPEECH, 0) is None


def test_frames_with_code_zero():
    codes = [0, 1, 0, 4095, 2, 0, 3, 7, 0, 0, 0, 0, 0, 9]
    frames = tokens_to_frames([tok(c, i) for i, c in enumerate(codes)])
    assert frames == [codes[:7], codes[7:]]


def test_invalid_token_in_the_middle_does_not_shift_later_frames():
    codes = [[i * 10 + k for k in range(7)] for i in range(4)]
    ids = [tok(c, i) for i, c in enumerate(sum(codes, []))]
    ids[10] = 42  # a text token at position 10 (frame 1, slot 3)
    ids[16] = tok(5, 17)  # an audio id of the wrong slot at position 16 (frame 2, slot 2)
    assembler = FrameAssembler()
    frames = [f for f in (assembler.push(t) for t in ids) if f is not None]
    assert assembler.invalid_tokens == 2
    assert len(frames) == 4
    assert frames[0] == codes[0]
    # The bad code is replaced by the same slot of the previous frame; the rest is intact.
    assert frames[1] == codes[1][:3] + [codes[0][3]] + codes[1][4:]
    assert frames[2] == codes[2][:2] + [codes[1][2]] + codes[2][3:]
    assert frames[3] == codes[3]


def test_partial_frame_is_not_emitted():
    ids = [tok(1, i) for i in range(10)]
    assembler = FrameAssembler()
    frames = [f for f in (assembler.push(t) for t in ids) if f is not None]
    assert len(frames) == 1 and assembler.partial_tokens == 3


def test_codebook_layout_1_2_4():
    frames = [[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]]
    c0, c1, c2 = frames_to_codes(frames, torch.device("cpu"))
    assert c0.tolist() == [[0, 10]]
    assert c1.tolist() == [[1, 4, 11, 14]]
    assert c2.tolist() == [[2, 3, 5, 6, 12, 13, 15, 16]]
