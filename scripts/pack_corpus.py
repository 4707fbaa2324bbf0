"""Pack a training corpus into one ``*.slices.npz`` for a machine without image readers (a GPU box).

    python scripts/pack_corpus.py --data data/real/train --data Resources/TrainingData \
        --thin pylinac_cbct=2 --out gpu/corpus.slices.npz

The slices are normalised exactly as ``fpdenoise train`` would (same ``--max-slices-per-volume``
and ``--seed`` draw), stored as float16 in their original order. ``--thin NAME=K`` keeps every
K-th slice of sources whose path contains NAME (the 64 near-identical CatPhan slices), which is
what keeps the pack under the device's 64 MiB transfer limit.
"""

from __future__ import annotations

import argparse
import collections

from FPDenoiseLib.data import load_clean_slices, save_slice_pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-slices-per-volume", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thin", action="append", default=[], metavar="NAME=K")
    args = ap.parse_args()
    thin = {k: int(v) for k, v in (t.split("=", 1) for t in args.thin)}
    slices = load_clean_slices(args.data, max_slices_per_volume=args.max_slices_per_volume, seed=args.seed)
    seen: collections.Counter = collections.Counter()
    keep = []
    for s in slices:
        name = next((k for k in thin if k in s.source), None)
        if name is not None:
            seen[name] += 1
            if (seen[name] - 1) % thin[name]:
                continue
        keep.append(s)
    path = save_slice_pack(keep, args.out)
    print(f"{path}: {len(keep)} of {len(slices)} slices, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
