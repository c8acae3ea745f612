"""The one writer for outputs (fileio.OutputGroup, atomic_write, check_output_file): a group of files is committed
as one unit, all new or all old whatever write or rename fails; no output is written through a symbolic link or
over a folder, FIFO or device (refused, never replaced); nothing but the target changes."""
import errno
import os
import stat

import pytest

from humelib import fileio
from helpers import temp_files, tree
from humelib.runtime import HumeError


def put(path, data):
    with open(path, "wb") as f:
        f.write(data)


def writer(data):
    return lambda tmp: put(tmp, data)


def full_disk(tmp):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def old(tmp_path):
    """Three targets holding old contents; returns (folder, paths)."""
    paths = [str(tmp_path / n) for n in ("a.npy", "a.sources.txt", "a_targets.npy")]
    for i, p in enumerate(paths):
        put(p, b"old %d" % i)
    return tmp_path, paths


def test_group_replaces_every_file_when_nothing_fails(old):
    folder, paths = old
    with fileio.OutputGroup() as g:
        for i, p in enumerate(paths):
            g.write(p, writer(b"new %d" % i))
    assert [open(p, "rb").read() for p in paths] == [b"new 0", b"new 1", b"new 2"]
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths)  # no temporaries, no .old


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_later_write_leaves_every_old_file(old, failing):
    folder, paths = old
    before = tree(folder)
    with pytest.raises(HumeError, match=f"cannot write {paths[failing]}.*No space left"):
        with fileio.OutputGroup() as g:
            for i, p in enumerate(paths):
                g.write(p, full_disk if i == failing else writer(b"new"))
    assert tree(folder) == before


@pytest.mark.parametrize("failing", [1, 2])
@pytest.mark.parametrize("exists", [True, False])
def test_a_failed_later_rename_puts_back_the_files_already_renamed(old, monkeypatch, failing, exists):
    folder, paths = old
    if not exists:
        for p in paths:
            os.remove(p)
    before = tree(folder)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing + 1:  # the rename onto paths[failing]; the renames back still work
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(HumeError, match=f"cannot write {paths[failing]}"):
        with fileio.OutputGroup() as g:
            for p in paths:
                g.write(p, writer(b"new"))
    assert tree(folder) == before  # old contents back (or no file when there was none), no temporaries


def test_a_removal_in_the_group_goes_with_it(old):
    """An old file the new ones contradict (a labels file of a re-extraction that has none) is removed at commit."""
    folder, paths = old
    with fileio.OutputGroup() as g:
        g.write(paths[0], writer(b"new 0"))
        g.write(paths[1], writer(b"new 1"))
        g.remove(paths[2])
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in paths[:2])
    assert [open(p, "rb").read() for p in paths[:2]] == [b"new 0", b"new 1"]


def test_a_removal_is_undone_when_a_later_rename_fails(old, monkeypatch):
    folder, paths = old
    before = tree(folder)
    real = os.replace

    def replace(src, dst):
        if dst == paths[1]:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(HumeError, match=f"cannot write {paths[1]}"):
        with fileio.OutputGroup() as g:
            g.write(paths[0], writer(b"new 0"))
            g.remove(paths[2])
            g.write(paths[1], writer(b"new 1"))
    assert tree(folder) == before  # the removed file is back, the renamed one old again, no temporaries


def test_an_exception_inside_the_block_discards_the_group(old):
    folder, paths = old
    before = tree(folder)
    with pytest.raises(KeyError):
        with fileio.OutputGroup() as g:
            g.write(paths[0], writer(b"new"))
            raise KeyError("interrupted")
    assert tree(folder) == before


def special_targets(tmp_path):
    """name -> a function making that kind of target at a path, with a victim file outside the folder."""
    victim = tmp_path / "victim.txt"
    put(victim, b"precious")
    return {
        "fifo": lambda p: os.mkfifo(p),
        "symlink to a file outside": lambda p: os.symlink(victim, p),
        "dangling symlink": lambda p: os.symlink(tmp_path / "nowhere" / "x", p),
        "folder": lambda p: os.mkdir(p),
        "character device": lambda p: os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3)),  # /dev/null's numbers
    }


KINDS = ["fifo", "symlink to a file outside", "dangling symlink", "folder", "character device"]
WHY = {"fifo": "not a regular file", "symlink to a file outside": "symbolic link", "dangling symlink": "symbolic link",
       "folder": "is a folder", "character device": "not a regular file"}


def make_target(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "report.json")
    try:
        special_targets(tmp_path)[kind](target)
    except PermissionError:
        pytest.skip("making a device node needs root")
    return target


@pytest.mark.parametrize("kind", KINDS)
def test_atomic_write_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind):
    target = make_target(tmp_path, kind)
    before = tree(tmp_path)
    with pytest.raises(HumeError, match=WHY[kind]):
        fileio.json_save({"acc": 1.0}, target)
    assert tree(tmp_path) == before and not temp_files(str(tmp_path))


@pytest.mark.parametrize("kind", KINDS)
def test_check_output_file_refuses_it_before_any_work_naming_the_flag(tmp_path, kind):
    target = make_target(tmp_path, kind)
    before = tree(tmp_path)
    with pytest.raises(HumeError, match=f"--json {target}: .*{WHY[kind]}"):
        fileio.check_output_file(target, "--json")
    assert tree(tmp_path) == before


def test_a_target_replaced_by_a_link_between_write_and_commit_is_refused(tmp_path):
    target, victim = str(tmp_path / "task.pt"), tmp_path / "victim"
    put(victim, b"precious")
    with pytest.raises(HumeError, match="symbolic link"):
        with fileio.OutputGroup() as g:
            g.write(target, writer(b"new"))
            os.symlink(victim, target)  # planted while the task was being written
    assert victim.read_bytes() == b"precious" and os.path.islink(target) and not temp_files(str(tmp_path))
