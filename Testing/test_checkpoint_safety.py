"""Untrusted checkpoints: executable pickles refused (and never run), altered bytes refused,
architecture / normalisation mismatches refused with a message naming what differs."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from io_helpers import tree_hash

from FPDenoiseLib.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from FPDenoiseLib.cli import main
from FPDenoiseLib.errors import CheckpointError
from FPDenoiseLib.inference import Denoiser
from FPDenoiseLib.intensity import DEFAULT_POLICY
from FPDenoiseLib.models import UNet
from FPDenoiseLib.training import TrainConfig

torch.set_num_threads(1)


class Payload:
    """Unpickling this runs ``os.system`` (creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _good(path: Path, base: int = 4) -> Path:
    torch.manual_seed(0)
    models = {"denoiser": UNet(base_channels=base, depth=2, residual=True),
              "restoration": UNet(base_channels=base, depth=2, residual=False)}
    return save_checkpoint(path, models, normalization=DEFAULT_POLICY, training={"name": "t"})


def evil_torch_file(d: Path, marker: Path) -> Path:
    """A torch.save'd dict that looks like a checkpoint but carries the payload."""
    p = d / "evil.pt"
    ck = torch.load(_good(d / "g.pt"), weights_only=True)
    ck["training"] = {"name": Payload(marker)}
    torch.save(ck, p)
    return p


def evil_plain_pickle(d: Path, marker: Path) -> Path:
    """A legacy (non-zip) pickle file with the payload at the top level."""
    p = d / "evil_legacy.pt"
    with open(p, "wb") as fh:
        pickle.dump({"format": "fpdenoise-checkpoint/1", "x": Payload(marker)}, fh)
    return p


def evil_tensor_subclass(d: Path, marker: Path) -> Path:
    """The payload hidden inside a model state_dict entry."""
    p = d / "evil_sd.pt"
    ck = torch.load(_good(d / "g.pt"), weights_only=True)
    ck["models"]["denoiser"]["state_dict"]["evil"] = Payload(marker)
    torch.save(ck, p)
    return p


@pytest.mark.parametrize("make", [evil_torch_file, evil_plain_pickle, evil_tensor_subclass])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_executable_pickle_refused_and_not_run(tmp_path, make):
    marker = tmp_path / "PWNED"
    path = make(tmp_path, marker)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "refused" in msg and "executable pickle" in msg and "\n" not in msg
    assert not marker.exists(), "the pickle payload ran"
    # same through the library entry point and the CLI
    with pytest.raises(CheckpointError):
        Denoiser(path, device="cpu")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 16, 16), np.int16)), str(tmp_path / "in.nrrd"))
    rc = main(["denoise", str(tmp_path / "in.nrrd"), str(tmp_path / "out.nrrd"), "--model", str(path),
               "--device", "cpu"])
    assert rc == 2 and not (tmp_path / "out.nrrd").exists() and not marker.exists()


def test_payload_really_runs_without_weights_only(tmp_path):
    """Guard against a vacuous test: the crafted file does execute code under a plain unpickler."""
    marker = tmp_path / "PWNED"
    path = evil_plain_pickle(tmp_path, marker)
    with open(path, "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


def _altered_tensor(d: Path) -> Path:
    p = _good(d / "c.pt")
    ck = torch.load(p, weights_only=True)
    sd = ck["models"]["denoiser"]["state_dict"]
    k = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[k].view(-1)[0] += 1e-3  # one weight nudged, stored hash kept
    torch.save(ck, p)
    return p


def _altered_meta(d: Path) -> Path:
    p = _good(d / "c.pt")
    ck = torch.load(p, weights_only=True)
    ck["normalization"]["ct_window"] = [-1000.0, 1000.0]
    torch.save(ck, p)
    return p


def _flipped_byte_in_file(d: Path) -> Path:
    """Flip bytes inside a stored tensor record of the zip (as a bad disk/transfer would)."""
    p = _good(d / "c.pt")
    with zipfile.ZipFile(p) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(p.read_bytes())
    for j in range(16):
        raw[offset + 64 + j] ^= 0xFF
    p.write_bytes(bytes(raw))
    return p


def _altered_resume_state(d: Path) -> Path:
    """An interrupted run's checkpoint whose Adam moments were altered."""
    torch.manual_seed(0)
    f = UNet(base_channels=4, depth=2, residual=False)
    opt = torch.optim.Adam(f.parameters())
    f(torch.rand(1, 1, 16, 16)).mean().backward()
    opt.step()
    p = save_checkpoint(d / "r.pt", {"restoration": f}, normalization=DEFAULT_POLICY, training={},
                        resume={"stage": "restoration", "step": 1, "optimizer": opt.state_dict(), "scheduler": {}})
    load_checkpoint(p)  # intact: fine
    ck = torch.load(p, weights_only=True)
    ck["resume"]["optimizer"]["state"][0]["exp_avg"].view(-1)[0] += 1.0
    torch.save(ck, p)
    return p


def _truncated(d: Path) -> Path:
    p = _good(d / "c.pt")
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _foreign(d: Path) -> Path:
    p = d / "plain_state_dict.pt"
    torch.save(UNet(base_channels=4, depth=2).state_dict(), p)
    return p


@pytest.mark.parametrize("make,expect", [
    (_altered_tensor, "content hash mismatch"),
    (_altered_meta, "content hash mismatch"),
    (_flipped_byte_in_file, ""),  # caught by the zip CRC or by the content hash: either way refused
    (_altered_resume_state, "resume-state hash mismatch"),
    (_truncated, "not a readable checkpoint"),
    (_foreign, "not an FPDenoise checkpoint"),
], ids=["tensor", "normalization", "flipped-bytes", "resume-state", "truncated", "foreign"])
def test_altered_or_foreign_checkpoint_refused(tmp_path, make, expect):
    p = make(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value) and expect in str(ei.value) and "\n" not in str(ei.value)


def test_check_compatible_names_every_difference(tmp_path):
    ck = load_checkpoint(_good(tmp_path / "c.pt", base=4))
    want = UNet(base_channels=8, depth=3, residual=True).config
    with pytest.raises(CheckpointError) as ei:
        check_compatible(ck, configs={"denoiser": want}, normalization={**DEFAULT_POLICY, "ct_window": (-1000, 1000)})
    msg = str(ei.value)
    assert "denoiser.base_channels: checkpoint 4 vs requested 8" in msg
    assert "denoiser.depth: checkpoint 2 vs requested 3" in msg
    assert "normalization.ct_window" in msg and "\n" not in msg
    check_compatible(ck, configs={"denoiser": ck["models"]["denoiser"]["config"]}, normalization=DEFAULT_POLICY)


def test_resume_with_other_architecture_refused(tmp_path, capsys):
    """An interrupted run's checkpoint (base 4) resumed with --base-channels 8: refused, untouched."""
    cfg = TrainConfig(base_channels=4, depth=2)
    torch.manual_seed(0)
    f = UNet(**{k: v for k, v in cfg.model_config("restoration").items() if k != "arch"})
    opt = torch.optim.Adam(f.parameters())
    out = save_checkpoint(tmp_path / "run.pt", {"restoration": f}, normalization=DEFAULT_POLICY,
                          training={"completed": False},
                          resume={"stage": "restoration", "step": 2, "optimizer": opt.state_dict(), "scheduler": {}})
    before = tree_hash(out)
    (tmp_path / "data").mkdir()  # never read: the mismatch is found first
    rc = main(["train", "--data", str(tmp_path / "data"), "--out", str(out), "--base-channels", "8", "--depth", "2",
               "--resume", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "restoration.base_channels: checkpoint 4 vs requested 8" in lines[0], err
    assert tree_hash(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "run.pt"]


def test_average_models_script_soups_denoisers_and_refuses_mismatches(tmp_path):
    """scripts/average_models.py: the denoiser is the weight mean, f must be the same in all."""
    import subprocess
    import sys

    from FPDenoiseLib.checkpoint import model_from_checkpoint
    from FPDenoiseLib.models import ResUNet

    torch.manual_seed(0)
    f = UNet(base_channels=4, depth=2)
    with torch.no_grad():  # as in a run started from a shipped file: f holds float16 values
        for p in f.parameters():
            p.copy_(p.half().float())
    nets = [ResUNet(channels=(4, 8), blocks=1) for _ in range(2)]
    paths = []
    for i, d in enumerate(nets):
        paths.append(str(save_checkpoint(tmp_path / f"m{i}.pt", {"denoiser": d, "restoration": f},
                                         normalization=DEFAULT_POLICY)))
    script = Path(__file__).resolve().parents[1] / "scripts" / "average_models.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True)  # noqa: E731
    res = run(str(tmp_path / "soup.pt"), *paths)
    assert res.returncode == 0, res.stderr
    soup = load_checkpoint(tmp_path / "soup.pt")
    w = model_from_checkpoint(soup, "denoiser").head.weight
    assert torch.allclose(w, (nets[0].head.weight + nets[1].head.weight) / 2, atol=1e-7)
    assert [s["path"] for s in soup["training"]["soup_of"]] == paths
    # weighted: base + a quarter of the specialist's change; weights are normalised
    res = run(str(tmp_path / "w.pt"), *paths, "--weights", "3", "1")
    assert res.returncode == 0, res.stderr
    ww = model_from_checkpoint(load_checkpoint(tmp_path / "w.pt"), "denoiser").head.weight
    assert torch.allclose(ww, 0.75 * nets[0].head.weight + 0.25 * nets[1].head.weight, atol=1e-7)
    res = run(str(tmp_path / "bad.pt"), *paths, "--weights", "1")
    assert res.returncode != 0 and "one weight >= 0 per checkpoint" in res.stderr
    assert not (tmp_path / "bad.pt").exists()
    # a shipped-style copy (float16, f in the shared file) soups with a float32 run of the same f
    # (scripts/gpu_chain.sh averages its MSE continuation with the shipped twin)
    (tmp_path / "ship").mkdir()
    export = Path(__file__).resolve().parents[1] / "scripts" / "export_model.py"
    res = subprocess.run([sys.executable, str(export), paths[1], str(tmp_path / "ship" / "m1.pt"), "--shipped"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = run(str(tmp_path / "mixed.pt"), paths[0], str(tmp_path / "ship" / "m1.pt"))
    assert res.returncode == 0, res.stderr
    mixed = load_checkpoint(tmp_path / "mixed.pt")
    wm = model_from_checkpoint(mixed, "denoiser").head.weight
    assert torch.allclose(wm, (nets[0].head.weight + nets[1].head.weight.half().float()) / 2, atol=1e-7)
    # another f: the FP feature would not be one feature any more
    save_checkpoint(tmp_path / "other_f.pt", {"denoiser": nets[0], "restoration": UNet(base_channels=4, depth=2)},
                    normalization=DEFAULT_POLICY)
    res = run(str(tmp_path / "bad.pt"), paths[0], str(tmp_path / "other_f.pt"))
    assert res.returncode != 0 and "restoration net differs" in res.stderr and not (tmp_path / "bad.pt").exists()
    # another architecture
    save_checkpoint(tmp_path / "wide.pt", {"denoiser": ResUNet(channels=(6, 8), blocks=1), "restoration": f},
                    normalization=DEFAULT_POLICY)
    res = run(str(tmp_path / "bad.pt"), paths[0], str(tmp_path / "wide.pt"))
    assert res.returncode != 0 and "differ in architecture" in res.stderr


def test_average_models_ignores_settings_that_own_no_weights():
    """A shipped file (gate 200, map fit) soups with a fine-tune of it (gate 150): the first's settings win."""
    from FPDenoiseLib.checkpoint import average_models, make_checkpoint
    from FPDenoiseLib.models import ResUNet

    torch.manual_seed(0)
    a = ResUNet(channels=(4, 8), blocks=1, residual_gate=200.0, map_fit=True)
    b = ResUNet(channels=(4, 8), blocks=1, residual_gate=150.0)
    cks = [make_checkpoint({"denoiser": m}, normalization={}) for m in (a, b)]
    soup = average_models(cks)
    assert soup.config == a.config and soup.config["map_fit"] and soup.config["residual_gate"] == 200.0
    assert torch.allclose(soup.head.weight, (a.head.weight + b.head.weight) / 2)
    assert "map_fit" not in average_models(cks[::-1]).config


def test_export_sets_weightless_settings_and_halves_the_file(tmp_path):
    """scripts/export_model.py: float16 copy, verified hash, --map-fit / --residual-gate on a resunet;
    refused (exit 2, nothing written) on another architecture."""
    import subprocess
    import sys

    from FPDenoiseLib.models import ResUNet

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "src.pt", {"denoiser": ResUNet(channels=(4, 8, 8, 8), blocks=1, residual_gate=150),
                                                "restoration": UNet(base_channels=4, depth=2)},
                          normalization=DEFAULT_POLICY, training={"name": "t"})
    run = lambda *a: subprocess.run([sys.executable, str(root / "scripts/export_model.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=root)
    r = run(src, tmp_path / "out.pt", "--map-fit", "--residual-gate", "200")
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "out.pt")  # verifies the recomputed hash
    cfg = ck["models"]["denoiser"]["config"]
    assert cfg["map_fit"] is True and cfg["residual_gate"] == 200.0
    assert ck["training"]["exported_from"]["sha256"] == load_checkpoint(src)["sha256"]
    assert all(v.dtype == torch.float16 for v in ck["models"]["denoiser"]["state_dict"].values() if v.is_floating_point())
    # --shipped is the same pair of settings, from one place
    r = run(src, tmp_path / "shipped.pt", "--shipped")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "shipped.pt")["models"]["denoiser"]["config"] == cfg
    unet = _good(tmp_path / "unet.pt")
    r = run(unet, tmp_path / "bad.pt", "--shipped")
    assert r.returncode == 2 and "resunet" in r.stderr and not (tmp_path / "bad.pt").exists()
    r = run(unet, tmp_path / "bad.pt", "--residual-gate", "200")
    assert r.returncode == 2 and "resunet" in r.stderr and not (tmp_path / "bad.pt").exists()
    # a checkpoint without a denoiser (stage restoration) still exports; the settings are refused on it
    f_only = save_checkpoint(tmp_path / "f.pt", {"restoration": UNet(base_channels=4, depth=2)}, normalization=DEFAULT_POLICY)
    r = run(f_only, tmp_path / "f16.pt")
    assert r.returncode == 0, r.stderr
    assert set(load_checkpoint(tmp_path / "f16.pt")["models"]) == {"restoration"}
    r = run(f_only, tmp_path / "bad.pt", "--map-fit")
    assert r.returncode == 2 and "resunet" in r.stderr and not (tmp_path / "bad.pt").exists()


def test_shipped_models_share_one_restoration_file(tmp_path):
    """export --shipped stores f once (fpdenoise_restoration.pt) and each model refers to it by hash: loading
    splices it back (saliency works), a missing or different f file is a clear error, and an export with
    another f refuses to overwrite the shared one."""
    import subprocess
    import sys

    from FPDenoiseLib.checkpoint import content_hash, make_checkpoint, model_from_checkpoint
    from FPDenoiseLib.models import ResUNet

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    f = UNet(base_channels=4, depth=2)
    srcs = [save_checkpoint(tmp_path / f"src{i}.pt", {"denoiser": ResUNet(channels=(4, 8, 8, 8), blocks=1),
                                                     "restoration": f}, normalization=DEFAULT_POLICY)
            for i in range(2)]
    out = tmp_path / "models"
    out.mkdir()
    run = lambda *a: subprocess.run([sys.executable, str(root / "scripts/export_model.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=root)
    for i, s in enumerate(srcs):
        r = run(s, out / f"m{i}.pt", "--shipped")
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fpdenoise_restoration.pt", "m0.pt", "m1.pt"]
    raw = torch.load(out / "m0.pt", weights_only=True)
    assert set(raw["models"]) == {"denoiser"} and raw["restoration_ref"]["file"] == "fpdenoise_restoration.pt"
    shared = load_checkpoint(out / "fpdenoise_restoration.pt")
    assert set(shared["models"]) == {"restoration"}
    for i in range(2):
        ck = load_checkpoint(out / f"m{i}.pt")
        assert ck["restoration_ref"]["sha256"] == shared["sha256"]
        got = model_from_checkpoint(ck, "restoration").state_dict()
        assert all(torch.equal(got[k], v.half().float()) for k, v in f.state_dict().items())
    den = Denoiser(out / "m1.pt", device="cpu")
    sal = den.saliency_array(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), modality="MR")
    assert sal.shape == (32, 32) and np.isfinite(sal).all() and sal.max() > 0
    # another f: refused, the shared file and the models referring to it untouched, nothing written
    before = (out / "fpdenoise_restoration.pt").read_bytes()
    other = save_checkpoint(tmp_path / "other.pt", {"denoiser": ResUNet(channels=(4, 8, 8, 8), blocks=1),
                                                    "restoration": UNet(base_channels=4, depth=2)},
                            normalization=DEFAULT_POLICY)
    r = run(other, out / "m2.pt", "--shipped")
    assert r.returncode != 0 and "another restoration net" in r.stderr and not (out / "m2.pt").exists()
    assert (out / "fpdenoise_restoration.pt").read_bytes() == before
    # the f file swapped for a different one, or gone: clear errors naming it
    (out / "fpdenoise_restoration.pt").rename(tmp_path / "kept.pt")
    with pytest.raises(CheckpointError, match="fpdenoise_restoration.pt, which is not next to it"):
        load_checkpoint(out / "m0.pt")
    save_checkpoint(out / "fpdenoise_restoration.pt", {"restoration": UNet(base_channels=4, depth=2)},
                    normalization=DEFAULT_POLICY)
    with pytest.raises(CheckpointError, match="not the restoration net it was made with"):
        load_checkpoint(out / "m0.pt")
    # a reference may only name a file in the same folder
    for bad in ("../kept.pt", "sub/f.pt", "", ".."):
        with pytest.raises(CheckpointError, match="file name in the same folder"):
            make_checkpoint({"denoiser": ResUNet(channels=(4, 8), blocks=1)}, normalization={},
                            restoration_ref={"file": bad, "sha256": "0" * 64})
    crafted = make_checkpoint({"denoiser": ResUNet(channels=(4, 8), blocks=1)}, normalization={},
                              restoration_ref={"file": "kept.pt", "sha256": shared["sha256"]})
    crafted["restoration_ref"]["file"] = "../kept.pt"
    crafted["sha256"] = content_hash(crafted)
    torch.save(crafted, out / "crafted.pt")
    with pytest.raises(CheckpointError, match="file name in the same folder"):
        load_checkpoint(out / "crafted.pt")


def test_shipped_models_resolve_by_name_and_all_exist():
    from FPDenoiseLib.inference import SHIPPED_MODELS, default_model_path, resolve_model

    assert resolve_model(None) == resolve_model("") == resolve_model(" ") == default_model_path()
    assert resolve_model("default") == default_model_path()
    assert resolve_model("some/dir/m.pt") == Path("some/dir/m.pt")
    for name, file in SHIPPED_MODELS.items():
        path = resolve_model(name)
        assert path.name == file and path.is_file(), path
        assert Denoiser(name, device="cpu").name == name  # what outputs and summaries call it
        ck = load_checkpoint(path)  # with the shared restoration net spliced in
        assert set(ck["models"]) == {"denoiser", "restoration"}
        assert ck["restoration_ref"]["file"] == "fpdenoise_restoration.pt"
    with pytest.raises(CheckpointError, match="not found"):
        Denoiser("no_such_model", device="cpu")


def test_average_models_grows_a_net_without_attention_to_soup_with_one_that_has_it():
    """The shipped twin (no attention) soups with its --attention fine-tune: as the same net with zero layers."""
    from FPDenoiseLib.checkpoint import average_models, make_checkpoint
    from FPDenoiseLib.models import ResUNet

    torch.manual_seed(0)
    plain = ResUNet(channels=(24, 48), blocks=1, residual_gate=200.0)
    att = ResUNet(channels=(24, 48), blocks=1, attention=[0, 1])
    for p in att.parameters():
        p.data.normal_(0, 0.1)
    soup = average_models([make_checkpoint({"denoiser": m}, normalization={}) for m in (plain, att)], weights=[3, 1])
    assert soup.config["attention"] == [0, 1] and soup.config["residual_gate"] == 200.0  # the first's settings
    s, a = soup.state_dict(), att.state_dict()
    assert torch.allclose(s["head.weight"], 0.75 * plain.head.weight + 0.25 * a["head.weight"])
    assert torch.allclose(s["body.1.proj.weight"], 0.25 * a["body.1.proj.weight"])  # zero in the grown plain net
    # the grown net takes the attention net's q, k, v (any give its function): the soup keeps them
    assert torch.equal(s["encoders.0.1.qkv.weight"], a["encoders.0.1.qkv.weight"])
    x = torch.rand(1, 1, 32, 32)
    half = average_models([make_checkpoint({"denoiser": m}, normalization={}) for m in (plain, plain)])
    with torch.no_grad():  # a plain net soups with itself as before
        assert torch.allclose(half.eval()(x), plain.eval()(x), atol=1e-6)
    # a net with attention at some of the levels is grown at the others (its own layers kept)
    other = ResUNet(channels=(24, 48), blocks=1, attention=[1])
    for p in other.parameters():
        p.data.normal_(0, 0.1)
    mix = average_models([make_checkpoint({"denoiser": m}, normalization={}) for m in (other, att)]).state_dict()
    o = other.state_dict()
    assert torch.allclose(mix["body.1.qkv.weight"], 0.5 * (o["body.1.qkv.weight"] + a["body.1.qkv.weight"]))
    assert torch.equal(mix["encoders.0.1.qkv.weight"], a["encoders.0.1.qkv.weight"])  # the layer other lacked
    top = ResUNet(channels=(24, 48), blocks=1, attention=[0])
    with pytest.raises(CheckpointError, match="differ in architecture"):  # neither holds the other's levels
        average_models([make_checkpoint({"denoiser": m}, normalization={}) for m in (top, other)])
