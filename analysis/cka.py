"""Centred kernel alignment (linear kernel) in float64: the plain estimator on column-centred
features and the unbiased minibatch estimator (Song et al. 2012 HSIC_1; Nguyen et al. 2021).

Everything is computed from n x n Gram matrices (n examples << feature width for hidden states), and
the pairwise forms compare every pair of runs at once: input [R, ..., n, n] -> [R, R, ...].
"""
from __future__ import annotations

import torch


def gram(X: torch.Tensor, centre: bool) -> torch.Tensor:
    """X [..., n, d] -> X X^T [..., n, n] float64, after column-centring X when `centre`."""
    X = torch.as_tensor(X).to(torch.float64)
    if centre:
        X = X - X.mean(-2, keepdim=True)
    return X @ X.mT


def pairwise_cka_from_grams(K: torch.Tensor) -> torch.Tensor:
    """K [R, ..., n, n] centred Grams -> CKA [R, R, ...] = <K_a, K_b>_F / (|K_a|_F |K_b|_F).

    With K = Xc Xc^T: <K_a, K_b>_F = |Xc_b^T Xc_a|_F^2 and |K_a|_F = |Xc_a^T Xc_a|_F, the protocol's form."""
    inner = torch.einsum("a...ij,b...ij->ab...", K, K)
    d = torch.diagonal(inner, dim1=0, dim2=1).movedim(-1, 0).sqrt()   # [R, ...]
    return inner / (d[:, None] * d[None, :])


def linear_cka(X, Y) -> torch.Tensor:
    """Linear CKA between features X [..., n, d1] and Y [..., n, d2] (rows = the same n examples):
    |Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F) with column-centred Xc, Yc; float64, shape [...]."""
    K = torch.stack(torch.broadcast_tensors(gram(X, True), gram(Y, True)))
    return pairwise_cka_from_grams(K)[0, 1]


def pairwise_unbiased_hsic(K: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 (Song et al. 2012) between every pair of uncentred Grams K [R, ..., n, n]
    (n >= 4) -> [R, R, ...]:

    HSIC_1(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)),
    K~ = K with its diagonal set to zero."""
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 examples per minibatch, got {n}")
    K = K.to(torch.float64) * (1 - torch.eye(n, dtype=torch.float64, device=K.device))
    rows = K.sum(-1)                                                  # [R, ..., n] = K~ 1
    total = rows.sum(-1)                                              # [R, ...]   = 1'K~1
    trace = torch.einsum("a...ij,b...ij->ab...", K, K)                # tr(K~ L~), K~ symmetric
    cross = torch.einsum("a...i,b...i->ab...", rows, rows)            # 1'K~ L~1
    return (trace + total[:, None] * total[None, :] / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates unbiased HSIC_1 over minibatches for every pair of runs:
    CKA_ab = sum_i HSIC_1(K_ai, K_bi) / sqrt(sum_i HSIC_1(K_ai, K_ai) sum_i HSIC_1(K_bi, K_bi))."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.batches = 0

    def update(self, features: torch.Tensor) -> None:
        """features [R, ..., n, d]: the same n examples (tokens) seen by each of R models."""
        self.update_grams(gram(features, centre=False))

    def update_grams(self, K: torch.Tensor) -> None:
        """K [R, ..., n, n]: uncentred Gram matrices X X^T of one minibatch, one per model."""
        h = pairwise_unbiased_hsic(K)
        self.sums = h if self.sums is None else self.sums + h
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """[R, R, ...] CKA estimates."""
        if self.sums is None:
            raise ValueError("MinibatchCKA.compute() before any update()")
        d = torch.diagonal(self.sums, dim1=0, dim2=1).movedim(-1, 0).sqrt()
        return self.sums / (d[:, None] * d[None, :])


def minibatch_cka(X_batches, Y_batches) -> torch.Tensor:
    """Unbiased minibatch linear CKA between two models' features, given as matching lists of
    minibatches X_i [..., n_i, d1], Y_i [..., n_i, d2]."""
    acc = MinibatchCKA()
    for X, Y in zip(X_batches, Y_batches, strict=True):
        acc.update_grams(torch.stack(torch.broadcast_tensors(gram(X, False), gram(Y, False))))
    return acc.compute()[0, 1]
