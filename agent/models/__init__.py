"""The models of one process: Voxtral (listening and replies), Orpheus (speech), SNAC (the
codec), the tiny and random builds of them, their loading, memory plan and monitoring.

May import: agent.config, agent.errors, agent.audio, agent.rates, agent.text, agent.engine.
Never agent.call or signaling/.
"""
