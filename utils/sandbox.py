"""Running model-written Python: each call in its own short-lived process, limited and isolated.

    from utils.sandbox import run_code, run_many
    r = run_code("x = 3 * 4\\nprint(x)", timeout=5.0)
    r.ok, r.stdout, r.error, r.detail        # True, "12\\n", None, ""
    rs = run_many(programs, timeout=5.0)      # the same, spread over the worker pool, in order

`run_code` never raises on anything the code does. `error` is one of ERRORS (None when ok):
  timeout        wall time (`timeout`) or CPU time ran out
  memory         the address-space limit was hit (MemoryError)
  exception      the code raised; `detail` is the traceback's last line (a SyntaxError too)
  exit           the code exited with a non-zero status (sys.exit(3) -> detail "status 3")
  signal         the process died by a signal (a segfault: detail "SIGSEGV")
  output_limit   more than `max_output` bytes of output: the code is killed, stdout keeps the first bytes
  sandbox        the sandbox itself failed (a worker could not start); detail says why
A bare expression on the last line is printed, as in a REPL (rStar's executor shows the value the same way).

How a call runs. A pool of worker servers (`workers`, default 2), each a clean `python -I` started with an
empty environment, preloads the libraries solutions import (math, fractions, sympy, numpy when installed)
and then forks per request, so a call costs two forks, not an interpreter start. Per request:
  1. an intermediate process unshares new pid, network, mount, IPC and UTS namespaces (needs root, as on
     these machines and in CI) and forks the child, which is pid 1 of the new pid namespace: when it ends,
     the kernel kills every process it started, double-forked daemons included;
  2. the child mounts a fresh tmpfs (`disk_mb`) as its working directory, chroots into it (the rest of the
     filesystem does not exist for it, no /bin/sh either), sets RLIMIT_AS (`memory_mb` above the worker's
     own size), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_NPROC, clears the environment, drops to
     an unprivileged uid of its own (so RLIMIT_NPROC holds: the kernel ignores it for root) and execs the
     code in a fresh namespace (`{"__name__": "__main__"}`); the new network namespace has no interface up;
  3. the worker reads stdout and stderr through pipes, at most `max_output` bytes, and SIGKILLs the child at
     the wall-time limit; it never runs user code itself, so a crash or a GIL-holding call costs one child.
Without root (or where unshare is refused) the sandbox falls back to rlimits in a temporary directory with
the environment cleared, the process group killed after each call, and no network or filesystem isolation:
`isolation()` says which ("namespaces" or "rlimits"; a warning is printed once on the fallback).
"""
from __future__ import annotations

import ast
import atexit
import ctypes
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback
from dataclasses import asdict, dataclass

ERRORS = ("timeout", "memory", "exception", "exit", "signal", "output_limit", "sandbox")
PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "statistics", "re",
           "random", "string", "datetime", "socket", "encodings.idna", "sympy", "numpy")
# (socket: code may try it; the empty network namespace stops it)
_CLONE = {"NEWNS": 0x00020000, "NEWUTS": 0x04000000, "NEWIPC": 0x08000000, "NEWPID": 0x20000000,
          "NEWNET": 0x40000000}
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_EXC, _MEM = 101, 102  # the child's exit status for an exception / a MemoryError


@dataclass
class Result:
    ok: bool
    stdout: str
    error: str | None = None  # one of ERRORS, None when ok
    detail: str = ""  # the exception's last line, "status 3", "SIGSEGV", the limit that was hit
    stderr: str = ""
    seconds: float = 0.0


@dataclass
class Limits:
    timeout: float = 10.0  # wall seconds (rStar's executor: 30 s per program, 60 s per tree)
    memory_mb: int = 1024  # address space above the worker's own
    disk_mb: int = 16  # the tmpfs working directory (namespaces) / the largest file written (RLIMIT_FSIZE)
    nproc: int = 16  # processes the code may run at once
    max_output: int = 1 << 16  # bytes of stdout + stderr read before the code is killed


# ----------------------------------------------------------------------------- the worker server (a separate process)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _probe_namespaces() -> bool:
    """Whether this process may unshare the namespaces (checked in a throwaway child)."""
    if os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _libc().unshare(sum(_CLONE.values())) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


def _run_child(code: str, lim: Limits, root: str, uid: int, isolated: bool, w_out: int, w_err: int) -> None:
    """In the child (pid 1 of its namespace when isolated): limits, isolation, then the code. Never returns.
    NOTE: everything it needs is imported before the chroot (after it, no module file exists)."""
    try:
        os.setsid()
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        if isolated:
            libc = _libc()
            libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
            opts = f"size={lim.disk_mb}m,mode=0700,uid={uid},gid={uid}".encode()
            if libc.mount(b"tmpfs", root.encode(), b"tmpfs", 0, opts) != 0:
                raise OSError(ctypes.get_errno(), "mount tmpfs")
            os.chroot(root)
        os.chdir("/" if isolated else root)
        cpu = int(lim.timeout) + 1
        for res, val in ((resource.RLIMIT_AS, vm + (lim.memory_mb << 20)), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, lim.disk_mb << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, lim.nproc), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (val, val + (1 if res == resource.RLIMIT_CPU else 0)))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file is an OSError, not a silent death
        if isolated:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        fd = os.open(os.devnull, os.O_RDONLY) if not isolated else None
        os.dup2(fd, 0) if fd is not None else os.close(0)
        os.closerange(3, 1 << 16)
        os.environ.clear()
        sys.stdin, sys.stdout, sys.stderr = None, open(1, "w", closefd=False), open(2, "w", closefd=False)
    except BaseException as e:  # noqa: BLE001  the sandbox could not be set up: say so on stderr
        os.write(w_err, f"sandbox setup failed: {e!r}".encode())
        os._exit(_EXC)
    os._exit(_exec_user(code))


def _exec_user(code: str) -> int:
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, "<solution>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<solution>", "exec"), g)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<solution>", "eval"), g)
            if value is not None:
                print(repr(value))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except MemoryError:
        status = _MEM
    except BaseException:  # noqa: BLE001
        traceback.print_exc(limit=-3)
        status = _EXC
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    return status


def _handle(req: dict, root: str, uid: int, isolated: bool) -> dict:
    """One request: fork the intermediate (which unshares and forks the child), read, time out, classify."""
    import shutil
    import tempfile
    import time
    lim, t0 = Limits(**req["limits"]), time.time()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    r_st, w_st = os.pipe()
    work = root if isolated else tempfile.mkdtemp(prefix="call-", dir=root)
    mid = os.fork()
    if mid == 0:  # the intermediate: stays in the worker's pid namespace, reports the child's pid and status
        try:
            os.close(r_out), os.close(r_err), os.close(r_st)
            if isolated and _libc().unshare(sum(_CLONE.values())) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            child = os.fork()
            if child == 0:
                _run_child(req["code"], lim, work, uid, isolated, w_out, w_err)
            os.close(w_out), os.close(w_err)
            os.write(w_st, struct.pack("q", child))
            os.write(w_st, struct.pack("q", os.waitpid(child, 0)[1]))
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.close(w_out), os.close(w_err), os.close(w_st)
    child = struct.unpack("q", os.read(r_st, 8) or struct.pack("q", -1))[0]
    bufs, open_fds, killed, n = {r_out: bytearray(), r_err: bytearray()}, {r_out, r_err}, None, 0
    deadline = t0 + lim.timeout
    while open_fds:
        left = deadline - time.time()
        ready = select.select(list(open_fds), [], [], max(0.0, left))[0] if left > 0 else []
        if not ready:
            killed = "timeout"
            break
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                continue
            bufs[fd] += chunk[: max(0, lim.max_output - n)]
            n += len(chunk)
            if n > lim.max_output:
                killed = "output_limit"
        if killed:
            break
    if killed and child > 0:
        for kill in (os.kill, os.killpg):  # pid 1 of the namespace: the kernel takes the rest with it
            try:
                kill(child, signal.SIGKILL)
            except OSError:
                pass
    status = os.read(r_st, 8)
    os.waitpid(mid, 0)
    for fd in (r_out, r_err, r_st):
        os.close(fd)
    if not isolated:
        try:
            os.killpg(child, signal.SIGKILL)
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)
    out = bufs[r_out].decode(errors="replace")
    err = bufs[r_err].decode(errors="replace")
    res = {"ok": False, "stdout": out, "stderr": err[-4000:], "seconds": time.time() - t0}
    if killed:
        return res | {"error": killed, "detail": f"{lim.timeout:g} s wall" if killed == "timeout" else
                      f"over {lim.max_output} bytes"}
    if len(status) < 8:
        return res | {"error": "sandbox", "detail": "the sandbox process failed"}
    st = struct.unpack("q", status)[0]
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return res | {"error": "timeout", "detail": f"{int(lim.timeout) + 1} s CPU"}
        return res | {"error": "signal", "detail": signal.Signals(sig).name}
    code = os.WEXITSTATUS(st)
    if code == 0:
        return res | {"ok": True, "error": None, "detail": ""}
    if code == _MEM or (code == _EXC and "MemoryError" in err[-200:]):
        return res | {"error": "memory", "detail": f"{lim.memory_mb} MB address space"}
    if code == _EXC:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return res | {"error": "exception", "detail": lines[-1] if lines else "exception"}
    return res | {"error": "exit", "detail": f"status {code}"}


def _serve(slot: int) -> None:
    """The worker loop: one JSON request per line on stdin, one JSON result per line on stdout."""
    import importlib
    import tempfile
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  optional libraries
            pass
    isolated = _probe_namespaces()
    root = tempfile.mkdtemp(prefix=f"stepwise-sandbox-{slot}-")
    uid = 61000 + slot  # a uid of its own per worker: RLIMIT_NPROC counts processes per uid
    if isolated:
        os.chmod(root, 0o755)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write((json.dumps({"isolation": "namespaces" if isolated else "rlimits"}) + "\n").encode())
    out.flush()
    for line in inp:
        try:
            res = _handle(json.loads(line), root, uid, isolated)
        except Exception as e:  # noqa: BLE001
            res = {"ok": False, "stdout": "", "error": "sandbox", "detail": repr(e)}
        out.write((json.dumps(res) + "\n").encode())
        out.flush()


# ----------------------------------------------------------------------------- the client side
class _Worker:
    def __init__(self, slot: int):
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--serve", str(slot)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        self.isolation = json.loads(self.proc.stdout.readline() or b'{"isolation": "none"}')["isolation"]
        self.lock = threading.Lock()

    def call(self, code: str, lim: Limits) -> Result:
        with self.lock:
            try:
                self.proc.stdin.write((json.dumps({"code": code, "limits": asdict(lim)}) + "\n").encode())
                self.proc.stdin.flush()
                line = self.proc.stdout.readline()
            except (BrokenPipeError, OSError) as e:
                line, why = b"", repr(e)
            if not line:
                return Result(False, "", "sandbox", f"worker {self.proc.pid} died")
            return Result(**json.loads(line))


class Sandbox:
    """A pool of worker servers (started on first use, stopped at exit). Thread-safe."""

    def __init__(self, workers: int = 2, **limits):
        self.n, self.limits, self._workers, self._lock, self._next = workers, Limits(**limits), [], threading.Lock(), 0

    def _pool(self) -> list[_Worker]:
        with self._lock:
            self._workers = [w for w in self._workers if w.proc.poll() is None]
            while len(self._workers) < self.n:
                w = _Worker(len(self._workers))
                if w.isolation != "namespaces":
                    print(f"warning: sandbox isolation is {w.isolation!r} (no root or unshare refused): rlimits "
                          "only, no filesystem or network isolation", file=sys.stderr, flush=True)
                self._workers.append(w)
            return self._workers

    def isolation(self) -> str:
        return self._pool()[0].isolation

    def run(self, code: str, **limits) -> Result:
        pool = self._pool()
        with self._lock:
            w, self._next = pool[self._next % len(pool)], self._next + 1
        for w in [w] + [x for x in pool if x is not w]:  # a free worker if the chosen one is busy
            if not w.lock.locked():
                break
        return w.call(code, Limits(**(asdict(self.limits) | limits)))

    def run_many(self, codes: list[str], **limits) -> list[Result]:
        pool, lim = self._pool(), Limits(**(asdict(self.limits) | limits))
        out: list[Result | None] = [None] * len(codes)

        def drain(w: _Worker, idx: list[int]):
            for i in idx:
                out[i] = w.call(codes[i], lim)

        threads = [threading.Thread(target=drain, args=(w, list(range(k, len(codes), len(pool)))))
                   for k, w in enumerate(pool)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def close(self) -> None:
        for w in self._workers:
            w.proc.kill()
            w.proc.wait()
        self._workers = []


_DEFAULT: Sandbox | None = None


def default_sandbox() -> Sandbox:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Sandbox(workers=max(1, min(4, os.cpu_count() or 1)))
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def run_code(code: str, timeout: float = Limits.timeout, **limits) -> Result:
    """Run one program (see the module docstring); never raises for anything the code does."""
    return default_sandbox().run(code, timeout=timeout, **limits)


def run_many(codes: list[str], timeout: float = Limits.timeout, **limits) -> list[Result]:
    """run_code over a list, in parallel over the worker pool; results in order."""
    return default_sandbox().run_many(codes, timeout=timeout, **limits)


def isolation() -> str:
    return default_sandbox().isolation()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
