"""products.py: every kernel against float64 products, the probe and its fallbacks (torch's oneDNN switch, oneDNN's
documented ISA limit in a child process), the planner's choice, and the hypergradient through every kernel."""
import json
import os
import subprocess

import pytest
import torch

from humelib import hypergrad, products, task_encoder
from helpers import FAST, REPO, child_env, command, describe

KM = [True, False]


@pytest.mark.parametrize("km", KM)
@pytest.mark.parametrize("width", [1, 3, 10, 21, 40])
@pytest.mark.parametrize("kernel", products.kernels())
def test_every_kernel_that_runs_matches_float64_products(kernel, width, km):
    """Both products in both orientations against float64 matmuls of the same float32 operands (for bf16 kernels:
    of their bfloat16 roundings). A kernel the probe turns down must be one of oneDNN's (plain matmuls always run)
    and must raise or compute wrong when forced, which is what the probe saw."""
    g = torch.Generator().manual_seed(width)
    X, w, G = (torch.randn(*s, generator=g) for s in ((300, 70), (width, 70), (width, 300)))
    reason = products.probe(kernel)
    if reason is not None:
        assert kernel.startswith("onednn"), reason
        return
    bf16 = kernel.endswith("bf16")
    r = (lambda T: T.bfloat16().double()) if bf16 else (lambda T: T.double())
    ops = products.gemms(X, width, kernel, km)
    if km:
        pairs = ((ops.logits(w), r(w) @ r(X).T), (ops.grad(G), r(G) @ r(X)))
    else:
        pairs = ((ops.logits(w), r(X) @ r(w).T), (ops.grad(G.T.contiguous()), r(G) @ r(X)))
    tol = 1e-2 if bf16 else 1e-6  # bf16: the products' outputs are rounded to bfloat16
    for got, ref in pairs:
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert ((got.double() - ref).norm() / ref.norm()).item() <= tol


def test_softmax_along_either_dimension_matches_torch():
    Z = torch.randn(7, 300, dtype=torch.float64) * 30  # large logits: the clamp at -87 is exercised
    for dim in (0, 1, -1):
        assert torch.allclose(products.softmax(Z.clone(), dim), torch.softmax(Z, dim), atol=1e-30, rtol=1e-12)
    Z16 = torch.randn(5, 32)
    assert torch.allclose(products.softmax(Z16, -1), torch.softmax(Z16, -1))


def test_oneDNN_switched_off_falls_back_to_plain_matmuls(monkeypatch):
    """torch.backends.mkldnn.enabled = False (torch's own switch): the probe turns oneDNN down with a reason, no
    kernel it turned down is planned, and the default kernel is a plain matmul."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    for kn in ("onednn", "onednn_raw", "onednn-bf16", "onednn_raw-bf16"):
        assert products.probe(kn) is not None
    assert products.default_kernel() == "blas" and products.default_kernel(bf16=True) == "blas-bf16"
    p = products.plan(500, 250, 200, 31, 4, 3, budget=0.01)
    assert p.kernel in ("blas", "blas_t") and set(p.unavailable) == {"onednn", "onednn_raw"}
    p16 = products.plan(500, 250, 200, 31, 4, 3, bf16=True, budget=0.01)
    assert p16.kernel in ("blas-bf16", "blas_t-bf16") and "onednn-bf16" in p16.unavailable


def test_plan_takes_the_fastest_per_outer_iteration(monkeypatch):
    """The choice against a brute-force minimum over the candidates of the time per outer iteration: S inner steps
    in the subset layout (one subset at a time, or two at once on one thread each), one in the shared layout.
    Timings are made up, keyed by what is timed; only the rule is tested."""
    fake = {True: {"onednn": 1.0, "onednn_raw": 5.0, "blas": 2.0, "blas_t": 0.9},  # subset layout (classes first)
            "x2": {"onednn": 8 * 0.8, "onednn_raw": 80.0, "blas": 8 * 3.0, "blas_t": 8 * 1.1},  # 2 x 4 steps a call
            False: {"onednn": 4.0, "onednn_raw": 9.0, "blas": 2.5, "blas_t": 3.0}}  # shared layout
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(products, "_step", lambda kn, N, D, width, km, device, masks=1: km)
    monkeypatch.setattr(products, "_together", lambda steps, reps: "x2")
    monkeypatch.setattr(products, "_timings", lambda names, make, budget: {kn: fake[make(kn)][kn] for kn in names})
    names = [kn for kn in ("onednn", "onednn_raw", "blas", "blas_t") if products.probe(kn) is None]
    wants = {True: ("subset", "onednn", 2), False: ("subset", "blas_t", 1)}  # with or without oneDNN here
    for S, want in ((2, wants["onednn" in names]), (4, ("shared", "blas", 1)), (10, ("shared", "blas", 1))):
        p = products.plan(150, 120, 100, 8, 3, S)
        per_iter = {**{("subset", kn, 1): fake[True][kn] * S for kn in names},
                    **{("subset", kn, 2): fake["x2"][kn] / 8 * S for kn in names},
                    **{("shared", kn, 1): fake[False][kn] for kn in names}}
        assert (p.layout, p.kernel, p.workers) == min(per_iter, key=per_iter.get) == want
        # the floor bench.py prints: that candidate's outer iteration, forward and back (2 x), over T = 7 steps
        assert p.inner_seconds(S, 7) == pytest.approx(2 * 7 * per_iter[want] / 1e3)
    p = products.plan(10**6, 120, 100, 8, 3, 4)  # a union of over 1.5 x a subset's rows: no shared layout
    assert "shared" not in p.timings and p.layout == "subset"


def test_a_pinned_kernel_is_not_timed(monkeypatch):
    monkeypatch.setattr(products, "_timings", lambda *a: pytest.fail("a pinned kernel must not be timed"))
    p = products.plan(150, 120, 100, 8, 3, 4, only="blas_t")
    assert (p.layout, p.kernel, p.workers, p.timings) == ("auto", "blas_t", 1, {})
    assert p.inner_seconds(4, 10) is None  # nothing measured, no floor


def test_run_concurrently_returns_every_result_in_order_and_restores_the_threads():
    n = torch.get_num_threads()
    out = products.run_concurrently([lambda i=i: (i, torch.get_num_threads()) for i in range(7)], 3)
    assert out == [(i, 1) for i in range(7)] and torch.get_num_threads() == n
    assert products.run_concurrently([lambda: 5], 3) == [5]
    with torch.no_grad():  # autograd's mode is per thread: the tasks run in the caller's
        assert products.run_concurrently([torch.is_grad_enabled] * 3, 3) == [False] * 3
    assert products.run_concurrently([torch.is_grad_enabled] * 3, 3) == [True] * 3


@pytest.mark.parametrize("layout", ["shared", "subset"])
def test_hypergradient_through_every_float32_kernel_matches_float64(layout):
    """The float32 outer loss and its gradient through each kernel that runs here, against the float64 unrolled
    reference (autograd through plain matmuls) on the same subsets."""
    g = torch.Generator().manual_seed(0)
    n, d1, d2, k, S, m, m_tr = 120, 6, 9, 4, 3, 60, 50
    phi1 = torch.nn.functional.normalize(torch.randn(n, d1, generator=g, dtype=torch.float64), dim=1)
    phi2a = torch.cat([torch.randn(n, d2, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    W = task_encoder.make_task_encoder(d1, k).double().weight.detach()
    idx = task_encoder.sample_subsets(g, n, S, m)
    w0 = task_encoder.init_inner(g, S, k, d2, torch.float64)

    def loss_and_grad(dtype, method, kernel=None, workers=1):
        Wd = W.to(dtype).requires_grad_(True)
        losses, _ = hypergrad.outer_losses(phi1.to(dtype), phi2a.to(dtype), Wd, 0.3, idx, m_tr, w0.to(dtype), 0.2, 8,
                                           1.0, method, layout, kernel=kernel, workers=workers)
        return losses.sum().item(), torch.autograd.grad(losses.sum(), Wd)[0].double()
    loss_ref, grad_ref = loss_and_grad(torch.float64, "unrolled")
    ran = [kn for kn in products.kernels() if not kn.endswith("bf16") and products.probe(kn) is None]
    assert "blas" in ran and "blas_t" in ran
    for kn in ran:
        for workers in (1, 2) if layout == "subset" else (1,):  # subsets one at a time, or two at once
            loss, grad = loss_and_grad(torch.float32, "adjoint", kn, workers)
            assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref), (kn, workers)
            assert ((grad - grad_ref).norm() / grad_ref.norm()).item() <= 1e-4, (kn, workers)


def isa_limited_run(tmp_path, *flags):
    """hume.py on the demo with oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA, oneDNN's documented setting): its
    bfloat16 path then refuses to run, as on a CPU without AVX-512, whatever this machine has."""
    env = dict(child_env(), ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = tmp_path / "run"
    argv = FAST + ["--kernel", "auto", "--exp_path", out, "--eval_every", "1", *flags]  # the plan: what is checked
    p = subprocess.run(command("hume.py", argv), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return p, out


def test_bf16_without_a_oneDNN_bf16_kernel_runs_on_plain_bf16_matmuls(tmp_path):
    p, out = isa_limited_run(tmp_path, "--bf16")
    assert p.returncode == 0, describe(p)
    plan = json.loads((out / "metrics_42.jsonl").read_text().splitlines()[0])["plan"]["spaces"][0]
    assert "onednn-bf16" in plan["unavailable"] and plan["kernel"] in ("blas-bf16", "blas_t-bf16")
    assert os.path.isfile(out / "linear_task_42.pt")


def test_pinned_kernel_that_cannot_run_is_refused_before_anything_is_written(tmp_path):
    p, out = isa_limited_run(tmp_path, "--bf16", "--kernel", "onednn-bf16")
    assert p.returncode == 2 and "Traceback" not in p.stderr, describe(p)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --kernel onednn-bf16 cannot run here")
    assert not out.exists()
