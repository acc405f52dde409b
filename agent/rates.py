"""The agent's two audio rates, each named once for the whole tree."""

IN_RATE = 16000  # what the agent hears: Voxtral's input (Whisper features); the VAD and echo guard work at it
OUT_RATE = 24000  # what the agent says: SNAC's output
