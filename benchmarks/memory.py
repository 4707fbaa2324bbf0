"""Peak memory of streaming denoising: a 512x512x300 int16 CT volume through ``Denoiser``.

The measurement runs in a fresh child process (its own ``VmHWM`` high-water mark, not the parent's),
which records its peak resident set size (RSS) at three points:

1. after importing the library and loading the model (the fixed cost of the process),
2. after creating the int16 input volume (+ volume size),
3. after ``Denoiser.denoise_array`` (+ the int16 output array + one batch of float32 slices and
   the network's activations; the volume is never converted to float as a whole).

The figure to compare with the volume size is (3) - (1): the working memory of denoising.

Usage::

    python benchmarks/memory.py                       # 512x512x300, shipped model (or a random one)
    python benchmarks/memory.py --slices 60           # quicker; working memory grows by the output only
    python benchmarks/memory.py --model my.pt --batch-size 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from FPDenoiseLib.inference import Denoiser

def rss_mib():
    # VmHWM is this process's own peak; ru_maxrss can carry the parent's peak over fork+exec.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

den = Denoiser(args["model"], device="cpu", batch_size=args["batch_size"])
r_model = rss_mib()
nz, ny, nx = args["shape"]
rng = np.random.default_rng(0)
# CT-like HU content: body ellipse of soft tissue with noise, air outside; built slice-wise so
# no float copy of the whole volume exists at any time.
vol = np.empty((nz, ny, nx), dtype=np.int16)
yy, xx = np.mgrid[0:ny, 0:nx]
body = ((yy - ny / 2) / (0.4 * ny)) ** 2 + ((xx - nx / 2) / (0.45 * nx)) ** 2 < 1
for k in range(nz):
    s = np.where(body, 40.0, -1000.0) + rng.normal(0, 30, (ny, nx))
    vol[k] = np.clip(s, -1024, 3071).astype(np.int16)
r_volume = rss_mib()
t0 = time.perf_counter()
out = den.denoise_array(vol, modality="CT")
dt = time.perf_counter() - t0
r_peak = rss_mib()
assert out.shape == vol.shape and out.dtype == vol.dtype
print(json.dumps({"rss_model_mib": r_model, "rss_volume_mib": r_volume, "rss_peak_mib": r_peak,
                  "seconds": dt, "volume_mib": vol.nbytes / 2**20}))
"""


def _random_checkpoint(folder: Path) -> Path:
    """The default architecture (U-Net, 16 base channels, depth 4) with random weights."""
    import torch

    from FPDenoiseLib.checkpoint import save_checkpoint
    from FPDenoiseLib.intensity import DEFAULT_POLICY
    from FPDenoiseLib.models import build_model
    from FPDenoiseLib.training import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig()
    models = {r: build_model(cfg.model_config(r)) for r in ("denoiser", "restoration")}
    return save_checkpoint(folder / "random_default_arch.pt", models, normalization=DEFAULT_POLICY,
                           training={"name": "random-default-architecture"})


def measure(*, slices: int = 300, size: int = 512, model: str | None = None, batch_size: int = 8,
            threads: int = 1) -> dict:
    """Run the child process and return its figures (MiB, seconds) plus derived ratios."""
    from FPDenoiseLib.inference import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = str(default_model_path()) if default_model_path().is_file() else str(_random_checkpoint(Path(tmp)))
        spec = {"model": model, "shape": [slices, size, size], "batch_size": batch_size, "threads": threads}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"memory benchmark child failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(model=model, shape=spec["shape"], batch_size=batch_size, threads=threads, wall_s=time.time() - t0)
    res["working_mib"] = res["rss_peak_mib"] - res["rss_model_mib"]
    res["working_over_volume"] = res["working_mib"] / res["volume_mib"]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512, help="in-plane size (pixels)")
    p.add_argument("--model", default=None, help="checkpoint (default: shipped model, else random default arch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    res = measure(slices=a.slices, size=a.size, model=a.model, batch_size=a.batch_size, threads=a.threads)
    nz, ny, nx = res["shape"]
    print(f"volume {nx}x{ny}x{nz} int16 = {res['volume_mib']:.0f} MiB; model {Path(res['model']).name}; "
          f"batch {res['batch_size']}; {res['threads']} thread(s)")
    print(f"peak RSS after model load   {res['rss_model_mib']:8.0f} MiB")
    print(f"peak RSS with input volume  {res['rss_volume_mib']:8.0f} MiB")
    print(f"peak RSS after denoising    {res['rss_peak_mib']:8.0f} MiB")
    print(f"working memory (peak - model) {res['working_mib']:.0f} MiB = {res['working_over_volume']:.2f} x volume "
          f"(input + output = 2.00 x volume)")
    print(f"denoising time {res['seconds']:.1f} s ({res['seconds'] / nz:.2f} s/slice)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
