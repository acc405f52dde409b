"""Phone calls over SIP: messages (RFC 3261), SDP offer/answer, RTP with G.711 and DTMF,
the endpoint that answers calls, the client that places them, and a loopback phone for
tests and benchmarks."""
