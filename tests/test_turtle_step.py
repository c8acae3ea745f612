"""turtle_step.py: one TURTLE iteration's labels, inner loop and outer gradient against independent references
(autograd through the plain loss, torch.optim.Adam, Adam written out in numpy)."""
import numpy as np
import pytest
import torch

from humelib import task_encoder, turtle_step


def plain_inner_fit(inner, phis, Y, M, lr):
    """The reference inner loop: autograd through sum_i CE(inner_i(phi_i), Y) and torch's own (single-tensor) Adam."""
    opt = torch.optim.Adam(inner.parameters(), lr=lr, foreach=False, fused=False)
    for _ in range(M):
        opt.zero_grad()
        sum(torch.nn.functional.cross_entropy(w(z), Y) for w, z in zip(inner, phis)).backward()
        opt.step()


def copies(inner):
    out = torch.nn.ModuleList(torch.nn.Linear(lin.in_features, lin.out_features) for lin in inner).to(
        inner[0].weight.dtype)
    out.load_state_dict(inner.state_dict())
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inner_fit_equals_autograd_and_torch_adam(dtype):
    """Several closed-form steps on two spaces of a gathered batch equal autograd + torch.optim.Adam on the same
    rows (float32: the oneDNN products and the clamped softmax, against the float64 reference)."""
    g = torch.Generator().manual_seed(0)
    dims, k, n, M, lr = [7, 12], 4, 90, 6, 0.05
    phis = [torch.randn(n, d, generator=g, dtype=torch.float64) * 3 for d in dims]  # spread logits: saturated rows
    idx = torch.randperm(n, generator=g)[:60]
    Y = torch.softmax(torch.randn(60, k, generator=g, dtype=torch.float64) * 2, 1)
    inner = turtle_step.init_inner(g, dims, k, "cpu").double()
    ref, init = copies(inner), copies(inner)
    plain_inner_fit(ref, [z[idx] for z in phis], Y, M, lr)
    fast = inner.to(dtype)
    turtle_step.inner_fit(fast, turtle_step.inner_adam(fast, lr), turtle_step.gather_batch(
        [z.to(dtype) for z in phis], idx, k), Y.to(dtype), M)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b, a0 in zip(fast.parameters(), ref.parameters(), init.parameters()):
        assert a.dtype == dtype and a.grad is None
        assert (a.double() - b).abs().max().item() <= tol
        assert (b - a0).abs().max().item() >= lr  # the steps moved the weights: not a comparison of inits


def test_inner_fit_equals_hand_written_adam():
    """M steps on two spaces against Adam and the soft-label cross-entropy gradient written out in numpy."""
    rng = np.random.default_rng(1)
    dims, k, n, M, lr = [4, 6], 3, 25, 7, 0.05
    phis = [rng.normal(size=(n, d)) for d in dims]
    labels = rng.dirichlet(np.ones(k), size=n)
    inner = torch.nn.ModuleList(torch.nn.Linear(d, k).double() for d in dims)
    params = [[lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()] for lin in inner]
    turtle_step.inner_fit(inner, turtle_step.inner_adam(inner, lr), turtle_step.gather_batch(
        [torch.from_numpy(z) for z in phis], torch.arange(n), k), torch.from_numpy(labels).requires_grad_(), M)
    b1, b2, eps = 0.9, 0.999, 1e-8
    m_ = [[np.zeros_like(p) for p in ps] for ps in params]
    v_ = [[np.zeros_like(p) for p in ps] for ps in params]
    for t in range(1, M + 1):
        for s, z in enumerate(phis):
            W, c = params[s]
            logits = z @ W.T + c
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dlogits = (p - labels) / n  # gradient of the mean soft-label cross-entropy
            for j, grad in enumerate([dlogits.T @ z, dlogits.sum(0)]):
                m_[s][j] = b1 * m_[s][j] + (1 - b1) * grad
                v_[s][j] = b2 * v_[s][j] + (1 - b2) * grad ** 2
                params[s][j] = params[s][j] - lr * (m_[s][j] / (1 - b1 ** t)) / (
                    np.sqrt(v_[s][j] / (1 - b2 ** t)) + eps)
    for lin, (W, c) in zip(inner, params):
        np.testing.assert_allclose(lin.weight.detach().numpy(), W, atol=1e-10)
        np.testing.assert_allclose(lin.bias.detach().numpy(), c, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outer_gradient_matches_autograd_through_plain_loss(dtype):
    """Labels of a gathered batch and the outer loss's gradient w.r.t. theta (g, v, b of each weight-normalised
    head) against the same loss written out with plain tensors on the rows taken by indexing."""
    torch.manual_seed(0)
    dims, k, n, gamma = [5, 7], 3, 40, 10.0
    phis = [torch.randn(n, d, dtype=dtype) for d in dims]
    idx = torch.randperm(n)[:30]
    theta = task_encoder.make_turtle_encoder(dims, k).to(dtype)
    inner = torch.nn.ModuleList(torch.nn.Linear(d, k).to(dtype) for d in dims)
    Y, per_space = turtle_step.batch_labels(theta, turtle_step.gather_batch(phis, idx, k))
    loss = turtle_step.outer_loss(Y, per_space, inner, turtle_step.gather_batch(phis, idx, k), gamma)[0]
    loss.backward()
    g = [h.parametrizations.weight.original0.detach().double().requires_grad_() for h in theta]
    v = [h.parametrizations.weight.original1.detach().double().requires_grad_() for h in theta]
    b = [h.bias.detach().double().requires_grad_() for h in theta]
    rows = [z[idx].double() for z in phis]
    probs = [torch.softmax(z @ (g_ * v_ / v_.norm(dim=1, keepdim=True)).T + b_, 1)
             for z, g_, v_, b_ in zip(rows, g, v, b)]
    labels = sum(probs) / len(probs)
    ce = sum(-(labels * torch.log_softmax(z @ w.weight.detach().double().T + w.bias.detach().double(), 1)).sum(1)
             .mean() for z, w in zip(rows, inner))
    H = sum(-(p.mean(0) * p.mean(0).log()).sum() for p in probs)
    (ce - gamma * H).backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - (ce - gamma * H).item()) <= tol * 10
    torch.testing.assert_close(Y.double(), labels.detach(), atol=tol, rtol=0)
    for i, h in enumerate(theta):
        for got, want in ((h.parametrizations.weight.original0.grad, g[i].grad),
                          (h.parametrizations.weight.original1.grad, v[i].grad), (h.bias.grad, b[i].grad)):
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_inner_init_is_nn_linear_range_and_reproducible():
    a = turtle_step.init_inner(torch.Generator().manual_seed(5), [9, 100], 4, "cpu")
    b = turtle_step.init_inner(torch.Generator().manual_seed(5), [9, 100], 4, "cpu")
    for la, lb, d in zip(a, b, [9, 100]):
        assert la.weight.abs().max() <= d ** -0.5 and la.bias.abs().max() <= d ** -0.5
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.bias, lb.bias)


def test_outer_step_equals_a_plain_autograd_iteration():
    """Two whole iterations (labels, inner loop, theta's Adam step) against TURTLE's loop written with nn.Linear
    classifiers, autograd and torch.optim.Adam on the rows taken by indexing, from the same theta and inits."""
    torch.manual_seed(1)
    dims, k, n, gamma, M = [6, 9], 3, 50, 10.0, 4
    phis = [torch.randn(n, d, dtype=torch.float64) * 2 for d in dims]
    theta = task_encoder.make_turtle_encoder(dims, k).double()
    ref_theta = task_encoder.make_turtle_encoder(dims, k).double()
    ref_theta.load_state_dict(theta.state_dict())
    opt, ref_opt = (torch.optim.Adam(t.parameters(), lr=0.01) for t in (theta, ref_theta))
    for it in range(2):
        idx = torch.randperm(n)[:35]
        inner = turtle_step.init_inner(torch.Generator().manual_seed(it), dims, k, "cpu").double()
        ref_inner = copies(inner)
        losses = turtle_step.outer_step(theta, opt, inner, turtle_step.inner_adam(inner, 0.05), phis, idx, gamma, M)
        rows = [z[idx] for z in phis]
        labels, per_space = task_encoder.turtle_labels(ref_theta, rows)
        plain_inner_fit(ref_inner, rows, labels.detach(), M, 0.05)
        ref_opt.zero_grad()
        ce = sum(torch.nn.functional.cross_entropy(w(z).detach(), labels) for w, z in zip(ref_inner, rows))
        H = sum(torch.special.entr(p.mean(0)).sum() for p in per_space)
        (ce - gamma * H).backward()
        ref_opt.step()
        torch.testing.assert_close(torch.stack(losses), torch.stack([ce - gamma * H, ce, H]).detach(), atol=1e-12,
                                   rtol=0)
        for a, b in zip(theta.parameters(), ref_theta.parameters()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
