"""Speed figures of FPDenoise (prints them; no assertions).

    python benchmarks/speed.py [--model CKPT] [--device cpu] [--volume-slices 300] [--quick]

Prints, on one 512x512 slice (the same input for every method):
  1. slices/s of every method (classical baselines, ours in float32 and, where the CPU has native
     bf16, in bf16 as the default precision runs it, the DRUNet architecture), ours vs BM3D;
  2. the U-Net forward's achieved FLOP/s (FLOPs counted by torch.utils.flop_counter) against this
     machine's measured float32 matmul peak in the same run;
  3. the train-step time with the FP loss vs the MSE-only loss at the same batch size;
  4. before/after figures of the optimisations tried: autograd vs no_grad vs inference_mode,
     batch size, channels_last, thread count, batching the benchmark's GB maps (GB(clean) once), the
     experimental attention layers (``--attention 2 3``); with ``--widths 30 36``, section 4b times a wider
     net (attention at 1 2 3) against this one, in bf16 and float32;
  5. time and peak resident memory (VmHWM and ru_maxrss) of a fresh subprocess that denoises a
     512x512xN int16 volume with Denoiser.denoise_array, at the default precision and in float32.
Before/after pairs are timed alternately (A B A B ...) so load changes on a shared machine hit
both sides alike.

Without --model (and no shipped model) a randomly initialised network of the training default
size is used: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from FPDenoiseLib.baselines import BASELINES
from FPDenoiseLib.device import bf16_supported
from FPDenoiseLib.inference import Denoiser, default_model_path
from FPDenoiseLib.losses import FPLoss
from FPDenoiseLib.models import build_model, grow_attention
from FPDenoiseLib.noise import add_noise
from FPDenoiseLib.phantoms import synthetic_ct_slice
from FPDenoiseLib.training import TrainConfig
from FPDenoiseLib.xai import guided_backprop


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ab(fa: Callable[[], object], fb: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb`` timed alternately (A B A B ...), so that load changes
    on a shared machine hit both sides alike; one untimed warm-up call each."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def peak_rss_mib() -> tuple[float, float | None]:
    """(ru_maxrss, VmHWM) in MiB. VmHWM is this process image's own peak; ru_maxrss survives
    fork/exec on Linux and so can report the parent's peak for a small child."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm = None
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru, hwm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_nets(model: str | None, device: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    path = model or (str(default_model_path()) if default_model_path().is_file() else None)
    if path:
        den = Denoiser(path, device=device)
        return den.model, den.restoration, f"checkpoint {path}"
    cfg = TrainConfig()
    torch.manual_seed(0)
    dev = torch.device("cpu" if device == "auto" and not torch.cuda.is_available() else
                       ("cuda" if device == "auto" else device))
    d = build_model(cfg.model_config("denoiser")).eval().to(dev)
    f = build_model(cfg.model_config("restoration")).eval().to(dev)
    return d, f, f"random-init U-Net {cfg.model_config('denoiser')}"


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def mm() -> None:
        torch.mm(a, b)
        sync(device)

    return 2 * n**3 / timeit(mm, repeats)


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(x)
    return int(fc.get_total_flops())


def volume_memory(model: str | None, device: str, slices: int, batch_size: int | None, precision: str = "auto") -> dict:
    """Run the volume denoising in a fresh subprocess and return its RSS figures (MiB)."""
    code = f"""
import json, time, numpy as np, torch
from FPDenoiseLib.inference import Denoiser
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from speed import load_nets
from speed import peak_rss_mib
model = {model!r}
if model is None:
    from FPDenoiseLib.inference import default_model_path
    model = str(default_model_path()) if default_model_path().is_file() else None
if model is None:  # random weights in a throwaway checkpoint: same memory as a trained one
    import tempfile, os
    from FPDenoiseLib.checkpoint import save_checkpoint
    d, f, _ = load_nets(None, "cpu")
    model = os.path.join(tempfile.mkdtemp(), "rand.pt")
    save_checkpoint(model, {{"denoiser": d, "restoration": f}}, normalization={{}})
den = Denoiser(model, device={device!r}, batch_size={batch_size}, precision={precision!r})
# a realistic CT volume: the committed real lung slice with scanner-like noise (uniform random
# values would look like salt & pepper everywhere and trigger the impulse pre-stage)
from FPDenoiseLib.inference import resources_dir
from FPDenoiseLib.io import read_image
ct = np.asarray(read_image(resources_dir() / "TestData" / "real_ct_lung1_slice.nrrd").array, np.float32).reshape(512, 512)
rng = np.random.default_rng(0)
vol = np.empty(({slices}, 512, 512), dtype=np.int16)  # filled slice by slice: no float temp of the volume
for z in range({slices}):
    vol[z] = np.clip(ct + rng.normal(0.0, 40.0, ct.shape), -1024, 3071).astype(np.int16)
base = peak_rss_mib()
t0 = time.perf_counter()
out = den.denoise_array(vol, modality="CT")
dt = time.perf_counter() - t0
print(json.dumps({{"before": base, "peak": peak_rss_mib(), "seconds": dt, "precision": den.precision,
                  "input_mib": vol.nbytes / 2**20, "out_dtype": str(out.dtype)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: shipped model, else random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--volume-slices", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-patch", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 40-slice volume, skip bm3d/nlmeans repeats")
    ap.add_argument("--skip-volume", action="store_true")
    ap.add_argument("--widths", type=int, nargs="*", default=[],
                    help="also time a resunet of these base widths with attention at 1 2 3 against this one "
                         "(section 4b; e.g. 30 36: the GPU chain's BASE)")
    args = ap.parse_args(argv)
    reps = 1 if args.quick else args.repeats
    vol_slices = 40 if args.quick else args.volume_slices

    d, f, what = load_nets(args.model, args.device)
    dev = next(d.parameters()).device
    print(f"# FPDenoise speed ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, model: {what}")
    n_params = sum(p.numel() for p in d.parameters())
    print(f"denoiser parameters: {n_params / 1e6:.2f} M")

    clean = ((synthetic_ct_slice("chest", size=512, seed=0) + 1024.0) / 4095.0).astype(np.float32)
    noisy = add_noise(clean, "gaussian", level=0.5, seed=0).astype(np.float32)
    x = torch.from_numpy(noisy)[None, None].to(dev)

    # ---- 1. slices/s per method
    print("\n## 1. Slices per second on one 512x512 slice (median of repeats, batch 1)")
    rates: dict[str, float] = {}
    for name, fn in BASELINES.items():
        r = 1 if name in ("bm3d", "nlmeans") else max(reps, 3)
        rates[name] = 1.0 / timeit(lambda fn=fn: fn(noisy), r, warmup=0 if name == "bm3d" else 1)

    def fwd(net: torch.nn.Module, bf16: bool = False, inp: torch.Tensor | None = None) -> Callable[[], object]:
        inp = x if inp is None else inp

        def run() -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                net(inp)
            sync(dev)
        return run

    rates["ours (denoiser)"] = 1.0 / timeit(fwd(d), max(reps, 3))
    bf16 = bf16_supported(dev) and getattr(d, "config", {}).get("arch") == "resunet"
    if bf16:  # what Denoiser(precision="auto"), the default, runs here
        rates["ours (denoiser, bf16)"] = 1.0 / timeit(fwd(d, bf16=True), max(reps, 3))
    cfg = TrainConfig(arch="drunet")
    torch.manual_seed(0)
    dr = build_model(cfg.model_config("denoiser")).eval().to(dev)
    rates["drunet (arch)"] = 1.0 / timeit(fwd(dr), max(reps, 3))
    for name, r in sorted(rates.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {r:9.2f} slices/s   {1000 / r:9.1f} ms/slice")
    print(f"  ours / BM3D speed ratio: {rates['ours (denoiser)'] / rates['bm3d']:.1f}x faster (float32)")
    if bf16:
        print(f"  ours in bf16 (the default here, input layers float32) / BM3D: "
              f"{rates['ours (denoiser, bf16)'] / rates['bm3d']:.1f}x faster, / NL-means "
              f"{rates['ours (denoiser, bf16)'] / rates['nlmeans']:.1f}x")

    # ---- 2. FLOP/s
    print("\n## 2. U-Net forward achieved FLOP/s vs measured float32 matmul peak")
    flops = forward_flops(d, x)
    t_fwd = 1.0 / rates["ours (denoiser)"]
    peak = matmul_peak(dev)
    print(f"  U-Net forward: {flops / 1e9:.2f} GFLOP per 512x512 slice, {t_fwd * 1000:.1f} ms "
          f"-> {flops / t_fwd / 1e9:.1f} GFLOP/s")
    print(f"  matmul 2048^2 float32 peak: {peak / 1e9:.1f} GFLOP/s -> U-Net at {100 * flops / t_fwd / peak:.0f}% of peak")

    # ---- 3. train step FP vs MSE
    print(f"\n## 3. Train step time, batch {args.train_batch} x {args.train_patch}^2 patches (alternating timings)")
    torch.manual_seed(0)
    clean_b = torch.rand(args.train_batch, 1, args.train_patch, args.train_patch, device=dev)
    noisy_b = clean_b + 0.05 * torch.randn_like(clean_b)
    dt = build_model(TrainConfig().model_config("denoiser")).to(dev).train()
    ft = build_model(TrainConfig().model_config("restoration")).to(dev)
    opt = torch.optim.Adam(dt.parameters(), lr=1e-4)

    def make_step(mode: str, cache: bool) -> Callable[[], None]:
        loss_fn = FPLoss(ft if mode == "fp" else None, lam=1.0, mode=mode)
        gbc = loss_fn.gb_clean(clean_b) if cache else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(dt(noisy_b), noisy_b, clean_b, gb_clean=gbc)
            loss.backward()
            opt.step()
            sync(dev)

        return step

    r3 = max(reps, 3)
    mse_t, fp_t = ab(make_step("mse", False), make_step("fp", False), r3)
    fp_t2, fpc_t = ab(make_step("fp", False), make_step("fp", True), r3)
    print(f"  MSE-only step: {mse_t * 1000:.0f} ms")
    print(f"  FP step (GB(clean) recomputed each step): {fp_t * 1000:.0f} ms -> FP / MSE = {fp_t / mse_t:.2f}")
    print(f"  FP step, GB(clean) recomputed -> cached per sample: {fp_t2 * 1000:.0f} ms | {fpc_t * 1000:.0f} ms "
          f"({fp_t2 / fpc_t:.2f}x; cached FP / MSE = {fpc_t / mse_t:.2f})")

    # ---- 4. optimisations before/after (inference)
    print("\n## 4. Inference optimisations on 512x512 slices, before | after (alternating timings, per slice)")
    xb = torch.from_numpy(np.repeat(noisy[None, None], 8, axis=0)).to(dev)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    d_attn = None
    if getattr(d, "config", {}).get("arch") == "resunet" and not d.config.get("attention"):
        # the same net with --attention 2 3 (zero-initialised: the cost of a trained one)
        d_attn = grow_attention(d, [2, 3]).eval().to(memory_format=torch.channels_last)

    def fwd_fn(ctx: str, batch: int, cl: bool = False, attn: bool = False) -> Callable[[], None]:
        xi = xb[:batch].contiguous(memory_format=torch.channels_last) if cl else xb[:batch]
        net = d_attn if attn else (d_cl if cl else d)

        def run() -> None:
            if ctx == "grad":
                net(xi)
            elif ctx == "no_grad":
                with torch.no_grad():
                    net(xi)
            elif ctx == "bf16":  # Denoiser(precision="bf16"), the default ("auto") where the CPU has bf16
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
                    net(xi)
            else:
                with torch.inference_mode():
                    net(xi)
            sync(dev)

        return run

    r4 = max(reps, 3)
    rows = []

    def compare(label: str, a: tuple, b: tuple) -> None:
        ta, tb = ab(fwd_fn(*a), fwd_fn(*b), r4)
        rows.append((label, ta / a[1], tb / b[1]))
        print(f"  {label:44s} {ta / a[1] * 1000:8.1f} ms | {tb / b[1] * 1000:8.1f} ms  ({ta / a[1] / (tb / b[1]):.2f}x)")

    compare("autograd on -> no_grad (batch 1)", ("grad", 1), ("no_grad", 1))
    compare("autograd on -> inference_mode (batch 1)", ("grad", 1), ("inference", 1))
    compare("batch 1 -> batch 4 (inference_mode)", ("inference", 1), ("inference", 4))
    compare("batch 4 -> batch 8 (inference_mode)", ("inference", 4), ("inference", 8))
    compare("contiguous -> channels_last (batch 4)", ("inference", 4), ("inference", 4, True))
    if d_attn is not None:
        compare("resunet -> + attention 2 3 (batch 1, ch.-last)", ("inference", 1, True), ("inference", 1, True, True))
    if bf16_supported(dev):
        compare("float32 -> bf16 autocast (batch 1, ch.-last)", ("inference", 1, True), ("bf16", 1, True))
    else:
        print("  float32 -> bf16: this device has no native bfloat16 (--precision bf16 is refused here)")
    if dev.type == "cpu":
        n0 = torch.get_num_threads()
        for n in sorted({1, 2 * n0} - {n0}):
            base_fn = fwd_fn("inference", 4)

            def with_threads(n: int = n, base_fn: Callable[[], None] = base_fn) -> None:
                torch.set_num_threads(n)
                try:
                    base_fn()
                finally:
                    torch.set_num_threads(n0)

            ta, tb = ab(base_fn, with_threads, r4)
            print(f"  {f'threads {n0} -> {n} (batch 4)':44s} {ta / 4 * 1000:8.1f} ms | {tb / 4 * 1000:8.1f} ms  "
                  f"({ta / tb:.2f}x)")

    # GB of the clean slice: the benchmark computes GB(clean) once per (slice, noise) and all
    # methods' GB maps in one batched backward, instead of one (clean, denoised) pair per method.
    n_m = 12
    xs = torch.from_numpy(np.repeat(noisy[None, None, ::2, ::2], n_m + 1, axis=0).copy()).to(dev)

    def gb_pairs() -> None:
        for k in range(n_m):
            guided_backprop(f, xs[:1])
            guided_backprop(f, xs[k + 1 : k + 2])
        sync(dev)

    def gb_batched() -> None:
        guided_backprop(f, xs)
        sync(dev)

    ta, tb = ab(gb_pairs, gb_batched, 1 if args.quick else 2)
    print(f"  {'feature score GB: 12 pairs -> 1 batch of 13':44s} {ta * 1000:8.0f} ms | {tb * 1000:8.0f} ms  "
          f"({ta / tb:.2f}x, 256x256, per (slice, noise))")

    # ---- 4b. what a wider net would cost (the GPU chain's BASE; random weights: speed does not depend on them)
    if args.widths and getattr(d, "config", {}).get("arch") == "resunet":
        print("\n## 4b. A wider net against this one (batch 1, channels-last, alternating timings, per slice)")
        xc = x.contiguous(memory_format=torch.channels_last)
        base = copy.deepcopy(d).eval().to(memory_format=torch.channels_last)
        w0 = d.config["channels"][0]
        cands = {f"+ attention at 1 (base {w0})": (w0, sorted({1, *d.config.get("attention", ())}))}
        cands.update({f"base {w}, attention at 1 2 3": (w, [1, 2, 3]) for w in args.widths})
        for label, (w, att) in cands.items():
            torch.manual_seed(0)
            wide = build_model({**d.config, "channels": [w * 2**i for i in range(len(d.config["channels"]))],
                                "attention": att}).eval().to(dev).to(memory_format=torch.channels_last)
            for prec in (("bf16", "fp32") if bf16 else ("fp32",)):
                on = prec == "bf16"
                ta, tb = ab(fwd(base, on, xc), fwd(wide, on, xc), max(reps, 3))
                print(f"  {f'{label}, {prec}':44s} {ta * 1000:8.1f} ms | {tb * 1000:8.1f} ms  ({tb / ta:.2f}x the time)")

    # ---- 5. memory
    if not args.skip_volume:
        print(f"\n## 5. Time and peak memory denoising a 512x512x{vol_slices} int16 volume (fresh subprocess each)")
        for precision in ("auto", "fp32") if bf16 else ("auto",):
            m = volume_memory(args.model, args.device, vol_slices, None, precision)
            if "error" in m:
                print(f"  failed: {m['error']}")
                continue
            (ru0, hwm0), (ru1, hwm1) = m["before"], m["peak"]
            print(f"  Denoiser(precision={precision!r} -> {m['precision']}).denoise_array (default batch: 1 slice on CPU): "
                  f"input {m['input_mib']:.0f} MiB (output as large); "
                  f"peak RSS (VmHWM) {hwm0:.0f} MiB after model load -> {hwm1:.0f} MiB after denoising "
                  f"(ru_maxrss {ru0:.0f} -> {ru1:.0f} MiB); {m['seconds']:.1f} s "
                  f"({vol_slices / m['seconds']:.2f} slices/s)")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus "
          "(shared machines make every figure above noisy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
