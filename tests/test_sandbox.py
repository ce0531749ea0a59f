"""utils/sandbox.py: results of ordinary programs, throughput, and the hostile-code suite (run in a pids and
memory cgroup with a hard outer kill, so a sandbox that fails cannot take the machine down)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.sandbox import Sandbox, run_code, run_many

ROOT = Path(__file__).resolve().parents[1]


def test_results_of_ordinary_programs():
    r = run_code("x = 3 * 4\nprint(x)", timeout=5)
    assert (r.ok, r.stdout, r.error) == (True, "12\n", None)
    assert run_code("coins = 7\ncoins = coins // 2\ncoins", timeout=5).stdout == "3\n"  # a trailing expression prints
    assert run_code("x = 1\nx = x + 1", timeout=5).stdout == ""  # an assignment prints nothing
    r = run_code("print('a')\n1 / 0", timeout=5)
    assert (r.ok, r.error, r.detail, r.stdout) == (False, "exception", "ZeroDivisionError: division by zero", "a\n")
    assert run_code("def f(:", timeout=5).detail.startswith("SyntaxError")
    assert run_code("undefined_name + 1", timeout=5).detail.startswith("NameError")
    assert run_code("import sys\nsys.exit(0)", timeout=5).ok
    r = run_code("while True:\n    pass", timeout=0.5)
    assert r.error == "timeout" and r.seconds < 2.0
    assert run_code("x = bytearray(4 * 2**30)", timeout=5).error == "memory"
    # a fresh namespace per call: a name defined in one call does not exist in the next
    assert run_code("leak = 1", timeout=5).ok and run_code("leak", timeout=5).error == "exception"


def test_throughput_at_least_50_per_second():
    sb = Sandbox(workers=2)
    sb.run("pass")  # start the workers
    codes = [f"x = {i}\nx = x * 3\nprint(x)" for i in range(200)]
    t0 = time.time()
    res = sb.run_many(codes, timeout=5)
    rate = len(codes) / (time.time() - t0)
    sb.close()
    assert [r.stdout for r in res] == [f"{3 * i}\n" for i in range(200)]
    assert rate >= 50, f"{rate:.0f} executions/s"


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_deadline_holds_with_closed_output_and_no_call_outlives_itself(mode):
    sb = Sandbox(workers=1, mode=mode, timeout=1.0)
    for code in ("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(6)",
                 "import os, signal\nos.closerange(0, 256)\nsignal.pause()"):
        t0 = time.time()
        assert sb.run(code).error == "timeout" and time.time() - t0 < 2.5, code
    # a setsid daemon: gone when the call returns (pid 1 of a namespace, or the subreaper's sweep)
    r = sb.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        print(os.getpid(), flush=True)\n        time.sleep(600)\n    os._exit(0)\n"
               "time.sleep(0.2)\nprint('done')")  # (the sleep: the daemon is up and has printed before the call ends)
    assert r.ok and "done" in r.stdout
    if sb.isolation() == "rlimits":
        pids = [int(p) for p in r.stdout.split() if p.isdigit()]
        assert pids and not any(_alive(p) for p in pids)
    # a call cannot reach the previous call's output (each forks from a template that never saw one)
    sb.run("print('EARLIER-' + 'OUTPUT')")
    probe = ("import gc\nneedle = ''.join(['EARLIER', '-OUTPUT'])\n"
             "print(sum(needle in repr(o) for o in gc.get_objects() if o is not globals()))")
    assert sb.run(probe).stdout == "0\n"
    sb.close()


def test_method_files_refuse_rlimits_unless_asked(monkeypatch):
    import utils.sandbox as sandbox
    rl = Sandbox(workers=1, mode="rlimits")
    monkeypatch.setattr(sandbox, "_DEFAULT", rl)
    with pytest.raises(ValueError, match="--unsafe_exec"):
        sandbox.require_isolation()
    assert sandbox.require_isolation(unsafe_exec=True) == "rlimits"
    rl.close()


def _cgroup(controller: str, name: str) -> Path | None:
    base = Path("/sys/fs/cgroup") / controller
    own = next((ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                if ln.split(":")[1] == controller), None)
    if own is None or not base.exists():
        return None
    d = base / own.lstrip("/") / name
    try:
        d.mkdir()
    except OSError:
        return None
    return d


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace sandbox needs root (fallback: rlimits only)")
def test_hostile_code_suite(tmp_path):
    name = f"stepwise-hostile-{os.getpid()}"
    pids, mem = _cgroup("pids", name), _cgroup("memory", name)
    if pids is None:
        pytest.skip("no writable pids cgroup to contain the suite")
    (pids / "pids.max").write_text("512")
    if mem is not None:
        (mem / "memory.limit_in_bytes").write_text(str(6 << 30))

    def enter():  # runs in the child before exec: the suite and all it starts live in the cgroups
        for d in (pids, mem):
            if d is not None:
                (d / "cgroup.procs").write_text(str(os.getpid()))

    canary = tmp_path / "outside"
    canary.mkdir()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sandbox_hostile.py"), str(canary)],
                              preexec_fn=enter, capture_output=True, text=True, timeout=240)
    finally:  # the hard outer kill: whatever is left in the cgroup dies, then the cgroups go
        for d in (pids, mem):
            if d is None:
                continue
            for _ in range(50):
                left = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                for p in left:
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
                if not left:
                    break
                time.sleep(0.1)
            d.rmdir()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert len(rows) == 21 + 2 * 7, proc.stdout
    bad = [f"{r['name']}: {r['why']}" for r in rows if not r["ok"]]
    assert not bad, bad
    assert (canary / "canary.txt").read_text() == "untouched\n"
    assert os.getpid() and run_code("print(1)", timeout=5).stdout == "1\n"  # this process and the pool are fine
