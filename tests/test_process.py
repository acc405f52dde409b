"""Process-wide set-up done by the command line (agent/process.py)."""

import subprocess
import sys

from agent.process import limit_malloc_arenas

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
