"""A training job's hold on its run directory, its ranks' tie to the launcher, and the one-time op build.

* **Run-directory lock.** Rank 0 holds an exclusive ``flock`` on ``RUN/.lock`` for the run's life and
  writes its host, pid and start time into it. A second job on the same directory is refused in one
  line that names the holder. The kernel drops the lock when the holder dies (SIGKILL, OOM, node
  reboot), so a dead job never keeps it. Limits: ``flock`` is exclusive across nodes only where the
  file system propagates it (Lustre mounted with ``flock``, NFSv4, GPFS; NFSv3 without ``lockd`` or
  Lustre with ``localflock`` make it node-local).
* **Ranks die with their launcher.** A rank started by a launcher asks the kernel for SIGKILL when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread kills it when any ancestor up to the
  process named by ``MST_DS_LAUNCHER_PID`` (set by launch.sh) is gone: the DeepSpeed runner and its
  per-node ``launch.py`` are separate processes, and a SIGKILL of the runner or launch.sh leaves
  ``launch.py`` — the ranks' parent — alive.
* **A study's launches die with the study.** ``mst-ds study`` starts each launch.sh through
  :func:`tied_command` (``python -m mst_ds.job tied``: parent-death signal, then exec), so a ``kill -9``
  of the study kills launch.sh, whose ranks then stop through the watchdog above.
* **Preemption.** SIGTERM (SLURM's preemption, ``scancel``, the time limit) and SIGUSR1 (the templates'
  ``--signal``) only set a flag (:class:`StopSignals`); the training loop votes on it at every step in
  the all-reduce it already does, so every rank finishes the same step, saves it and exits
  :data:`EXIT_STOPPED`. A second SIGTERM exits at once (the kernel's default action); ``latest`` is only
  ever replaced atomically, so it still names a complete checkpoint.
* **DeepSpeed's CPU comm op** is JIT-built on first use; :func:`build_comm_op` builds it once under a
  lock before any rank starts (launch.sh's check step), into :func:`use_extensions_dir`'s directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from mst_ds.config import ConfigError, RunFailure, error_exit
from mst_ds.run_dir import LOCK as LOCK_NAME  # noqa: F401 (tests and callers name it)
from mst_ds.run_dir import RunDir

# Exit code of a run stopped by SIGTERM/SIGUSR1 with a checkpoint of its last step (sysexits'
# EX_TEMPFAIL: try again); the sbatch templates and launch.sh requeue on it.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A copy of the same request arriving this soon after the first is not a second request: DeepSpeed's
# launch.py re-sends to its ranks the SIGTERM its process group has just received.
DUPLICATE_S = 2.0
LAUNCHER_ENV = "MST_DS_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


class RunDirLocked(ConfigError):
    """Another live job holds the run directory."""


class FileLock:
    """An exclusive flock on ``path``, holding the holder's host, pid and start time; released on
    :meth:`release` or when the process dies. A held lock raises ``error(refusal)`` with ``{holder}``
    replaced by what the holder wrote.

    The file is opened without following a link (``O_NOFOLLOW``) and only as a regular file with one
    link, and is never truncated: the holder line is written padded to :data:`HOLDER_BYTES`, so a link or
    a hard link planted at the lock's name cannot make this code shorten or rewrite someone's file.
    ``remove=True`` (the eval lock) unlinks the file on release; a second process that opened the old
    file before the unlink sees, after its flock, that the name no longer points to it, and is refused."""

    HOLDER_BYTES = 256

    def __init__(self, path: Path, refusal: str, error: type[Exception], *, remove: bool = False):
        self.path, self.refusal, self.error, self.remove = Path(path), refusal, error, remove
        self.fd: int | None = None

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:  # ELOOP: a link at the lock's name; EISDIR, EACCES, ...
            why = "a symbolic link" if err.errno == errno.ELOOP else (err.strerror or str(err))
            raise self.error(f"{self.path}: cannot be used as a lock file ({why}); remove it") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link to another file"
            raise self.error(f"{self.path}: cannot be used as a lock file ({what}); remove it")
        if st.st_size and not os.pread(fd, 5, 0) == b"host ":
            os.close(fd)
            raise self.error(f"{self.path}: cannot be used as a lock file (a file mst-ds did not write); remove it")
        return fd

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, self.HOLDER_BYTES, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise self.error(self.refusal.replace("{holder}", holder)) from None
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file after we opened it: it was held, as far as we know
            os.close(fd)
            raise self.error(self.refusal.replace("{holder}", "a holder that just finished; try again"))
        # Rewritten in place (the lock belongs to this inode, a rename would lose it), padded, never truncated.
        line = (f"host {socket.gethostname()} pid {os.getpid()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode()[: self.HOLDER_BYTES - 1]
        os.pwrite(fd, line.ljust(self.HOLDER_BYTES - 1) + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            if self.remove:  # unlinked while held; one who opened it before sees the name gone after its flock
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                        os.unlink(self.path)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class RunLock(FileLock):
    """The run directory's lock, ``RUN/.lock``, held by rank 0 for the run's life."""

    def __init__(self, run_dir: Path):
        super().__init__(RunDir(run_dir).lock, f"{run_dir}: in use by another job ({{holder}}); wait for it to "
                         "end or use another --run-dir", RunDirLocked)


class StopSignals:
    """SIGTERM / SIGUSR1 → a request to stop after the current step (the handler only records it).

    ``requested``: the first signal's name, or None. ``agreed``: set by the training loop once the
    ranks' vote says some rank was asked to stop (every rank sees the same vote, so all stop together).
    A later SIGTERM (after :data:`DUPLICATE_S`) restores the default action and re-raises: the process
    ends at once, as before this class existed."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.agreed = False
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGTERM and time.monotonic() - self._at > DUPLICATE_S:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def vote(self) -> float:
        """This rank's vote for the step's all-reduce: 1.0 if a stop signal arrived."""
        return 1.0 if self.requested else 0.0


def probe(run_dir: Path) -> None:
    """Raise RunDirLocked if a live job holds ``run_dir`` (takes and drops the lock at once)."""
    if RunDir(run_dir).lock.exists():
        RunLock(run_dir).acquire().release()


def stop_together(err: ConfigError | RunFailure, rank: int) -> NoReturn:
    """Every rank stops with ``err``'s exit code; only rank 0 says why, in one line.

    With several ranks, rank 0 prints before any rank exits: the launcher kills the remaining ranks
    at the first exit, which could otherwise swallow the line."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        raise err
    code = 1 if isinstance(err, RunFailure) else 2
    if rank == 0:
        error_exit(str(err), code)
        sys.stderr.flush()
    dist.barrier()
    raise SystemExit(code)


# --------------------------------------------------------------------------------------------------
# Ranks die with their launcher
# --------------------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time): tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def launcher_chain() -> list[int]:
    """Ancestors from the parent up to ``$MST_DS_LAUNCHER_PID`` (just the parent without it)."""
    top = int(os.environ.get(LAUNCHER_ENV, "0") or 0)
    chain, pid = [], os.getppid()
    while pid > 1 and len(chain) < 16:
        chain.append(pid)
        if pid == top or not top:
            break
        pid = _parent(pid)
    return chain if not top or top in chain else chain[:1]


def _kill_me_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent dies (Linux; kept across exec; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def tied_command(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies (SIGKILL) with this process: a study's launches are killed with it
    (``kill -9`` included), as ranks die with launch.sh. Through :func:`main`'s ``tied``, which sets the
    parent-death signal and then execs ``argv`` — no code runs in the child between fork and exec."""
    return [sys.executable, "-m", "mst_ds.job", "tied", str(os.getpid()), "--", *argv]


def die_with_launcher(stop: StopSignals | None = None, poll_s: float = 1.0) -> None:
    """SIGKILL this process when its launcher dies (Linux; a no-op elsewhere).

    Once a stop signal has arrived the watchdog lets the rank finish its step and save: the same signal
    may have ended a launcher above the parent (DeepSpeed's runner has no handler); the parent's own
    death still kills the rank (parent-death signal), and DeepSpeed's launch.py waits for its ranks."""
    if not sys.platform.startswith("linux"):
        return
    _kill_me_with_parent()
    top = int(os.environ.get(LAUNCHER_ENV, "0") or 0)
    chain = launcher_chain()
    if top and top not in chain and _start_time(top) is None:
        # launch.sh died while this rank was starting (before it could watch it): it is an orphan already.
        print(f"mst-ds: error: the launcher (pid {top}) is gone; stopping this rank (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    watched = {pid: _start_time(pid) for pid in chain}

    def watch() -> None:
        while True:
            for pid, started in watched.items():
                if stop is not None and stop.requested:
                    break
                if started is None or _start_time(pid) != started:
                    print(f"mst-ds: error: the launcher (pid {pid}) is gone; stopping this rank "
                          f"(pid {os.getpid()})", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(poll_s)

    if watched:
        threading.Thread(target=watch, name="mst-ds-launcher-watchdog", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# DeepSpeed's CPU comm op, built once
# --------------------------------------------------------------------------------------------------
EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def _writable_dir(path: Path, *, private: bool) -> bool:
    """Create ``path`` if needed → whether this user can build in it. A ``private`` one (under a shared
    /tmp) must be this user's own and closed to others: a planted module there would be loaded and run."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        st = path.stat()
    except OSError:
        return False
    if private and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        return False
    return os.access(path, os.W_OK | os.X_OK)


def use_extensions_dir(*, announce: bool = True, required: bool = True) -> Path | None:
    """Where torch JIT-builds extensions for this Python environment → that folder, exported as
    ``TORCH_EXTENSIONS_DIR`` for this process and its children.

    A user-set ``TORCH_EXTENSIONS_DIR`` always wins. Otherwise one folder per environment
    (``<cache>/torch_extensions/<hash of sys.prefix>``): with torch's shared default, each virtual
    environment rebuilds the op into the same entry and ranks wait on its lock (SPEC §11). A deterministic
    choice, so the ranks load from where the pre-flight built. Where the cache is not writable (read-only
    HOME) the per-user ``$TMPDIR/torch_extensions-UID`` is used, said in one line when ``announce``. Where
    neither is writable: RunFailure if ``required`` (the CPU comm op must be built), else None (torch's
    default is left alone: a GPU run may JIT-build nothing)."""
    if os.environ.get(EXTENSIONS_ENV):
        return Path(os.environ[EXTENSIONS_ENV])
    env_hash = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    path = cache / env_hash
    if not _writable_dir(path, private=False):
        fallback = Path(os.environ.get("TMPDIR") or "/tmp") / f"torch_extensions-{os.getuid()}"
        if not (_writable_dir(fallback, private=True) and _writable_dir(fallback / env_hash, private=True)):
            if not required:
                return None
            raise RunFailure(f"no writable place to build DeepSpeed's CPU comm op ({cache} nor {fallback}, "
                             f"which must be yours and closed to others): set {EXTENSIONS_ENV}")
        if announce:
            print(f"mst-ds: note: {cache} is not writable; building torch extensions in {fallback / env_hash} "
                  f"(set {EXTENSIONS_ENV} to choose)", file=sys.stderr, flush=True)
        path = fallback / env_hash
    os.environ[EXTENSIONS_ENV] = str(path)
    return path


def build_comm_op() -> None:
    """Build (or load from the cache) DeepSpeed's shared-memory comm op under an exclusive lock.

    Run once before the ranks start, so they only load the finished module and never compile the same
    extension side by side; the lock also serialises concurrent launches on one machine."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    root = use_extensions_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".mst_ds_build.lock", "a")
    except OSError as err:
        raise RunFailure(f"{EXTENSIONS_ENV}={root}: cannot build DeepSpeed's CPU comm op there "
                         f"({err.strerror or err})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder.load(verbose=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m mst_ds.job tied PARENT_PID -- COMMAND...`` (for :func:`tied_command`, not a user
    command): exec COMMAND with SIGKILL as its parent-death signal, unless PARENT_PID is already gone."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[0] != "tied" or argv[2] != "--" or not argv[1].isdigit():
        print("usage: python -m mst_ds.job tied PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    _kill_me_with_parent()
    if os.getppid() != int(argv[1]):  # the parent died before the signal was asked for
        return 1
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    raise SystemExit(main())
