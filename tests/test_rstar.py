"""rstar_mcts.py and ppm.py: UCT, backup, expansion rules, pairs and losses by hand; end to end on the toy."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppm
import rstar_mcts as rs
from utils.data import END_ANSWER, END_CODE, END_STEP, program_of

ROOT = Path(__file__).resolve().parents[1]


def _node(parent, N=0, W=0.0, **kw):
    n = rs.Node(parent=parent, N=N, W=W, **kw)
    parent.children.append(n)
    return n


def test_uct_rstar_rule_and_textbook_rule():
    root = rs.Node(N=10)
    a, b, c = _node(root, N=4, W=-4.0), _node(root, N=0), _node(root, N=2, W=2.0)
    # a: -1 + 2 sqrt(ln 10 / 4) = 0.5174; b: unvisited = 0 (rstar) or inf (textbook); c: 1 + 2 sqrt(ln 10 / 2) = 3.146
    assert rs.uct(root, a, 2.0) == pytest.approx(-1 + 2 * math.sqrt(math.log(10) / 4))
    assert rs.uct(root, b, 2.0) == 0.0 and rs.uct(root, b, 2.0, "textbook") == math.inf
    assert rs.select_child(root, 2.0) is c
    assert rs.select_child(root, 2.0, "textbook") is b
    # the UCT-0 effect: a visited child with Q = -1 beats an unvisited sibling while its bonus is above 1
    root2 = rs.Node(N=10)
    bad, fresh = _node(root2, N=1, W=-1.0), _node(root2)
    assert rs.select_child(root2, 2.0) is bad  # -1 + 2 sqrt(ln 10) = 2.03 > 0
    # ties go to the first child; terminal children are skipped; all terminal -> None
    root3 = rs.Node(N=3)
    x, y = _node(root3, N=1, W=0.5), _node(root3, N=1, W=0.5)
    assert rs.select_child(root3, 2.0) is x
    x.terminal = True
    assert rs.select_child(root3, 2.0) is y
    y.terminal = True
    assert rs.select_child(root3, 2.0) is None


def test_backup_to_root_and_local_update():
    root = rs.Node()
    a = _node(root)
    b = _node(a)
    rs.backup(b, 1.0)
    rs.backup(b, -1.0)
    assert (root.N, root.W, a.N, a.W, b.N, b.Q) == (2, 0.0, 2, 0.0, 2, 0.0)
    dead = _node(a)
    rs.local_update(dead, -1.0)  # a dead end: only itself
    assert (dead.N, dead.Q, a.N, root.N) == (1, -1.0, 2, 2)
    rs.backup(_node(b), 1.0)
    assert (root.N, root.Q, a.Q) == (3, pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_new_children_as_the_code_filters_them():
    root = rs.Node(depth=0)
    step = f"\n# Ana buys 2 more.\ncoins = coins + 2\n{END_STEP}"
    ans1 = f"\n<answer>The answer is \\boxed{{5}}.\n{END_ANSWER}"
    ans2 = f"\n<answer>The answer is \\boxed{{6}}.\n{END_ANSWER}"
    # a sample that stopped at END_ANSWER: the first such is the only child, its siblings are dropped ...
    kids = rs.new_children(root, [(step, "stop"), (step, "stop"), (ans1, "stop"), (ans2, "stop")], 16)
    assert [(k.kind, k.answer, k.terminal) for k in kids] == [("answer", "5", True)]
    root.children = kids
    assert rs.select_child(root, 2.0) is None  # ... so the node is terminal once selected
    # without one: duplicates dropped; an untagged or truncated sample is code to run; "boxed" makes an answer
    boxed_step = f"\nThe answer is \\boxed{{7}}.\n{END_STEP}"
    kids = rs.new_children(rs.Node(), [(step, "stop"), (step, "stop"), ("coins = 1", "eos"), ("coins = co", "length"),
                                       (boxed_step, "stop"), (f"\nprint(coins)\n{END_CODE}", "stop"), ("", "too_long")], 16)
    assert [k.kind for k in kids] == ["step", "step", "step", "answer", "code", "dead"]
    assert [k.terminal for k in kids] == [False, False, False, True, False, True]
    deep = rs.Node(depth=16)
    assert rs.new_children(deep, [(step, "stop")], 16)[0].kind == "dead"
    assert rs.new_children(deep, [(ans1, "stop")], 16)[0].kind == "answer"  # an answer past the depth is graded


def test_program_of_runs_the_block_since_the_last_output():
    from utils.data import output_step
    from utils.sandbox import run_many
    s1 = f"<code>\n# Ana has 3 coins.\ncoins = 3\nprint('early')\n{END_STEP}"
    code = f"\nprint(coins)\n{END_CODE}"
    more = f"\n# Ana then has twice as many.\ncoins = coins * 2\n{END_STEP}"
    outs = run_many([program_of([s1, code]), program_of([s1, code + output_step("3"), more, code]),
                     program_of([s1, code + output_step("3"), f"\nprint(cons)\n{END_CODE}"])], timeout=5)
    assert outs[0].stdout == "early\n3\n"  # one block: all of it, its output shown
    assert outs[1].ok and outs[1].stdout == "6\n"  # after an output: the earlier names in scope, their output not
    assert not outs[2].ok  # an error in the new block is an error
    # a whole solution (output and answer steps are not code) is one block
    sol = [s1, code, output_step("3"), f"\n<answer>\\boxed{{3}}\n{END_ANSWER}"]
    assert "exec(" not in program_of(sol) and program_of(sol).splitlines()[-1] == "print(coins)"
    # the python tool's rounding: a lone float to 4 places where that is shorter
    assert output_step("3.3333333") == "\n<output>3.3333\n<end_of_output>" and "<output>5\n" in output_step("5")


def test_run_children_reruns_the_whole_program():
    root = rs.Node()
    s1 = _node(root, text=f"<code>\n# Ana has 3 coins.\ncoins = 3\n{END_STEP}", kind="step")
    s2 = _node(s1, text=f"\n# Ana then has twice as many.\ncoins = coins * 2\n{END_STEP}", kind="step")
    bad = _node(s1, text=f"\n# oops\ncoins = cons * 2\n{END_STEP}", kind="step")
    code = _node(s2, text=f"\nprint(coins)\n{END_CODE}", kind="code")
    assert program_of(code.steps()).splitlines()[-1] == "print(coins)"
    cache = {}
    rs.run_children([s2, bad, code], 5.0, cache)
    assert bad.kind == "dead" and bad.terminal and s2.kind == "step"
    assert code.text.endswith("\n<output>6\n<end_of_output>") and len(cache) == 3
    after = _node(code, text=f"\n# one more\ncoins = coins + 1\n{END_STEP}", kind="step")
    rs.run_children([after], 5.0, cache)  # code after an output step runs (it was a syntax error before)
    assert after.kind == "step" and not after.terminal


def test_top_vote_and_orm_pick_by_hand():
    runs = [{"answer": "5", "value": 0.9, "correct": False}, {"answer": "7", "value": 0.8, "correct": True},
            {"answer": "7", "value": 0.1, "correct": True}, {"answer": "5", "value": 0.7, "correct": False},
            {"answer": "7", "value": 0.6, "correct": True}, {"answer": None, "value": None, "correct": False}]
    # top 4 by value: 5 (.9), 7 (.8), 5 (.7), 7 (.6): a 2-2 tie goes to the higher-valued answer, 5 (wrong);
    # weights 5: 1.6, 7: 1.4 -> 5; the highest value alone: 5
    assert rs.top_vote(runs, 4) == {"vote": 0.0, "weighted": 0.0, "best": 0.0}
    # top 5 adds 7 (.1): 7 has 3 votes (right); weights 5: 1.6, 7: 1.5 -> still 5
    assert rs.top_vote(runs, 5) == {"vote": 1.0, "weighted": 0.0, "best": 0.0}
    runs[2]["value"] = 0.3  # weights 5: 1.6, 7: 1.7 -> 7
    assert rs.top_vote(runs, 5) == {"vote": 1.0, "weighted": 1.0, "best": 0.0}
    assert rs.top_vote([runs[-1]], 4) == {"vote": 0.0, "weighted": 0.0, "best": 0.0}  # no search answered
    assert rs.majority([{"answer": "3", "correct": False}, {"answer": "4", "correct": True},
                        {"answer": "4", "correct": True}, {"answer": None, "correct": False}]) == 1.0
    samples = [{"answer": None}, {"answer": "4"}, {"answer": "5"}]
    assert rs.orm_pick(samples, [0.99, 0.2, 0.6]) == 2  # the unanswered sample's high score does not win
    assert rs.orm_pick([{"answer": None}, {"answer": None}], [0.1, 0.3]) == 1


def test_oracle_value_is_the_exact_checker():
    p = "Ana has 6 pens. Ana buys 4 more. Ana then has twice as many. How many pens does Ana have now?"
    s0 = f"<code>\n# Ana has 6 pens.\npens = 6\n{END_STEP}"
    good = f"\n# Ana buys 4 more.\npens = pens + 4\n{END_STEP}"
    misread = f"\n# Ana buys 4 more.\npens = pens + 9\n{END_STEP}"
    twice = f"\n# Ana then has twice as many.\npens = pens * 2\n{END_STEP}"
    pr = f"\nprint(pens)\n{END_CODE}\n<output>20\n<end_of_output>"
    ans = f"\n<answer>The answer is \\boxed{{20}}.\n{END_ANSWER}"
    v = rs.oracle_value
    assert v(p, [s0]) == 1.0 and v(p, [s0, good]) == 1.0 and v(p, [s0, misread]) == -1.0
    assert v(p, [s0, misread, twice]) == -1.0  # wrong from the first wrong step on
    assert v(p, [s0, good, twice, pr]) == 1.0 and v(p, [s0, good, pr]) == -1.0  # a print before the last operation
    assert v(p, [s0, good, twice, pr, ans]) == 1.0
    assert v(p, [s0, good, twice, pr, ans.replace("20", "21")]) == -1.0
    assert rs.ToyOracle().values([p, p], [[s0, good], [s0, misread]]) == [1.0, -1.0]


def _tree():
    """root -> a (Q .8: leads to a correct answer) / b (Q -.6: wrong) / c (Q .2: both)."""
    nodes = [{"parent": -1, "text": "", "N": 6, "Q": 0.0, "kind": "root", "correct": None},
             {"parent": 0, "text": "step A " + "x" * 30, "N": 2, "Q": 0.8, "kind": "step", "correct": None},
             {"parent": 0, "text": "step B " + "y" * 30, "N": 2, "Q": -0.6, "kind": "step", "correct": None},
             {"parent": 0, "text": "step C " + "z" * 30, "N": 2, "Q": 0.2, "kind": "step", "correct": None},
             {"parent": 1, "text": "ans A", "N": 2, "Q": 1.0, "kind": "answer", "correct": True},
             {"parent": 2, "text": "ans B", "N": 2, "Q": -1.0, "kind": "answer", "correct": False},
             {"parent": 3, "text": "ans C1", "N": 1, "Q": 1.0, "kind": "answer", "correct": True},
             {"parent": 3, "text": "ans C2 wrong " + "w" * 30, "N": 1, "Q": -1.0, "kind": "answer", "correct": False},
             {"parent": 3, "text": "dead", "N": 1, "Q": -1.0, "kind": "dead", "correct": None}]
    return {"problem": "P", "answer": "1", "nodes": nodes}


def test_ppm_pairs_by_hand():
    t = _tree()
    kids = ppm.children_of(t["nodes"])
    assert ppm.leaf_counts(t["nodes"], kids)[3] == (1, 1) and ppm.leaf_counts(t["nodes"], kids)[0] == (2, 2)
    rows = ppm.ppm_pairs(t, margin=0.5, min_edit=20)
    sib = [(r["pos"][:6], r["neg"][:6], r["pos_count"], r["neg_count"]) for r in rows if not r["final"]]
    # root: good = a (.8), c (.2); bad = b (-.6), c (.2). a-b margin 1.4 kept; a-c margin .6 kept; c-b margin .8
    # kept; c-c dropped. Then node c (both outcomes): C1 vs C2: margin 2, edit >= 20 kept, counts 1 x 1.
    assert sib == [("step A", "step B", 2, 2), ("step A", "step C", 2, 2), ("step C", "step B", 2, 2),
                   ("ans C1", "ans C2", 1, 1)]
    assert ppm.ppm_pairs(t, margin=1.0, min_edit=20)[0]["neg"].startswith("step B")  # a-c (.6) and c-b (.8) drop
    assert len([r for r in ppm.ppm_pairs(t, 0.5, 100) if not r["final"]]) == 0  # every pair under 100 characters
    final = [r for r in rows if r["final"]]
    # correct trajectories: a+A (mean .9), c+C1 (.6); wrong: b+B (-.8), c+C2 (-.4): 2 x 2 pairs from the question
    assert [(r["pos"][:6], r["neg"][:6]) for r in final] == [("step A", "step B"), ("step A", "step C"),
                                                              ("step C", "step B"), ("step C", "step C")]
    assert all(r["prefix"] == [] and r["pos_count"] == 2 for r in final)
    assert [r["step"] for r in ppm.orm_rows(t)][0] == "step A " + "x" * 30 + "ans A"
    assert len(ppm.pqm_rows(t)) == 7  # every visited node but the root and the dead end


def test_path_mean_q_follows_only_children_with_the_outcome():
    # a (Q .5) -> x (never visited, no leaf, Q 0) and y (Q -.5) -> Y (correct, Q 1) and Z (wrong, Q -1)
    nodes = [{"parent": -1, "Q": 0.0, "kind": "root", "correct": None},
             {"parent": 0, "Q": 0.5, "kind": "step", "correct": None},
             {"parent": 1, "Q": 0.0, "kind": "step", "correct": None},
             {"parent": 1, "Q": -0.5, "kind": "step", "correct": None},
             {"parent": 3, "Q": 1.0, "kind": "answer", "correct": True},
             {"parent": 3, "Q": -1.0, "kind": "answer", "correct": False}]
    kids = ppm.children_of(nodes)
    counts = ppm.leaf_counts(nodes, kids)
    # best: a -> y -> Y (x, highest Q, has no correct leaf): (.5 - .5 + 1) / 3; worst: a -> y -> Z
    assert ppm.path_mean_q(nodes, kids, counts, 1, True) == pytest.approx(1 / 3)
    assert ppm.path_mean_q(nodes, kids, counts, 1, False) == pytest.approx(-1 / 3)


def test_bt_loss_weighted_by_counts():
    rp, rn = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    pc, nc = torch.tensor([2.0, 1.0]), torch.tensor([2.0, 4.0])
    want = (math.log(1 + math.exp(-2.0)) / 4 + math.log(1 + math.exp(1.0)) / 4) / 2
    assert ppm.bt_loss(rp, rn, pc, nc).item() == pytest.approx(want)
    assert ppm.orm_loss(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert ppm.pqm_loss(torch.tensor([5 * math.atanh(0.5)]), torch.tensor([0.5])).item() == pytest.approx(0.0, abs=1e-9)
    assert ppm.edit_distance("kitten", "sitting") == 3


def test_top_trajectories_by_mean_q():
    tree = rs.Tree({"problem": "P", "answer": "1"}, [])
    a = _node(tree.root, N=3, W=3.0, text="a")
    b = _node(tree.root, N=3, W=1.0, text="b")
    for parent, q, ok, text in ((a, 1.0, True, "A"), (b, 1.0, True, "B"), (b, -1.0, False, "X"), (a, 1.0, True, "error A")):
        _node(parent, N=1, W=q, kind="answer", correct=ok, text=text)
    # top 2 by mean Q: a+A (1.0), a+"error A" (1.0, tie on min); then "error" ones dropped: b+B is not promoted
    assert rs.top_trajectories(tree, 2) == [["a", "A"]]
    assert rs.top_trajectories(tree, 3) == [["a", "A"], ["b", "B"]]


@pytest.fixture(scope="module")
def code_toy(tiny_toy_dir):
    from utils.toy import CodeToyConfig, ensure_code_toy
    return ensure_code_toy(tiny_toy_dir, CodeToyConfig(pre_steps=10, base_steps=20, policy_steps=10, calib_problems=4))


def _tiny_flags(out, code_toy, toy_dir, rounds: int) -> list[str]:
    return ["--out_dir", str(out), "--n_problems", "8", "--n_eval_problems", "4", "--rollouts", "2,2", "--candidates", "2",
            "--eval_runs", "2", "--eval_rollouts", "2", "--eval_candidates", "2", "--maj_samples", "4",
            "--sft_epochs", "1", "--ppm_args", "--min_edit 1 --epochs 1 --batch 8 --max_len 1024",
            "--model", str(code_toy / "policy"), "--base", str(code_toy / "base"),
            "--data", str(toy_dir / "train.jsonl"), "--eval_data", str(toy_dir / "test.jsonl"),
            "--max_step_tokens", "40", "--max_model_len", "1024", "--exec_timeout", "5", "--sft_batch", "8",
            "--sft_lr", "1e-3", "--backend", "hf", "--rounds", str(rounds), "--hard_rollouts", ""]


def test_rstar_end_to_end_tiny(tmp_path, code_toy, tiny_toy_dir):
    out = tmp_path / "rstar"
    cmd = [sys.executable, "rstar_mcts.py"] + _tiny_flags(out, code_toy, tiny_toy_dir, rounds=2)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["sandbox/isolation"] == ("namespaces" if os.geteuid() == 0 else "rlimits")
    for k in ("round_1/greedy_acc", "round_1/solved_frac", "round_2/greedy_acc", "round_2/solved_frac",
              "ppm_vote@2", "pqm_vote@2", "oracle_vote@2", "ppm_weighted@2", "ppm_best@2", "ppm_single@2",
              "orm_bon@2", "maj@2", "maj@4", "pass@2"):
        assert k in res and 0.0 <= res[k] <= 1.0, k
    assert "verifier/ppm/heldout_pairwise_acc_final" in res and "verifier/orm/train_rows" in res
    assert res["tokens/oracle@2"] > res["tokens/oracle_single"] > 0 and res["tokens/sample@4"] > res["tokens/sample@2"] > 0
    assert res["equal_tokens/oracle"]["maj_n"] in (1, 2, 4) and "round_1/distinct_answers_per_tree" in res
    assert "| oracle MCTS, top-4 vote |" in (out / "results.md").read_text()
    tree = json.loads((out / "round_1" / "trees.jsonl").read_text().splitlines()[0])
    nodes = tree["nodes"]
    answers = sum(n["kind"] == "answer" for n in nodes)
    assert nodes[0]["N"] == answers and all("Q" in n and "N" in n for n in nodes)  # each answer backed up to the root
    meta = json.loads((out / "round_2" / "ppm" / "verifier.json").read_text())
    assert meta["kind"] == "ppm" and (out / "round_2" / "ppm" / "pairs.jsonl").exists()
    from utils.verifiers import load_verifier
    v = load_verifier(str(out / "round_2" / "ppm"), device="cpu")
    s = v.score(["Ana has 3 coins. How many coins does Ana have now?"],
                [[f"<code>\n# Ana has 3 coins.\ncoins = 3\n{END_STEP}", f"\nprint(coins)\n{END_CODE}"]])
    assert len(s[0]) == 2 and all(0.0 <= x <= 1.0 for x in s[0])
    # a rerun reuses the finished rounds (no MCTS again) and gives the same round figures
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and "round 1 mcts" not in r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["round_2/solved_frac"] == res["round_2/solved_frac"]


def test_rstar_torchrun_two_ranks(tmp_path, code_toy, tiny_toy_dir):
    """A tiny round under torchrun on CPU: each rank searches half the problems, rank 0 writes all the trees;
    the SFT (FSDP2) and ppm.py (its own two-rank group) run on both ranks; the ablation's per-problem figures
    are gathered back in problem order."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rstar_dist"
    flags = _tiny_flags(out, code_toy, tiny_toy_dir, rounds=1)
    flags = [f for i, f in enumerate(flags) if not ({f, flags[i - 1]} & {"--model", "--base", "--data", "--eval_data"})]
    # the shipped toy models (no --model): a policy that solves problems, so the SFT and the PPM have rows
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "rstar_mcts.py"] + flags + ["--n_problems", "12", "--max_step_tokens", "80", "--eval_methods", "ppm,oracle,orm,maj"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    trees = [json.loads(x) for x in (out / "round_1" / "trees.jsonl").read_text().splitlines()]
    train = [json.loads(x)["problem"] for x in Path(cfg["data"]).read_text().splitlines()[:12]]
    assert sorted(t["problem"] for t in trees) == sorted(train)  # both ranks' shards, once each
    assert res["round_1/sft_rows"] > 0 and "steps, loss" in r.stdout  # FSDP2 SFT trained
    ppm_res = json.loads((out / "round_1" / "ppm" / "results.json").read_text())
    assert ppm_res["train_rows"] > 0  # ppm.py trained as a two-rank group of its own
    per = [json.loads(x) for x in (out / "ablation_per_problem.jsonl").read_text().splitlines()]
    test = [json.loads(x)["problem"] for x in Path(cfg["eval_data"]).read_text().splitlines()[:4]]
    assert [p["problem"] for p in per] == test and all("oracle_vote" in p and "maj@4" in p for p in per)
    for k in ("round_1/greedy_acc", "ppm_vote@2", "oracle_vote@2", "orm_bon@2", "maj@2"):
        assert 0.0 <= res[k] <= 1.0, k
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(out / "round_1" / "policy"))  # the FSDP2 SFT saved a whole model


def test_ppm_heldout_from_fixes_the_heldout_pairs(tmp_path, tiny_model_dir):
    """--heldout_from: another run's held-out problems are left out of training and its held-out pairs are the
    ones scored, whatever trees this run trains on (a curve over data on one held-out set)."""
    trees = []
    for k in range(6):  # six problems of the hand-made tree's shape
        t = _tree()
        t["problem"] = f"P{k}"
        trees.append(t)
    (tmp_path / "trees.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trees))
    base = ["--trees", str(tmp_path / "trees.jsonl"), "--model", str(tiny_model_dir), "--min_edit", "1",
            "--epochs", "1", "--batch", "4", "--max_len", "256", "--eval_frac", "0.34"]
    ppm.main(_ppm_args(base + ["--out_dir", str(tmp_path / "a")]))
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "pairs.jsonl").read_text().splitlines()]
    held = {r["problem"] for r in rows_a if r["split"] == "eval"}
    assert len(held) == 2
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trees[:4]))
    few = [a if a != str(tmp_path / "trees.jsonl") else str(tmp_path / "few.jsonl") for a in base]
    res = ppm.main(_ppm_args(few + ["--out_dir", str(tmp_path / "b"), "--heldout_from", str(tmp_path / "a" / "pairs.jsonl")]))
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "pairs.jsonl").read_text().splitlines()]
    assert [r["pos"] for r in rows_b if r["split"] == "eval"] == [r["pos"] for r in rows_a if r["split"] == "eval"]
    assert not {r["problem"] for r in rows_b if r["split"] == "train"} & held
    assert res["heldout_pairs"] == sum(r["split"] == "eval" for r in rows_a)


def _ppm_args(argv):
    from utils.train import parse_args
    return parse_args(ppm.Args, ppm.TOY, argv)
