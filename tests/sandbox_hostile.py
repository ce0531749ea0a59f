"""Hostile code against utils/sandbox.py. Run by tests/test_sandbox.py inside a pids + memory cgroup with a
hard outer kill (never run it beside a measurement: it loads every core). Prints one JSON object per case:
{name, error, detail, seconds, limit, ok (the case's own checks), why}.

    python tests/sandbox_hostile.py CANARY_DIR
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.sandbox import Sandbox  # noqa: E402

TIMEOUT = 2.0
UIDS = range(61000, 61016)


def sandbox_processes() -> list[int]:
    """Pids on this machine that run under a sandbox uid (none may outlive a call)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = int(next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("Uid:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            if uid in UIDS:
                out.append(int(d.name))
    return out


def main(canary_dir: str) -> None:
    canary = Path(canary_dir) / "canary.txt"
    canary.write_text("untouched\n")
    os.environ["STEPWISE_SECRET"] = "s3cr3t-value"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    sb = Sandbox(workers=2, timeout=TIMEOUT, memory_mb=512, max_output=1 << 16)
    assert sb.isolation() == "namespaces", sb.isolation()
    worker_pids = [w.proc.pid for w in sb._workers]
    cases = {
        "infinite_loop": ("while True:\n    pass", {"timeout"}),
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", {"timeout"}),
        "alloc_10gb": ("x = bytearray(10 * 2**30)", {"memory"}),
        "alloc_loop": ("xs = []\nwhile True:\n    xs.append(bytearray(2**26))", {"memory"}),
        "write_outside": (f"open({str(canary)!r}, 'w').write('owned')", {"exception"}),
        "delete_outside": (f"import os\nos.remove({str(canary)!r})", {"exception"}),
        "write_tmp": ("open('/tmp/stepwise_evil', 'w').write('x')", {"exception"}),
        "read_passwd": ("print(open('/etc/passwd').read())", {"exception"}),
        "rmtree_root": ("import shutil\nshutil.rmtree('/', ignore_errors=True)\nprint('done')", {None}),
        "environment": ("import os\nprint(dict(os.environ))", {None}),
        "socket_connect": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", {"exception"}),
        "os_system": ("import os\nprint(os.system('touch /tmp/stepwise_evil2'))", {None}),
        "gigabytes_output": ("while True:\n    print('x' * 10**6)", {"output_limit"}),
        "sys_exit": ("import sys\nsys.exit(5)", {"exit"}),
        "segfault": ("import ctypes\nctypes.string_at(0)", {"signal"}),
        "gil_never_returns": ("import ctypes\nctypes.PyDLL(None).pause()", {"timeout"}),
        "regex_backtracking": ("import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", {"timeout"}),
        "daemon_outlives": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                            "        time.sleep(600)\n    os._exit(0)\nprint('parent done')", {None}),
        "kill_everything": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')", {None, "signal", "exception"}),
        "disk_fill": ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n    i += 1", {"exception"}),
        "big_file": ("open('big', 'wb').write(b'x' * 2**30)", {"exception", "memory"}),
    }
    for name, (code, allowed) in cases.items():
        t0 = time.time()
        r = sb.run(code)
        wall = time.time() - t0
        why = []
        if r.error not in allowed:
            why.append(f"error {r.error!r} not in {sorted(map(str, allowed))}")
        if wall > TIMEOUT + 2.0:
            why.append(f"took {wall:.1f} s (limit {TIMEOUT} s)")
        time.sleep(0.05)
        left = sandbox_processes()
        if left:
            why.append(f"processes outlived the call: {left}")
        if canary.read_text() != "untouched\n":
            why.append("canary changed")
        if Path("/tmp/stepwise_evil").exists() or Path("/tmp/stepwise_evil2").exists():
            why.append("a file appeared in /tmp")
        if name == "environment" and "s3cr3t" in r.stdout:
            why.append("environment leaked")
        if name == "socket_connect":
            try:
                listener.accept()
                why.append("the listener got a connection")
            except BlockingIOError:
                pass
        if name == "gigabytes_output" and len(r.stdout) > (1 << 16):
            why.append(f"{len(r.stdout)} bytes of stdout kept")
        if any(p not in [w.proc.pid for w in sb._workers] for p in worker_pids):
            why.append("a worker was replaced")
        if sb.run("print(6 * 7)").stdout != "42\n":
            why.append("the sandbox does not work after the case")
        print(json.dumps({"name": name, "error": r.error, "detail": r.detail, "seconds": round(wall, 3),
                          "limit": TIMEOUT, "ok": not why, "why": "; ".join(why)}), flush=True)
    sb.close()


if __name__ == "__main__":
    main(sys.argv[1])
