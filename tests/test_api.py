"""humelib's Python API against the scripts: fit_hume and fit_turtle with a script's settings and seed give the
labeling, the CV score and the task the script writes (its files read back with plain torch and pickle); the
README's Python example runs as printed (with fewer iterations); bad settings raise one HumeError."""
import contextlib
import io
import os
import pickle
import re

import numpy as np
import pytest
import torch

import hume
import humelib
import run_turtle
from helpers import REPO, cli

# --kernel pinned: the script and the API each time the planner's candidates; one kernel makes them bit-identical
HUME_FLAGS = {"outer_lr": 0.01, "num_subsets": 2, "adaptation_steps": 10, "num_iters": 4, "seed": 0,
              "kernel": "blas"}
TURTLE_FLAGS = {"T": 4, "M": 2, "seed": 0}


def argv(flags):
    return [x for name, value in flags.items() for x in (f"--{name}", str(value))] + ["--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def demo():
    return humelib.demo()


def test_fit_hume_gives_the_labeling_score_and_task_of_hume_py(demo, tmp_path):
    out = str(tmp_path / "cli")
    assert cli(hume.main, argv(HUME_FLAGS) + ["--exp_path", out])[0] == 0  # the bundled demo, inductive
    with open(os.path.join(out, "results_0.pickle"), "rb") as f:
        saved = pickle.load(f)  # our own file, just written
    task = torch.load(os.path.join(out, "linear_task_0.pt"), weights_only=True)
    fit = humelib.fit_hume(demo["phi1"], demo["phi2"], phi1_val=demo["phi1_test"], phi2_val=demo["phi2_test"],
                           y_val=demo["y_test"], device="cpu", **HUME_FLAGS)
    assert np.array_equal(fit.results["preds"], saved["preds"])
    assert np.array_equal(fit.labels(demo["phi1_test"]), saved["preds"])
    assert fit.results["CV_Score"] == saved["CV_Score"] and fit.results["metrics"] == saved["metrics"]
    assert task.keys() == fit.encoder.state_dict().keys()
    assert all(torch.equal(task[k], v) for k, v in fit.encoder.state_dict().items())
    assert fit.cv_score(demo["phi2_test"], saved["preds"]) == pytest.approx(saved["CV_Score"], abs=1e-12)


def test_fit_turtle_gives_the_labeling_and_score_of_run_turtle_py(demo, tmp_path):
    out = str(tmp_path / "cli")
    assert cli(run_turtle.main, argv(TURTLE_FLAGS) + ["--exp_path", out])[0] == 0  # the demo's phi2
    with open(os.path.join(out, "results_0.pickle"), "rb") as f:
        saved = pickle.load(f)
    fit = humelib.fit_turtle([demo["phi2"]], phis_val=[demo["phi2_test"]], y_val=demo["y_test"], device="cpu",
                             **TURTLE_FLAGS)
    assert np.array_equal(fit.results["preds"], saved["preds"])
    assert np.array_equal(fit.labels(demo["phi2_test"]), saved["preds"])
    assert fit.results["CV_Score"] == saved["CV_Score"]


def test_the_readme_python_example_runs_as_printed(demo):
    readme = open(os.path.join(REPO, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    assert "num_iters=150" in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("num_iters=150", "num_iters=2"), {})  # the same code, fewer outer iterations
    cv, acc = (float(x) for x in out.getvalue().split())
    assert 0 <= cv <= 1 and 0 <= acc <= 1


@pytest.mark.parametrize("flags, needle", [
    ({"outer_lr": -1}, "--outer_lr must be > 0"),
    ({"exp_path": "x"}, "not a setting here: exp_path"),
    ({"num_iter": 3}, "not a setting here: num_iter"),
    ({"kernel": "fast"}, "--kernel invalid choice"),
    ({"train_fraction": 1.0}, "--train_fraction must be between 0 and 1"),
    ({"k": 60}, "larger than phi1's dimension"),
])
def test_bad_hume_settings_raise_one_hume_error(demo, flags, needle):
    with pytest.raises(humelib.HumeError, match=re.escape(needle)):
        humelib.fit_hume(demo["phi1"], demo["phi2"], **flags)


@pytest.mark.parametrize("arrays, needle", [
    ({"phi1": np.zeros((5, 4, 2))}, "phi1: expected a 2-D array"),
    ({"phi2": np.full((1437, 8), np.nan)}, "phi2[0]: contains NaN"),
    ({"phi1_val": np.ones((3, 50))}, "give both phi1_val and phi2_val"),
])
def test_bad_arrays_raise_one_hume_error(demo, arrays, needle):
    given = {"phi1": demo["phi1"], "phi2": demo["phi2"], **arrays}
    with pytest.raises(humelib.HumeError, match=re.escape(needle)):
        humelib.fit_hume(given.pop("phi1"), given.pop("phi2"), **given)
