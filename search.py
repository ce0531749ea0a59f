"""search.py: verifier-guided test-time search and its scaling table, every verifier on one table.

Sources: "Let's Verify Step by Step" (Lightman et al., arXiv 2305.20050: best-of-N and the PRM > ORM >
majority ordering); OpenR (arXiv 2410.09671) and HuggingFace search-and-learn ("Scaling test-time
compute", 2024: step-level beam search and DVTS).

Strategies, each verifier's per-step scores read through utils/verifiers.py:
  maj       majority vote over N sampled answers (answers grouped by the grader's equivalence);
  bon       best-of-N: the sample with the highest aggregated verifier score (RM-max);
  weighted  verifier-weighted vote: the answer whose samples' scores sum highest (RM-vote);
  beam      step-level beam search: N beams; each step ends at "\\n\\n"; keep the top N/M by score and
            expand each M ways; finished beams go to a pool; the best pooled beam is the answer;
  dvts      diverse verifier tree search: N/M independent subtrees, each keeping its best of M
            one-step candidates per iteration.
Verifiers (`--verifiers name=DIR,name=DIR,oracle`): any verifier dir (prm_train.py's PRM and ORM, the
verifiers of the other method files, public PRMs: see utils/verifiers.py) and, on the toy world, the
exact checker (`oracle`, an upper bound). All of them score the same N_max samples of the same problems;
maj/bon/weighted at every N come from that one run; beam and DVTS run per verifier and per N. Every row is
compared with majority at the same N on the same problems: `vs_maj/{name}/{method}@{N}` = [difference,
95% interval] from a paired bootstrap over problems.

Deviations from search-and-learn:
  1. A beam's lookahead steps (--lookahead) are scored with the beam; upstream generates them but
     scores only the step before.
  2. bon/weighted/maj at N < N_max average over the N_max/N disjoint groups of the N_max samples
     (upstream takes the first N), which lowers the variance of the small-N points.
  3. Toy-scale settings (TOY below) replace the defaults when --model is empty.
  4. A solution's score is its lowest step score (`--agg min`, as in eval.py), not the last step's.
     search-and-learn's PRM (RLHFlow's, MC labels on every step) is value-like; prm_train.py stops
     each solution's labels at its first error (PRM800K, ProcessBench), so a step after an error is
     never trained on and the last step's score says little about the steps before it (toy: mean
     last-step score 0.86-0.88 whatever the first error, 0.93 for right solutions; lowest step
     score 0.23-0.50 by kind of error, 0.73 for right solutions; docs/results/search.md).
  5. Under torchrun each rank searches a shard of the problems (rank r: problems r, r + W, ...) with its own
     engine and verifiers, and rank 0 merges; upstream runs one process per dataset shard by hand. The
     samples of a problem depend on its shard's batches, so W ranks draw other samples than one process.

    python search.py                                    # toy world on CPU: the shipped toy PRM and ORM, the checker
    python search.py --verifiers prm=runs/prm/exact,orm=runs/prm/outcome,oracle   # your own (python prm_train.py)
    python search.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --chat --data math500 \\
        --verifiers qwen=models/Qwen2.5-Math-PRM-7B,rlhf=models/Llama3.1-8B-PRM-Deepseek-Data:rlhflow
    torchrun --nproc_per_node 8 search.py --model MODEL --data math500 --verifiers prm=DIR --backend hf
"""
from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.data import build_prompt, load_problems, split_steps, write_jsonl
from utils.generation import load_backend
from utils.grader import extract_answer, is_equiv
from utils.train import close_dist, gather_lists, run_main, seed_all, setup_dist, write_json
from utils.verifiers import (AnswerGroups, aggregate, best_of_n, load_verifier, majority, parse_verifiers,
                             split_format, weighted_vote)


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "policy (HF dir or hub id); empty: the toy policy"})
    data: str = field(default="", metadata={"help": "problems JSONL {problem, answer} or a data/ name (default: toy test)"})
    n_problems: int = field(default=0, metadata={"help": "first n problems (0: all)"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    chat: bool = field(default=False, metadata={"help": "prompt with the tokenizer's chat template"})
    verifiers: str = field(default="", metadata={"help": "comma list of name=DIR (any verifier dir; DIR:FORMAT for a "
                                                         "public PRM without verifier.json: qwen-prm | math-shepherd | "
                                                         "rlhflow | trl), oracle and, on the toy, shipped:prm / "
                                                         "shipped:orm (the toy verifiers in utils/toy_weights; toy "
                                                         "default: prm=shipped:prm,orm=shipped:orm,oracle)"})
    verifier_dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"})
    verifier_device_map: str = field(default="", metadata={"help": "'auto': spread each PRM over the visible GPUs "
                                                                   "(a 72B PRM; needs accelerate)"})
    guide: str = field(default="", metadata={"help": "verifiers that guide beam/DVTS, comma list of names (default: all)"})
    methods: str = field(default="maj,bon,weighted,beam,dvts", metadata={"help": "comma list of strategies"})
    ns: str = field(default="1,2,4,8,16,32,64", metadata={"help": "budgets N (search-and-learn: 4..256)"})
    search_ns: str = field(default="", metadata={"help": "budgets N for beam/DVTS (default: --ns; N >= beam_width)"})
    beam_width: int = field(default=4, metadata={"help": "M: expansions per kept beam (search-and-learn: 4)"})
    max_depth: int = field(default=40, metadata={"help": "step iterations before the rest is sampled to the end (search-and-learn: 40)"})
    lookahead: int = field(default=0, metadata={"help": "greedy steps rolled out (and scored) past each candidate (search-and-learn: 0)"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (search-and-learn: 0.8)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (search-and-learn: 1.0)"})
    max_new_tokens: int = field(default=2048, metadata={"help": "max generated tokens per solution (search-and-learn: 2048)"})
    agg: str = field(default="min", metadata={"help": "step aggregation: min | last (search-and-learn) | prod | mean; "
                                                   "see deviation 4"})
    backend: str = field(default="auto", metadata={"help": "auto | vllm | hf"})
    verifier_prefix_cache: bool = field(default=True, metadata={"help": "beam/DVTS: the verifier runs siblings' shared steps once (same scores)"})
    cache_check: int = field(default=0, metadata={"help": "if > 0: time beam search at this N with prefix caching (vLLM's and the verifier's) on and off"})
    cache_check_repeats: int = field(default=3, metadata={"help": "timed runs of each setting in --cache_check, alternating on/off; medians reported"})
    out_dir: str = field(default="runs/search", metadata={"help": "per-problem JSONL, results.json, scaling table"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


TOY = dict(n_problems=100, search_ns="4,8,16", max_depth=6, max_new_tokens=160, temperature=1.0, backend="hf",
           verifiers="prm=shipped:prm,orm=shipped:orm,oracle")
SEARCHES = ("beam", "dvts")


# ----------------------------------------------------------------------------- statistics
def paired_interval(a: list[float], b: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) over problems and its 95% interval from a paired bootstrap (problems resampled
    with replacement, both methods on the same draw): whether a gap over majority is more than noise."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(iters, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------- search
@dataclass
class Beam:
    ids: list  # prompt + generated ids
    steps: list  # step texts
    done: bool = False
    score: float = 0.0


def _is_done(sample, step_text: str) -> bool:
    return sample.finish in ("eos", "length", "too_long") or "boxed" in step_text


def beam_search(gen, problems, prompts, n: int, m: int, verifier, args, ledger, diverse: bool = False):
    """Step-level beam search (diverse=False) or DVTS (diverse=True), batched over all problems.
    Beam: N candidates from the prompt, keep the top N/M, expand each M ways, repeat; finished
    candidates go to the pool. DVTS: N/M subtrees each expand M ways and keep their own best."""
    keep = max(1, n // m)
    frontier = {i: [Beam(list(prompts[i]), [])] for i in range(len(problems))}  # per problem
    pool = {i: [] for i in range(len(problems))}
    for depth in range(args.max_depth + 1):
        live = [(i, b) for i, bs in frontier.items() for b in bs]
        if not live:
            break
        k = m
        if depth == 0 and diverse:  # N/M subtrees, each expanding M ways from the prompt
            live = [(i, b) for i, b in live for _ in range(keep)]
        elif depth == 0:  # N candidates from the prompt
            k = n
        last = depth == args.max_depth  # the last iteration samples each candidate to the end
        kids = _expand(gen, [b.ids for _, b in live], k, args, ledger, to_end=last)
        children, n_parent = defaultdict(list), {}
        for (i, b), ks in zip(live, kids):
            children[i].append([Beam(b.ids + list(s.token_ids), b.steps + split_steps(s.text), _is_done(s, s.text) or last)
                                for s in ks])
            n_parent.update({id(c): len(b.steps) for c in children[i][-1]})
        flat = [(i, c) for i, groups in children.items() for g in groups for c in g]
        scored = [c.steps or [""] for _, c in flat]
        ahead, ended = [c.ids for _, c in flat], set()
        for _ in range(args.lookahead):  # deviation 1: greedy steps past each open candidate, scored with it
            open_ = [j for j, (_, c) in enumerate(flat) if not c.done and j not in ended]
            if not open_:
                break
            for j, o in zip(open_, _expand(gen, [ahead[j] for j in open_], 1, args, ledger, greedy=True)):
                ahead[j] = ahead[j] + list(o[0].token_ids)
                scored[j] = scored[j] + split_steps(o[0].text)
                if _is_done(o[0], o[0].text):
                    ended.add(j)
        t = time.time()  # siblings share their parent's steps: the verifier runs those once (--verifier_prefix_cache)
        ps = [problems[i] for i, _ in flat]
        scores = (verifier.score_shared(ps, scored, [n_parent[id(c)] for _, c in flat]) if args.verifier_prefix_cache
                  else verifier.score(ps, scored))
        ledger["verify_seconds"] = ledger.get("verify_seconds", 0.0) + time.time() - t
        for (i, c), s in zip(flat, scores):
            c.score = aggregate(s, args.agg)
        frontier = {}
        for i, groups in children.items():
            if diverse:  # each subtree keeps its best candidate; a finished best ends the subtree
                nxt = []
                for g in groups:
                    best = max(g, key=lambda c: c.score)
                    if best.done:
                        pool[i].extend(c for c in g if c.done)
                    else:
                        nxt.append(best)
            else:
                cands = [c for g in groups for c in g]
                pool[i].extend(c for c in cands if c.done)
                open_ = sorted((c for c in cands if not c.done), key=lambda c: -c.score)
                nxt = open_[:keep] if len(pool[i]) < n else []
            if nxt:
                frontier[i] = nxt
    return pool


def _expand(gen, prefixes, k, args, ledger, to_end=False, greedy=False):
    """k one-step children per prefix (or run to the end). A child is its parent's ids + step ids."""
    ledger["calls"] += 1
    kw = dict(n=k, temperature=0.0 if greedy else args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
              seed=random.randrange(2**31), logprobs=False)
    t = time.time()
    outs = gen.sample(prefixes, **kw) if to_end else gen.step(prefixes, **kw)
    ledger["gen_seconds"] = ledger.get("gen_seconds", 0.0) + time.time() - t
    ledger["tokens"] += sum(len(s.token_ids) for o in outs for s in o)
    return outs


# ----------------------------------------------------------------------------- main
def int_list(flag: str, value: str) -> list[int]:
    """"1,4,16" -> [1, 4, 16]; anything else is a ValueError naming the flag."""
    try:
        out = sorted(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{flag} {value!r}: expected a comma list of whole numbers, e.g. 1,4,16") from None
    if not out or out[0] < 1:
        raise ValueError(f"--{flag} {value!r}: expected budgets >= 1")
    return out


def main(args: Args):
    t0 = time.time()
    seed_all(args.seed)
    methods = [m for m in args.methods.split(",") if m]  # every setting checked before any generation
    bad = sorted(set(methods) - {"maj", "bon", "weighted"} - set(SEARCHES))
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad or args.methods!r} (maj, bon, weighted, beam, dvts)")
    ns, search_ns = int_list("ns", args.ns), int_list("search_ns", args.search_ns or args.ns)
    aggregate([1.0], args.agg)  # an unknown aggregation raises here
    dist = setup_dist()
    out = Path(args.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(args))
    toy = not args.model
    if toy:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model, args.data = str(tdir / "policy"), args.data or str(tdir / "test.jsonl")
    spec = parse_verifiers(args.verifiers)
    if not toy and any(p == "oracle" or p.startswith("shipped:") for p in spec.values()):
        raise ValueError("oracle and shipped:* are the toy world's verifiers (leave --model empty, or drop them)")
    if toy:
        from utils.toy import resolve_toy_verifiers
        spec = resolve_toy_verifiers(spec, tdir)
    for name, path in spec.items():
        if path != "oracle" and not Path(split_format(path)[0]).is_dir():
            raise FileNotFoundError(f"verifier {name}: no dir {path!r}")
    guide = [g for g in (args.guide.split(",") if args.guide else spec) if g]
    if set(guide) - set(spec):
        raise ValueError(f"--guide names {sorted(set(guide) - set(spec))}, not in --verifiers {list(spec)}")
    if not spec and set(methods) - {"maj"}:
        raise ValueError(f"--methods {args.methods} need --verifiers (only maj runs without one)")
    if args.cache_check and dist.on:
        raise ValueError("--cache_check times one process: run it without torchrun")
    problems = load_problems(args.data, args.n_problems or None)
    mine = list(range(len(problems)))[dist.rank::dist.world]  # torchrun: each rank a shard, rank 0 merges
    texts, golds = [problems[i]["problem"] for i in mine], [str(problems[i]["answer"]) for i in mine]
    verifiers = {name: load_verifier(path, device=dist.device, dtype=args.verifier_dtype,
                                     device_map=args.verifier_device_map) for name, path in spec.items()}
    gen = load_backend(args.model, backend=args.backend)  # under torchrun on the rank's GPU (setup_dist sets it)
    tok = gen.tokenizer
    prompts = [tok.encode(build_prompt(p, tok, args.chat), add_special_tokens=False) for p in texts]
    groups = [AnswerGroups() for _ in texts]
    right = lambda i, a: a is not None and is_equiv(a, golds[i])  # noqa: E731
    # per problem of this shard: accuracy and generated tokens of every row, its per-problem record
    by_problem, tokens, per_problem = defaultdict(list), defaultdict(list), [
        {"problem": t, "answer": g} for t, g in zip(texts, golds)]
    res = {}

    # 1. one run of N_max independent samples serves maj / bon / weighted at every N, for every verifier
    nmax = ns[-1]
    t = time.time()
    outs = []
    for s in tqdm(range(0, len(prompts), 16), desc=f"sample N={nmax}", disable=not dist.main):
        outs += gen.sample(prompts[s: s + 16], n=nmax, temperature=args.temperature, top_p=args.top_p,
                           max_tokens=args.max_new_tokens, seed=args.seed + s + 100003 * dist.rank, logprobs=False)
    sample_s = time.time() - t
    too_long = sum(o[0].finish == "too_long" for o in outs)  # prompts over the context: unanswered
    answers = [[extract_answer(c.text) for c in o] for o in outs]
    steps = [[split_steps(c.text) or [""] for c in o] for o in outs]
    ntok = [[len(c.token_ids) for c in o] for o in outs]
    vscores = {}
    for name, v in verifiers.items():
        flat = v.score([texts[i] for i in range(len(outs)) for _ in outs[i]], [s for st in steps for s in st])
        vscores[name] = [flat[i * nmax: (i + 1) * nmax] for i in range(len(outs))]
    for i, row in enumerate(per_problem):
        row.update(completions=[c.text for c in outs[i]], answers=answers[i],
                   scores={k: v[i] for k, v in vscores.items()})
    for n in ns:
        for i in range(len(texts)):
            acc = defaultdict(list)
            for g in range(nmax // n):  # deviation 2: average over the disjoint groups
                sl = slice(g * n, (g + 1) * n)
                a = answers[i][sl]
                acc["maj"].append(right(i, majority(a, groups[i])))
                for name in vscores:
                    sc = [aggregate(s, args.agg) for s in vscores[name][i][sl]]
                    if "bon" in methods:
                        acc[f"{name}/bon"].append(right(i, best_of_n(a, sc)))
                    if "weighted" in methods:
                        acc[f"{name}/weighted"].append(right(i, weighted_vote(a, sc, groups[i])))
            for k, v in acc.items():
                by_problem[f"{k}@{n}"].append(sum(v) / len(v))
                tokens[f"{k}@{n}"].append(sum(ntok[i][:n]))

    # 2. beam search and DVTS, one run per guiding verifier and N (in that order: the first verifier's runs
    #    draw the same step seeds whatever else is listed after it)
    ledgers = {}
    for name in guide:
        for method in [m for m in methods if m in SEARCHES]:
            for n in search_ns:
                if n < args.beam_width:
                    continue
                key, ledger, t = f"{name}/{method}@{n}", {"calls": 0, "tokens": 0}, time.time()
                pool = beam_search(gen, texts, prompts, n, args.beam_width, verifiers[name], args, ledger,
                                   diverse=method == "dvts")
                for i in range(len(texts)):
                    done = pool[i]
                    a = [extract_answer(tok.decode(b.ids[len(prompts[i]):], skip_special_tokens=True)) for b in done]
                    pred = best_of_n(a, [b.score for b in done]) if done else None
                    by_problem[key].append(float(right(i, pred)))
                    per_problem[i].setdefault(f"{name}/{method}", {})[n] = {"pred": pred, "pool": len(done)}
                ledgers[key] = {"tokens": ledger["tokens"], "calls": ledger["calls"], "seconds": time.time() - t}
                if dist.main:
                    print(f"{key}: {100 * sum(by_problem[key]) / max(1, len(texts)):.1f}%  "
                          f"{ledger['tokens'] / max(1, len(texts)):.0f} tok/problem ({time.time() - t:.0f}s)", flush=True)

    # 3. rank 0 merges the shards (problems back in their order) and writes every output
    shard = gather_lists(dist, [{"idx": mine, "by_problem": dict(by_problem), "tokens": dict(tokens),
                                 "per_problem": per_problem, "ledgers": ledgers, "too_long": too_long,
                                 "verifier_tokens": {k: v.tokens for k, v in verifiers.items()}}])
    if not dist.main:
        close_dist(dist)
        return
    order = [i for sh in shard for i in sh["idx"]]
    rank_of = sorted(range(len(order)), key=order.__getitem__)  # merged position -> original problem order

    def merged(field: str, key: str) -> list:
        flat = [x for sh in shard for x in sh[field].get(key, [])]
        return [flat[j] for j in rank_of] if len(flat) == len(order) else flat
    res["n_too_long"] = sum(sh["too_long"] for sh in shard)
    keys = list(shard[0]["by_problem"])
    by_problem = {k: merged("by_problem", k) for k in keys}
    for k in keys:
        res[k] = sum(by_problem[k]) / len(by_problem[k])
        if k in shard[0]["tokens"]:
            res[f"tokens/{k}"] = sum(merged("tokens", k)) / len(order)
        else:  # beam / DVTS: the generator's tokens over every rank's problems
            res[f"tokens/{k}"] = sum(sh["ledgers"][k]["tokens"] for sh in shard) / len(order)
            res[f"calls/{k}"] = sum(sh["ledgers"][k]["calls"] for sh in shard)
            res[f"seconds/{k}"] = max(sh["ledgers"][k]["seconds"] for sh in shard)
    res["sample_seconds"] = sample_s
    for key, v in by_problem.items():  # each method against majority at the same N, on the same problems
        m, n = key.split("@")
        if m != "maj" and f"maj@{n}" in by_problem:
            res[f"vs_maj/{key}"] = list(paired_interval(v, by_problem[f"maj@{n}"], seed=args.seed))
    for name in verifiers:
        vt = sum(sh["verifier_tokens"][name] for sh in shard)
        if vt:
            res[f"verifier_tokens/{name}"] = vt
    per_problem = [r for sh in shard for r in sh["per_problem"]]
    per_problem = [per_problem[j] for j in rank_of]

    # 4. prefix caching on vs off (vLLM), beam search at one N
    if args.cache_check:
        if not guide:
            raise ValueError("--cache_check needs a verifier to guide beam search (--verifiers)")
        res.update(cache_check(args, texts, prompts, verifiers[guide[0]]))
    res["wall_s"] = time.time() - t0
    res["world_size"] = dist.world
    write_jsonl(out / "problems.jsonl", per_problem)
    write_json(out / "results.json", res)
    rows = ["maj"] + [f"{v}/{m}" for v in spec for m in ("bon", "weighted") + SEARCHES]
    table = scaling_table(res, ns, rows)
    (out / "scaling.md").write_text(table)
    print(table)
    plot(res, ns, rows, out)
    close_dist(dist)


def cache_check(args, texts, prompts, verifier) -> dict:
    """Beam search wall-clock with prefix caching on and off (same seeds, same N): vLLM's prefix cache
    for the generator and --verifier_prefix_cache for the PRM. Both engines are built and warmed up
    (an untimed 2-problem search) first; then the timed runs alternate on, off, on, off, ... with the
    prefix cache reset before each cached run, and each setting's median times are reported."""
    from utils.generation import VLLMBackend
    key, keep, gens = f"cache_check/beam@{args.cache_check}", args.verifier_prefix_cache, {}
    for on in (True, False):
        gens[on] = VLLMBackend(args.model, enable_prefix_caching=on, seed=args.seed)
        args.verifier_prefix_cache = on
        random.seed(args.seed + 1)
        beam_search(gens[on], texts[:2], prompts[:2], args.beam_width, args.beam_width, verifier, args,
                    {"calls": 0, "tokens": 0})
    runs = {True: [], False: []}
    for _ in tqdm(range(max(1, args.cache_check_repeats)), desc="cache check"):
        for on in (True, False):
            gens[on].llm.reset_prefix_cache()
            args.verifier_prefix_cache = on
            random.seed(args.seed)
            ledger, t = {"calls": 0, "tokens": 0}, time.time()
            beam_search(gens[on], texts, prompts, args.cache_check, args.beam_width, verifier, args, ledger)
            runs[on].append({"seconds": time.time() - t, "generation_seconds": ledger["gen_seconds"],
                             "verifier_seconds": ledger.get("verify_seconds", 0.0), "tokens": ledger["tokens"]})
    del gens
    args.verifier_prefix_cache = keep
    out = {}
    for on, sfx in ((True, "on"), (False, "off")):
        for k in ("seconds", "generation_seconds", "verifier_seconds", "tokens"):
            out[f"{key}/{k}_caching_{sfx}"] = statistics.median(r[k] for r in runs[on])
        out[f"{key}/all_seconds_caching_{sfx}"] = [r["seconds"] for r in runs[on]]
    x = {k: (out[f"{key}/{k}_caching_on"], out[f"{key}/{k}_caching_off"]) for k in ("seconds", "generation_seconds", "verifier_seconds")}
    out["cache_check/speedup"] = x["seconds"][1] / x["seconds"][0]
    out["cache_check/generation_speedup"] = x["generation_seconds"][1] / x["generation_seconds"][0]
    out["cache_check/verifier_speedup"] = x["verifier_seconds"][1] / max(x["verifier_seconds"][0], 1e-9)
    print(f"prefix caching, beam@{args.cache_check} (median of {len(runs[True])} runs each): {x['seconds'][0]:.1f}s with, "
          f"{x['seconds'][1]:.1f}s without ({out['cache_check/speedup']:.2f}x); generator (vLLM) "
          f"{x['generation_seconds'][0]:.1f}s / {x['generation_seconds'][1]:.1f}s "
          f"({out['cache_check/generation_speedup']:.2f}x); verifier {x['verifier_seconds'][0]:.1f}s / "
          f"{x['verifier_seconds'][1]:.1f}s ({out['cache_check/verifier_speedup']:.2f}x)")
    print("  each run with / without:", " | ".join(f"{a:.1f}s / {b:.1f}s" for a, b in
                                                  zip(out[f"{key}/all_seconds_caching_on"], out[f"{key}/all_seconds_caching_off"])))
    return out


def scaling_table(res: dict, ns: list[int], rows: list[str]) -> str:
    """One table, a row per verifier and method: accuracy, then its gap to majority at the same N with the
    95% paired-bootstrap interval; and the generated tokens per problem behind each cell."""
    rows = [r for r in rows if any(f"{r}@{n}" in res for n in ns)]
    head = "| method | " + " | ".join(f"N={n}" for n in ns) + " |\n|---|" + "---|" * len(ns) + "\n"

    def cell(r, n):
        if f"{r}@{n}" not in res:
            return "-"
        gap = res.get(f"vs_maj/{r}@{n}")
        return f"{100 * res[f'{r}@{n}']:.1f}" + (" ({:+.1f} [{:+.1f}, {:+.1f}])".format(*(100 * x for x in gap)) if gap else "")

    acc = "".join(f"| {r} | " + " | ".join(cell(r, n) for n in ns) + " |\n" for r in rows)
    tok = "".join(f"| {r} | " + " | ".join(f"{res[f'tokens/{r}@{n}']:.0f}" if f"tokens/{r}@{n}" in res else "-"
                                          for n in ns) + " |\n" for r in rows)
    return ("accuracy % (minus maj at the same N, points [95% paired-bootstrap interval over problems])\n\n" + head + acc
            + "\ngenerated tokens per problem\n\n" + head + tok)


def plot(res: dict, ns: list[int], rows: list[str], out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        pts = [(n, res[f"{r}@{n}"], res.get(f"tokens/{r}@{n}")) for n in ns if f"{r}@{n}" in res]
        if pts:
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r)
            ax[1].plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=r)
    for a, xl in zip(ax, ("N", "generated tokens per problem")):
        a.set_xscale("log", base=2)
        a.set_xlabel(xl)
        a.set_ylabel("accuracy")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)


if __name__ == "__main__":
    run_main(main, Args, TOY)
