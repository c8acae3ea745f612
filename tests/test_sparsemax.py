"""sparsemax.py against independent references: the `entmax` package (forward and backward), two numpy
projections onto the simplex written here (bisection on the threshold, enumeration of supports), and
torch.autograd.gradcheck. Never against our own output."""
import itertools

import entmax
import numpy as np
import pytest
import torch

from humelib.sparsemax import sparsemax


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bisection_projection(z):
    """Euclidean projection of a 1-D float64 vector onto the simplex: the threshold tau with
    sum(max(z - tau, 0)) = 1 lies in [max z - 1, max z]; halve the bracket until it stops moving."""
    z = np.asarray(z, dtype=np.float64)
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if np.maximum(z - mid, 0.0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - 0.5 * (lo + hi), 0.0)


def support_enumeration_projection(z):
    """The same projection by solving the QP min ||p - z||^2 over the simplex exactly: for every nonempty
    support S the stationary point is p_S = z_S - (sum z_S - 1)/|S|, p elsewhere 0; keep the feasible one
    (p >= 0) closest to z. Exponential in k, so only for small k."""
    z = np.asarray(z, dtype=np.float64)
    k = len(z)
    best, best_dist = None, np.inf
    for size in range(1, k + 1):
        for S in itertools.combinations(range(k), size):
            S = list(S)
            p = np.zeros(k)
            p[S] = z[S] - (z[S].sum() - 1.0) / size
            if np.all(p >= -1e-12):
                dist = np.sum((p - z) ** 2)
                if dist < best_dist - 1e-12:
                    best, best_dist = np.maximum(p, 0.0), dist
    return best


def rows(x):
    return x.reshape(-1, x.shape[-1])


SHAPES = [(1, 2), (1, 3), (1, 10), (1, 1000), (7, 2), (7, 3), (16, 10), (5, 1000), (3, 4, 10), (2, 3, 5, 3)]


def make_input(shape, dtype, seed, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale + shift).to(dtype)


# ---------------------------------------------------------------- vs entmax

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_sparsemax_matches_entmax_forward_and_backward(shape, dtype, scale):
    seed = 1000 * len(shape) + 10 * shape[-1] + int(scale * 10)
    z = make_input(shape, dtype, seed, scale=scale)
    g = make_input(shape, dtype, seed + 1)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)

    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    p1 = sparsemax(z1)
    p2 = entmax.sparsemax(z2, dim=-1)
    assert p1.shape == z.shape and p1.dtype == dtype
    torch.testing.assert_close(p1, p2, **tol)
    (p1 * g).sum().backward()
    (p2 * g).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("z", [
    [[1.0, 1.0]],                                   # k = 2, full tie
    [[0.5, 0.5, 0.5]],                              # all equal -> uniform
    [[2.0, 2.0, 0.0]],                              # tie on the support, third exactly off it
    [[1.0, 0.0]],                                   # second entry exactly on the threshold
    [[0.3, 0.3, 0.3, -5.0, -5.0]],                  # tie on the support, tie off it
    [[3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],  # dominant entry with tied losers; all-zero row
    [[7.0] * 10],
])
def test_sparsemax_matches_entmax_with_ties(z, dtype):
    z = torch.tensor(z, dtype=dtype)
    g = torch.arange(z.numel(), dtype=dtype).reshape(z.shape).sin()
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    p1, p2 = sparsemax(z1), entmax.sparsemax(z2, dim=-1)
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    (p1 * g).sum().backward()
    (p2 * g).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [3, 10, 1000])
@pytest.mark.parametrize("shift", [1e2, -1e3, 1e4])
def test_sparsemax_matches_entmax_on_shifted_inputs(k, shift, dtype):
    # The same (already rounded) input goes to both: the reference subtracts the row max first, so a
    # common offset costs it no precision; an implementation that sorts and cumsums the raw values loses
    # ~ulp(k * shift) in the threshold.
    z = make_input((4, k), dtype, k, scale=3.0, shift=shift)
    g = make_input((4, k), dtype, k + 1)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    p1, p2 = sparsemax(z1), entmax.sparsemax(z2, dim=-1)
    torch.testing.assert_close(p1, p2, **tol)
    (p1 * g).sum().backward()
    (p2 * g).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, **tol)


def test_sparsemax_matches_entmax_on_non_contiguous_input():
    z = make_input((10, 6), torch.float64, 3).t()  # (6, 10), last dim strided
    assert not z.is_contiguous()
    torch.testing.assert_close(sparsemax(z), entmax.sparsemax(z, dim=-1), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- vs numpy projections

@pytest.mark.parametrize("shape", [(1, 2), (1, 3), (6, 5), (2, 3, 6)])
@pytest.mark.parametrize("scale", [0.2, 1.0, 5.0])
def test_sparsemax_forward_equals_qp_solution_by_support_enumeration(shape, scale):
    z = make_input(shape, torch.float64, 11 + len(shape), scale=scale)
    p = rows(sparsemax(z)).numpy()
    for zi, pi in zip(rows(z).numpy(), p):
        np.testing.assert_allclose(pi, support_enumeration_projection(zi), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2), (1, 1000), (8, 3), (8, 10), (3, 2, 1000)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 20.0])
def test_sparsemax_forward_equals_simplex_projection_by_threshold_bisection(shape, scale):
    z = make_input(shape, torch.float64, 5 + shape[-1], scale=scale)
    p = rows(sparsemax(z)).numpy()
    for zi, pi in zip(rows(z).numpy(), p):
        np.testing.assert_allclose(pi, bisection_projection(zi), rtol=0, atol=1e-10)


def test_sparsemax_float32_forward_equals_float64_projection_of_the_same_values():
    z = make_input((20, 10), torch.float32, 42, scale=2.0)
    p = rows(sparsemax(z)).double().numpy()
    for zi, pi in zip(rows(z).double().numpy(), p):
        np.testing.assert_allclose(pi, bisection_projection(zi), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparsemax_rows_are_on_the_simplex(shape, dtype):
    p = sparsemax(make_input(shape, dtype, 9, scale=2.0))
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(shape[:-1], dtype=dtype),
                               rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_sparsemax_gives_exact_zeros_where_the_projection_does():
    z = make_input((50, 10), torch.float64, 2, scale=3.0)
    p = sparsemax(z)
    ref = np.stack([bisection_projection(zi) for zi in z.numpy()])
    zeros = p.numpy() == 0.0
    assert zeros.any(axis=1).all()  # at this scale every row is sparse
    np.testing.assert_array_equal(zeros, ref == 0.0)
    # a clearly dominant entry takes all the mass, the rest are exactly 0 (not tiny)
    p = sparsemax(torch.tensor([[5.0, 0.0, -1.0, 3.5]], dtype=torch.float64))
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("shape", [(1, 2), (1, 7), (5, 3), (4, 10), (2, 3, 10)])
def test_sparsemax_passes_gradcheck_away_from_ties(shape):
    for seed in range(100):
        z = make_input(shape, torch.float64, seed, scale=1.5)
        p = rows(sparsemax(z)).numpy()
        zr = rows(z).numpy()
        # distance of every entry from its row's threshold tau (p = z - tau on the support)
        tau = np.array([(zi[pi > 0] - pi[pi > 0]).mean() for zi, pi in zip(zr, p)])
        if np.abs(zr - tau[:, None]).min() > 1e-2 and np.all(np.diff(np.sort(zr), axis=1) > 1e-3):
            break
    else:
        pytest.fail("no input away from ties found")
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(sparsemax, (z,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_sparsemax_passes_gradcheck_with_full_and_single_support():
    full = torch.tensor([[0.10, 0.00, -0.15, 0.05]], dtype=torch.float64, requires_grad=True)
    single = torch.tensor([[3.0, 0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    assert (sparsemax(full) > 0).all()
    assert (sparsemax(single) > 0).sum() == 1
    for z in (full, single):
        assert torch.autograd.gradcheck(sparsemax, (z,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("c", [-3.0, 0.5, 17.0, 1e3])
def test_sparsemax_is_invariant_to_adding_a_constant(c):
    z = make_input((6, 4, 10), torch.float64, 8, scale=2.0)
    torch.testing.assert_close(sparsemax(z + c), sparsemax(z), rtol=0, atol=1e-11)
    # a different constant per row
    cs = make_input((6, 4, 1), torch.float64, 10, scale=100.0)
    torch.testing.assert_close(sparsemax(z + cs), sparsemax(z), rtol=0, atol=1e-11)


def test_sparsemax_float32_is_invariant_to_a_large_exactly_representable_shift():
    # values on a 2^-8 grid; adding 4096 keeps them exact in float32, so the true outputs are identical
    z = torch.round(make_input((8, 10), torch.float64, 4, scale=2.0) * 256) / 256
    z32 = z.float()
    shifted = z32 + 4096.0
    assert torch.equal((shifted - 4096.0), z32)  # the shift itself lost nothing
    torch.testing.assert_close(sparsemax(shifted), sparsemax(z32), rtol=0, atol=1e-5)
