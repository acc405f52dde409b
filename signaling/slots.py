"""One call limit for the whole process, whatever the transport.

`server.max_calls` bounds the calls in progress across WebRTC and SIP together: every
transport takes a slot before it answers (an offer, an INVITE) and gives it back when the
call ends, so health, metrics and the limit all count the same calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class CallSlots:
    """Call slots shared by every transport of one process."""

    def __init__(self, limit: int, on_release: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.on_release = on_release  # run when a held slot is given back (a call ended)
        self._held: dict[str, str] = {}  # call id -> transport ("webrtc", "sip")

    def take(self, call_id: str, transport: str) -> bool:
        """Hold a slot for `call_id`; False (nothing held) when every slot is taken.
        Taking a slot the call already holds succeeds and changes nothing."""
        if call_id in self._held:
            return True
        if len(self._held) >= self.limit:
            return False
        self._held[call_id] = transport
        return True

    def release(self, call_id: str) -> None:
        """Give the call's slot back (a call that holds none is ignored)."""
        if self._held.pop(call_id, None) is not None and self.on_release is not None:
            self.on_release()

    def holds(self, call_id: str) -> bool:
        return call_id in self._held

    @property
    def free(self) -> int:
        return self.limit - len(self._held)

    def count(self, transport: str | None = None) -> int:
        """Calls holding a slot, of one transport or of all."""
        if transport is None:
            return len(self._held)
        return sum(1 for t in self._held.values() if t == transport)

    def by_transport(self) -> dict[str, int]:
        return dict(Counter(self._held.values()))

    def __len__(self) -> int:
        return len(self._held)
