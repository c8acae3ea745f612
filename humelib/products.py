"""The inner loop's fast parts: the two products with a fixed X (logits and gradients), the softmax over the classes,
and the planner that picks, on the machine it runs on, which kernel computes the products.

Kernels (each also as NAME-bf16: the products read a bfloat16 copy of X and return bfloat16-rounded results):
- "onednn": oneDNN's packed linear kernels (the ones torch.compile uses for linear layers on a CPU), X and X^T
  reordered once into their packed layout and the small operand taken as the batch; CPU only, looked up in torch.
- "onednn_raw": the same kernels reading X where it lies (X^T a strided view): no packed copies, for an X used only
  a few dozen times (TURTLE's batches), where packing costs more than it saves.
- "blas": torch's matmul on X as given (MKL, OpenBLAS, cuBLAS: whatever torch was built with).
- "blas_t": torch's matmul on a transposed copy of X for the logits, so they come out (k, m) contiguous.
Speed depends on the CPU's instruction set (AVX2, AVX-512, AMX), the BLAS and the shapes, so nothing here is chosen
from timings taken elsewhere: `plan` probes every kernel on a tiny product (one that raises or computes wrong is
dropped: e.g. oneDNN's bfloat16 path needs AVX-512 or AVX-NE-CONVERT) and times the rest on the run's own shapes.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import NamedTuple, TypeVar

import torch

BACKENDS = ("onednn", "onednn_raw", "blas", "blas_t")
PLAN_SECONDS = 0.06  # timing budget per candidate and layout (a plan times every candidate in every layout)
T = TypeVar("T")


def softmax(Z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` (no autograd through it here). Exponents are clamped at -87: below that a float32 exp is
    subnormal or 0 and torch's CPU exp takes a slow path; the probabilities this changes are below
    2e-38, against float32's resolution of 1e-7 at 1. Over a last dimension that is a multiple of 16 torch's fused
    kernel is used (its vector width); elsewhere this exp/sum form, which torch's CPU kernel is slower than on
    short rows."""
    if dim in (-1, Z.dim() - 1) and Z.shape[-1] % 16 == 0:
        return torch.softmax(Z, -1)
    e = (Z - Z.amax(dim, keepdim=True)).clamp_min_(-87.0).exp_()
    return e.div_(e.sum(dim, keepdim=True))


def gemms(X: torch.Tensor, width: int, kernel: str = "blas", km: bool = False) -> SimpleNamespace:
    """The inner loop's two products with a fixed X (m, D), for operands of about `width` rows:
    km=True:  logits(w) = w X^T (r, m) for w (r, D); grad(G) = G X (r, D) for G (r, m)   (classes first)
    km=False: logits(w) = X w^T (m, r);               grad(G) = G^T X (r, D) for G (m, r)
    Results are in X's dtype. `kernel` is one of `kernels()`; see the module docstring."""
    backend, _, low = kernel.partition("-")
    dtype = torch.bfloat16 if low == "bf16" else X.dtype
    if backend.startswith("onednn") and dtype not in (torch.float32, torch.bfloat16):
        backend = "blas"  # oneDNN's kernels take float32 and bfloat16 only (float64 tests, references)
    cast = (lambda T: T.to(X.dtype)) if dtype != X.dtype else (lambda T: T)
    Xg = X.to(dtype)
    if backend.startswith("onednn"):
        lin = torch.ops.mkldnn._linear_pointwise
        if backend == "onednn":
            Xp = torch.ops.mkldnn._reorder_linear_weight(Xg, width)
            Xtp = torch.ops.mkldnn._reorder_linear_weight(Xg.T.contiguous(), width)
        else:
            Xp, Xtp = Xg, Xg.T
        logits_km = lambda w: lin(w.to(dtype).contiguous(), Xp, None, "none", [], "")
        grad_km = lambda G: lin(G.to(dtype).contiguous(), Xtp, None, "none", [], "")
    elif backend == "blas":
        logits_km = lambda w: (Xg @ w.to(dtype).T).T
        grad_km = lambda G: G.to(dtype) @ Xg
    elif backend == "blas_t":
        Xt = Xg.T.contiguous()
        logits_km = lambda w: w.to(dtype) @ Xt
        grad_km = lambda G: G.to(dtype) @ Xg
    else:
        raise ValueError(f"unknown kernel {kernel!r}; one of {kernels()}")
    if km:
        return SimpleNamespace(logits=lambda w: cast(logits_km(w)), grad=lambda G: cast(grad_km(G)))
    return SimpleNamespace(logits=lambda w: cast(logits_km(w).T.contiguous()), grad=lambda G: cast(grad_km(G.T)))


def kernels() -> tuple[str, ...]:
    """Every kernel name, float32 ones first."""
    return BACKENDS + tuple(f"{b}-bf16" for b in BACKENDS)


@functools.cache
def _probe(kernel, device, onednn_enabled):
    """None if the kernel computes a tiny product right on this device, else why not (one line)."""
    if kernel.startswith("onednn") and not (device == "cpu" and onednn_enabled and torch.backends.mkldnn.is_available()
                                            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return "oneDNN's packed kernels are not available (CPU only; torch.backends.mkldnn)"
    g = torch.Generator().manual_seed(0)
    X, w, G = (torch.randn(*s, generator=g).to(device) for s in ((37, 9), (3, 9), (3, 37)))
    r = (lambda T: T.bfloat16().double()) if kernel.endswith("bf16") else (lambda T: T.double())
    try:
        ops = gemms(X, 3, kernel, km=True)
        pairs = ((ops.logits(w), r(w) @ r(X).T), (ops.grad(G), r(G) @ r(X)))
        bad = [got for got, ref in pairs if not got.shape == ref.shape or
               not ((got.double() - ref).norm() / ref.norm()).item() <= (2e-2 if kernel.endswith("bf16") else 1e-5)]
    except (RuntimeError, NotImplementedError) as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return "wrong results on a test product" if bad else None


def probe(kernel: str, device: str | torch.device = "cpu") -> str | None:
    """None if `kernel` runs and computes right here (cached per process), else the reason it cannot be used."""
    return _probe(kernel, torch.device(device).type, torch.backends.mkldnn.enabled)


def default_kernel(device: str | torch.device = "cpu", bf16: bool = False) -> str:
    """The first kernel that runs here, without timing (library calls that bring no plan)."""
    return next(k for k in kernels() if k.endswith("bf16") == bf16 and probe(k, device) is None)


def _step(kernel, N, D, width, km, device, masks=1):
    """One inner step's products and softmax (logits, softmax, gradient) on random data of the run's shape."""
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(N, D, device=device, generator=g)
    w = torch.randn(width, D, device=device, generator=g) * (0.1 / D ** 0.5)
    ops = gemms(X, width, kernel, km)
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)
    if km:
        Y = softmax(torch.randn(width, N, device=device, generator=g), 0)
        return lambda: (ops.grad(softmax(ops.logits(w), 0) - Y), sync())
    # the shared layout: (N, S, k) logits, 0/1 masks selecting each subset's rows
    Y = softmax(torch.randn(N, 1, width // masks, device=device, generator=g), -1)
    M = (torch.rand(N, masks, 1, device=device, generator=g) < 0.8).to(X.dtype)
    return lambda: (ops.grad(((softmax(ops.logits(w).view(N, masks, -1)) - Y) * M).view(N, -1)), sync())


def _timings(names, make, budget):
    """Milliseconds per step of each candidate: the median of short rounds taken in turn, candidate after candidate,
    so that load elsewhere on the machine hits them alike and a candidate that only runs well on an idle machine
    (products split over threads that wait for each other) is seen as it will run; about `budget` seconds each, at
    least 3 rounds. A candidate whose first step is 5x slower than the best first step is not timed further (a
    kernel without hardware support, emulated, is far behind; no need to watch it)."""
    steps, first = {}, {}
    for kn in names:
        steps[kn] = make(kn)
        steps[kn]()  # warm-up: packing, allocations
        t0 = time.perf_counter()
        steps[kn]()
        first[kn] = (time.perf_counter() - t0) * 1e3
    timed = [kn for kn in names if first[kn] <= 5 * min(first.values())]
    rounds, spent = {kn: [] for kn in timed}, 0.0
    while spent < budget * len(timed) or len(rounds[timed[0]]) < 3:
        for kn in timed:
            t0 = time.perf_counter()
            for _ in range(3):
                steps[kn]()
            dt = time.perf_counter() - t0
            rounds[kn].append(dt / 3 * 1e3)
            spent += dt
    return {kn: statistics.median(rounds[kn]) if kn in rounds else first[kn] for kn in names}


def run_concurrently(tasks: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Call each of tasks (no arguments) and return their results in order: one after another when workers is 1,
    else on `workers` threads at once, each with one thread for torch's own parallelism (the subsets of an outer
    iteration are independent; on some CPUs several one-thread products outrun one product split over the cores)."""
    if workers <= 1 or len(tasks) <= 1:
        return [t() for t in tasks]
    grad = torch.is_grad_enabled()  # thread-local in torch: a new thread would start with autograd on

    def alone(task):
        torch.set_num_threads(1)  # this thread's OpenMP pool and oneDNN's: one thread
        with torch.set_grad_enabled(grad):
            return task()
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # BLAS libraries with one global setting
    try:
        with ThreadPoolExecutor(min(workers, len(tasks))) as pool:
            return list(pool.map(alone, tasks))
    finally:
        torch.set_num_threads(n)


def _together(steps, reps):
    """One call runs `reps` steps of each of `steps` at once, as run_concurrently runs subsets."""
    return lambda: run_concurrently([lambda s=s: [s() for _ in range(reps)] for s in steps], len(steps))


class Plan(NamedTuple):
    """How the inner loops run: the subsets' layout (inner_loop.py), the products' kernel, how many subsets run at
    once, and what was measured (milliseconds per inner step of every candidate that ran, by layout, and why the
    others could not run). A pinned kernel is not timed: layout "auto" (hypergrad's size rule), one subset at a time."""
    layout: str
    kernel: str
    timings: dict[str, dict[str, float]]
    unavailable: dict[str, str]
    workers: int = 1

    @property
    def key(self) -> str:
        """The timings' key of the planned candidate."""
        return f"subset x{self.workers}" if self.workers > 1 else self.layout

    @property
    def step_ms(self) -> float | None:
        """Milliseconds per inner step of the planned candidate (per subset; of all subsets in the shared layout),
        None for a pinned kernel (not timed)."""
        return self.timings[self.key][self.kernel] if self.timings else None

    def summary(self) -> str:
        if not self.timings:
            return f"{self.kernel} kernel (pinned), one subset at a time"
        at_once = f", {self.workers} subsets at a time" if self.workers > 1 else ""
        return f"{self.kernel} kernel, {self.layout} layout{at_once} ({self.step_ms:.2f} ms per inner step)"

    def inner_seconds(self, S: int, T: int) -> float | None:
        """The least an outer iteration's inner loops can take at the planned kernel's measured rate: S subsets of T
        steps forward and T back, each back step's two products taken as no dearer than a forward step's (they are
        the same products where the softmax outputs are kept; with the iterates kept the logits are 2k wide).
        None for a pinned kernel (not timed)."""
        if not self.timings:
            return None
        return 2 * T * (1 if self.layout == "shared" else S) * self.step_ms / 1e3


def plan(n: int, m: int, m_tr: int, D: int, k: int, S: int, device: str | torch.device = "cpu", bf16: bool = False,
         only: str | None = None, budget: float = PLAN_SECONDS) -> Plan:
    """Time the candidate kernels for one inner step on the run's shapes (S subsets of m of n points, m_tr of them
    X_tr, D columns with the ones column, k classes) and keep the fastest per outer iteration, among: the subset
    layout with one subset at a time, or (CPU, S > 1) as many at a time as torch has threads, one thread each; and
    the shared layout where it can pay (S > 1 subsets whose expected union is at most 1.5 x m_tr rows). The last two
    are timed for the kernels that lead the first.
    bf16: the bfloat16 kernels are the candidates (the float32 ones are timed too, for the warning in `advice`).
    only: a kernel pinned by name (no timing; see Plan)."""
    device = torch.device(device).type
    if only:
        if probe(only, device):
            raise RuntimeError(f"kernel {only} cannot run here: {probe(only, device)}")
        return Plan("auto", only, {}, {})
    n_union = round(n * (1 - (1 - m / n) ** S))  # expected rows in the union of S random subsets
    allowed = [kn for kn in kernels() if bf16 or not kn.endswith("bf16")]
    names = [kn for kn in allowed if probe(kn, device) is None]
    unavailable = {kn: probe(kn, device) for kn in allowed if probe(kn, device) is not None}
    timings = {"subset": _timings(names, lambda kn: _step(kn, m_tr, D, k, True, device), budget)}
    best = sorted(names, key=timings["subset"].get)[:3]  # the other layouts: only the kernels that lead here
    best += [kn for kn in names if kn not in best and kn.endswith("bf16") == bf16][:1]  # and one of the wanted kind
    W = min(torch.get_num_threads(), S) if device == "cpu" else 1
    if W > 1:
        reps = 4
        t = _timings(best, lambda kn: _together([_step(kn, m_tr, D, k, True, device) for _ in range(W)], reps),
                     budget)
        timings[f"subset x{W}"] = {kn: ms / (W * reps) for kn, ms in t.items()}
    if S > 1 and n_union <= 1.5 * m_tr:
        timings["shared"] = _timings(best, lambda kn: _step(kn, n_union, D, S * k, False, device, S), budget)
    per_iteration = {(key, kn): t * (1 if key == "shared" else S)
                     for key in timings for kn, t in timings[key].items() if kn.endswith("bf16") == bf16}
    key, kernel = min(per_iteration, key=per_iteration.get)
    return Plan(key.split()[0], kernel, timings, unavailable, W if key.startswith("subset x") else 1)


def advice(p: Plan) -> str | None:
    """A warning when the plan's bfloat16 kernel is slower than float32 would be here (no bfloat16 kernel on this
    CPU: --bf16 then costs accuracy and time), else None."""
    if not p.kernel.endswith("bf16"):
        return None
    if not p.timings:
        return None
    fp32 = [t for kn, t in p.timings[p.key].items() if not kn.endswith("bf16")]
    if fp32 and min(fp32) < p.step_ms:
        why = f" ({p.unavailable['onednn-bf16']})" if "onednn-bf16" in p.unavailable else ""
        return (f"--bf16 is slower than float32 on this machine: {p.step_ms:.2f} vs "
                f"{min(fp32):.2f} ms per inner step with the fastest bfloat16 kernel, {p.kernel}{why}; drop --bf16")
    return None
