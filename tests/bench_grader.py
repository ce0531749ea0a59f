"""Grader benchmark: reference self-consistency on MATH/GSM8K and ProcessBench final-answer agreement,
side by side with math-verify when it is installed (pip install math-verify; a benchmark-only extra).

    python tests/bench_grader.py [--out_dir runs/grader]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import DATA_DIR, read_jsonl  # noqa: E402
from utils.grader import extract_answer, grade, is_equiv  # noqa: E402


def math_verify_grade():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def g(response, gold):
        try:
            return bool(verify(parse("$" + gold + "$"), parse(response), timeout_seconds=3))
        except Exception:  # noqa: BLE001
            return False
    return g


def hostile_inputs(n: int, seed: int = 0):
    """Generated hostile answers: towers of powers, deep braces, unbalanced LaTeX, unicode, huge strings."""
    import random
    rng = random.Random(seed)
    atoms = ["10^{10^{10^{10}}}", "2^{2^{2^{100}}}", "9^{9^{9}}", "\\frac{1}{0}", "0^0", "\\sqrt{-1}", "x", "\\infty",
             "1e999999", "(", ")", "\\left(", "\\right]", "\\frac{", "\\boxed{", "}", "{", "日本", "\x00", "∞",
             "\\begin{pmatrix}", "\\\\", "&", "\\pm", ",", "=", "<", "\\sum_{n=1}^{\\infty}", "!" * 50, "%"]
    for i in range(n):
        k = i % 6
        if k == 0:
            yield "".join(rng.choice(atoms) for _ in range(rng.randint(1, 12)))
        elif k == 1:
            d = rng.randint(1, 20000)
            yield "{" * d + str(rng.randint(0, 9)) + "}" * rng.choice([d, d - 1, 0])
        elif k == 2:
            yield "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 200)))
        elif k == 3:
            yield rng.choice(atoms) * rng.randint(1000, 200000)  # up to megabytes
        elif k == 4:
            yield "^".join(str(rng.randint(2, 99)) for _ in range(rng.randint(2, 8)))
        else:
            yield rng.choice(["", " ", "$$", "\\boxed{}", "\\text{}", "\\"])


def adversarial(n: int, timeout: float) -> dict:
    import resource
    worst, t0 = 0.0, time.time()
    for i, a in enumerate(hostile_inputs(n)):
        if i % 1000 == 0:
            print(f"  adversarial {i}/{n}  worst call so far {worst:.2f}s", flush=True)
        for gold in ("5", a[:50]):
            for fn in (is_equiv, grade):
                t = time.monotonic()
                assert fn(a, gold, timeout=timeout) in (True, False)
                worst = max(worst, time.monotonic() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"inputs": n, "calls": 4 * n, "worst_call_s": worst, "timeout_s": timeout, "max_rss_mb": rss,
            "wall_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default="runs/grader")
    ap.add_argument("--limit", type=int, default=None, help="rows per file (default: all)")
    ap.add_argument("--adversarial", type=int, default=10000, help="hostile inputs to throw at the grader")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args()
    res = {}
    if a.adversarial:
        res["adversarial"] = adversarial(a.adversarial, a.timeout)
        print("adversarial:", res["adversarial"], flush=True)
    for name in ("math_test", "gsm8k_test"):
        rows = read_jsonl(DATA_DIR / f"{name}.jsonl")[: a.limit]
        ok = sum(is_equiv(extract_answer(r["solution"]), r["answer"]) for r in rows)
        res[f"reference/{name}"] = f"{ok}/{len(rows)}"
        print(f"reference {name}: {ok}/{len(rows)}", flush=True)
    mv = math_verify_grade()
    for split in ("gsm8k", "math", "olympiadbench"):
        rows = [r for r in read_jsonl(DATA_DIR / f"processbench_{split}.jsonl") if r["answer"] is not None][: a.limit]
        res[f"processbench/{split}/n"] = len(rows)
        for who, fn in (("stepwise", grade), ("math_verify", mv)):
            if fn is None:
                continue
            t = time.time()
            preds = [fn("\n\n".join(r["steps"]), r["answer"]) for r in rows]
            dt = time.time() - t
            agree = sum(p == r["final_answer_correct"] for p, r in zip(preds, rows)) / len(rows)
            fp = sum(p and not r["final_answer_correct"] for p, r in zip(preds, rows))
            res[f"processbench/{split}/{who}/agreement"] = agree
            res[f"processbench/{split}/{who}/false_pos"] = fp
            res[f"processbench/{split}/{who}/pairs_per_s"] = len(rows) / dt
            print(f"processbench {split:14s} {who:12s} agree {100 * agree:5.1f}%  false+ {fp:3d}  "
                  f"{len(rows) / dt:7.0f} pairs/s  (n={len(rows)})", flush=True)
            if who == "stepwise" and os.environ.get("SHOW_DISAGREE"):
                for p, r in zip(preds, rows):
                    if p != r["final_answer_correct"]:
                        print("   ", p, repr(extract_answer("\n\n".join(r["steps"])))[:80], "| gold", repr(r["answer"])[:60])
    for who in ("stepwise", "math_verify"):
        splits = [k.split("/")[1] for k in res if k.startswith("processbench/") and k.endswith(f"/{who}/agreement")]
        if splits:
            n = {sp: res[f"processbench/{sp}/n"] for sp in splits}
            agree = sum(res[f"processbench/{sp}/{who}/agreement"] * n[sp] for sp in splits) / sum(n.values())
            res[f"processbench/overall/{who}/agreement"] = agree
            print(f"processbench overall        {who:12s} agree {100 * agree:5.2f}%", flush=True)
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    Path(a.out_dir, "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
