import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import toy

ROOT = Path(__file__).resolve().parent.parent


def _problems(n=300, seed=0):
    rng = random.Random(seed)
    return [toy.make_problem(rng, rng.randint(1, 4)) for _ in range(n)]


def test_parse_problem_roundtrip():
    for p in _problems():
        q = toy.parse_problem(p["problem"])
        assert q["start"] == p["start"] and [tuple(o) for o in q["ops"]] == [tuple(o) for o in p["ops"]]
        assert toy.solve_value(q) == int(p["answer"])


def test_correct_solutions_pass_checker():
    for p in _problems():
        for code in (False, True):
            steps = toy.solve(p, code=code)
            c = toy.check_steps(p["problem"], steps, p["answer"], code=code)
            assert c.first_error == -1 and all(c.step_correct) and c.answer_correct, steps


def test_each_error_mode_is_caught_at_its_step():
    p = {"problem": "Ana has 6 pens. Ana buys 4 more. Ana is 9 years old. Ana then has twice as many. "
                    "How many pens does Ana have now?", "answer": "20"}
    cases = {  # hand-written solutions with one error each -> index of the first wrong step
        "misread": (["Ana buys 4 more, so 6 + 4 = 10.", "Twice as many is 10 + 2 = 12.", "The answer is \\boxed{12}."], 1),
        "distractor": (["Ana buys 9 more, so 6 + 9 = 15.", "Twice as many is 15 * 2 = 30.", "The answer is \\boxed{30}."], 0),
        "skip": (["Twice as many is 6 * 2 = 12.", "The answer is \\boxed{12}."], 0),
        "slip": (["Ana buys 4 more, so 6 + 4 = 11.", "Twice as many is 11 * 2 = 22.", "The answer is \\boxed{22}."], 0),
        "early answer": (["Ana buys 4 more, so 6 + 4 = 10.", "The answer is \\boxed{10}."], 1),
        "wrong box": (["Ana buys 4 more, so 6 + 4 = 10.", "Twice as many is 10 * 2 = 20.", "The answer is \\boxed{21}."], 2),
        "malformed": (["Ana buys 4 more, so 6 + 4 = 10.", "Twice as many is 10 times 2 = 20.", "The answer is \\boxed{20}."], 1),
        "two equations": (["6 + 4 = 10 and 10 * 2 = 20.", "The answer is \\boxed{20}."], 0),
    }
    for name, (steps, first) in cases.items():
        c = toy.check_steps(p["problem"], steps, p["answer"])
        assert c.first_error == first, name
    # later steps that carry a wrong value forward correctly are locally valid (PRM800K convention)
    c = toy.check_steps(p["problem"], cases["slip"][0], p["answer"])
    assert c.step_correct == [False, True, True] and not c.answer_correct
    code = ["# Ana has 6 pens.\npens = 6", "# Ana buys 4 more.\npens = pens + 9", "# Ana then has twice as many.\npens = pens * 2",
            "The answer is \\boxed{30}."]
    assert toy.check_steps(p["problem"], code, p["answer"], code=True).first_error == 1
    assert toy.check_steps(p["problem"], ["import os\nos.system('x')"], p["answer"], code=True).first_error == 0


def test_error_modes_in_sft_data_are_caught():
    rng, seen = random.Random(1), {"misread": 0, "any": 0}
    for p in _problems(2000, seed=3):
        steps = toy.solve(p, rng, toy.ERRORS)
        c = toy.check_steps(p["problem"], steps, p["answer"])
        wrong_answer = steps[-1] != f"The answer is \\boxed{{{p['answer']}}}."
        assert c.answer_correct == (not wrong_answer)
        if wrong_answer:  # every wrong final answer has a located first error
            assert c.first_error >= 0
        seen["any"] += c.first_error >= 0
        seen["misread"] += any(("Twice" in s and "+ 2" in s) for s in steps)
    assert 0.2 < seen["any"] / 2000 < 0.6 and seen["misread"] > 20


def test_no_correctness_marker_in_text():
    """Wrong steps use exactly the templates of right steps: same characters outside the digits."""
    rng = random.Random(5)
    shape = lambda s: "".join("9" if ch.isdigit() else ch for ch in s).replace("99", "9").replace("99", "9")
    good, bad = set(), set()
    for p in _problems(1500, seed=4):
        steps = toy.solve(p, rng, toy.ERRORS)
        c = toy.check_steps(p["problem"], steps, p["answer"])
        for s, ok in zip(steps, c.step_correct):
            (good if ok else bad).add(shape(s).replace("+", "o").replace("-", "o").replace("*", "o").replace("/", "o"))
    assert bad <= good


def test_drill_rows_teach_only_correct_arithmetic(tmp_path):
    """Arithmetic drill rows: equations as solutions state them (no slips), loss only on each result."""
    tok = toy.build_char_tokenizer(tmp_path)
    train, _ = toy.make_splits(toy.ToyConfig(n_train=300, n_test=10))
    rng = random.Random(0)
    for _ in range(20):
        ids, labels = toy.drill_row(rng, train, tok, 100)
        assert len(ids) == len(labels) and len(tok.decode(ids)) >= 100
        for a, op, b, c in toy._EQ.findall(tok.decode(ids)):
            assert toy._apply(int(a), op, int(b)) == int(c)
        supervised = tok.decode([i for i, y in zip(ids, labels) if y != -100])
        assert re.fullmatch(r"(\d+\. )+", supervised), supervised


def test_first_error_kind():
    p = "Ana has 6 coins. Ana then has twice as many. Ana buys 5 more. How many coins does Ana have now?"
    kind = lambda *steps: toy.first_error_kind(p, list(steps))
    ok = ["Twice as many is 6 * 2 = 12.", "Ana buys 5 more, so 12 + 5 = 17.", "The answer is \\boxed{17}."]
    assert kind(*ok) == "none"
    assert kind("Twice as many is 6 + 2 = 8.", "Ana buys 5 more, so 8 + 5 = 13.", "The answer is \\boxed{13}.") == "misread"
    assert kind("Twice as many is 6 * 2 = 13.") == "slip"
    assert kind(ok[0], "Ana buys 5 more, so 12 + 9 = 21.") == "operand"
    assert kind("Ana buys 5 more, so 6 + 5 = 11.") == "skip"
    assert kind(ok[0], "The answer is \\boxed{12}.") == "skip"
    assert kind("Twice as many is 6 - 2 = 4.") == "other-op"
    assert kind("Twice as many is 7 * 2 = 14.") == "other"
    assert kind("I do not know.") == "other"


def test_splits_disjoint_and_deterministic():
    cfg = toy.ToyConfig(n_train=2000, n_test=100)
    tr, te = toy.make_splits(cfg)
    tr2, te2 = toy.make_splits(cfg)
    assert [p["problem"] for p in te] == [p["problem"] for p in te2]
    assert not {p["problem"] for p in tr} & {p["problem"] for p in te}


def test_build_toy_end_to_end(tmp_path):
    """`python -m utils.toy` with tiny settings writes the layout and the calibration keys."""
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "utils.toy", "--out_dir", str(out), "--backend", "hf", "--n_train", "300",
           "--n_test", "20", "--sft_steps", "3", "--calib_problems", "4", "--calib_n", "2", "--hidden", "64"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    calib = json.loads((out / "calibration.json").read_text())
    for k in ("greedy_acc", "sample_acc_t1", "pass@2", "maj@2"):
        assert 0.0 <= calib[k] <= 1.0
    assert (out / "policy" / "tokenizer.json").exists() and (out / "policy" / "config.json").exists()
    mcfg = json.loads((out / "policy" / "config.json").read_text())
    assert mcfg["hidden_size"] // mcfg["num_attention_heads"] == 32  # --hidden 64: 2 heads vLLM accepts, not 4 of 16
    rows = [json.loads(l) for l in (out / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and {"problem", "answer", "steps"} <= set(rows[0])
    assert "| greedy_acc |" in r.stdout


def test_code_solution_runs_to_the_answer_and_masks_the_output(tiny_model_dir):
    from transformers import AutoTokenizer

    from utils.data import END_ANSWER, END_CODE, code_prompt, program_of
    from utils.sandbox import run_many
    rng = random.Random(5)
    probs = [toy.make_problem(rng, rng.randint(1, 3)) for _ in range(20)]
    sols = [toy.code_solution(p) for p in probs]  # no error modes: correct
    assert all(s[0].startswith("<code>\n# ") and END_CODE in s[-3] and s[-1].endswith(END_ANSWER) for s in sols)
    outs = run_many([program_of(s) for s in sols], timeout=5)
    assert [o.stdout.strip() for o in outs] == [p["answer"] for p in probs]
    assert all(s[-2] == f"\n<output>{p['answer']}\n<end_of_output>" for s, p in zip(sols, probs))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = toy.code_row(probs[0], random.Random(0), tok, errors={})
    text = tok.decode([i for i, y in zip(ids, labels) if y == -100])
    assert text == code_prompt(probs[0]["problem"]) + sols[0][-2]  # prompt and the system's output: no loss


def _shipped_or_skip():
    rec = toy.shipped_record()["models"]
    assert rec, "utils/toy_weights/BUILD.json is missing: the toy world ships its weights"
    return rec


def test_shipped_record_matches_the_loader():
    """BUILD.json names each shipped model by the hash of the config the loader asks for, and its weights."""
    import hashlib
    rec = _shipped_or_skip()
    want = {"policy": toy.ToyConfig(), "verifier_base": toy.verifier_base_config(toy.ToyConfig()),
            "code_policy": toy.CodeToyConfig()}
    for name, cfg in want.items():
        assert rec[name]["key"] == toy.config_key(cfg) and rec[name]["config"] == toy.asdict(cfg), name
        assert toy.shipped_name(cfg) == name
    for name, m in rec.items():
        assert hashlib.sha256((toy.SHIPPED / name / "model.safetensors").read_bytes()).hexdigest() == m["sha256"], name
        assert m["commit"] and m["machine"]
        if m["kind"] == "verifier":  # prm_train.py's recipe, then --ship_verifiers (bf16: the weights that were scored)
            assert m["command"].startswith(f"python prm_train.py --config {toy.VERIFIER_RECIPE} && python -m utils.toy")
            assert m["dtype"] == "bfloat16" and m["policy_sha256"] == rec["policy"]["sha256"]
            assert 0 < m["calibration"]["toy_processbench_f1"] <= 1 and m["optimizer"]["steps"] >= 1000
        else:
            assert m["command"].startswith("python -m utils.toy")
            assert m["dtype"] == "float32"  # exactly the weights that were calibrated
    for name in ("policy", "verifier_base"):
        assert set(toy.TARGETS) <= set(rec[name]["calibration"])
    assert set(toy.TOY_VERIFIERS) <= set(rec) and (ROOT / toy.VERIFIER_RECIPE).exists()
    assert toy.shipped_name(toy.ToyConfig(seed=1)) is None  # any other config is built, not shipped


def test_readme_calibration_is_the_shipped_one():
    rec = _shipped_or_skip()["policy"]["calibration"]
    readme = (ROOT / "README.md").read_text()
    for label, key in (("greedy accuracy", "greedy_acc"), ("per-sample accuracy at T = 1", "sample_acc_t1")):
        assert f"| {label} | {100 * rec[key]:.1f}% |" in readme, label
    assert f"| pass@16 / maj@16 | {100 * rec['pass@16']:.1f}% / {100 * rec['maj@16']:.1f}% |" in readme


def test_shipped_world_lays_out_without_building(tmp_path):
    """An empty cache: the policy, its verifier base and the code models come from utils/toy_weights in
    seconds, with the shipped calibration; no SFT runs (sft_policy raises in the child)."""
    code = ("import sys, json, time; sys.path.insert(0, '.'); import utils.toy as T\n"
            "T.sft_policy = T.calibrate = lambda *a, **k: (_ for _ in ()).throw(SystemExit('built'))\n"
            "t = time.time(); d = T.ensure_toy(); b = T.ensure_verifier_base(d); c = T.ensure_code_toy(d)\n"
            "print(json.dumps([str(d), str(b), str(c), time.time() - t]))")
    env = {**os.environ, "STEPWISE_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d, b, c, seconds = json.loads(r.stdout.strip().splitlines()[-1])
    assert seconds < 120 and Path(d).parent == tmp_path
    import torch
    from safetensors.torch import load_file
    rec = toy.shipped_record()["models"]
    for got, name in ((Path(d) / "policy", "policy"), (Path(b), "verifier_base"), (Path(c) / "base", "code_base"),
                      (Path(c) / "policy", "code_policy")):
        a, s = load_file(got / "model.safetensors"), load_file(toy.SHIPPED / name / "model.safetensors")
        assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a)
    calib = json.loads((Path(d) / "calibration.json").read_text())
    assert calib["source"] == "shipped:policy" and calib["greedy_acc"] == rec["policy"]["calibration"]["greedy_acc"]
    assert len((Path(d) / "test.jsonl").read_text().splitlines()) == toy.ToyConfig().n_test


def test_shipped_verifiers_lay_out_and_read_the_checker_s_errors(tmp_path, tiny_toy_dir):
    """The shipped PRM and ORM lay out from utils/toy_weights (hash checked), load as verifier dirs, and rank right
    solutions of test problems above ones written with the toy's errors; `shipped:` specs resolve; a built world
    has none."""
    rec = _shipped_or_skip()
    env = {**os.environ, "STEPWISE_CACHE": str(tmp_path)}
    code = ("import sys, json; sys.path.insert(0, '.'); import utils.toy as T\n"
            "d = T.ensure_toy(); print(json.dumps({k: str(v) for k, v in T.resolve_toy_verifiers("
            "{'a': 'shipped:prm', 'b': 'shipped:orm', 'c': 'oracle'}, d).items()}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    dirs = json.loads(r.stdout.strip().splitlines()[-1])
    assert dirs["c"] == "oracle" and Path(dirs["a"]).parent == Path(dirs["b"]).parent
    import hashlib

    from utils.data import read_jsonl
    from utils.verifiers import aggregate, auc, load_verifier
    test = read_jsonl(Path(dirs["a"]).parents[1] / "test.jsonl")[:80]  # each right, and written with errors
    rng, errors = random.Random(0), {"misread": 0.5, "distractor": 0.5, "skip": 0.3, "slip": 0.3}
    sols = [toy.solve(p, rng, errors=e) if e else toy.solve(p) for p in test for e in (None, errors)]
    probs = [p["problem"] for p in test for _ in range(2)]
    right = [float(toy.check_steps(q, s).first_error == -1) for q, s in zip(probs, sols)]
    assert 40 < sum(right) < len(right)
    for name, key, floor in (("prm", "a", 0.75), ("orm", "b", 0.65)):  # measured: 0.80 and 0.76
        got = Path(dirs[key])
        assert hashlib.sha256((got / "model.safetensors").read_bytes()).hexdigest() == rec[name]["sha256"]
        scores = [aggregate(s, "min") for s in load_verifier(str(got), "cpu").score(probs, sols)]
        assert auc(scores, right) > floor, (name, auc(scores, right))
    with pytest.raises(ValueError, match="not the shipped toy world"):
        toy.ensure_toy_verifiers(tiny_toy_dir)
    with pytest.raises(ValueError, match="unknown shipped verifier"):
        toy.resolve_toy_verifiers({"x": "shipped:pav"}, tiny_toy_dir)


def test_calibrate_and_rebuild_flags(tmp_path):
    """--rebuild builds by SFT; --calibrate measures the table again beside the recorded one (tiny config)."""
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "utils.toy", "--out_dir", str(out), "--n_train", "200", "--n_test", "10",
           "--sft_steps", "2", "--calib_problems", "3", "--calib_n", "2", "--calibrate", "--rebuild"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| metric | measured now | recorded | target |" in r.stdout and "(built here)" in r.stdout
