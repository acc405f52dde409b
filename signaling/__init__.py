"""Transports: they move audio in and out of a CallSession (agent/call/session.py).

server.py is the HTTP app (web client, /offer, health, metrics); webrtc/ and sip/ are
the protocols; headless.py plays a recording as the caller (a recording is a transport
too); slots.py is the one call limit they share and pacing.py the one 20 ms send
schedule. Each transport is given a SessionFactory (agent/call/factory.py), never the
model manager. May import agent/ (its call wing, config, errors, audio and rates);
agent/ imports signaling/ only from agent/cli.py.
"""
