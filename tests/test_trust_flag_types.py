"""Every script's numeric and device flags go through the shared argparse types (humelib.flags): a bad value is one
stderr line "error: --flag must be ..." naming the flag, exit code 2, no traceback, nothing written. Values float() or
int() would take but a reader would not ('1_0', '²', Arabic-Indic digits, inf, nan) are refused too.
"""
import os
import sys

import pytest
import torch

import annotate
import baselines
import extract
import hume
import plot
import predict
import run_turtle
import select_k
from helpers import FAST, cli, refused, write_problem
from humelib.flags import device_problem, int_in

NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"


@pytest.fixture(scope="module")
def P(tmp_path_factory):
    return write_problem(str(tmp_path_factory.mktemp("data")), n=120, k=3)


# id: (script's main, its other flags given the problem P and an output path, bad flag, value, needle)
def _extract(P, out):
    return ["--dataset", "fake", "--fake_size", "4", "--arch", "resnet18", "--weights", "none", "--out", out]


def _baselines(P, out):
    return ["--method", "sinkhorn", "--phi_path", P["phi2"], "--gt_labels_path", P["labels"], "--json",
            os.path.join(out, "r.json")]


def _select_k(P, out):
    return ["--out", out, "--k_range", "2", "--", "--phi1_path", P["phi1"], "--phi2_path", P["phi2"]]


def _turtle(P, out):
    return ["--phi_paths", P["phi2"], "--exp_path", out]


def _hume(P, out):
    return FAST + ["--phi1_path", P["phi1"], "--phi2_path", P["phi2"], "--exp_path", out]


def _annotate(P, out):
    return ["--tasks_path", os.path.join(out, "tasks"), "--phi1_path", P["phi1"], "--phi2_path", P["phi2"],
            "--out", os.path.join(out, "picks.csv")]


def _plot(P, out):
    return ["--montage", "--tasks_path", os.path.join(out, "tasks"), "--phi1_path", P["phi1"], "--out", out]


CASES = [
    (extract.main, _extract, ["--std", "0", "0", "0"], "--std must be > 0, got 0.0"),
    (extract.main, _extract, ["--std", "nan", "nan", "nan"], "--std must be a finite number"),
    (extract.main, _extract, ["--std", "1", "-1", "1"], "--std must be > 0"),
    (extract.main, _extract, ["--mean", "inf", "0", "0"], "--mean must be a finite number"),
    (extract.main, _extract, ["--mean", "0", "0"], "--mean expected 3 arguments"),
    (extract.main, _extract, ["--image_size", "-5"], "--image_size must be between 16 and 8192, got -5"),
    (extract.main, _extract, ["--image_size", "0"], "--image_size must be between 16 and 8192"),
    (extract.main, _extract, ["--image_size", "100000"], "--image_size must be between 16 and 8192"),
    (extract.main, _extract, ["--image_size", "3.5"], "--image_size must be an integer"),
    (extract.main, _extract, ["--device", "tpu"], "--device tpu: "),
    (extract.main, _extract, ["--device", NO_CUDA], f"--device {NO_CUDA}"),
    (extract.main, _extract, ["--device", "meta"], "--device meta: HUME runs on cpu, cuda or mps"),
    (extract.main, _extract, ["--device", "garbage!"], "--device garbage!: not a torch device"),
    (extract.main, _extract, ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (extract.main, _extract, ["--num_workers", "-1"], "--num_workers must be >= 0"),
    (extract.main, _extract, ["--fake_size", "0"], "--fake_size must be >= 1"),
    (extract.main, _extract, ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (extract.main, _extract, ["--name", "../../x"], "--name '../../x': must be a file name prefix"),
    (extract.main, _extract, ["--name", ""], "--name '': must be a file name prefix"),
    (extract.main, _extract, ["--name", "a\x01b"], "--name 'a\\x01b'"),
    (baselines.main, _baselines, ["--lambda", "inf"], "--lambda must be a finite number"),
    (baselines.main, _baselines, ["--lambda", "0"], "--lambda must be > 0"),
    (baselines.main, _baselines, ["--lr", "inf"], "--lr must be a finite number"),
    (baselines.main, _baselines, ["--lr", "-0.1"], "--lr must be > 0"),
    (baselines.main, _baselines, ["--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (baselines.main, _baselines, ["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (baselines.main, _baselines, ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (baselines.main, _baselines, ["--seed", str(2 ** 32)], "--seed must be between 0 and 2**32 - 1"),
    (baselines.main, _baselines, ["--k", "1"], "--k must be >= 2"),
    (baselines.main, _baselines, ["--k", "\u00b2"], "--k must be an integer >= 2, got '²'"),
    (baselines.main, _baselines, ["--rounds", "0"], "--rounds must be >= 1"),
    (baselines.main, _baselines, ["--epochs", "1_0"], "--epochs must be an integer"),
    (baselines.main, _baselines, ["--batch_size", "\u0661\u0662"], "--batch_size must be an integer"),
    (select_k.main, _select_k, ["--k_range", "\u00b2"], "--k_range: cannot read '²'"),
    (select_k.main, _select_k, ["--k_range", "\u0663"], "--k_range: cannot read"),
    (select_k.main, _select_k, ["--k_range", "2..\u00b3"], "--k_range: cannot read"),
    (select_k.main, _select_k, ["--seeds", "-1"], "--seeds must be between 0 and 2**32 - 1"),
    (select_k.main, _select_k, ["--seeds", "\u00b2"], "--seeds must be an integer"),
    (select_k.main, _select_k, ["--outer_lr", "inf"], "--outer_lr must be a finite number"),
    (run_turtle.main, _turtle, ["--gamma", "nan"], "--gamma must be a finite number"),
    (run_turtle.main, _turtle, ["--gamma", "-1"], "--gamma must be >= 0"),
    (run_turtle.main, _turtle, ["--inner_lr", "inf"], "--inner_lr must be a finite number"),
    (run_turtle.main, _turtle, ["--outer_lr", "0"], "--outer_lr must be > 0"),
    (run_turtle.main, _turtle, ["--T", "-1"], "--T must be >= 0"),
    (run_turtle.main, _turtle, ["--M", "0"], "--M must be >= 1"),
    (run_turtle.main, _turtle, ["--k", "1"], "--k must be >= 2"),
    (run_turtle.main, _turtle, ["--batch_size", "\u00b2"], "--batch_size must be an integer"),
    (run_turtle.main, _turtle, ["--eval_every", "0"], "--eval_every must be >= 1"),
    (run_turtle.main, _turtle, ["--ckpt_every", "1e3"], "--ckpt_every must be an integer"),
    (run_turtle.main, _turtle, ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (run_turtle.main, _turtle, ["--device", "tpu"], "--device tpu: "),
    (hume.main, _hume, ["--k", "\u00b2"], "--k must be an integer >= 2"),
    (hume.main, _hume, ["--num_iters", "1_000"], "--num_iters must be an integer"),
    (hume.main, _hume, ["--outer_lr", "\u0661"], "--outer_lr must be a number"),
    (hume.main, _hume, ["--inner_lr", "-1"], "--inner_lr must be > 0"),
    (hume.main, _hume, ["--H_reg", "-1"], "--H_reg must be >= 0"),
    (hume.main, _hume, ["--subset_size", "1"], "--subset_size must be >= 2"),
    (annotate.main, _annotate, ["--budget", "0"], "--budget must be >= 1"),
    (annotate.main, _annotate, ["--budget", "\u00b2"], "--budget must be an integer"),
    (annotate.main, _annotate, ["--budget", "-3"], "--budget must be >= 1"),
    (annotate.main, _annotate, ["--simulate", "--per_cluster", "1", "0"], "--per_cluster must be >= 1"),
    (plot.main, _plot, ["--per_cluster", "0"], "--per_cluster must be >= 1"),
    (plot.main, _plot, ["--per_cluster", "x"], "--per_cluster must be an integer"),
    (predict.main, lambda P, out: ["--tasks_path", out, "--phi1_path", P["phi1"], "--out", os.path.join(out, "p")],
     ["--copy"], "--copy needs --sort_into"),
    (predict.main, lambda P, out: ["--tasks_path", out, "--phi1_path", P["phi1"]], ["--quiet"], "--out"),
]


@pytest.mark.parametrize("main, base, bad, needle", CASES,
                         ids=[f"{m.__module__}{''.join(b)}" for m, _, b, _ in CASES])
def test_bad_flag_value_is_one_line_naming_the_flag_and_writes_nothing(P, tmp_path, main, base, bad, needle):
    out = str(tmp_path / "out")
    argv = base(P, out)
    cut = argv.index("--") if "--" in argv else len(argv)  # after the script's own flags: the last value wins
    refused(cli(main, argv[:cut] + bad + argv[cut:]), needle)
    assert not os.path.exists(out)


def test_int_type_takes_ascii_digits_with_a_sign_only():
    import argparse
    parse = int_in(-5, 5)
    assert [parse(t) for t in ("0", "+3", "-5", "05")] == [0, 3, -5, 5]
    for text in ("\u00b2", "\u0661", "1_0", " 1", "1.0", "", "0x1", "6", "-6"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_device_problem_accepts_only_devices_that_exist_here():
    assert device_problem("cpu") is None
    assert (device_problem("cuda") is None) == torch.cuda.is_available()
    assert (device_problem("mps") is None) == torch.backends.mps.is_available()
    for name in ("tpu", "meta", "xla", "cpu:x", "", f"cuda:{torch.cuda.device_count()}"):
        assert device_problem(name) is not None, name


def test_a_good_value_still_runs(P, tmp_path):
    """The types change nothing for valid values: baselines with its flags spelled as a user would."""
    code, _, err = cli(baselines.main, ["--method", "kmeans", "--phi_path", P["phi2"], "--gt_labels_path",
                                        P["labels"], "--k", "+3", "--seed", "007", "--quiet"])
    assert code == 0, err


@pytest.mark.parametrize("bad, needle", [(["--adaptation_steps", "100,²"], "--adaptation_steps"),
                                         (["--nproc", "0"], "--nproc"),
                                         (["--methods", "adjoint,magic"], "--methods")])
def test_bench_comma_lists_are_checked(bad, needle, monkeypatch, capsys):
    """bench.py's comma-list flags: one line naming the flag, exit 2. Its main reads sys.argv, as `python bench.py`
    gives it, and is called as its __main__ calls it (no run_cli: whatever else it raised would be a traceback)."""
    import bench
    from helpers import Result, assert_clean_failure, command
    monkeypatch.setattr(sys, "argv", ["bench.py", *bad])
    with pytest.raises(SystemExit) as e:
        bench.main()
    out, err = capsys.readouterr()
    assert_clean_failure(Result(command("bench.py", bad), e.value.code, out, err), [needle])
