"""pav.py: process advantage verifiers (Setlur et al., "Rewarding Progress: Scaling Automated Process
Verifiers for LLM Reasoning", arXiv 2410.08146): data, training, beam search and RL in one file.

A step's process reward is its progress under a prover policy mu: A^mu(s_h, a_h) = Q^mu(s_h, a_h) - V^mu(s_h),
the change, across the step, in the prover's chance of reaching the right answer; steps are deterministic,
so V^mu(s_h) is the value of the previous prefix and A^mu_h = Q^mu_h - Q^mu_{h-1}. The prover is best-of-K of
the base policy pi: from one set of Monte-Carlo rollouts of pi, c right of m, Q^pi = c/m and Q^BoK = 1 -
C(m-c, K)/C(m, K) (the unbiased pass@K estimator), so no second model is sampled. A PAV (value heads on the
policy's LM, soft-target BCE) predicts Q^pi and Q^mu per prefix; search and RL use the effective reward
Q^pi + alpha * A^mu: step-level beam search ranks candidate prefixes by it (alpha_search 0.5), and RLOO
weighs each step's tokens by (outcome - leave-one-out baseline) + alpha_rl * A^mu_h (alpha_rl 3). Theorem 3.1
says a prover helps when its advantages vary under pi (distinguishability) and correlate with A^pi
(alignment); the K sweep prints both, and the RL gain, for K in --ks.

No public code exists; defaults the paper states are marked (paper), the note's secondhand readings
(paper, unverified), the rest are ours. Deviations:
  1. One PAV model holds a head per prover (q_pi and q_mu@K for every K of --ks), trained together on the
     same prefixes; the paper trains one PAV per prover. The K sweep reads each head.
  2. Beam search picks its answer among the finished beams by Q^pi of the whole solution (the value of a
     complete solution: its predicted correctness), for the PAV and the Q^pi beam alike.
  3. RL is a compact on-policy RLOO (one AdamW step per batch, token-mean per sequence, no PPO clip, no
     KL); the paper's RL details are not public. A^mu is centred on the batch's mean (--rl_center): under
     pi the prover's value falls along a trajectory, and the uncentred reward pushes down every sampled token.
  4. The ORM baseline is a value head trained here on every complete rollout the data stage sampled (seed
     and Monte-Carlo rollouts, 0/1 outcomes): as many policy samples as the PAV's data, more sequences.
  5. One process: no torchrun (data, training, search and RL run on one device). --backend vllm serves the
     data and search stages; RL samples with HF from the trained module itself (no weight sync).
  6. Toy-scale settings (TOY below) replace the defaults when --model is empty.

    python pav.py                                                      # toy world on CPU, about 30 minutes
    python pav.py --model MODEL_DIR --data train.jsonl --eval_data test.jsonl --n_problems 4000
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import STEP_SEP, build_prompt, load_problems, read_jsonl, split_steps, step_spans, write_jsonl
from utils.generation import load_backend
from utils.grader import extract_answer, grade, is_equiv
from utils.train import MetricsLog, amp, run_main, seed_all, token_logprobs, write_json
from utils.verifiers import (AnswerGroups, PAVVerifier, ValueHeadLM, auc, collate, make_batches, majority,
                             prefix_positions)

SEP = STEP_SEP


@dataclass
class Args:
    # model and data
    model: str = field(default="", metadata={"help": "base policy pi (HF dir); empty: the toy policy"})
    data: str = field(default="", metadata={"help": "training problems JSONL {problem, answer} (default: toy train)"})
    eval_data: str = field(default="", metadata={"help": "test problems JSONL (default: toy test)"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    chat: bool = field(default=False, metadata={"help": "prompt with the tokenizer's chat template"})
    backend: str = field(default="auto", metadata={"help": "generation: auto | vllm | hf"})
    temperature: float = field(default=1.0, metadata={"help": "pi's sampling temperature, in data, search and RL (ours)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "max tokens of a solution (ours)"})
    # prover and data
    prover_k: int = field(default=4, metadata={"help": "prover mu = best-of-K(pi) for search and RL (paper: K = 4)"})
    ks: str = field(default="1,2,4,8,16", metadata={"help": "provers of the K sweep; each a head of the PAV (deviation 1)"})
    n_problems: int = field(default=0, metadata={"help": "training problems for the PAV data (0: all)"})
    n_cov: int = field(default=2, metadata={"help": "seed rollouts of pi per problem (paper, unverified: 2)"})
    mc_rollouts: int = field(default=32, metadata={"help": "pi-rollouts per prefix, >= max K (paper, unverified: n_mc/n_cov ~ 16)"})
    # PAV and ORM training
    epochs: int = field(default=1, metadata={"help": "PAV: passes over the data (ours)"})
    orm_epochs: int = field(default=1, metadata={"help": "ORM: passes over its data, the complete rollouts (ours)"})
    orm_rows: int = field(default=0, metadata={"help": "ORM: complete rollouts trained on, drawn at random (0: all)"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW lr, linear decay (ours)"})
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per batch"})
    max_len: int = field(default=2048, metadata={"help": "longest sequence scored"})
    eval_frac: float = field(default=0.1, metadata={"help": "problems held out of training (their loss picks the epoch)"})
    # search
    alpha: float = field(default=0.5, metadata={"help": "alpha_search in Q^pi + alpha * A^mu (paper, unverified: 0.5)"})
    ns: str = field(default="1,2,4,8,16,32,64", metadata={"help": "budgets N of ORM best-of-N and majority"})
    search_ns: str = field(default="4,8,16,32", metadata={"help": "budgets N (beams) of beam search, >= beam_width"})
    beam_width: int = field(default=4, metadata={"help": "M: expansions per kept beam (ours; search-and-learn: 4)"})
    max_depth: int = field(default=40, metadata={"help": "step iterations before a beam is sampled to the end"})
    n_eval_problems: int = field(default=500, metadata={"help": "test problems of search and RL evaluation (0: all)"})
    # RL
    alpha_rl: float = field(default=3.0, metadata={"help": "alpha_rl: weight of A^mu in the RL step reward (paper, unverified: 3-5)"})
    rl_center: bool = field(default=True, metadata={"help": "subtract the batch's mean A^mu from every step's (a constant "
                                                           "baseline: unbiased; deviation 3)"})
    rl_steps: int = field(default=100, metadata={"help": "RL steps per run (ours)"})
    rl_prompts: int = field(default=64, metadata={"help": "prompts per RL step (ours)"})
    rl_k: int = field(default=4, metadata={"help": "rollouts per prompt; the RLOO group (ours)"})
    rl_lr: float = field(default=1e-6, metadata={"help": "policy AdamW lr, constant (ours)"})
    rl_eval_every: int = field(default=10, metadata={"help": "test per-sample accuracy every N RL steps"})
    rl_eval_samples: int = field(default=4, metadata={"help": "samples per test problem in the RL evaluation"})
    seeds: str = field(default="0,1,2", metadata={"help": "RL seeds of PAV-RL and outcome-only RL (K sweep: the first)"})
    stages: str = field(default="data,train,search,rl,sweep", metadata={"help": "stages to run (each is skipped when done)"})
    out_dir: str = field(default="runs/pav", metadata={"help": "data.jsonl, pav/, orm/, search.json, rl/, results.json"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on GPU for PAV / ORM training and RL, fp32 "
                                                      "master weights (the paper trains in bf16)"})
    seed: int = field(default=0, metadata={"help": "seed of data, training and search"})


# Toy scale (the 0.28M-parameter toy policy, 2 CPU cores, about 30 minutes in all).
TOY = dict(n_problems=800, n_cov=1, mc_rollouts=16, max_new_tokens=160, backend="hf", epochs=6, lr=1e-3, batch_tokens=4096, orm_rows=8000,
           max_depth=6, n_eval_problems=100, rl_steps=30, rl_prompts=16, rl_lr=3e-4, rl_eval_every=6, max_len=1024)


# ----------------------------------------------------------------------------- the algorithm, piece by piece
def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that best-of-k draws (without replacement) from n rollouts with c
    right holds a right one; unbiased for pass@k (Chen et al. 2021), so Q^BoK from pi's own rollouts."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} rollouts per prefix, not {n} (raise --mc_rollouts)")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prefix_targets(c: list[int], m: int, outcome: float, ks: list[int]) -> dict[str, list[float]]:
    """Soft targets of prefixes 0..H from c[h] right of m rollouts from each prefix h < H; the whole solution
    (prefix H) is its own outcome under any prover."""
    out = {"q_pi": [x / m for x in c] + [outcome]}
    for k in ks:
        out[f"q_mu@{k}"] = [pass_at_k(m, x, k) for x in c] + [outcome]  # Q^BoK, Eq. (best-of-K prover)
    return out


def progress(values: list[float]) -> list[float]:
    """A_h = V_h - V_{h-1} for h = 1..H from prefix values V_0..V_H (deterministic steps: Q(s,a) = V(s'))."""
    return [values[h] - values[h - 1] for h in range(1, len(values))]


def effective_reward(q_pi: list[float], q_mu: list[float], alpha: float) -> list[float]:
    """Q^pi_h + alpha * A^mu_h per step h = 1..H (the paper's effective reward)."""
    return [q + alpha * a for q, a in zip(q_pi[1:], progress(q_mu))]


def rloo(rewards: list[float], k: int) -> list[float]:
    """r_i - mean_{j != i} r_j within consecutive groups of k (the leave-one-out baseline)."""
    out = []
    for g in range(0, len(rewards), k):
        r = rewards[g: g + k]
        out += [x - (sum(r) - x) / (len(r) - 1) for x in r]
    return out


def step_weights(step_of: list[int], a_out: float, a_mu: list[float], alpha_rl: float) -> list[float]:
    """Each token's policy-gradient weight: the outcome advantage + alpha_rl * A^mu of the token's step."""
    return [a_out + alpha_rl * (a_mu[min(s, len(a_mu) - 1)] if a_mu else 0.0) for s in step_of]


def distinguishability(a_mu: list[float]) -> float:
    """Var of A^mu over the steps pi takes (Theorem 3.1's first term)."""
    return float(np.var(a_mu)) if a_mu else float("nan")


def alignment(a_mu: list[float], a_pi: list[float]) -> float:
    """Pearson correlation of A^mu with A^pi over the same steps (Theorem 3.1's second term)."""
    if len(a_mu) < 2 or np.std(a_mu) == 0 or np.std(a_pi) == 0:
        return float("nan")
    return float(np.corrcoef(a_mu, a_pi)[0, 1])


def samples_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first sample count at which a (samples, accuracy) curve reaches target."""
    return next((n for n, v in curve if v >= target - 1e-12), None)


# ----------------------------------------------------------------------------- 1. data: Monte-Carlo prefix values
def collect(gen, tok, problems: list[dict], args: Args, out: Path) -> dict:
    """n_cov seed rollouts per problem; for every prefix of each (the question alone included), n_mc
    rollouts of pi, graded. Appends one row per seed rollout to out/data.jsonl (resumable by problem)."""
    path, done = out / "data.jsonl", set()
    if path.exists():
        done = {r["problem"] for r in read_jsonl(path)}
    todo = [p for p in problems if p["problem"] not in done]
    stats = {"calls": 0, "samples": 0, "tokens": 0}
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="PAV data (MC rollouts)")
    for s in range(0, len(todo), 32):
        chunk = todo[s: s + 32]
        prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in chunk]
        seeds = _sample(gen, prompts, args.n_cov, args, stats, seed=args.seed * 7919 + s)
        # the prefixes to estimate: (problem index, prefix ids); the question alone is shared by its seeds
        prefixes, rows = {}, []
        for i, (p, pr, outs) in enumerate(zip(chunk, prompts, seeds)):
            for o in outs:
                steps, ends = step_spans(tok, list(o.token_ids))
                row = {"problem": p["problem"], "answer": str(p["answer"]), "steps": steps,
                       "outcome": float(grade(o.text, str(p["answer"]))), "finish": o.finish, "keys": []}
                for h in range(len(steps)):  # prefixes 0..H-1; prefix H is the whole solution
                    key = (i, tuple(pr) + tuple(o.token_ids[: ends[h - 1]] if h else ()))
                    prefixes.setdefault(key, None)
                    row["keys"].append(key)
                rows.append(row)
        keys = list(prefixes)
        mc = _sample(gen, [list(k[1]) for k in keys], args.mc_rollouts, args, stats, seed=args.seed * 104729 + s)
        finished = [{"problem": r["problem"], "steps": r["steps"], "outcome": r["outcome"]} for r in rows]
        for (i, ids), outs in zip(keys, mc):
            head = tok.decode(ids[len(prompts[i]):], skip_special_tokens=True)
            ok = [float(grade(head + o.text, str(chunk[i]["answer"]))) for o in outs]
            prefixes[(i, ids)] = int(sum(ok))
            finished += [{"problem": chunk[i]["problem"], "steps": split_steps(head + o.text), "outcome": y}
                         for o, y in zip(outs, ok)]
        for r in rows:
            r["c"], r["m"] = [prefixes[k] for k in r.pop("keys")], args.mc_rollouts
        write_jsonl(out / "rollouts.jsonl", finished, append=True)  # every complete rollout: the ORM's data
        write_jsonl(path, rows, append=True)  # written last: a problem in data.jsonl is done
        bar.update(len(chunk))
        bar.set_postfix(samples=stats["samples"])
    bar.close()
    return stats


def _sample(gen, prompts, n, args: Args, stats: dict, seed: int, temperature: float | None = None):
    outs = gen.sample(prompts, n=n, temperature=args.temperature if temperature is None else temperature,
                      max_tokens=args.max_new_tokens, seed=seed, logprobs=False)
    stats["calls"] += 1
    stats["samples"] += sum(len(o) for o in outs)
    stats["tokens"] += sum(len(s.token_ids) for o in outs for s in o)
    return outs


def data_rows(rows: list[dict], ks: list[int]) -> list[dict]:
    """Each seed rollout with its prefix targets (heads q_pi, q_mu@K)."""
    return [r | {"targets": prefix_targets(r["c"], r["m"], r["outcome"], ks)} for r in rows]


# ----------------------------------------------------------------------------- 2. training the PAV and the ORM
def train_values(init: str, rows: list[dict], heads: list[str], args: Args, out: Path, meta: dict, dev,
                 desc: str) -> dict:
    """Value heads on the policy's LM, soft-target BCE on every (prefix, head) of `rows` ({problem, steps,
    targets: {head: [per prefix]}, only_last}); the epoch with the lowest held-out loss is saved to out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(init)
    model = ValueHeadLM(AutoModelForCausalLM.from_pretrained(init), outputs=len(heads)).to(dev)
    rng = random.Random(args.seed)
    probs = sorted({r["problem"] for r in rows})
    held = set(rng.sample(probs, max(1, int(args.eval_frac * len(probs))))) if len(probs) > 1 else set()
    ex = {"train": [], "eval": []}
    for r in rows:
        ids, pos = prefix_positions(tok, r["problem"], r["steps"], meta, args.max_len)
        tg = [[r["targets"][h][j] for h in heads] for j in range(len(pos))]
        if r.get("only_last"):
            pos, tg = pos[-1:], tg[-1:]
        ex["eval" if r["problem"] in held else "train"].append({"ids": ids, "tags": pos, "labels": tg})
    if not ex["train"]:
        raise ValueError(f"{desc}: no training rows")
    flat = torch.tensor([t for e in ex["train"] for t in e["labels"]])  # (N, heads)
    const = _const_loss(flat.mean(0), ex["eval"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = [make_batches(ex["train"], args.batch_tokens, random.Random(args.seed + e)) for e in range(args.epochs)]
    total = sum(len(b) for b in batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    log, best, step, pad = MetricsLog(out), float("inf"), 0, tok.pad_token_id or 0
    bar = tqdm(total=total, desc=desc)
    for epoch in range(args.epochs):
        model.train()
        for b in batches[epoch]:
            ids, mask, tb, tt, target = collate(b, pad, dev)
            with amp(args.bf16, dev):
                z = model(ids, mask, tb, tt).float().reshape(target.shape)
            loss = F.binary_cross_entropy_with_logits(z, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            log.log(step, **{"train/loss": loss.item()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        held_loss = _heldout_loss(model, ex["eval"], args, pad, dev)
        log.log(step, **{"eval/loss": held_loss, "epoch": epoch + 1})
        if held_loss <= best or held_loss != held_loss:
            best = held_loss
            model.save(out)
            tok.save_pretrained(out)
            write_json(out / "verifier.json", meta | {"heads": heads, "epoch": epoch + 1, "heldout_loss": held_loss})
    bar.close()
    return {"train_sequences": len(ex["train"]), "train_targets": sum(len(e["tags"]) for e in ex["train"]) * len(heads),
            "heldout_loss": best, "heldout_loss_constant": const}


def _const_loss(p: torch.Tensor, ex: list[dict]) -> float:
    """The held-out loss of predicting the training mean of each head everywhere: the bar a PAV must beat."""
    if not ex:
        return float("nan")
    t = torch.tensor([x for e in ex for x in e["labels"]])  # (N, heads)
    return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6).expand_as(t), t).item()


@torch.no_grad()
def _heldout_loss(model, ex: list[dict], args: Args, pad: int, dev) -> float:
    if not ex:
        return float("nan")
    model.eval()
    tot = n = 0.0
    for b in make_batches(ex, args.batch_tokens, random.Random(0)):
        ids, mask, tb, tt, target = collate(b, pad, dev)
        tot += F.binary_cross_entropy_with_logits(model(ids, mask, tb, tt).reshape(target.shape), target,
                                                  reduction="sum").item()
        n += target.numel()
    model.train()
    return tot / n


# ----------------------------------------------------------------------------- 3. search
def beam_search(gen, tok, problems: list[dict], prompts: list[list[int]], n: int, m: int, verifier: PAVVerifier,
                alpha: float, args: Args, ledger: dict) -> list[str | None]:
    """Step-level beam search, batched over problems: N candidate first steps; each iteration keeps the N/M
    open candidates of highest effective reward Q^pi + alpha * A^mu (of their last step) and samples M next
    steps from each; finished candidates go to a pool (until it holds N). Returns each problem's answer: the
    pooled solution of highest Q^pi (deviation 2)."""
    keep = max(1, n // m)
    frontier = {i: [(list(prompts[i]), [])] for i in range(len(problems))}  # (ids, step texts)
    pool = {i: [] for i in range(len(problems))}
    for depth in range(args.max_depth + 1):
        live = [(i, ids, st) for i, bs in frontier.items() for ids, st in bs]
        if not live:
            break
        last = depth == args.max_depth
        kw = dict(n=n if depth == 0 else m, temperature=args.temperature, max_tokens=args.max_new_tokens,
                  seed=random.randrange(2**31), logprobs=False)
        outs = gen.sample([x[1] for x in live], **kw) if last else gen.step([x[1] for x in live], **kw)
        ledger["tokens"] += sum(len(s.token_ids) for o in outs for s in o)
        ledger["calls"] += 1
        cands = []
        for (i, ids, st), o in zip(live, outs):
            for s in o:
                text = s.text.strip()
                done = last or s.finish in ("eos", "length", "too_long") or "boxed" in text
                cands.append((i, ids + list(s.token_ids), st + ([text] if text else []), done))
        vals = verifier.prefix_values([problems[c[0]]["problem"] for c in cands], [c[2] or [""] for c in cands])
        mu = f"q_mu@{verifier.prover_k}"
        frontier = {}
        for (i, ids, st, done), v in zip(cands, vals):
            r = effective_reward(v["q_pi"], v.get(mu, v["q_pi"]), alpha if mu in v else 0.0)[-1]
            if done:
                pool[i].append((v["q_pi"][-1], tok.decode(ids[len(prompts[i]):], skip_special_tokens=True)))
            else:
                frontier.setdefault(i, []).append((r, ids, st))
        frontier = {i: [(ids, st) for _, ids, st in sorted(bs, key=lambda b: -b[0])[:keep]]
                    for i, bs in frontier.items() if len(pool[i]) < n}
    return [extract_answer(max(pool[i])[1]) if pool[i] else None for i in range(len(problems))]


# Copied from search.py:paired_interval
def paired_interval(a: list[float], b: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) over problems and its 95% interval from a paired bootstrap (problems resampled
    with replacement, both methods on the same draw): whether a gap over majority is more than noise."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(iters, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def run_search(gen, tok, test: list[dict], pav: PAVVerifier, orm: PAVVerifier, args: Args) -> dict:
    """ORM best-of-N and majority over N_max samples (disjoint groups of N averaged), then beam search on the
    effective reward (pav_beam) and on Q^pi alone (qpi_beam) at each beam budget; tokens per problem beside."""
    res, per = {}, {}
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in test]
    golds = [str(p["answer"]) for p in test]
    ns, nmax = sorted(int(x) for x in args.ns.split(",")), max(int(x) for x in args.ns.split(","))
    outs, stats = [], {"calls": 0, "samples": 0, "tokens": 0}
    for s in tqdm(range(0, len(prompts), 16), desc=f"best-of-{nmax} samples"):
        outs += _sample(gen, prompts[s: s + 16], nmax, args, stats, seed=args.seed + s)
    answers = [[extract_answer(o.text) for o in os_] for os_ in outs]
    ok = [[a is not None and is_equiv(a, g) for a in row] for row, g in zip(answers, golds)]
    steps = [step_spans(tok, list(o.token_ids))[0] or [""] for os_ in outs for o in os_]
    orm_v = orm.effective([p["problem"] for p in test for _ in range(nmax)], steps)
    orm_s = [[v[-1] if v else 0.0 for v in orm_v[i * nmax: (i + 1) * nmax]] for i in range(len(test))]
    ntok = [[len(o.token_ids) for o in os_] for os_ in outs]
    pav_v = pav.prefix_values([p["problem"] for p in test for _ in range(nmax)], steps)
    y = [float(x) for row in ok for x in row]  # how well each tells right from wrong samples
    res["auc/orm_last"] = auc([v[-1] if v else 0.0 for v in orm_v], y)
    res["auc/pav_qpi_last"] = auc([v["q_pi"][-1] for v in pav_v], y)
    res["auc/pav_qpi_min"] = auc([min(v["q_pi"]) for v in pav_v], y)
    groups = [AnswerGroups() for _ in test]
    for n in ns:
        g = nmax // n
        for name in ("orm_bon", "maj", "pass"):
            per[f"{name}@{n}"] = []
        for i in range(len(test)):
            sl = [slice(j * n, (j + 1) * n) for j in range(g)]
            per[f"orm_bon@{n}"].append(sum(ok[i][s][int(np.argmax(orm_s[i][s]))] for s in sl) / g)
            per[f"maj@{n}"].append(sum((lambda a: a is not None and is_equiv(a, golds[i]))(
                majority(answers[i][s], groups[i])) for s in sl) / g)
            per[f"pass@{n}"].append(sum(any(ok[i][s]) for s in sl) / g)
        for name in ("orm_bon", "maj", "pass"):
            res[f"tokens/{name}@{n}"] = sum(sum(x[:n]) for x in ntok) / len(test)
    for name, alpha in (("pav_beam", args.alpha), ("qpi_beam", 0.0)):
        for n in sorted(int(x) for x in args.search_ns.split(",")):
            ledger, t = {"tokens": 0, "calls": 0}, time.time()
            preds = beam_search(gen, tok, test, prompts, n, args.beam_width, pav, alpha, args, ledger)
            per[f"{name}@{n}"] = [float(p is not None and is_equiv(p, g)) for p, g in zip(preds, golds)]
            res[f"tokens/{name}@{n}"] = ledger["tokens"] / len(test)
            res[f"seconds/{name}@{n}"] = time.time() - t
            print(f"{name}@{n}: {100 * np.mean(per[f'{name}@{n}']):.1f}%  {res[f'tokens/{name}@{n}']:.0f} tok/problem "
                  f"({time.time() - t:.0f}s)", flush=True)
    res.update({k: float(np.mean(v)) for k, v in per.items()})
    for n in sorted(int(x) for x in args.search_ns.split(",")):  # against the ORM at the nearest token count
        b = min(ns, key=lambda b: abs(math.log(res[f"tokens/orm_bon@{b}"] / res[f"tokens/pav_beam@{n}"])))
        res[f"pav_vs_orm@{n}"] = {"orm_n": b, "tokens_pav": res[f"tokens/pav_beam@{n}"],
                                  "tokens_orm": res[f"tokens/orm_bon@{b}"],
                                  "diff": list(paired_interval(per[f"pav_beam@{n}"], per[f"orm_bon@{b}"], seed=args.seed))}
        res[f"pav_vs_qpi@{n}"] = list(paired_interval(per[f"pav_beam@{n}"], per[f"qpi_beam@{n}"], seed=args.seed))
    best_n = max(ns, key=lambda b: res[f"orm_bon@{b}"])
    reach = [n for n in sorted(int(x) for x in args.search_ns.split(",")) if res[f"pav_beam@{n}"] >= res[f"orm_bon@{best_n}"]]
    res["orm_best"] = {"n": best_n, "acc": res[f"orm_bon@{best_n}"], "tokens": res[f"tokens/orm_bon@{best_n}"]}
    res["pav_reaches_orm_best_at"] = reach[0] if reach else None  # ratio > 1: the PAV beam needs fewer tokens
    res["pav_compute_efficiency"] = (res[f"tokens/orm_bon@{best_n}"] / res[f"tokens/pav_beam@{reach[0]}"]) if reach else None
    res["search_samples"] = stats["samples"]
    return res


# ----------------------------------------------------------------------------- 4. RL
def rl_run(init: str, train: list[dict], test: list[dict], args: Args, seed: int, out: Path,
           pav: PAVVerifier | None, k: int | None) -> dict:
    """Online RLOO from the base policy: each step rl_prompts x rl_k rollouts at the temperature, graded;
    token weights (outcome - RLOO baseline) + alpha_rl * A^mu of the token's step (pav given: its q_mu@k
    head), else the outcome advantage alone; one AdamW step. Test per-sample accuracy every rl_eval_every
    steps. Writes out/metrics.jsonl and out/curve.json (resumes a finished run by reading them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = {k: getattr(args, k) for k in ("rl_steps", "rl_prompts", "rl_k", "rl_lr", "rl_eval_every", "rl_eval_samples",
                                         "temperature", "n_eval_problems") + (("alpha_rl", "rl_center") if pav else ())}
    if (out / "curve.json").exists() and json.loads((out / "curve.json").read_text()).get("config") == cfg:
        return json.loads((out / "curve.json").read_text())  # a finished run with these settings
    seed_all(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(init)
    policy = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(dev)
    gen = load_backend(init, backend="hf", model=policy, tokenizer=tok, device=dev)  # samples with the module itself
    opt = torch.optim.AdamW(policy.parameters(), lr=args.rl_lr, weight_decay=0.0)
    pad, order = tok.pad_token_id or 0, random.Random(seed).sample(range(len(train)), len(train))
    log, curve, samples = MetricsLog(out), [], 0
    (out / "metrics.jsonl").write_text("")
    bar = tqdm(range(args.rl_steps + 1), desc=f"RL {'pav@' + str(k) if pav else 'outcome'} seed {seed}", leave=False)
    for step in bar:
        m = {}
        if step % args.rl_eval_every == 0 or step == args.rl_steps:
            m["eval/sample_acc"] = _eval(gen, tok, test, args, seed)
            curve.append((samples, m["eval/sample_acc"]))
        if step == args.rl_steps:
            log.log(step, samples=samples, **m)
            break
        batch = [train[order[(step * args.rl_prompts + j) % len(train)]] for j in range(args.rl_prompts)]
        prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in batch]
        policy.eval()
        outs = gen.sample(prompts, n=args.rl_k, temperature=args.temperature, max_tokens=args.max_new_tokens,
                          seed=seed * 100003 + step, logprobs=False)
        resp = [list(o.token_ids) or [pad] for os_ in outs for o in os_]
        reward = [float(grade(o.text, str(p["answer"]))) for p, os_ in zip(batch, outs) for o in os_]
        a_out = rloo(reward, args.rl_k)
        samples += len(resp)
        if pav is not None:
            spans = [step_spans(tok, r) for r in resp]
            vals = pav.prefix_values([p["problem"] for p in batch for _ in range(args.rl_k)], [s[0] or [""] for s in spans])
            a_mu = [progress(v[f"q_mu@{k}"]) for v in vals]
            m["train/a_mu_mean"] = float(np.mean([x for am in a_mu for x in am])) if any(a_mu) else 0.0
            if args.rl_center:  # NOTE: under pi, A^mu drifts negative (mu is the better policy): centre it
                a_mu = [[x - m["train/a_mu_mean"] for x in am] for am in a_mu]
            weights = [step_weights(_token_steps(len(r), s[1]), a, am, args.alpha_rl)
                       for r, s, a, am in zip(resp, spans, a_out, a_mu)]
            m["train/a_mu_abs"] = float(np.mean([abs(x) for am in a_mu for x in am])) if any(a_mu) else 0.0
        else:
            weights = [[a] * len(r) for r, a in zip(resp, a_out)]
        policy.train()
        with amp(args.bf16, dev):
            lp, mask = token_logprobs(policy, [prompts[i // args.rl_k] for i in range(len(resp))], resp, pad, dev)  # (B, T)
        w = torch.zeros_like(lp)
        for i, x in enumerate(weights):
            w[i, : len(x)] = torch.tensor(x, device=dev)
        loss = (-(w * lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()  # REINFORCE with RLOO, token-mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        m.update({"train/reward": float(np.mean(reward)), "train/loss": loss.item()})
        log.log(step + 1, samples=samples, **m)
        bar.set_postfix(reward=f"{m['train/reward']:.3f}")
    res = {"curve": curve, "final_acc": curve[-1][1], "samples": samples, "seed": seed, "k": k, "config": cfg}
    write_json(out / "curve.json", res)
    return res


def _token_steps(n: int, ends: list[int]) -> list[int]:
    """The step index of each of n tokens, from the steps' end indices."""
    out, s = [], 0
    for j in range(n):
        while s < len(ends) - 1 and j >= ends[s]:
            s += 1
        out.append(s)
    return out


@torch.no_grad()
def _eval(gen, tok, test: list[dict], args: Args, seed: int) -> float:
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in test]
    gen.model.eval()
    outs = gen.sample(prompts, n=args.rl_eval_samples, temperature=args.temperature, max_tokens=args.max_new_tokens,
                      seed=10007 + seed, logprobs=False)
    return float(np.mean([grade(o.text, str(p["answer"])) for p, os_ in zip(test, outs) for o in os_]))


def mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    """Pointwise mean over seeds of (samples, acc) curves evaluated at the same steps."""
    return [(pts[0][0], float(np.mean([p[1] for p in pts]))) for pts in zip(*curves)]


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    t0 = time.time()
    seed_all(args.seed)
    out = Path(args.out_dir)
    if not args.model:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model = str(tdir / "policy")
        args.data, args.eval_data = args.data or str(tdir / "train.jsonl"), args.eval_data or str(tdir / "test.jsonl")
    ks = sorted({int(x) for x in args.ks.split(",")} | {args.prover_k})
    stages = set(args.stages.split(","))
    if stages - {"data", "train", "search", "rl", "sweep"}:
        raise ValueError(f"--stages {args.stages!r}: a comma list of data, train, search, rl, sweep")
    if args.mc_rollouts < max(ks):
        raise ValueError(f"--mc_rollouts {args.mc_rollouts} < the largest K {max(ks)}: pass@K needs n_mc >= K rollouts per prefix")
    if not (args.beam_width >= 1 and args.rl_k >= 2 and args.rl_eval_every >= 1):
        raise ValueError("--beam_width >= 1, --rl_k >= 2 and --rl_eval_every >= 1 are needed")
    if not args.eval_data:
        raise ValueError("--eval_data: test problems JSONL {problem, answer} (search and RL evaluation)")
    problems = load_problems(args.data)
    write_json(out / "config.json", asdict(args))
    test = load_problems(args.eval_data, args.n_eval_problems or None)
    data_probs, rl_probs = problems[: args.n_problems or len(problems)], problems[args.n_problems or 0:] or problems
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    gen = load_backend(args.model, backend=args.backend)
    tok = gen.tokenizer
    meta = {"kind": "pav", "chat": args.chat, "step_tag": SEP, "prover_k": args.prover_k, "alpha": args.alpha}

    # 1. data: seed rollouts and Monte-Carlo values of every prefix
    if "data" in stages:
        t = time.time()
        st = collect(gen, tok, data_probs, args, out)
        if st["samples"]:
            res["data"] = {"policy_samples": st["samples"], "generated_tokens": st["tokens"], "generate_calls": st["calls"],
                           "seconds": time.time() - t, "n_cov": args.n_cov, "n_mc": args.mc_rollouts}
            print(f"data: {st['samples']} policy samples ({st['tokens']} tokens, {st['calls']} generate calls)", flush=True)
    if not (out / "data.jsonl").exists():
        raise FileNotFoundError(f"{out / 'data.jsonl'}: no PAV data (run the data stage)")
    rows = data_rows(read_jsonl(out / "data.jsonl", required=("problem", "steps", "c", "m", "outcome")), ks)
    res["data_rows"], res["data_prefixes"] = len(rows), sum(len(r["c"]) for r in rows)

    # 2. the PAV (q_pi and q_mu@K heads) and the ORM (every complete rollout's outcome)
    heads, t = ["q_pi"] + [f"q_mu@{k}" for k in ks], time.time()
    if "train" in stages and not (out / "pav" / "verifier.json").exists():
        res["pav_train"] = train_values(args.model, rows, heads, args, out / "pav", meta, dev, "PAV training")
    if "train" in stages and not (out / "orm" / "verifier.json").exists():
        rs = orm_rows(out)
        rs = random.Random(args.seed).sample(rs, min(len(rs), args.orm_rows)) if args.orm_rows else rs
        res["orm_train"] = train_values(args.model, rs, ["q_pi"], replace(args, epochs=args.orm_epochs),
                                        out / "orm", meta | {"objective": "orm"}, dev, "ORM training")
        res["seconds/train"] = time.time() - t
    write_json(out / "results.json", res)

    # 3. search: PAV beam vs Q^pi beam vs ORM best-of-N, tokens per problem
    scfg = {k: getattr(args, k) for k in ("alpha", "prover_k", "ns", "search_ns", "beam_width", "max_depth", "n_eval_problems",
                                          "temperature", "seed")}
    if "search" in stages and res.get("search_config") != scfg:  # done with these settings: kept
        pav, orm = (PAVVerifier(ValueHeadLM.load(out / d).to(dev), tok, json.loads((out / d / "verifier.json").read_text()),
                                alpha=args.alpha, prover_k=args.prover_k) for d in ("pav", "orm"))
        t = time.time()
        res.update(run_search(gen, tok, test, pav, orm, args))
        res["search_config"], res["seconds/search"] = scfg, time.time() - t
        write_json(out / "results.json", res)
    pav = PAVVerifier(ValueHeadLM.load(out / "pav").to(dev), tok, json.loads((out / "pav" / "verifier.json").read_text())) \
        if (out / "pav" / "verifier.json").exists() else None
    del gen

    # 4. RL: PAV-RL (K = prover_k) vs outcome-only, every seed; 5. the K sweep's RL (first seed)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, t = {}, time.time()
    if "rl" in stages:
        for s in seeds:
            runs["outcome", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"outcome_seed{s}", None, None)
            runs["pav", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"pav{args.prover_k}_seed{s}", pav,
                                    args.prover_k)
        oc, pc = mean_curve([runs["outcome", s]["curve"] for s in seeds]), mean_curve([runs["pav", s]["curve"] for s in seeds])
        need = samples_to_reach(pc[1:], oc[-1][1]) if oc[-1][1] > oc[0][1] else None  # None: no gain to match
        res["rl"] = {"outcome_curve": oc, "pav_curve": pc, "samples_per_run": oc[-1][0],
                     "pav_samples_to_outcome_final": need,
                     "outcome_final_seeds": [runs["outcome", s]["final_acc"] for s in seeds],
                     "pav_final_seeds": [runs["pav", s]["final_acc"] for s in seeds],
                     "init_acc": oc[0][1]}
        res["rl/outcome_final_acc"], res["rl/pav_final_acc"] = oc[-1][1], pc[-1][1]
        res["rl/sample_efficiency_ratio"] = oc[-1][0] / need if need else None  # None: never reached
        res["rl/pav_minus_outcome"] = list(paired_interval(res["rl"]["pav_final_seeds"], res["rl"]["outcome_final_seeds"]))
    if "sweep" in stages:
        res["k_sweep"] = k_sweep(rows, ks, args, runs, rl_probs, test, out, pav, seeds[0])
    if {"rl", "sweep"} & stages:
        res["seconds/rl_and_sweep"] = time.time() - t  # runs reused from disk take no time
    res["wall_s"] = res.get("wall_s", 0.0) + time.time() - t0
    write_json(out / "results.json", res)
    md = report(res, args)
    (out / "results.md").write_text(md)
    print(md)
    return res


def orm_rows(out: Path) -> list[dict]:
    """The ORM's data (deviation 4): every complete rollout of the data stage, read at its end, target its
    0/1 outcome."""
    rows = [(r, r["steps"] or [""]) for r in read_jsonl(out / "rollouts.jsonl")]
    return [{"problem": r["problem"], "steps": st, "targets": {"q_pi": [r["outcome"]] * (len(st) + 1)}, "only_last": True}
            for r, st in rows]


def k_sweep(rows: list[dict], ks: list[int], args: Args, runs: dict, rl_probs, test, out: Path, pav, seed: int) -> list:
    """Per K: distinguishability and alignment from the MC values of pi's own steps, and the RL gain of
    PAV-RL with the q_mu@K head over outcome-only RL (first seed; K = prover_k: the mean over seeds)."""
    table = []
    a_pi = [a for r in rows for a in progress(r["targets"]["q_pi"])]
    for k in ks:
        a_mu = [a for r in rows for a in progress(r["targets"][f"q_mu@{k}"])]
        row = {"K": k, "distinguishability": distinguishability(a_mu), "alignment": alignment(a_mu, a_pi)}
        if ("outcome", seed) in runs:
            if k == args.prover_k:
                row["rl_gain"] = float(np.mean([runs["pav", s]["final_acc"] - runs["outcome", s]["final_acc"]
                                                for s in {s for _, s in runs}]))
            else:
                r = rl_run(args.model, rl_probs, test, args, seed, out / "rl" / f"pav{k}_seed{seed}", pav, k)
                row["rl_gain"] = r["final_acc"] - runs["outcome", seed]["final_acc"]
        table.append(row)
    return table


def report(res: dict, args: Args) -> str:
    md = ""
    s = res
    if "search_config" in res:
        ns, bns = sorted(int(x) for x in args.ns.split(",")), sorted(int(x) for x in args.search_ns.split(","))
        md += "search: accuracy % (generated tokens per problem)\n\n| method | " + " | ".join(f"N={n}" for n in ns) + \
              " |\n|---|" + "---|" * len(ns) + "\n"
        for name in ("pav_beam", "qpi_beam", "orm_bon", "maj", "pass"):
            md += f"| {name} | " + " | ".join(f"{100 * s[f'{name}@{n}']:.1f} ({s[f'tokens/{name}@{n}']:.0f})"
                                              if f"{name}@{n}" in s else "-" for n in ns) + " |\n"
        md += "\nPAV beam minus ORM best-of-N at the nearest token count, points [95% paired interval]\n\n"
        for n in bns:
            v = s[f"pav_vs_orm@{n}"]
            md += (f"- N={n}: vs orm_bon@{v['orm_n']} ({v['tokens_pav']:.0f} vs {v['tokens_orm']:.0f} tokens): "
                   "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * x for x in v["diff"])) +
                   "; vs qpi_beam: {:+.1f} [{:+.1f}, {:+.1f}]\n".format(*(100 * x for x in s[f"pav_vs_qpi@{n}"])))
        md += ("\nright vs wrong samples (AUC): ORM {:.3f}, PAV Q^pi last step {:.3f}, PAV lowest Q^pi {:.3f}\n"
               .format(s["auc/orm_last"], s["auc/pav_qpi_last"], s["auc/pav_qpi_min"]))
        eff = s["pav_compute_efficiency"]
        md += (f"\nORM's best: {100 * s['orm_best']['acc']:.1f}% at N={s['orm_best']['n']} ({s['orm_best']['tokens']:.0f} "
               f"tokens); " + (f"the PAV beam first reaches it at N={s['pav_reaches_orm_best_at']}: ORM tokens / PAV "
                               f"tokens = {eff:.2f}\n" if eff else "the PAV beam reaches it at no budget run\n"))
    r = res.get("rl")
    if r:
        md += ("\nRL: test per-sample accuracy % (mean over seeds) by policy samples\n\n| samples | outcome-only | PAV-RL |\n"
               "|---|---|---|\n" + "".join(f"| {a[0]} | {100 * a[1]:.1f} | {100 * b[1]:.1f} |\n"
                                           for a, b in zip(r["outcome_curve"], r["pav_curve"])))
        ratio = res["rl/sample_efficiency_ratio"]
        md += (f"\nfinal: outcome-only {100 * res['rl/outcome_final_acc']:.1f}, PAV-RL {100 * res['rl/pav_final_acc']:.1f} "
               "(PAV - outcome over seeds: {:+.1f} [{:+.1f}, {:+.1f}]); ".format(*(100 * x for x in res["rl/pav_minus_outcome"])) +
               (f"PAV-RL reaches outcome-only's final accuracy at {r['pav_samples_to_outcome_final']} samples: "
                f"{ratio:.2f}x" if ratio else "PAV-RL does not reach outcome-only's final accuracy") + "\n")
    if res.get("k_sweep"):
        md += "\nK sweep (MC values of pi's steps; RL gain = PAV-RL - outcome-only, final per-sample accuracy)\n\n" \
              "| K | distinguishability Var(A^mu) | alignment corr(A^mu, A^pi) | RL gain (points) |\n|---|---|---|---|\n"
        for row in res["k_sweep"]:
            g = row.get("rl_gain")
            md += (f"| {row['K']} | {row['distinguishability']:.4f} | {row['alignment']:.3f} | "
                   f"{'-' if g is None else f'{100 * g:+.1f}'} |\n")
    return md


if __name__ == "__main__":
    run_main(main, Args, TOY)
