"""Per (noise, level) cell of a benchmark run: ours against the best classical method, with a paired CI.

The issue's grid target asks ours to be at least the best of the noisy input and every classical method
in every cell. With a few slices per cell, differences of thousandths of a dB are noise: this prints, per
cell, ``ours - best`` (mean PSNR over the slices every method has) with a 95 % paired bootstrap CI, the
SSIM of both, and a verdict: ``won`` (mean >= 0), ``tie`` (mean < 0, CI reaches 0) or ``lost``. With
``--twin``, the paired FP - twin differences of PSNR and feature score over all cases follow.

    python benchmarks/cells.py docs/results/heldout_13/results.csv [--twin mse_only] [--out cells.md]

>>> rows = [{"noise": "g", "level": "0.5", "image": str(i), "method": m, "psnr_db": str(p), "ssim": "0.9",
...          "feature_score": "0.8"} for i in range(3) for m, p in (("ours", 30 + i), ("noisy", 20), ("bm3d", 29 + i))]
>>> [c.verdict for c in cells(rows)]
['won']
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PSNR_CAP_DB = 100.0  # an exactly restored slice: the benchmark's own cap
LEARNED = ("ours", "auto", "mse_only", "ct_texture", "drunet")


@dataclass
class Cell:
    noise: str
    level: str
    n: int  # slices every method has
    best: str  # the best classical method (or the noisy input) by mean PSNR
    diff: float  # mean PSNR ours - best, dB
    lo: float  # 95 % paired bootstrap CI of diff
    hi: float
    ssim_ours: float
    ssim_best: float

    @property
    def verdict(self) -> str:
        if self.diff >= 0:
            return "won"
        return "tie" if self.hi >= 0 else "lost"


def _bootstrap(d: np.ndarray, seed: int = 0, draws: int = 5000) -> tuple[float, float]:
    means = np.random.default_rng(seed).choice(d, (draws, d.size)).mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def cells(rows: list[dict], *, ours: str = "ours", learned: tuple[str, ...] = LEARNED) -> list[Cell]:
    """One :class:`Cell` per (noise, level) of ``rows`` (``results.csv`` rows) that has ``ours``."""
    psnr: dict = defaultdict(lambda: defaultdict(dict))
    ssim: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["noise"], r["level"])
        psnr[key][r["method"]][r["image"]] = min(float(r["psnr_db"]), PSNR_CAP_DB)
        ssim[key][r["method"]][r["image"]] = float(r["ssim"])
    out = []
    for key in sorted(psnr, key=lambda k: (k[0], float(k[1]))):
        by = psnr[key]
        if ours not in by:
            continue
        images = sorted(set.intersection(*(set(v) for v in by.values())))
        rivals = [m for m in by if m not in learned and m != ours]
        if not images or not rivals:
            continue
        mean = {m: float(np.mean([by[m][i] for i in images])) for m in rivals}
        best = max(rivals, key=lambda m: mean[m])
        d = np.array([by[ours][i] - by[best][i] for i in images])
        lo, hi = _bootstrap(d)
        out.append(Cell(key[0], key[1], len(images), best, float(d.mean()), lo, hi,
                        float(np.mean([ssim[key][ours][i] for i in images])),
                        float(np.mean([ssim[key][best][i] for i in images]))))
    return out


def paired(rows: list[dict], a: str, b: str, column: str) -> tuple[float, float, float, int]:
    """Mean of ``a - b`` over every (noise, level, image) both have, its 95 % bootstrap CI, and the count."""
    val: dict = defaultdict(dict)
    for r in rows:
        cap = PSNR_CAP_DB if column == "psnr_db" else np.inf
        val[(r["noise"], r["level"], r["image"])][r["method"]] = min(float(r[column]), cap)
    d = np.array([v[a] - v[b] for v in val.values() if a in v and b in v])
    if not d.size:
        return float("nan"), float("nan"), float("nan"), 0
    lo, hi = _bootstrap(d)
    return float(d.mean()), lo, hi, int(d.size)


def render(cs: list[Cell], *, ours: str = "ours") -> str:
    lines = [f"| noise | level | slices | best other | {ours} - best, dB (95 % CI) | SSIM {ours} / best | verdict |",
             "| --- | --- | ---: | --- | ---: | --- | --- |"]
    for c in cs:
        lines.append(f"| {c.noise} | {c.level} | {c.n} | {c.best} | {c.diff:+.3f} ({c.lo:+.3f}..{c.hi:+.3f}) | "
                     f"{c.ssim_ours:.3f} / {c.ssim_best:.3f} | {c.verdict} |")
    count = {v: sum(c.verdict == v for c in cs) for v in ("won", "tie", "lost")}
    lines.append("")
    lines.append(f"{ours}: won {count['won']}, tie {count['tie']} (behind, CI reaching 0), lost {count['lost']} "
                 f"of {len(cs)} cells")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a benchmark's results.csv")
    ap.add_argument("--ours", default="ours", help="the method judged (default ours)")
    ap.add_argument("--twin", default=None, help="also print the paired differences against this method (mse_only)")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    with open(args.results, newline="") as f:
        rows = list(csv.DictReader(f))
    if not any(r["method"] == args.ours for r in rows):
        print(f"{args.results}: no rows of method {args.ours!r}", file=sys.stderr)
        return 2
    text = render(cells(rows, ours=args.ours), ours=args.ours)
    if args.twin:
        for column in ("psnr_db", "feature_score"):
            m, lo, hi, n = paired(rows, args.ours, args.twin, column)
            text += f"\n{args.ours} - {args.twin} {column}: {m:+.4f} (95 % CI {lo:+.4f}..{hi:+.4f}, n {n})"
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
