"""Cutting text into speakable pieces (agent/text.py): the session's streaming segmenter and
TTS's sentence splitter, with one set of patterns."""

from agent.text import TextSegmenter, split_sentences


def test_text_segmenter_hands_over_the_first_clause_early():
    seg = TextSegmenter(min_first_chars=12)
    assert seg.push("Hi, the") == []  # "Hi," is shorter than 12 characters
    assert seg.push(" weather today, I think") == ["Hi, the weather today,"]
    assert seg.push(", is fine") == []  # after the first piece, whole sentences only
    assert seg.push(". Anything else? Bye") == ["I think, is fine.", "Anything else?"]
    assert seg.flush() == "Bye" and seg.flush() is None


def test_split_sentences():
    assert split_sentences("Hi there. How are you?  Fine!", 250) == ["Hi there.", "How are you?", "Fine!"]
    assert split_sentences("  one\nline  ", 250) == ["one line"]
    long = "alpha beta, gamma delta, " * 10 + "end."
    parts = split_sentences(long, 40)
    assert all(len(p) <= 40 for p in parts) and " ".join(parts) == " ".join(long.split())
    assert split_sentences("x" * 60, 20) == ["x" * 60]  # one word is never cut


def test_a_closing_quote_stays_with_its_sentence():
    """The session's segmenter and TTS cut at the same places, closing quotes included
    (TTS used to drop a quote after a sentence end: its own pattern consumed it)."""
    text = 'He said "hi." Then (quietly) he left. Fine!'
    assert split_sentences(text, 250) == ['He said "hi."', "Then (quietly) he left.", "Fine!"]
    segmenter = TextSegmenter(min_first_chars=1)
    streamed = [p for ch in text for p in segmenter.push(ch)] + [segmenter.flush()]
    assert streamed[1:] == split_sentences(text, 250)[1:]  # the first piece is a clause, or as here a sentence
    assert streamed[0] == 'He said "hi."'
