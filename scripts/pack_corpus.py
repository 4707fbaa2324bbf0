"""Pack a training corpus into one ``*.slices.npz`` for a machine without image readers (a GPU box).

    python scripts/pack_corpus.py --data data/real/train --data Resources/TrainingData \
        --thin pylinac_cbct=2 --out gpu/corpus.slices.npz

The slices are normalised exactly as ``fpdenoise train`` would (same ``--max-slices-per-volume``
and ``--seed`` draw), stored as float16 in their original order. ``--thin NAME=K`` keeps every
K-th slice of sources whose path contains NAME (the 64 near-identical CatPhan slices). The pack
travels to the device beside the repository's tracked files, 64 MiB in all: the members are
LZMA-compressed (the real corpus above: 27.5 MB, 34.4 MB with deflate) and the script warns when the
two together would not fit.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys

from FPDenoiseLib.data import load_clean_slices, save_slice_pack

DEVICE_LIMIT = 64 * 2**20  # the working tree that travels to a lent device, carried paths included


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-slices-per-volume", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thin", action="append", default=[], metavar="NAME=K")
    ap.add_argument("--compression", default="lzma", choices=["lzma", "deflate"],
                    help="lzma (default): about 20 %% smaller, what keeps the pack and the repository under the "
                         "device's 64 MiB; deflate for a Python built without lzma")
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
    path = save_slice_pack(keep, args.out, compression=args.compression)
    print(f"{path}: {len(keep)} of {len(slices)} slices, {path.stat().st_size / 1e6:.1f} MB")
    tracked = _tracked_bytes()
    if tracked is not None and tracked + path.stat().st_size > DEVICE_LIMIT:
        print(f"warning: the repository's tracked files ({tracked / 2**20:.1f} MiB) and this pack together exceed the "
              f"device's {DEVICE_LIMIT / 2**20:.0f} MiB: thin it more (--thin NAME=K)", file=sys.stderr)


def _tracked_bytes() -> int | None:
    """Size of the files git tracks here (what travels to the device with a carried pack), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = (os.path.join(root, f) for f in out.decode().split("\0") if f)
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


if __name__ == "__main__":
    main()
