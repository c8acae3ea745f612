"""Whole hume.py runs (main(argv) in process): a crashed and resumed run equals an uninterrupted one, --mmap equals
in-memory, adjoint equals unrolled."""
import os

import pytest
import torch

from humelib import checkpoint
import hume
from helpers import KERNEL, cli, write_problem

BUDGET = ["--k", "4", "--num_subsets", "3", "--adaptation_steps", "10", "--subset_size", "120", "--outer_lr", "0.01",
          "--inner_lr", "auto", "--device", "cpu", "--quiet", "--seed", "3"] + KERNEL


class Crash(BaseException):
    """Stands for the process dying (a kill, a power cut): nothing of hume.py's own handles it."""


def crash_after_checkpoint(monkeypatch, at):
    """From now on, hume.py dies right after writing the checkpoint of iteration `at`."""
    save = checkpoint.save

    def save_then_crash(run, cfg, iteration, *rest):
        save(run, cfg, iteration, *rest)
        if iteration == at:
            raise Crash
    monkeypatch.setattr(checkpoint, "save", save_then_crash)


def task(folder, seed=3):
    return torch.load(os.path.join(folder, f"linear_task_{seed}.pt"), weights_only=True)


def paths(p, val=False):
    out = ["--phi1_path", p["phi1"], "--phi2_path", p["phi2"]]
    if val:
        out += ["--phi1_path_val", p["phi1_val"], "--phi2_path_val", p["phi2_val"], "--gt_labels_path",
                p["labels_val"]]
    return out


def test_crashed_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "8", "--ckpt_every", "2", "--eval_every", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    hume.main(common + ["--exp_path", full])
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 4)
        with pytest.raises(Crash):
            hume.main(common + ["--exp_path", cut])
    assert os.path.isfile(os.path.join(cut, "checkpoint_3.pt"))
    assert not os.path.exists(os.path.join(cut, "linear_task_3.pt"))
    hume.main(common + ["--exp_path", cut, "--resume"])
    a, b = task(full), task(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [line for line in open(os.path.join(cut, "metrics_3.jsonl"))]
    assert len(log) == 8  # iterations 1..8 once each: lines after the checkpoint were dropped, then rewritten


def test_resume_refuses_changed_settings(tmp_path, monkeypatch):
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "4", "--ckpt_every", "2", "--exp_path", str(tmp_path / "r")]
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 2)
        with pytest.raises(Crash):
            hume.main(common)
    code, _, err = cli(hume.main, common + ["--resume", "--H_reg", "5"])
    assert code == 2
    assert err.count("\n") == 1 and "--H_reg" in err


@pytest.mark.parametrize("extra", [[], ["--inner_lr", "auto"]])  # auto: phi2 rows scaled as they are read
def test_mmap_gives_the_same_task_as_in_memory(tmp_path, extra):
    p = write_problem(str(tmp_path / "data"), n=300, n_val=60)
    common = paths(p, val=True) + BUDGET + ["--num_iters", "4"] + extra
    hume.main(common + ["--exp_path", str(tmp_path / "mem")])
    hume.main(common + ["--exp_path", str(tmp_path / "mmap"), "--mmap"])
    a, b = task(str(tmp_path / "mem")), task(str(tmp_path / "mmap"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_adjoint_and_unrolled_runs_give_the_same_task(tmp_path):
    p = write_problem(str(tmp_path / "data"), n=200)
    common = paths(p) + BUDGET + ["--num_iters", "3"]
    hume.main(common + ["--exp_path", str(tmp_path / "adj"), "--hypergrad", "adjoint"])
    hume.main(common + ["--exp_path", str(tmp_path / "unr"), "--hypergrad", "unrolled"])
    a, b = task(str(tmp_path / "adj")), task(str(tmp_path / "unr"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_the_log_ends_with_the_score_and_the_plan_begins_it(tmp_path):
    """The first record says how the inner loops run (kernel, layout, timings of every candidate that ran); the last
    holds the CV score the results carry and the seconds it took, beside that evaluation's metrics."""
    import json
    from humelib.fileio import load_results
    p = write_problem(str(tmp_path / "data"), n=200)
    out = str(tmp_path / "run")
    argv = paths(p) + BUDGET + ["--kernel", "auto", "--num_iters", "4", "--eval_every", "2", "--exp_path", out]
    assert cli(hume.main, argv)[0] == 0
    records = [json.loads(ln) for ln in open(os.path.join(out, "metrics_3.jsonl"))]
    assert [r["iteration"] for r in records] == [2, 4]
    plan = records[0]["plan"]["spaces"][0]
    assert plan["kernel"] in plan["ms_per_step"][plan["layout"] if plan["subsets_at_once"] == 1 else
                                                 f"subset x{plan['subsets_at_once']}"]
    results = load_results(os.path.join(out, "results_3.pickle"))
    assert records[-1]["cv_score"] == results["CV_Score"] and records[-1]["cv_seconds"] == results["cv_seconds"] >= 0
    assert "cv_score" not in records[0]


def test_resume_keeps_the_plan_the_run_started_with(tmp_path, monkeypatch):
    """--kernel auto: the resumed run continues with the checkpoint's layout and kernel, even when this start's
    timing would pick another (a close race), so the rest of the run rounds as it would have."""
    import json
    from humelib import products
    p = write_problem(str(tmp_path / "data"), n=200)
    auto = [a for a in BUDGET if a not in ("--kernel", "blas")]
    out = str(tmp_path / "run")
    common = paths(p) + auto + ["--num_iters", "4", "--ckpt_every", "2", "--eval_every", "1", "--exp_path", out]
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Crash):
        hume.main(common)
    first = [json.loads(ln) for ln in open(os.path.join(out, "metrics_3.jsonl"))][0]["plan"]["spaces"][0]
    other = "blas_t" if first["kernel"] != "blas_t" else "blas"
    monkeypatch.setattr(products, "plan", lambda *a, **kw: products.Plan("subset", other, {}, {}, 1))
    assert cli(hume.main, common + ["--resume"])[0] == 0
    records = [json.loads(ln) for ln in open(os.path.join(out, "metrics_3.jsonl"))]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    resumed = records[2]["plan"]["spaces"][0]  # the first record the resumed process wrote
    assert (resumed["layout"], resumed["kernel"], resumed["subsets_at_once"]) == \
        (first["layout"], first["kernel"], first["subsets_at_once"])


@pytest.mark.parametrize("saved", [[["subset", "no-such-kernel", 1]], [["subset", "blas", 0]], "blas", [["subset"]],
                                   [["subset", "blas-bf16", 1]]])
def test_resume_takes_a_new_plan_when_the_saved_one_is_not_usable(tmp_path, monkeypatch, saved):
    """A checkpoint whose plan names no kernel, an impossible layout or the other precision: this start's plan."""
    p = write_problem(str(tmp_path / "data"), n=200)
    auto = [a for a in BUDGET if a not in ("--kernel", "blas")]
    out = str(tmp_path / "run")
    common = paths(p) + auto + ["--num_iters", "3", "--ckpt_every", "2", "--exp_path", out]
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Crash):
        hume.main(common)
    path = os.path.join(out, "checkpoint_3.pt")
    state = torch.load(path, weights_only=True)
    state["extra"]["plans"] = saved
    torch.save(state, path)
    assert cli(hume.main, common + ["--resume"])[0] == 0
