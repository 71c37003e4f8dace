"""Seeds derived from integers, so every random draw of a run depends on ``(seed, purpose, index)`` only."""

from __future__ import annotations


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF
