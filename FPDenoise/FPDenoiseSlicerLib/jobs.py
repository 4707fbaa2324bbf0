"""Lifecycle of the module's background jobs (denoise, train), safe across scene close. No Qt.

A job must never outlive the patient it was started for. Two guards, both here so the headless tests
drive exactly what the widget does:

* **Scene close cancels.** While a job runs, :class:`JobManager` observes the scene's
  ``StartCloseEvent`` (File > Close Scene, loading another scene, ``scene.Clear(0)``), kills the
  process tree and deletes the job's temporary folder, which holds the exported patient volume.
  The widget's ``cleanup`` calls :meth:`JobManager.cancelAll` for the same reason.
* **A result knows its source.** At launch the input volume gets a unique attribute
  (:data:`IDENTITY_ATTRIBUTE`); a denoise result is added only if the node with the launch-time ID
  still carries that attribute value. Slicer reuses node IDs after a close ("vtkMRMLScalarVolumeNode1"
  is patient B's volume now), so the ID alone is not an identity.

Example (real scene, real process)::

    jobs = JobManager(FPDenoiseMRMLLogic())
    job = jobs.startDenoise(volumeNode, device="cpu")
    while (outcome := jobs.poll(job)) is None:
        time.sleep(0.2)
    outcome.status  # "done" (outcome.result = the denoise dict) / "cancelled" / "failed" / "discarded"
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer

from .process import BackgroundJob, ProgressLine

log = logging.getLogger("FPDenoise")

IDENTITY_ATTRIBUTE = "FPDenoise.VolumeIdentity"


@dataclass
class ModuleJob:
    """One background job of the module: the process, its temp folder and what it was started for."""

    kind: str  # "denoise" or "train"
    process: BackgroundJob
    workDir: Path
    sourceID: str | None = None  # denoise: input volume node ID at launch
    sourceIdentity: str | None = None  # denoise: value of IDENTITY_ATTRIBUTE at launch
    sourceName: str = ""
    target: str | None = None  # train: the checkpoint being written
    cancelReason: str = ""
    lines: list = field(default_factory=list)  # every output line so far (the panel's log)
    resultNodeIDs: dict = field(default_factory=dict)  # denoise: nodes to overwrite, by ID

    @property
    def running(self) -> bool:
        return self.process.running


@dataclass
class JobOutcome:
    """How a job ended. ``status``: "done", "cancelled", "failed" or "discarded" (source volume gone)."""

    kind: str
    status: str
    message: str
    result: Any = None  # denoise: the dict of :meth:`FPDenoiseMRMLLogic.denoise`; train: checkpoint path


def volumeIdentity(volumeNode) -> str:
    """The volume's unique identity attribute, set on first use (kept for later jobs on the same volume)."""
    value = volumeNode.GetAttribute(IDENTITY_ATTRIBUTE)
    if not value:
        value = uuid.uuid4().hex
        volumeNode.SetAttribute(IDENTITY_ATTRIBUTE, value)
    return value


class JobManager:
    """Starts, polls, cancels and finishes the module's background jobs (see the module docstring)."""

    def __init__(self, logic, launcher: Callable | None = None) -> None:
        self.logic = logic
        self.launcher = launcher  # slicer.util.launchConsoleProcess inside Slicer; None = subprocess.Popen
        self.jobs: list[ModuleJob] = []
        self._observed: list[tuple[Any, int]] = []  # (scene, observer tag)

    # ------------------------------------------------------------------ start
    def startDenoise(self, inputVolumeNode, resultNodes: dict | None = None, **kwargs) -> ModuleJob:
        """Export ``inputVolumeNode`` to a temp folder and start the denoise CLI on it.

        ``resultNodes`` (``outputVolumeNode=``, ``inputSaliencyNode=``, ``outputSaliencyNode=``,
        ``featureChangeNode=``): the nodes the result should overwrite (the panel's selection, so each Apply
        reuses them); kept by ID and looked up again when the job ends (a node deleted meanwhile is
        replaced by a new one, see :meth:`FPDenoiseMRMLLogic.reusableResultNode`).
        """
        identity = volumeIdentity(inputVolumeNode)
        work = Path(tempfile.mkdtemp(prefix="FPDenoise-"))
        try:
            cmd, work = self.logic.prepareBackgroundDenoise(inputVolumeNode, work, **kwargs)
            proc = self._launch(cmd)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # the exported patient volume must not stay behind
            raise
        job = ModuleJob("denoise", proc, work, inputVolumeNode.GetID(), identity, inputVolumeNode.GetName())
        job.resultNodeIDs = {key: node.GetID() for key, node in (resultNodes or {}).items() if node is not None}
        return self._track(job)

    def startTraining(self, volumeNodes: Sequence, outputPath: str, **kwargs) -> ModuleJob:
        """Export the clean ``volumeNodes`` and start training into ``outputPath``."""
        work = Path(tempfile.mkdtemp(prefix="FPDenoise-train-"))
        try:
            self.logic.exportVolumesForTraining(volumeNodes, work / "data")
            cmd = self.logic.trainingCommand(work / "data", outputPath, **kwargs)
            proc = self._launch(cmd)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return self._track(ModuleJob("train", proc, work, target=str(outputPath)))

    def _launch(self, cmd: list) -> BackgroundJob:
        log.info("FPDenoise: running %s", " ".join(str(c) for c in cmd))
        return BackgroundJob(cmd, launcher=self.launcher, env=self.logic.backgroundEnvironment())

    def _track(self, job: ModuleJob) -> ModuleJob:
        self.jobs.append(job)
        scene = slicer.mrmlScene
        if scene is not None and not any(s is scene for s, _ in self._observed):
            tag = scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._onSceneStartClose)
            self._observed.append((scene, tag))
        return job

    # ------------------------------------------------------------------ poll / finish
    def poll(self, job: ModuleJob, newLines: list | None = None, **nodes) -> JobOutcome | None:
        """Read the job's new output; ``None`` while it runs, else its :class:`JobOutcome` (finished).

        New output lines are appended to ``newLines`` when given (the widget's log box). ``nodes``
        (``outputVolumeNode=`` ...) are passed on to :meth:`finish`.
        """
        lines, _, code = job.process.poll()
        job.lines.extend(lines)
        if newLines is not None:
            newLines.extend(lines)
        if code is None and not job.process.cancelled:
            return None
        return self.finish(job, **nodes)

    def progress(self, job: ModuleJob) -> ProgressLine | None:
        return job.process.progress

    def finish(self, job: ModuleJob, **nodes) -> JobOutcome:
        """Turn an ended job into its outcome, then delete its temp folder (always)."""
        try:
            return self._outcome(job, **nodes)
        finally:
            self._forget(job)

    def _outcome(self, job: ModuleJob, **nodes) -> JobOutcome:
        name = "Denoising" if job.kind == "denoise" else "Training"
        if job.process.cancelled:
            why = f": {job.cancelReason}" if job.cancelReason else ""
            return JobOutcome(job.kind, "cancelled", f"{name} cancelled{why}.")
        code = job.process.proc.poll()
        if code != 0:
            return JobOutcome(job.kind, "failed", f"{name} failed (exit code {code}):\n{job.process.error_summary(0)}")
        if job.kind == "train":
            return JobOutcome(job.kind, "done", f"Training finished: {job.target} is now the selected model.", job.target)
        source = self.sourceVolume(job)
        if source is None:
            return JobOutcome(
                job.kind,
                "discarded",
                f"Denoising result discarded: its input volume {job.sourceName!r} is no longer in the scene.",
            )
        scene = slicer.mrmlScene
        reuse = {key: scene.GetNodeByID(nodeID) for key, nodeID in job.resultNodeIDs.items()}
        result = self.logic.loadBackgroundDenoiseResults(source, job.workDir, **{**reuse, **nodes})
        return JobOutcome(job.kind, "done", "Denoising finished.", result)

    @staticmethod
    def sourceVolume(job: ModuleJob):
        """The volume node the job was started for, or None when it is gone (removed, scene closed,
        or its ID now names another volume)."""
        scene = slicer.mrmlScene
        node = scene.GetNodeByID(job.sourceID) if scene is not None and job.sourceID else None
        if node is None or node.GetAttribute(IDENTITY_ATTRIBUTE) != job.sourceIdentity:
            return None
        return node

    # ------------------------------------------------------------------ cancel
    def cancel(self, job: ModuleJob, reason: str = "") -> None:
        """Kill the job's process tree and delete its temp folder now; :meth:`poll` then reports it."""
        if not job.process.cancelled:
            job.cancelReason = reason
            job.process.cancel()
        shutil.rmtree(job.workDir, ignore_errors=True)

    def cancelAll(self, reason: str = "") -> list:
        """Cancel every job (scene close, module cleanup); returns the cancelled jobs."""
        jobs = list(self.jobs)
        for job in jobs:
            self.cancel(job, reason)
        return jobs

    def _onSceneStartClose(self, caller, event) -> None:
        for job in self.cancelAll("the scene was closed"):
            log.info("FPDenoise: %s job cancelled because the scene was closed", job.kind)

    def _forget(self, job: ModuleJob) -> None:
        shutil.rmtree(job.workDir, ignore_errors=True)
        if job in self.jobs:
            self.jobs.remove(job)
        if not self.jobs:  # nothing left to protect: stop observing
            for scene, tag in self._observed:
                scene.RemoveObserver(tag)
            self._observed.clear()

    def close(self) -> None:
        """Cancel everything and stop observing (module cleanup)."""
        for job in self.cancelAll("the module was closed"):
            self._forget(job)
