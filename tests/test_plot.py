"""plot.py on a real tiny HUME run (two seeds, labels given, synthetic blobs): every figure is a non-blank PNG of
the size plot.py declares; without labels the figures that need them are skipped with one note; bad folders are
one-line errors (exit code 2).

Everything runs in this process (hume.main, plot.main): a subprocess would pay `import torch` again each time.
"""
import os
import shutil

import matplotlib.image
import numpy as np
import pytest

import hume
import plot
from helpers import KERNEL, write_problem
from humelib.runtime import HumeError, run_cli

TINY = ["--k", "4", "--num_iters", "4", "--num_subsets", "2", "--adaptation_steps", "5", "--subset_size", "200",
        "--eval_every", "2", "--device", "cpu", "--quiet"] + KERNEL


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    P = write_problem(str(root / "data"), n=240, k=4, n_val=80)
    exp = str(root / "exp")
    data = ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--phi1_path_val", P["phi1_val"],
            "--phi2_path_val", P["phi2_val"], "--gt_labels_path", P["labels_val"], "--exp_path", exp] + TINY
    for seed in ("0", "1"):
        hume.main(data + ["--seed", seed])
    return {"root": root, "exp": exp, "P": P}


def written(out):
    """The paths plot.py printed (one per line, after any notes)."""
    return [line for line in out.splitlines() if line.endswith(".png")]


def test_every_figure_is_a_nonblank_png_of_the_declared_size(run, capsys, tmp_path):
    plot.main(["--tasks_path", run["exp"], "--out", str(tmp_path)])
    paths = written(capsys.readouterr().out)
    assert [os.path.basename(p) for p in paths] == [f"exp_{name}.png" for name in
                                                    ("curves", "confusion", "cv_vs_acc", "cluster_sizes")]
    for path in paths:
        name = os.path.basename(path)[len("exp_"):-len(".png")]
        img = matplotlib.image.imread(path)
        w, h = plot.FIGSIZE[name]
        assert img.shape[:2] == (round(h * plot.DPI), round(w * plot.DPI)), name
        assert np.std(img[..., :3]) > 0.05, f"{name} looks blank"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temporary files left


def test_without_labels_the_figures_needing_them_are_skipped_with_one_note(run, capsys, tmp_path):
    plot.main(["--tasks_path", run["exp"], "--out", str(tmp_path), "--phi1_path", run["P"]["phi1_val"],
               "--prefix", "nolabels"])
    out = capsys.readouterr().out
    assert [os.path.basename(p) for p in written(out)] == ["nolabels_curves.png", "nolabels_cluster_sizes.png"]
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no ground-truth labels" in notes[0]


def test_missing_folder_exits_2_with_one_line(capsys, tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(SystemExit) as exit_:
        run_cli(plot.main, ["--tasks_path", str(missing), "--out", str(tmp_path / "figs")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --tasks_path {missing}: no such folder"]
    assert not (tmp_path / "figs").exists()


def test_folder_without_tasks_or_without_metrics_is_a_clear_error(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HumeError, match="no linear_task"):
        plot.main(["--tasks_path", str(empty), "--out", str(tmp_path / "figs")])
    paper = tmp_path / "paper"  # tasks as the paper's hume.py leaves them: no metrics logs
    paper.mkdir()
    for name in ("linear_task_0.pt", "results_0.pickle"):
        shutil.copy(os.path.join(run["exp"], name), paper)
    with pytest.raises(HumeError, match="no metrics_"):
        plot.main(["--tasks_path", str(paper), "--out", str(tmp_path / "figs")])
    assert not (tmp_path / "figs").exists()


def test_labels_without_points_is_a_clear_error(run, tmp_path):
    with pytest.raises(HumeError, match="--gt_labels_path needs --phi1_path"):
        plot.main(["--tasks_path", run["exp"], "--out", str(tmp_path), "--gt_labels_path", run["P"]["labels_val"]])
