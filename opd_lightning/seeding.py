"""One rule for every random stream of a run: a seed hashed from ``(seed, purpose, *indices)``.

Streams must be independent of each other (GRPO's rollouts must not replay the data stream's draws),
reproducible, and random-access, so that a resumed run continues them without replaying anything. A
cryptographic hash of the whole tuple gives all three; arithmetic formulas such as
``(seed * p + step) * q + rank`` collide across purposes and across neighbouring indices.

The purposes in use, and the indices each is derived from:

=============================  ====================================  ======================================
purpose                        indices                               stream
=============================  ====================================  ======================================
``data``                       optimiser step                        the step's global batch of prompts
``cache_order``                pass over the cache                   ColdStart's cache row order
``grpo_rollout``               optimiser step, global row            GRPO's group completions
``grpo_minibatch``             optimiser step, rank                  GRPO's minibatch shuffle
``opd_rollout``                optimiser step, global row            OPD's student (or GKD teacher) samples
``gkd_coin``                   optimiser step                        OPD's on/off-policy coin (all ranks)
``cold_start``                 optimiser step, global row            ColdStart's teacher samples
``cold_start_val``             validation batch, rank, which sample  ColdStart's validation rollouts
``overlap_probe``              domain index, rank                    the overlap probe's student samples
``overlap_cold_start``         warm-up step, rank                    overlap-driven cold start's prompts
``overlap_cold_start_sample``  warm-up step, rank                    ... and its teachers' samples
=============================  ====================================  ======================================

Sampling is seeded per *row* of the optimiser step's global batch (:func:`row_uniforms`), so a row draws
the same completion whatever the number of processes and micro-batches it is computed in.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["derive_seed", "make_generator", "row_uniforms"]


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for stream ``purpose`` at ``indices`` (blake2b of the tuple, so streams never alias)."""
    key = "/".join([str(int(seed)), purpose, *(str(int(i)) for i in indices)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def make_generator(seed: int, purpose: str, *indices: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose, *indices))


def row_uniforms(seed: int, purpose: str, step: int, rows: range, width: int, device=None) -> Tensor:
    """``[len(rows), width]`` float32 uniforms in [0, 1): row ``i`` holds those of global row ``rows[i]``.

    A row's uniforms depend only on ``(seed, purpose, step, global row)``, never on which process or
    micro-batch holds it: :func:`opd_lightning.rollout.generate` draws token ``t`` of a row from column ``t``
    (inverse CDF), so a row samples the same completion at any world size and gradient accumulation.
    Drawn on the CPU (same values on every device) from one generator per row, then moved to ``device``.
    """
    out = torch.empty((len(rows), width), dtype=torch.float32)
    gen = torch.Generator()
    for i, row in enumerate(rows):
        gen.manual_seed(derive_seed(seed, purpose, step, row))
        torch.rand(width, generator=gen, out=out[i])
    return out.to(device) if device is not None else out
