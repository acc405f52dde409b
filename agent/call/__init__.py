"""One call, whatever the transport: the conversation loop (CallSession), its events,
voice activity detection, echo guard and outbound audio queue, and the SessionFactory
that transports are given.

May import: agent.config, agent.errors, agent.audio, agent.rates, agent.text, agent.models
(the session's model manager: its reply() and speak()). Never signaling/.
"""
