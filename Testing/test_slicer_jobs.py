"""Issue 9 item 1: a background job never outlives its scene (real vtkMRMLScene, real processes).

The sequence a radiologist hits: start a denoise on patient A, File > Close Scene (``scene.Clear(0)``
fires the same StartCloseEvent/EndCloseEvent), load patient B, whose volume gets A's node ID again.
When the job ends, B's scene must be untouched and no temp file (the exported patient volume) left.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core not installed (pip install 'fpdenoise[test]')")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FPDenoise"))

from conftest import ct_phantom  # noqa: E402
from FPDenoiseSlicerLib.jobs import IDENTITY_ATTRIBUTE, JobManager  # noqa: E402
from FPDenoiseSlicerLib.logic import FPDenoiseMRMLLogic  # noqa: E402


@pytest.fixture()
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return slicer.mrmlScene


def _patient(name: str, seed: int):
    return slicer.util.addVolumeFromArray(ct_phantom(seed=seed), name=f"Patient {name} CT")


def _scene_state(scene) -> list:
    """Every node's (ID, name) and every volume's voxels: what "untouched" means."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    state = [(n.GetID(), n.GetName()) for n in nodes]
    vols = [slicer.util.arrayFromVolume(n).copy() for n in nodes if n.IsA("vtkMRMLScalarVolumeNode")]
    return state + vols


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(np.array_equal(a[i], b[i]) if isinstance(a[i], np.ndarray) else a[i] == b[i] for i in range(len(a)))


def _wait(jobs: JobManager, job, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while (outcome := jobs.poll(job)) is None:
        assert time.monotonic() < deadline, "job did not end"
        time.sleep(0.05)
    return outcome


def test_scene_close_cancels_job_and_patient_b_is_untouched(scene, checkpoint):
    jobs = JobManager(FPDenoiseMRMLLogic())
    a = _patient("A", 0)
    job = jobs.startDenoise(a, modelPath=checkpoint, device="cpu")
    assert (job.workDir / "input.nrrd").is_file()  # the exported patient volume
    assert job.running
    pid = job.process.proc.pid

    scene.Clear(0)  # File > Close Scene
    assert job.process.cancelled and job.process.proc.poll() is not None  # killed at close
    assert not job.workDir.exists()  # exported patient A deleted at close, not when polled

    b = _patient("B", 1)
    assert b.GetID() == job.sourceID  # Slicer reuses the ID: the ID alone is no identity
    before = _scene_state(scene)
    outcome = _wait(jobs, job)
    assert outcome.status == "cancelled" and "scene was closed" in outcome.message
    assert _same(_scene_state(scene), before)  # no node added, B's voxels unchanged
    assert not job.workDir.exists() and jobs.jobs == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone (reaped by cancel), not left running


def test_finished_result_for_a_gone_volume_is_discarded(scene, checkpoint):
    """Job ends while its volume was replaced without a close event (e.g. a script swapped the scene):
    the result is dropped with a message, never added to the other patient's volume."""
    logic = FPDenoiseMRMLLogic()
    jobs = JobManager(logic)
    a = _patient("A", 0)
    job = jobs.startDenoise(a, modelPath=checkpoint, device="cpu", computeSaliency=False)
    assert job.process.wait(timeout=240) == 0  # real worker finished; result files are in workDir
    slicer.mrmlScene = other = slicer.vtkMRMLScene()  # patient B in a new scene, same node ID
    b = _patient("B", 1)
    assert b.GetID() == job.sourceID and b.GetAttribute(IDENTITY_ATTRIBUTE) is None
    before = _scene_state(other)
    outcome = _wait(jobs, job)
    assert outcome.status == "discarded" and "Patient A CT" in outcome.message, outcome.message
    assert _same(_scene_state(other), before)
    assert not job.workDir.exists()


def test_result_is_added_when_its_volume_is_still_there(scene, checkpoint):
    jobs = JobManager(FPDenoiseMRMLLogic())
    a = _patient("A", 0)
    job = jobs.startDenoise(a, modelPath=checkpoint, device="cpu", computeSaliency=False)
    outcome = _wait(jobs, job)
    assert outcome.status == "done", outcome.message
    out = outcome.result["outputVolumeNode"]
    assert out.GetName() == "Patient A CT denoised"
    assert slicer.util.arrayFromVolume(out).shape == slicer.util.arrayFromVolume(a).shape
    assert not job.workDir.exists() and jobs.jobs == []


def test_failed_job_reports_the_whole_message_and_cleans_up(scene, tmp_path):
    jobs = JobManager(FPDenoiseMRMLLogic())
    a = _patient("A", 0)
    bad = tmp_path / "not-a-model.pt"
    bad.write_text("garbage")
    job = jobs.startDenoise(a, modelPath=bad, device="cpu")
    outcome = _wait(jobs, job)
    assert outcome.status == "failed" and str(bad) in outcome.message, outcome.message
    assert not job.workDir.exists()


def test_training_cancelled_on_close_removes_exported_volumes(scene, checkpoint, tmp_path):
    jobs = JobManager(FPDenoiseMRMLLogic())
    a = _patient("A", 0)
    job = jobs.startTraining([a], str(tmp_path / "ft.pt"), stage="denoiser", steps=100000, device="cpu",
                             initModelPath=checkpoint)
    assert any((job.workDir / "data").iterdir())
    scene.Clear(0)
    assert job.process.cancelled and not job.workDir.exists()
    assert _wait(jobs, job).status == "cancelled"
    assert not (tmp_path / "ft.pt").exists()


def test_close_cancels_everything(scene, checkpoint):
    """Module cleanup (Slicer exit / module reload) kills jobs too and stops observing the scene."""
    jobs = JobManager(FPDenoiseMRMLLogic())
    job = jobs.startDenoise(_patient("A", 0), modelPath=checkpoint, device="cpu")
    jobs.close()
    assert job.process.cancelled and not job.workDir.exists() and jobs.jobs == []
    assert jobs._observed == []


def test_each_background_apply_reuses_the_result_nodes(scene, checkpoint):
    """Apply twice in the background with the panel's selection: the second result overwrites the first
    (same node IDs, no new nodes), under the input's study in the subject hierarchy."""
    jobs = JobManager(FPDenoiseMRMLLogic())
    a = _patient("A", 0)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient A"), "Study")
    sh.CreateItem(study, a)
    first = _wait(jobs, jobs.startDenoise(a, modelPath=checkpoint, device="cpu"))
    assert first.status == "done", first.message
    nodes = {k: v for k, v in first.result.items() if k.endswith("Node")}
    count = scene.GetNumberOfNodes()
    second = _wait(jobs, jobs.startDenoise(a, resultNodes=nodes, modelPath=checkpoint, device="cpu", strength=0.5))
    assert second.status == "done", second.message
    assert {k: second.result[k].GetID() for k in nodes} == {k: n.GetID() for k, n in nodes.items()}
    assert scene.GetNumberOfNodes() == count
    assert second.result["outputVolumeNode"].GetAttribute("FPDenoise.Strength") == "0.5"
    assert all(sh.GetItemParent(sh.GetItemByDataNode(n)) == study for n in second.result.values() if hasattr(n, "GetID"))
