"""A realtime voice agent: Voxtral listens, Orpheus answers aloud."""

__version__ = "0.1.0"
