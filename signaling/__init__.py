"""Transports: they move audio in and out of a CallSession (agent/session.py)."""
