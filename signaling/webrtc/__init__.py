"""WebRTC calls from browsers (aiortc): the call around a CallSession, and a loopback
caller for tests and benchmarks."""
