"""The seeds of FIP's random draws, derived from `FIPConfig.anchor_seed` and step counters so that every process
of a distributed run, and a run resumed from a checkpoint, draws the same anchors and directions.

A counter-based seed `base` x `SEED_STRIDE` + `counter` gives each (base, counter) pair its own stream: the
stride, a prime above any step count, keeps the streams of consecutive bases apart.
"""

from __future__ import annotations

import torch

# A seed s and counter c seed the stream s x SEED_STRIDE + c (anchor batches: c the sampling step; the metric's
# output directions: c the anchor's position in the refresh; its sampled positions: -1 - the chunk's number).
SEED_STRIDE = 1_000_003
# Offset between the seeds of anchor sampling and of the metric's output directions.
DIRECTION_SEED_OFFSET = 7919


def counter_seed(seed: int, counter: int) -> int:
    """The seed of the `counter`-th draw of the stream seeded by `seed`."""
    return seed * SEED_STRIDE + counter


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded by `seed` taken modulo 2^64 (any int, negative or large, is a valid seed)."""
    return torch.Generator().manual_seed(seed % 2**64)
