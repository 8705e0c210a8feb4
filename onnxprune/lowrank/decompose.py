"""Truncated SVD of one layer's map, optionally weighted by its input covariance, with j subspaces.

The layer is `y = x @ W`, W [in, out]. Its input features are split into `j` equal contiguous subspaces
(for a Conv: blocks of input channels with their kernel windows; j = 1 is the plain channel
decomposition) and each block W_i [in/j, out] is approximated at rank r, as in ALDS (Liebenwein et al.,
"Compressing Neural Networks: Towards Determining the Optimal Layer-wise Decomposition", NeurIPS 2021):

    x @ W  =  sum_i x_i @ W_i  ~  sum_i (x_i @ A_i) @ B_i,   A_i [in/j, r],  B_i [r, out]

which is a grouped map with j groups of r outputs (A) followed by one dense map from j*r features (B).

Without data each block is the best rank-r approximation in the Frobenius norm (Eckart-Young).
With the second moment C = E[x^T x] of the layer's real inputs, the error that matters is the output
error E||x (W - W_r)||^2 = ||S (W - W_r)||_F^2 with S^T S = C, so the SVD is taken of S_i W_i (the
whitened weight) and mapped back with S_i^-1. C is damped by a small multiple of its mean eigenvalue,
which also keeps directions the calibration data never excites close to the original weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMPING = 1e-2  # added to C's eigenvalues, relative to their mean


@dataclass
class Decomposition:
    """One layer at one subspace count, for every rank at once (factors are sliced per rank)."""

    subspaces: int
    left: np.ndarray  # [j, in/j, R] and
    right: np.ndarray  # [j, R, out]: left[:, :, :r] @ right[:, :r] is each block's rank-r approximation
    errors: np.ndarray  # [R + 1]: relative error at rank 0..R (exact for j = 1, blocks assumed independent otherwise)

    @property
    def max_rank(self) -> int:
        return self.left.shape[2]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [j, in/j, rank], B [j * rank, out]) of the rank-`rank` approximation."""
        a = self.left[:, :, :rank]
        b = self.right[:, :rank, :].reshape(self.subspaces * rank, -1)
        return a, b

    def approximation(self, rank: int) -> np.ndarray:
        """The approximated W [in, out] at `rank`."""
        return (self.left[:, :, :rank] @ self.right[:, :rank, :]).reshape(-1, self.right.shape[2])

    def smallest_rank(self, max_error: float) -> int:
        """Smallest rank (>= 1) whose relative error is at most `max_error`."""
        within = np.flatnonzero(self.errors[1:] <= max_error)
        return int(within[0]) + 1 if len(within) else self.max_rank


def decompose(weight: np.ndarray, covariance: np.ndarray | None = None, subspaces: int = 1) -> Decomposition:
    """Truncated SVD of every subspace block of `weight` [in, out], whitened by `covariance` [in, in] if given."""
    n_in, n_out = weight.shape
    if n_in % subspaces:
        raise ValueError(f"{n_in} input features do not split into {subspaces} subspaces")
    size = n_in // subspaces
    blocks = weight.reshape(subspaces, size, n_out)
    if covariance is None:
        left, right, energy = principal_factors(blocks)
    else:
        lower = whitening(_diagonal_blocks(covariance, subspaces, size))  # C_i + damping = L_i L_i^T
        left, right, energy = principal_factors(np.swapaxes(lower, -1, -2) @ blocks)
        left = np.linalg.solve(np.swapaxes(lower, -1, -2), left)  # back from the whitened space: L^-T
    return Decomposition(subspaces, left, right, _error_curve(energy))


def principal_factors(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of a stack of matrices M [j, d, o] as (left [j, d, R], right [j, R, o], s^2 [j, R]), R = min(d, o).

    Computed from the eigenvectors of the smaller Gram matrix: the left or right singular vectors U (or
    V) and the projections U^T M (or M V). Products of the two are exact at full rank and the best
    rank-r approximation when truncated, and it is several times faster than LAPACK's SVD of a wide
    matrix. Components are sorted by decreasing singular value.
    """
    d, o = blocks.shape[1:]
    if d <= o:
        energy, basis = np.linalg.eigh(blocks @ np.swapaxes(blocks, -1, -2))
        basis = basis[:, :, ::-1]
        left, right = basis, np.swapaxes(basis, -1, -2) @ blocks
    else:
        energy, basis = np.linalg.eigh(np.swapaxes(blocks, -1, -2) @ blocks)
        basis = basis[:, :, ::-1]
        left, right = blocks @ basis, np.swapaxes(basis, -1, -2)
    return left, right, np.maximum(energy[:, ::-1], 0.0)


def _diagonal_blocks(covariance: np.ndarray, subspaces: int, size: int) -> np.ndarray:
    """[j, size, size]: the covariance of each subspace's features."""
    starts = np.arange(subspaces) * size
    idx = starts[:, None] + np.arange(size)[None, :]
    return covariance[idx[:, :, None], idx[:, None, :]]


def whitening(covariance: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor L of C + damping (L L^T), for a stack of covariances [..., n, n]; S = L^T."""
    n = covariance.shape[-1]
    mean_eig = np.trace(covariance, axis1=-2, axis2=-1) / n
    damping = np.where(mean_eig > 0, DAMPING * mean_eig, 1.0)
    return np.linalg.cholesky(covariance + damping[..., None, None] * np.eye(n))


def _error_curve(energy: np.ndarray) -> np.ndarray:
    """Relative error sqrt(discarded energy / total energy) at rank 0..R; `energy` [j, R] holds s^2."""
    energy = energy.sum(axis=0)  # [R], summed over subspaces
    total = energy.sum()
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(tail / total) if total > 0 else np.zeros_like(tail)


def relative_error(weight: np.ndarray, approx: np.ndarray, covariance: np.ndarray | None = None) -> float:
    """||x (W - W_r)|| / ||x W|| over the data whose second moment is `covariance` (Frobenius without it)."""
    diff = weight - approx
    if covariance is None:
        num, den = np.sum(diff * diff), np.sum(weight * weight)
    else:
        num, den = np.sum((covariance @ diff) * diff), np.sum((covariance @ weight) * weight)
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
