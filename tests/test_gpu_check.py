"""tests/gpu_check.py, the one-GPU check, at its tiny shape on CPU: every method file runs under the probe, and
the probe's FLOP count is the hand-computed one."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.gpu_check import Probe
from utils.toy import tiny_qwen2
probe = Probe(); probe.install()
m = tiny_qwen2(40, hidden=64, layers=2)
opt = torch.optim.SGD(m.parameters(), lr=0.1)
ids = torch.randint(0, 40, (3, 10))
m(input_ids=ids).logits.sum().backward()  # 30 tokens with grad: 6 N each
opt.step()
with torch.no_grad():
    m(input_ids=ids[:, :5])  # 15 tokens without: 2 N each, a scoring forward
n = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
r = probe.report(peak_tflops=1.0)
print(n, r["train_tokens"], r["score_tokens"], r["train_flops"], r["optimizer_steps"], r["train_mfu"] > 0)
"""


def test_probe_counts_flops_by_hand():
    out = subprocess.run([sys.executable, "-c", PROBE_SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, train_tokens, score_tokens, train_flops, steps, mfu = out.stdout.split()
    n = int(n)
    # 2 layers of q, k, v, o (64x64 each) and the MLP (3 x 64x256), plus the tied lm_head (40x64)
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * 256) + 40 * 64
    assert (int(train_tokens), int(score_tokens), int(steps), mfu) == (30, 15, 1, "True")
    assert float(train_flops) == 6 * n * 30


def test_gpu_check_tiny_runs_every_file(tmp_path):
    r = subprocess.run([sys.executable, "tests/gpu_check.py", "--shape", "tiny", "--out_dir", str(tmp_path),
                        "--peak_tflops", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["shape"] == "tiny" and set(res["scripts"]) == {"prm_train", "search", "eval", "prime", "pav",
                                                             "rstar_mcts", "ppm"}
    for name, s in res["scripts"].items():
        assert s["rc"] == 0 and s["peak_mem_gib"] > 0, name
        assert s["generate_s"] + s["score_s"] + s["train_s"] <= s["wall_s"] + 1e-6, name
    for name in ("search", "eval", "prime", "pav", "rstar_mcts"):  # they sample
        assert res["scripts"][name]["generate_tokens"] > 0 and res["scripts"][name]["generate_tokens_per_s"] > 0, name
    for name in ("prm_train", "prime", "pav", "ppm"):  # they train (rstar_mcts's random policy solves nothing to SFT on)
        s = res["scripts"][name]
        assert s["optimizer_steps"] > 0 and s["train_tokens"] > 0 and 0 < s["train_mfu"], name
    assert (tmp_path / "gpu_check.md").read_text().count("\n| ") == 8  # the header and a row per script
