"""pav.py: the pass@K prover values, progress, effective reward, RLOO weights by hand; A^mu on a synthetic
Bernoulli tree against its exact value; the pav verifier kind; end to end on the tiny toy."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pav
from utils.data import cut_steps, step_spans
from utils.verifiers import PAVVerifier, ValueHeadLM, auc, load_verifier

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_k_by_hand():
    assert pav.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pav.pass_at_k(4, 0, 2) == 0.0 and pav.pass_at_k(4, 4, 2) == 1.0
    assert pav.pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a right one
    assert pav.pass_at_k(16, 5, 1) == pytest.approx(5 / 16)  # K = 1 is Q^pi itself
    assert pav.pass_at_k(8, 2, 4) == pytest.approx(1 - math.comb(6, 4) / math.comb(8, 4))  # 1 - 15/70
    with pytest.raises(ValueError, match="mc_rollouts"):
        pav.pass_at_k(2, 1, 4)


def test_prefix_targets_progress_and_effective_reward_by_hand():
    t = pav.prefix_targets([2, 3], 4, 1.0, [1, 2])
    assert t["q_pi"] == pytest.approx([0.5, 0.75, 1.0]) and t["q_mu@1"] == pytest.approx(t["q_pi"])
    assert t["q_mu@2"] == pytest.approx([1 - 1 / 6, 1.0, 1.0])  # C(2,2)/C(4,2) = 1/6; n - c = 1 < 2
    assert pav.progress(t["q_mu@2"]) == pytest.approx([1 / 6, 0.0])
    # Q^pi_h + 0.5 * A^mu_h: 0.75 + 0.5/6, 1.0 + 0
    assert pav.effective_reward(t["q_pi"], t["q_mu@2"], 0.5) == pytest.approx([0.75 + 0.5 / 6, 1.0])
    assert pav.effective_reward(t["q_pi"], t["q_mu@2"], 0.0) == pytest.approx(t["q_pi"][1:])  # alpha 0: the Q^pi beam
    t0 = pav.prefix_targets([0], 4, 0.0, [4])  # a wrong one-step solution from a hopeless question
    assert t0["q_mu@4"] == [0.0, 0.0]


def test_rloo_and_step_weights_by_hand():
    assert pav.rloo([1, 0, 0, 1], 4) == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert pav.rloo([1, 1, 0, 1, 0, 0], 3) == pytest.approx([0.5, 0.5, -1.0, 1.0, -0.5, -0.5])
    # tokens of steps 0, 0, 1, 1, 1: 0.5 + 3 * 0.1 and 0.5 + 3 * (-0.2)
    assert pav.step_weights([0, 0, 1, 1, 1], 0.5, [0.1, -0.2], 3.0) == pytest.approx([0.8, 0.8, -0.1, -0.1, -0.1])
    assert pav.step_weights([0, 1], 0.5, [], 3.0) == [0.5, 0.5]  # no steps scored: the outcome advantage
    assert pav._token_steps(5, [2, 5]) == [0, 0, 1, 1, 1]


def test_last_step_uses_the_outcome():
    # prover values of prefixes 0, 1 (H = 2); Q^mu_H is the outcome, not the PAV's prediction
    assert pav.process_terms([0.4, 0.7], 1.0) == pytest.approx([0.3, 0.3])
    assert pav.process_terms([0.4, 0.7], 0.0) == pytest.approx([0.3, -0.7])
    assert pav.process_terms([0.5], 0.0) == pytest.approx([-0.5])  # a one-step solution


def test_exact_values_and_their_process_terms_by_hand():
    # 3 steps, the second (index 1) the first wrong one: prefixes 0, 1 are right (1), prefix 2 holds the error (0);
    # A = progress([1, 1, 0] + [outcome 0]) = [0, -1, 0]: -1 on the wrong step alone, nothing summed over others
    assert pav.exact_values(1, 3) == [1.0, 1.0, 0.0]
    assert pav.process_terms(pav.exact_values(1, 3), 0.0) == [0.0, -1.0, 0.0]
    assert pav.process_terms(pav.exact_values(0, 2), 0.0) == [-1.0, 0.0]  # wrong from the first step
    assert pav.process_terms(pav.exact_values(-1, 3), 1.0) == [0.0, 0.0, 0.0]  # right throughout: no process term
    assert pav.process_terms(pav.exact_values(-1, 2), 0.0) == [0.0, -1.0]  # steps pass, answer wrong: the last step
    # with the leave-one-out step baseline (k = 2) and alpha_rl 1, the tokens' weights of a wrong sample (error at
    # step 1 of 2) against a right one: outcome RLOO -1 / +1; A - baseline [0 - 0, -1 - 0] and [0 - 0, 0 + 1]
    a = pav.loo_step_baseline([[0.0, -1.0], [0.0, 0.0]], 2)
    assert a == [[0.0, -1.0], [0.0, 1.0]]
    assert pav.step_weights([0, 0, 1, 1], -1.0, a[0], 1.0) == [-1.0, -1.0, -2.0, -2.0]
    assert pav.step_weights([0, 1], 1.0, a[1], 1.0) == [1.0, 2.0]


def test_share_of_gain_by_hand():
    out = [(0, 0.40), (64, 0.44), (128, 0.46), (192, 0.48)]
    exact = [(0, 0.40), (64, 0.48), (128, 0.52), (192, 0.56)]  # gain 8 points; reaches 0.48 at 64 (saves 128)
    half = [(0, 0.40), (64, 0.45), (128, 0.48), (192, 0.52)]  # gain 4 points; reaches 0.48 at 128 (saves 64)
    assert pav.share_of_gain(half, exact, out) == (pytest.approx(0.5), pytest.approx(0.5))
    assert pav.share_of_gain(out, exact, out) == (pytest.approx(0.0), pytest.approx(0.0))  # reached at the end only
    assert pav.share_of_gain(half, out, out) == (None, None)  # a control without gain has nothing to share


def test_exact_scorer_ranks_by_the_checker(tmp_path):
    from utils.toy import build_char_tokenizer
    tok = build_char_tokenizer(tmp_path)
    problem = {"problem": "Dan has 10 stickers. Dan gives away 6. Dan's bag weighs 3 pounds. Dan loses half of them. "
                          "How many stickers does Dan have now?", "answer": "2"}
    prompts = [[1, 2]]
    score = pav.exact_scorer([problem], prompts, 0.5, tok)
    good, bad = "Dan gives away 6, so 10 - 6 = 4.", "Dan gives away 6, so 10 - 6 = 5."
    parent = [1, 2]
    cands = [(0, parent, parent + [3], [good], False), (0, parent, parent + [4], [bad], False)]
    # right so far: 1 + 0.5 * (1 - 1); wrong at this step: 0 + 0.5 * (0 - 1)
    assert score(cands) == [(1.0, 1.0), (-0.5, 0.0)]
    child = parent + [3]  # a wrong step after a right parent, then a finished right solution (its outcome)
    fin = child + tok.encode("\n\nThe answer is \\boxed{2}.", add_special_tokens=False)
    assert score([(0, child, child + [5], [good, "Losing half leaves 4 / 2 = 3."], False),
                  (0, child, fin, [good, "The answer is \\boxed{2}."], True)]) == [(-0.5, 0.0), (1.0, 1.0)]


def test_loo_step_baseline_by_hand():
    # one prompt, k = 3: sample 0 has steps (a, b), sample 1 (c), sample 2 (d, e, f)
    a = [[0.2, -0.4], [0.6], [0.1, 0.3, -0.2]]
    out = pav.loo_step_baseline(a, 3)
    assert out[0] == pytest.approx([0.2 - (0.6 + 0.1) / 2, -0.4 - 0.3])  # step 1: only sample 2 has one
    assert out[1] == pytest.approx([0.6 - (0.2 + 0.1) / 2])
    # step 2 of sample 2: no other sample has a step 2, so the mean of all their steps
    assert out[2] == pytest.approx([0.1 - 0.4, 0.3 - (-0.4), -0.2 - (0.2 - 0.4 + 0.6) / 3])
    c = 0.24  # a constant added to every step cancels exactly
    shifted = pav.loo_step_baseline([[x + c for x in r] for r in a], 3)
    assert all(s == pytest.approx(o) for s, o in zip(shifted, out))
    assert pav.loo_step_baseline([[0.5], [0.5]], 2) == [[0.0], [0.0]]


def _expected_grad(weight_of, kind):
    """The exact expected gradient of a one-parameter policy: the first token picks a 2-token sequence
    (prob sigmoid(theta)) or a 4-token one; the other tokens are certain. weight_of(T) gives its tokens' weight."""
    theta = torch.tensor(0.3, requires_grad=True)
    p = torch.sigmoid(theta)
    total = 0.0
    for prob, T in ((p, 2), (1 - p, 4)):
        lp = torch.zeros(1, 4)
        lp[0, 0] = torch.log(prob)
        mask = torch.tensor([[1.0] * T + [0.0] * (4 - T)])
        w = torch.full((1, 4), weight_of(T))
        total = total + prob.detach() * pav.seq_reduce(-w * lp, mask, kind, 4.0)
    total.backward()
    return theta.grad.item()


def test_process_baseline_has_zero_expected_gradient():
    c = 0.24
    # a constant on every token: no gradient under the sequence-sum loss (Eq. 5), a lean under the token mean
    assert _expected_grad(lambda T: c, "sum") == pytest.approx(0.0, abs=1e-7)
    p = torch.sigmoid(torch.tensor(0.3)).item()
    lean = -c * p * (1 - p) * (1 / 2 - 1 / 4)  # d/dtheta of -c (p/2 + (1-p)/4): toward the short sequence
    assert _expected_grad(lambda T: c, "token_mean") == pytest.approx(lean) and lean < 0
    # the old batch-mean centring: two samples' A^mu of 2 and 4 steps all equal to c, minus their mean
    # (c), is zero; but A^mu = 0 everywhere minus a batch mean m leaves -m on every token of both: biased
    # unless the loss is a sum. The leave-one-out baseline removes the constant whatever the loss.
    a = [[c, c], [c, c, c, c]]
    assert pav.loo_step_baseline(a, 2) == [[0.0, 0.0], [0.0] * 4]
    w = [pav.step_weights(list(range(len(x))), 0.0, b, 3.0) for x, b in zip(a, pav.loo_step_baseline(a, 2))]
    assert w == [[0.0, 0.0], [0.0] * 4]


def test_kl_k3_and_seq_reduce_by_hand():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    assert pav.kl_k3(lp, ref)[0].tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert pav.seq_reduce(x, mask, "sum", 10.0).item() == pytest.approx((3 / 10 + 15 / 10) / 2)
    assert pav.seq_reduce(x, mask, "token_mean", 10.0).item() == pytest.approx((3 / 2 + 15 / 3) / 2)


def test_per_state_diagnostics_by_hand():
    states = [([0.5, -0.5], [0.2, -0.2]), ([0.1, 0.1, 0.1], [0.0, 0.3, -0.3]), ([], [])]
    d, a = pav.per_state(states)
    assert d == pytest.approx((0.25 + 0.0) / 2)  # the empty state is left out
    assert a == pytest.approx(((0.1 + 0.1) / 2 + (0.0 + 0.03 - 0.03) / 3) / 2)


class _Gen:
    """A generator stub: every rollout of prefix ids ending in 7 is right ("\\boxed{1}"), else wrong."""
    def sample(self, prompts, n, **kw):
        from utils.generation import Sample
        return [[Sample([5], "\\boxed{1}" if p[-1] == 7 else "\\boxed{2}", None, "eos") for _ in range(n)] for p in prompts]


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def test_mc_values_estimate_and_cache():
    args = pav.Args(max_new_tokens=8)
    mc = pav.MCValues(_Gen(), _Tok(), 4, [1, 4, 8], args)
    assert mc.ks == [1, 4]  # K > m cannot be estimated
    v = mc.values([[1, 7], [1, 3], [1, 7]], [1, 1, 1], ["1", "1", "1"])
    assert v[0] == {"q_pi": 1.0, "q_mu@1": 1.0, "q_mu@4": 1.0} and v[1]["q_pi"] == 0.0 and v[1]["q_mu@4"] == 0.0
    assert mc.ledger["samples"] == 8  # two distinct prefixes x 4 rollouts
    mc.values([[1, 7]], [1], ["1"])
    assert mc.ledger["samples"] == 8  # cached
    assert mc.heads(1) == pytest.approx({"q_pi": 0.25, "q_mu@1": 0.25, "q_mu@4": 1.0})


def test_diagnostics_and_samples_to_reach():
    assert pav.distinguishability([1.0, -1.0]) == pytest.approx(1.0)
    assert pav.alignment([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pav.alignment([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(pav.alignment([0.0, 0.0], [1.0, 2.0]))
    assert pav.samples_to_reach([(64, 0.40), (128, 0.45), (192, 0.50)], 0.45) == 128
    assert pav.samples_to_reach([(64, 0.40)], 0.45) is None


def test_estimated_advantage_matches_exact_on_a_bernoulli_tree():
    """From the question, pi's first step is good (p 0.6: then each rollout is right with 0.7) or bad (right with
    0.1). Exact: V^pi(q) = 0.46; Q^BoK = 1 - (1 - Q^pi)^K; A^mu(good) = 0.54^K - 0.3^K. The estimate: m = 16
    MC rollouts per prefix through pass_at_k, as pav.collect does, averaged over replicates."""
    rng, m, K, reps = np.random.default_rng(0), 16, 4, 4000
    exact_good = (1 - 0.3 ** K) - (1 - 0.54 ** K)
    exact_bad = (1 - 0.9 ** K) - (1 - 0.54 ** K)
    est_good, est_bad = [], []
    for _ in range(reps):
        first = rng.random(m) < 0.6  # rollouts from the question: first step, then the outcome
        c0 = int((rng.random(m) < np.where(first, 0.7, 0.1)).sum())
        c_good, c_bad = int((rng.random(m) < 0.7).sum()), int((rng.random(m) < 0.1).sum())
        est_good.append(pav.progress([pav.pass_at_k(m, c0, K), pav.pass_at_k(m, c_good, K)])[0])
        est_bad.append(pav.progress([pav.pass_at_k(m, c0, K), pav.pass_at_k(m, c_bad, K)])[0])
    assert np.mean(est_good) == pytest.approx(exact_good, abs=0.01)
    assert np.mean(est_bad) == pytest.approx(exact_bad, abs=0.01)
    assert exact_bad < 0 < exact_good


def test_steps_of_tokens(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("1 + 2 = 3.\n\nThe answer is 3.", add_special_tokens=False)
    of = cut_steps(tok, ids)
    assert of[: len("1 + 2 = 3.\n\n")] == [0] * len("1 + 2 = 3.\n\n") and set(of[len("1 + 2 = 3.\n\n"):]) == {1}
    steps, ends = step_spans(tok, ids)
    assert steps == ["1 + 2 = 3.", "The answer is 3."] and ends == [len("1 + 2 = 3.\n\n"), len(ids)]


def test_pav_verifier_kind(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    m = ValueHeadLM(AutoModelForCausalLM.from_pretrained(tiny_model_dir), outputs=3)
    torch.nn.init.normal_(m.head.weight, std=0.5)
    m.save(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    heads = ["q_pi", "q_mu@1", "q_mu@4"]
    (tmp_path / "verifier.json").write_text(json.dumps({"kind": "pav", "heads": heads, "prover_k": 4, "alpha": 0.5,
                                                        "step_tag": "\n\n"}))
    v = load_verifier(str(tmp_path), device="cpu")
    assert isinstance(v, PAVVerifier) and v.model.head.out_features == 3
    probs, steps = ["Ana has 3 coins."], [["3 + 1 = 4.", "The answer is \\boxed{4}."]]
    pv = v.prefix_values(probs, steps)[0]
    assert set(pv) == set(heads) and all(len(x) == 3 for x in pv.values())  # prefixes 0, 1, 2
    eff = v.effective(probs, steps)[0]
    want = [pv["q_pi"][h] + 0.5 * (pv["q_mu@4"][h] - pv["q_mu@4"][h - 1]) for h in (1, 2)]
    assert eff == pytest.approx(want)
    assert v.effective(probs, steps, alpha=0.0)[0] == pytest.approx(pv["q_pi"][1:])
    assert v.score(probs, steps)[0] == pytest.approx([(r + 0.5) / 2 for r in eff])
    assert all(0.0 <= s <= 1.0 for s in v.score(probs, steps)[0])
    v2 = load_verifier(str(tmp_path), device="cpu", alpha=2.0, prover_k=1)  # overrides verifier.json
    assert v2.effective(probs, steps)[0] == pytest.approx(
        [pv["q_pi"][h] + 2.0 * (pv["q_mu@1"][h] - pv["q_mu@1"][h - 1]) for h in (1, 2)])


def test_pav_end_to_end_tiny(tmp_path, tiny_toy_dir):
    out = tmp_path / "pav"
    cmd = [sys.executable, "pav.py", "--out_dir", str(out), "--model", str(tiny_toy_dir / "policy"),
           "--data", str(tiny_toy_dir / "train.jsonl"), "--eval_data", str(tiny_toy_dir / "test.jsonl"),
           "--backend", "hf", "--max_new_tokens", "60", "--n_problems", "12", "--n_cov", "1", "--mc_rollouts", "4",
           "--ks", "1,2,4", "--epochs", "2", "--lr", "1e-3", "--batch_tokens", "2048", "--max_len", "512",
           "--ns", "1,2,4", "--search_ns", "4", "--max_depth", "3", "--n_eval_problems", "6", "--rl_steps", "2",
           "--rl_prompts", "4", "--rl_eval_every", "1", "--rl_eval_samples", "2", "--rl_lr", "1e-3", "--seeds", "0,1",
           "--value_rollouts", "4", "--mc_search_ns", "4", "--sweep_states", "6", "--kl", "0.05"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    s = res
    for k in ("pav_beam@4", "qpi_beam@4", "orm_bon@4", "orm_bon@1", "maj@4"):
        assert 0.0 <= s[k] <= 1.0 and s[f"tokens/{k}"] > 0, k
    for k in ("rl/pav_final_acc", "rl/outcome_final_acc"):
        assert 0.0 <= res[k] <= 1.0
    assert "rl/sample_efficiency_ratio" in res and len(res["rl"]["pav_final_seeds"]) == 2
    # the Monte-Carlo control: beam and RL rows, its rollouts counted apart from the policy's
    assert 0.0 <= s["mc_beam@4"] <= 1.0 and s["tokens/mc_beam@4"] > 0 and s["tokens/mc_rollouts@4"] > 0
    assert "mc_vs_orm@4" in s and "mc_vs_pass@4" in s
    md = (out / "results.md").read_text().splitlines()  # each beam's line names its own comparisons only
    assert all("pass@" not in x for x in md if x.startswith("- pav_beam")) and any(x.startswith("- mc_beam") and "pass@" in x
                                                                                  for x in md)
    assert 0.0 <= res["rl_mc/final_acc"] <= 1.0 and "rl_mc/sample_efficiency_ratio" in res
    assert len(res["rl"]["mc_final_seeds"]) == 2 and res["rl_mc/mc_rollouts_per_run"] > 0
    mc_log = [json.loads(x) for x in (out / "rl" / "mc4_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all("train/kl" in x and x["train/kl"] >= 0 for x in mc_log if "train/loss" in x)
    assert [row["K"] for row in res["k_sweep"]] == [1, 2, 4]
    assert all({"distinguishability", "alignment", "rl_gain", "distinguishability_per_state", "alignment_per_state"}
               <= set(row) for row in res["k_sweep"])
    assert all(row["distinguishability_per_state"] >= 0 for row in res["k_sweep"])
    assert res["k_sweep"][0]["alignment"] == pytest.approx(1.0) or math.isnan(res["k_sweep"][0]["alignment"])
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["c"]) == len(r["steps"]) and r["m"] == 4 for r in rows)
    assert res["data"]["policy_samples"] == 12 + 4 * res["data_prefixes"]  # one seed each + n_mc per prefix
    losses = [json.loads(x)["train/loss"] for x in (out / "pav" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert losses and all(math.isfinite(x) for x in losses)
    v = load_verifier(str(out / "pav"), device="cpu")
    assert v.heads == ["q_pi", "q_mu@1", "q_mu@2", "q_mu@4"] and v.prover_k == 4
    assert len(v.score(["Ana has 3 coins. How many coins does Ana have now?"], [["3 + 0 = 3.", "x"]])[0]) == 2
    for d in ("outcome_seed0", "pav4_seed1", "pav1_seed0", "pav2_seed0"):
        assert (out / "rl" / d / "curve.json").exists(), d
    cfg = json.loads((out / "rl" / "pav4_seed0" / "curve.json").read_text())["config"]  # reused only with this PAV
    assert cfg["pav_sha256"] == pav.weights_sha256(out / "pav") and cfg["values"] == "learned"
    assert cfg["init_sha256"] == pav.weights_sha256(tiny_toy_dir / "policy")
    # a rerun reuses every stage: no sampling, same figures
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and "PAV training" not in r2.stderr and "RL outcome" not in r2.stderr
    assert json.loads((out / "results.json").read_text())["rl/pav_final_acc"] == res["rl/pav_final_acc"]


def test_rl_with_exact_values_runs_alone(tmp_path, tiny_toy_dir):
    """--stages rl --values exact: no data, no PAV; outcome-only and the exact control, the ratio and interval."""
    out = tmp_path / "exact"
    cmd = [sys.executable, "pav.py", "--out_dir", str(out), "--toy_dir", str(tiny_toy_dir), "--stages", "rl",
           "--values", "exact", "--max_new_tokens", "60", "--n_eval_problems", "6", "--rl_steps", "2", "--rl_prompts", "4",
           "--rl_eval_every", "1", "--rl_eval_samples", "2", "--seeds", "0,1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not (out / "data.jsonl").exists() and not (out / "pav").exists()
    assert 0.0 <= res["rl_exact/final_acc"] <= 1.0 and "rl_exact/sample_efficiency_ratio" in res
    d, lo, hi = res["rl_exact/exact_minus_outcome"]
    assert lo - 1e-9 <= d <= hi + 1e-9 and len(res["rl"]["exact_final_seeds"]) == 2
    assert "rl/pav_final_acc" not in res and "exact values" in (out / "results.md").read_text()
    log = [json.loads(x) for x in (out / "rl" / "exact_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["train/a_mu_mean"] <= 0 for x in log if "train/loss" in x)  # the oracle prover's A is 0 or -1
    # the checker is the toy's: a real model is refused before anything loads; PAV-RL without a PAV is one line
    r = subprocess.run([sys.executable, "pav.py", "--model", str(tmp_path / "none"), "--values", "exact",
                        "--out_dir", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--values exact needs the toy world's checker" in r.stderr
    r = subprocess.run([sys.executable, "pav.py", "--out_dir", str(out), "--toy_dir", str(tiny_toy_dir), "--stages",
                        "rl", "--values", "learned"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "data.jsonl" in r.stderr


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_pav_torchrun_two_ranks(tmp_path, tiny_toy_dir, shard):
    """2 ranks on CPU: data sharded and gathered (every problem once), PAV / ORM under DDP or FSDP2, search
    and RL sharded; the same keys as one process."""
    out = tmp_path / "pav"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "pav.py", "--out_dir", str(out),
           "--model", str(tiny_toy_dir / "policy"), "--data", str(tiny_toy_dir / "train.jsonl"),
           "--eval_data", str(tiny_toy_dir / "test.jsonl"), "--backend", "hf", "--max_new_tokens", "60",
           "--n_problems", "10", "--n_cov", "1", "--mc_rollouts", "4", "--ks", "1,4", "--epochs", "1", "--lr", "1e-3",
           "--batch_tokens", "1024", "--max_len", "512", "--ns", "1,4", "--search_ns", "4", "--mc_search_ns", "4",
           "--max_depth", "2", "--n_eval_problems", "5", "--rl_steps", "1", "--rl_prompts", "2", "--rl_eval_every", "1",
           "--rl_eval_samples", "2", "--seeds", "0", "--value_rollouts", "4", "--sweep_states", "4", "--shard", shard]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and len({x["problem"] for x in rows}) == 10
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["policy_samples"] == 10 + 4 * res["data_prefixes"]  # both ranks' samples counted
    for k in ("pav_beam@4", "mc_beam@4", "qpi_beam@4", "orm_bon@4", "rl/pav_final_acc", "rl_mc/final_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    assert (out / "pav" / "value_head.safetensors").exists() and load_verifier(str(out / "pav"), device="cpu").prover_k == 4
    assert [row["K"] for row in res["k_sweep"]] == [1, 4]


def test_auc_by_hand():
    assert auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auc([0.1, 0.8, 0.9], [1, 1, 0]) == 0.0
    assert auc([0.5, 0.2, 0.5, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)  # pairs: (.5,.2) 1, (.5,.5) .5, (.9,*) 2 of 4 = 3.5/4
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
