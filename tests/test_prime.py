"""prime.py: the pure pieces by hand (step-0 invariants, RLOO returns, the return-to-go normalisation, PPO-clip,
the filter), then end-to-end runs on the tiny toy world: the output contract, the implicit verifier it saves,
a resume that continues exactly, a kill -9 mid-run, --compare, and torchrun with 2 processes on CPU."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prime as P

ROOT = Path(__file__).resolve().parent.parent


def test_step0_prm_equals_reference():
    """PRM = reference: every q_t is exactly 0, the PRM loss is ln 2 (PRIME's step-1 log: 0.691), and the
    process rewards add nothing to the advantages."""
    lp = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    q = P.process_rewards(lp, lp.clone(), mask)
    assert torch.equal(q, torch.zeros_like(q))
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert P.prm_loss(q, mask, outcome, 0.05).item() == pytest.approx(math.log(2), abs=1e-7)
    p = P.normalize_process_rewards(q, mask)
    assert torch.equal(p, torch.zeros_like(p))
    with_p, _ = P.rloo_returns(outcome, p, mask, 2)
    without, _ = P.rloo_returns(outcome, torch.zeros_like(p), mask, 2)
    assert torch.equal(with_p, without)


def test_outcome_rloo_and_whitening_by_hand():
    # k = 2: outcome [1, 0] -> leave-one-out 1 - 0 = +1 and 0 - 1 = -1 on each row's last token, gamma 1:
    # returns [1, 1, 0] and [-1, -1, -1]; whitening over the 5 valid tokens: mean -0.2, unbiased var 1.2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float)
    adv, ret = P.rloo_returns(torch.tensor([1.0, 0.0]), torch.zeros(2, 3), mask, 2)
    assert ret.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]
    s = math.sqrt(1.2 + 1e-8)
    want = [[1.2 / s, 1.2 / s, 0.0], [-0.8 / s, -0.8 / s, -0.8 / s]]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_process_rloo_in_the_codes_form_by_hand():
    # rows p0 = [0.2, 0.4], p1 = [0.6, 0.0]: token means 0.3, 0.3; baseline (0.3 + 0.3)/(k-1) = 0.6;
    # each token p * k/(k-1) - 0.6 -> [-0.2, 0.2], [0.6, -0.6]; returns (reverse cumsum) [0.0, 0.2], [0.0, -0.6]
    mask = torch.ones(2, 2)
    p = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    _, ret = P.rloo_returns(torch.zeros(2), p, mask, 2)  # outcome 0 for both: its leave-one-out term is 0
    assert torch.allclose(ret, torch.tensor([[0.0, 0.2], [0.0, -0.6]]), atol=1e-6)
    _, ret = P.rloo_returns(torch.zeros(2), p, mask, 2, gamma=0.5)  # discounted: r_0 + 0.5 r_1
    assert torch.allclose(ret[:, 0], torch.tensor([-0.2 + 0.1, 0.6 - 0.3]), atol=1e-6)


def test_each_source_discounted_on_its_own_by_hand():
    # k = 2, outcome [1, 0]: its leave-one-out +1 / -1 on the last token, gamma 1: [1, 1] and [-1, -1];
    # process rows p0 = [0.2, 0.4], p1 = [0.6, 0.0] -> the code's RLOO [-0.2, 0.2], [0.6, -0.6] (as above)
    mask, p, o = torch.ones(2, 2), torch.tensor([[0.2, 0.4], [0.6, 0.0]]), torch.tensor([1.0, 0.0])
    _, ret = P.rloo_returns(o, p, mask, 2, gamma=1.0, process_gamma=0.0)  # process: each token its own reward
    assert torch.allclose(ret, torch.tensor([[0.8, 1.2], [-0.4, -1.6]]), atol=1e-6)
    _, ret = P.rloo_returns(o, p, mask, 2, gamma=1.0)  # process_gamma defaults to gamma: both summed to go
    assert torch.allclose(ret, torch.tensor([[1.0, 1.2], [-1.0, -1.6]]), atol=1e-6)
    _, ret = P.rloo_returns(o, p, mask, 2, gamma=0.5, process_gamma=0.0)  # outcome [0.5, 1] / [-0.5, -1]
    assert torch.allclose(ret, torch.tensor([[0.3, 1.2], [0.1, -1.6]]), atol=1e-6)


def test_the_two_checker_controls_credit_by_hand():
    # k = 2, four tokens = two steps of two; sample 0 is wrong at step 2 (tokens 2, 3), sample 1 right; outcome 0 / 1
    mask, o = torch.ones(2, 4), torch.tensor([0.0, 1.0])
    # exact (oracle_step, process gamma 0): -1 on tokens 2, 3; normalised by the largest |return-to-go| 2 ->
    # -0.5 each; the code's RLOO: token means -0.25 / 0, baseline -0.25: [0.25, 0.25, -0.75, -0.75], [0.25] * 4;
    # plus the outcome's -1 / +1 on every token: the wrong step alone carries the extra credit
    q = torch.tensor([[0.0, 0.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    _, ret = P.rloo_returns(o, P.normalize_process_rewards(q, mask), mask, 2, process_gamma=0.0)
    assert torch.allclose(ret, torch.tensor([[-0.75, -0.75, -1.75, -1.75], [1.25] * 4]), atol=1e-6)
    # telescoping (oracle, process gamma 1): -1 on token 3 only; RLOO [0.25, 0.25, 0.25, -1.75], [0.25] * 4;
    # summed to go, the first (right) step's tokens get -1.0 / -1.25 of process return, nearly the wrong step's
    # -1.5 / -1.75
    q = torch.tensor([[0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    _, ret = P.rloo_returns(o, P.normalize_process_rewards(q, mask), mask, 2)
    assert torch.allclose(ret, torch.tensor([[-2.0, -2.25, -2.5, -2.75], [2.0, 1.75, 1.5, 1.25]]), atol=1e-6)


def test_return_to_go_normalisation_by_hand():
    q = torch.tensor([[1.0, -3.0, 1.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # return-to-go row 0: [-1, -2, 1], row 1: [0.5]; the largest |.| is 2
    assert torch.allclose(P.normalize_process_rewards(q, mask), q / (2 + 1e-6))


def test_ppo_clip_by_hand():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped = P.ppo_loss(torch.zeros(1, 2), old, adv, mask, 0.2)  # ratio 1: -mean(A) = 0
    assert loss.item() == pytest.approx(0.0) and clipped.item() == 0.0
    lp = torch.log(torch.tensor([[1.5, 1.5]]))  # ratio 1.5: min(1.5 A, 1.2 A) -> 1.2 for A = 1, -1.5 for A = -1
    loss, clipped = P.ppo_loss(lp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5) / 2) and clipped.item() == 1.0


def test_filter_and_pairwise_accuracy():
    acc = [1, 1, 1, 0] + [1, 1, 1, 1] + [0, 0, 0, 0] + [1, 0, 0, 0]
    assert P.group_filter(acc, 4, 0.2, 0.8) == [True, False, False, True]
    assert P.group_filter([1, 0, 0, 0, 0], 5, 0.2, 0.8) == [True]  # the bounds are inclusive
    assert P.pairwise_accuracy(torch.tensor([0.9, 0.1, 0.8, 0.7]), torch.tensor([1.0, 0.0, 0.0, 1.0]), 2) == 0.5  # 2nd pair misordered
    curve = [(10, 0.1), (20, 0.3), (30, 0.5)]
    assert P.rollouts_to_reach(curve, 0.3) == 20 and P.rollouts_to_reach(curve, 0.9) is None


def test_discounted_returns_do_not_underflow():
    # by hand, gamma 0.5: r = [1, 2, 4] -> R = [1 + 0.5 * 4, 2 + 0.5 * 4, 4] = [3, 4, 4]
    assert P.discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.5).tolist() == [[3.0, 4.0, 4.0]]
    # a 3,072-token response at gamma 0.95: 0.95^3071 underflows float32, so dividing by gamma^t gave NaN
    T, mask = 3072, torch.ones(2, 3072)
    adv, ret = P.rloo_returns(torch.tensor([1.0, 0.0]), torch.zeros(2, T), mask, 2, gamma=0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert ret[0, -1].item() == 1.0 and ret[0, -2].item() == pytest.approx(0.95)  # the outcome's +1, one token back
    assert ret[1, 0].item() == pytest.approx(-(0.95 ** 3071), abs=1e-30)


def test_process_return_abs_by_hand():
    # rows p0 = [1, 2, (pad)], p1 = [3, 0, 0]: returns-to-go [3, 2], [3, 0, 0]; mean |.| over the 5 valid tokens
    # is 8 / 5 = 1.6 (flipping the rewards but not the mask gave (2 + 3) / 5 = 1.0)
    p = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert P.process_return_abs(p, mask) == pytest.approx(1.6)


def test_pairwise_accuracy_as_the_code_counts_ties():
    o = torch.tensor([0.0, 1.0])
    # a tie is a hit when the wrong sample comes first ((s0 > s1) == (o0 > o1): False == False), else a miss
    assert P.pairwise_accuracy(torch.tensor([0.5, 0.5]), o, 2) == 1.0
    assert P.pairwise_accuracy(torch.tensor([0.5, 0.5]), o.flip(0), 2) == 0.0
    assert P.pairwise_accuracy(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 1.0]), 2) == 0.5  # no mixed pair: 0.5
    # the mean over groups, not over pairs: group 1 (1 right, 3 wrong) 2 of 3 pairs right, group 2 (2 / 2) 4 of 4
    s = torch.tensor([0.9, 0.5, 0.95, 0.1, 0.8, 0.7, 0.2, 0.1])
    o = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert P.pairwise_accuracy(s, o, 4) == pytest.approx((2 / 3 + 1.0) / 2)


def test_oracle_rewards_mark_the_first_wrong_step(tmp_path):
    from utils.toy import build_char_tokenizer
    tok = build_char_tokenizer(tmp_path)
    problem = ("Dan has 10 stickers. Dan gives away 6. Dan's bag weighs 3 pounds. Dan loses half of them. "
               "How many stickers does Dan have now?")
    right = ["Dan gives away 6, so 10 - 6 = 4.", "Losing half leaves 4 / 2 = 2.", "The answer is \\boxed{2}."]
    ids = tok.encode("\n\n".join(right), add_special_tokens=False)
    assert P.oracle_rewards(problem, ids, tok) == [0.0] * len(ids)  # every step right: no process reward
    wrong = [right[0], "Losing half leaves 4 / 2 = 3.", "The answer is \\boxed{3}."]  # step 2 is the first wrong one
    ids = tok.encode("\n\n".join(wrong), add_special_tokens=False)
    r = P.oracle_rewards(problem, ids, tok)
    end = len(tok.encode("\n\n".join(wrong[:2]) + "\n\n", add_special_tokens=False))  # step 2 with its separator
    assert len(r) == len(ids) and sum(r) == -1.0 and r[end - 1] == -1.0
    start = len(tok.encode("\n\n".join(wrong[:1]) + "\n\n", add_special_tokens=False))  # step 2's first token
    r = P.oracle_rewards(problem, ids, tok, every_token=True)  # -1 on every token of step 2, its separator too
    assert r == [0.0] * start + [-1.0] * (end - start) + [0.0] * (len(ids) - end)


class _FakeGen:
    """Rollouts graded by a table: problem -> K answers; records which problems it was asked for."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def sample(self, prompts, n, **_):
        from utils.generation import Sample
        out = []
        for pr in prompts:
            q = next(q for q in self.answers if pr == _enc(q))
            self.asked.append(q)
            out.append([Sample([1], f"\\boxed{{{a}}}", None, "eos") for a in self.answers[q][:n]])
        return out


def _enc(q):
    from utils.data import build_prompt
    return [ord(c) for c in build_prompt(q)]


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_surplus_prompts_are_carried_and_filtered_again():
    """The code's buffer: the passing prompts beyond the batch wait as prompts, then are sampled again with the
    current policy (first, before the fresh ones) and filtered again; no old response is trained on."""
    from dataclasses import replace as dc_replace
    from utils.train import Dist
    probs = [{"problem": f"p{i}", "answer": "1"} for i in range(6)]
    half = ["1", "1", "0", "0"]  # accuracy 0.5: passes the [0.2, 0.8] filter
    gen = _FakeGen({f"p{i}": half for i in range(6)})
    args = dc_replace(P.Args(), prompts_per_step=2, k=4, max_new_tokens=8)
    cursor, buffer = {"epoch": 0, "pos": 0, "order": list(range(6))}, []
    groups, m = P.collect(gen, probs, cursor, buffer, args, 0, _Tok(), Dist())
    assert [g["problem"]["problem"] for g in groups] == ["p0", "p1"] and buffer == []  # one round filled it exactly
    # p2 now fails the filter (all right): round 1 passes p3, round 2 passes p4 and p5; p5 is the surplus
    gen.answers["p2"] = ["1", "1", "1", "1"]
    groups, m = P.collect(gen, probs, cursor, buffer, args, 1, _Tok(), Dist())
    assert gen.asked[2:] == ["p2", "p3", "p4", "p5"] and m["rollout/rounds"] == 2
    assert [g["problem"]["problem"] for g in groups] == ["p3", "p4"]
    assert buffer == [probs[5]]  # the surplus waits as its prompt alone, not as a group with old responses
    # the policy has moved: p5 now fails. It is sampled again, first, beside the fresh prompts, and dropped
    gen.answers["p5"] = ["0", "0", "0", "0"]
    cursor = {"epoch": 0, "pos": 0, "order": list(range(6))}
    groups, m = P.collect(gen, probs, cursor, buffer, args, 2, _Tok(), Dist())
    assert gen.asked[6:] == ["p5", "p0", "p1"] and m["rollout/rounds"] == 1
    assert [g["problem"]["problem"] for g in groups] == ["p0", "p1"] and buffer == []


TINY = ["--steps", "3", "--prompts_per_step", "4", "--n_eval_problems", "4", "--eval_every", "2", "--max_new_tokens", "40",
        "--filter_low", "0", "--filter_high", "1", "--micro_batch", "8"]


def _run(args, torchrun=False, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    r = subprocess.run(cmd + ["prime.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _metrics(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_contract_and_resume(tiny_toy_dir, tmp_path):
    a = tmp_path / "a"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(a)] + TINY)
    res = json.loads((a / "results.json").read_text())
    for k in ("sft/greedy_acc", "sft/sample_acc", "final/greedy_acc", "final/sample_acc"):
        assert 0 <= res[k] <= 1, k
    # the toy's checker: accuracy by operations, and first-error kinds that are shares of the solutions
    assert set(res["final/greedy_acc_by_ops"]) <= {"1", "2", "3"}
    for k in ("greedy_first_errors", "sample_first_errors"):
        kinds = res[f"final/{k}"]
        assert set(kinds) <= {"misread", "slip", "operand", "skip", "other-op", "other"} and sum(kinds.values()) <= 1
    assert sum(res["final/greedy_first_errors"].values()) >= 1 - res["final/greedy_acc"] - 1e-9  # a wrong answer has one
    rows = _metrics(a)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for k in ("train/reward", "rollout/filtered_frac", "train/prm_loss", "train/prm_pairwise_acc", "train/adv_mean",
              "train/return_std", "time/rollout", "time/prm", "time/policy", "time/weight_sync", "tokens_per_s"):
        assert all(k in r and r[k] == r[k] for r in rows), k  # present and not NaN (pairwise may be NaN: skip)
    assert abs(rows[0]["train/prm_loss"] - math.log(2)) < 0.05  # the first update starts from PRM = reference
    from utils.verifiers import load_verifier
    meta = json.loads((a / "prm" / "verifier.json").read_text())
    assert meta["kind"] == "implicit" and meta["beta"] == 0.05
    v = load_verifier(str(a / "prm"), device="cpu")
    s = v.score(["Ana has 3 apples. Ana buys 2 more. How many apples does Ana have now?"],
                [["Ana buys 2 more, so 3 + 2 = 5.", "The answer is \\boxed{5}."]])[0]
    assert len(s) == 2 and all(0 < x < 1 for x in s) and s != [0.5, 0.5]  # trained: not the reference any more
    # stop after 1 step, resume to 3: the same steps, the same numbers, the same final policy
    b = tmp_path / "b"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(b), "--steps", "1"] + TINY[2:])  # (evaluates at its last step)
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(b), "--resume"] + TINY)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s", "eval/"))}  # noqa: E731
    assert [strip(r) for r in _metrics(b)] == [strip(r) for r in rows]
    from safetensors.torch import load_file
    wa, wb = load_file(a / "policy" / "model.safetensors"), load_file(b / "policy" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_9_mid_run_then_resume(tiny_toy_dir, tmp_path):
    out = tmp_path / "kill"
    cmd = [sys.executable, "prime.py", "--toy_dir", str(tiny_toy_dir), "--out_dir", str(out)] + TINY[2:] + ["--steps", "8"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t = time.time()
    while time.time() - t < 300 and not ((out / "metrics.jsonl").exists() and len(_metrics(out)) >= 2):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(_metrics(out))
    assert 2 <= done < 8, done
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--resume"] + TINY[2:] + ["--steps", "8"])
    assert [r["step"] for r in _metrics(out)] == list(range(1, 9))  # each step once, none lost past the one in flight


def test_compare_writes_every_method(tiny_toy_dir, tmp_path):
    out = tmp_path / "cmp"
    r = _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--compare", "--seeds", "0", "--compare_methods",
              "rloo,prime,frozen_prm,exact,telescoping,prime_gamma0"] + TINY[2:] + ["--compare_steps", "2"])
    res = json.loads((out / "results.json").read_text())
    for m in ("prime", "rloo", "frozen_prm", "exact", "telescoping", "prime_gamma0"):
        assert 0 <= res[f"{m}/final/greedy_acc"] <= 1 and 0 <= res[f"{m}/final/sample_acc"] <= 1
        assert f"{m}/rollouts_to_rloo_final_reward" in res and f"{m}/share_of_exact_final" in res
        assert res[f"{m}/final_sample_acc_minus_rloo"] == pytest.approx(res[f"{m}/final/sample_acc"] - res["rloo/final/sample_acc"])
        assert len(_metrics(out / f"{m}_seed0")) == 2  # --compare_steps
    for m in ("exact", "telescoping"):  # the checker's rewards: no PRM work, a reward where a step is wrong
        log = _metrics(out / f"{m}_seed0")
        assert all("train/prm_loss" not in r and 0 <= r["train/oracle_wrong_frac"] <= 1 for r in log)
        assert all((r["train/process_return_abs"] > 0) == (r["train/oracle_wrong_frac"] > 0) for r in log)
        assert all("rollout/carried" in r for r in log)
    cfg = {m: json.loads((out / f"{m}_seed0" / "config.json").read_text()) for m in ("exact", "telescoping", "prime_gamma0")}
    assert (cfg["exact"]["process_rewards"], cfg["exact"]["process_gamma"]) == ("oracle_step", 0.0)
    assert (cfg["telescoping"]["process_rewards"], cfg["telescoping"]["process_gamma"]) == ("oracle", 1.0)
    assert (cfg["prime_gamma0"]["process_rewards"], cfg["prime_gamma0"]["process_gamma"]) == ("implicit", 0.0)
    assert "sft/greedy_acc" in res and res["prime_cost_per_step_vs_rloo"] > 0 and "| prime |" in r.stdout
    assert "share of the exact control's gain" in r.stdout
    assert "first wrong step" in r.stdout and "rloo/final/greedy_first_errors" in res
    rloo, frozen = _metrics(out / "rloo_seed0"), _metrics(out / "frozen_prm_seed0")
    assert all(r["train/process_return_abs"] == 0 for r in rloo)  # outcome-only: no process reward
    assert all("train/prm_loss" not in r for r in rloo)  # ... and no PRM work at all
    # frozen_prm: the PRM this seed's PRIME run trained, not updated further, and its rewards used
    from safetensors.torch import load_file
    trained, kept = (load_file(d / "prm" / "model.safetensors") for d in (out / "prime_seed0", out / "frozen_prm_seed0"))
    assert all(torch.equal(trained[k], kept[k]) for k in trained)
    assert all(r["train/process_return_abs"] > 0 for r in frozen)
    # a frozen PRM that is still the reference gives q = 0 to the bit (no float noise blown up by the normalisation)
    sft = tmp_path / "frozen_sft"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(sft), "--prm_update", "false"] + TINY[2:] + ["--steps", "2"])
    assert all(r["train/process_return_abs"] == 0 and r["train/prm_loss"] == pytest.approx(math.log(2)) for r in _metrics(sft))
    # --ref_type policy: no reference model, the policy's old logprobs are the reference. A frozen SFT PRM then gives
    # q = 0 to the bit at step 1 (the policy is still the SFT) and q != 0 once the policy has moved (a frozen
    # reference would keep q = 0, as above)
    pol = tmp_path / "ref_policy"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(pol), "--ref_type", "policy", "--prm_update", "false",
          "--lr", "0.01"] + TINY[2:] + ["--steps", "2"])
    rows = _metrics(pol)
    assert rows[0]["train/process_return_abs"] == 0 and rows[0]["train/prm_loss"] == pytest.approx(math.log(2))
    assert rows[1]["train/process_return_abs"] > 0
    assert (pol / "prm" / "reference" / "model.safetensors").exists()  # the final policy stands as its reference
    r = subprocess.run([sys.executable, "prime.py", "--toy_dir", str(tiny_toy_dir), "--prm_init", str(tiny_toy_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error:" in r.stderr and len(r.stderr.strip().splitlines()) == 1  # one clear line


def test_torchrun_two_processes(tiny_toy_dir, tmp_path):
    out = tmp_path / "ddp"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(out)] + TINY[2:] + ["--steps", "2"], torchrun=True)
    one = tmp_path / "one"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(one)] + TINY[2:] + ["--steps", "2"])
    assert set(_metrics(out)[-1]) == set(_metrics(one)[-1])  # the same metrics keys as one process
    # whitened over the whole batch, as the code's driver: rank 0's own tokens need not average 0 (each rank
    # whitening its own shard would make them 0 to float precision, as one process does)
    assert all(abs(r["train/adv_mean"]) < 1e-5 for r in _metrics(one))
    assert any(abs(r["train/adv_mean"]) > 1e-3 for r in _metrics(out))
    assert json.loads((out / "results.json").read_text()).keys() == json.loads((one / "results.json").read_text()).keys()


def test_torchrun_fsdp_resumes_exactly(tiny_toy_dir, tmp_path):
    """FSDP2 over policy, PRM and reference (2 CPU processes, gloo): 2 steps straight, and 1 step then --resume to
    2, give the same metrics and the same final policy (the sharded checkpoint gathered whole and loaded back)."""
    base = ["--toy_dir", str(tiny_toy_dir), "--shard", "fsdp", "--lr", "0.01"] + TINY[2:]  # a big lr: stale weights would show
    a, b = tmp_path / "a", tmp_path / "b"
    _run(base + ["--out_dir", str(a), "--steps", "2"], torchrun=True)
    _run(base + ["--out_dir", str(b), "--steps", "1"], torchrun=True)
    _run(base + ["--out_dir", str(b), "--steps", "2", "--resume"], torchrun=True)
    strip = lambda r: {k: v for k, v in r.items()  # noqa: E731  (times differ; NaN != NaN)
                       if not k.startswith(("time", "tokens_per_s", "eval/")) and v == v}
    assert [strip(r) for r in _metrics(a)] == [strip(r) for r in _metrics(b)]
    from safetensors.torch import load_file
    wa, wb = load_file(a / "policy" / "model.safetensors"), load_file(b / "policy" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "prm" / "reference" / "model.safetensors").exists()
    # each rank samples with an HF copy synced after every update: its logprobs are the trained policy's
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in _metrics(a) + _metrics(b))


def test_vllm_rollouts_follow_the_policy(tiny_toy_dir, tmp_path):
    """--backend vllm: the weights pushed into the engine after every update, so the engine's logprob of each
    sampled token is the trained policy's (an engine left with the SFT weights differs by ~0.5 nats a token
    after one update at this lr)."""
    from utils.generation import vllm_available
    if not vllm_available():
        if os.environ.get("STEPWISE_REQUIRE_VLLM"):
            pytest.fail("STEPWISE_REQUIRE_VLLM is set but vllm is not importable")
        pytest.skip("vllm is not installed")
    out = tmp_path / "vllm"
    _run(["--toy_dir", str(tiny_toy_dir), "--out_dir", str(out), "--backend", "vllm", "--lr", "0.01"] + TINY)
    rows = _metrics(out)
    assert len(rows) == 3 and all(r["rollout/logprob_diff"] < 1e-3 and r["time/weight_sync"] > 0 for r in rows)
