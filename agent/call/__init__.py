"""One call, whatever the transport: the conversation loop (CallSession), its voice
activity detection, echo guard and outbound audio queue.

May import: agent.config, agent.errors, agent.audio, agent.models (through the session's
model manager). Never signaling/.
"""
