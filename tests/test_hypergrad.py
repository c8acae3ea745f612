"""The hypergradient: adjoint vs finite differences (float64), vs the unrolled autograd reference, first order."""
import pytest
import torch

from humelib import hypergrad, inner_loop, outer, task_encoder
from humelib.embeddings import Rows


def problem(n=40, d1=6, d2=5, k=3, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    phi1 = torch.nn.functional.normalize(torch.randn(n, d1, generator=g, dtype=dtype), dim=1)
    phi2 = torch.randn(n, d2, generator=g, dtype=dtype) * scale
    phi2a = torch.cat([phi2, torch.ones(n, 1, dtype=dtype)], 1)
    torch.manual_seed(seed)
    encoder = task_encoder.make_task_encoder(d1, k).to(dtype)
    return phi1, phi2a, encoder, g


def settings(method="adjoint", inner_lr=0.1, steps=5, H_reg=1.0, first_order=False, bf16=False):
    return outer.Objective((inner_lr,), steps, H_reg, "first_order" if first_order else method, bf16)


def grad_of(encoder, phi1, phi2a, idx, m_tr, w0, tau, obj):
    """outer.hypergradient on one phi2 space: the loss and the gradient w.r.t. the encoder's parameters."""
    encoder.zero_grad(set_to_none=True)
    loss, _ = outer.hypergradient(encoder, Rows(phi1, "cpu"), [Rows(phi2a, "cpu")], outer.Batch(idx, m_tr, [w0]),
                                  tau, obj)
    return loss, torch.cat([p.grad.flatten() for p in encoder.parameters()])


def loss_at(encoder, theta, phi1, phi2a, idx, m_tr, w0, tau, args):
    """Outer loss with the encoder's parameter set to theta, no gradient (for finite differences)."""
    param = next(encoder.parameters())
    with torch.no_grad():
        saved = param.clone()
        param.copy_(theta.view_as(param))
        W = encoder.weight
        losses, _ = hypergrad.outer_losses(phi1, phi2a, W, tau, idx, m_tr, w0, args.inner_lrs[0], args.steps,
                                           args.H_reg, args.method)
        param.copy_(saved)
    return losses.mean().item()


def use_layout(monkeypatch, layout):
    """Make layout="auto" pick this layout whatever the sizes (the threshold is inner_loop.SHARED_RATIO)."""
    monkeypatch.setattr(inner_loop, "SHARED_RATIO", float("inf") if layout == "shared" else 0.0)


@pytest.mark.parametrize("layout", ["shared", "subset"])
@pytest.mark.parametrize("layout_n", [40, 200])  # 40: subsets cover most of the data; 200: they do not
def test_hypergradient_matches_finite_differences(layout_n, layout, monkeypatch):
    use_layout(monkeypatch, layout)
    phi1, phi2a, encoder, g = problem(n=layout_n)
    S, m, m_tr = 2, 30, 20
    idx = task_encoder.sample_subsets(g, layout_n, S, m)
    w0 = task_encoder.init_inner(g, S, 3, 5, torch.float64)
    a = (phi1, phi2a, idx, m_tr, w0, 0.3, settings())
    _, grad = grad_of(encoder, *a)
    theta = next(encoder.parameters()).detach().flatten()
    fd = torch.zeros_like(theta)
    eps = 1e-6
    for i in continuous_entries(encoder):
        e = torch.zeros_like(theta)
        e[i] = eps
        fd[i] = (loss_at(encoder, theta + e, *a) - loss_at(encoder, theta - e, *a)) / (2 * eps)
    assert ((grad - fd).norm() / fd.norm()).item() <= 1e-6


def continuous_entries(encoder):
    """Flat indices of the parameter entries the loss depends on smoothly. torch's Householder parametrisation
    (k < d1) reads the diagonal of `original` only through its integer part, as a column sign: piecewise constant,
    so central differences across it are meaningless. Every other entry is tested."""
    k, d1 = next(encoder.parameters()).shape
    return [i * d1 + j for i in range(k) for j in range(d1) if i != j]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n,d1,d2,k,steps,m,frac,fixed,keep_probs", [
    (60, 8, 7, 3, 6, 40, 0.7, False, True),
    (60, 8, 7, 3, 6, 40, 0.7, False, False),   # recompute logits in the backward pass
    (50, 5, 9, 4, 3, 500, 0.8, True, True),    # subset larger than n: capped, covers all points
    (300, 10, 6, 5, 8, 50, 0.9, False, False),  # subsets a sixth of the data
    (300, 10, 6, 2, 1, 50, 0.5, True, True),   # one inner step
    (300, 10, 6, 16, 4, 50, 0.9, False, False),  # recomputed logits 2k = 32 wide (float32: through oneDNN)
    (300, 10, 6, 24, 4, 50, 0.9, False, True),
])
@pytest.mark.parametrize("layout", ["shared", "subset"])
def test_adjoint_matches_unrolled(dtype, tol, n, d1, d2, k, steps, m, frac, fixed, keep_probs, layout, monkeypatch):
    use_layout(monkeypatch, layout)
    if not keep_probs:
        monkeypatch.setattr(hypergrad, "KEEP_PROBS_BYTES", 0)
    phi1, phi2a, encoder, g = problem(n, d1, d2, k, dtype)
    S = 3
    m = min(m, n)
    m_tr = int(frac * m)
    idx = task_encoder.sample_subsets(g, n, S, m)
    w0 = task_encoder.init_inner(g, 1 if fixed else S, k, d2, dtype).expand(S, -1, -1)
    common = (phi1, phi2a, idx, m_tr, w0, 0.2)
    loss_a, grad_a = grad_of(encoder, *common, settings("adjoint", inner_lr=0.5, steps=steps))
    loss_u, grad_u = grad_of(encoder, *common, settings("unrolled", inner_lr=0.5, steps=steps))
    assert abs(loss_a - loss_u).item() <= tol * max(1.0, abs(loss_u).item())
    assert ((grad_a - grad_u).norm() / grad_u.norm()).item() <= tol


def test_blas_and_onednn_agree_on_the_hypergradient(monkeypatch):
    """The float32 hypergradient with oneDNN turned off (torch's own switch) matches the default run."""
    phi1, phi2a, encoder, g = problem(n=300, d1=10, d2=6, k=5, dtype=torch.float32)
    idx = task_encoder.sample_subsets(g, 300, 3, 50)
    w0 = task_encoder.init_inner(g, 3, 5, 6, torch.float32)
    common = (phi1, phi2a, idx, 45, w0, 0.2, settings("adjoint", inner_lr=0.5, steps=6))
    loss_a, grad_a = grad_of(encoder, *common)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    loss_b, grad_b = grad_of(encoder, *common)
    assert abs(loss_a - loss_b).item() <= 1e-6 and ((grad_a - grad_b).norm() / grad_b.norm()).item() <= 1e-5


def test_layouts_agree():
    phi1, phi2a, encoder, g = problem(n=80)
    idx = task_encoder.sample_subsets(g, 80, 4, 60)
    w0 = task_encoder.init_inner(g, 4, 3, 5, torch.float64)
    W = encoder.weight.detach().requires_grad_(True)
    out = {}
    for lay in ("shared", "subset"):
        losses, fit = hypergrad.outer_losses(phi1, phi2a, W, 0.3, idx, 40, w0, 0.2, 4, 1.0, "adjoint", lay)
        out[lay] = (losses, torch.autograd.grad(losses.sum(), W)[0], fit)
    for a, b in zip(out["shared"], out["subset"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["shared", "subset"])
@pytest.mark.parametrize("n", [40, 200])
def test_first_order_is_gradient_through_outer_labels_only(n, layout, monkeypatch):
    """Finite differences of the outer loss with the inner solution w_T held fixed at its value for theta."""
    use_layout(monkeypatch, layout)
    phi1, phi2a, encoder, g = problem(n=n)
    S, m, m_tr, steps, lr, tau = 2, 30, 20, 5, 0.1, 0.3
    idx = task_encoder.sample_subsets(g, n, S, m)
    w0 = task_encoder.init_inner(g, S, 3, 5, torch.float64)
    args = settings(first_order=True, inner_lr=lr, steps=steps)
    _, grad = grad_of(encoder, phi1, phi2a, idx, m_tr, w0, tau, args)
    with torch.no_grad():  # w_T for the current theta, computed independently with plain loops
        Y = task_encoder.labels(phi1, encoder.weight, tau)
        wT = []
        for s in range(S):
            X, Yt, w = phi2a[idx[s, :m_tr]], Y[idx[s, :m_tr]], w0[s]
            for _ in range(steps):
                w = w - lr * (torch.softmax(X @ w.T, 1) - Yt).T @ X / m_tr
            wT.append(w)

    def fixed_inner_loss(theta):
        param = next(encoder.parameters())
        with torch.no_grad():
            saved = param.clone()
            param.copy_(theta.view_as(param))
            Y = task_encoder.labels(phi1, encoder.weight, tau)
            param.copy_(saved)
            total = 0.0
            for s in range(S):
                te = idx[s, m_tr:]
                ce = -(Y[te] * torch.log_softmax(phi2a[te] @ wT[s].T, 1)).sum(1).mean()
                p = Y[idx[s]].mean(0)
                p = p.clamp_min(1e-8)
                total += ce + args.H_reg * (p * torch.log(p)).sum()
        return (total / S).item()

    theta = next(encoder.parameters()).detach().flatten()
    fd = torch.zeros_like(theta)
    for i in continuous_entries(encoder):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd[i] = (fixed_inner_loss(theta + e) - fixed_inner_loss(theta - e)) / 2e-6
    assert ((grad - fd).norm() / fd.norm()).item() <= 1e-6


def test_inner_fit_reports_training_progress():
    phi1, phi2a, encoder, g = problem(n=100)
    idx = task_encoder.sample_subsets(g, 100, 2, 80)
    w0 = task_encoder.init_inner(g, 2, 3, 5, torch.float64)
    W = encoder.weight.detach()
    _, fit_short = hypergrad.outer_losses(phi1, phi2a, W, 0.3, idx, 60, w0, 0.05, 1, 1.0, "adjoint")
    _, fit_long = hypergrad.outer_losses(phi1, phi2a, W, 0.3, idx, 60, w0, 0.05, 200, 1.0, "adjoint")
    assert torch.allclose(fit_short[:, 0], fit_long[:, 0])  # same start
    assert (fit_long[:, 1] < fit_short[:, 1]).all()         # more steps, lower training CE
    assert ((fit_long[:, 2] >= 0) & (fit_long[:, 2] <= 1)).all()


def test_two_identical_spaces_give_the_single_space_gradient():
    phi1, phi2a, encoder, g = problem(n=60)
    idx = task_encoder.sample_subsets(g, 60, 3, 40)
    w0 = task_encoder.init_inner(g, 3, 3, 5, torch.float64)
    args = settings()
    loss1, grad1 = grad_of(encoder, phi1, phi2a, idx, 30, w0, 0.3, args)
    encoder.zero_grad(set_to_none=True)
    loss2, _ = outer.hypergradient(encoder, Rows(phi1, "cpu"), [Rows(phi2a, "cpu"), Rows(phi2a.clone(), "cpu")],
                                   outer.Batch(idx, 30, [w0, w0]), 0.3, args._replace(inner_lrs=(0.1, 0.1)))
    grad2 = torch.cat([p.grad.flatten() for p in encoder.parameters()])
    assert torch.allclose(loss1, loss2, rtol=1e-12)
    assert torch.allclose(grad1, grad2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n,layout", [(1500, "shared"), (20000, "subset")])
def test_bf16_hypergradient_is_close_to_float32(n, layout, monkeypatch):
    """--bf16 rounds the inner GEMMs' operands and results to 8 significant bits: the hypergradient stays within a
    percent of float32's on a problem of realistic shape (scaled down), and the loss within 1e-2."""
    use_layout(monkeypatch, layout)
    phi1, phi2a, encoder, g = problem(n=n, d1=32, d2=64, k=10, dtype=torch.float32)
    idx = task_encoder.sample_subsets(g, n, 2, 1000)
    w0 = task_encoder.init_inner(g, 2, 10, 64, torch.float32)
    out = {}
    for bf16 in (False, True):
        args = settings(inner_lr=0.05, steps=30, bf16=bf16)
        out[bf16] = grad_of(encoder, phi1, phi2a, idx, 900, w0, 0.1, args)
    (loss32, grad32), (loss16, grad16) = out[False], out[True]
    assert abs(loss16 - loss32).item() <= 1e-2 * abs(loss32).item()
    assert ((grad16 - grad32).norm() / grad32.norm()).item() <= 2e-2  # measured 2e-3 to 3e-3
