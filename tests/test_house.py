"""House rules and what a new user trips on: no method file imports another, no deprecation warnings from
our own calls into transformers, one clear line (no traceback) for a user's error, prompts longer than
the context recorded rather than fatal, and the toy world built by rank 0 alone under torchrun."""
import ast
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem for p in ROOT.glob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function-level imports count too
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_method_file_imports_another():
    assert {"prm_train", "search", "eval"} <= set(METHODS)
    bad = {f"{p.relative_to(ROOT)} imports {sorted(_imported_roots(p) & (set(METHODS) - {p.stem}))}"
           for p in list(ROOT.glob("*.py")) + list((ROOT / "utils").glob("*.py"))
           if _imported_roots(p) & (set(METHODS) - {p.stem})}
    assert not bad, "a method file (or utils/) imports a method file: move the shared piece to utils/\n" + "\n".join(bad)


def test_marked_copies_stay_identical():
    """A method file's `# Copied from other.py:name` function is the same source as the original."""
    import ast
    import re

    def source_of(path: Path, name: str) -> str:
        text = path.read_text()
        node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name)
        return ast.get_source_segment(text, node)

    copies = [(p, m.group(1), m.group(2)) for p in ROOT.glob("*.py")
              for m in re.finditer(r"^# Copied from (\w+\.py):(\w+)$", p.read_text(), re.M)]
    assert copies, "no marked copy found (the check would be vacuous)"
    for p, other, name in copies:
        assert source_of(p, name) == source_of(ROOT / other, name), f"{p.name}:{name} differs from {other}"


def test_the_checker_sees_a_cross_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from search import beam_search\n    import prm_train.sub\n")
    assert _imported_roots(f) == {"search", "prm_train"}


def test_no_deprecation_warnings_from_our_calls(tiny_model_dir):
    """Sampling (KV cache), PRM scoring (whole and shared-prefix), and a training forward/backward with
    FutureWarning and DeprecationWarning raised as errors (newer transformers deprecate `past_key_values`)."""
    from utils.generation import HFBackend
    from utils.verifiers import PRMVerifier, build_prm
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        gen = HFBackend(tiny_model_dir, device="cpu")
        assert len(gen.sample([[5, 6, 7]], n=2, max_tokens=6, seed=0)[0]) == 2
        for head in ("lm2", "cls"):
            prm, tok = build_prm(str(tiny_model_dir), {"head": head})
            v = PRMVerifier(prm, tok, {"head": head})
            a = v.score(["q", "q"], [["a", "b"], ["a", "c"]])
            b = v.score_shared(["q", "q"], [["a", "b"], ["a", "c"]], [1, 1])
            assert sum(a, []) == pytest.approx(sum(b, []), abs=1e-5)
            ids = torch.tensor([[5, 6, 7, 8]])
            prm.train()
            prm(ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([3])).sum().backward()


def _run(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _fields(script: str) -> set[str]:
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_one_name_for_one_thing_across_scripts():
    """Shared settings carry one name in every script (TRL's where it has one): no alias of them survives."""
    aliases = {"limit": "n_problems", "n_train": "n_problems", "eval_problems": "n_eval_problems",
               "n_test": "n_eval_problems", "max_tokens": "max_new_tokens", "test_data": "eval_data",
               "n_mc": "mc_rollouts", "verifier_format": "a DIR:FORMAT verifier spec"}
    fields = {m: _fields(m) for m in METHODS}
    for m, f in fields.items():
        assert not f & set(aliases), f"{m}.py: {sorted(f & set(aliases))} (use {[aliases[a] for a in f & set(aliases)]})"
    uses = {"n_problems": {"prm_train", "search", "eval", "pav", "rstar_mcts"},
            "n_eval_problems": {"prm_train", "prime", "pav", "rstar_mcts"},
            "max_new_tokens": {"prm_train", "search", "eval", "prime", "pav"},
            "eval_data": {"prm_train", "prime", "pav", "rstar_mcts"}, "mc_rollouts": {"prm_train", "pav"},
            "rollouts": {"rstar_mcts"},  # MCTS rollouts; Monte-Carlo rollouts per prefix are mc_rollouts
            "out_dir": set(METHODS), "seed": set(METHODS), "bf16": {"prm_train", "prime", "ppm", "pav", "rstar_mcts"}}
    for name, want in uses.items():
        assert {m for m, f in fields.items() if name in f} == want, name


def test_every_script_has_help_and_one_line_flag_errors(capsys):
    """--help of every script (in one process: each module's Args through the same parser), and an unknown or
    abbreviated flag is one line and exit 2, before main runs."""
    import importlib

    from utils.train import parse_args, run_main
    for m in METHODS:
        mod = importlib.import_module(m)
        with pytest.raises(SystemExit) as e:
            parse_args(mod.Args, getattr(mod, "TOY", None), ["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--out_dir" in out and "--config" in out, m
        with pytest.raises(SystemExit) as e:
            run_main(lambda a: pytest.fail("main ran"), mod.Args, getattr(mod, "TOY", None), ["--no_such_flag", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "unknown argument --no_such_flag" in err[0], (m, err)
    r = _run(["search.py", "--n_prob", "5"])  # as a user runs it: abbreviations are refused, never overwritten
    assert r.returncode == 2 and "did you mean --n_problems?" in r.stderr and "Traceback" not in r.stderr


def test_user_errors_are_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "no answer"}\n')
    cases = [(["eval.py", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl")], "no data file"),
             (["eval.py", "--model", str(tiny_model_dir), "--data", str(bad)], "bad.jsonl:2: missing field"),
             (["search.py", "--model", str(tiny_model_dir), "--data", "math500", "--verifiers", f"p={tmp_path / 'nodir'}"],
              "verifier p: no dir"),
             (["eval.py", "--verifier", str(tmp_path), "--processbench", "processbench_gsm8k"], "no verifier in"),
             (["ppm.py", "--trees", str(tmp_path / "none.jsonl"), "--model", str(tiny_model_dir)], "No such file"),
             (["rstar_mcts.py", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--data", "math500",
               "--eval_data", "math500", "--uct", "ucb"], "--uct 'ucb'"),
             (["pav.py", "--model", str(tiny_model_dir), "--data", "math500", "--eval_data", "math500", "--mc_rollouts", "2",
               "--ks", "1,4"], "--mc_rollouts 2 < the largest K 4")]
    for args, want in cases:
        r = _run(args, env={**os.environ, "STEPWISE_DEBUG": ""})
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and want in err[-1] and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert err[-1].startswith(f"{args[0]}: error: ") and err[-1].endswith("(--debug for the traceback)")
    r = _run(cases[0][0] + ["--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug: the traceback is there


def test_too_long_prompts_are_unanswered(tiny_model_dir, tmp_path):
    """The tiny model's context is 512 tokens: MATH-500 prompts longer than that are recorded as
    unanswered (one warning), the run goes on over every problem."""
    from utils.data import build_prompt, load_problems
    from utils.generation import HFBackend
    probs = load_problems("math500", 40)
    gen = HFBackend(tiny_model_dir, device="cpu")
    long = [len(gen.encode(build_prompt(p["problem"]))) >= 512 for p in probs]
    assert 0 < sum(long) < 40
    out = tmp_path / "ev"
    r = _run(["eval.py", "--model", str(tiny_model_dir), "--data", "math500", "--n_problems", "40", "--max_new_tokens", "2",
              "--backend", "hf", "--out_dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 40 and res["n_too_long"] == sum(long)
    assert r.stderr.count("does not fit the model's context") == 1
    rows = [json.loads(line) for line in (out / "math500" / "samples.jsonl").read_text().splitlines()]
    assert [r["too_long"] for r in sorted(rows, key=lambda r: r["idx"])] == long
    assert all(r["correct"] == [False] and r["completions"] == [""] for r in rows if r["too_long"])


def test_toy_world_built_by_rank0_only(tmp_path):
    """A rank other than 0 never builds: it waits until rank 0's build is finished (calibration.json)."""
    code = ("import sys; sys.path.insert(0, '.'); from utils.toy import ensure_toy; "
            f"print(ensure_toy({str(tmp_path)!r}))")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "RANK": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    assert p.poll() is None and not (tmp_path / "train.jsonl").exists()  # waiting, not building
    (tmp_path / "calibration.json").write_text("{}")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out.strip().splitlines()[-1] == str(tmp_path) and "waiting for rank 0" in out
