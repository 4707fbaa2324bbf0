#!/usr/bin/env python
"""Fine-tune the noise estimator of a trained ResUNet denoiser (the denoiser itself stays as it is).

    python scripts/finetune_estimator.py Resources/Models/fpdenoise_default.pt --out runs/est/default_a.pt
    python scripts/finetune_estimator.py runs/est/default_a.pt --teacher Resources/Models/fpdenoise_default.pt \\
        --lr 2e-4 --clean-full 0.3 --zoom 0.5 --seed 1 --out runs/est/default_b.pt

Why: the shipped estimators, trained on 96-pixel patches of two MR patients' contrasts, read 5-10 % noise
on clean T1 brains they had not seen (the held-out MR set, ``data/real/heldout_mr``), so the denoiser
smoothed a clean image (37.9-57.2 dB against itself). Their image-wide context is learned on patches but
used on whole images. Here each step sees ``--patches`` 96-pixel patches and ``--full`` whole slices of the
training corpus, half of them (``--aug``) under a random change of contrast
(:func:`FPDenoiseLib.data.intensity_augment`; ``--zoom``: of those whole slices, the fraction also resampled
to another pixel size, 0.6-1.6x), with one of the model's own training noises at a random level (a whole
slice is left clean with probability ``--clean-full``, a patch with 0.1). The loss is the L1 error against
the true local noise map (``models.local_noise_map``) plus, on the samples with their own contrast,
``--distill`` times the L1 difference to the ``--teacher`` estimator (default: the input's), so the maps the
denoiser was trained with move only where they were wrong.

Every ``--eval-every`` steps it prints a check on training slices (clean, with reversed contrast, with gamma
0.5: the largest median map over the object; and the median map at Gaussian 2 %, true 0.02) and saves
``--out`` (the full checkpoint, restoration net included; ship it with ``scripts/export_model.py --shipped``).
The held-out patients are never read.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from FPDenoiseLib.data import intensity_augment, load_clean_slices  # noqa: E402
from FPDenoiseLib.models import ResUNet, local_noise_map  # noqa: E402
from FPDenoiseLib.noise import add_noise  # noqa: E402

PATCH = 96


def _check_image(c: np.ndarray, kind: str) -> np.ndarray:
    """A training slice as it is ("id"), with its contrast reversed inside the object ("inv"), or gamma 0.5:
    the training augmentation with its draws fixed."""
    if kind == "id":
        return np.clip(c, 0, None).astype(np.float32)
    gamma = (1.0, 1.0) if kind == "inv" else (0.5, 0.5)
    return intensity_augment(c, np.random.default_rng(0), gamma=gamma, invert_prob=float(kind == "inv"),
                             scale=(1.0, 1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint with a ResUNet denoiser (its estimator is the starting point)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", default=None, help="checkpoint whose estimator the distillation term keeps "
                                                     "close to (default: the input's)")
    ap.add_argument("--data", action="append", default=None,
                    help="training images (repeatable; default data/real/train and Resources/TrainingData)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--patches", type=int, default=8)
    ap.add_argument("--full", type=int, default=3)
    ap.add_argument("--aug", type=float, default=0.5)
    ap.add_argument("--clean-full", type=float, default=0.1)
    ap.add_argument("--zoom", type=float, default=0.0)
    ap.add_argument("--faint", type=float, default=0.0,
                    help="probability that a noisy whole slice gets a faint level (the lowest 15 %% of the range), "
                         "so that clean and faintly noisy whole images are told apart")
    ap.add_argument("--distill", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep an exponential moving average of the estimator's weights with this decay (e.g. 0.99) "
                         "and check and save it instead of the last step's weights (0 = off)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = a.data or ["data/real/train", "Resources/TrainingData"]
    ck = load_checkpoint(a.ckpt)
    net = model_from_checkpoint(ck, "denoiser").float().eval()
    if not isinstance(net, ResUNet):
        ap.error(f"{a.ckpt}: the denoiser is not a ResUNet (no noise estimator)")
    teacher = (model_from_checkpoint(load_checkpoint(a.teacher), "denoiser").float() if a.teacher
               else copy.deepcopy(net)).eval().requires_grad_(False)
    net.requires_grad_(False)
    net.estimator.requires_grad_(True)
    pool = list(ck["training"]["noises"])
    lo_level, hi_level = ck["training"]["level_range"]
    slices = load_clean_slices(data, max_slices_per_volume=32, seed=a.seed)
    print(f"{len(slices)} slices", {m: sum(s.modality == m for s in slices) for m in ("CT", "MR", "XR", "OT")},
          flush=True)
    rng = np.random.default_rng(a.seed)

    def noisy_of(c: np.ndarray, zero: float = 0.1, faint: float = 0.0) -> np.ndarray:
        if rng.random() < zero:
            return c.copy()
        name = pool[int(rng.integers(len(pool)))]
        top = lo_level + 0.15 * (hi_level - lo_level) if faint > 0 and rng.random() < faint else hi_level
        return add_noise(c, name, level=float(rng.uniform(lo_level, top)), seed=rng).astype(np.float32)

    check = [s for s in slices if s.modality == "MR"][::9][:3] + [s for s in slices if s.modality == "CT"][::40][:3]

    def evaluate() -> dict:
        out = {}
        with torch.no_grad():
            for kind in ("id", "inv", "g05"):
                clean_max, at2 = [], []
                for s in check:
                    c = _check_image(s.array, kind)
                    body = c > 0.05 * c.max()
                    clean_max.append(float(np.median(net.estimate_noise(torch.from_numpy(c)[None, None])[0, 0]
                                                     .numpy()[body])))
                    n = c + np.random.default_rng(7).normal(0, 0.02, c.shape).astype(np.float32)
                    at2.append(float(np.median(net.estimate_noise(torch.from_numpy(n)[None, None])[0, 0]
                                               .numpy()[body])))
                out[kind] = (round(max(clean_max), 4), round(float(np.median(at2)), 4))
        return out

    others = {k: model_from_checkpoint(ck, k) for k in ck["models"] if k != "denoiser"}  # saved with it, as loaded
    print("before", evaluate(), flush=True)
    opt = torch.optim.Adam(net.estimator.parameters(), lr=a.lr)
    ema = {k: v.detach().clone() for k, v in net.estimator.state_dict().items()} if a.ema > 0 else None
    record = {k: v for k, v in vars(a).items() if k != "threads"} | {"data": data}
    info = dict(ck["training"])
    info["estimator_finetune"] = [*info.get("estimator_finetune", []), record]
    t0 = time.time()
    for step in range(1, a.steps + 1):
        groups = []
        cs, ns, aug = [], [], []
        for _ in range(a.patches):
            s = slices[int(rng.integers(len(slices)))].array
            if min(s.shape) < PATCH:
                continue
            y, x = rng.integers(0, s.shape[0] - PATCH + 1), rng.integers(0, s.shape[1] - PATCH + 1)
            c = s[y:y + PATCH, x:x + PATCH].astype(np.float32)
            is_aug = rng.random() < a.aug
            c = intensity_augment(c, rng) if is_aug else c
            cs.append(c)
            ns.append(noisy_of(c))
            aug.append(is_aug)
        if cs:
            groups.append((np.stack(cs)[:, None], np.stack(ns)[:, None], np.array(aug)))
        for _ in range(a.full):
            c = slices[int(rng.integers(len(slices)))].array.astype(np.float32)
            is_aug = rng.random() < a.aug
            c = intensity_augment(c, rng) if is_aug else c
            if is_aug and rng.random() < a.zoom:  # another pixel size: resampled anatomy is still clean
                c = zoom(c, float(np.exp(rng.uniform(np.log(0.6), np.log(1.6)))), order=1).astype(np.float32)
                c = c[:512, :512]
                c = c[: c.shape[0] // 2 * 2, : c.shape[1] // 2 * 2]
            groups.append((c[None, None], noisy_of(c, a.clean_full, a.faint)[None, None], np.array([is_aug])))
        loss = torch.zeros(())
        for c, n, is_aug in groups:
            ct, nt = torch.from_numpy(c), torch.from_numpy(n)
            m = net.estimate_noise(nt)
            per = (m - local_noise_map(nt - ct)).abs().mean(dim=(1, 2, 3))
            if a.distill > 0 and (~is_aug).any():
                with torch.no_grad():
                    tm = teacher.estimate_noise(nt)
                per = per + a.distill * torch.from_numpy(~is_aug).float() * (m - tm).abs().mean(dim=(1, 2, 3))
            loss = loss + per.mean() / len(groups)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in net.estimator.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(a.ema).add_(v.detach(), alpha=1 - a.ema)
                    else:
                        ema[k].copy_(v)
        if step % 50 == 0:
            print(f"step {step} loss {float(loss):.5f} {time.time() - t0:.0f} s", flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            live = None
            if ema is not None:  # check and save the average; training goes on from the live weights
                live = copy.deepcopy(net.estimator.state_dict())
                net.estimator.load_state_dict(ema)
            print("check", step, evaluate(), flush=True)
            record["steps_done"], record["wall_s"] = step, round(time.time() - t0, 1)
            save_checkpoint(a.out, {**others, "denoiser": net}, normalization=ck["normalization"], training=info)
            if live is not None:
                net.estimator.load_state_dict(live)
    return 0


if __name__ == "__main__":
    sys.exit(main())
