"""Running untrusted code: a process with no network, its own view of the files, an allow-listed
environment, resource limits, and a process tree that dies with it — without Docker.

On Linux with bubblewrap (``bwrap``), the process gets new namespaces for everything
(``--unshare-all``): no network device but loopback, its own process IDs (when its first
process ends, the kernel kills every process left in the namespace, however it detached), and a
filesystem that holds only the system's and Python's files, read-only, and an empty ``/tmp``,
its one writable place, as user ``nobody``. Everywhere, limits (``setrlimit``) cap address
space, file size and CPU time, and a wall-clock limit kills what is left. Where the machine lets the
grader make control groups (cgroup v1 or v2, as root), the sandbox gets its own, capping its
processes and its memory all together, and every process in it is killed at the end.

Where bubblewrap is missing or cannot make namespaces (macOS, a locked-down container), the
process runs with the limits and the environment allow-list only; :func:`isolation` says
plainly which protections are off, and a caller can refuse to go on without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

NOBODY = 65534
ENVIRONMENT = ("LANG", "LC_ALL", "TZ")  # passed through when set; everything else is cleared
OFF_WITHOUT_BWRAP = ("network namespace", "own filesystem view", "process namespace")


@dataclass
class Limits:
    """What one sandboxed run may use."""

    seconds: float = 300.0             # wall clock, then the whole tree is killed
    memory: int = 6 * 2**30            # bytes of address space per process
    total_memory: int = 8 * 2**30      # bytes of memory, all processes (control group)
    file_size: int = 256 * 2**20       # bytes, the largest file it may write
    processes: int = 512               # processes and threads, all together
    tmp_size: int = 512 * 2**20        # bytes of its /tmp (bubblewrap only)
    cpu_seconds: int | None = None     # per process; default: the wall-clock limit × cores


@dataclass
class Outcome:
    """What a sandboxed run left: its exit status (None when killed at the limit), its
    stdout (capped), the end of its stderr, and the protections that were off."""

    returncode: int | None
    stdout: bytes
    stderr: str
    timed_out: bool
    off: list[str] = field(default_factory=list)


class SandboxUnavailable(RuntimeError):
    """Isolation was required and this machine cannot provide it."""


@cache
def isolation() -> list[str]:
    """The protections this machine cannot give (empty: all of them): bubblewrap is tried once
    with the namespaces a grading uses."""
    if not sys.platform.startswith("linux"):
        return [*OFF_WITHOUT_BWRAP, "process-count limit"]
    if shutil.which("bwrap") is None:
        return list(OFF_WITHOUT_BWRAP)
    probe = subprocess.run(_bwrap([], Path("/")) + ["true"], capture_output=True)
    return [] if probe.returncode == 0 else list(OFF_WITHOUT_BWRAP)


def _nobody_can_run_python() -> bool:
    """Whether user ``nobody`` can reach this Python (a Python under ``/root`` it cannot)."""
    for top in {Path(sys.executable).resolve(), Path(sys.base_prefix).resolve(),
                Path(sys.prefix).resolve()}:
        if any(not os.stat(p).st_mode & 0o001 for p in top.parents):
            return False
    return True


def _as_nobody() -> None:
    """Before exec, when root and without bubblewrap: become ``nobody``, so that the process
    limit binds and nothing of root's is writable."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


class ControlGroups:
    """The sandbox's own control groups, where this machine lets us make them: ``pids`` and
    ``memory`` (cgroup v1 hierarchies, or v2 where the controllers are enabled)."""

    def __init__(self, limits: Limits):
        self.dirs: list[Path] = []
        self.controls: set[str] = set()
        wanted = {"pids.max": str(limits.processes), "memory.max": str(limits.total_memory),
                  "memory.limit_in_bytes": str(limits.total_memory)}
        name = f"ragbook-sandbox-{os.getpid()}-{id(self)}"
        for parent in _cgroup_parents():
            path = parent / name
            try:
                path.mkdir()
            except OSError:
                continue
            self.dirs.append(path)
            for control, value in wanted.items():
                with contextlib.suppress(OSError):
                    (path / control).write_text(value)
                    self.controls.add(control.split(".")[0])

    def enter(self) -> None:
        """In the child, before exec: move into every group."""
        for path in self.dirs:
            with contextlib.suppress(OSError):
                (path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        """Kill every process left in the groups, then remove them."""
        for path in self.dirs:
            for _ in range(50):
                with contextlib.suppress(OSError):
                    pids = (path / "cgroup.procs").read_text().split()
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    path.rmdir()
                    break
                time.sleep(0.05)


def _cgroup_parents() -> list[Path]:
    """This process's own control groups that hold pids or memory controllers."""
    if os.geteuid() != 0 or not os.path.exists("/proc/self/cgroup"):
        return []
    mounts = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, kind, options, *_ = line.split()
        if kind == "cgroup2":
            mounts["2"] = point
        elif kind == "cgroup":
            for option in options.split(","):
                if option in ("pids", "memory"):
                    mounts[option] = point
    parents = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["2"]:
            if controller in mounts:
                parents.append(Path(mounts[controller] + path))
    return parents


def _bwrap(readable: list[Path], cwd: Path, tmp_size: int | None = None) -> list[str]:
    """The bubblewrap command line: the system and ``readable`` read-only, ``/tmp`` fresh."""
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
           "--uid", str(NOBODY), "--gid", str(NOBODY),
           "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/localtime", "/etc/fonts"):
        if os.path.exists(etc):
            cmd += ["--ro-bind", etc, etc]
    if tmp_size:
        cmd += ["--size", str(tmp_size)]
    cmd += ["--tmpfs", "/tmp"]  # before the binds: a Python or checkout under /tmp stays visible
    for path in readable:
        if path.exists() and not str(path).startswith("/usr/"):
            cmd += ["--ro-bind", str(path), str(path)]
    return cmd + ["--chdir", str(cwd)]


def python_paths() -> list[Path]:
    """What a Python process of this environment reads: its prefixes and site-packages, not
    the working directory or anything else on ``sys.path`` (a course's checkout holds the
    solutions): packages installed in development mode are added by the caller."""
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    return sorted({Path(p).resolve() for p in paths if Path(p).is_dir()})


def run(argv: list[str], stdin: bytes, limits: Limits, readable: list[Path] = (),
        env: dict[str, str] | None = None, require: bool = False,
        stdout_cap: int = 64 * 2**20) -> Outcome:
    """Run ``argv`` sandboxed with ``stdin``; ``readable``: paths it may read besides the
    system's and Python's. ``env``: its whole environment besides ``PATH``, ``HOME`` and
    :data:`ENVIRONMENT`. ``require``: raise :class:`SandboxUnavailable` rather than run with
    protections off."""
    off = isolation()
    if off and require:
        raise SandboxUnavailable("isolation required (--require-sandbox) but off here: "
                                 f"{', '.join(off)}; install bubblewrap (`make sysdeps`)")
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp"}
    environment |= {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}
    environment |= env or {}
    # then RLIMIT_NPROC counts nobody's processes alone
    as_nobody = bool(off) and os.geteuid() == 0 and _nobody_can_run_python()
    if off:
        work = Path(_private_tmp(chown=as_nobody))
        cmd, cwd = argv, work
        environment |= {"HOME": str(work), "TMPDIR": str(work)}
    else:
        cmd = _bwrap([*python_paths(), *readable], Path("/tmp"), limits.tmp_size)
        for key, value in environment.items():
            cmd += ["--setenv", key, value]
        cmd, cwd, work = cmd + argv, None, None
    cpu = limits.cpu_seconds or int(limits.seconds * (os.cpu_count() or 1)) + 1
    groups = ControlGroups(limits)
    if off and os.geteuid() == 0 and not as_nobody:
        off = off + ["an unprivileged user (nobody cannot reach this Python)"]
    if "pids" not in groups.controls and not as_nobody:
        off = off + ["process-count limit"]
    if "memory" not in groups.controls:
        off = off + ["total-memory limit (each process's own stays)"]

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size, limits.file_size))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        groups.enter()
        if as_nobody:
            _as_nobody()
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

    proc = subprocess.Popen(cmd, cwd=cwd, env=environment if off else {},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=limit)
    RUNNING.add(proc.pid)
    out, err = bytearray(), bytearray()
    threads = [threading.Thread(target=_drain, args=(proc.stdout, out, stdout_cap)),
               threading.Thread(target=_drain, args=(proc.stderr, err, 2**16, True)),
               threading.Thread(target=_feed, args=(proc.stdin, stdin))]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=limits.seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill(proc.pid)  # bwrap's namespace, or (without it) the session: what is left dies
        proc.wait()
        groups.close()
        RUNNING.discard(proc.pid)
        for t in threads:
            t.join()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return Outcome(None if timed_out else proc.returncode, bytes(out),
                   err.decode(errors="replace"), timed_out, off)


RUNNING: set[int] = set()  # sandboxes under way, killed if the grader itself is stopped


def kill(pid: int) -> None:
    """Kill the process group ``pid`` leads (with bubblewrap, its namespace goes with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def kill_all() -> None:
    """Kill every sandbox still running (the grader was interrupted)."""
    for pid in list(RUNNING):
        kill(pid)


def _drain(stream, into: bytearray, cap: int, keep_end: bool = False) -> None:
    """Read ``stream`` to its end, keeping at most ``cap`` bytes (the first, or the last)."""
    while chunk := stream.read(65536):
        into += chunk
        if len(into) > cap and keep_end:
            del into[:len(into) - cap]
        elif len(into) > cap:
            del into[cap:]


def _feed(stream, data: bytes) -> None:
    """Write ``data`` to ``stream`` and close it; a process that stopped reading is no error."""
    with contextlib.suppress(BrokenPipeError, OSError):
        stream.write(data)
        stream.close()


def _private_tmp(chown: bool) -> str:
    """A temporary directory the sandboxed process can write (``chown``: it runs as nobody)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="ragbook-sandbox-")
    if chown:
        os.chown(path, NOBODY, NOBODY)
    return path
