"""Each decomposition reaches the optimum of its objective (fp64, random data, TP=1)."""

import pytest
import torch

from nemo_plrd.decompose import (GUARD_RIDGE, column_factors, column_retruncate, column_spectrum, row_factors,
                                 row_retruncate, row_spectrum)

M, N, TOKENS = 48, 40, 400
RTOL = 1e-9  # fp64 throughout: the optimum is reached to round-off


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(M, N, generator=gen, dtype=torch.float64)
    mixing = torch.randn(N, N, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, N, dtype=torch.float64)
    x = mixing @ torch.randn(N, TOKENS, generator=gen, dtype=torch.float64)  # anisotropic inputs
    return weight, x @ x.T / TOKENS


def activation_error(weight, approx, cov):
    """||(W - M) X||^2 / tokens = tr((W - M) C (W - M)^T)."""
    diff = weight - approx
    return torch.trace(diff @ cov @ diff.T).item()


def activation_optimum(weight, cov, rank):
    """The best rank-r error: the sum of the discarded eigenvalues of W C W^T."""
    return torch.linalg.eigvalsh(weight @ cov @ weight.T).flip(0)[rank:].sum().item()


def svd_optimum(weight, rank):
    return torch.linalg.svdvals(weight)[rank:].square().sum().item()


def test_statistics_of_fewer_tokens_than_inputs_factor_with_no_ridge_asked_for(data):
    """Singular (10 tokens in 40 inputs): with ridge 0 the smallest guard that factors them is added, as for
    any ridge; before, a ridge of 0 grew to 0 and the stage failed."""
    weight, _ = data
    x = torch.randn(N, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    singular = x @ x.T / 10
    singular[0, 0] -= 1e-9 * singular.diagonal().mean()  # a round-off below zero on a dead direction
    up, down = column_factors(weight, 8, input_cov=singular, ridge=0.0)
    guarded = column_factors(weight, 8, input_cov=singular, ridge=GUARD_RIDGE)
    assert torch.equal(up, guarded[0]) and torch.equal(down, guarded[1])


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_column_and_row_activation_factors_reach_the_optimum(data, rank):
    weight, cov = data
    best = activation_optimum(weight, cov, rank)
    up, down = column_factors(weight, rank, input_cov=cov, ridge=0.0)
    assert up.shape == (M, rank) and down.shape == (rank, N)
    assert activation_error(weight, up @ down, cov) == pytest.approx(best, rel=RTOL)
    up, down = row_factors(weight, rank, output_cov=weight @ cov @ weight.T)
    assert activation_error(weight, up @ down, cov) == pytest.approx(best, rel=RTOL)


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_plain_svd_reaches_eckart_young(data, rank):
    weight, cov = data
    best = svd_optimum(weight, rank)
    for up, down in (column_factors(weight, rank), row_factors(weight, rank)):
        assert (weight - up @ down).square().sum().item() == pytest.approx(best, rel=RTOL)
    # ... and is worse than the activation-aware factors on the activation objective.
    up, down = column_factors(weight, rank)
    assert activation_error(weight, up @ down, cov) > activation_optimum(weight, cov, rank) * 1.01


@pytest.mark.parametrize("method", ["activation", "svd"])
def test_retruncation_equals_decomposing_the_product(data, method):
    weight, cov = data
    up, down = column_factors(weight, 24, input_cov=cov, ridge=0.0)
    product = up @ down
    stats = cov if method == "activation" else None
    # Column: same input statistics for the dense product and the factors.
    new_up, new_down = column_retruncate(up, down, 9, input_cov=stats, ridge=0.0)
    ref_up, ref_down = column_factors(product, 9, input_cov=stats, ridge=0.0)
    torch.testing.assert_close(new_up @ new_down, ref_up @ ref_down, rtol=1e-8, atol=1e-10)
    # Row: latent statistics C_z = V C V^T give the output statistics U C_z U^T.
    latent = None if stats is None else down @ cov @ down.T
    output = None if stats is None else product @ cov @ product.T
    new_up, new_down = row_retruncate(up, down, 9, latent_cov=latent)
    ref_up, ref_down = row_factors(product, 9, output_cov=output)
    torch.testing.assert_close(new_up @ new_down, ref_up @ ref_down, rtol=1e-8, atol=1e-10)


@pytest.fixture
def target_pairs(data):
    """Inputs x a slot sees now and the inputs x_t it saw in the target model (x plus a drift)."""
    weight, _ = data
    gen = torch.Generator().manual_seed(1)
    mixing = torch.randn(N, N, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, N, dtype=torch.float64)
    x = mixing @ torch.randn(N, TOKENS, generator=gen, dtype=torch.float64)
    x_t = x + 0.3 * torch.randn(N, N, generator=gen, dtype=torch.float64) @ x / N**0.5
    return weight, x, x_t


@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("rank", [1, 7, 20])
def test_column_target_correction_reaches_the_optimum_of_the_ridge_objective(target_pairs, rank, ridge):
    """min over rank-r M of ||W X_t - M X||^2 + lam ||M||^2, lam = ridge * mean(diag C) * tokens.

    That is plain least squares on inputs augmented with sqrt(lam) I and targets with zeros,
    so its optimum is ||Y||^2 minus the top-r eigenvalues of M* X X^T M*^T (M* its full solution).
    """
    weight, x, x_t = target_pairs
    cov, cross = x @ x.T / TOKENS, x_t @ x.T / TOKENS
    lam = ridge * cov.diagonal().mean() * TOKENS
    x_aug = torch.cat([x, lam.sqrt() * torch.eye(N, dtype=x.dtype)], dim=1)  # N x (tokens + N)
    y_aug = torch.cat([weight @ x_t, torch.zeros(M, N, dtype=x.dtype)], dim=1)
    best_full = torch.linalg.lstsq(x_aug.T, y_aug.T).solution.T
    kept = torch.linalg.eigvalsh(best_full @ x_aug @ x_aug.T @ best_full.T).flip(0)[:rank].sum().item()
    optimum = y_aug.square().sum().item() - kept

    def error(up, down):
        return (y_aug - up @ down @ x_aug).square().sum().item()

    corrected = column_factors(weight, rank, input_cov=cov, cross_cov=cross, ridge=ridge)
    assert error(*corrected) == pytest.approx(optimum, rel=1e-8)
    assert error(*corrected) < error(*column_factors(weight, rank, input_cov=cov, ridge=ridge))


def test_target_corrected_column_retruncation_equals_decomposing_the_product(target_pairs):
    weight, x, x_t = target_pairs
    cov, cross = x @ x.T / TOKENS, x_t @ x.T / TOKENS
    up, down = column_factors(weight, 24)
    new_up, new_down = column_retruncate(up, down, 9, input_cov=cov, cross_cov=cross, ridge=0.0)
    ref_up, ref_down = column_factors(up @ down, 9, input_cov=cov, cross_cov=cross, ridge=0.0)
    torch.testing.assert_close(new_up @ new_down, ref_up @ ref_down, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("retruncate", [column_retruncate, row_retruncate])
def test_retruncation_keeps_directions_without_energy_finite(data, retruncate):
    """A product of rank 3 re-truncated to 6: the three empty directions come back as zeros, not NaN."""
    weight, cov = data
    up, down = column_factors(weight, 3, input_cov=cov, ridge=0.0)
    padded_up, padded_down = torch.cat([up, torch.zeros(M, 5, dtype=up.dtype)], 1), \
        torch.cat([down, torch.zeros(5, N, dtype=down.dtype)], 0)
    whitened = dict(input_cov=cov, ridge=0.0) if retruncate is column_retruncate else {}
    new_up, new_down = retruncate(padded_up, padded_down, 6, **whitened)
    assert new_up.isfinite().all() and new_down.isfinite().all()
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-8, atol=1e-10)


def test_factoring_past_a_weight_s_own_rank_leaves_the_empty_directions_at_zero(data):
    """A weight with three non-zero rows factored at rank 6, column and row: the product is the weight, and
    the three directions with no energy at all (exactly: outputs the weight never writes) are zeros, not NaN."""
    weight, cov = data
    low = torch.cat([weight[:3], torch.zeros(M - 3, N, dtype=weight.dtype)])
    for up, down in (column_factors(low, 6, input_cov=cov, ridge=0.0), row_factors(low, 6)):
        assert up.isfinite().all() and down.isfinite().all()
        torch.testing.assert_close(up @ down, low, rtol=1e-8, atol=1e-8)
        assert (up.norm(dim=0) * down.norm(dim=1)).sort().values[:3].max() < 1e-8


def test_a_rank_the_factors_cannot_give_is_refused():
    """A row slot's pair wider than its output (r > out) re-truncates to at most out directions: asking for
    more is refused rather than answered with fewer."""
    up, down = torch.randn(16, 24, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rank=20 is outside \[1, 16\] \(the current rank, and the output size\)"):
        row_retruncate(up, down, 20)


def test_spectra_give_the_error_of_every_rank(data):
    """What planning assumes: the error at rank r is the tail of the slot's spectrum beyond r."""
    weight, cov = data
    column = column_spectrum(weight, input_cov=cov, ridge=0.0)
    row = row_spectrum(weight, output_cov=weight @ cov @ weight.T)
    plain = column_spectrum(weight)
    for rank in (1, 7, 20):
        best = activation_optimum(weight, cov, rank)
        assert column[rank:].sum().item() == pytest.approx(best, rel=RTOL)
        assert row[rank:].sum().item() == pytest.approx(best, rel=RTOL)
        assert plain[rank:].sum().item() == pytest.approx(svd_optimum(weight, rank), rel=RTOL)


@pytest.mark.parametrize("rank", [4, 16])
def test_randomized_solver_is_within_a_fraction_of_a_percent_of_the_optimum(rank):
    gen = torch.Generator().manual_seed(2)
    decay = torch.logspace(0, -3, 160, dtype=torch.float64)  # a weight-like decaying spectrum
    weight = torch.randn(200, 160, generator=gen, dtype=torch.float64) * decay
    x = torch.randn(160, 800, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, 160, dtype=torch.float64)[:, None]
    cov = x @ x.T / 800
    best = activation_optimum(weight, cov, rank)
    for factors in (column_factors(weight, rank, input_cov=cov, solver="randomized"),
                    row_factors(weight, rank, output_cov=weight @ cov @ weight.T, solver="randomized")):
        error = activation_error(weight, factors[0] @ factors[1], cov)
        assert best <= error <= best * 1.003
    with pytest.raises(ValueError, match="solver='lanczos' is not one of"):
        column_factors(weight, rank, solver="lanczos")


def test_factors_are_balanced_and_keep_the_weight_dtype(data):
    weight, cov = data
    up, down = column_factors(weight.float(), 8, input_cov=cov.float())
    for up, down in ((up, down), column_retruncate(up, down, 5, input_cov=cov.float()),
                     row_factors(weight.float(), 8), row_retruncate(up, down, 5)):
        assert up.dtype == down.dtype == torch.float32
        torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-5, atol=0)


def test_out_of_range_ranks_are_refused(data):
    weight, _ = data
    with pytest.raises(ValueError, match=r"rank=0 is outside \[1, 40\]"):
        column_factors(weight, 0)
    with pytest.raises(ValueError, match=r"rank=49 is outside \[1, 48\]"):
        row_factors(weight, 49)
    up, down = row_factors(weight, 8)
    with pytest.raises(ValueError, match=r"rank=9 is outside \[1, 8\] \(the current rank"):
        row_retruncate(up, down, 9)
