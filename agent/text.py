"""Cutting text into pieces to speak, with one set of rules for the whole agent.

A reply is spoken while Voxtral is still writing it: TextSegmenter cuts the stream
(the first clause as soon as it is complete, so that speech starts early; then whole
sentences, which sound most natural). TTS gets each piece and speaks it sentence by
sentence with split_sentences, which also splits a sentence too long for one stream.
Both cut where these patterns match: a clause or sentence end, closing quotes and
brackets included, followed by a space.
"""

from __future__ import annotations

import re

CLAUSE_END = re.compile(r"[,;:—.!?…][\"')\]]*\s")  # a sentence end is a clause end too
SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s")


def _split(text: str, pattern: re.Pattern[str]) -> list[str]:
    """`text` cut after every match of `pattern`, each piece stripped, empty ones dropped."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


class TextSegmenter:
    """Streaming reply text -> pieces for TTS: the first clause (at least
    `min_first_chars` long) as soon as it is complete, then whole sentences."""

    def __init__(self, min_first_chars: int) -> None:
        self.min_first_chars = min_first_chars
        self.first = True
        self.buffer = ""

    def push(self, text: str) -> list[str]:
        self.buffer += text
        out: list[str] = []
        while True:
            pattern = CLAUSE_END if self.first else SENTENCE_END
            least = self.min_first_chars if self.first else 1
            cut = next((m.end() for m in pattern.finditer(self.buffer) if m.end() >= least), None)
            if cut is None:
                return out
            piece, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:]
            if piece:
                out.append(piece)
                self.first = False

    def flush(self) -> str | None:
        piece, self.buffer = self.buffer.strip(), ""
        return piece or None


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Split at sentence ends; split sentences longer than max_chars at clauses, then spaces."""
    out: list[str] = []
    for sentence in _split(text, SENTENCE_END):
        out.extend(_pack(" ".join(sentence.split()), max_chars))
    return out


def _pack(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    pieces = _split(sentence, CLAUSE_END)
    if len(pieces) < 2:
        pieces = sentence.split()
    if len(pieces) < 2:
        return [sentence]  # one very long word stays whole rather than cut mid-word
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += " " + piece
        else:
            chunks.append(piece)
    return [c for chunk in chunks for c in _pack(chunk, max_chars)]
