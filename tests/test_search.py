"""search.py: the paired interval, beam/DVTS mechanics on a mock policy with an oracle, and end-to-end runs
on the toy world (aggregation, selection and verifier scoring: test_verifiers.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import search as S
from utils.generation import Sample

ROOT = Path(__file__).resolve().parent.parent


def test_paired_interval():
    a, b = [1.0] * 60 + [0.0] * 40, [1.0] * 50 + [0.0] * 50  # a is right on 10 more of 100 problems
    d, lo, hi = S.paired_interval(a, b)
    assert abs(d - 0.1) < 1e-12 and 0 < lo < 0.1 < hi < 0.2
    assert S.paired_interval(a, a) == (0.0, 0.0, 0.0)
    c, e = [1.0] * 10 + [0.0] * 10, [0.0] * 10 + [1.0] * 10  # as many wins as losses: the interval spans 0
    d, lo, hi = S.paired_interval(c, e)
    assert d == 0 and lo < -0.2 and hi > 0.2


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


class StepOracle:
    """A verifier that knows the mock policy's good and bad steps."""
    tokens = 0

    def score(self, problems, steps_lists):
        return [[0.0 if "bad" in s or "{3}" in s else 1.0 for s in steps] for steps in steps_lists]

    def score_shared(self, problems, steps_lists, shared):
        return self.score(problems, steps_lists)


@pytest.mark.parametrize("diverse", [False, True])
def test_beam_and_dvts_find_the_good_path_with_an_oracle(tiny_model_dir, diverse):
    """With N=16, M=4 and an oracle, search nearly always finds an all-good path (P = 1/8 per sample),
    far more often than one sample does."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gen = StepPolicy(tok)
    args = S.Args(max_depth=6, agg="min", max_new_tokens=50)
    prompts = [tok.encode(f"Q{i}:", add_special_tokens=False) for i in range(20)]
    ledger = {"calls": 0, "tokens": 0}
    pool = S.beam_search(gen, ["q"] * 20, prompts, 16, 4, StepOracle(), args, ledger, diverse=diverse)
    wins = 0
    for i, done in pool.items():
        assert done and all(b.done for b in done)
        best = max(done, key=lambda b: b.score)
        wins += "\\boxed{7}" in tok.decode(best.ids[len(prompts[i]):])
    assert wins >= 17
    assert ledger["tokens"] > 0 and ledger["calls"] >= 4  # one batched call per depth for all problems


def test_end_to_end_toy(tiny_toy_dir, tmp_path):
    """Train two tiny PRMs with prm_train.py, then run every strategy; results.json holds the contract."""
    prm_out = tmp_path / "prm"
    r = subprocess.run([sys.executable, "prm_train.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(prm_out),
                        "--n_problems", "4", "--samples_per_problem", "2", "--mc_rollouts", "2", "--max_new_tokens", "40",
                        "--n_eval_problems", "4", "--epochs", "1", "--labels", "mc", "--baselines", "outcome",
                        "--init", str(tiny_toy_dir / "policy")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "search"
    r = subprocess.run([sys.executable, "search.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out),
                        "--verifiers", f"prm={prm_out / 'mc'},orm={prm_out / 'outcome'},oracle", "--n_problems", "3",
                        "--ns", "1,4,8", "--search_ns", "4,8", "--max_depth", "2", "--max_new_tokens", "30"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = ["maj"] + [f"{v}/{m}" for v in ("prm", "orm", "oracle") for m in ("bon", "weighted")]
    for m in rows:
        for n in (1, 4, 8):
            assert 0 <= res[f"{m}@{n}"] <= 1 and res[f"tokens/{m}@{n}"] >= 0
    for v in ("prm", "orm", "oracle"):  # every verifier guides beam search and DVTS at every search N
        for m in ("beam", "dvts"):
            assert 0 <= res[f"{v}/{m}@4"] <= 1 and res[f"tokens/{v}/{m}@8"] > 0
    for k in ("prm/weighted@4", "orm/bon@8", "prm/beam@4", "oracle/dvts@8"):
        d, lo, hi = res[f"vs_maj/{k}"]
        assert lo - 1e-9 <= d <= hi + 1e-9 and d == pytest.approx(res[k] - res[f"maj@{k.split('@')[1]}"])
    table = (out / "scaling.md").read_text()
    assert table.count("| maj |") == 2 and "paired-bootstrap" in table and "| oracle/beam |" in table
    assert res["n_too_long"] == 0 and res["verifier_tokens/prm"] > 0
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
                        "--verifiers", f"prm={prm_out / 'mc'}", "--n_problems", "2", "--methods", "maj,beam",
                        "--ns", "4", "--search_ns", "4", "--max_depth", "2", "--max_new_tokens", "30", "--cache_check", "4",
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


def test_bad_settings_fail_before_any_generation(tmp_path):
    """An unknown method, aggregation or budget is one line and exit 2 before a model or a toy world loads."""
    for args, want in ((["--methods", "maj,bogus"], "--methods: unknown ['bogus']"),
                       (["--agg", "median"], "unknown aggregation 'median'"),
                       (["--ns", "1,x"], "--ns '1,x': expected a comma list"),
                       (["--search_ns", "0"], "--search_ns '0': expected budgets >= 1")):
        r = subprocess.run([sys.executable, "search.py", "--model", str(tmp_path / "no_model"), "--out_dir",
                            str(tmp_path / "o")] + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1500:])
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "search.py", "--model", str(tmp_path / "no_model"), "--out_dir", str(tmp_path / "o"),
                        "--verifiers", "prm=shipped:prm"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "shipped:* are the toy world's verifiers" in r.stderr, r.stderr[-1500:]


def test_torchrun_shards_problems_and_rank0_merges(tiny_toy_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "search.py", "--toy_dir",
           str(tiny_toy_dir), "--out_dir", str(out), "--verifiers", "oracle", "--n_problems", "5", "--ns", "1,2",
           "--search_ns", "2", "--beam_width", "2", "--max_depth", "1", "--max_new_tokens", "20", "--backend", "hf"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and all(0 <= res[k] <= 1 for k in ("maj@2", "oracle/bon@2", "oracle/beam@2"))
    rows = [json.loads(l) for l in (out / "problems.jsonl").read_text().splitlines()]
    want = [json.loads(l)["problem"] for l in (tiny_toy_dir / "test.jsonl").read_text().splitlines()[:5]]
    assert [r["problem"] for r in rows] == want and all(len(r["completions"]) == 2 for r in rows)
    d, lo, hi = res["vs_maj/oracle/bon@2"]
    assert d == pytest.approx(res["oracle/bon@2"] - res["maj@2"]) and lo - 1e-9 <= d <= hi + 1e-9
