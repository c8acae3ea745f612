"""Build the bundled offline demo data set (scikit-learn digits, two representation spaces).

Usage:
    pip install -r data/requirements-data.txt
    python data/make_digits.py [--out DATA_DIR] [--batch 64] [--threads 1]

Writes, under DATA_DIR (default: the folder holding this script):
    representations/pca/digits{train,test}_l2.npy  phi1: 50-d PCA of the pixels, rows L2-normalised, float32
    representations/ocr/digits{train,test}.npy     phi2: 480-d PP-OCRv4 recogniser backbone features, float32
    labels/digits{train,test}_targets.npy          digit class 0-9, int64

Nothing is downloaded: the images ship with scikit-learn, the network ships with
rapidocr-onnxruntime. Single-threaded CPU inference with fixed batches makes reruns bit-identical.
"""
import argparse
import os
import sys
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

HERE = os.path.dirname(os.path.abspath(__file__))
# Output of the PPLCNetV3 backbone's last pooling (480 channels x 1 x W/8), i.e. the input of the
# SVTR neck. Chosen over the neck output (120-d), the CTC logits/softmax (6625-d) and max pooling:
# on the digits it gave the best and most seed-stable k-means accuracy (see data/README.md).
FEATURE = "p2o.AveragePool.1"
HEIGHT = 48      # the recogniser's input height (input shape N x 3 x 48 x W)
MARGIN = 2       # pad the 8x8 digit to 12x12 first: glyph fills ~2/3 of the height, as in a text-line crop


def rec_model_path():
    import rapidocr_onnxruntime
    path = os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models", "ch_PP-OCRv4_rec_infer.onnx")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; install rapidocr-onnxruntime==1.4.4 (data/requirements-data.txt)")
    return path


def to_rec_input(pixels):
    """8x8 digits (0..16, ink high) -> N x 3 x 48 x 48 float32, dark ink on white, normalised as PP-OCR rec."""
    import cv2
    imgs = pixels.reshape(-1, 8, 8).astype(np.float32) * (255.0 / 16.0)
    out = np.empty((len(imgs), 3, HEIGHT, HEIGHT), np.float32)
    for i, im in enumerate(imgs):
        im = np.pad(im, MARGIN)  # background is 0 before inversion, so this pads with background
        up = cv2.resize(im, (HEIGHT, HEIGHT), interpolation=cv2.INTER_LINEAR)
        up = 255.0 - np.clip(up, 0.0, 255.0)  # dark-on-light, like printed text
        out[i] = (up / 255.0 - 0.5) / 0.5     # PP-OCR rec normalisation to [-1, 1]
    return out


def ocr_features(pixels, batch, threads):
    """Mean over the sequence (width) axis of the backbone feature map -> N x 480."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(rec_model_path())
    # Expose the intermediate tensor as an extra graph output (in memory only; the file is untouched).
    model.graph.output.append(onnx.ValueInfoProto(name=FEATURE))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = to_rec_input(pixels)
    feats = []
    for i in range(0, len(x), batch):
        (fmap,) = sess.run([FEATURE], {sess.get_inputs()[0].name: x[i:i + batch]})  # B x 480 x 1 x T
        feats.append(fmap[:, :, 0, :].mean(axis=2))
    return np.concatenate(feats).astype(np.float32)


def pca_l2(pixels, train_idx, n_components=50):
    """PCA fitted on the train pixels only, then rows L2-normalised (the weak 'self' space)."""
    z = PCA(n_components=n_components, svd_solver="full").fit(pixels[train_idx]).transform(pixels)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z.astype(np.float32)


def save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, arr)
    print(f"  {os.path.relpath(path)}  {arr.shape} {arr.dtype}  {os.path.getsize(path) / 1e6:.2f} MB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=HERE, help="data folder to write into (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="inference batch size")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = ap.parse_args(argv)

    t0 = time.time()
    pixels, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)

    phi1 = pca_l2(pixels.astype(np.float64), tr)
    phi2 = ocr_features(pixels, args.batch, args.threads)
    y = y.astype(np.int64)

    j = lambda *p: os.path.join(args.out, *p)
    for split, rows in (("train", tr), ("test", te)):
        save(j("representations", "pca", f"digits{split}_l2.npy"), phi1[rows])
        save(j("representations", "ocr", f"digits{split}.npy"), phi2[rows])
        save(j("labels", f"digits{split}_targets.npy"), y[rows])
    norms = np.linalg.norm(phi2, axis=1)
    print(f"phi2 row norms: min {norms.min():.1f} mean {norms.mean():.1f} max {norms.max():.1f}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
