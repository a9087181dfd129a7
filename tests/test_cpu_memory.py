"""glibc keeps freed tensors for reuse once ``keep_freed_memory`` ran (``run.keep_freed_memory``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from parallel_dkp.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "on" else False
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = rss_mb()
x = torch.ones(64 * 2**20)  # 256 MiB, touched
during = rss_mb()
del x
after = rss_mb()
print(kept, round(during - before), round(after - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_tensors_stay_in_the_process_for_reuse():
    """Pinpoints the allocator setting not taking effect (every step would map and fault fresh
    pages again): by default glibc returns a freed 256 MiB tensor to the OS at once; after
    ``keep_freed_memory()`` the process keeps it, and calling it again changes nothing."""
    def probe(mode: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    kept, grew, left = probe("off")
    assert int(grew) >= 200 and int(left) < 50, (grew, left)  # mapped, then unmapped
    kept, grew, left = probe("on")
    assert kept == "True"
    assert int(grew) >= 200 and int(left) >= 200, (grew, left)  # still held for the next step


def test_is_idempotent_and_reports_what_it_did():
    from parallel_dkp.cpu_memory import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first == sys.platform.startswith("linux")
