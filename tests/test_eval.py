"""eval.py: pass@k / maj@k by hand, ProcessBench references (all-correct 0, oracle 1), end-to-end runs on
the full MATH-500 and GSM8K files (shipped in data/) with a tiny model, ProcessBench + reranking with a
tiny PRM, and a SIGKILL mid-run that a rerun completes with every problem evaluated exactly once."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eval as E
from utils import toy

ROOT = Path(__file__).resolve().parent.parent


def test_pass_and_maj_at_k_by_hand():
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert E.pass_at_k(4, 0, 4) == 0.0 and E.pass_at_k(4, 3, 2) == 1.0 and E.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    answers, correct = ["1", "2", "2", "1", "1", "3"], [True, False, False, True, True, False]
    assert E.maj_at_k(answers, correct, 3) == 0.5  # groups [1,2,2] -> 2 (wrong), [1,1,3] -> 1 (right)
    assert E.maj_at_k(answers, correct, 6) == 1.0
    s = E.summarize([{"answers": answers, "correct": correct}], [1, 2, 6])
    assert s["n"] == 1 and s["pass@1"] == pytest.approx(0.5) and s["pass@6"] == 1.0 and "maj@2" in s


def test_processbench_reference_points():
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        p = toy.make_problem(rng, rng.randint(1, 3))
        steps = toy.solve(p, rng, {"misread": 0.5, "distractor": 0.5, "slip": 0.2})
        c = toy.check_steps(p["problem"], steps, p["answer"])
        rows.append({"problem": p["problem"], "steps": steps, "label": c.first_error, "answer": p["answer"]})
    assert {r["label"] == -1 for r in rows} == {True, False}
    all_ok = E.processbench_eval(E.AllCorrect(), rows)["0.5"]
    oracle = E.processbench_eval(E.load_verifier("oracle"), rows)["0.5"]
    assert all_ok["f1"] == 0.0 and all_ok["acc_correct"] == 1.0
    assert oracle["f1"] == 1.0


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A tiny random model whose context holds the longest MATH-500 / GSM8K prompts."""
    d = tmp_path_factory.mktemp("tiny_long")
    tok = toy.build_char_tokenizer(d)
    toy.tiny_qwen2(len(tok), hidden=64, layers=2, heads=2, max_len=8192).save_pretrained(d)
    return d


def _run(args, timeout=900):
    r = subprocess.run([sys.executable, "eval.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_full_math500_and_gsm8k_end_to_end(long_model_dir, tmp_path):
    out = tmp_path / "ev"
    _run(["--model", str(long_model_dir), "--data", "math500,gsm8k_test", "--n_samples", "2", "--k", "1,2",
          "--temperature", "1.0", "--max_new_tokens", "4", "--backend", "hf", "--batch_problems", "256", "--out_dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["math500"]["n"] == 500 and res["gsm8k_test"]["n"] == 1319
    for b in ("math500", "gsm8k_test"):
        assert {"pass@1", "pass@2", "maj@1", "maj@2"} <= set(res[b])
        rows = [json.loads(l) for l in (out / b / "samples.jsonl").read_text().splitlines()]
        assert sorted(r["idx"] for r in rows) == list(range(res[b]["n"]))
        assert all(len(r["completions"]) == 2 == len(r["correct"]) for r in rows)
    single = tmp_path / "one"
    _run(["--model", str(long_model_dir), "--data", "aime24", "--max_new_tokens", "4", "--backend", "hf",
          "--out_dir", str(single)])
    one = json.loads((single / "results.json").read_text())
    assert one["n"] == 30 and "pass@1" in one  # one benchmark: flat keys (the output contract)
    cmp_out = tmp_path / "cmp"
    r = _run(["--compare", f"{out},{single}", "--out_dir", str(cmp_out)])
    assert "math500/pass@1" in r.stdout and (cmp_out / "compare.md").exists()


def test_processbench_and_rerank_with_a_prm(tiny_model_dir, tmp_path):
    import prm_train as P
    from utils.data import write_jsonl
    rng, pb_rows = random.Random(1), []
    for _ in range(20):  # ProcessBench-format rows from the toy world (the real files may be absent)
        p = toy.make_problem(rng, rng.randint(1, 3))
        steps = toy.solve(p, rng, {"misread": 0.5, "slip": 0.3})
        pb_rows.append({"problem": p["problem"], "steps": steps,
                        "label": toy.check_steps(p["problem"], steps, p["answer"]).first_error})
    rows = [{"prompt": r["problem"], "completions": r["steps"], "labels": [i != r["label"] for i in range(len(r["steps"]))]}
            for r in pb_rows[:6]]
    args = P.Args(out_dir=str(tmp_path), max_steps=2, batch_tokens=2048, max_len=512)
    P.train("prm", str(tiny_model_dir), rows, args, P.setup_dist(), P.MetricsLog(tmp_path, enabled=False))
    pb = tmp_path / "processbench_small.jsonl"
    write_jsonl(pb, pb_rows[6:])
    out = tmp_path / "pb"
    _run(["--verifier", str(tmp_path / "prm"), "--processbench", str(pb),
          "--out_dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["processbench/small/f1"] <= 1 and "processbench/average/f1" in res
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"idx": 0, "problem": "q", "answer": "2", "completions": ["1 + 1 = 2\n\nso \\boxed{2}", "\\boxed{3}"],
                           "answers": ["2", "3"], "correct": [True, False]}])
    out2 = tmp_path / "rr"
    _run(["--verifier", str(tmp_path / "prm"), "--rerank", str(samples), "--k", "1,2", "--out_dir", str(out2)])
    rr = json.loads((out2 / "results.json").read_text())["rerank"]
    assert rr["rerank/bon@1"] == 0.5 and rr["rerank/bon@2"] in (0.0, 1.0)


def test_sigkill_then_resume_evaluates_each_problem_once(tiny_toy_dir, tmp_path):
    out = tmp_path / "kill"
    cmd = [sys.executable, "eval.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--n_samples", "2", "--k", "1,2",
           "--max_new_tokens", "60", "--batch_problems", "2", "--toy_processbench", "0", "--verifier", ""]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    f = out / "test" / "samples.jsonl"
    t = time.time()
    while time.time() - t < 300 and not (f.exists() and f.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = f.read_text().count("\n")
    assert 2 <= first < 30, first  # killed mid-run
    _run(cmd[2:])
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    assert sorted(r["idx"] for r in rows) == list(range(30))  # every problem once: none lost, none twice
    assert json.loads((out / "results.json").read_text())["n"] == 30


def test_torchrun_ranks_take_slices_and_rank0_merges(tiny_toy_dir, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "eval.py",
                        "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--max_new_tokens", "20",
                        "--n_samples", "1", "--k", "1", "--toy_processbench", "0", "--verifier", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "test" / "samples.jsonl").read_text().splitlines()]
    assert sorted(x["idx"] for x in rows) == list(range(30)) and not list((out / "test").glob("samples.rank*"))
    assert json.loads((out / "results.json").read_text())["n"] == 30
