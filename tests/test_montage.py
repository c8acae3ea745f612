"""plot.py --montage: a PNG of the size montage.py declares with one row per non-empty cluster, in pages of at most
20 rows; members picked in phi2 when given (else phi1) as selection.pick picks them; --texts prints them instead;
bad inputs are one line, exit code 2, and no PNG.

Tasks are built by hand in the paper's format (helpers.write_paper_task): phi1 rows are near one-hot in their
cluster's coordinate and W is a row permutation of the identity, so the clusters are known exactly.
"""
import os

import matplotlib.image
import numpy as np
import pytest
from PIL import Image

from humelib import montage
import plot
from humelib import selection
from helpers import cli, save_npy, write_paper_task

D1 = 30


def make_problem(folder, clusters, k, seed=0):
    """Points in the given clusters (of k), their images (flat grey squares, a shade per point), the sources file
    beside phi1, and two tasks labelling them exactly (under different cluster numbers)."""
    rng = np.random.default_rng(seed)
    clusters = np.asarray(clusters)
    phi1 = np.eye(D1)[clusters] + 0.05 * rng.normal(size=(len(clusters), D1))
    phi1 /= np.linalg.norm(phi1, axis=1, keepdims=True)
    phi2 = rng.normal(size=(len(clusters), 6))
    os.makedirs(os.path.join(folder, "img"))
    sources = []
    for i in range(len(clusters)):
        sources.append(os.path.join(folder, "img", f"{i}.png"))
        Image.fromarray(np.full((20, 30), 40 + i % 200, dtype=np.uint8)).save(sources[-1])
    with open(os.path.join(folder, "phi1.sources.txt"), "w") as f:
        f.writelines(s + "\n" for s in sources)
    tasks = os.path.join(folder, "tasks")
    for s, perm in enumerate([np.arange(k), rng.permutation(k)]):
        write_paper_task(tasks, s, np.eye(D1)[perm], cv_score=0.9 - 0.1 * s)  # seed 0 is the best: its numbers
    return {"tasks": tasks, "phi1": save_npy(folder, "phi1", phi1.astype(np.float32)),
            "phi2": save_npy(folder, "phi2", phi2.astype(np.float32)), "clusters": clusters, "sources": sources}


@pytest.fixture(scope="module")
def four_of_five(tmp_path_factory):
    """k = 5, clusters 0, 1, 3, 4 used (2 empty), of sizes 12, 3, 9, 6."""
    return make_problem(str(tmp_path_factory.mktemp("montage")), [0] * 12 + [1] * 3 + [3] * 9 + [4] * 6, k=5)


def draw(P, out, *more):
    code, stdout, err = cli(plot.main, ["--montage", "--tasks_path", P["tasks"], "--phi1_path", P["phi1"],
                                        "--out", out, "--prefix", "m", *more])
    assert code == 0, err
    pages = [line for line in stdout.splitlines() if line.endswith(".png")]
    rows = [[int(c) for c in line.split("clusters ")[1].split()] for line in stdout.splitlines()
            if "rows: clusters" in line]
    return pages, rows, stdout


def test_one_row_per_nonempty_cluster_on_a_png_of_the_declared_size(four_of_five, tmp_path):
    pages, rows, _ = draw(four_of_five, tmp_path, "--per_cluster", "4")
    assert [os.path.basename(p) for p in pages] == ["m_montage.png"] and rows == [[0, 1, 3, 4]]
    img = matplotlib.image.imread(pages[0])
    w, h = montage.page_size(4, 4)
    assert img.shape[:2] == (round(h * plot.DPI), round(w * plot.DPI))
    assert np.std(img[..., :3]) > 0.05
    assert sorted(os.listdir(tmp_path)) == ["m_montage.png"]  # no temporary files left


def test_members_are_picked_in_phi2_when_given_else_in_phi1(four_of_five, tmp_path):
    P = four_of_five
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"text of row {i}\n" for i in range(len(P["clusters"]))))
    sizes = np.unique(P["clusters"], return_counts=True)[1]
    for space, flags in (("phi1", []), ("phi2", ["--phi2_path", P["phi2"]])):
        _, _, out = draw(P, tmp_path, "--texts", texts, "--per_cluster", "3", *flags)
        shown = [int(line.split("[")[1].split("]")[0]) for line in out.splitlines() if line.startswith("  [")]
        phi = np.load(P[space])
        assert shown == [i for i, _, _ in selection.pick(P["clusters"], phi, np.minimum(sizes, 3))], space
        headers = [line for line in out.splitlines() if line.startswith("cluster ")]
        assert headers == ["cluster 0 (12 points):", "cluster 1 (3 points):", "cluster 3 (9 points):",
                           "cluster 4 (6 points):"]
    assert sorted(os.listdir(tmp_path)) == ["texts.txt"]  # --texts draws nothing


def test_many_clusters_are_split_into_even_pages_of_at_most_20_rows(tmp_path):
    assert [len(p) for p in montage.pages(list(range(100)))] == [20] * 5
    assert [len(p) for p in montage.pages(list(range(45)))] == [15, 15, 15]
    assert [len(p) for p in montage.pages(list(range(20)))] == [20]
    P = make_problem(str(tmp_path / "many"), np.repeat(np.arange(25), 2), k=25)
    pages, rows, _ = draw(P, tmp_path / "out", "--per_cluster", "2")
    assert [os.path.basename(p) for p in pages] == ["m_montage_1.png", "m_montage_2.png"]
    assert rows == [list(range(12)), list(range(12, 25))]
    for page, r in zip(pages, rows):
        w, h = montage.page_size(len(r), 2)
        assert matplotlib.image.imread(page).shape[:2] == (round(h * plot.DPI), round(w * plot.DPI))


def bad_cases(P, tmp):
    short = tmp / "short.txt"
    short.write_text("one\ntwo\n")
    rows = tmp / "rows.txt"
    rows.write_text("".join(f"cifar10:test:{i}\n" for i in range(len(P["clusters"]))))
    broken = tmp / "broken.txt"
    broken.write_text("".join(f"{tmp / 'not_an_image.png'}\n" for _ in P["clusters"]))
    (tmp / "not_an_image.png").write_text("text")
    alone = tmp / "alone.npy"  # no sources file beside it
    alone.write_bytes(open(P["phi1"], "rb").read())
    return {"texts of another length": (["--texts", short], "2 lines for 30 rows"),
            "sources of another length": (["--sources", short], "2 lines for 30 rows"),
            "data-set rows": (["--sources", rows], "data-set rows"),
            "not an image": (["--sources", broken], "cannot be read as an image"),
            "no sources": (["--phi1_path", alone], "no " + str(tmp / "alone.sources.txt")),
            "phi2 of other points": (["--phi2_path", save_npy(str(tmp), "p2", np.ones((3, 2), np.float32))],
                                     "row counts differ")}


@pytest.mark.parametrize("case", ["texts of another length", "sources of another length", "data-set rows",
                                  "not an image", "no sources", "phi2 of other points"])
def test_bad_input_is_one_line_exit_2_and_no_png(four_of_five, tmp_path, case):
    more, message = bad_cases(four_of_five, tmp_path)[case]
    argv = ["--montage", "--tasks_path", four_of_five["tasks"], "--phi1_path", four_of_five["phi1"], "--out",
            tmp_path / "out"] + more
    code, _, err = cli(plot.main, argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_montage_options_need_montage(four_of_five, tmp_path):
    code, _, err = cli(plot.main, ["--tasks_path", four_of_five["tasks"], "--texts", "t.txt", "--out", tmp_path])
    assert code == 2 and err.splitlines() == ["error: --texts is a --montage option; add --montage"]
