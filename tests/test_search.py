"""search.py: aggregation and selection by hand, beam/DVTS mechanics on a mock policy with an oracle,
and an end-to-end run on the toy world."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import search as S
from utils.generation import Sample

ROOT = Path(__file__).resolve().parent.parent


def test_aggregations_by_hand():
    s = [0.9, 0.5, 0.8]
    assert S.aggregate(s, "last") == 0.8 and S.aggregate(s, "min") == 0.5
    assert abs(S.aggregate(s, "prod") - 0.36) < 1e-12 and abs(S.aggregate(s, "mean") - 2.2 / 3) < 1e-12
    with pytest.raises(ValueError):
        S.aggregate(s, "max")


def test_paired_interval():
    a, b = [1.0] * 60 + [0.0] * 40, [1.0] * 50 + [0.0] * 50  # a is right on 10 more of 100 problems
    d, lo, hi = S.paired_interval(a, b)
    assert abs(d - 0.1) < 1e-12 and 0 < lo < 0.1 < hi < 0.2
    assert S.paired_interval(a, a) == (0.0, 0.0, 0.0)
    c, e = [1.0] * 10 + [0.0] * 10, [0.0] * 10 + [1.0] * 10  # as many wins as losses: the interval spans 0
    d, lo, hi = S.paired_interval(c, e)
    assert d == 0 and lo < -0.2 and hi > 0.2


def test_selection_rules():
    answers = ["3", "\\frac{6}{2}", "4", "4", "4", None]
    scores = [0.9, 0.8, 0.2, 0.3, 0.1, 0.99]
    g = S.AnswerGroups()
    assert S.majority(answers, g) == "4"  # 3 votes for 4, 2 for 3 (grouped by equivalence)
    assert S.best_of_n(answers, scores) == "3"  # highest score with an answer (None is skipped)
    assert S.weighted_vote(answers, scores, g) == "3"  # 1.7 for 3 vs 0.6 for 4
    assert S.majority([None, None], S.AnswerGroups()) is None


class StepPolicy:
    """Each step is 'good' or 'bad' at random; a solution has 3 steps and then the answer step.
    Its answer is right iff every step was good. Prefix ids carry the step texts (char tokenizer)."""

    def __init__(self, tok, seed=0):
        import random
        self.tok, self.rng, self.calls = tok, random.Random(seed), 0

    def _one(self, prefix, to_end):
        text = self.tok.decode(prefix)
        done_steps = text.count("step")
        out = ""
        while True:
            if done_steps >= 3:
                bad = "bad" in text + out
                out += f"The answer is \\boxed{{{3 if bad else 7}}}."
                return Sample(self.tok.encode(out, add_special_tokens=False) + [self.tok.eos_token_id], out, [], "eos")
            out += ("step good" if self.rng.random() < 0.5 else "step bad") + "\n\n"
            done_steps += 1
            if not to_end:
                return Sample(self.tok.encode(out, add_special_tokens=False), out, [], "stop")

    def sample(self, prompts, n=1, stop=None, **_):
        self.calls += 1
        return [[self._one(p, not stop) for _ in range(n)] for p in prompts]

    def step(self, prefixes, n=1, **kw):
        return self.sample(prefixes, n=n, stop=["\n\n"], **kw)


def step_oracle(problems, steps_lists, golds, shared=None):
    return [[0.0 if "bad" in s or "{3}" in s else 1.0 for s in steps] for steps in steps_lists]


@pytest.mark.parametrize("diverse", [False, True])
def test_beam_and_dvts_find_the_good_path_with_an_oracle(tiny_model_dir, diverse):
    """With N=16, M=4 and an oracle, search nearly always finds an all-good path (P = 1/8 per sample),
    far more often than one sample does."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gen = StepPolicy(tok)
    args = S.Args(max_depth=6, agg="min", max_tokens=50)
    prompts = [tok.encode(f"Q{i}:", add_special_tokens=False) for i in range(20)]
    ledger = {"calls": 0, "tokens": 0}
    pool = S.beam_search(gen, ["q"] * 20, prompts, ["7"] * 20, 16, 4, step_oracle, args, ledger, diverse=diverse)
    wins = 0
    for i, done in pool.items():
        assert done and all(b.done for b in done)
        best = max(done, key=lambda b: b.score)
        wins += "\\boxed{7}" in tok.decode(best.ids[len(prompts[i]):])
    assert wins >= 17
    assert ledger["tokens"] > 0 and ledger["calls"] >= 4  # one batched call per depth for all problems


@pytest.mark.parametrize("head", ["lm2", "cls"])
def test_shared_prefix_scoring_matches_full_scoring(tiny_model_dir, head):
    """Beam siblings scored with their parent's prefix run once (KV cache copied per child) get the
    scores of scoring each solution whole; ragged parents, ragged children and an empty child included."""
    from prm_train import build_prm, score_steps
    prm, tok = build_prm(str(tiny_model_dir), head, "+", "-")
    prm.eval()
    problems, steps, shared = [], [], []
    for p, parent, kids in [("Ann has 3 apples.", [], [["3 + 2 = 5"], ["3 * 2 = 6", "x"]]),
                            ("Bo has 12 pens and buys 4 more.", ["12 + 4 = 16", "then 16 - 1 = 15"],
                             [["ok"], ["The answer is \\boxed{15}."], [], ["a", "b", "c"]]),
                            ("Cy.", ["1"], [["2"]])]:
        for k in kids:
            problems.append(p), steps.append(parent + k), shared.append(len(parent))
    full = score_steps(prm, tok, problems, steps, "\n\n")
    for batch_tokens in (60, 10**6):  # one parent per chunk; all parents (ragged) in one chunk
        part = S.score_shared(prm, tok, problems, steps, shared, "\n\n", False, batch_tokens=batch_tokens)
        assert [len(x) for x in part] == [len(x) for x in steps]
        assert max(abs(a - b) for u, v in zip(full, part) for a, b in zip(u, v)) < 1e-5
    assert len({round(x, 6) for u in full for x in u}) > 3  # a random model: the scores differ


def test_end_to_end_toy(tiny_toy_dir, tmp_path):
    """Train two tiny PRMs with prm_train.py, then run every strategy; results.json holds the contract."""
    prm_out = tmp_path / "prm"
    r = subprocess.run([sys.executable, "prm_train.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(prm_out),
                        "--n_problems", "4", "--samples_per_problem", "2", "--rollouts", "2", "--max_new_tokens", "40",
                        "--eval_problems", "4", "--epochs", "1", "--baselines", "outcome"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "search"
    r = subprocess.run([sys.executable, "search.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out),
                        "--prm", str(prm_out / "mc"), "--orm", str(prm_out / "outcome"), "--n_problems", "3",
                        "--ns", "1,4,8", "--search_ns", "4,8", "--max_depth", "2", "--max_tokens", "30"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for m in ("maj", "bon", "weighted", "bon_orm", "weighted_oracle"):
        for n in (1, 4, 8):
            assert 0 <= res[f"{m}@{n}"] <= 1 and res[f"tokens/{m}@{n}"] >= 0
    for m in ("beam", "dvts"):
        assert 0 <= res[f"{m}@4"] <= 1 and res[f"tokens/{m}@8"] > 0
    for k in ("weighted@4", "bon_orm@8", "beam@4", "dvts@8"):
        d, lo, hi = res[f"vs_maj/{k}"]
        assert lo - 1e-9 <= d <= hi + 1e-9 and d == pytest.approx(res[k] - res[f"maj@{k.split('@')[1]}"])
    assert (out / "scaling.md").read_text().count("| maj |") == 1 and "paired-bootstrap" in (out / "scaling.md").read_text()
    rows = [json.loads(l) for l in (out / "problems.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(rows[0]["completions"]) == 8
    # --cache_check: beam search timed on vLLM with prefix caching on, then off (two engines)
    from utils.generation import vllm_available
    if not vllm_available():
        if os.environ.get("STEPWISE_REQUIRE_VLLM"):
            pytest.fail("STEPWISE_REQUIRE_VLLM is set but vllm is not importable")
        return
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, "search.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out),
                        "--prm", str(prm_out / "mc"), "--orm", str(prm_out / "outcome"), "--n_problems", "2", "--methods", "maj,beam",
                        "--ns", "4", "--search_ns", "4", "--max_depth", "2", "--max_tokens", "30", "--cache_check", "4",
                        "--cache_check_repeats", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    t = {k: res[f"cache_check/beam@4/{k}"] for k in ("seconds_caching_on", "seconds_caching_off",
                                                      "tokens_caching_on", "tokens_caching_off")}
    assert min(t.values()) > 0 and "prefix caching, beam@4 (median of 2 runs each)" in r.stdout
    assert res["cache_check/speedup"] == pytest.approx(t["seconds_caching_off"] / t["seconds_caching_on"])
    runs = res["cache_check/beam@4/all_seconds_caching_on"]  # two timed runs, the median reported
    assert len(runs) == 2 and t["seconds_caching_on"] == pytest.approx(sum(runs) / 2)
