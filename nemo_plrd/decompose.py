"""Low-rank factorisation of one slot, dense or already factored, gather-free under TP.

Each function returns the pair minimising ||(W - up @ down) X||_F over calibration inputs
X, summarised by their second-moment statistics (docs/design.md, section 3):

- column slot, W = [W_1; ...; W_p] sharded on out, input covariance C = E[x x^T]:
  with S S^T = C, the top-r eigenvectors Q of S^T (sum_i W_i^T W_i) S give
  down = Q^T S^-1 (replicated) and up_i = W_i S Q (local rows); with a ridge or a target, S
  becomes K S^-T (docs/design.md).
- row slot, W = [W_1 ... W_p] sharded on in, output covariance C_y = E[y y^T]:
  its top-r eigenvectors P give up = P (replicated) and down_i = P^T W_i (local columns).

Plain truncated SVD (the paper's baseline) is the same optimum for X = I, so
``input_cov=None`` / ``output_cov=None`` selects it. Re-truncation (stage k -> k+1) works
on the factors and never forms W. The only communication is ``reduce``: a sum over the
ranks holding the other shards of the sharded factor (identity on one rank), applied to
square matrices of size in, out or r, never to a weight.

Target correction (column slots): when the inputs X the slot sees now differ from the
inputs X_t it saw in the model being decomposed (earlier layers are already factored), the
better objective is ||W X_t - up @ down X||_F. With the cross moment K = E[x_t x^T] its
optimum replaces W S by W K S^-T (``cross_cov``): the best rank-r truncation, in the
whitened space of X, of the least-squares map W K C^-1 from X to the target outputs.
It reduces to the plain objective when X_t = X.

Ridge: every input covariance is used as C + lam I, lam = ridge * mean(diag C), with the
cross moment K (= C without a target) left alone, so the objective gains lam ||up @ down||_F^2
and the least-squares map W K C^-1 becomes the ridge map W K (C + lam I)^-1: the usual cure
for a regression fitted on a few thousand tokens in a space of hundreds of dimensions. The
functions' default (1e-6) only guards singular statistics; ``nemo_plrd.transform.RIDGE`` is
the measured choice for calibrated slots (BENCHMARKS.md).

The top-r eigenvectors come from ``eigh`` (``solver="exact"``) or from randomized subspace
iteration on the same replicated matrix (``solver="randomized"``: a few GEMMs with an
n x (r + 16) block instead of a full eigendecomposition, seeded so that every TP rank gets
the same answer; faster at ranks well below n, BENCHMARKS.md).

All linear algebra runs in float64; factors come back in the weight's dtype, balanced so
that up's column j and down's row j have equal norms (a well-conditioned start for
continued training with Adam).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Tensor = torch.Tensor
Reduce = Callable[[Tensor], Tensor]


def no_reduce(t: Tensor) -> Tensor:
    """The reduce of an unsharded (TP=1) slot."""
    return t


SOLVERS = ("exact", "randomized")
GUARD_RIDGE = 1e-6  # the math functions' default ridge: enough to factor singular statistics
OVERSAMPLE, POWER_ITERATIONS = 16, 4


def _top_eigenvectors(sym: Tensor, rank: int, solver: str = "exact") -> tuple[Tensor, Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of the top-``rank`` eigenpairs of a PSD matrix."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    size = sym.shape[0]
    if solver == "randomized" and rank + OVERSAMPLE < size:
        # Subspace iteration (Halko et al. 2011, alg. 4.4) then Rayleigh-Ritz on the block.
        gen = torch.Generator(device=sym.device).manual_seed(0)
        block = torch.randn(size, rank + OVERSAMPLE, generator=gen, dtype=sym.dtype, device=sym.device)
        for _ in range(POWER_ITERATIONS):
            block = torch.linalg.qr(sym @ block).Q
        values, vectors = torch.linalg.eigh(block.T @ sym @ block)
        return values.flip(0)[:rank], block @ vectors.flip(1)[:, :rank]
    values, vectors = torch.linalg.eigh(sym)
    return values.flip(0)[:rank], vectors.flip(1)[:, :rank]


def _cholesky(cov: Tensor, ridge: float) -> Tensor:
    """Lower-triangular S with S S^T = C + lam * I, lam = ridge * mean(diag C) (or more).

    Statistics of few tokens are singular, and their fp32 accumulation can leave tiny
    negative eigenvalues; lam grows tenfold until the factorisation succeeds (a ridge of 0
    is tried as it is, then from ``GUARD_RIDGE`` on: none unless one is needed).
    """
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    scale = cov.diagonal().mean().clamp_min(1e-30)
    lams = [ridge * 10**attempt for attempt in range(6)] if ridge else [0.0] + [GUARD_RIDGE * 10**a for a in range(5)]
    for lam in lams:
        lower, info = torch.linalg.cholesky_ex(cov + lam * scale * eye)
        if info == 0:
            return lower
    raise ValueError(f"the {cov.shape[0]}x{cov.shape[0]} calibration statistic is not positive "
                     f"definite even with ridge {lams[-1]:g}: is it all zeros or not finite?")


def _check(rank: int, limit: int, what: str) -> None:
    if not 1 <= rank <= limit:
        raise ValueError(f"rank={rank} is outside [1, {limit}] ({what})")


def _balanced(up: Tensor, down: Tensor, up_reduce: Reduce, down_reduce: Reduce, dtype) -> tuple[Tensor, Tensor]:
    """Rescale so that ||up[:, j]|| == ||down[j, :]|| (the product is unchanged)."""
    up_norm = up_reduce(up.square().sum(0)).sqrt()
    down_norm = down_reduce(down.square().sum(1)).sqrt()
    scale = (down_norm / up_norm.clamp_min(1e-30)).sqrt().clamp_min(1e-30)  # no energy: left at zero, not NaN
    return (up * scale).to(dtype).contiguous(), (down / scale[:, None]).to(dtype).contiguous()


def _whitening(input_cov: Optional[Tensor], cross_cov: Optional[Tensor], ridge: float):
    """(S with S S^T = C + lam I, or None; T = K S^-T, the right factor that whitens W; K = C without a target)."""
    if input_cov is None:
        return None, None
    s = _cholesky(input_cov.double(), ridge)
    cross = input_cov if cross_cov is None else cross_cov
    return s, torch.linalg.solve_triangular(s, cross.double().T, upper=False).T


def _column_gram(w: Tensor, input_cov: Optional[Tensor], cross_cov: Optional[Tensor], reduce: Reduce,
                 ridge: float):
    """(W T, S or None, G = sum_i (W_i T)^T (W_i T)): the in x in Gram is the one all-reduce."""
    s, t = _whitening(input_cov, cross_cov, ridge)
    whitened = w if t is None else w @ t
    return whitened, s, reduce(whitened.T @ whitened)


def _row_cov(w: Tensor, output_cov: Optional[Tensor], reduce: Reduce) -> Tensor:
    """out x out: the calibrated output covariance, or W W^T (plain SVD) summed over in-shards."""
    return reduce(w @ w.T) if output_cov is None else output_cov.double()


def column_factors(
    weight: Tensor,
    rank: int,
    input_cov: Optional[Tensor] = None,
    reduce: Reduce = no_reduce,
    ridge: float = GUARD_RIDGE,
    cross_cov: Optional[Tensor] = None,
    solver: str = "exact",
) -> tuple[Tensor, Tensor]:
    """Factor a column-parallel slot: weight = this rank's rows W_i (out_i x in).

    Returns (up_i: out_i x r, down: r x in); ``reduce`` sums over the out-shards.
    ``cross_cov`` = E[x_t x^T] against target inputs x_t (needs ``input_cov``).
    """
    w = weight.double()
    _check(rank, w.shape[1], f"input size of a {tuple(w.shape)} column shard")
    whitened, s, gram = _column_gram(w, input_cov, cross_cov, reduce, ridge)  # W_i T, S, in x in
    _, q = _top_eigenvectors(gram, rank, solver)  # in x r
    down = q.T if s is None else torch.linalg.solve_triangular(s.T, q, upper=True).T  # Q^T S^-1
    return _balanced(whitened @ q, down, reduce, no_reduce, weight.dtype)


def row_factors(
    weight: Tensor,
    rank: int,
    output_cov: Optional[Tensor] = None,
    reduce: Reduce = no_reduce,
    solver: str = "exact",
) -> tuple[Tensor, Tensor]:
    """Factor a row-parallel slot: weight = this rank's columns W_i (out x in_i).

    Returns (up: out x r, down_i: r x in_i); ``reduce`` sums over the in-shards.
    ``output_cov`` is E[y y^T] of the full (reduced) output y = W x.
    """
    w = weight.double()
    _check(rank, w.shape[0], f"output size of a {tuple(w.shape)} row shard")
    _, p = _top_eigenvectors(_row_cov(w, output_cov, reduce), rank, solver)  # out x r
    return _balanced(p, p.T @ w, no_reduce, reduce, weight.dtype)


def column_retruncate(
    up: Tensor,
    down: Tensor,
    rank: int,
    input_cov: Optional[Tensor] = None,
    reduce: Reduce = no_reduce,
    ridge: float = GUARD_RIDGE,
    cross_cov: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Column slot (up sharded on out, down replicated) from rank r to ``rank`` < r.

    With R^T R = sum_i up_i^T up_i (so up R^-1 has orthonormal columns), B = R down T
    (T = S, or K S^-T) and P the top eigenvectors of the r x r Gram B B^T:
    up_i' = up_i R^-1 P, down' = P^T B S^-1. Cost O((out + in) r^2 + r^3 + in^2 r), with
    no SVD of anything larger than r x r: the eigendecomposition of B B^T replaces the SVD
    of B, several times slower at r = 1024.
    """
    u, v = up.double(), down.double()
    _check(rank, v.shape[0], "the current rank")
    # R, r x r upper-triangular, one all-reduce; the tiny ridge only guards a singular up (an exact QR).
    r_upper = _cholesky(reduce(u.T @ u), 1e-12).T
    s, t = _whitening(input_cov, cross_cov, ridge)
    whitened = v if t is None else v @ t  # V T: r x in
    # B = R V T (r x in) is never formed: B B^T = R (V T)(V T)^T R^T and P^T B = (R^T P)^T V T.
    _, p = _top_eigenvectors(r_upper @ (whitened @ whitened.T) @ r_upper.T, rank)  # r x rank
    new_down = (r_upper.T @ p).T @ whitened
    if s is not None:
        new_down = torch.linalg.solve_triangular(s.T, new_down.T, upper=True).T  # P^T B S^-1
    # up R^-1 P has orthonormal columns, so balancing needs only down's row norms and folds
    # into the r x rank matrix: one GEMM of out x r x rank, in the factors' dtype, no all-reduce.
    scale = new_down.norm(dim=1).sqrt().clamp_min(1e-30)  # a direction with no energy: left at zero, not NaN
    new_up = up @ (torch.linalg.solve_triangular(r_upper, p, upper=True) * scale).to(up.dtype)
    return new_up.contiguous(), (new_down / scale[:, None]).to(up.dtype).contiguous()


def row_retruncate(
    up: Tensor,
    down: Tensor,
    rank: int,
    latent_cov: Optional[Tensor] = None,
    reduce: Reduce = no_reduce,
) -> tuple[Tensor, Tensor]:
    """Row slot (up replicated, down sharded on in) from rank r to ``rank`` < r.

    ``latent_cov`` is E[z z^T] of the reduced latent z = down x (r x r); with up = Q R
    and E the top eigenvectors of R C_z R^T: up' = Q E_r, down_i' = E_r^T R down_i.
    """
    u, v = up.double(), down.double()
    _check(rank, min(v.shape[0], u.shape[0]), "the current rank, and the output size")
    cov = reduce(v @ v.T) if latent_cov is None else latent_cov.double()  # r x r
    q, r_upper = torch.linalg.qr(u)
    _, e = _top_eigenvectors(r_upper @ cov @ r_upper.T, rank)
    return _balanced(q @ e, e.T @ r_upper @ v, no_reduce, reduce, up.dtype)


def column_spectrum(weight: Tensor, input_cov: Optional[Tensor] = None, reduce: Reduce = no_reduce,
                    ridge: float = GUARD_RIDGE) -> Tensor:
    """Descending eigenvalues of sum_i (W_i S)^T (W_i S): rank r keeps the top r of ||W X||^2.

    ``weight`` is this rank's rows (for a factored slot: up_i @ down). What rank planning
    spreads the budget by; the same all-reduce as ``column_factors``.
    """
    return torch.linalg.eigvalsh(_column_gram(weight.double(), input_cov, None, reduce, ridge)[2]).flip(0)


def row_spectrum(weight: Tensor, output_cov: Optional[Tensor] = None, reduce: Reduce = no_reduce) -> Tensor:
    """Descending eigenvalues of the output covariance (plain SVD: of W W^T), as ``row_factors`` uses."""
    return torch.linalg.eigvalsh(_row_cov(weight.double(), output_cov, reduce)).flip(0)
