"""Transports: they move audio in and out of a CallSession (agent/call/session.py).

server.py is the HTTP app (web client, /offer, health, metrics); webrtc/ and sip/ are
the protocols; headless.py plays a recording as the caller (a recording is a transport
too); slots.py is the one call limit they share. May import agent/ (its call, models and
config); agent/ imports signaling/ only from agent/cli.py.
"""
