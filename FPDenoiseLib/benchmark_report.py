"""The benchmark's summary: per-(noise, method) means, 95% CIs, speed, and the ``summary.md`` text.

Pure functions of the result rows (as in ``results.csv``), so a summary can be re-rendered from a
finished run without torch or the models; :mod:`FPDenoiseLib.benchmark` runs the cases and re-exports
:func:`summarize`, :func:`render_summary_md` and :data:`PSNR_CAP_DB`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .baselines import BASELINE_COMMON_PARAMS, BASELINE_PARAMS
from .metrics import mean_ci95

__all__ = ["PSNR_CAP_DB", "render_summary_md", "summarize"]

#: PSNR of a slice restored exactly is infinite; summaries average it as this value (dB).
PSNR_CAP_DB = 100.0


def _fmt_level(level: float) -> str:
    return f"{float(level):.6g}"


def _finite(values: Iterable[float], cap: float | None = None) -> list[float]:
    out = []
    for v in values:
        v = float(v)
        if cap is not None and v == math.inf:
            v = cap
        if math.isfinite(v):
            out.append(v)
    return out


def summarize(rows: list[dict], *, methods: Sequence[str], noises: Sequence[str], levels: Sequence[float]) -> dict:
    """Aggregate result rows: per (noise[@level], method) means, per-method mean and 95% CI, speed.

    Infinite PSNR (exact restoration) counts as :data:`PSNR_CAP_DB`.
    """
    multi = len(levels) > 1
    keys = [(n, lv) for n in noises for lv in levels]

    def label(n: str, lv: float) -> str:
        return f"{n}@{_fmt_level(lv)}" if multi else n

    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["noise"], _fmt_level(r["level"]), r["method"]), []).append(r)
    res: dict[str, Any] = {"methods": list(methods), "noises": [label(n, lv) for n, lv in keys],
                           "levels": list(levels), "psnr": {}, "ssim": {}, "feature": {}, "n": {}}
    for n, lv in keys:
        lab = label(n, lv)
        for metric, col, cap in (("psnr", "psnr_db", PSNR_CAP_DB), ("ssim", "ssim", None), ("feature", "feature_score", None)):
            res[metric][lab] = {}
            for m in methods:
                vals = _finite((r[col] for r in by.get((n, _fmt_level(lv), m), [])), cap)
                res[metric][lab][m] = float(np.mean(vals)) if vals else math.nan
        res["n"][lab] = {m: len(by.get((n, _fmt_level(lv), m), [])) for m in methods}
    res["ci"] = {}
    res["speed"] = {}
    sel = {(n, _fmt_level(lv)) for n, lv in keys}
    for m in methods:
        mrows = [r for r in rows if r["method"] == m and (r["noise"], _fmt_level(r["level"])) in sel]
        entry = {}
        for metric, col, cap in (("psnr", "psnr_db", PSNR_CAP_DB), ("ssim", "ssim", None), ("feature", "feature_score", None)):
            vals = _finite((r[col] for r in mrows), cap)
            entry[metric] = mean_ci95(vals) if vals else (math.nan, math.nan, math.nan)
        entry["n"] = len(mrows)
        res["ci"][m] = entry
        t = [r["seconds_per_512"] for r in mrows]
        med = float(np.median(t)) if t else math.nan
        res["speed"][m] = {"median_s_per_512": med, "slices_per_s": (1.0 / med) if med > 0 else math.nan}
    return res


def _cell(v: float, fmt: str, bold: bool) -> str:
    if not math.isfinite(v):
        return "-"
    s = format(v, fmt)
    return f"**{s}**" if bold else s


def _best(values: dict[str, float], methods: Sequence[str]) -> float:
    cand = [values[m] for m in methods if m != "noisy" and math.isfinite(values.get(m, math.nan))]
    return max(cand) if cand else math.nan


def _metric_rows(res: dict, metric: str, fmt: str, methods: Sequence[str], first: str) -> list[str]:
    lines = []
    for j, lab in enumerate(res["noises"]):
        vals = res[metric][lab]
        best = _best(vals, methods)
        cells = [_cell(vals[m], fmt, m != "noisy" and format(vals[m], fmt) == format(best, fmt) if math.isfinite(best) else False)
                 for m in methods]
        lines.append(f"| {first if j == 0 else ''} | {lab} | " + " | ".join(cells) + " |")
    return lines


def render_summary_md(res: dict, *, notes: Sequence[str] = ()) -> str:
    """The ``summary.md`` text: paper-style table (PSNR block then SSIM block; rows noise types,
    columns methods, best method per row in bold, "noisy" never bolded), mean +/- 95% CI,
    feature-score table, speed table, then ``notes``."""
    methods = res["methods"]
    head = "| Metric | Noise | " + " | ".join(methods) + " |"
    sep = "| --- | --- | " + " | ".join("---:" for _ in methods) + " |"
    L = ["# FPDenoise benchmark", "", "## PSNR (dB) and SSIM per noise type", "",
         "Mean over test slices; best method per row in **bold** (the `noisy` column is the input, "
         "shown for reference and never bolded).", "", head, sep]
    L += _metric_rows(res, "psnr", ".2f", methods, "PSNR")
    L += _metric_rows(res, "ssim", ".3f", methods, "SSIM")
    L += ["", "## Mean and 95% confidence interval over all slices and noise types", "",
          "| Method | n | PSNR (dB) | SSIM | Feature score |", "| --- | ---: | --- | --- | --- |"]

    def ci(t: tuple, fmt: str) -> str:
        m, lo, hi = t
        if not math.isfinite(m):
            return "-"
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return format(m, fmt)
        return f"{format(m, fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"

    for m in methods:
        e = res["ci"][m]
        L.append(f"| {m} | {e['n']} | {ci(e['psnr'], '.2f')} | {ci(e['ssim'], '.3f')} | {ci(e['feature'], '.3f')} |")
    L += ["", "## Feature-preservation score per noise type", "",
          "Pearson correlation of GB_f(clean) and GB_f(denoised) (1 = same saliency pattern); best in **bold**.",
          "", "| Noise | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---:" for _ in methods) + " |"]
    for lab in res["noises"]:
        vals = res["feature"][lab]
        best = _best(vals, methods)
        cells = [_cell(vals[m], ".3f", m != "noisy" and math.isfinite(best) and format(vals[m], ".3f") == format(best, ".3f"))
                 for m in methods]
        L.append(f"| {lab} | " + " | ".join(cells) + " |")
    L += ["", "## Speed", "", "Median wall time per slice (batch of one), scaled to a 512x512 slice.", "",
          "| Method | s / 512x512 slice | slices / s | x ours |", "| --- | ---: | ---: | ---: |"]
    ours_t = res["speed"].get("ours", {}).get("median_s_per_512", math.nan)
    for m in methods:
        s = res["speed"][m]
        ratio = s["median_s_per_512"] / ours_t if (math.isfinite(ours_t) and ours_t > 0) else math.nan
        L.append(f"| {m} | {_cell(s['median_s_per_512'], '.4f', False)} | {_cell(s['slices_per_s'], '.2f', False)} | "
                 f"{_cell(ratio, '.1f', False)} |")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


def _notes(feature_net: Any, learned: dict, feature_scores: bool = True) -> list[str]:
    notes = [
        "PSNR and SSIM are computed on the original intensity scale (HU for CT; file units otherwise) with "
        "data_range = max(clean) - min(clean) of each clean slice in those units.",
        f"An exactly restored slice has infinite PSNR; means and CIs count it as {PSNR_CAP_DB:g} dB (results.csv "
        "keeps inf).",
        "Every method denoises the same noisy input per slice, noise type and level.",
    ]
    if feature_net is not None:
        notes.append(
            f"Feature score: one common feature extractor for every method, the restoration net f of "
            f"{feature_net.checkpoint_path.name} (ours); signed Guided-Backprop maps."
        )
    elif not feature_scores:
        notes.append("Feature score not computed: --no-feature-scores.")
    else:
        notes.append("Feature score not computed: no checkpoint with a restoration net was given (--model).")
    if "drunet" in learned:
        notes.append(
            "drunet = DPIR's DRUNet architecture trained here by `fpdenoise train` on the same data; NOT DPIR's "
            "released weights (they cannot be downloaded here), so it is not a reproduction of DPIR's numbers."
        )
    notes.append("Classical baseline parameters (set once, not tuned on this data): " + BASELINE_COMMON_PARAMS + ".")
    notes += [f"`{k}`: {v}" for k, v in BASELINE_PARAMS.items()]
    return notes
