"""Seconds per outer iteration and peak memory of HUME's hypergradient methods, side by side in one run.

    python bench.py --scale demo
    python bench.py --scale paper --num_subsets 2 --adaptation_steps 300        # CPU-sized; time scales with S x T
    python bench.py --scale paper --num_subsets 2 --adaptation_steps 100,300 --methods adjoint,bf16,unrolled
    python bench.py --scale imagenet --num_subsets 1 --adaptation_steps 5,20    # memory growth per inner step
    python bench.py --scale paper --device cuda --json bench.json
    python bench.py --scale paper --num_subsets 4 --adaptation_steps 50 --methods adjoint --nproc 1,2  # torchrun
    python bench.py --cv_score demo,paper,two_spaces    # the label-free CV score, ours beside scikit-learn's

Each (scale, method, steps) runs in a fresh subprocess so its peak memory is its own (CPU: peak RSS over the RSS
after the data is loaded; GPU: torch.cuda.max_memory_allocated). The machine's sustained GEMM rate (a 2048^3
matmul, same run) gives each scale's "fraction of peak": the minimal 4 GEMMs of m_tr x d2 x k per inner step and
subset (2 forward, 2 backward) divided by the time taken, as a share of that rate. Likewise "GB/s X": the bytes of
X_tr those 4 passes read (2 for first_order; bf16 reads a 2-byte copy), per second, beside the machine's streaming
bandwidth (a 512 MiB copy, bytes read + written). X_tr of one subset (28 MB at the paper's scale) may fit in a large
L3 cache, so the subset layout may read it faster than memory streams. "MiB/step": growth of peak memory per inner
step between the step counts given (--adaptation_steps 100,300), else peak / T. Method "bf16" is the adjoint with
--bf16; its row also gives the relative error of its hypergradient against float32 on the same subsets. "inner s":
the least the inner loops can take per outer iteration at the rate the planner measured for its kernel (its timed
inner step, two products and the softmax, x 2 for the backward pass, x S x T): s/iter less this is what the rest of
the iteration costs, and another code's s/iter over it bounds any speed-up with this kernel on this CPU.
--cv_score times the label-free score instead (cvscore.cv_score beside the paper's scikit-learn cross_val_score with
n_jobs=-1, same process) on a separable labeling (argmax of a random linear map of the space: every fold runs all its
iterations): the demo's evaluation set, 10,000 x 1,536 (hume.py at CIFAR-10 size) and two spaces of 768 and 1,536.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from humelib import distributed, outer, products, runtime
from humelib.arrays import DEMO
from humelib.embeddings import Rows
from humelib.flags import choice_list, default_device, device, int_in, int_list, make_parser
from humelib.task_encoder import init_inner, make_task_encoder, sample_subsets

SCALES = {  # synthetic data of the paper's sizes; demo = the bundled digits (inductive train split)
    "demo": dict(n=None, d1=None, d2=None, k=10, subset_size=10000, train_fraction=0.9, S=5, T=100),
    "paper": dict(n=50000, d1=512, d2=768, k=10, subset_size=10000, train_fraction=0.9, S=20, T=300),
    "imagenet": dict(n=50000, d1=2048, d2=2048, k=1000, subset_size=20000, train_fraction=0.7, S=1, T=100),
}


def make_data(scale, n, seed=0):
    if scale == "demo":
        return np.load(DEMO["phi1_train"]), np.load(DEMO["phi2_train"])
    c = SCALES[scale]
    rng = np.random.default_rng(seed)
    phi1 = rng.standard_normal((n, c["d1"]), dtype=np.float32)
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    return phi1, rng.standard_normal((n, c["d2"]), dtype=np.float32) * 3  # row norms in the tens, like raw features


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(job):
    """One measurement: outer iterations of one method at one scale; returns seconds/iteration and memory."""
    runtime.large_buffers_in_huge_pages()  # as hume.py runs
    torch.manual_seed(0)
    world, comm = None, []
    if distributed.launched():
        world = distributed.init(job["S"], job["device"])
    dev = torch.device(job["device"] if not world or job["device"] == "cpu" else f"cuda:{world.rank}")
    wait = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    phi1, phi2 = make_data(job["scale"], job["n"])
    n, d1 = phi1.shape
    d2 = phi2.shape[1]
    phi1, phi2 = Rows(phi1, dev), Rows(phi2, dev, ones=True)
    m = min(job["subset_size"], n)
    m_tr = int(job["train_fraction"] * m)
    S, T, k = job["S"], job["T"], job["k"]
    encoder = make_task_encoder(d1, k).to(dev)
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    method, bf16 = ("adjoint", True) if job["method"] == "bf16" else (job["method"], False)
    plan = None if method == "unrolled" else products.plan(n, m, m_tr, d2 + 1, k, S, dev, bf16)
    obj = outer.Objective((1e-3,), T, 10.0, method, bf16, (plan,) if plan else ())
    gen = torch.Generator().manual_seed(0)
    base = rss_mib()
    if dev.type == "cpu":  # reset the peak RSS (VmHWM) so that making the data does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = job["tf32"]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    times = []
    for _ in range(job["warmup"] + job["iters"]):
        idx = sample_subsets(gen, n, S, m).to(dev)
        w0 = init_inner(gen, S, k, d2, torch.float32).to(dev)
        t0 = time.perf_counter()
        batch = outer.Batch(idx, m_tr, [w0])
        # outer.outer_step's parts, so that the all-reduce is timed on its own: the communication share of an outer
        # iteration, waiting for the slowest rank included (the device is synchronised around it)
        loss, fit = outer.share_hypergradient(encoder, opt, phi1, [phi2], batch, 0.1, obj, world)
        if world:
            wait()
            t1 = time.perf_counter()
            loss, fit = distributed.all_reduce(world, encoder, loss, fit)
            wait()
            comm.append(time.perf_counter() - t1)
        outer.clipped_step(encoder, opt)
        loss.item()  # waits for the device
        times.append(time.perf_counter() - t0)
    distributed.close(world)
    if world and world.rank != 0:
        sys.exit(0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        with open("/proc/self/status") as f:
            peak = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
    sec = float(np.median(times[job["warmup"]:]))
    flops = 4 * 2 * m_tr * (d2 + 1) * k * S * T
    passes = 2 if job["method"] == "first_order" else 4
    x_bytes = passes * m_tr * (d2 + 1) * (2 if obj.bf16 else 4) * S * T
    share = float(np.median(comm[job["warmup"]:]) / sec) if comm else 0.0
    err = bf16_error(encoder, phi1, phi2, batch, obj) if obj.bf16 and not world else None
    inner = plan and plan.inner_seconds(len(range(S)[distributed.share(world, S)]) if world else S, T)
    return {"seconds": sec, "inner_s": inner, "peak_mib": peak - base, "gflop": flops / 1e9, "x_gb": x_bytes / 1e9,
            "n": n, "allreduce_share": share, "bf16_error": err, "plan": plan and plan._asdict()}


def bf16_error(encoder, phi1, phi2, batch, obj):
    """Relative error ||g_bf16 - g_fp32|| / ||g_fp32|| of the hypergradient on the same subsets and inits (the
    planned bfloat16 kernel against the first float32 kernel that runs)."""
    grads = []
    for o in (obj._replace(bf16=False, plans=()), obj):
        encoder.zero_grad(set_to_none=True)
        outer.hypergradient(encoder, phi1, [phi2], batch, 0.1, o)
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def gemm_rate(device, size=2048, repeats=5):
    """Sustained float32 GEMM rate of this machine in GFLOP/s (median of repeats)."""
    dev = torch.device(device)
    a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / float(np.median(times[1:])) / 1e9


def copy_bandwidth(device, mib=512, repeats=5):
    """Streaming memory bandwidth in GB/s: a copy of mib MiB, bytes read + written (median of repeats)."""
    a = torch.ones(mib * 2**18, device=torch.device(device))
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        b.copy_(a)
        b[0].item()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / float(np.median(times[1:])) / 1e9


def cpu_isa():
    """What the products can use here: torch's CPU capability, the CPU's own vector and matrix flags, and the limits
    set through the documented variables of oneDNN, MKL and ATen (a limit emulates an older CPU on this one)."""
    flags = set()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx_ne_convert", "amx_bf16")
    limits = [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
              if v in os.environ]
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; flags "
            f"{' '.join(f for f in wanted if f in flags) or 'unknown'}; limits {' '.join(limits) or 'none (native)'}")


def run_job(job):
    cmd = [sys.executable, __file__, "--_worker", json.dumps(job)]
    env = dict(os.environ)
    if job["nproc"] > 1:  # torchrun, the cores split evenly between the processes
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(job["nproc"]), "--master_port",
                    str(29500 + os.getpid() % 1000)]
        env["OMP_NUM_THREADS"] = str(max(1, os.cpu_count() // job["nproc"]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        sys.exit(f"bench worker failed for {job}:\n{out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CV_SIZES = {"demo": [None], "paper": [1536], "two_spaces": [768, 1536]}  # dims of the spaces; None: the demo


def time_cv_scores(sizes, n=10000):
    """Seconds of the CV score (summed over the spaces) and the scores, ours beside scikit-learn's."""
    import warnings
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score
    from humelib.cvscore import cv_score
    rng = np.random.default_rng(0)
    print(f"{'CV score':11} {'spaces':>14} {'ours s':>8} {'sklearn s':>9} {'speed-up':>8} {'ours':>7} {'sklearn':>7}")
    for size in sizes:
        spaces = [np.load(DEMO["phi2_test"]) if d is None else rng.standard_normal((n, d), dtype=np.float32)
                  for d in CV_SIZES[size]]
        y = (spaces[-1] @ rng.standard_normal((spaces[-1].shape[1], 10))).argmax(1)
        t0 = time.perf_counter()
        ours = np.mean([cv_score(x, y) for x in spaces])
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = np.mean([cross_val_score(LogisticRegression(C=np.inf), x, y, n_jobs=-1,
                                           cv=KFold(10, shuffle=True, random_state=1)).mean() for x in spaces])
        t2 = time.perf_counter()
        dims = "+".join(str(x.shape[1]) for x in spaces)
        print(f"{size:11} {f'{len(y)} x {dims}':>14} {t1 - t0:8.2f} {t2 - t1:9.2f} {(t2 - t1) / (t1 - t0):7.2f}x "
              f"{ours:7.4f} {ref:7.4f}", flush=True)


def main():
    p = make_parser(__doc__)
    p.add_argument("--scale", nargs="+", choices=list(SCALES), default=["demo"], help="named problem sizes")
    p.add_argument("--methods", default="adjoint,unrolled,first_order",
                   type=choice_list(("adjoint", "bf16", "unrolled", "first_order")),
                   help="comma list of methods to time: adjoint, bf16 (adjoint with --bf16), unrolled, first_order")
    p.add_argument("--n", type=int_in(2), help="number of synthetic points (paper/imagenet); subsets covering most "
                   "points switch the engine to wide shared GEMMs")
    p.add_argument("--num_subsets", type=int_in(1), help="override the scale's subsets per outer iteration")
    p.add_argument("--adaptation_steps", type=int_list(1),
                   help="override the scale's inner steps; a comma list measures each")
    p.add_argument("--iters", type=int_in(1), default=2, help="timed outer iterations (median reported)")
    p.add_argument("--warmup", type=int_in(0), default=1, help="untimed outer iterations first")
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--nproc", default="1", type=int_list(1),
                   help="comma list of process counts (torchrun) to report scaling")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--cv_score", help="comma list of demo, paper, two_spaces: time the label-free CV score there, "
                   "ours beside scikit-learn's, instead of the outer iterations (scikit-learn's takes minutes)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        print(json.dumps(worker(json.loads(a._worker))))
        return
    if a.cv_score:
        sizes = a.cv_score.split(",")
        for s in sizes:
            if s not in CV_SIZES:
                p.error(f"--cv_score {s}: not one of {', '.join(CV_SIZES)}")
        return time_cv_scores(sizes)
    rate, bw = gemm_rate(a.device), copy_bandwidth(a.device)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; sustained GEMM rate {rate:.1f} GFLOP/s; streaming copy {bw:.1f} GB/s")
    print(f"ISA: {cpu_isa()}")
    print(f"{'scale':9} {'method':12} {'kernel, layout':22} {'procs':>5} {'S':>3} {'T':>4} {'s/iter':>9} "
          f"{'inner s':>8} {'peak MiB':>9} {'MiB/step':>8} {'vs unrolled':>12} {'of peak':>8} {'GB/s X':>7} "
          f"{'allreduce':>9} {'bf16 err':>8}")
    rows, first = [], {}
    for scale in a.scale:
        c = dict(SCALES[scale])
        c["n"] = a.n or c["n"]
        c["S"] = a.num_subsets or c["S"]
        steps = a.adaptation_steps or [c["T"]]
        for T, nproc in [(T, P) for T in steps for P in a.nproc]:
            ref = None
            for method in sorted(a.methods, key=lambda x: x != "unrolled"):  # reference first
                job = dict(c, scale=scale, T=T, method=method, device=a.device, tf32=a.tf32, iters=a.iters,
                           warmup=a.warmup, nproc=nproc)
                r = run_job(job)
                ref = r if method == "unrolled" else ref
                T0, peak0 = first.setdefault((scale, method, nproc), (T, r["peak_mib"]))
                per_step = (r["peak_mib"] - peak0) / (T - T0) if T != T0 else r["peak_mib"] / T
                row = dict(scale=scale, method=method, nproc=nproc, S=c["S"], T=T, n=r["n"], seconds=r["seconds"],
                           inner_seconds=r["inner_s"],
                           allreduce_share=r["allreduce_share"], peak_mib=r["peak_mib"], mib_per_step=per_step,
                           fraction_of_peak=r["gflop"] / r["seconds"] / rate, x_gb_per_s=r["x_gb"] / r["seconds"],
                           bandwidth_gb_per_s=bw, bf16_error=r["bf16_error"], plan=r["plan"],
                           speedup_vs_unrolled=ref["seconds"] / r["seconds"] if ref else None,
                           memory_vs_unrolled=r["peak_mib"] / ref["peak_mib"] if ref else None)
                rows.append(row)
                vs = "" if not ref else f"{row['speedup_vs_unrolled']:.2f}x"
                err = "" if r["bf16_error"] is None else f"{r['bf16_error']:.1e}"
                how = "plain matmuls" if not r["plan"] else f"{r['plan']['kernel']}, {r['plan']['layout']}" + \
                    (f" x{r['plan']['workers']}" if r["plan"]["workers"] > 1 else "")
                inner = "" if r["inner_s"] is None else f"{r['inner_s']:.3f}"
                print(f"{scale:9} {method:12} {how:22} {nproc:>5} {c['S']:>3} {T:>4} {r['seconds']:9.3f} {inner:>8} "
                      f"{r['peak_mib']:9.1f} {per_step:8.2f} {vs:>12} {row['fraction_of_peak']:8.1%} "
                      f"{row['x_gb_per_s']:7.1f} {r['allreduce_share']:9.1%} {err:>8}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "isa": cpu_isa(), "gemm_gflops": rate, "copy_gb_per_s": bw, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
