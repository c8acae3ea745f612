"""Every write may fail: a full or read-only disk ends in one line "cannot write PATH (reason)", exit 2, no
traceback and no .tmp_* left; a metrics log cut short or hand-edited never breaks --resume with a traceback; a fresh
run does not wipe a finished seed's log before it has something to write. Disks are tiny tmpfs mounts (root only:
skipped otherwise)."""
import json
import os
import subprocess

import pytest

import annotate
import baselines
import evaluate
import hume
import plot
from humelib import fileio, outer, runtime
from helpers import FAST, cli, refused, temp_files, write_problem


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=200, k=4)


@pytest.fixture(scope="module")
def tasks(P, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tasks"))
    assert cli(hume.main, data(P) + FAST + ["--exp_path", folder, "--seed", "0"])[0] == 0
    return folder


def data(P):
    return ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--gt_labels_path", P["labels"], "--k", "4"]


def mount(path, *options):
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k",) + options), "tmpfs", path],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'not root'}): disk-full cases need root")


@pytest.fixture
def full(tmp_path):
    """A 64 KiB tmpfs, filled up, with an empty folder `out` made before it filled."""
    disk = str(tmp_path / "disk")
    mount(disk)
    os.makedirs(os.path.join(disk, "out"))
    subprocess.run(["dd", "if=/dev/zero", f"of={disk}/fill", "bs=4k"], capture_output=True)
    yield os.path.join(disk, "out")
    subprocess.run(["umount", disk])


@pytest.fixture
def readonly(tmp_path):
    disk = str(tmp_path / "ro")
    mount(disk)
    os.makedirs(os.path.join(disk, "out"))
    subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
    yield os.path.join(disk, "out")
    subprocess.run(["umount", disk])


def written(folder):
    return sorted(f for f in os.listdir(folder) if f != "fill")


def test_hume_on_a_full_disk_is_one_line_and_leaves_no_half_line(P, full):
    line = refused(cli(hume.main, data(P) + FAST + ["--exp_path", full, "--seed", "0"]), "cannot write",
                   "owner_0.txt", "No space left on device")  # its first write, before any training
    assert "Traceback" not in line and not temp_files(full)
    assert written(full) == ["hume_0.lock"]  # no half-written owner file (a cut log line: the test below)


@pytest.mark.parametrize("name", ["torch_save", "pickle_save", "json_save"])
def test_atomic_writers_on_a_full_disk_raise_one_message_and_leave_nothing(full, name):
    path = os.path.join(full, "out.bin")
    with pytest.raises(runtime.HumeError, match=r"cannot write .*out\.bin \(No space left on device\)"):
        getattr(fileio, name)({"x": list(range(20000))}, path)
    assert written(full) == []


def test_append_jsonl_on_a_full_disk_cuts_back_its_partial_line(full):
    path = os.path.join(full, "log.jsonl")
    with pytest.raises(runtime.HumeError, match="No space left on device"):
        fileio.append_jsonl(path, {"x": "y" * 20000})
    assert open(path).read() == ""


@pytest.mark.parametrize("script", ["evaluate", "plot", "annotate", "baselines"])
def test_report_writers_on_a_full_disk_are_one_line(P, tasks, full, script):
    out = os.path.join(full, "report")
    argv = {"evaluate": (evaluate.main, ["--tasks_path", tasks, "--phi1_path", P["phi1"], "--json", out + ".json"]),
            "plot": (plot.main, ["--tasks_path", tasks, "--out", full]),
            "annotate": (annotate.main, ["--tasks_path", tasks, "--phi1_path", P["phi1"], "--phi2_path", P["phi2"],
                                         "--budget", "200", "--out", out + ".csv", "--quiet"]),
            "baselines": (baselines.main, ["--method", "kmeans", "--phi_path", P["phi2"], "--gt_labels_path",
                                           P["labels"], "--k", "4", "--json", out + ".json"])}[script]
    refused(cli(*argv), "cannot write", "No space left on device")
    assert written(full) == [] and not temp_files(full)


def test_read_only_exp_path_is_refused_before_work(P, readonly):
    refused(cli(hume.main, data(P) + FAST + ["--exp_path", readonly]), "--exp_path", "not writable")
    refused(cli(evaluate.main, ["--tasks_path", "nowhere", "--json", os.path.join(readonly, "e.json")]), "--json")


def finished_run(P, folder, *extra):
    argv = data(P) + FAST + ["--exp_path", folder, "--seed", "0", "--eval_every", "1", "--ckpt_every", "2",
                             "--num_iters", "4"] + list(extra)
    assert cli(hume.main, argv)[0] == 0
    return argv


def test_resume_drops_a_partial_last_log_line(P, tmp_path):
    folder = str(tmp_path / "run")
    argv = finished_run(P, folder)
    log = os.path.join(folder, "metrics_0.jsonl")
    with open(log, "a") as f:
        f.write('{"iteration": 5, "lo')  # killed mid-write
    assert cli(hume.main, argv + ["--resume"])[0] == 0
    assert [json.loads(ln)["iteration"] for ln in open(log)] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad, needle", [("not json\n", "not a JSON line"), ('{"loss": 1}\n', "no iteration"),
                                         ('{"iteration": "two"}\n', "is not a number")])
def test_a_bad_line_in_the_middle_of_the_log_names_file_and_line(P, tmp_path, bad, needle):
    folder = str(tmp_path / "run")
    argv = finished_run(P, folder)
    log = os.path.join(folder, "metrics_0.jsonl")
    lines = open(log).readlines()
    open(log, "w").writelines(lines[:1] + [bad] + lines[1:])
    refused(cli(hume.main, argv + ["--resume"]), "metrics_0.jsonl:2", needle)
    if "iteration" not in needle:
        refused(cli(plot.main, ["--tasks_path", folder, "--out", str(tmp_path / "fig")]), "metrics_0.jsonl:2")


def test_a_fresh_run_that_fails_early_keeps_the_finished_log(P, tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    argv = finished_run(P, folder)
    log = os.path.join(folder, "metrics_0.jsonl")
    before = open(log).read()

    def fail(*a, **k):
        raise runtime.HumeError("simulated failure in the first iteration")
    monkeypatch.setattr(outer, "outer_step", fail)
    refused(cli(hume.main, argv), "simulated failure")
    assert open(log).read() == before


def test_plot_ignores_a_partial_last_line_of_a_running_seed(P, tasks, tmp_path):
    with open(os.path.join(tasks, "metrics_0.jsonl"), "a") as f:
        f.write('{"iteration": 9')
    try:
        assert cli(plot.main, ["--tasks_path", tasks, "--out", str(tmp_path / "fig")])[0] == 0
    finally:
        lines = open(os.path.join(tasks, "metrics_0.jsonl")).read().rsplit("\n", 1)[0] + "\n"
        open(os.path.join(tasks, "metrics_0.jsonl"), "w").write(lines)
