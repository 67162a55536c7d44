"""A fixed orthogonal rotation of every head's keys, values and queries.

Per-token low-bit quantization is only as fine as the token's widest channel:
a model's keys carry a few outlier channels (after RoPE, outlier channel
pairs), and one outlier coarsens the step of every other channel in its group.
Rotating each head vector by a random orthogonal matrix ``R`` spreads every
channel's energy over all of them (QuaRot, SpinQuant), so the same bits
quantize the rotated vector far more finely.

Attention is unchanged by the rotation: ``(qR)(kR)^T = qk^T``, and the output
over rotated values is ``oR``, rotated back by ``R^T``. The backend rotates each
step's queries, keys and values before anything reads or writes the cache and
rotates the output back, so every exact slot and store record holds rotated
vectors and no kernel knows of it.
"""

from __future__ import annotations

import torch

# Fixed: a cache is only readable with the rotation that wrote it.
ROTATION_SEED = 0x6B76


def rotation_matrix(head_size: int) -> torch.Tensor:
    """``float32 [D, D]`` orthogonal: a Walsh-Hadamard matrix with seeded random
    column signs where ``D`` is a power of two (every entry +-1/sqrt(D), the
    energy of any one channel spread evenly), else the Q of a seeded Gaussian."""
    gen = torch.Generator().manual_seed(ROTATION_SEED)
    if head_size & (head_size - 1) == 0:
        hadamard = torch.ones(1, 1)
        while hadamard.shape[0] < head_size:
            hadamard = torch.cat([torch.cat([hadamard, hadamard], 1),
                                  torch.cat([hadamard, -hadamard], 1)], 0)
        signs = torch.randint(0, 2, (head_size,), generator=gen).float() * 2 - 1
        return hadamard * signs / head_size ** 0.5
    q, r = torch.linalg.qr(torch.randn(head_size, head_size, generator=gen))
    return q * torch.sign(torch.diagonal(r))  # unique Q: R's diagonal made positive


def rotate(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Each head vector of ``x`` (``[..., D]``, or heads flattened as
    ``[T, H * D]``) times ``matrix [D, D]``, in float32, back in ``x``'s dtype."""
    heads = x.reshape(-1, matrix.shape[0]).float()
    return (heads @ matrix).to(x.dtype).view(x.shape)
