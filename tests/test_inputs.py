"""inputs.Rows: rows prepared as they are read, never a prepared copy of the whole array in memory."""
import numpy as np
import pytest
import torch

from humelib.embeddings import Rows


def reference(x, normalize, scale, ones):
    """The prepared array written out with numpy: [normalise(x) * scale, 1]."""
    x = x.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x * scale
    return np.concatenate([x, np.ones((len(x), 1))], 1) if ones else x


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("normalize,scale,ones", [(False, 1.0, False), (False, 1.0, True), (False, 3.7, True),
                                                  (True, 1.0, False), (True, 0.5, True)])
def test_rows_are_prepared_as_read(tmp_path, mapped, normalize, scale, ones):
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    if mapped:
        np.save(tmp_path / "x.npy", x)
        arr = np.load(tmp_path / "x.npy", mmap_mode="r")
    else:
        arr = x
    src = Rows(arr, "cpu", normalize, scale, ones)
    ref = reference(x, normalize, scale, ones)
    rows = torch.tensor([3, 0, 49, 17, 17])
    for got, want in [(src.take(rows), ref[rows.numpy()]), (src.range(40, 99), ref[40:]), (src.all(), ref)]:
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    if not mapped:  # the array itself is held, not a prepared copy
        assert np.shares_memory(src.data.numpy(), x)
        assert (src.all().data_ptr() == src.data.data_ptr()) == (not normalize and scale == 1.0 and not ones)
