"""prm_train.py: label makers (against a mock policy), active selection, training, and end-to-end runs on
the toy world and on real data formats (encoding, heads and ProcessBench F1: test_verifiers.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prm_train as P
from utils.data import DATA_DIR, from_processbench, from_prm800k, read_jsonl, write_jsonl
from utils.generation import Sample

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class MockPolicy:
    """Completions reach the answer 7 iff the prefix holds no step marked BAD; counts rollouts."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def sample(self, prompts, n=1, temperature=None, **_):
        self.temperature = temperature
        out = []
        for p in prompts:
            self.calls += n
            ok = "BAD" not in self.tok.decode(p)
            out.append([Sample([], "so \\boxed{7}" if ok else "so \\boxed{3}", [], "eos") for _ in range(n)])
        return out


def _rows(tok, first_bad: list[int], m: int = 8):
    rows = []
    for fb in first_bad:
        steps = [f"step {i} BAD" if fb != -1 and i >= fb else f"step {i} ok" for i in range(m)]
        rows.append({"problem": "q", "answer": "7", "steps": steps, "correct": fb == -1,
                     "prompt_ids": tok.encode("Q:", add_special_tokens=False)})
    return rows


def test_mc_labels_match_the_first_error(tok):
    args = P.Args(mc_rollouts=3)
    rows = _rows(tok, [-1, 0, 3, 7])
    gen = MockPolicy(tok)
    spent = P.label_mc(gen, tok, rows, args)
    assert [r["labels"] for r in rows] == [[True] * 8, [False] * 8, [True] * 3 + [False] * 5, [True] * 7 + [False]]
    assert spent == gen.calls == 3 * (1 + 4 + 7)  # front to back, each wrong solution stops at its first zero
    full = _rows(tok, [-1, 0, 3, 7])
    spent = P.label_mc(MockPolicy(tok), tok, full, P.Args(mc_rollouts=3, first_error=False))
    assert spent == 3 * 7 * 3 and full[2]["labels"] == [True] * 3 + [False] * 5  # every prefix of the 3 wrong ones
    mono = _rows(tok, [-1, 0, 3, 7])  # untruncated, but no rollouts past a zero: same labels, fewer rollouts
    spent = P.label_mc(MockPolicy(tok), tok, mono, P.Args(mc_rollouts=3, first_error=False, mc_monotone=True))
    assert spent == 3 * (1 + 4 + 7) and [r["labels"] for r in mono] == [r["labels"] for r in full]
    soft = _rows(tok, [3])
    P.label_mc(MockPolicy(tok), tok, soft, P.Args(mc_rollouts=2, label_type="soft"))
    assert soft[0]["labels"] == [1.0] * 3 + [0.0] * 5
    for kw, want in (({}, 0.7), ({"rollout_temperature": 0.2}, 0.2)):  # the completer's own temperature
        gen = MockPolicy(tok)
        P.label_mc(gen, tok, _rows(tok, [3]), P.Args(mc_rollouts=2, temperature=0.7, **kw))
        assert gen.temperature == want


def test_omega_binary_search_spends_log_rollouts(tok):
    args = P.Args(mc_rollouts=4)
    rows = _rows(tok, [-1, 0, 3, 5, 7])
    gen = MockPolicy(tok)
    spent = P.label_omega(gen, tok, rows, args)
    for r, fb in zip(rows, [-1, 0, 3, 5, 7]):
        want = [True] * 8 if fb == -1 else [True] * fb + [False] * (8 - fb)
        assert r["labels"] == want
    assert spent == gen.calls == 4 * 3 * 4  # 4 wrong solutions x log2(8) rounds x K, versus 4 x 7 x K for mc


def test_active_selection_keeps_convincing_wrong_answers(monkeypatch):
    """Let's Verify 4.2: per problem, the select_wrong share of the picks are the wrong-answer samples the
    selector scores highest (product of step scores); the rest the highest of what remains."""
    class StepsAreScores:  # a verifier whose step scores are written in the steps
        def score(self, problems, steps):
            return [[float(x) for x in s] for s in steps]
    monkeypatch.setattr(P, "load_verifier", lambda path, **kw: StepsAreScores())
    row = lambda steps, ok: {"problem": "q", "steps": steps, "correct": ok}
    a = [row(["0.9", "0.9"], True), row(["0.5"], False), row(["0.95", "0.1"], False), row(["0.8"], False),
         row(["0.99"], True), row(["0.6"], False)]  # scores 0.81, 0.5, 0.095, 0.8, 0.99, 0.6
    b = [row(["0.3"], True), row(["0.2"], False)]  # one wrong answer only: the rest filled from what remains
    out = P.select_convincing([a, b], P.Args(select_prm="x", samples_per_problem=4, select_wrong=0.75))
    assert [r["steps"] for r in out[0]] == [["0.8"], ["0.6"], ["0.5"], ["0.99"]]
    assert [r["steps"] for r in out[1]] == [["0.2"], ["0.3"]]
    out = P.select_convincing([a], P.Args(select_prm="x", samples_per_problem=2, select_wrong=0.0))
    assert [r["steps"] for r in out[0]] == [["0.99"], ["0.9", "0.9"]]


def test_training_fits_small_data(tiny_model_dir, tmp_path):
    """8 solutions whose error is a visible marker: the PRM must fit them (loss falls, accuracy 1)."""
    rows = [{"prompt": f"q{i}", "completions": [f"a{i}", "oops" if i % 2 else f"b{i}"], "labels": [True, i % 2 == 0]}
            for i in range(8)]
    args = P.Args(out_dir=str(tmp_path), lr=3e-3, epochs=60, batch_tokens=4096, warmup_ratio=0.0, head="cls")
    dist = P.setup_dist()
    path = P.train("fit", str(tiny_model_dir), rows, args, dist, P.MetricsLog(tmp_path))
    losses = [json.loads(l)["train/fit/loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.1 * losses[0]
    v = P.load_verifier(str(path))  # the saved dir, read as search.py and eval.py read it
    scores = v.score([r["prompt"] for r in rows], [r["completions"] for r in rows])
    assert all((s >= 0.5) == y for r, sc in zip(rows, scores) for s, y in zip(sc, r["labels"]))
    from transformers import AutoModelForTokenClassification
    assert AutoModelForTokenClassification.from_pretrained(path).config.num_labels == 2
    meta = json.loads((path / "verifier.json").read_text())
    assert meta["kind"] == "prm" and meta["head"] == "cls" and v.score(["q1"], [["a1", "oops"]])[0][1] < 0.5


def test_bad_settings_fail_before_sampling(tiny_toy_dir, tmp_path):
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "verifier.json").write_text("{}")
    for kw in ({"init": str(tmp_path / "nope")}, {"select_prm": str(tmp_path)},
               {"select_prm": str(tmp_path / "sel"), "select_from": 1, "samples_per_problem": 2},
               {"select_prm": str(tmp_path / "sel"), "select_wrong": 1.5}):
        with pytest.raises(ValueError):
            P.main(P.Args(toy_dir=str(tiny_toy_dir), out_dir=str(tmp_path / "out"), **kw))
    assert not (tmp_path / "out" / "solutions.jsonl").exists()


def _run(args, timeout=900, torchrun=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable])
    r = subprocess.run(cmd + ["prm_train.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_end_to_end_toy(tiny_toy_dir, tmp_path):
    out = tmp_path / "prm"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--n_problems", "6", "--samples_per_problem", "2",
          "--mc_rollouts", "2", "--max_new_tokens", "40", "--n_eval_problems", "8", "--epochs", "1",
          "--labels", "mc", "--baselines", "outcome,exact", "--init", str(tiny_toy_dir / "policy")])
    ev = json.loads((out / "eval.json").read_text())
    for k in ("toy_processbench_f1", "step_acc", "mc_label_agreement", "outcome_f1", "exact_label_f1",
              "rollouts_per_solution/mc"):
        assert ev[k] is not None, k
    assert 0 <= ev["toy_processbench_f1"] <= 1
    by_kind = ev["eval/mc"]["by_first_error"]  # every eval sample counted once, hits never above counts
    assert sum(v["n"] for v in by_kind.values()) == 8 and all(0 <= v["found"] <= v["n"] for v in by_kind.values())
    for name in ("mc", "outcome", "exact"):
        assert (out / name / "verifier.json").exists()
    logs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs and all(v == v and abs(v) < 1e6 for row in logs for k, v in row.items() if k.endswith("loss"))
    sel = tmp_path / "sel"  # active learning: 2 of 4 samples per problem, picked by the PRM just trained;
    # the PRM starts from the outcome PRM above (--init) and, with lr 0, must end with its weights
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(sel), "--n_problems", "3", "--select_prm", str(out / "mc"),
          "--select_from", "4", "--samples_per_problem", "2", "--labels", "outcome", "--baselines", "",
          "--max_new_tokens", "40", "--n_eval_problems", "8", "--epochs", "1", "--init", str(out / "outcome"), "--lr", "0"])
    from safetensors.torch import load_file
    a, b, policy = (load_file(d / "model.safetensors") for d in (out / "outcome", sel / "outcome", tiny_toy_dir / "policy"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], policy[k]) for k in a if k in policy)  # the init is not the policy
    rows = read_jsonl(sel / "solutions.jsonl")
    by_problem = {}
    for r in rows:
        by_problem.setdefault(r["problem"], []).append(r)
    assert len(by_problem) <= 3 and all(len(g) <= 2 for g in by_problem.values())
    for g in by_problem.values():  # wrong-answer picks first, most convincing first
        wrong = [r["select_score"] for r in g if not r["correct"]]
        assert wrong == sorted(wrong, reverse=True) and [r["correct"] for r in g] == sorted(r["correct"] for r in g)
    assert (sel / "outcome" / "verifier.json").exists()


def test_real_formats_smoke(tiny_model_dir, tmp_path):
    """A few steps on PRM800K and on ProcessBench-derived rows, evaluated on ProcessBench rows."""
    prm800k = [from_prm800k(r) for r in read_jsonl(DATA_DIR / "prm800k_sample.jsonl")[:8]]
    pb = read_jsonl(DATA_DIR / "processbench_gsm8k.jsonl")[:16]
    write_jsonl(tmp_path / "prm800k.jsonl", [r for r in prm800k if r["completions"]])
    write_jsonl(tmp_path / "pb_train.jsonl", [from_processbench(r) for r in pb[:8]])
    write_jsonl(tmp_path / "pb_eval.jsonl", pb[8:])
    for labels, head in (("prm800k.jsonl", "lm2"), ("pb_train.jsonl", "cls")):
        out = tmp_path / f"run_{head}"
        _run(["--model", str(tiny_model_dir), "--labels", str(tmp_path / labels), "--head", head, "--out_dir", str(out),
              "--eval_data", str(tmp_path / "pb_eval.jsonl"), "--max_steps", "2", "--batch_tokens", "4096",
              "--max_len", "512"])
        ev = json.loads((out / "eval.json").read_text())
        assert 0 <= ev["processbench_f1"] <= 1


def toy_stepwise(n: int, seed: int = 0) -> list[dict]:
    """Toy solutions with error modes, labelled by the exact checker (stepwise rows)."""
    import random
    from utils import toy
    rng, rows = random.Random(seed), []
    for _ in range(n):
        p = toy.make_problem(rng, rng.randint(1, 3))
        steps = toy.solve(p, rng, {"misread": 0.5, "slip": 0.3})
        c = toy.check_steps(p["problem"], steps, p["answer"])
        rows.append({"prompt": p["problem"], "completions": steps, "labels": c.step_correct})
    return rows


def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    rows = toy_stepwise(8)
    write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "ddp"
    _run(["--model", str(tiny_model_dir), "--labels", str(tmp_path / "train.jsonl"), "--out_dir", str(out),
          "--max_steps", "2", "--batch_tokens", "2048", "--max_len", "512"], torchrun=True)
    assert (out / "train" / "verifier.json").exists()
