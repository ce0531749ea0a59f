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
from utils.sandbox import Sandbox, _descendants  # noqa: E402

TIMEOUT = 2.0
UIDS = range(61000, 61016)
MARK = "PREV-CALL-" + "OUTPUT"  # printed by the call before "previous_call"; the probe joins it at run time
# the wall-time limit whatever the code does with its descriptors, a call that looks for the previous call's
# output and code through frames and gc, and a setsid daemon: each also run in the rlimits fallback
WALL_CASES = {
    "close_own_output": ("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(6)", {"timeout"}),
    "closerange_pause": ("import os, signal\nos.closerange(0, 256)\nsignal.pause()", {"timeout"}),
    "dup2_over_output": ("import os, time\nr, w = os.pipe()\nos.dup2(w, 1)\nos.dup2(w, 2)\ntime.sleep(6)", {"timeout"}),
    "wait_on_event": ("import threading\nthreading.Event().wait()", {"timeout"}),
    "previous_call": ("import gc, sys\ndef scan():\n    needle = ''.join(['PREV', '-CALL-', 'OUTPUT'])\n"
                      "    me, hits = sys._getframe(), []\n    f = me.f_back\n    while f:\n"
                      "        hits += [f.f_code.co_name + '.' + k for k, v in f.f_locals.items() if needle in repr(v)]\n"
                      "        f = f.f_back\n    for o in gc.get_objects():\n        try:\n"
                      "            if o is not me and needle in repr(o)[:10**6]:\n                hits.append(type(o).__name__)\n"
                      "        except Exception:\n            pass\n    return hits\nprint(scan())", {None}),
    "kill_intermediate": ("import os, time\nif os.fork() == 0:\n    time.sleep(600)\nos.kill(os.getppid(), 9)\n"
                          "time.sleep(600)", {"sandbox", "exception", "timeout"}),  # its orphans: the template's
    "setsid_daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                      "        print(os.getpid(), flush=True)\n        time.sleep(600)\n    os._exit(0)\n"
                      "time.sleep(0.2)\nprint('parent done')", {None}),
}


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
        **WALL_CASES,
    }
    run_cases(sb, cases, "namespaces", canary, listener, worker_pids)
    sb.close()
    rl = Sandbox(workers=2, mode="rlimits", timeout=TIMEOUT, memory_mb=512, max_output=1 << 16)
    assert rl.isolation() == "rlimits", rl.isolation()
    run_cases(rl, WALL_CASES, "rlimits", canary, listener, [w.proc.pid for w in rl._workers])
    rl.close()


def run_cases(sb, cases: dict, mode: str, canary: Path, listener, worker_pids: list[int]) -> None:
    for name, (code, allowed) in cases.items():
        if name == "previous_call":
            sb.run(f"print({MARK!r})")  # every worker's last call printed the mark
            sb.run(f"print({MARK!r})")
        t0 = time.time()
        r = sb.run(code)
        wall = time.time() - t0
        why = []
        if r.error not in allowed:
            why.append(f"error {r.error!r} not in {sorted(map(str, allowed))}")
        if wall > TIMEOUT + 2.0:
            why.append(f"took {wall:.1f} s (limit {TIMEOUT} s)")
        time.sleep(0.05)
        left = sandbox_processes() + [p for w in worker_pids for p in _descendants(w)[1:]]  # [0]: its template
        if left:
            why.append(f"processes outlived the call: {left}")
        if name == "previous_call" and r.stdout.strip() != "[]":
            why.append(f"an earlier call's output is reachable: {r.stdout.strip()}")
        if name == "setsid_daemon" and mode == "rlimits":  # (in a pid namespace the printed pid is not ours)
            alive = [int(p) for p in r.stdout.split() if p.isdigit() and _alive(int(p))]
            if alive:
                why.append(f"the daemon {alive} outlived the call")
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
        print(json.dumps({"name": name, "mode": mode, "error": r.error, "detail": r.detail, "seconds": round(wall, 3),
                          "limit": TIMEOUT, "ok": not why, "why": "; ".join(why)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
