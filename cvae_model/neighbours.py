"""Neighbour-preserving term: KL(P || Q) between batch affinities of the input and of the embedding.

Parametric t-SNE (van der Maaten 2009, "Learning a parametric embedding by preserving local
structure", AISTATS) trains a network on this loss; scvis (Ding, Condon & Shah 2018, Nature
Communications 9:2002) adds it to a VAE objective. Everything is computed inside one batch of
``n`` rows. Pure functions of tensors: the training loop owns the weighting.

Input side, a constant target (no gradient), searched in float64:

* ``d_ij = ||x_i - x_j||^2``;
* ``p_{j|i} = exp(-beta_i d_ij) / sum_{k != i} exp(-beta_i d_ik)``, ``p_{i|i} = 0``, each
  ``beta_i`` set so that the row entropy ``-sum_j p_{j|i} log p_{j|i}`` is ``log(perplexity)``
  (natural log, as scikit-learn's t-SNE) within ``tol`` nats, by a vectorized safeguarded
  Newton search on ``log beta`` (see ``conditional_affinities``);
* ``p_ij = (p_{j|i} + p_{i|j}) / (2n)``: symmetric, zero diagonal, sums to 1.

Small batches follow openTSNE (``MultiscaleMixture``; ``PerplexityBasedNN`` before 0.5.2): the
perplexity used is ``min(perplexity, (n - 1) / 3)``, floored at 1 (entropy 0, the least there
is). scikit-learn raises unless ``perplexity < n``, which a training loop cannot afford on a
short last batch. A row whose target entropy is at most ``log(m_i)``, ``m_i`` the number of its nearest
neighbours at one same distance (duplicates), gets the ``beta -> inf`` limit: uniform over them.

Embedding side, Student t with ``dof`` degrees of freedom, differentiable in ``z``:

* ``w_ij = (1 + ||z_i - z_j||^2 / dof)^(-(dof + 1) / 2)``, ``q_ij = w_ij / sum_{k != l} w_kl``;
* ``KL(P || Q) = sum_{i != j} p_ij log(p_ij / q_ij)
  = sum p log p - sum p_ij log w_ij + (sum p) logsumexp_{k != l}(log w_kl)``, ``0 log 0 = 0``.

``dof = 1`` is t-SNE's Cauchy kernel; parametric t-SNE and scvis use ``dof = k - 1`` for a
k-dimensional embedding, which is 1 in 2-D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["conditional_affinities", "effective_perplexity", "joint_affinities", "neighbour_kl",
           "squared_distances", "student_t_affinities"]


def effective_perplexity(perplexity: float, n: int) -> float:
    """``max(1, min(perplexity, (n - 1) / 3))`` for ``n >= 2`` (openTSNE's rule, floored at 1)."""
    if not perplexity > 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    return max(1.0, min(float(perplexity), (n - 1) / 3.0))


def squared_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances of the rows of ``x`` (n, d): (n, n), zero diagonal, >= 0.

    One matmul on the batch-centred rows (centring shrinks the cancellation of the
    ``|a|^2 + |b|^2 - 2 a.b`` form); differences below that form's rounding error are snapped
    to exactly 0, so duplicate rows get distance 0. Same dtype and device as ``x``.
    """
    xc = x - x.mean(dim=0, keepdim=True)
    sq = xc.pow(2).sum(dim=1)
    bound = sq[:, None] + sq[None, :]
    d = torch.addmm(bound, xc, xc.T, alpha=-2.0).clamp_min_(0.0)
    d.masked_fill_(d <= bound.mul_(64.0 * torch.finfo(x.dtype).eps), 0.0)
    return d.fill_diagonal_(0.0)


@torch.no_grad()
def conditional_affinities(x: Tensor, perplexity: float, *, tol: float = 1e-5,
                           max_iter: int = 100) -> Tensor:
    """Rows ``p_{j|i}`` (n, n) of Gaussian kernels calibrated to ``perplexity``, for ``x`` (n, d).

    Rows sum to 1, the diagonal is 0, and each row's entropy is
    ``log(effective_perplexity(perplexity, n))`` within ``tol`` nats, saturated rows (module
    docstring) aside. ``x``'s float dtype (float32 for integer or half ``x``) and device, no
    gradient; ``n == 1`` gives a (1, 1) zero, ``n == 2`` gives ``[[0, 1], [1, 0]]``.

    All rows are searched at once in float64, at most ``max_iter`` steps: Newton steps in
    ``t = log beta`` on ``F = log(H - H_min) - log(H_max - H)`` (``H_min = log m_i``,
    ``H_max = log(n - 1)``), which is far more linear in ``t`` than ``H`` is where plain Newton
    overshoots, clipped to 3 and replaced by bisection once a step leaves the bracket. Rows
    that have converged leave the working set. Distances are shifted per row so that the
    nearest neighbour sits at 0: the normalizer is >= 1 and never underflows.
    """
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))  # ints and halves: float32
    n = x.shape[0]
    if n < 2:
        return x.new_zeros((n, n))
    target = math.log(effective_perplexity(perplexity, n))
    scale = x.abs().amax().clamp_min(torch.finfo(x.dtype).tiny)  # P is scale-free; d is not
    d = squared_distances(x / scale).to(torch.float64)
    d.fill_diagonal_(math.inf)
    d -= d.min(dim=1, keepdim=True).values  # row-wise shift: the nearest neighbour sits at 0
    d.fill_diagonal_(0.0)
    ties = d == 0
    ties.fill_diagonal_(False)
    n_ties = ties.sum(dim=1)
    h_min = torch.log(n_ties.to(torch.float64))
    saturated = h_min >= target - tol  # the beta -> inf limit: uniform over the m_i ties
    p = torch.zeros_like(d)
    if bool(saturated.any()):
        p[saturated] = ties[saturated] / n_ties[saturated, None].to(torch.float64)
    rows = torch.nonzero(~saturated).squeeze(1)  # the working set
    if rows.numel() == 0:
        return p.to(x.dtype)
    dd, h_lo = (d, h_min) if rows.numel() == n else (d[rows], h_min[rows])
    h_max = math.log(n - 1)
    f_target = torch.log(target - h_lo) - math.log(h_max - target)
    t = torch.log(  # start where beta * (mean shifted distance) = log(n - 1) - target
        (h_max - target) / (dd.sum(dim=1) / (n - 1)).clamp_min(1e-300))
    lo, hi = torch.full_like(t, -math.inf), torch.full_like(t, math.inf)
    w_buf, pd_buf = torch.empty_like(dd), torch.empty_like(dd)  # fresh n x n allocations are slow
    for it in range(max_iter + 1):
        beta = t.clamp(max=700.0).exp()  # finite, so beta * 0 stays 0
        # exp's slow path starts below -708 (denormal results): e^-700 is as good as 0 here.
        w = torch.mul(dd, -beta[:, None], out=w_buf[: rows.numel()]).clamp_(min=-700.0).exp_()
        w.view(-1)[torch.arange(rows.numel(), device=d.device) * n + rows] = 0.0  # p_{i|i} = 0
        s = w.sum(dim=1)  # >= 1: the nearest neighbour has w = exp(0)
        w.div_(s[:, None])  # p_{j|i} at this beta
        pd = torch.mul(w, dd, out=pd_buf[: rows.numel()])
        m1 = pd.sum(dim=1)
        h = torch.log(s) + beta * m1
        done = ((h - target).abs() <= tol) | (it == max_iter)
        if bool(done.any()):
            p[rows[done]] = w[done]
            keep = ~done
            if not bool(keep.any()):
                break
            rows, dd, pd, h_lo, f_target, t, lo, hi, h, beta, m1 = (
                v[keep] for v in (rows, dd, pd, h_lo, f_target, t, lo, hi, h, beta, m1))
        var = (pd.mul_(dd).sum(dim=1) - m1 * m1).clamp_min(0.0)
        lo = torch.where(h > target, t, lo)  # entropy too high: beta must grow
        hi = torch.where(h < target, t, hi)
        a, b = (h - h_lo).clamp_min(1e-300), (h_max - h).clamp_min(1e-300)
        slope = (beta * beta * var * (1.0 / a + 1.0 / b)).clamp_min(1e-300)  # -dF/dt
        step = ((torch.log(a) - torch.log(b) - f_target) / slope).clamp(-3.0, 3.0)
        t = t + step
        t = torch.where((t <= lo) | (t >= hi), 0.5 * (lo + hi), t)  # only once bracketed
    return p.to(x.dtype)


def joint_affinities(x: Tensor, perplexity: float, *, tol: float = 1e-5,
                     max_iter: int = 100) -> Tensor:
    """``P = (P_cond + P_cond^T) / (2n)`` (n, n) for ``x`` (n, d): symmetric, zero diagonal,
    sums to 1 (an all-zero (1, 1) for ``n == 1``); no gradient; dtype as above."""
    p = conditional_affinities(x, perplexity, tol=tol, max_iter=max_iter)
    return (p + p.T) / (2 * max(x.shape[0], 1))


def _offdiag(a: Tensor) -> Tensor:
    """The n(n-1) off-diagonal entries of a square (n, n) ``a`` as an (n-1, n+1) view, no copy."""
    n = a.shape[0]
    return a.flatten()[1:].view(n - 1, n + 1)[:, :-1]


def _log_kernel(z: Tensor, dof: float) -> Tensor:
    """``log w_ij = -(dof + 1)/2 * log1p(||z_i - z_j||^2 / dof)`` (n, n) for ``z`` (n, k).

    Coordinate differences for k <= 8 (exact for close points; a 2-D embedding costs two n x n
    passes), the Gram form on centred rows beyond. Only the off-diagonal entries are used.
    """
    if not dof > 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    if z.shape[1] <= 8:
        sq = sum((z[:, c, None] - z[None, :, c]).square() for c in range(z.shape[1]))
    else:
        zc = z - z.mean(dim=0, keepdim=True)
        r = zc.square().sum(dim=1)
        sq = torch.addmm(r[:, None] + r[None, :], zc, zc.T, alpha=-2.0).clamp_min(0.0)
    return torch.log1p(sq / dof) * (-(dof + 1.0) / 2.0)


def student_t_affinities(z: Tensor, dof: float = 1.0) -> Tensor:
    """``Q`` (n, n) of an embedding ``z`` (n, k): Student-t kernel normalized over all ordered
    pairs ``i != j``, zero diagonal, sums to 1 (zero (1, 1) for ``n == 1``); differentiable."""
    n = z.shape[0]
    if n < 2:
        return z.new_zeros((n, n)) + 0.0 * z.sum()
    log_w = _log_kernel(z, dof)
    q = torch.exp(log_w - torch.logsumexp(_offdiag(log_w), dim=(0, 1)))
    return q * (1.0 - torch.eye(n, dtype=z.dtype, device=z.device))


def neighbour_kl(p: Tensor, z: Tensor, dof: float = 1.0) -> Tensor:
    """Scalar ``KL(P || Q(z)) = sum_{i != j} p_ij log(p_ij / q_ij)``, differentiable in ``z``.

    ``p``: (n, n) target (e.g. ``joint_affinities`` of the batch), non-negative, normally summing
    to 1; its diagonal is ignored; it is cast to ``z``'s dtype and device and gets no gradient.
    ``z``: (n, k) embedding of the same rows in the same order. ``0 log 0 = 0``; the normalizer
    of Q is a log-sum-exp of ``log w``, so the value is finite in float32 and float64 for any
    finite ``z``. Zero (still attached to ``z``'s graph) for ``n < 2``.
    """
    n = z.shape[0]
    if p.shape != (n, n):
        raise ValueError(f"p must be ({n}, {n}) for z of {n} rows, got {tuple(p.shape)}")
    if n < 2:
        return 0.0 * z.sum()
    p_off = _offdiag(p.detach().to(dtype=z.dtype, device=z.device))
    log_w = _offdiag(_log_kernel(z, dof))
    with torch.no_grad():  # sum p log p, a constant; p + tiny makes 0 log 0 = 0 without a branch
        neg_entropy = (p_off * torch.log(p_off + torch.finfo(z.dtype).tiny)).sum()
    return neg_entropy - (p_off * log_w).sum() + p_off.sum() * torch.logsumexp(log_w, dim=(0, 1))
