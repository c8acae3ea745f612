"""select_k.py: the k range and the flags passed on to hume.py are checked up front, the rules score a table as
stated, and on four well-separated blobs (phi1 = phi2 + noise) HUME's chance-corrected score picks k = 4 among 2..7.

The grid test runs select_k's main in process with each HUME run in process too (select_k.run_hume replaced by
hume.py's main, 12 tiny runs); one test runs the script as a real subprocess, whose runs are real hume.py processes.
"""
import json
import os

import numpy as np
import pytest

import hume
import select_k
from helpers import KERNEL, cli, describe, refused, run_script, save_npy
from humelib.runtime import HumeError

TINY = ["--num_iters", "30", "--num_subsets", "2", "--adaptation_steps", "20", "--outer_lr", "0.05",
        "--inner_lr", "auto", "--device", "cpu"] + KERNEL


def test_k_range_reads_ranges_and_single_values():
    assert select_k.parse_k_range(["2..5"]) == [2, 3, 4, 5]
    assert select_k.parse_k_range(["8", "4", "6..7", "4"]) == [4, 6, 7, 8]
    for bad in (["a"], ["1..3"], ["5..3"], ["2-7"]):
        with pytest.raises(HumeError, match="--k_range"):
            select_k.parse_k_range(bad)


@pytest.mark.parametrize("flag, passed", [("--k", ["--k", "3"]), ("--seed", ["--seed=3"]),
                                          ("--exp_path", ["--exp_path", "x"]), ("--quiet", ["--", "--quiet"])])
def test_flags_that_select_k_sets_itself_are_refused(flag, passed, tmp_path):
    with pytest.raises(HumeError, match=f"^{flag} is set by select_k.py"):
        select_k.main(["--out", str(tmp_path / "out"), *passed])
    assert not (tmp_path / "out").exists()


def test_a_bad_hume_flag_fails_before_any_run(tmp_path):
    with pytest.raises(SystemExit) as e:
        select_k.main(["--out", str(tmp_path / "out"), "--num_iterz", "3"])  # a typo of --num_iters
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    refused(cli(select_k.main, ["--out", tmp_path / "out", "--outer_lr", "-1"]), "--outer_lr must be > 0")
    assert not (tmp_path / "out").exists()


def test_rules_score_the_mean_cv_as_stated():
    results = {2: [{"CV_Score": 1.0}, {"CV_Score": 1.0}], 4: [{"CV_Score": 0.99}, {"CV_Score": 0.97}],
               5: [{"CV_Score": 0.9}, {"CV_Score": 0.9}]}
    rows, chosen = select_k.score_table(results, "raw")
    assert chosen == 2 and [r["cv_mean"] for r in rows] == pytest.approx([1.0, 0.98, 0.9])
    assert rows[1]["cv_std"] == pytest.approx(0.01)
    rows, chosen = select_k.score_table(results, "gain")
    assert chosen == 4 and [r["score"] for r in rows] == pytest.approx([0.5, 0.73, 0.7])
    rows, chosen = select_k.score_table(results, "kappa")
    assert chosen == 2 and rows[1]["score"] == pytest.approx((0.98 - 0.25) / 0.75)


def four_blobs(folder, n=200, d=8, seed=0, phi1_noise=1.5):
    """Four well-separated centres in phi2 (unit noise); phi1 = phi2 + noise, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 4)
    phi2 = rng.normal(size=(4, d))[y] * 4 + rng.normal(size=(n, d))
    phi1 = phi2 + phi1_noise * rng.normal(size=(n, d))
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    return [a for name, arr in (("phi1", phi1), ("phi2", phi2)) for a in
            (f"--{name}_path", save_npy(folder, name, arr.astype(np.float32)))] + \
        ["--gt_labels_path", save_npy(folder, "y", y)]


def in_process_hume(argv):
    """select_k.run_hume's stand-in: the same hume.py run, through its main in this process."""
    code, _, err = cli(hume.main, argv)
    if code != 0:
        raise HumeError(f"hume.py failed: {err.strip()}")


def test_k4_scores_best_among_2_to_7_on_four_blobs(tmp_path, monkeypatch):
    data = four_blobs(str(tmp_path / "data"))
    monkeypatch.setattr(select_k, "run_hume", in_process_hume)
    code, out, err = cli(select_k.main, ["--k_range", "2..7", "--seeds", "0", "1", "--out", tmp_path / "runs",
                                         "--json", tmp_path / "k.json", "--", *data, *TINY])
    assert code == 0, err
    assert "chosen k = 4" in out, out
    out = json.load(open(tmp_path / "k.json"))
    table = {r["k"]: r for r in out["table"]}
    assert out["chosen_k"] == 4 and sorted(table) == list(range(2, 8))
    runner_up = max(r["score"] for k, r in table.items() if k != 4)
    assert table[4]["score"] > runner_up + 0.03, table
    assert table[4]["acc_mean"] > 0.95  # the labeling chosen is the blobs (labels only shown, never used)
    for k in range(2, 8):
        assert all(os.path.exists(tmp_path / "runs" / f"k{k}" / f"results_{s}.pickle") for s in (0, 1))


def test_the_script_runs_each_k_as_a_hume_process(tmp_path):
    data = four_blobs(str(tmp_path / "data"))
    proc = run_script("select_k.py", ["--k_range", "3", "4", "--seeds", "0", "--out", tmp_path / "runs", "--", *data,
                                      *TINY, "--num_iters", "5"])
    assert proc.returncode == 0, describe(proc)
    assert "chosen k = " in proc.stdout and all((tmp_path / "runs" / f"k{k}" / "results_0.pickle").exists()
                                                for k in (3, 4)), describe(proc)
