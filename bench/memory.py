"""Process memory readings shared by the memory benchmarks (each variant runs in a fresh process)."""

from __future__ import annotations

import resource


def rss_mb() -> float:
    """Resident set size now, MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
