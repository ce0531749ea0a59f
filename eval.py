"""eval.py: benchmark harness, PRM evaluation and reports.

Policy evaluation on benchmark JSONL files ({problem, answer}: the files in data/ by name, the toy
test split, or any path): greedy pass@1, or n samples per problem giving pass@k with the unbiased
estimator of Chen et al. 2021 (arXiv 2107.03374) and maj@k. Outputs are appended per batch, so
rerunning the same command resumes where a killed run stopped. A prompt longer than the model's
context is recorded as unanswered (counted wrong; `n_too_long` in results.json).

Verifier evaluation (any verifier dir, utils/verifiers.py): ProcessBench (Zheng et al., arXiv
2412.06559): the predicted error is the first step whose score is below the threshold (or -1), F1 =
harmonic mean of the accuracy on erroneous and on correct solutions, per split and averaged; the toy
ProcessBench (toy-policy samples labelled by the exact checker) with an "every step correct" baseline
(F1 0 by definition) and the oracle (1.0); and best-of-k reranking of a samples file with a verifier.

    python eval.py                                          # toy: policy on the toy test split (+ toy PRM)
    python eval.py --model DIR --data math500,gsm8k_test --n_samples 16 --k 1,4,16 --temperature 0.7 --out_dir OUT
    python eval.py --verifier runs/prm/exact --processbench processbench_gsm8k,processbench_math --out_dir OUT
    python eval.py --verifier runs/prm/exact --rerank OUT/math500/samples.jsonl --k 1,4,16
    python eval.py --compare runs/eval_a,runs/eval_b
    torchrun --nproc_per_node 8 eval.py --model DIR --data math500  # each rank a slice, rank 0 merges
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from utils.data import build_prompt, load_problems, read_jsonl, resolve_data, split_steps
from utils.grader import extract_answer, is_equiv
from utils.train import close_dist, run_main, setup_dist, write_json
from utils.verifiers import (AnswerGroups, aggregate, best_of_n, first_error_prediction, load_verifier,
                             processbench_f1, split_format, weighted_vote)


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "policy to evaluate (HF dir or hub id); empty: the toy policy"})
    data: str = field(default="", metadata={"help": "comma list of benchmark JSONL paths or data/ names (default: toy test)"})
    n_problems: int = field(default=0, metadata={"help": "first n problems of each benchmark (0: all)"})
    n_samples: int = field(default=1, metadata={"help": "samples per problem (n of pass@k)"})
    k: str = field(default="1", metadata={"help": "comma list of k for pass@k and maj@k (k <= n)"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (Qwen2.5-Math's pass@1 protocol)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=2048, metadata={"help": "max generated tokens per sample"})
    chat: bool = field(default=False, metadata={"help": "chat template with the Qwen2.5-Math system prompt"})
    backend: str = field(default="auto", metadata={"help": "auto | vllm | hf"})
    tensor_parallel: int = field(default=1, metadata={"help": "vLLM tensor parallel size (large models)"})
    batch_problems: int = field(default=64, metadata={"help": "problems per generation batch (the unit a kill can lose)"})
    verifier: str = field(default="", metadata={"help": "verifier dir (utils/verifiers.py; DIR:FORMAT for a public PRM "
                                                        "without verifier.json) or oracle, for ProcessBench / reranking"})
    verifier_dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"})
    processbench: str = field(default="", metadata={"help": "comma list of ProcessBench JSONL files or names"})
    threshold: float = field(default=0.5, metadata={"help": "ProcessBench: first step scored below this is the error"})
    rerank: str = field(default="", metadata={"help": "a samples.jsonl written by this script, reranked with --verifier"})
    agg: str = field(default="min", metadata={"help": "step aggregation for reranking: min | last | prod | mean"})
    toy_processbench: int = field(default=0, metadata={"help": "toy ProcessBench size (policy samples on toy test)"})
    compare: str = field(default="", metadata={"help": "comma list of out_dirs: print their results side by side"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    out_dir: str = field(default="runs/eval", metadata={"help": "samples JSONL, results.json, tables"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


TOY = dict(n_samples=16, k="1,4,16", temperature=1.0, max_new_tokens=200, backend="hf", toy_processbench=500,
           verifier="runs/prm/exact")


# ----------------------------------------------------------------------------- metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def maj_at_k(answers: list, correct: list, k: int) -> float:
    """Majority vote over each of the n//k disjoint groups of k samples; the fraction of groups whose
    plurality answer is right (answers grouped by normalised string, ties to the first seen)."""
    groups = [range(g * k, (g + 1) * k) for g in range(len(answers) // k)]
    hits = []
    for idx in groups:
        votes = Counter(answers[i] for i in idx if answers[i] is not None)
        if not votes:
            hits.append(False)
            continue
        top = votes.most_common(1)[0][0]
        hits.append(any(correct[i] for i in idx if answers[i] == top))
    return sum(hits) / max(1, len(hits))


def summarize(rows: list[dict], ks: list[int]) -> dict:
    n = len(rows[0]["correct"]) if rows else 0
    res = {"n": len(rows), "samples_per_problem": n, "n_too_long": sum(bool(r.get("too_long")) for r in rows),
           "pass@1": sum(sum(r["correct"]) / len(r["correct"]) for r in rows) / max(1, len(rows))}
    for k in ks:
        if k > n:
            continue
        res[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in rows) / max(1, len(rows))
        res[f"maj@{k}"] = sum(maj_at_k(r["answers"], r["correct"], k) for r in rows) / max(1, len(rows))
    return res


# ----------------------------------------------------------------------------- resumable outputs
def read_done(paths: list[Path]) -> dict:
    """Rows already written, by problem index. A torn last line (a kill mid-write) is dropped."""
    done = {}
    for p in paths:
        if not p.exists():
            continue
        lines = p.read_text().splitlines(keepends=True)
        good = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # torn tail: cut it off so appends stay valid JSONL
                    p.write_text("".join(good))
                    break
                raise
            if not line.endswith("\n") and i == len(lines) - 1:
                p.write_text("".join(good))
                break
            good.append(line)
            done[row["idx"]] = row
    return done


def append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def eval_benchmark(gen, name: str, problems: list[dict], args: Args, dist, out: Path) -> dict | None:
    """Generate, extract and grade every problem once; rows are appended per batch (resumable)."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    mine = d / (f"samples.rank{dist.rank}.jsonl" if dist.on else "samples.jsonl")
    done = read_done(sorted(d.glob("samples*.jsonl")))
    todo = [i for i in range(len(problems)) if i % dist.world == dist.rank and i not in done]
    tok = gen.tokenizer
    bar = tqdm(total=len(todo), desc=f"eval {name}", disable=not dist.main)
    for s in range(0, len(todo), args.batch_problems):
        idx = todo[s: s + args.batch_problems]
        prompts = [build_prompt(problems[i]["problem"], tok, args.chat) for i in idx]
        outs = gen.sample([tok.encode(p, add_special_tokens=False) for p in prompts], n=args.n_samples,
                          temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                          seed=args.seed + idx[0])
        rows = []
        for i, p, o in zip(idx, prompts, outs):
            answers = [extract_answer(c.text) for c in o]
            gold = str(problems[i]["answer"])
            rows.append({"idx": i, "problem": problems[i]["problem"], "answer": gold, "prompt": p,
                         "too_long": o[0].finish == "too_long", "completions": [c.text for c in o], "answers": answers,
                         "correct": [is_equiv(a, gold) for a in answers], "tokens": [len(c.token_ids) for c in o]})
        append_rows(mine, rows)
        bar.update(len(idx))
    bar.close()
    if dist.on:
        torch.distributed.barrier()
    if not dist.main:
        return None
    done = read_done(sorted(d.glob("samples*.jsonl")))
    rows = [done[i] for i in sorted(done) if i < len(problems)]
    if dist.on:  # merge the ranks' files into one
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for p in d.glob("samples.rank*.jsonl"):
            p.unlink()
    res = summarize(rows, [int(x) for x in args.k.split(",")])
    res["mean_tokens"] = sum(sum(r["tokens"]) / len(r["tokens"]) for r in rows) / max(1, len(rows))
    write_json(d / "results.json", res)
    return res


# ----------------------------------------------------------------------------- verifier evaluation
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def processbench_eval(verifier, rows: list[dict], thresholds=(0.5,)) -> dict:
    """F1 at each threshold from a verifier's per-step scores of ProcessBench rows {problem, steps, label}."""
    scores = verifier.score([r["problem"] for r in rows], [r["steps"] for r in rows])
    labels = [r["label"] for r in rows]
    return {f"{t}": processbench_f1([first_error_prediction(s, t) for s in scores], labels) for t in thresholds}


class AllCorrect:
    """The "every step correct" baseline of the toy ProcessBench (F1 0 by definition)."""
    tokens = 0

    def score(self, problems, steps_lists):
        return [[1.0] * len(s) for s in steps_lists]


def rerank(path: str, verifier, ks: list[int], agg: str) -> dict:
    """Best-of-k and verifier-weighted vote over each samples.jsonl row's completions (disjoint groups)."""
    rows = read_jsonl(path, required=("problem", "completions", "answers", "correct"))
    res = {}
    flat = verifier.score([r["problem"] for r in rows for _ in r["completions"]],
                          [split_steps(c) or [c] for r in rows for c in r["completions"]])
    j = 0
    per = []
    for r in rows:
        per.append([aggregate(s, agg) for s in flat[j: j + len(r["completions"])]])
        j += len(r["completions"])
    for k in ks:
        bon, wv = [], []
        for r, sc in zip(rows, per):
            for g in range(len(sc) // k):
                sl = slice(g * k, (g + 1) * k)
                a, c = r["answers"][sl], r["correct"][sl]
                pick = best_of_n(a, sc[sl])
                bon.append(any(ci for ai, ci in zip(a, c) if ai == pick and pick is not None))
                w = weighted_vote(a, sc[sl], AnswerGroups())
                wv.append(w is not None and is_equiv(w, r["answer"]))
        if bon:
            res[f"rerank/bon@{k}"], res[f"rerank/weighted@{k}"] = sum(bon) / len(bon), sum(wv) / len(wv)
    return res


# ----------------------------------------------------------------------------- reports
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def table(columns: dict) -> str:
    """Markdown: one row per metric, one column per run/benchmark."""
    flat = {c: flatten(v) for c, v in columns.items()}
    keys = sorted({k for f in flat.values() for k in f})
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for k in keys:
        cells = [f"{flat[c][k]:.4g}" if k in flat[c] else "-" for c in columns]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_k(results: dict, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for bench, r in results.items():
        for m in ("pass", "maj"):
            ks = sorted(int(k.split("@")[1]) for k in r if k.startswith(f"{m}@"))
            if ks:
                ax.plot(ks, [r[f"{m}@{k}"] for k in ks], marker="o", label=f"{bench} {m}@k")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_k.png", dpi=120)


# ----------------------------------------------------------------------------- main
def main(args: Args):
    t0 = time.time()
    out = Path(args.out_dir)
    if args.compare:
        runs = {Path(r).name or r: json.loads((Path(r) / "results.json").read_text()) for r in args.compare.split(",")}
        md = table(runs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        print(md)
        return
    dist = setup_dist()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(args))
    toy = not args.model and not args.processbench and not args.rerank
    if toy:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model, args.data = str(tdir / "policy"), args.data or str(tdir / "test.jsonl")
    results = {}

    # 1. policy on benchmarks (every file read, and every row checked, before the model loads)
    if args.model and args.data:
        from utils.generation import load_backend
        benches = {name: load_problems(name, args.n_problems or None) for name in args.data.split(",")}
        kw = {"tensor_parallel_size": args.tensor_parallel} if args.tensor_parallel > 1 else {}
        gen = load_backend(args.model, backend=args.backend, **kw)
        for name, problems in benches.items():
            bench = Path(name).stem if name.endswith(".jsonl") else name
            res = eval_benchmark(gen, bench, problems, args, dist, out)
            if res is not None:
                results[bench] = res
                print(f"{bench}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res.items() if "@" in k), flush=True)
        if toy and args.toy_processbench and dist.main:  # toy ProcessBench from the same policy
            from utils.data import write_jsonl
            from utils.toy import toy_processbench
            pb_path = out / "toy_processbench.jsonl"
            if not pb_path.exists():
                test = read_jsonl(tdir / "test.jsonl")[: args.toy_processbench]
                write_jsonl(pb_path, toy_processbench(gen, test, args.chat, 1.0, args.max_new_tokens, args.seed))
        del gen
    if not dist.main:
        close_dist(dist)
        return

    # 2. the verifier on ProcessBench files, and on the toy ProcessBench with its two reference points
    pb = {}
    if args.processbench:
        if not args.verifier:
            raise ValueError("--processbench needs --verifier")
        fn = load_verifier(args.verifier, dtype=args.verifier_dtype)
        for name in args.processbench.split(","):
            rows = read_jsonl(resolve_data(name), required=("problem", "steps", "label"))
            split = Path(name).stem.replace("processbench_", "")
            r = processbench_eval(fn, rows, SWEEP)
            pb[split] = {**r[f"{args.threshold}"], "sweep": {t: v["f1"] for t, v in r.items()}}
            print(f"ProcessBench {split}: F1 {pb[split]['f1']:.3f}", flush=True)
        pb["average"] = {"f1": sum(v["f1"] for v in pb.values()) / len(pb)}
    if toy and (out / "toy_processbench.jsonl").exists():
        rows = read_jsonl(out / "toy_processbench.jsonl")
        fns = {"all_correct": AllCorrect(), "oracle": load_verifier("oracle")}
        if args.verifier and Path(split_format(args.verifier)[0]).is_dir():
            fns["prm"] = load_verifier(args.verifier, dtype=args.verifier_dtype)
        for who, fn in fns.items():
            pb[f"toy/{who}"] = processbench_eval(fn, rows, (args.threshold,))[f"{args.threshold}"]
            print(f"toy ProcessBench, {who}: F1 {pb[f'toy/{who}']['f1']:.3f}", flush=True)
    results.update(flatten(pb, "processbench/"))  # processbench/{split}/f1, processbench/average/f1, .../toy/prm/f1

    # 3. reranking a samples file with the verifier
    if args.rerank:
        if not args.verifier:
            raise ValueError("--rerank needs --verifier")
        results["rerank"] = rerank(args.rerank, load_verifier(args.verifier, dtype=args.verifier_dtype),
                                   [int(x) for x in args.k.split(",")], args.agg)
        print(results["rerank"])

    if len(results) == 1 and isinstance(next(iter(results.values())), dict) and "rerank" not in results:
        results = {**next(iter(results.values())), "benchmark": next(iter(results))}  # one file: flat keys
    results["wall_s"] = time.time() - t0
    write_json(out / "results.json", results)
    bench = {k: v for k, v in results.items() if isinstance(v, dict) and "pass@1" in v}
    md = table(bench if bench else {"run": results})
    (out / "results.md").write_text(md)
    print(md)
    plot_k(bench or ({results.get("benchmark", "run"): results} if "pass@1" in results else {}), out)
    close_dist(dist)


if __name__ == "__main__":
    run_main(main, Args, TOY)
