"""The one closed-form solver behind UCE and RECE.

For a weight ``W0`` (out x d), erase keys ``C_e`` (n x d) with targets ``V_e`` (n x out) and preserve
keys ``C_p`` (m x d) whose outputs are kept at ``W_p C_p``:

    W = (lam W0 + s_e V_e^T C_e + s_p W_p C_p^T C_p) M^-1,   M = lam I + s_e C_e^T C_e + s_p C_p^T C_p

``M`` is symmetric positive definite and the same for every matrix an edit changes (the keys are
shared), so a :class:`System` factors it once (Cholesky, float64) and solves every matrix from the
factor, never forming an inverse. Since ``W0 M = lam W0 + s_e W0 C_e^T C_e + s_p W0 C_p^T C_p``, each
matrix's solution is its change

    W - W0 = [s_e (V_e - C_e W0^T)^T C_e + s_p (W_p - W0) C_p^T C_p] M^-1

with ``C_e M^-1`` (and ``C_p^T C_p M^-1`` when ``W_p`` differs from ``W0``) computed once. Each output
row of ``W`` is solved on its own, so on a GPU the matrices of one edit are solved together, their rows
stacked (:func:`groups`, :func:`stack`, :func:`unstack`): two matrix products for the whole edit.

>>> import torch
>>> W0, C = torch.randn(4, 3), torch.randn(5, 3)
>>> W = solve(W0, Gram.of(C), erase_values=torch.zeros(5, 4), erase_keys=C, lam=0.1)
>>> bool((W @ C.T).abs().max() < (W0 @ C.T).abs().max())
True
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
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


@dataclass
class System:
    """``M`` of one edit, factored once, and the products every matrix's solution shares (float64, on
    the weights' device)."""

    chol: torch.Tensor  # the Cholesky factor of M
    keys: torch.Tensor  # C_e, [n, d]
    keys_solved: torch.Tensor  # C_e M^-1, [n, d]
    keep: torch.Tensor | None  # C_p^T C_p, [d, d]
    erase_scale: float
    preserve_scale: float
    _kept_solved: torch.Tensor | None = None  # C_p^T C_p M^-1, made when first needed

    @classmethod
    def build(cls, erase: Gram, erase_keys: torch.Tensor, preserve: Gram | None = None, lam: float = 0.5,
              erase_scale: float = 1.0, preserve_scale: float = 1.0,
              device: torch.device | str = "cpu") -> "System":
        """Factor ``M``; raises ``FloatingPointError`` when it is not positive definite."""
        d = erase.matrix.shape[0]
        keys = erase_keys.reshape(-1, d).to(device, torch.float64)
        keep = None if preserve is None else preserve.matrix.to(device, torch.float64)
        M = lam * torch.eye(d, dtype=torch.float64, device=device) + erase_scale * erase.matrix.to(device)
        if keep is not None:
            M = M + preserve_scale * keep
        chol, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0 or not torch.isfinite(chol).all():
            raise FloatingPointError("the closed-form system is not positive definite; raise lam")
        # X M^-1 = (M^-1 X^T)^T, M symmetric
        return cls(chol, keys, torch.cholesky_solve(keys.T, chol).T, keep, erase_scale, preserve_scale)

    def solve(self, W0: torch.Tensor, erase_values: torch.Tensor,
              preserve_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The edited ``W0`` (at least float32; a half-precision model gets it rounded once, when the
        edit is applied); ``preserve_weight`` (default ``W0``) gives the preserved keys' outputs."""
        W = W0.detach().to(self.keys.device, torch.float64, copy=True)
        held = None if preserve_weight is None or preserve_weight is W0 else preserve_weight
        return self.solve_(W, erase_values, held).to(torch.promote_types(W0.dtype, torch.float32))

    def solve_(self, W: torch.Tensor, erase_values: torch.Tensor,
               preserve_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Edit the float64 ``W`` in place (no copy of a large stack is made) and return it."""
        values = erase_values.reshape(-1, W.shape[0]).to(W.device, torch.float64)
        residual = values - self.keys @ W.T
        kept = None
        if preserve_weight is not None and self.keep is not None:
            if self._kept_solved is None:
                self._kept_solved = torch.cholesky_solve(self.keep, self.chol).T
            kept = (preserve_weight.detach().to(W.device, torch.float64) - W) @ self._kept_solved
        W.addmm_(residual.T, self.keys_solved, alpha=self.erase_scale)
        if kept is not None:
            W.add_(kept, alpha=self.preserve_scale)
        return W


def solve(W0: torch.Tensor, erase: Gram, erase_values: torch.Tensor, erase_keys: torch.Tensor,
          preserve: Gram | None = None, preserve_weight: torch.Tensor | None = None,
          lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The closed-form edit of one matrix ``W0`` (a :class:`System` of its own; build one
    :class:`System` to edit many matrices with the same keys). Float64 on ``W0``'s device."""
    system = System.build(erase, erase_keys, preserve, lam, erase_scale, preserve_scale, W0.device)
    return system.solve(W0, erase_values, preserve_weight)


def groups(weights: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The names of ``weights`` in the groups an edit solves together: all at once on a GPU (one
    product for the lot, not a few launches per matrix), one matrix at a time on the CPU (where a stack
    of SD's 32 cross-attention matrices, 150 MB in float64, costs more in fresh memory pages than the
    launches it saves).

    >>> groups({"a": torch.ones(2, 3), "b": torch.ones(1, 3)})
    [['a'], ['b']]
    """
    names = list(weights)
    if names and all(w.device.type != "cpu" for w in weights.values()):
        return [names]
    return [[name] for name in names]


def stack(weights: Iterable[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """The matrices' rows one above the other, float64 on ``device`` (default: the first matrix's).

    >>> stack([torch.ones(2, 3), torch.zeros(1, 3)]).shape
    torch.Size([3, 3])
    >>> W = torch.ones(2, 3, dtype=torch.float64)
    >>> stack([W]).add_(1).equal(W)  # always a copy: editing the stack in place leaves W as it was
    False
    """
    weights = [w.detach() for w in weights]
    device = weights[0].device if device is None else device
    if len(weights) == 1:  # a copy, never the matrix itself (the caller edits it in place)
        return weights[0].to(device, torch.float64, copy=True)
    return torch.cat([w.to(device, torch.float64) for w in weights])


def unstack(rows: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``rows`` (from :func:`stack`) cut back into matrices named and shaped as ``like``'s, each rounded
    once to at least float32 (a half-precision weight's edit keeps float32) on its matrix's device.

    >>> W = {"a": torch.ones(2, 3), "b": torch.zeros(1, 3)}
    >>> {k: tuple(v.shape) for k, v in unstack(stack(W.values()), W).items()}
    {'a': (2, 3), 'b': (1, 3)}
    """
    pieces = torch.split(rows, [w.shape[0] for w in like.values()])
    return {name: piece.to(w.device, torch.promote_types(w.dtype, torch.float32))
            for (name, w), piece in zip(like.items(), pieces)}
