"""sweep.sh and slurm/hume_array.sbatch from the outside.

- Real runs (hume.py and evaluate.py on a tiny synthetic problem, CPU, run once per module): a 2-seed sweep writes
  both tasks, their logs and the evaluation; rerunning it skips both seeds without touching them.
- Scheduling and failures, with stand-ins for the interpreter ($PYTHON: echoes its arguments, or fails like
  hume.py given a bad flag) and for `nvidia-smi`: GPUs get the seeds round robin; a failing seed makes the sweep
  exit 1 naming the seed and its log, and no further seed starts; the SLURM script runs the array index as the seed.
- Bad options: exit 2, one stderr line, nothing created. Both scripts pass `bash -n`.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import KERNEL, REPO, child_env, write_problem

SWEEP = os.path.join(REPO, "sweep.sh")
SBATCH = os.path.join(REPO, "slurm", "hume_array.sbatch")
TINY = ["--k", "4", "--num_iters", "4", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "200",
        "--eval_every", "2", "--device", "cpu", "--quiet"] + KERNEL


def bash(script, args, cwd, env=None, timeout=300):
    full = {k: v for k, v in child_env().items() if not k.startswith("SLURM_") and
            k not in ("CUDA_VISIBLE_DEVICES", "EXP_PATH", "HUME_ARGS", "HUME_DIR")}
    full["PYTHON"] = sys.executable
    full.update(env or {})
    return subprocess.run(["bash", script] + [str(a) for a in args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def show(proc):
    return f"\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def stand_ins(folder, gpus):
    """A bin folder with a fake `nvidia-smi` listing `gpus` GPUs, a fake interpreter that echoes its arguments
    and the GPU it was given (so sweep.sh's scheduling shows in the logs without running torch), and one that fails
    as hume.py does on a bad flag. Returns the environment that selects them (PYTHON: the echoing one)."""
    os.makedirs(folder, exist_ok=True)
    smi = "".join(f'echo "GPU {i}: Fake GPU (UUID: GPU-{i})"\n' for i in range(gpus)) or "exit 9\n"
    scripts = {"nvidia-smi": smi, "fake_python": 'echo "GPU=${CUDA_VISIBLE_DEVICES:-none} ARGS=$*"\n',
               "failing_python": 'echo "error: unrecognized arguments: --no_such_flag" >&2\nexit 2\n'}
    for name, body in scripts.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, 0o755)
    return {"PATH": folder + os.pathsep + os.environ["PATH"], "PYTHON": os.path.join(folder, "fake_python")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    P = write_problem(str(root / "data"), n=240, k=4, n_val=80)
    data = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--phi1_path_val", P["phi1_val"],
            "--phi2_path_val", P["phi2_val"], "--gt_labels_path", P["labels_val"]] + TINY
    exp = str(root / "exp")
    ok = bash(SWEEP, ["--seeds", "0 1", "--jobs", "2", "--eval_phi1", P["phi1_val"], "--eval_labels", P["labels_val"],
                      "--", "--exp_path", exp] + data, str(root))
    rerun = ["--seeds", "0 1", "--no_eval", "--", "--exp_path", exp] + data
    return {"root": root, "exp": exp, "ok": ok, "rerun": rerun}


def test_sweep_writes_every_seed_its_log_and_the_evaluation(runs):
    ok, exp = runs["ok"], runs["exp"]
    assert ok.returncode == 0, show(ok)
    for s in (0, 1):
        for name in (f"linear_task_{s}.pt", f"results_{s}.pickle", f"metrics_{s}.jsonl", f"log_{s}.txt"):
            assert os.path.isfile(os.path.join(exp, name)), name
        assert f"seed {s}: done" in ok.stdout
        with open(os.path.join(exp, f"log_{s}.txt")) as f:
            assert f"--seed {s}" in f.readline()  # the log starts with the exact command
    with open(os.path.join(exp, "evaluation.json")) as f:
        ev = json.load(f)
    assert sorted(ev["tasks"]) == ["0", "1"] and set(ev["ensemble"]) == {"acc", "ari", "nmi"}
    assert "ACC" in ok.stdout  # evaluate.py's report


def test_rerun_skips_finished_seeds_without_touching_them(runs):
    files = [os.path.join(runs["exp"], f"{stem}_{s}.{ext}") for s in (0, 1)
             for stem, ext in (("linear_task", "pt"), ("results", "pickle"))]
    assert all(os.path.isfile(f) for f in files), show(runs["ok"])
    before = {f: os.stat(f).st_mtime_ns for f in files}
    again = bash(SWEEP, runs["rerun"], str(runs["root"]))
    assert again.returncode == 0, show(again)
    for s in (0, 1):
        assert f"seed {s}: skipped" in again.stdout
    assert "0 seed(s) to run, 2 skipped" in again.stdout
    assert {f: os.stat(f).st_mtime_ns for f in files} == before


def test_failing_seed_exits_1_names_seed_and_log_and_starts_no_other(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=0)
    env["PYTHON"] = os.path.join(tmp_path, "bin", "failing_python")
    exp = tmp_path / "exp"
    fail = bash(SWEEP, ["--seeds", "5 6", "--jobs", "1", "--", "--exp_path", exp, "--no_such_flag"], tmp_path, env)
    assert fail.returncode == 1, show(fail)
    assert "seed 5 FAILED (exit 2)" in fail.stderr and str(exp / "log_5.txt") in fail.stderr, show(fail)
    assert "unrecognized arguments" in fail.stderr  # the log's last lines are shown
    assert "unrecognized arguments" in (exp / "log_5.txt").read_text()
    assert not (exp / "log_6.txt").exists() and not (exp / "evaluation.json").exists()


def test_gpus_get_seeds_round_robin_one_run_per_gpu(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=2)
    exp = tmp_path / "exp"
    proc = bash(SWEEP, ["--seeds", "0 1 2 3", "--no_eval", "--", "--exp_path", exp, "--k", "4"], tmp_path, env)
    assert proc.returncode == 0, show(proc)
    assert "2 at a time on GPUs: 0 1" in proc.stdout
    for s in range(4):
        last = (exp / f"log_{s}.txt").read_text().splitlines()[-1]
        assert last.startswith(f"GPU={s % 2} ARGS=") and last.endswith(f"--exp_path {exp} --k 4 --seed {s}")


def test_no_gpu_runs_on_cpu_one_at_a_time(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=0)
    exp = tmp_path / "exp"
    proc = bash(SWEEP, ["--seeds", "7", "--no_eval", "--", "--exp_path", exp], tmp_path, env)
    assert proc.returncode == 0, show(proc)
    assert "1 at a time on CPU" in proc.stdout
    assert (exp / "log_7.txt").read_text().splitlines()[-1].endswith("--device cpu --seed 7")


def test_numbers_are_read_in_base_10(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=0)
    exp = tmp_path / "exp"
    proc = bash(SWEEP, ["--jobs", "08", "--seeds", "007 09", "--no_eval", "--", "--exp_path", exp], tmp_path, env)
    assert proc.returncode == 0 and "2 seed(s) to run, 0 skipped; 8 at a time" in proc.stdout, show(proc)
    assert (exp / "log_7.txt").read_text().splitlines()[-1].endswith("--seed 7")
    assert (exp / "log_9.txt").read_text().splitlines()[-1].endswith("--seed 9")


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs must be a positive integer"),
    (["--seeds", "0 x"], "'x' is not an integer"),
    (["--seeds", ""], "--seeds is empty"),
    # numbers are read in base 10 and checked before anything starts (bash alone reads 08 as octal)
    (["--jobs", "x"], "--jobs: 'x' is not an integer"),
    (["--jobs", "-1"], "--jobs: '-1' is not an integer"),
    (["--jobs", "000"], "--jobs must be a positive integer"),
    (["--jobs", ""], "--jobs needs a value"),
    (["--jobs", "99999999999999999999999"], "--jobs: 99999999999999999999999 is more than 4096"),
    (["--jobs", "\u00b2"], "is not an integer"),
    (["--seeds", "0 -1"], "--seeds: '-1' is not an integer"),
    (["--seeds", "4294967296"], "--seeds: 4294967296 is more than 4294967295"),
    (["--seeds", "0x1"], "--seeds: '0x1' is not an integer"),
    (["--seeds", "1_0"], "--seeds: '1_0' is not an integer"),
    (["--seeds", "\u00b2"], "is not an integer"),
    (["--seeds", "99999999999999999999999"], "is more than 4294967295"),
    (["--bogus"], "unknown option --bogus"),
    (["--eval_labels", "y.npy"], "--eval_labels needs --eval_phi1"),
    (["--", "--seed", "3"], "use sweep.sh --seeds"),
    (["--", "--exp", "elsewhere"], "write --exp_path in full"),  # hume.py's argparse would take the abbreviation
    (["--", "--phi1_path", "p.npy", "--phi2_path", "q.npy"], "pass --eval_phi1"),
])
def test_bad_options_exit_2_with_one_line_and_create_nothing(tmp_path, args, message):
    if "--" not in args:
        args = args + ["--"]
    proc = bash(SWEEP, args + ["--exp_path", tmp_path / "exp"], tmp_path)
    assert proc.returncode == 2, show(proc)
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, show(proc)
    assert not (tmp_path / "exp").exists()


def test_help_shows_usage(tmp_path):
    proc = bash(SWEEP, ["-h"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash sweep.sh")


@pytest.mark.parametrize("script", [SWEEP, SBATCH])
def test_scripts_parse_with_bash_n(script):
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_runs_the_array_index_as_the_seed(tmp_path):
    env = stand_ins(str(tmp_path / "bin"), gpus=1)
    env.update(SLURM_ARRAY_TASK_ID="3", SLURM_SUBMIT_DIR=REPO, EXP_PATH=str(tmp_path / "exp"),
               HUME_ARGS="--k 4  --num_iters 5", CUDA_VISIBLE_DEVICES="0")
    proc = bash(SBATCH, [], tmp_path, env)
    assert proc.returncode == 0, show(proc)
    assert proc.stdout.splitlines()[-1] == (f"GPU=0 ARGS={REPO}/hume.py --k 4 --num_iters 5 "
                                            f"--exp_path {tmp_path / 'exp'} --seed 3")


def test_sbatch_skips_an_existing_task(runs):
    assert os.path.isfile(os.path.join(runs["exp"], "results_1.pickle")), show(runs["ok"])
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_SUBMIT_DIR": REPO, "EXP_PATH": runs["exp"], "PYTHON": "false"}
    proc = bash(SBATCH, [], runs["root"], env)
    assert proc.returncode == 0 and "seed 1: skipped" in proc.stdout, show(proc)


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_ARRAY_TASK_ID is not set"),
    ({"SLURM_ARRAY_TASK_ID": "0", "HUME_ARGS": "--k 4 --seed 1"}, "must not set --seed"),
    ({"SLURM_ARRAY_TASK_ID": "0", "HUME_ARGS": "--exp_path x"}, "set EXP_PATH"),
])
def test_sbatch_bad_environment_exits_2_with_one_line(tmp_path, env, message):
    env = dict(env, SLURM_SUBMIT_DIR=REPO, EXP_PATH=str(tmp_path / "exp"))
    proc = bash(SBATCH, [], tmp_path, env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and message in proc.stderr, show(proc)
