"""search.py: verifier-guided test-time search and its scaling table.

Sources: "Let's Verify Step by Step" (Lightman et al., arXiv 2305.20050: best-of-N and the PRM > ORM >
majority ordering); OpenR (arXiv 2410.09671) and HuggingFace search-and-learn ("Scaling test-time
compute", 2024: step-level beam search and DVTS).

Strategies, all driven by one `score_fn(problem, steps) -> per-step scores`:
  maj       majority vote over N sampled answers (answers grouped by the grader's equivalence);
  bon       best-of-N: the sample with the highest aggregated verifier score (RM-max);
  weighted  verifier-weighted vote: the answer whose samples' scores sum highest (RM-vote);
  beam      step-level beam search: N beams; each step ends at "\\n\\n"; keep the top N/M by score and
            expand each M ways; finished beams go to a pool; the best pooled beam is the answer;
  dvts      diverse verifier tree search: N/M independent subtrees, each keeping its best of M
            one-step candidates per iteration.
Verifiers: a PRM dir from prm_train.py (`--prm`), an outcome-label PRM (`--orm`), and on the toy world the
exact checker (`oracle`, an upper bound). maj/bon/weighted at every N come from one run of N_max
samples; beam and DVTS run per N. Every method is also compared with majority at the same N on the same
problems: `vs_maj/{method}@{N}` = [difference, 95% interval] from a paired bootstrap over problems.

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
     score 0.23-0.50 by kind of error, 0.73 for right solutions; see the README).

    python search.py                                    # toy world on CPU (needs python prm_train.py first)
    python search.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --chat --data math500 --prm runs/prm/mc
"""
from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data import build_prompt, load_problems, split_steps, write_jsonl
from utils.generation import load_backend
from utils.grader import extract_answer, is_equiv, normalize
from utils.train import parse_args, seed_all, write_json


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "policy (HF dir or hub id); empty: the toy policy"})
    data: str = field(default="", metadata={"help": "problems JSONL {problem, answer} or a shared/data name (default: toy test)"})
    n_problems: int = field(default=0, metadata={"help": "first n problems (0: all)"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    chat: bool = field(default=False, metadata={"help": "prompt with the tokenizer's chat template"})
    prm: str = field(default="", metadata={"help": "PRM dir from prm_train.py (toy default: runs/prm/mc)"})
    orm: str = field(default="", metadata={"help": "outcome-label PRM dir (toy default: runs/prm/outcome)"})
    verifier: str = field(default="prm", metadata={"help": "verifier that guides beam/dvts: prm | orm | oracle"})
    methods: str = field(default="maj,bon,weighted,beam,dvts", metadata={"help": "comma list of strategies"})
    ns: str = field(default="1,2,4,8,16,32,64", metadata={"help": "budgets N (search-and-learn: 4..256)"})
    search_ns: str = field(default="", metadata={"help": "budgets N for beam/DVTS (default: --ns; N >= beam_width)"})
    beam_width: int = field(default=4, metadata={"help": "M: expansions per kept beam (search-and-learn: 4)"})
    max_depth: int = field(default=40, metadata={"help": "step iterations before the rest is sampled to the end (search-and-learn: 40)"})
    lookahead: int = field(default=0, metadata={"help": "greedy steps rolled out (and scored) past each candidate (search-and-learn: 0)"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (search-and-learn: 0.8)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (search-and-learn: 1.0)"})
    max_tokens: int = field(default=2048, metadata={"help": "max generated tokens per solution (search-and-learn: 2048)"})
    agg: str = field(default="min", metadata={"help": "step aggregation: min | last (search-and-learn) | prod | mean; "
                                                   "see deviation 4"})
    backend: str = field(default="auto", metadata={"help": "auto | vllm | hf"})
    verifier_prefix_cache: bool = field(default=True, metadata={"help": "beam/DVTS: the PRM runs siblings' shared steps once (same scores)"})
    cache_check: int = field(default=0, metadata={"help": "if > 0: time beam search at this N with prefix caching (vLLM's and the verifier's) on and off"})
    cache_check_repeats: int = field(default=3, metadata={"help": "timed runs of each setting in --cache_check, alternating on/off; medians reported"})
    out_dir: str = field(default="runs/search", metadata={"help": "per-problem JSONL, results.json, scaling table"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


TOY = dict(n_problems=100, search_ns="4,8,16", max_depth=6, max_tokens=160, temperature=1.0, backend="hf")


# ----------------------------------------------------------------------------- aggregation and selection
def aggregate(scores: list[float], agg: str) -> float:
    if not scores:
        return 0.0
    if agg == "last":
        return scores[-1]
    if agg == "min":
        return min(scores)
    if agg == "mean":
        return sum(scores) / len(scores)
    if agg == "prod":
        p = 1.0
        for s in scores:
            p *= s
        return p
    raise ValueError(f"unknown aggregation {agg!r} (last, min, prod, mean)")


class AnswerGroups:
    """Group answers by the grader's equivalence: equal normalised strings at once, else is_equiv."""

    def __init__(self):
        self.reps, self.key_of = [], {}

    def key(self, ans: str | None):
        if ans is None:
            return None
        k = normalize(ans)
        if k not in self.key_of:
            self.key_of[k] = next((r for r in self.reps if is_equiv(ans, r, timeout=1.0)), None) or ans
            if self.key_of[k] == ans:
                self.reps.append(ans)
        return self.key_of[k]


def majority(answers: list, groups: AnswerGroups):
    votes = defaultdict(int)
    for a in answers:
        if a is not None:
            votes[groups.key(a)] += 1
    return max(votes, key=votes.get) if votes else None


def best_of_n(answers: list, scores: list[float]):
    i = max(range(len(answers)), key=lambda j: (answers[j] is not None, scores[j]))
    return answers[i]


def weighted_vote(answers: list, scores: list[float], groups: AnswerGroups):
    votes = defaultdict(float)
    for a, s in zip(answers, scores):
        if a is not None:
            votes[groups.key(a)] += s
    return max(votes, key=votes.get) if votes else None


# ----------------------------------------------------------------------------- verifiers
def make_verifier(kind: str, path: str, chat: bool):
    """score_fn(problems, steps_lists) -> per-step scores, and a counter of verifier tokens."""
    if kind == "oracle":
        from utils.toy import check_steps

        def oracle(problems, steps_lists, golds, shared=None):
            out = []
            for p, s, g in zip(problems, steps_lists, golds):
                c = check_steps(p, s, g)
                out.append([float(c.first_error == -1 or i < c.first_error) for i in range(len(s))])
            return out
        return oracle, None
    from prm_train import encode, load_prm, score_steps
    prm, tok, meta = load_prm(path)
    counter = {"tokens": 0}

    def fn(problems, steps_lists, golds=None, shared=None):
        counter["tokens"] += sum(len(encode(tok, p, s, meta["step_tag"], chat)[0]) for p, s in zip(problems, steps_lists))
        if shared is None:
            return score_steps(prm, tok, problems, steps_lists, meta["step_tag"], chat)
        return score_shared(prm, tok, problems, steps_lists, shared, meta["step_tag"], chat)
    return fn, counter


def score_shared(prm, tok, problems, steps_lists, shared, step_tag, chat, batch_tokens=16384, max_len=4096):
    """prm_train.score_steps for beam-search children: solutions whose first `shared[i]` steps are the
    same (siblings) run that prefix through the PRM once; its KV cache is copied to each sibling, which
    runs only its own new steps. Same scores (and the same max_len cut) as score_steps; the verifier's
    counterpart of the engine's prefix cache."""
    import torch
    from transformers import DynamicCache

    from prm_train import encode
    groups = defaultdict(list)
    for i, (p, s, k) in enumerate(zip(problems, steps_lists, shared)):
        groups[(p, tuple(s[:k]))].append(i)
    items = []  # (parent ids, parent tags, [(i, new ids, new tags relative to the parent's end)])
    for (p, pre), idx in groups.items():
        pids, ptags = encode(tok, p, list(pre), step_tag, chat, max_len)
        kids = []
        for i in idx:
            ids, tags = encode(tok, p, steps_lists[i], step_tag, chat, max_len)
            kids.append((i, ids[len(pids):], [t - len(pids) for t in tags[len(ptags):]]))
        items.append((pids, ptags, kids))
    items.sort(key=lambda it: len(it[0]))
    out, pad, dev = [[] for _ in problems], tok.pad_token_id or 0, next(prm.parameters()).device
    chunks, cost = [[]], 0
    for it in items:  # bound each chunk by its children's padded tokens
        c = len(it[2]) * (len(it[0]) + max(len(k[1]) for k in it[2]))
        if chunks[-1] and cost + c > batch_tokens:
            chunks, cost = chunks + [[]], 0
        chunks[-1].append(it)
        cost += c

    def padded(seqs, width):
        ids, mask = torch.full((len(seqs), width), pad), torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x, dtype=torch.long), 1
        return ids.to(dev), mask.to(dev)

    with torch.no_grad():
        for chunk in chunks:
            ids, mask = padded([it[0] for it in chunk], max(len(it[0]) for it in chunk))  # parents: (P, Tp)
            tb = [g for g, it in enumerate(chunk) for _ in it[1]]
            cache = DynamicCache()
            lp = prm(ids, mask, torch.tensor(tb, dtype=torch.long), torch.tensor([t for it in chunk for t in it[1]],
                                                                                   dtype=torch.long), cache=cache)
            p_scores, k = [], 0
            for it in chunk:
                p_scores.append(torch.sigmoid(lp[k: k + len(it[1])].float()).tolist())
                k += len(it[1])
            kids = [(g, kid) for g, it in enumerate(chunk) for kid in it[2]]
            sel = torch.tensor([g for g, _ in kids], device=dev)
            for layer in cache.layers:  # one copy of the parent's KV per child
                layer.batch_select_indices(sel)
            cids, cmask = padded([kid[1] for _, kid in kids], max(1, max(len(kid[1]) for _, kid in kids)))
            plen = torch.tensor([len(chunk[g][0]) for g, _ in kids], device=dev)
            pos = plen[:, None] + torch.arange(cids.shape[1], device=dev)[None]  # positions continue the parent's
            lc = prm(cids, torch.cat([mask[sel], cmask], 1), torch.tensor([r for r, (_, kid) in enumerate(kids) for _ in kid[2]]),
                     torch.tensor([t for _, kid in kids for t in kid[2]], dtype=torch.long), cache=cache, position_ids=pos)
            lc, k = torch.sigmoid(lc.float()).tolist(), 0
            for g, (i, _, tags) in kids:
                out[i] = p_scores[g] + lc[k: k + len(tags)]
                k += len(tags)
    for i, s in enumerate(steps_lists):  # as score_steps: steps past max_len repeat the last score
        out[i] = (out[i] + [out[i][-1] if out[i] else 0.5] * len(s))[: len(s)]
    return out


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
    return sample.finish in ("eos", "length") or "boxed" in step_text


def beam_search(gen, problems, prompts, golds, n: int, m: int, score_fn, args, ledger, diverse: bool = False):
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
        scores = score_fn([problems[i] for i, _ in flat], scored, [golds[i] for i, _ in flat],
                          shared=[n_parent[id(c)] for _, c in flat] if args.verifier_prefix_cache else None)
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
    kw = dict(n=k, temperature=0.0 if greedy else args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
              seed=random.randrange(2**31), logprobs=False)
    t = time.time()
    outs = gen.sample(prefixes, **kw) if to_end else gen.step(prefixes, **kw)
    ledger["gen_seconds"] = ledger.get("gen_seconds", 0.0) + time.time() - t
    ledger["tokens"] += sum(len(s.token_ids) for o in outs for s in o)
    return outs


# ----------------------------------------------------------------------------- main
def main(args: Args):
    t0 = time.time()
    seed_all(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(args))
    toy = not args.model
    if toy:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model, args.data = str(tdir / "policy"), args.data or str(tdir / "test.jsonl")
        args.prm, args.orm = args.prm or "runs/prm/mc", args.orm or "runs/prm/outcome"
    for p in (args.prm, args.orm):
        if p and not (Path(p) / "prm.json").exists():
            raise FileNotFoundError(f"no trained PRM in {p!r}: run `python prm_train.py` first (or pass --prm/--orm)")
    problems = load_problems(args.data, args.n_problems or None)
    texts, golds = [p["problem"] for p in problems], [str(p["answer"]) for p in problems]
    ns = sorted(int(x) for x in args.ns.split(","))
    methods = args.methods.split(",")
    verifiers = {"prm": make_verifier("prm", args.prm, args.chat) if args.prm else None,
                 "orm": make_verifier("orm", args.orm, args.chat) if args.orm else None,
                 "oracle": make_verifier("oracle", "", args.chat) if toy else None}
    verifiers = {k: v for k, v in verifiers.items() if v}
    gen = load_backend(args.model, backend=args.backend)
    tok = gen.tokenizer
    prompts = [tok.encode(build_prompt(p, tok, args.chat), add_special_tokens=False) for p in texts]
    groups = [AnswerGroups() for _ in problems]
    right = lambda i, a: a is not None and is_equiv(a, golds[i])  # noqa: E731
    res, by_problem, per_problem = {}, {}, [{"problem": t, "answer": g} for t, g in zip(texts, golds)]

    # 1. one run of N_max independent samples serves maj / bon / weighted at every N
    nmax = ns[-1]
    t = time.time()
    outs = []
    for s in tqdm(range(0, len(prompts), 16), desc=f"sample N={nmax}"):
        outs += gen.sample(prompts[s: s + 16], n=nmax, temperature=args.temperature, top_p=args.top_p,
                           max_tokens=args.max_tokens, seed=args.seed + s, logprobs=False)
    sample_s = time.time() - t
    answers = [[extract_answer(c.text) for c in o] for o in outs]
    steps = [[split_steps(c.text) or [""] for c in o] for o in outs]
    ntok = [[len(c.token_ids) for c in o] for o in outs]
    vscores = {}
    for name, (fn, _) in verifiers.items():
        flat = fn([texts[i] for i in range(len(outs)) for _ in outs[i]], [s for st in steps for s in st],
                  [golds[i] for i in range(len(outs)) for _ in outs[i]])
        vscores[name] = [flat[i * nmax: (i + 1) * nmax] for i in range(len(outs))]
    for i, row in enumerate(per_problem):
        row.update(completions=[c.text for c in outs[i]], answers=answers[i],
                   scores={k: v[i] for k, v in vscores.items()})
    for n in ns:
        acc = defaultdict(list)
        for i in range(len(problems)):
            for g in range(nmax // n):  # deviation 2: average over the disjoint groups
                sl = slice(g * n, (g + 1) * n)
                a = answers[i][sl]
                acc["maj"].append(right(i, majority(a, groups[i])))
                for name in vscores:
                    sc = [aggregate(s, args.agg) for s in vscores[name][i][sl]]
                    sfx = "" if name == args.verifier else f"_{name}"
                    acc[f"bon{sfx}"].append(right(i, best_of_n(a, sc)))
                    acc[f"weighted{sfx}"].append(right(i, weighted_vote(a, sc, groups[i])))
        for k, v in acc.items():
            res[f"{k}@{n}"] = sum(v) / len(v)
            res[f"tokens/{k}@{n}"] = sum(sum(x[:n]) for x in ntok) / len(problems)
            g = nmax // n
            by_problem[f"{k}@{n}"] = [sum(v[i * g: (i + 1) * g]) / g for i in range(len(problems))]
    res["sample_seconds"] = sample_s

    # 2. beam search and DVTS, one run per N
    fn = verifiers[args.verifier][0]
    for method in [m for m in methods if m in ("beam", "dvts")]:
        for n in sorted(int(x) for x in (args.search_ns or args.ns).split(",")):
            if n < args.beam_width:
                continue
            ledger = {"calls": 0, "tokens": 0}
            t = time.time()
            pool = beam_search(gen, texts, prompts, golds, n, args.beam_width, fn, args, ledger, diverse=method == "dvts")
            picks = []
            for i in range(len(problems)):
                done = pool[i]
                a = [extract_answer(tok.decode(b.ids[len(prompts[i]):], skip_special_tokens=True)) for b in done]
                picks.append(right(i, best_of_n(a, [b.score for b in done])) if done else False)
                per_problem[i].setdefault(method, {})[n] = {"pred": best_of_n(a, [b.score for b in done]) if done else None,
                                                            "pool": len(done)}
            res[f"{method}@{n}"] = sum(picks) / len(picks)
            by_problem[f"{method}@{n}"] = [float(x) for x in picks]
            res[f"tokens/{method}@{n}"] = ledger["tokens"] / len(problems)
            res[f"calls/{method}@{n}"] = ledger["calls"]
            res[f"seconds/{method}@{n}"] = time.time() - t
            print(f"{method}@{n}: {100 * res[f'{method}@{n}']:.1f}%  {res[f'tokens/{method}@{n}']:.0f} tok/problem "
                  f"({time.time() - t:.0f}s)", flush=True)
    for key, v in by_problem.items():  # each method against majority at the same N, on the same problems
        m, n = key.split("@")
        if m != "maj" and f"maj@{n}" in by_problem:
            res[f"vs_maj/{key}"] = list(paired_interval(v, by_problem[f"maj@{n}"], seed=args.seed))
    for name, (_, counter) in verifiers.items():
        if counter:
            res[f"verifier_tokens/{name}"] = counter["tokens"]

    # 3. prefix caching on vs off (vLLM), beam search at one N
    if args.cache_check:
        res.update(cache_check(args, texts, prompts, golds, fn))
    res["wall_s"] = time.time() - t0
    write_jsonl(out / "problems.jsonl", per_problem)
    write_json(out / "results.json", res)
    table = scaling_table(res, ns)
    (out / "scaling.md").write_text(table)
    print(table)
    plot(res, ns, out)


def cache_check(args, texts, prompts, golds, fn) -> dict:
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
        beam_search(gens[on], texts[:2], prompts[:2], golds[:2], args.beam_width, args.beam_width, fn, args,
                    {"calls": 0, "tokens": 0})
    runs = {True: [], False: []}
    for _ in tqdm(range(max(1, args.cache_check_repeats)), desc="cache check"):
        for on in (True, False):
            gens[on].llm.reset_prefix_cache()
            args.verifier_prefix_cache = on
            random.seed(args.seed)
            ledger, t = {"calls": 0, "tokens": 0}, time.time()
            beam_search(gens[on], texts, prompts, golds, args.cache_check, args.beam_width, fn, args, ledger)
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


def scaling_table(res: dict, ns: list[int]) -> str:
    rows = sorted({k.split("@")[0] for k in res if "@" in k and "/" not in k.split("@")[0]})
    head = "| method | " + " | ".join(f"N={n}" for n in ns) + " |\n|---|" + "---|" * len(ns) + "\n"
    body = ""
    for r in rows:
        cells = [f"{100 * res[f'{r}@{n}']:.1f} ({res.get(f'tokens/{r}@{n}', 0):.0f})" if f"{r}@{n}" in res else "-"
                 for n in ns]
        body += f"| {r} | " + " | ".join(cells) + " |\n"
    gaps = ""
    for r in rows:
        cells = [("{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * x for x in res[f"vs_maj/{r}@{n}"])))
                 if f"vs_maj/{r}@{n}" in res else "-" for n in ns]
        gaps += f"| {r} | " + " | ".join(cells) + " |\n" if any(c != "-" for c in cells) else ""
    if gaps:
        gaps = ("\nminus maj at the same N, points [95% paired-bootstrap interval over problems]\n\n" + head + gaps)
    return "accuracy % (generated tokens per problem)\n\n" + head + body + gaps


def plot(res: dict, ns: list[int], out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in sorted({k.split("@")[0] for k in res if "@" in k and "/" not in k.split("@")[0]}):
        pts = [(n, res[f"{r}@{n}"], res.get(f"tokens/{r}@{n}")) for n in ns if f"{r}@{n}" in res]
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
    main(parse_args(Args, TOY))
