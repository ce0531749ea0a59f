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
and forks a template process before its first request; every call is forked from the template, so a call
costs two forks, not an interpreter start, and starts from a process state that never held another call's
code or output (the template receives only a call's pipes and limits; the code reaches the forked process
through its own pipe, and the output goes straight to the worker). Per request:
  1. the template forks an intermediate, which reads the code, unshares new pid, network, mount, IPC and UTS
     namespaces (needs root, as on these machines and in CI) and forks the child, pid 1 of the new pid
     namespace: when it ends, the kernel kills every process it started, double-forked daemons included;
  2. the child mounts a fresh tmpfs (`disk_mb`) as its working directory, chroots into it (the rest of the
     filesystem does not exist for it, no /bin/sh either), sets RLIMIT_AS (`memory_mb` above the worker's
     own size), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_NPROC, clears the environment, drops to
     an unprivileged uid of its own (so RLIMIT_NPROC holds: the kernel ignores it for root) and execs the
     code in a fresh namespace (`{"__name__": "__main__"}`); the new network namespace has no interface up;
  3. the worker reads stdout and stderr through pipes, at most `max_output` bytes, and SIGKILLs the child at
     the wall-time limit, whatever the code did with its descriptors (closed, replaced, or a pause after
     them); it never runs user code itself, so a crash or a GIL-holding call costs one child.
Without root (or where unshare is refused; or `Sandbox(mode="rlimits")`) the sandbox falls back to rlimits
in a temporary directory with the environment cleared and no network or filesystem isolation; the
intermediate is then a child subreaper that kills every process the call left behind (a setsid daemon
included) before it reports, and the template, a subreaper too, kills the orphans of an intermediate the code
killed. `isolation()` says which ("namespaces" or "rlimits"; a warning is printed once on the fallback), and
`require_isolation(unsafe_exec)` is what a method file calls before it runs model-written code: it refuses
the fallback unless asked (`--unsafe_exec`).
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
import time
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


def _stat(pid: int) -> tuple[bytes, int]:
    """(state, parent pid) of a process from /proc (b"", -1 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        return state, int(ppid)
    except (OSError, ValueError):
        return b"", -1


def _descendants(pid: int) -> list[int]:
    """Every live descendant of pid (from /proc's parent links; zombies left out), children first."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            state, ppid = _stat(int(d))
            if state not in (b"Z", b""):
                kids.setdefault(ppid, []).append(int(d))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += kids.get(p, [])
    return out


def _kill_descendants(pid: int) -> None:
    """SIGKILL everything under pid and reap what becomes its children, until nothing is left (pid is a
    subreaper, so a double-forked daemon is reparented to it and found on the next pass)."""
    for _ in range(1000):
        procs = _descendants(pid)
        for p in procs:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        while True:  # reap the dead (zombies are left out of _descendants)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not procs:
            return
        time.sleep(0.001)


def _subreaper() -> None:
    _libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans below this process become its children


def _intermediate(fds: list[int], lim: Limits, root: str, uid: int, isolated: bool) -> None:
    """Forked from the template per call: reads this call's code (the template never holds one), unshares,
    forks the child, reports its pid and wait status; without namespaces it is the subreaper that kills
    whatever the code left behind before it reports. Never returns."""
    try:
        w_out, w_err, w_st, r_code = fds
        chunks = []
        while chunk := os.read(r_code, 1 << 16):
            chunks.append(chunk)
        os.close(r_code)
        code = b"".join(chunks).decode()
        work = root
        if isolated:
            if _libc().unshare(sum(_CLONE.values())) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
        else:
            import tempfile
            _subreaper()
            work = tempfile.mkdtemp(prefix="call-", dir=root)
        child = os.fork()
        if child == 0:
            _run_child(code, lim, work, uid, isolated, w_out, w_err)
        os.close(w_out), os.close(w_err)
        os.write(w_st, struct.pack("q", child))
        status = os.waitpid(child, 0)[1]
        if not isolated:  # pid 1 of a namespace takes its tree with it; here the subreaper does
            _kill_descendants(os.getpid())
            import shutil
            shutil.rmtree(work, ignore_errors=True)
        os.write(w_st, struct.pack("q", status))
    except BaseException:  # noqa: BLE001
        os._exit(1)
    os._exit(0)


def _template(sock, root: str, uid: int, isolated: bool) -> None:
    """The process every call is forked from: forked from the worker after the preload and before any request,
    it receives only a call's pipes and limits (never its code or results) and forks an intermediate for each.
    A subreaper: a process reparented to it that is not one of its intermediates (one whose intermediate was
    killed) is killed with its tree. Never returns."""
    import socket
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0), os.dup2(devnull, 1)  # the worker's request and result pipes are not its business
    os.close(devnull)
    _subreaper()
    live: set[int] = set()
    while True:
        ready = select.select([sock], [], [], 0.05)[0]  # (wakes to reap and sweep orphans)
        reaped = False
        while True:
            try:
                pid = os.waitpid(-1, os.WNOHANG)[0]
            except ChildProcessError:
                break
            if pid == 0:
                break
            live.discard(pid)
            reaped = True
        if reaped and not isolated:
            me = os.getpid()
            for p in _descendants(me):
                if p not in live and _stat(p)[1] == me:
                    _kill_tree(p)
        if not ready:
            continue
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        if not msg:
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _intermediate(fds, Limits(**json.loads(msg)), root, uid, isolated)
        live.add(pid)
        for fd in fds:
            os.close(fd)




def _kill_tree(pid: int) -> None:
    for p in [pid] + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    """Up to n bytes from fd before the deadline (fewer at end-of-file or when the deadline passes)."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.time()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _handle(code: str, lim: Limits, sock) -> dict:
    """One call: hand the template this call's pipes, write the code to the intermediate it forks, read the
    output, enforce the wall-time limit whatever the code does with its descriptors, classify the result."""
    import socket
    t0 = time.time()
    deadline = t0 + lim.timeout
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    r_st, w_st = os.pipe()
    r_code, w_code = os.pipe()
    try:
        socket.send_fds(sock, [json.dumps(asdict(lim)).encode()], [w_out, w_err, w_st, r_code])
    finally:
        for fd in (w_out, w_err, w_st, r_code):
            os.close(fd)
    try:
        data = code.encode()
        while data:
            data = data[os.write(w_code, data[: 1 << 16]):]
    except OSError:
        pass
    os.close(w_code)
    head = _read_exact(r_st, 8, deadline + 5.0)  # the child's pid, written right after its fork
    child = struct.unpack("q", head)[0] if len(head) == 8 else -1
    bufs, open_fds, killed, n = {r_out: bytearray(), r_err: bytearray()}, {r_out, r_err}, None, 0
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
    status = b""
    if not killed and child > 0:  # the code may have closed its output and still run: the deadline holds
        status = _read_exact(r_st, 8, deadline)
        if len(status) < 8 and time.time() >= deadline:
            killed = "timeout"
    if killed and child > 0:
        for kill in (os.kill, os.killpg):  # pid 1 of the namespace: the kernel takes the rest with it
            try:
                kill(child, signal.SIGKILL)
            except OSError:
                pass
    if len(status) < 8:
        status = _read_exact(r_st, 8, time.time() + 5.0)  # the intermediate reports once the child is gone
    for fd in (r_out, r_err, r_st):
        os.close(fd)
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


def _serve(slot: int, mode: str) -> None:
    """The worker loop: one JSON request per line on stdin, one JSON result per line on stdout. The template
    every call forks from is forked here, before the first request, so no call sees another's code or output."""
    import importlib
    import socket
    import tempfile
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  optional libraries
            pass
    isolated = mode != "rlimits" and _probe_namespaces()
    root = tempfile.mkdtemp(prefix=f"stepwise-sandbox-{slot}-")
    uid = 61000 + slot  # a uid of its own per worker: RLIMIT_NPROC counts processes per uid
    if isolated:
        os.chmod(root, 0o755)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        ours.close()
        _template(theirs, root, uid, isolated)
    theirs.close()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write((json.dumps({"isolation": "namespaces" if isolated else "rlimits"}) + "\n").encode())
    out.flush()
    for line in inp:
        try:
            req = json.loads(line)
            res = _handle(req["code"], Limits(**req["limits"]), ours)
        except Exception as e:  # noqa: BLE001
            res = {"ok": False, "stdout": "", "error": "sandbox", "detail": repr(e)}
        out.write((json.dumps(res) + "\n").encode())
        out.flush()


# ----------------------------------------------------------------------------- the client side
class _Worker:
    def __init__(self, slot: int, mode: str = "auto"):
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--serve", str(slot), mode],
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
    """A pool of worker servers (started on first use, stopped at exit). Thread-safe. `mode` "auto": namespaces
    where this process may unshare them, else rlimits; "rlimits": the fallback even as root (for tests)."""

    def __init__(self, workers: int = 2, mode: str = "auto", **limits):
        if mode not in ("auto", "rlimits"):
            raise ValueError(f"sandbox mode {mode!r}: auto or rlimits")
        self.n, self.mode, self.limits = workers, mode, Limits(**limits)
        self._workers, self._lock, self._next = [], threading.Lock(), 0

    def _pool(self) -> list[_Worker]:
        with self._lock:
            self._workers = [w for w in self._workers if w.proc.poll() is None]
            while len(self._workers) < self.n:
                w = _Worker(len(self._workers), self.mode)
                if w.isolation != "namespaces" and self.mode == "auto":
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


def require_isolation(unsafe_exec: bool = False) -> str:
    """The default sandbox's mode, for a method file about to run model-written code: "namespaces", or
    "rlimits" only when `unsafe_exec` (the flag that asks for it); else a one-line ValueError naming the flag."""
    mode = isolation()
    if mode != "namespaces" and not unsafe_exec:
        raise ValueError(f"the sandbox can only run code with rlimits here ({mode}: not root, or unshare refused), "
                         "so model-written code could read files and open sockets; run as root, or pass "
                         "--unsafe_exec to run it this way")
    return mode


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "auto")
