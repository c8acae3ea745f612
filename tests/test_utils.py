"""humelib.arrays and humelib.fileio: loading and checking arrays and labels, atomic files."""
import os

import numpy as np
import pytest

from humelib import arrays, fileio, runtime


# ---------------------------------------------------------------- load_array / load_labels

def save(tmp_path, name, arr):
    path = tmp_path / name
    np.save(path, arr)
    return str(path)


def raises_naming(path, fn, *args, **kwargs):
    with pytest.raises(runtime.HumeError) as info:
        fn(path, "--flag", *args, **kwargs)
    assert path in str(info.value)
    return str(info.value)


def test_load_array_rejects_a_missing_file_naming_it(tmp_path):
    raises_naming(str(tmp_path / "nope.npy"), arrays.load_array)
    raises_naming(str(tmp_path / "nope.npy"), arrays.load_labels)


def test_load_array_rejects_1d_integer_and_nonfinite_features_naming_the_file(tmp_path):
    raises_naming(save(tmp_path, "flat.npy", np.zeros(5, np.float32)), arrays.load_array)
    raises_naming(save(tmp_path, "ints.npy", np.ones((4, 3), np.int64)), arrays.load_array)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((70000, 2), np.float64)  # bad value past the first 2^16-row chunk
        x[66000, 1] = bad
        msg = raises_naming(save(tmp_path, "bad.npy", x), arrays.load_array)
        assert "66000" in msg
        raises_naming(save(tmp_path, "bad.npy", x), arrays.load_array, mmap=True)
    raises_naming(save(tmp_path, "empty.npy", np.zeros((0, 3), np.float32)), arrays.load_array)
    path = str(tmp_path / "junk.npy")
    with open(path, "w") as f:
        f.write("not a npy file")
    raises_naming(path, arrays.load_array)


def test_load_array_accepts_valid_features(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3))
    got = arrays.load_array(save(tmp_path, "ok.npy", x), "--flag")
    assert got.dtype == np.float32 and got.shape == (6, 3) and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, x.astype(np.float32))
    got = arrays.load_array(save(tmp_path, "ok.npy", x), "--flag", mmap=True)
    np.testing.assert_array_equal(np.asarray(got), x)


def test_load_labels_rejects_non_integer_floats_and_wrong_length_naming_the_file(tmp_path):
    raises_naming(save(tmp_path, "float.npy", np.array([0.0, 1.5, 2.0])), arrays.load_labels)
    raises_naming(save(tmp_path, "nan.npy", np.array([0.0, np.nan])), arrays.load_labels)
    raises_naming(save(tmp_path, "feats.npy", np.zeros((4, 3))), arrays.load_labels)
    raises_naming(save(tmp_path, "strs.npy", np.array(["a", "b"])), arrays.load_labels)
    msg = raises_naming(save(tmp_path, "short.npy", np.arange(5)), arrays.load_labels, n=6)
    assert "5" in msg and "6" in msg


def test_load_labels_accepts_valid_labels(tmp_path):
    for arr in (np.array([3, -1, 3, 7], np.int32), np.array([3.0, -1.0, 3.0, 7.0]),
                np.array([[3], [-1], [3], [7]]),
                np.array([[3, -1, 3, 7]])):
        got = arrays.load_labels(save(tmp_path, "y.npy", arr), "--flag", n=4)
        assert got.dtype == np.int64
        assert got.tolist() == [3, -1, 3, 7]


# ---------------------------------------------------------------- atomic_write

def test_atomic_write_replaces_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("new")

    fileio.atomic_write(str(target), write)
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_leaves_target_untouched_and_no_temp_file(tmp_path, exc):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise exc("boom")

    with pytest.raises(exc):
        fileio.atomic_write(str(target), write)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]

    # no previous target: nothing is created at all, even if write_fn removed its temp file itself
    fresh = tmp_path / "fresh.txt"

    def write_and_remove(tmp):
        os.remove(tmp)
        raise exc("boom")

    with pytest.raises(exc):
        fileio.atomic_write(str(fresh), write_and_remove)
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_release_freed_memory_runs_where_glibc_has_malloc_trim():
    import platform
    ran = runtime.release_freed_memory()
    assert isinstance(ran, bool)
    assert ran == (platform.libc_ver()[0] == "glibc")


HUGE_CHILD = """
import os, sys, torch
from humelib import runtime
if sys.argv[1] == "on":
    runtime.large_buffers_in_huge_pages()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
huge = lambda: next(int(ln.split()[1]) for ln in open("/proc/self/smaps_rollup") if ln.startswith("AnonHuge")) // 1024
a = torch.ones(6 * 2**20)  # 24 MiB: glibc maps it on its own; freeing it raises glibc's own threshold to 24 MiB
in_huge_pages = huge()
del a
before = rss()
b, c = torch.ones(4 * 2**20), torch.ones(4 * 2**20)  # 16 MiB each: under a raised threshold, in the heap
del b, c
print(os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"), in_huge_pages, rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux only (reads /proc)")
@pytest.mark.parametrize("user", [None, "0"])
def test_training_buffers_go_to_huge_pages_and_back_to_the_os_once_freed(user):
    """large_buffers_in_huge_pages (what hume.py runs first), in a fresh interpreter: torch's large buffers in 2 MB
    pages where the kernel gives them to regions that ask ("madvise" mode), and freed ones no longer kept in the heap
    (the 32 MiB that stay resident without it); a user's THP_MEM_ALLOC_ENABLE=0 keeps both as they were."""
    import subprocess
    import sys
    from helpers import REPO, child_env
    env = {k: v for k, v in child_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user
    got = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", HUGE_CHILD, mode], env=env, capture_output=True, text=True,
                             cwd=REPO)
        assert out.returncode == 0, out.stderr
        setting, huge_mib, kept_mib = out.stdout.split()
        got[mode] = [setting, int(huge_mib), int(kept_mib)]
    assert got["off"][0] == (user or "unset") and got["off"][2] >= 28  # glibc's default keeps the freed 32 MiB
    on = user is None
    assert got["on"][0] == (user or "1") and (got["on"][2] <= 4) == on
    mode = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(mode) and "[madvise]" in open(mode).read():
        assert (got["on"][1] >= 16) == on and got["off"][1] == 0
