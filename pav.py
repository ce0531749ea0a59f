"""pav.py: process advantage verifiers (Setlur et al., "Rewarding Progress: Scaling Automated Process
Verifiers for LLM Reasoning", arXiv 2410.08146): data, training, beam search and RL in one file.

A step's process reward is its progress under a prover policy mu: A^mu(s_h, a_h) = Q^mu(s_h, a_h) - V^mu(s_h),
the change, across the step, in the prover's chance of reaching the right answer; steps are deterministic,
so V^mu(s_h) is the value of the previous prefix and A^mu_h = Q^mu_h - Q^mu_{h-1}. The prover is best-of-K of
the base policy pi: from one set of Monte-Carlo rollouts of pi, c right of m, Q^pi = c/m and Q^BoK = 1 -
C(m-c, K)/C(m, K) (the unbiased pass@K estimator), so no second model is sampled. A PAV (value heads on the
policy's LM, soft-target BCE) predicts Q^pi and Q^mu per prefix; search and RL use the effective reward
Q^pi + alpha * A^mu: step-level beam search ranks candidate prefixes by it (alpha_search 0.5), and RL
follows Eq. 5, grad = sum_h grad log pi(a_h | s_h) * (Q^pi + alpha_rl * A^mu_h): the outcome stands for Q^pi
(with the leave-one-out baseline of RLOO), A^mu_H of the last step is outcome - Q^mu_{H-1} (a finished
solution's value is its outcome whatever the prover does), and the process term has a baseline of its own,
the mean of the other samples' A^mu at the same step (per prompt; unbiased, and a constant added to every
step cancels). The control `--values mc` replaces the PAV's Q^pi and Q^mu by fresh Monte-Carlo rollouts of the
base policy (the data stage's estimator) in beam search and in RL: the paper's quantities without the
verifier's error, an estimate once m >= 16 (at m = K = 4 pass@4 of 4 rollouts is a 0/1 indicator). The toy's
exact control `--values exact` takes the oracle prover's values instead (1 while no step so far is wrong, 0
after: A = -1 on the first wrong step, 0 elsewhere), through the same process terms, step baseline and
alpha, so the RL rows report the share of its gain each value source keeps; it needs no data or training
(`python pav.py --stages rl --values exact`). Theorem 3.1 says a prover helps when its advantages vary across
the actions pi takes at a state (distinguishability) and agree with A^pi (alignment); the K sweep measures both
per state (actions sampled at pi's own states, each valued by rollouts) and the RL gain, for K in --ks.

No public code exists; defaults the paper states are marked (paper), the note's secondhand readings
(paper, unverified), the rest are ours. The paper's RL settings (alpha_rl, the baseline of the process
term, a KL penalty, the RL algorithm) are not in the text read here: alpha_rl 3 is the note's secondhand
reading (the toy uses 1: at 3 its learned PAV-RL collapses), the rest is ours and named below. Deviations:
  1. One PAV model holds a head per prover (q_pi and q_mu@K for every K of --ks), trained together on the
     same prefixes; the paper trains one PAV per prover. The K sweep reads each head.
  2. Beam search picks its answer among the finished beams by Q^pi of the whole solution (the value of a
     complete solution: its predicted correctness), for the PAV and the Q^pi beam alike; the mc control's
     value of a complete solution is its outcome, so its pick is exact (compare it with pass@N as well).
  3. RL is a compact on-policy REINFORCE (one AdamW step per batch, no PPO clip): Eq. 5's sum over a
     sequence's tokens, divided by max_new_tokens (a constant, so no length bias; --rl_loss token_mean is
     the per-sequence mean, biased toward short solutions); the process term's leave-one-out baseline is
     ours (--rl_baseline); a KL penalty to the base policy is off (--kl; k3 estimator per token).
  4. The ORM baseline is a value head trained here on every complete rollout the data stage sampled (seed
     and Monte-Carlo rollouts, 0/1 outcomes): as many policy samples as the PAV's data, more sequences.
  5. torchrun: the data stage, search, the sweep's states and RL's prompts are sharded over ranks and
     gathered; PAV / ORM training and RL under DDP or FSDP2 (--shard). --backend vllm serves the data and
     search stages; RL samples with HF from the trained module itself (under FSDP: a copy synced each step).
  6. The K sweep re-encodes a state (a prefix of a seed rollout) from its step texts joined by the separator.
  7. Toy-scale settings (TOY below) replace the defaults when --model is empty; the toy evaluates RL every 3
     steps (192 samples, the grid of its sample-efficiency ratios) and leaves mc out of RL (--rl_values).

    python pav.py                                                      # toy world on CPU
    python pav.py --stages rl --values exact                           # toy: outcome-only vs the exact control
    python pav.py --model MODEL_DIR --data train.jsonl --eval_data test.jsonl --n_problems 4000
    torchrun --nproc_per_node 8 pav.py --model MODEL_DIR --data train.jsonl --eval_data test.jsonl --bf16
"""
from __future__ import annotations

import hashlib
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
from utils.train import (MetricsLog, all_reduce, amp, barrier, close_dist, full_state, gather_in_order, gather_lists,
                         rank_share, run_main, seed_all, setup_dist, shard, token_logprobs, unwrap, write_json)
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
    alpha_rl: float = field(default=3.0, metadata={"help": "alpha_rl: weight of A^mu in the RL step reward (paper, "
                                                           "unverified: 3-5; not in the text read here)"})
    rl_baseline: str = field(default="loo", metadata={"help": "baseline of the process term: loo (per prompt, the other "
                                                            "samples' mean A^mu at the same step; ours) | none"})
    rl_loss: str = field(default="sum", metadata={"help": "sum (Eq. 5: over a sequence's tokens, / max_new_tokens) | "
                                                        "token_mean (per sequence; biased by length)"})
    kl: float = field(default=0.0, metadata={"help": "KL penalty to the base policy, k3 per token (the paper's: not in "
                                                   "the text read here; ours: off)"})
    values: str = field(default="learned,mc", metadata={"help": "value sources of the PAV beam and PAV-RL rows: learned "
                                                              "(the PAV), mc (fresh base-policy rollouts: the control), "
                                                              "exact (toy: the checker's values, the oracle prover)"})
    rl_values: str = field(default="learned,mc,exact", metadata={"help": "which of --values also guide PAV-RL rows (the "
                                                                        "toy leaves mc out: about 7 min a run at m = 16)"})
    value_rollouts: int = field(default=16, metadata={"help": "m: base-policy rollouts per prefix for --values mc in "
                                                            "search, >= prover_k (the data stage's estimator)"})
    rl_value_rollouts: int = field(default=0, metadata={"help": "m of --values mc in RL, >= prover_k (0: value_rollouts)"})
    mc_search_ns: str = field(default="4,8,16,32", metadata={"help": "beam budgets N searched with mc values"})
    sweep_states: int = field(default=500, metadata={"help": "K sweep: pi's states (prefixes of seed rollouts) where "
                                                           "beam_width actions are sampled and valued (0: pooled only)"})
    rl_steps: int = field(default=100, metadata={"help": "RL steps per run (ours)"})
    rl_prompts: int = field(default=64, metadata={"help": "prompts per RL step (ours)"})
    rl_k: int = field(default=4, metadata={"help": "rollouts per prompt; the RLOO group (ours)"})
    rl_lr: float = field(default=1e-6, metadata={"help": "policy AdamW lr, constant (ours)"})
    rl_eval_every: int = field(default=10, metadata={"help": "test per-sample accuracy every N RL steps (the grid of "
                                                           "the sample-efficiency ratio)"})
    rl_eval_samples: int = field(default=4, metadata={"help": "samples per test problem in the RL evaluation"})
    seeds: str = field(default="0,1,2", metadata={"help": "RL seeds of PAV-RL and outcome-only RL (K sweep: the first)"})
    stages: str = field(default="data,train,search,rl,sweep", metadata={"help": "stages to run (each is skipped when done)"})
    out_dir: str = field(default="runs/pav", metadata={"help": "data.jsonl, pav/, orm/, search.json, rl/, results.json"})
    sweep_rl: bool = field(default=True, metadata={"help": "K sweep: a PAV-RL run (first seed) for every K, not only "
                                                         "prover_k's (whose gain is the mean over seeds)"})
    shard: str = field(default="ddp", metadata={"help": "torchrun: ddp | fsdp (FSDP2, a unit per decoder layer) for "
                                                      "PAV / ORM training and RL"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on GPU for PAV / ORM training and RL, fp32 "
                                                      "master weights (the paper trains in bf16)"})
    seed: int = field(default=0, metadata={"help": "seed of data, training and search"})


# Toy scale (the 0.28M-parameter toy policy, 2 CPU cores, about 23 minutes in all). alpha_rl 1: at 3 the learned
# PAV's errors outweigh the outcome and its RL collapses on the toy (docs/results/pav.md, levers on RL). RL with
# mc values at m = 16 (an estimate, not m = K = 4's indicator) is left to --rl_values: about 7 min a run.
TOY = dict(alpha_rl=1.0, n_problems=800, n_cov=1, mc_rollouts=16, max_new_tokens=160, backend="hf", epochs=6, lr=1e-3, batch_tokens=4096, orm_rows=8000,
           max_depth=6, n_eval_problems=100, rl_steps=30, rl_prompts=16, rl_lr=3e-4, rl_eval_every=3, max_len=1024,
           value_rollouts=8, rl_value_rollouts=16, search_ns="4,8,16", mc_search_ns="4,8", sweep_states=200, sweep_rl=False,
           values="learned,mc,exact", rl_values="learned,exact")


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


def process_terms(q_mu: list[float], outcome: float) -> list[float]:
    """A^mu_h for h = 1..H in RL from the prover's values of prefixes 0..H-1: the last step's Q^mu_H is the
    outcome itself (a finished solution is right or wrong whatever the prover would do)."""
    return progress(list(q_mu) + [outcome])


def exact_values(first_error: int, n_steps: int) -> list[float]:
    """The oracle prover's values of prefixes 0..H-1 (--values exact, toy only): 1 while no step so far is wrong,
    0 from the first wrong step on (the toy's errors are never undone: a prover that never errs from a right
    prefix reaches the answer, none reaches it from a wrong one). Through process_terms: A = -1 on the first
    wrong step and 0 on every other step; a checked-right solution whose answer is wrong gets -1 on its last."""
    return [1.0 if first_error < 0 or h <= first_error else 0.0 for h in range(n_steps)]


def loo_step_baseline(a_mu: list[list[float]], k: int) -> list[list[float]]:
    """A^mu_{i,h} minus the mean A^mu at step h of the other samples of its prompt (consecutive groups of
    k; their mean over all steps where none has a step h): the baseline depends on the other samples
    alone, so it adds no bias, and a constant added to every step cancels exactly."""
    out = []
    for g in range(0, len(a_mu), k):
        grp = a_mu[g: g + k]
        for i, am in enumerate(grp):
            others = [o for j, o in enumerate(grp) if j != i]
            row = []
            for h, x in enumerate(am):
                pool = [o[h] for o in others if len(o) > h] or [y for o in others for y in o]
                row.append(x - (sum(pool) / len(pool) if pool else 0.0))
            out.append(row)
    return out


def step_weights(step_of: list[int], a_out: float, a_mu: list[float], alpha_rl: float) -> list[float]:
    """Each token's policy-gradient weight: the outcome advantage + alpha_rl * A^mu of the token's step."""
    return [a_out + alpha_rl * (a_mu[min(s, len(a_mu) - 1)] if a_mu else 0.0) for s in step_of]


def seq_reduce(x: torch.Tensor, mask: torch.Tensor, kind: str, norm: float) -> torch.Tensor:
    """Per-token terms (B, T) to one loss: each sequence's sum / norm (kind "sum": a constant, as Eq. 5's sum
    over steps) or its token mean (kind "token_mean": 1/T_i, which leans toward short sequences), then the
    mean over sequences."""
    s = (x * mask).sum(-1)
    return (s / norm if kind == "sum" else s / mask.sum(-1).clamp(min=1)).mean()


def kl_k3(lp: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || ref) per token: exp(ref - lp) - (ref - lp) - 1 (>= 0)."""
    d = ref_lp - lp
    return torch.exp(d) - d - 1


def distinguishability(a_mu: list[float]) -> float:
    """Var of A^mu over a set of steps (at one state: Theorem 3.1's first term)."""
    return float(np.var(a_mu)) if a_mu else float("nan")


def per_state(states: list[tuple[list[float], list[float]]]) -> tuple[float, float]:
    """Theorem 3.1's two terms from (A^mu, A^pi) of the actions sampled at each state: the mean over states
    of Var_a A^mu(s, a) (distinguishability) and of E_a[A^mu(s, a) A^pi(s, a)] (alignment)."""
    st = [(m, p) for m, p in states if m]
    if not st:
        return float("nan"), float("nan")
    return (float(np.mean([np.var(m) for m, _ in st])),
            float(np.mean([np.mean(np.asarray(m) * np.asarray(p)) for m, p in st])))


def alignment(a_mu: list[float], a_pi: list[float]) -> float:
    """Pearson correlation of A^mu with A^pi over the same steps (Theorem 3.1's second term)."""
    if len(a_mu) < 2 or np.std(a_mu) == 0 or np.std(a_pi) == 0:
        return float("nan")
    return float(np.corrcoef(a_mu, a_pi)[0, 1])


def samples_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first sample count at which a (samples, accuracy) curve reaches target."""
    return next((n for n, v in curve if v >= target - 1e-12), None)


# ----------------------------------------------------------------------------- 1. data: Monte-Carlo prefix values
def collect(gen, tok, problems: list[dict], args: Args, out: Path, dist=None) -> dict:
    """n_cov seed rollouts per problem; for every prefix of each (the question alone included), n_mc
    rollouts of pi, graded. Appends one row per seed rollout to out/data.jsonl (resumable by problem).
    Under torchrun each rank samples every world-th problem; rank 0 writes each chunk's gathered rows."""
    path, done, world, rank = out / "data.jsonl", set(), dist.world if dist else 1, dist.rank if dist else 0
    if path.exists():
        done = {r["problem"] for r in read_jsonl(path)}
    todo = [p for p in problems if p["problem"] not in done]
    mine = todo[rank::world]
    stats = {"calls": 0, "samples": 0, "tokens": 0}
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="PAV data (MC rollouts)", disable=rank > 0)
    for j in range(math.ceil(math.ceil(len(todo) / world) / 32)):  # as many chunks on every rank (collectives)
        s, chunk = (j * world + rank) * 32, mine[j * 32: (j + 1) * 32]
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
        finished, rows = (gather_lists(dist, finished), gather_lists(dist, rows)) if dist else (finished, rows)
        if rank == 0:
            write_jsonl(out / "rollouts.jsonl", finished, append=True)  # every complete rollout: the ORM's data
            write_jsonl(path, rows, append=True)  # written last: a problem in data.jsonl is done
        bar.update(len({r["problem"] for r in rows}))
        bar.set_postfix(samples=stats["samples"])
    bar.close()
    if dist and dist.on:  # every rank's sampling counted
        stats = {k: sum(d[k] for d in gather_lists(dist, [stats])) for k in stats}
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


class MCValues:
    """The control (--values mc): Q^pi and Q^mu@K of a prefix (token ids, the prompt first) from m fresh
    rollouts of the base policy, c right: c/m and pass@K, the data stage's estimator, in place of the PAV's
    predictions. Each prefix is sampled once (cached); rollout samples and tokens go to `ledger`, apart
    from the policy's."""

    def __init__(self, gen, tok, m: int, ks: list[int], args: Args, seed: int = 0):
        self.gen, self.tok, self.m, self.args, self.seed = gen, tok, m, args, seed
        self.ks = [k for k in ks if k <= m]
        self.cache, self.ledger = {}, {"calls": 0, "samples": 0, "tokens": 0}

    def values(self, prefixes: list[list[int]], prompt_lens: list[int], answers: list[str]) -> list[dict[str, float]]:
        new = {}
        for p, n, a in zip(prefixes, prompt_lens, answers):
            if tuple(p) not in self.cache:
                new.setdefault(tuple(p), (n, a))
        outs = _sample(self.gen, [list(k) for k in new], self.m, self.args, self.ledger,
                       seed=self.seed * 104729 + 7 * self.ledger["calls"]) if new else []
        for (key, (n, a)), os_ in zip(new.items(), outs):
            head = self.tok.decode(list(key[n:]), skip_special_tokens=True)
            self.cache[key] = sum(grade(head + o.text, a) for o in os_)
        return [self.heads(self.cache[tuple(p)]) for p in prefixes]

    def heads(self, c: int) -> dict[str, float]:
        return {"q_pi": c / self.m} | {f"q_mu@{k}": pass_at_k(self.m, c, k) for k in self.ks}


# ----------------------------------------------------------------------------- 2. training the PAV and the ORM
def train_values(init: str, rows: list[dict], heads: list[str], args: Args, out: Path, meta: dict, dist,
                 desc: str) -> dict:
    """Value heads on the policy's LM, soft-target BCE on every (prefix, head) of `rows` ({problem, steps,
    targets: {head: [per prefix]}, only_last}); the epoch with the lowest held-out loss is saved to out.
    Under torchrun each rank takes every world-th batch (as many on each) under DDP or FSDP2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, dev, fsdp = AutoTokenizer.from_pretrained(init), dist.device, dist.on and args.shard == "fsdp"
    model = ValueHeadLM(AutoModelForCausalLM.from_pretrained(init), outputs=len(heads))
    head = model.model.get_output_embeddings()
    if head is not None and head.weight is not model.model.get_input_embeddings().weight:
        head.requires_grad_(False)  # the LM head is not in the value heads' graph (DDP needs every trained parameter used)
    model = shard(model if fsdp else model.to(dev), args.shard, dist, args.bf16 and dev.type == "cuda")
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
    if dist.on:  # every world-th batch, as many on each rank (DDP / FSDP average the gradients)
        batches = [(b * dist.world)[dist.rank: max(1, len(b) // dist.world) * dist.world: dist.world] for b in batches]
    total = sum(len(b) for b in batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    log, best, step, pad = MetricsLog(out, enabled=dist.main), float("inf"), 0, tok.pad_token_id or 0
    bar = tqdm(total=total, desc=desc, disable=not dist.main)
    for epoch in range(args.epochs):
        model.train()
        for b in batches[epoch]:
            ids, mask, tb, tt, target = collate(b, pad, dev)
            with amp(args.bf16 and not fsdp, dev):
                z = model(ids, mask, tb, tt).float().reshape(target.shape)
            loss = F.binary_cross_entropy_with_logits(z, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            log.log(step, **{"train/loss": loss.item()})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        held_loss = _heldout_loss(model, ex["eval"], args, pad, dist)
        log.log(step, **{"eval/loss": held_loss, "epoch": epoch + 1})
        if held_loss <= best or held_loss != held_loss:
            best = held_loss
            sd = full_state(model, fsdp=fsdp)[0]  # a collective under FSDP
            if dist.main:
                unwrap(model).save(out, state_dict=sd)
                tok.save_pretrained(out)
                write_json(out / "verifier.json", meta | {"heads": heads, "epoch": epoch + 1, "heldout_loss": held_loss})
    bar.close()
    barrier(dist)
    return {"train_sequences": len(ex["train"]), "train_targets": sum(len(e["tags"]) for e in ex["train"]) * len(heads),
            "heldout_loss": best, "heldout_loss_constant": const}


def _const_loss(p: torch.Tensor, ex: list[dict]) -> float:
    """The held-out loss of predicting the training mean of each head everywhere: the bar a PAV must beat."""
    if not ex:
        return float("nan")
    t = torch.tensor([x for e in ex for x in e["labels"]])  # (N, heads)
    return F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6).expand_as(t), t).item()


@torch.no_grad()
def _heldout_loss(model, ex: list[dict], args: Args, pad: int, dist) -> float:
    """Mean BCE over every held-out target (each rank every world-th batch, summed over ranks)."""
    if not ex:
        return float("nan")
    model.eval()
    bs = make_batches(ex, args.batch_tokens, random.Random(0))
    tot = torch.zeros(2, device=dist.device)
    for j in range(math.ceil(len(bs) / dist.world)):  # as many forwards on every rank (FSDP's collectives)
        i = j * dist.world + dist.rank
        ids, mask, tb, tt, target = collate(bs[i % len(bs)], pad, dist.device)
        loss = F.binary_cross_entropy_with_logits(model(ids, mask, tb, tt).float().reshape(target.shape), target,
                                                  reduction="sum")
        if i < len(bs):
            tot += torch.stack([loss, torch.tensor(float(target.numel()), device=dist.device)])
    all_reduce(tot, torch.distributed.ReduceOp.SUM, dist)
    model.train()
    return (tot[0] / tot[1]).item()


# ----------------------------------------------------------------------------- 3. search
def pav_scorer(pav: PAVVerifier, problems: list[dict], alpha: float):
    """Beam scores from the PAV: (Q^pi_h + alpha * A^mu_h of the last step, Q^pi of the prefix) per candidate."""
    mu = f"q_mu@{pav.prover_k}"

    def score(cands):
        vals = pav.prefix_values([problems[c[0]]["problem"] for c in cands], [c[3] or [""] for c in cands])
        return [(effective_reward(v["q_pi"], v.get(mu, v["q_pi"]), alpha if mu in v else 0.0)[-1], v["q_pi"][-1])
                for v in vals]
    return score


def mc_scorer(mc: MCValues, problems: list[dict], prompts: list[list[int]], alpha: float, k: int, tok):
    """Beam scores from fresh rollouts (the control): the effective reward from the MC values of the
    candidate and of its parent prefix; a finished candidate's value is its outcome (deviation 2)."""
    def score(cands):
        open_ = [c for c in cands if not c[4]]
        lens, golds = [len(prompts[c[0]]) for c in open_], [str(problems[c[0]]["answer"]) for c in open_]
        par = iter(mc.values([c[1] for c in open_], lens, golds))  # the parents: sampled last iteration (cached)
        own = iter(mc.values([c[2] for c in open_], lens, golds))
        out = []
        for i, parent, ids, steps, done in cands:
            if done:
                y = float(grade(tok.decode(ids[len(prompts[i]):], skip_special_tokens=True), str(problems[i]["answer"])))
                out.append((y, y))
            else:
                p, v = next(par), next(own)
                out.append((v["q_pi"] + alpha * (v[f"q_mu@{k}"] - p[f"q_mu@{k}"]), v["q_pi"]))
        return out
    return score


def exact_scorer(problems: list[dict], prompts: list[list[int]], alpha: float, tok):
    """Beam scores from the toy's checker (--values exact): an open candidate's value is exact_values' (1 while
    none of its steps is wrong), its score that + alpha * (its value - its parent's); a finished candidate's
    value is its outcome."""
    from utils.toy import check_steps
    seen = {}  # prefix ids -> its value (a parent was a candidate the iteration before; the prompt: 1)

    def score(cands):
        out = []
        for i, parent, ids, steps, done in cands:
            if done:
                y = float(grade(tok.decode(ids[len(prompts[i]):], skip_special_tokens=True), str(problems[i]["answer"])))
                out.append((y, y))
                continue
            q = seen.setdefault(tuple(ids), float(not steps or check_steps(problems[i]["problem"], steps).first_error < 0))
            out.append((q + alpha * (q - seen.get(tuple(parent), 1.0)), q))
        return out
    return score


def beam_search(gen, tok, problems: list[dict], prompts: list[list[int]], n: int, m: int, score, args: Args,
                ledger: dict) -> list[str | None]:
    """Step-level beam search, batched over problems: N candidate first steps; each iteration keeps the N/M
    open candidates of highest effective reward Q^pi + alpha * A^mu (of their last step; `score` gives it
    and the value of the prefix for each candidate (problem, parent ids, ids, steps, done)) and samples M
    next steps from each; finished candidates go to a pool (until it holds N). Returns each problem's
    answer: the pooled solution of highest value (deviation 2)."""
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
                cands.append((i, ids, ids + list(s.token_ids), st + ([text] if text else []), done))
        frontier = {}
        for (i, _, ids, st, done), (r, v) in zip(cands, score(cands) if cands else []):
            if done:
                pool[i].append((v, tok.decode(ids[len(prompts[i]):], skip_special_tokens=True)))
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


def run_search(gen, tok, test_all: list[dict], pav: PAVVerifier, orm: PAVVerifier, args: Args, dist,
               values: set[str]) -> dict:
    """ORM best-of-N and majority over N_max samples (disjoint groups of N averaged), then beam search on the
    effective reward (pav_beam: the PAV; mc_beam: fresh rollouts) and on Q^pi alone (qpi_beam) at each beam
    budget; tokens per problem beside (tokens/mc_rollouts@N: the control's rollouts, apart). Under torchrun
    each rank searches every world-th problem; the per-problem figures are gathered in order."""
    per, tot, scored = {}, {}, []  # per-problem figures, token totals, (score name, score, right)
    test = rank_share(test_all, dist)
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in test]
    golds = [str(p["answer"]) for p in test]
    ns, nmax = sorted(int(x) for x in args.ns.split(",")), max(int(x) for x in args.ns.split(","))
    outs, stats = [], {"calls": 0, "samples": 0, "tokens": 0}
    for s in tqdm(range(0, len(prompts), 16), desc=f"best-of-{nmax} samples", disable=not dist.main):
        outs += _sample(gen, prompts[s: s + 16], nmax, args, stats, seed=args.seed + s * dist.world + dist.rank)
    answers = [[extract_answer(o.text) for o in os_] for os_ in outs]
    ok = [[a is not None and is_equiv(a, g) for a in row] for row, g in zip(answers, golds)]
    steps = [step_spans(tok, list(o.token_ids))[0] or [""] for os_ in outs for o in os_]
    orm_v = orm.effective([p["problem"] for p in test for _ in range(nmax)], steps)
    orm_s = [[v[-1] if v else 0.0 for v in orm_v[i * nmax: (i + 1) * nmax]] for i in range(len(test))]
    ntok = [[len(o.token_ids) for o in os_] for os_ in outs]
    pav_v = pav.prefix_values([p["problem"] for p in test for _ in range(nmax)], steps)
    y = [float(x) for row in ok for x in row]  # how well each tells right from wrong samples
    scored += [("orm_last", v[-1] if v else 0.0, t) for v, t in zip(orm_v, y)]
    scored += [("pav_qpi_last", v["q_pi"][-1], t) for v, t in zip(pav_v, y)]
    scored += [("pav_qpi_min", min(v["q_pi"]), t) for v, t in zip(pav_v, y)]
    groups = [AnswerGroups() for _ in test]
    for n in ns:
        g = nmax // n
        for name in ("orm_bon", "maj", "pass"):
            per[f"{name}@{n}"] = []
            tot[f"{name}@{n}"] = sum(sum(x[:n]) for x in ntok)
        for i in range(len(test)):
            sl = [slice(j * n, (j + 1) * n) for j in range(g)]
            per[f"orm_bon@{n}"].append(sum(ok[i][s][int(np.argmax(orm_s[i][s]))] for s in sl) / g)
            per[f"maj@{n}"].append(sum((lambda a: a is not None and is_equiv(a, golds[i]))(
                majority(answers[i][s], groups[i])) for s in sl) / g)
            per[f"pass@{n}"].append(sum(any(ok[i][s]) for s in sl) / g)
    beams = [("pav_beam", args.search_ns, lambda n: pav_scorer(pav, test, args.alpha))] * ("learned" in values) + \
            [("qpi_beam", args.search_ns, lambda n: pav_scorer(pav, test, 0.0))]
    mcs = {}
    if "mc" in values:
        beams.append(("mc_beam", args.mc_search_ns, lambda n: mc_scorer(mcs.setdefault(n, MCValues(
            gen, tok, args.value_rollouts, [args.prover_k], args, seed=args.seed + 1 + dist.rank)), test, prompts,
            args.alpha, args.prover_k, tok)))
    if "exact" in values:
        beams.append(("exact_beam", args.search_ns, lambda n: exact_scorer(test, prompts, args.alpha, tok)))
    for name, budgets, scorer in beams:
        for n in sorted(int(x) for x in budgets.split(",")):
            ledger, t = {"tokens": 0, "calls": 0}, time.time()
            preds = beam_search(gen, tok, test, prompts, n, args.beam_width, scorer(n), args, ledger)
            per[f"{name}@{n}"] = [float(p is not None and is_equiv(p, g)) for p, g in zip(preds, golds)]
            tot[f"{name}@{n}"] = ledger["tokens"]
            if name == "mc_beam":
                tot[f"mc_rollouts@{n}"] = mcs[n].ledger["tokens"]
                tot[f"mc_rollout_samples@{n}"] = mcs[n].ledger["samples"]  # a count of samples, not tokens
            if dist.main:
                print(f"{name}@{n}: {100 * np.mean(per[f'{name}@{n}']):.1f}%{' (rank 0 share)' if dist.on else ''}  "
                      f"{ledger['tokens'] / max(1, len(test)):.0f} tok/problem ({time.time() - t:.0f}s)", flush=True)
    # every rank's problems, in order
    per = {k: gather_in_order(v, len(test_all), dist) for k, v in sorted(per.items())}
    tot = {k: sum(d[k] for d in gather_lists(dist, [tot])) for k in tot}
    scored = gather_lists(dist, scored)
    res = {k: float(np.mean(v)) for k, v in per.items()}
    res.update({(k if k.startswith("mc_rollout_samples") else f"tokens/{k}"): v / len(test_all) for k, v in tot.items()})
    for name in ("orm_last", "pav_qpi_last", "pav_qpi_min"):
        res[f"auc/{name}"] = auc([s for k, s, _ in scored if k == name], [t for k, _, t in scored if k == name])

    def nearest(n, name):  # the best-of-N budget whose tokens are nearest a beam's
        return min(ns, key=lambda b: abs(math.log(res[f"tokens/orm_bon@{b}"] / max(1e-9, res[f"tokens/{name}@{n}"]))))
    for name, budgets, _ in beams:
        if name == "qpi_beam":
            continue
        pre = name[: -len("_beam")]  # pav | mc | exact
        for n in sorted(int(x) for x in budgets.split(",")):  # against the ORM (and pass@N) at the nearest token count
            b = nearest(n, name)
            res[f"{pre}_vs_orm@{n}"] = {"orm_n": b, f"tokens_{pre}": res[f"tokens/{name}@{n}"],
                                        "tokens_orm": res[f"tokens/orm_bon@{b}"],
                                        "diff": list(paired_interval(per[f"{name}@{n}"], per[f"orm_bon@{b}"], seed=args.seed))}
            if name in ("mc_beam", "exact_beam"):  # both pick exactly: the search's own effect
                res[f"{pre}_vs_pass@{n}"] = {"pass_n": b, "diff": list(paired_interval(per[f"{name}@{n}"], per[f"pass@{b}"],
                                                                                    seed=args.seed))}
            elif f"qpi_beam@{n}" in per:
                res[f"pav_vs_qpi@{n}"] = list(paired_interval(per[f"{name}@{n}"], per[f"qpi_beam@{n}"], seed=args.seed))
    best_n = max(ns, key=lambda b: res[f"orm_bon@{b}"])
    res["orm_best"] = {"n": best_n, "acc": res[f"orm_bon@{best_n}"], "tokens": res[f"tokens/orm_bon@{best_n}"]}
    for pre, name, budgets in (("pav", "pav_beam", args.search_ns), ("mc", "mc_beam", args.mc_search_ns),
                               ("exact", "exact_beam", args.search_ns)):
        if f"{name}@{sorted(int(x) for x in budgets.split(','))[0]}" not in res:
            continue
        reach = [n for n in sorted(int(x) for x in budgets.split(",")) if res[f"{name}@{n}"] >= res["orm_best"]["acc"]]
        res[f"{pre}_reaches_orm_best_at"] = reach[0] if reach else None  # ratio > 1: the beam needs fewer tokens
        res[f"{pre}_compute_efficiency"] = (res["orm_best"]["tokens"] / res[f"tokens/{name}@{reach[0]}"]) if reach else None
    res["search_samples"] = sum(d["samples"] for d in gather_lists(dist, [stats]))
    return res


# ----------------------------------------------------------------------------- 4. RL
def rl_run(init: str, train: list[dict], test: list[dict], args: Args, seed: int, out: Path, values, k: int | None,
           dist, gen_base=None, pav_sha: str = "") -> dict:
    """Online RL from the base policy (Eq. 5): each step rl_prompts x rl_k rollouts at the temperature,
    graded; token weights (outcome - RLOO baseline) + alpha_rl * (A^mu of the token's step - its baseline),
    A^mu from `values` ("learned": the PAV's q_mu@k head; "mc": m fresh rollouts of the base policy from
    every prefix, sampled by gen_base; "exact": the toy checker's exact_values), else the outcome advantage
    alone; one AdamW step on the sequence-sum loss (+ kl * KL to the base policy). Test per-sample accuracy every rl_eval_every steps. Under torchrun
    each rank takes every world-th prompt of a step (DDP or FSDP2). Writes out/metrics.jsonl and
    out/curve.json (a finished run with the same settings and base policy, and for "learned" the same PAV
    weights, is read back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kind = "outcome" if values is None else values if isinstance(values, str) else "learned"
    cfg = {x: getattr(args, x) for x in ("rl_steps", "rl_prompts", "rl_k", "rl_lr", "rl_eval_every", "rl_eval_samples",
                                         "temperature", "n_eval_problems", "rl_loss", "kl")}
    cfg |= {x: getattr(args, x) for x in ("alpha_rl", "rl_baseline")} if values is not None else {}
    m_rl = args.rl_value_rollouts or args.value_rollouts
    cfg |= {"values": kind, "value_rollouts": m_rl} if kind == "mc" else {"values": kind} if kind == "exact" else {}
    cfg |= {"values": kind, "pav_sha256": pav_sha} if kind == "learned" else {}  # reuse: the same PAV only
    cfg["init_sha256"] = weights_sha256(Path(init))  # ... and the same base policy
    if (out / "curve.json").exists() and json.loads((out / "curve.json").read_text()).get("config") == cfg:
        return json.loads((out / "curve.json").read_text())  # a finished run with these settings
    if args.rl_prompts % dist.world:
        raise ValueError(f"--rl_prompts {args.rl_prompts} must be a multiple of the {dist.world} ranks")
    seed_all(seed)
    dev, fsdp = dist.device, dist.on and args.shard == "fsdp"
    tok = AutoTokenizer.from_pretrained(init)
    policy = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    policy = shard(policy if fsdp else policy.to(dev), args.shard, dist, args.bf16 and dev.type == "cuda")
    ref = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32).to(dev).requires_grad_(False).eval() \
        if args.kl > 0 else None
    gen = load_backend(init, backend="hf", tokenizer=tok, device=dev) if fsdp else \
        load_backend(init, backend="hf", model=unwrap(policy), tokenizer=tok, device=dev)  # samples with the module itself
    mc = MCValues(gen_base, tok, m_rl, [k], args, seed=seed * 31 + 1 + dist.rank) if kind == "mc" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=args.rl_lr, weight_decay=0.0)
    pad, order = tok.pad_token_id or 0, random.Random(seed).sample(range(len(train)), len(train))
    log, curve, samples = MetricsLog(out, enabled=dist.main), [], 0
    if dist.main:
        (out / "metrics.jsonl").write_text("")
    name = {"outcome": "outcome", "learned": f"pav@{k}", "mc": f"mc@{k}", "exact": "exact"}[kind]
    bar = tqdm(range(args.rl_steps + 1), desc=f"RL {name} seed {seed}", leave=False, disable=not dist.main)
    amp_on = args.bf16 and not fsdp
    for step in bar:
        m = {}
        if step % args.rl_eval_every == 0 or step == args.rl_steps:
            with amp(amp_on, dev):
                m["eval/sample_acc"] = _eval(gen, tok, test, args, seed, dist)
            curve.append((samples, m["eval/sample_acc"]))
        if step == args.rl_steps:
            log.log(step, samples=samples, **m)
            break
        batch = rank_share([train[order[(step * args.rl_prompts + j) % len(train)]] for j in range(args.rl_prompts)], dist)
        prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in batch]
        unwrap(policy).eval()
        with amp(amp_on, dev):
            outs = gen.sample(prompts, n=args.rl_k, temperature=args.temperature, max_tokens=args.max_new_tokens,
                              seed=seed * 100003 + step + 7919 * dist.rank, logprobs=False)
        resp = [list(o.token_ids) or [pad] for os_ in outs for o in os_]
        reward = [float(grade(o.text, str(p["answer"]))) for p, os_ in zip(batch, outs) for o in os_]
        a_out = rloo(reward, args.rl_k)
        samples += args.rl_prompts * args.rl_k  # every rank's
        if values is not None:
            spans = [step_spans(tok, r) for r in resp]
            if kind == "mc":  # prefixes 0..H-1 of each response, valued by fresh rollouts
                pre = [(i, prompts[i // args.rl_k] + resp[i][:e]) for i, (_, ends) in enumerate(spans)
                       for e in [0] + ends[:-1]]
                v = mc.values([p for _, p in pre], [len(prompts[i // args.rl_k]) for i, _ in pre],
                              [str(batch[i // args.rl_k]["answer"]) for i, _ in pre])
                q_mu = [[] for _ in resp]
                for (i, _), x in zip(pre, v):
                    q_mu[i].append(x[f"q_mu@{k}"])
            elif kind == "exact":  # the oracle prover: 1 until the checker's first wrong step, 0 from it on
                from utils.toy import check_steps
                q_mu = [exact_values(check_steps(batch[i // args.rl_k]["problem"], st).first_error if st else -1, len(st))
                        for i, (st, _) in enumerate(spans)]
            else:
                vals = values.prefix_values([p["problem"] for p in batch for _ in range(args.rl_k)], [s[0] or [""] for s in spans])
                q_mu = [x[f"q_mu@{k}"][:-1] for x in vals]
            a_mu = [process_terms(q, y) for q, y in zip(q_mu, reward)]  # A^mu_H = outcome - Q^mu_{H-1}
            m["train/a_mu_mean"] = float(np.mean([x for am in a_mu for x in am]))
            if args.rl_baseline == "loo":
                a_mu = loo_step_baseline(a_mu, args.rl_k)
            weights = [step_weights(_token_steps(len(r), s[1]), a, am, args.alpha_rl)
                       for r, s, a, am in zip(resp, spans, a_out, a_mu)]
            m["train/a_mu_abs"] = float(np.mean([abs(x) for am in a_mu for x in am]))
            if mc is not None:
                m["mc_rollouts"], m["mc_rollout_tokens"] = mc.ledger["samples"], mc.ledger["tokens"]
        else:
            weights = [[a] * len(r) for r, a in zip(resp, a_out)]
        unwrap(policy).train()
        ps = [prompts[i // args.rl_k] for i in range(len(resp))]
        with amp(amp_on, dev):
            lp, mask = token_logprobs(policy, ps, resp, pad, dev)  # (B, T)
            if ref is not None:
                with torch.no_grad():
                    ref_lp, _ = token_logprobs(ref, ps, resp, pad, dev)
        w = torch.zeros_like(lp)
        for i, x in enumerate(weights):
            w[i, : len(x)] = torch.tensor(x, device=dev)
        loss = seq_reduce(-w * lp, mask, args.rl_loss, args.max_new_tokens)  # Eq. 5: REINFORCE, RLOO baselines
        if ref is not None:
            kl = seq_reduce(kl_k3(lp, ref_lp), mask, args.rl_loss, args.max_new_tokens)
            loss, m["train/kl"] = loss + args.kl * kl, kl.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        gen.update_weights(unwrap(policy))  # FSDP: the HF copy (a no-op when HF samples with the module)
        r = all_reduce(torch.tensor([sum(reward), len(reward)], dtype=torch.float64, device=dev), torch.distributed.ReduceOp.SUM, dist)
        m.update({"train/reward": float(r[0] / r[1]), "train/loss": loss.item()})
        log.log(step + 1, samples=samples, **m)
        bar.set_postfix(reward=f"{m['train/reward']:.3f}")
    res = {"curve": curve, "final_acc": curve[-1][1], "samples": samples, "seed": seed, "k": k, "config": cfg}
    if mc is not None:
        led = [d for d in gather_lists(dist, [mc.ledger])]
        res["mc_rollouts"], res["mc_rollout_tokens"] = sum(d["samples"] for d in led), sum(d["tokens"] for d in led)
    if dist.main:
        write_json(out / "curve.json", res)
    barrier(dist)
    return res


def share_of_gain(curve: list, exact: list, outcome: list) -> tuple[float | None, float | None]:
    """How much of the exact control's gain over outcome-only a value source keeps, from the mean (samples, acc)
    curves: on the final accuracy, (signal - outcome) / (exact - outcome); on the samples saved to reach
    outcome-only's final accuracy, (total - signal's) / (total - exact's) (0 if the signal never reaches it).
    None where the control gains nothing to share."""
    fin = (curve[-1][1] - outcome[-1][1]) / (exact[-1][1] - outcome[-1][1]) if exact[-1][1] > outcome[-1][1] else None
    total, target = outcome[-1][0], outcome[-1][1]
    need_e, need_s = samples_to_reach(exact[1:], target), samples_to_reach(curve[1:], target)
    smp = (total - (need_s if need_s is not None else total)) / (total - need_e) if need_e is not None and need_e < total else None
    return fin, smp


def weights_sha256(d: Path) -> str:
    """sha256 of a model dir's weight files (a finished RL run is reused only with the policy and PAV it ran with)."""
    h = hashlib.sha256()
    for f in sorted(Path(d).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def _token_steps(n: int, ends: list[int]) -> list[int]:
    """The step index of each of n tokens, from the steps' end indices."""
    out, s = [], 0
    for j in range(n):
        while s < len(ends) - 1 and j >= ends[s]:
            s += 1
        out.append(s)
    return out


@torch.no_grad()
def _eval(gen, tok, test: list[dict], args: Args, seed: int, dist) -> float:
    """Per-sample accuracy at the temperature on the test problems (each rank every world-th, gathered)."""
    mine = rank_share(test, dist)
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in mine]
    gen.model.eval()
    outs = gen.sample(prompts, n=args.rl_eval_samples, temperature=args.temperature, max_tokens=args.max_new_tokens,
                      seed=10007 + seed + 7919 * dist.rank, logprobs=False) if prompts else []
    return float(np.mean(gather_lists(dist, [grade(o.text, str(p["answer"])) for p, os_ in zip(mine, outs) for o in os_])))


def mean_curve(curves: list[list]) -> list[tuple[int, float]]:
    """Pointwise mean over seeds of (samples, acc) curves evaluated at the same steps."""
    return [(pts[0][0], float(np.mean([p[1] for p in pts]))) for pts in zip(*curves)]


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    t0 = time.time()
    dist = setup_dist()
    seed_all(args.seed)
    out = Path(args.out_dir)
    stages, values = set(args.stages.split(",")), set(filter(None, args.values.split(",")))
    rl_values = values & set(filter(None, args.rl_values.split(",")))
    if values - {"learned", "mc", "exact"} or set(filter(None, args.rl_values.split(","))) - {"learned", "mc", "exact"}:
        raise ValueError(f"--values {args.values!r} / --rl_values {args.rl_values!r}: comma lists of learned, mc, exact")
    if "exact" in values and args.model:
        raise ValueError("--values exact needs the toy world's checker (leave --model empty)")
    if not args.model:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model = str(tdir / "policy")
        args.data, args.eval_data = args.data or str(tdir / "train.jsonl"), args.eval_data or str(tdir / "test.jsonl")
    ks = sorted({int(x) for x in args.ks.split(",")} | {args.prover_k})
    if stages - {"data", "train", "search", "rl", "sweep"}:
        raise ValueError(f"--stages {args.stages!r}: a comma list of data, train, search, rl, sweep")
    if args.mc_rollouts < max(ks):
        raise ValueError(f"--mc_rollouts {args.mc_rollouts} < the largest K {max(ks)}: pass@K needs n_mc >= K rollouts per prefix")
    if "mc" in values and min(args.value_rollouts, args.rl_value_rollouts or args.value_rollouts) < args.prover_k:
        raise ValueError(f"--value_rollouts / --rl_value_rollouts < --prover_k {args.prover_k}: pass@K needs m >= K")
    if not (args.beam_width >= 1 and args.rl_k >= 2 and args.rl_eval_every >= 1):
        raise ValueError("--beam_width >= 1, --rl_k >= 2 and --rl_eval_every >= 1 are needed")
    if args.rl_baseline not in ("loo", "none") or args.rl_loss not in ("sum", "token_mean") or args.shard not in ("ddp", "fsdp"):
        raise ValueError("--rl_baseline loo|none, --rl_loss sum|token_mean, --shard ddp|fsdp")
    if not args.eval_data:
        raise ValueError("--eval_data: test problems JSONL {problem, answer} (search and RL evaluation)")
    problems = load_problems(args.data)
    if dist.main:
        write_json(out / "config.json", asdict(args))
    test = load_problems(args.eval_data, args.n_eval_problems or None)
    data_probs, rl_probs = problems[: args.n_problems or len(problems)], problems[args.n_problems or 0:] or problems
    dev = dist.device
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    gen = load_backend(args.model, backend=args.backend, **({"device": dev} if args.backend == "hf" else {}))
    tok = gen.tokenizer
    meta = {"kind": "pav", "chat": args.chat, "step_tag": SEP, "prover_k": args.prover_k, "alpha": args.alpha}
    save = lambda: write_json(out / "results.json", res) if dist.main else None  # noqa: E731

    # 1. data: seed rollouts and Monte-Carlo values of every prefix
    if "data" in stages:
        t = time.time()
        st = collect(gen, tok, data_probs, args, out, dist)
        if st["samples"]:
            res["data"] = {"policy_samples": st["samples"], "generated_tokens": st["tokens"], "generate_calls": st["calls"],
                           "seconds": time.time() - t, "n_cov": args.n_cov, "n_mc": args.mc_rollouts}
            if dist.main:
                print(f"data: {st['samples']} policy samples ({st['tokens']} tokens, {st['calls']} generate calls)", flush=True)
    barrier(dist)
    need_data = bool(stages & {"train", "search", "sweep"}) or ("rl" in stages and "learned" in rl_values)
    if need_data and not (out / "data.jsonl").exists():
        raise FileNotFoundError(f"{out / 'data.jsonl'}: no PAV data (run the data stage)")
    rows = data_rows(read_jsonl(out / "data.jsonl", required=("problem", "steps", "c", "m", "outcome")), ks) \
        if (out / "data.jsonl").exists() else []  # none: RL from the outcome and mc / exact values alone
    res["data_rows"], res["data_prefixes"] = len(rows), sum(len(r["c"]) for r in rows)

    # 2. the PAV (q_pi and q_mu@K heads) and the ORM (every complete rollout's outcome)
    heads, t = ["q_pi"] + [f"q_mu@{k}" for k in ks], time.time()
    if "train" in stages and not (out / "pav" / "verifier.json").exists():
        res["pav_train"] = train_values(args.model, rows, heads, args, out / "pav", meta, dist, "PAV training")
    if "train" in stages and not (out / "orm" / "verifier.json").exists():
        rs = orm_rows(out)
        rs = random.Random(args.seed).sample(rs, min(len(rs), args.orm_rows)) if args.orm_rows else rs
        res["orm_train"] = train_values(args.model, rs, ["q_pi"], replace(args, epochs=args.orm_epochs),
                                        out / "orm", meta | {"objective": "orm"}, dist, "ORM training")
        res["seconds/train"] = time.time() - t
    save()

    # 3. search: PAV beam (learned and MC values) vs Q^pi beam vs ORM best-of-N, tokens per problem
    scfg = {k: getattr(args, k) for k in ("alpha", "prover_k", "ns", "search_ns", "beam_width", "max_depth", "n_eval_problems",
                                          "temperature", "seed", "values", "value_rollouts", "mc_search_ns")}
    load = lambda d, **kw: PAVVerifier(ValueHeadLM.load(out / d).to(dev), tok,  # noqa: E731
                                       json.loads((out / d / "verifier.json").read_text()), **kw)
    if "search" in stages and res.get("search_config") != scfg:  # done with these settings: kept
        pav, orm = load("pav", alpha=args.alpha, prover_k=args.prover_k), load("orm")
        t = time.time()
        res = {k: v for k, v in res.items() if not k.startswith(("mc_", "tokens/mc_", "pav_vs", "pav_reaches"))}
        res.update(run_search(gen, tok, test, pav, orm, args, dist, values))
        res["search_config"], res["seconds/search"] = scfg, time.time() - t
        save()
    pav = load("pav") if (out / "pav" / "verifier.json").exists() else None
    pav_sha = weights_sha256(out / "pav") if pav is not None else ""
    if "rl" in stages and "learned" in rl_values and pav is None:
        raise FileNotFoundError(f"{out / 'pav'}: no trained PAV for PAV-RL (run the train stage, or --rl_values mc,exact)")

    # 4. RL: PAV-RL (K = prover_k; learned and MC values) vs outcome-only, every seed; 5. the K sweep
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, t = {}, time.time()
    if "rl" in stages:
        for s in seeds:
            runs["outcome", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"outcome_seed{s}", None, None, dist)
            if "learned" in rl_values:
                runs["pav", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"pav{args.prover_k}_seed{s}", pav,
                                        args.prover_k, dist, pav_sha=pav_sha)
            if "mc" in rl_values:
                runs["mc", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"mc{args.prover_k}_seed{s}", "mc",
                                       args.prover_k, dist, gen_base=gen)
            if "exact" in rl_values:
                runs["exact", s] = rl_run(args.model, rl_probs, test, args, s, out / "rl" / f"exact_seed{s}", "exact",
                                          args.prover_k, dist)
        oc = mean_curve([runs["outcome", s]["curve"] for s in seeds])
        res["rl"] = {"outcome_curve": oc, "samples_per_run": oc[-1][0], "init_acc": oc[0][1],
                     "outcome_final_seeds": [runs["outcome", s]["final_acc"] for s in seeds]}
        res["rl/outcome_final_acc"] = oc[-1][1]
        for kind, pre in (("pav", "rl"), ("mc", "rl_mc"), ("exact", "rl_exact")):
            if (kind, seeds[0]) not in runs:
                continue
            c = mean_curve([runs[kind, s]["curve"] for s in seeds])
            need = samples_to_reach(c[1:], oc[-1][1]) if oc[-1][1] > oc[0][1] else None  # None: no gain to match
            finals = [runs[kind, s]["final_acc"] for s in seeds]
            res["rl"] |= {f"{kind}_curve": c, f"{kind}_samples_to_outcome_final": need, f"{kind}_final_seeds": finals}
            res[f"{pre}/{'pav_' if kind == 'pav' else ''}final_acc"] = c[-1][1]
            res[f"{pre}/sample_efficiency_ratio"] = oc[-1][0] / need if need else None  # None: never reached
            res[f"{pre}/{kind}_minus_outcome"] = list(paired_interval(finals, res["rl"]["outcome_final_seeds"]))
            if kind == "mc":
                res["rl_mc/mc_rollouts_per_run"] = float(np.mean([runs[kind, s]["mc_rollouts"] for s in seeds]))
                res["rl_mc/mc_rollout_tokens_per_run"] = float(np.mean([runs[kind, s]["mc_rollout_tokens"] for s in seeds]))
        if ("exact", seeds[0]) in runs:  # the share of the exact control's gain each signal keeps
            for kind, pre in (("pav", "rl"), ("mc", "rl_mc")):
                if (kind, seeds[0]) in runs:
                    res[f"{pre}/share_of_exact_final"], res[f"{pre}/share_of_exact_samples"] = share_of_gain(
                        res["rl"][f"{kind}_curve"], res["rl"]["exact_curve"], oc)
    if "sweep" in stages:
        res["k_sweep"] = k_sweep(gen, tok, rows, ks, args, runs, rl_probs, test, out, pav, seeds[0], dist)
    if {"rl", "sweep"} & stages:
        res["seconds/rl_and_sweep"] = time.time() - t  # runs reused from disk take no time
    res["wall_s"] = res.get("wall_s", 0.0) + time.time() - t0
    save()
    md = report(res, args)
    if dist.main:
        (out / "results.md").write_text(md)
        print(md)
    close_dist(dist)
    return res


def orm_rows(out: Path) -> list[dict]:
    """The ORM's data (deviation 4): every complete rollout of the data stage, read at its end, target its
    0/1 outcome."""
    rows = [(r, r["steps"] or [""]) for r in read_jsonl(out / "rollouts.jsonl")]
    return [{"problem": r["problem"], "steps": st, "targets": {"q_pi": [r["outcome"]] * (len(st) + 1)}, "only_last": True}
            for r, st in rows]


def state_actions(gen, tok, rows: list[dict], ks: list[int], args: Args, dist) -> tuple[dict[int, list], int]:
    """Per K, (A^mu@K, A^pi) of beam_width actions (one step of pi) at each of up to sweep_states states of
    pi (prefixes of the seed rollouts, drawn at random); Q(s) from the data's c, Q(s + a) from mc_rollouts
    fresh rollouts (a finished action: its outcome). Each rank values every world-th state."""
    rng = random.Random(args.seed)
    states = [(r, h) for r in rows for h in range(len(r["c"]))]
    states = rank_share(rng.sample(states, min(args.sweep_states, len(states))), dist)
    mc = MCValues(gen, tok, args.mc_rollouts, ks, args, seed=args.seed + 97 + dist.rank)
    prompts = [tok.encode(build_prompt(r["problem"], tok, args.chat), add_special_tokens=False) for r, _ in states]
    ids = [p + (tok.encode(SEP.join(r["steps"][:h]) + SEP, add_special_tokens=False) if h else [])  # deviation 6
           for p, (r, h) in zip(prompts, states)]
    acts = gen.step(ids, n=args.beam_width, temperature=args.temperature, max_tokens=args.max_new_tokens,
                    seed=args.seed * 13 + dist.rank, logprobs=False) if ids else []
    todo = [(j, ids[j] + list(a.token_ids), a) for j, os_ in enumerate(acts) for a in os_]
    open_ = [(j, x) for j, x, a in todo if not (a.finish in ("eos", "length", "too_long") or "boxed" in a.text)]
    v = iter(mc.values([x for _, x in open_], [len(prompts[j]) for j, _ in open_],
                       [states[j][0]["answer"] for j, _ in open_]))
    opened = {id(x) for _, x in open_}
    out = {k: [([], []) for _ in states] for k in ks}
    for j, x, a in todo:
        r, h = states[j]
        if id(x) in opened:
            q = next(v)
        else:
            y = float(grade(tok.decode(x[len(prompts[j]):], skip_special_tokens=True), r["answer"]))
            q = {"q_pi": y} | {f"q_mu@{k}": y for k in ks}
        q0 = prefix_targets(r["c"], r["m"], r["outcome"], ks)
        for k in ks:
            out[k][j][0].append(q[f"q_mu@{k}"] - q0[f"q_mu@{k}"][h])
            out[k][j][1].append(q["q_pi"] - q0["q_pi"][h])
    return {k: gather_lists(dist, out[k]) for k in ks}, sum(d["samples"] for d in gather_lists(dist, [mc.ledger]))


def k_sweep(gen, tok, rows: list[dict], ks: list[int], args: Args, runs: dict, rl_probs, test, out: Path, pav, seed: int,
            dist) -> list:
    """Per K: distinguishability and alignment pooled over the MC values of pi's own steps and per state
    (Theorem 3.1: Var_a A^mu(s, a) and E_a[A^mu A^pi] at each state, averaged over states), and the RL gain
    of PAV-RL with the q_mu@K head over outcome-only RL (first seed; K = prover_k: the mean over seeds)."""
    table = []
    a_pi = [a for r in rows for a in progress(r["targets"]["q_pi"])]
    st, n_samples = state_actions(gen, tok, rows, ks, args, dist) if args.sweep_states else ({}, 0)
    for k in ks:
        a_mu = [a for r in rows for a in progress(r["targets"][f"q_mu@{k}"])]
        row = {"K": k, "distinguishability": distinguishability(a_mu), "alignment": alignment(a_mu, a_pi)}
        if k in st:
            d, al = per_state(st[k])
            row |= {"distinguishability_per_state": d, "alignment_per_state": al,
                    "states": sum(1 for m, _ in st[k] if m), "state_rollouts": n_samples}
        if ("outcome", seed) in runs and pav is not None:
            if k == args.prover_k and ("pav", seed) in runs:
                row["rl_gain"] = float(np.mean([runs["pav", s]["final_acc"] - runs["outcome", s]["final_acc"]
                                                for s in {s for _, s in runs}]))
            elif k != args.prover_k and args.sweep_rl:
                r = rl_run(args.model, rl_probs, test, args, seed, out / "rl" / f"pav{k}_seed{seed}", pav, k, dist,
                           pav_sha=weights_sha256(out / "pav"))
                row["rl_gain"] = r["final_acc"] - runs["outcome", seed]["final_acc"]
        table.append(row)
    return table


def _share(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _iv(x) -> str:
    return "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * v for v in x))


def report(res: dict, args: Args) -> str:
    md, s = "", res
    if "search_config" in res:
        ns = sorted({int(x) for x in args.ns.split(",")} | {int(x) for x in args.search_ns.split(",")} |
                    {int(x) for x in args.mc_search_ns.split(",")})
        md += "search: accuracy % (generated tokens per problem)\n\n| method | " + " | ".join(f"N={n}" for n in ns) + \
              " |\n|---|" + "---|" * len(ns) + "\n"
        for name in ("pav_beam", "mc_beam", "exact_beam", "qpi_beam", "orm_bon", "maj", "pass"):
            if any(f"{name}@{n}" in s for n in ns):
                md += f"| {name} | " + " | ".join(f"{100 * s[f'{name}@{n}']:.1f} ({s[f'tokens/{name}@{n}']:.0f})"
                                                  if f"{name}@{n}" in s else "-" for n in ns) + " |\n"
        if any(f"tokens/mc_rollouts@{n}" in s for n in ns):
            md += "\nmc_beam's value rollouts (base policy, not counted above), tokens per problem: " + ", ".join(
                f"N={n} {s[f'tokens/mc_rollouts@{n}']:.0f}" for n in ns if f"tokens/mc_rollouts@{n}" in s) + "\n"
        md += "\nbeam minus ORM best-of-N at the nearest token count, points [95% paired interval]\n\n"
        for pre in ("pav", "mc", "exact"):
            for n in ns:
                v = s.get(f"{pre}_vs_orm@{n}")
                if v:
                    md += (f"- {pre}_beam@{n} vs orm_bon@{v['orm_n']} ({v[f'tokens_{pre}']:.0f} vs {v['tokens_orm']:.0f} "
                           f"tokens): {_iv(v['diff'])}" +
                           (f"; vs qpi_beam: {_iv(s[f'pav_vs_qpi@{n}'])}" if pre == "pav" and f"pav_vs_qpi@{n}" in s else "") +
                           (f"; vs pass@{s[f'{pre}_vs_pass@{n}']['pass_n']} (both pick exactly): "
                            f"{_iv(s[f'{pre}_vs_pass@{n}']['diff'])}" if f"{pre}_vs_pass@{n}" in s else "") + "\n")
        md += ("\nright vs wrong samples (AUC): ORM {:.3f}, PAV Q^pi last step {:.3f}, PAV lowest Q^pi {:.3f}\n"
               .format(s["auc/orm_last"], s["auc/pav_qpi_last"], s["auc/pav_qpi_min"]))
        md += f"\nORM's best: {100 * s['orm_best']['acc']:.1f}% at N={s['orm_best']['n']} ({s['orm_best']['tokens']:.0f} tokens)"
        for pre in ("pav", "mc", "exact"):
            if f"{pre}_compute_efficiency" in s:
                eff = s[f"{pre}_compute_efficiency"]
                md += (f"; the {pre} beam first reaches it at N={s[f'{pre}_reaches_orm_best_at']}: ORM tokens / beam tokens "
                       f"= {eff:.2f}" if eff else f"; the {pre} beam reaches it at no budget run")
        md += "\n"
    r = res.get("rl")
    if r:
        rl_rows = (("PAV-RL", "pav", "rl"), ("PAV-RL (mc)", "mc", "rl_mc"), ("exact values", "exact", "rl_exact"))
        cols = [("outcome-only", "outcome_curve")] + [(n, f"{k}_curve") for n, k, _ in rl_rows if f"{k}_curve" in r]
        md += (f"\nRL: test per-sample accuracy % (mean over seeds) by policy samples, evaluated every {args.rl_eval_every} "
               f"steps ({args.rl_eval_every * args.rl_prompts * args.rl_k} samples: the grid of the ratios)\n\n| samples | " +
               " | ".join(n for n, _ in cols) + " |\n|---|" + "---|" * len(cols) + "\n")
        md += "".join(f"| {pts[0][0]} | " + " | ".join(f"{100 * p[1]:.1f}" for p in pts) + " |\n"
                      for pts in zip(*(r[c] for _, c in cols)))
        md += f"\nfinal: outcome-only {100 * res['rl/outcome_final_acc']:.1f}\n"
        for name, kind, pre in rl_rows:
            if f"{kind}_curve" in r:
                ratio, share = res[f"{pre}/sample_efficiency_ratio"], res.get(f"{pre}/share_of_exact_final", "-")
                md += (f"- {name}: {100 * r[f'{kind}_curve'][-1][1]:.1f} (minus outcome over seeds: "
                       f"{_iv(res[f'{pre}/{kind}_minus_outcome'])}); " +
                       (f"reaches outcome-only's final accuracy at {r[f'{kind}_samples_to_outcome_final']} samples: "
                        f"{ratio:.2f}x" if ratio else "does not reach outcome-only's final accuracy") +
                       ("" if share == "-" else "; share of the exact control's gain kept: final " +
                        _share(share) + ", samples saved " + _share(res[f"{pre}/share_of_exact_samples"])) + "\n")
        if "rl_mc/mc_rollouts_per_run" in res:
            md += (f"- the mc runs' value rollouts (base policy, apart from the {r['samples_per_run']} policy samples): "
                   f"{res['rl_mc/mc_rollouts_per_run']:.0f} samples, {res['rl_mc/mc_rollout_tokens_per_run']:.0f} tokens per run\n")
    if res.get("k_sweep"):
        md += ("\nK sweep: pooled over pi's steps (MC values) and per state (actions sampled at pi's states); RL gain = "
               "PAV-RL - outcome-only, final per-sample accuracy\n\n| K | Var(A^mu) pooled | corr(A^mu, A^pi) pooled | "
               "E_s Var_a A^mu | E_s E_a[A^mu A^pi] | RL gain (points) |\n|---|---|---|---|---|---|\n")
        for row in res["k_sweep"]:
            g = row.get("rl_gain")
            md += (f"| {row['K']} | {row['distinguishability']:.4f} | {row['alignment']:.3f} | "
                   f"{row.get('distinguishability_per_state', float('nan')):.4f} | {row.get('alignment_per_state', float('nan')):.4f} | "
                   f"{'-' if g is None else f'{100 * g:+.1f}'} |\n")
    return md


if __name__ == "__main__":
    run_main(main, Args, TOY)
