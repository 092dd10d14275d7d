#!/usr/bin/env python
"""A folder of links to the held-out images of an image folder (the hash split the sweep holds out).

Commands that take a labelled folder (``export-multires --val-data``, ``tools/bench_serving.py
--images``) then see exactly the images the sweep never trained or fine-tuned on:

    python tools/heldout_links.py --data ../shared/data/imagenette-224/train --out runs/r18_val --per-class 40

The split is :func:`fixres_deploy.data.folders.split_by_hash` (by file name, so it is stable
across machines); ``--per-class`` takes a class-balanced, seeded subset of it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from fixres_deploy.data.folders import (
        DEFAULT_VAL_FRACTION,
        class_balanced_subset,
        index_image_folder,
        link_index,
        split_by_hash,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder root ROOT/<class>/<image>")
    p.add_argument("--out", required=True, help="new folder of links (must not exist)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    p.add_argument("--per-class", type=int, default=None, help="at most N held-out images per class")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"'{args.out}' exists: choose a new folder")
    index = index_image_folder(args.data)
    _, val = split_by_hash(index, args.val_fraction)
    if args.per_class:
        val = class_balanced_subset(val, args.per_class, seed=0)
    tmp = args.out.rstrip("/") + ".partial"
    os.rename(link_index(val, tmp), args.out)
    print(f"{len(val.samples)} held-out images of {len(val.classes)} classes linked under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
