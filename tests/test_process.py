"""Process-wide set-up done by the command line (agent/process.py)."""

import subprocess
import sys

from agent.process import MemoryTrimmer, limit_malloc_arenas

PROBE = """
import ctypes, ctypes.util, sys
from agent import process
called = []
real = ctypes.CDLL
class Libc:
    def __init__(self, lib):
        self.lib = lib
    def mallopt(self, param, value):
        called.append((param, value))
        return self.lib.mallopt(param, value)
ctypes.CDLL = lambda name, *a, **k: Libc(real(name, *a, **k))
print(process.limit_malloc_arenas(), called)
"""


def test_the_arena_limit_reaches_glibc():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True [(-8, 2)]"  # mallopt(M_ARENA_MAX, 2), and glibc took it


def test_a_users_malloc_arena_max_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


def test_the_command_line_limits_the_arenas_first():
    """main() applies the limit before it parses anything (before any thread starts)."""
    probe = ("import agent.process as p, agent.cli as c\nseen = []\n"
             "p.limit_malloc_arenas = lambda: seen.append(1) or True\n"
             "try:\n    c.main(['--version'])\nexcept SystemExit:\n    pass\nprint(seen)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout
    assert out.strip().endswith("[1]")


TRIM_PROBE = """
from agent.process import MemoryTrimmer

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

blocks = [bytearray(2000) for _ in range(100_000)]  # about 200 MiB from malloc, not pymalloc
keep = bytearray(2000)  # allocated last: the heap's top stays in use, so free() returns nothing
del blocks
before = rss_mib()
released = MemoryTrimmer().trim_now()
print(released, round(before - rss_mib()))
"""


def test_a_trim_hands_freed_heap_pages_back():
    """Pages freed below live data stay resident until malloc_trim returns them."""
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True).stdout
    released, dropped_mib = out.split()
    assert released == "True" and int(dropped_mib) > 100, out


async def test_calls_that_end_together_share_one_trim():
    import asyncio

    from signaling.slots import CallSlots

    trimmer = MemoryTrimmer(delay_s=0.05)
    slots = CallSlots(4, on_release=trimmer.soon)
    for call in ("a", "b", "c"):
        assert slots.take(call, "sip")
    slots.release("a")
    slots.release("b")
    slots.release("nobody")  # held no slot: no call ended
    await asyncio.sleep(0.3)
    assert trimmer.trims == 1
    slots.release("c")
    await asyncio.sleep(0.3)
    assert trimmer.trims == 2
