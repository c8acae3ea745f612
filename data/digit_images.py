"""Write the bundled demo's digits as PNG files: a folder of images to try the README's image walkthrough on, and
the images behind the demo's montage (figures/demo_montage.png).

Usage:
    python data/digit_images.py [--split test] [--out /tmp/digits]

Writes OUT/SPLIT/NNNN.png, row NNNN of the demo's digits{split} arrays (the 8x8 pixels enlarged 4x, dark ink on
white), and OUT/digits{split}.sources.txt: the files in row order, to pass as --sources to plot.py and predict.py.
The rows are make_digits.py's: load_digits() split by train_test_split(stratify=y, test_size=0.2, random_state=0).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = os.path.dirname(os.path.abspath(__file__))
SCALE = 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=["train", "test"], default="test", help="which rows of the demo")
    ap.add_argument("--out", default="/tmp/digits", help="folder to write into (default: %(default)s)")
    args = ap.parse_args(argv)

    pixels, y = load_digits(return_X_y=True)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    rows = tr if args.split == "train" else te
    bundled = np.load(os.path.join(HERE, "labels", f"digits{args.split}_targets.npy"))
    if not np.array_equal(y[rows], bundled):
        sys.exit("error: the digits' order differs from the bundled arrays' (another scikit-learn?)")
    folder = os.path.join(args.out, args.split)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for n, i in enumerate(rows):
        ink = (255 - pixels[i].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)  # 0..16, ink high -> dark on white
        paths.append(os.path.abspath(os.path.join(folder, f"{n:04d}.png")))
        Image.fromarray(ink).resize((8 * SCALE, 8 * SCALE), Image.NEAREST).save(paths[-1])
    with open(os.path.join(args.out, f"digits{args.split}.sources.txt"), "w") as f:
        f.writelines(p + "\n" for p in paths)
    print(f"{len(paths)} images in {folder}, listed in {os.path.join(args.out, f'digits{args.split}.sources.txt')}")


if __name__ == "__main__":
    main()
