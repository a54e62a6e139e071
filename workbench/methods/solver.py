"""The one closed-form solver behind UCE and RECE.

For a weight ``W0`` (out x d), erase keys ``C_e`` (n x d) with targets ``V_e`` (n x out) and preserve
keys ``C_p`` (m x d) whose outputs are kept at ``W_p C_p``:

    W = (lam W0 + s_e V_e^T C_e + s_p W_p C_p^T C_p) (lam I + s_e C_e^T C_e + s_p C_p^T C_p)^-1

The right-hand matrix is symmetric positive definite; we solve with a Cholesky factorisation in
float64 and never form an inverse. Gram matrices are computed once and shared by every edited matrix.

>>> import torch
>>> W0, C = torch.randn(4, 3), torch.randn(5, 3)
>>> W = solve(W0, Gram.of(C), erase_values=torch.zeros(5, 4), erase_keys=C, lam=0.1)
>>> bool((W @ C.T).abs().max() < (W0 @ C.T).abs().max())
True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Gram:
    """``C^T C`` of a key set, in float64, with the number of keys it sums."""

    matrix: torch.Tensor
    count: int

    @classmethod
    def of(cls, keys: torch.Tensor) -> "Gram":
        keys = keys.reshape(-1, keys.shape[-1]).double()
        return cls(keys.T @ keys, keys.shape[0])

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu") -> "Gram":
        return cls(torch.zeros(width, width, dtype=torch.float64, device=device), 0)


def solve(W0: torch.Tensor, erase: Gram, erase_values: torch.Tensor, erase_keys: torch.Tensor,
          preserve: Gram | None = None, preserve_weight: torch.Tensor | None = None,
          lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The closed-form edit of ``W0``; ``preserve_weight`` (default ``W0``) gives the kept outputs.

    Computed in float64 on ``W0``'s device (every input is moved there); returned in ``W0``'s dtype.
    """
    W0d = W0.detach().double()
    device, d = W0d.device, W0d.shape[1]
    keys = erase_keys.reshape(-1, d).to(device, torch.float64)
    values = erase_values.reshape(-1, W0d.shape[0]).to(device, torch.float64)
    preserve = preserve or Gram.empty(d, device)
    Wp = W0d if preserve_weight is None else preserve_weight.detach().to(device, torch.float64)
    keep = preserve.matrix.to(device)
    rhs = lam * W0d + erase_scale * values.T @ keys + preserve_scale * Wp @ keep
    lhs = (lam * torch.eye(d, dtype=torch.float64, device=device) + erase_scale * erase.matrix.to(device)
           + preserve_scale * keep)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) != 0:
        raise FloatingPointError("the closed-form system is not positive definite; raise lam")
    # W lhs = rhs  <=>  lhs W^T = rhs^T (lhs is symmetric)
    return torch.cholesky_solve(rhs.T, chol).T.to(W0.dtype)
