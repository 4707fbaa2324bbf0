"""Background-process plumbing for the FPDenoise module, free of Qt so it is testable headless.

Long work (training, whole-volume denoising on CPU) runs in a separate ``PythonSlicer`` process so
the Slicer GUI never freezes. :class:`BackgroundJob` reads the process output on a daemon thread into
a queue; the widget polls :meth:`BackgroundJob.poll` from a ``qt.QTimer`` (the only Qt part) and
turns parsed progress into a progress bar. :func:`kill_process_tree` ends the process *and* its
children (PyTorch data-loader workers...) on Cancel.

Progress protocol: the library CLI (``--progress-lines``, used for both the background denoise and
training) prints ``PROGRESS <done> <total> <message>``; plain tqdm bars (``45%|####  | 45/100 [00:01<00:02]``) are
understood too, so a command without ``--progress-lines`` still moves the bar.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_PROGRESS_RE = re.compile(r"^\s*PROGRESS\s+(\d+)\s+(\d+)(?:\s+(.*))?$")
# tqdm: optional description, "NN%|bar| done/total [elapsed<remaining, rate]"
_TQDM_RE = re.compile(r"^\s*(?:(?P<desc>.*?):\s*)?\d+%\|.*?\|\s*(?P<done>\d+)/(?P<total>\d+)\b")


@dataclass(frozen=True)
class ProgressLine:
    """One parsed progress report: ``done`` of ``total`` steps, with a short message."""

    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """Completed fraction in [0, 1] (0 when the total is unknown)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0


def parse_progress_line(line: str) -> ProgressLine | None:
    """Parse one output line into a :class:`ProgressLine`, or ``None`` if it is not a progress line.

    Accepts ``PROGRESS <done> <total> [message]`` and tqdm bars; a line holding several
    carriage-return separated tqdm updates yields the last one.

    >>> parse_progress_line("PROGRESS 3 10 stage 2: step 3")
    ProgressLine(done=3, total=10, message='stage 2: step 3')
    >>> parse_progress_line("train:  45%|####5     | 45/100 [00:01<00:02, 30.0it/s]").done
    45
    >>> parse_progress_line("loading checkpoint") is None
    True
    """
    for part in reversed(line.replace("\r\n", "\n").replace("\r", "\n").split("\n")):
        part = part.strip()
        if not part:
            continue
        m = _PROGRESS_RE.match(part)
        if m:
            return ProgressLine(int(m.group(1)), int(m.group(2)), (m.group(3) or "").strip())
        m = _TQDM_RE.match(part)
        if m:
            return ProgressLine(int(m.group("done")), int(m.group("total")), (m.group("desc") or "").strip())
    return None


def _descendants_posix(pid: int) -> list[int]:
    """Child pids of ``pid`` (recursive) from ``ps``; works on Linux and macOS without psutil."""
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for row in out.splitlines():
        fields = row.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_process_tree(pid: int, *, timeout: float = 5.0) -> None:
    """Terminate process ``pid`` and all its descendants (SIGTERM, then SIGKILL after ``timeout`` s).

    Uses psutil when installed, ``taskkill /T`` on Windows, else a ``ps`` walk + signals. Never
    signals a process group: a process started by Slicer shares Slicer's group.
    """
    try:
        import psutil  # optional: most robust, but not bundled with every Slicer
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        procs = parent.children(recursive=True) + [parent]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    pids = _descendants_posix(pid) + [pid]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (dead, not yet reaped) counts as dead; we never reap here, so
    ``Popen.wait`` still gets the real exit status of our own child."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as fh:  # Linux; elsewhere zombies wait for the SIGKILL pass
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except OSError:
        return True


class BackgroundJob:
    """A running background process whose output is read on a thread into a queue.

    ``launcher`` starts the process from an argument list and returns a ``subprocess.Popen`` with
    text ``stdout`` (stderr merged), e.g. ``slicer.util.launchConsoleProcess`` inside Slicer; the
    default is an equivalent ``subprocess.Popen``. Call :meth:`poll` regularly (a ``qt.QTimer`` in
    the widget): it returns the lines read since the last call, the latest :class:`ProgressLine`, and the
    exit code once the process has ended and all output was read.

    >>> job = BackgroundJob([sys.executable, "-c", "print('PROGRESS 1 2 half')"])
    >>> job.wait(timeout=60)
    0
    >>> job.progress.message
    'half'
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        launcher: Callable[..., subprocess.Popen] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.lines: list[str] = []  # all output lines, for the error message / log
        self.progress: ProgressLine | None = None
        self.cancelled = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._finished_reading = False
        if launcher is None:
            self.proc = subprocess.Popen(
                self.args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **env} if env else None,
                cwd=cwd,
                errors="replace",
            )
        else:
            self.proc = launcher(self.args, updateEnvironment=env, cwd=cwd)
        self._thread = threading.Thread(target=self._read, name="FPDenoise-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self.proc.stdout
        try:
            for line in iter(stream.readline, ""):
                self._queue.put(line.rstrip("\n"))
        except (ValueError, OSError):  # stream closed by cancel
            pass
        finally:
            self._queue.put(None)

    def poll(self) -> tuple[list[str], ProgressLine | None, int | None]:
        """Drain the queue without blocking: ``(new_lines, latest_progress, returncode_or_None)``."""
        new: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._finished_reading = True
                break
            new.append(item)
            p = parse_progress_line(item)
            if p is not None:
                self.progress = p
        self.lines.extend(new)
        code = self.proc.poll() if self._finished_reading else None
        return new, self.progress, code

    @property
    def running(self) -> bool:
        return self.proc.poll() is None or not self._finished_reading

    def cancel(self) -> None:
        """Kill the process and all its children (used by the Cancel button)."""
        self.cancelled = True
        if self.proc.poll() is None:
            kill_process_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends and its output is read; returns the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            _, _, code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[0]} still running after {timeout} s")
            time.sleep(0.02)

    def error_summary(self, max_lines: int = 5) -> str:
        """The last non-progress output lines: usually the one-line error of the CLI."""
        text = [ln for ln in self.lines if ln.strip() and parse_progress_line(ln) is None]
        return "\n".join(text[-max_lines:])


def python_executable() -> str:
    """The Python to run background work with: ``PythonSlicer`` inside Slicer, else this Python."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable
