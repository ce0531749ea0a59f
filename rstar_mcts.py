"""rstar_mcts.py: rStar-Math's code-augmented MCTS and self-evolution (Guan et al., "rStar-Math: Small LLMs
Can Master Math Reasoning with Self-Evolved Deep Thinking", arXiv 2501.04519), as microsoft/rStar's
`rStar-math` branch runs it.

A solution is a Python program cut into steps (`# reasoning` + code + a stop tag; utils/data.py holds the
format); every candidate step is checked by running, from scratch in utils/sandbox.py, the code written since
the last output (the earlier blocks' code runs first, its output discarded, so their names stay in scope).
Per problem, MCTS runs R rollouts; each walks from the root down, expanding every childless node it meets at
full width (k candidates, duplicates dropped; a sample that stopped at <end_of_answer> is kept as the only
child) and moving to the child of highest UCT = Q + c sqrt(ln N_parent / N) (Eq. 1). An answer child (any
sample holding "boxed") is graded at once and its +1/-1 backed up to the root (Eq. 2: terminal-guided
annotation, rounds 1-2); any other sample, tagged or not, is code: if it fails, or the path is too deep, it is
a dead end worth -1 to itself only. From round 3 each new node first gets one visit valued by the PPM (Eq. 3:
PPM-augmented annotation). Per round: MCTS on the training problems with policy_r (and PPM_r), the top-2
correct trajectories per problem by mean Q (then those holding "error" dropped) become the SFT data,
policy_{r+1} is SFT'd from the base model (not from policy_r), and ppm.py trains PPM_{r+1} on the round's
trees. At the end, the reward-model ablation on test problems as the code evaluates: K independent MCTS
searches per problem guided by the PPM, by the PQM, and (the control, toy only) by the toy's exact checker,
each search giving its highest-value answer; the top-4 of those by value voted, and value-weighted; beside
them ORM best-of-K and maj@K over K whole samples, and the majority curve up to the searches' token cost, with
paired intervals and generated tokens for every row.

Deviations:
  1. Unvisited children score 0 in UCT, not +infinity, as in the code (its exploration term is 0 when N = 0):
     a visited child with Q = -1 can win over unvisited siblings. --uct textbook gives the textbook rule.
  2. vLLM runs with prefix caching (the original leaves it off); HF generate on CPU.
  3. Code runs in utils/sandbox.py (a fresh process, namespace and limits per program); the original execs
     it in its own worker with shared globals, so here the earlier blocks are re-run (output discarded) to
     put their names in scope. An error is a non-zero exit, not "error" in the output. The output is stdout
     plus the repr of a trailing expression's value; the code's python tool shows that value alone (str) in
     place of stdout and, with several print statements, labels each segment's output with its print's
     arguments. A lone float is rounded to 4 places, as the tool does. Where the sandbox has only rlimits (no
     root) the run stops before any code runs unless --unsafe_exec; results.json records the mode
     (`sandbox/isolation`).
  4. Answers are checked by utils/grader.py, not MARIO_EVAL + math_equal; votes compare the extracted answer
     strings (the code: math_equiv between answers).
  5. The PPM is trained by ppm.py in a subprocess (method files never import each other) and read back
     through utils/verifiers.py (kind ppm): tanh(raw / 5), the code's inference rule.
  6. The top-4 vote breaks a tie in count toward the higher-valued answer (the code draws one at random).
     Besides the code's rows, results.json has each verifier's single highest-valued answer over the K
     searches (the paper's rule; the code's "pass 1") and one search alone.
  7. Toy-scale settings (TOY below) replace the paper's when --model is empty; the round-1 policy is the
     toy's bootstrap code policy (the paper's: DeepSeek-Coder-V2-Instruct 236B, few-shot).
  8. SFT puts no loss on the system's output steps (the program's stdout is not the policy's to predict).
  9. Under torchrun each rank searches its shard of the problems with an engine of its own, and the trees and
     SFT rows are gathered (the original runs all trees in lock-step on one tensor-parallel vLLM engine per
     launch, run_example.sh one launch per GPU); each round's SFT trains with FSDP2 over the ranks (the
     original: HF Trainer + FSDP) and ppm.py trains as a process group of its own, one child per rank.
 10. One code error ends a path in every round: the code allows 2 consecutive errors in the bootstrap round
     (config/sample_mcts.yaml errors_threshold 2; 1 later), which leaves an erring node open one step more.
 11. A prompt that no longer fits the context gives a dead end (the code cuts the prompt to fit).

    python rstar_mcts.py                                   # toy world on CPU: 2 rounds, then the ablation
    python rstar_mcts.py --model bootstrap_dir --base Qwen2.5-Math-7B --data train.jsonl --eval_data math500 \\
        --rounds 4 --backend vllm
    torchrun --nproc_per_node 8 rstar_mcts.py --config recipes/rstar_mcts_qwen2.5-math-7b.yaml
"""
from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils.data import CODE_STOPS, END_ANSWER, END_CODE, code_prompt, load_problems, output_step, program_of, step_code
from utils.data import read_jsonl, write_jsonl
from utils.generation import load_backend
from utils.grader import extract_answer, grade
from utils.sandbox import require_isolation, run_many
from utils.train import (Dist, MetricsLog, all_reduce, amp, barrier, child_group_env, close_dist, full_state,
                         gather_in_order, gather_lists, rank_share, run_main, seed_all, setup_dist, shard, unwrap,
                         write_json)
from utils.verifiers import load_verifier


@dataclass
class Args:
    # models and data
    model: str = field(default="", metadata={"help": "round-1 policy that writes code-augmented solutions (empty: "
                                                     "the toy's bootstrap code policy)"})
    base: str = field(default="", metadata={"help": "base model every round SFTs from (paper: Qwen2.5-Math-7B; "
                                                    "empty: the toy's code base)"})
    data: str = field(default="", metadata={"help": "training problems JSONL {problem, answer} (default: toy train)"})
    eval_data: str = field(default="", metadata={"help": "test problems (default: toy test)"})
    n_problems: int = field(default=0, metadata={"help": "training problems per round (0: all; paper: 747k)"})
    n_eval_problems: int = field(default=0, metadata={"help": "test problems (0: all)"})
    out_dir: str = field(default="runs/rstar", metadata={"help": "output dir (finished rounds are kept: rerun resumes)"})
    backend: str = field(default="auto", metadata={"help": "auto | vllm | hf"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on GPU for each round's SFT and ppm.py's "
                                                      "training, fp32 master weights"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    # self-evolution
    rounds: int = field(default=4, metadata={"help": "self-evolution rounds (paper: 4)"})
    rollouts: str = field(default="8,16,16,16", metadata={"help": "MCTS rollouts per problem in each round (paper: 8, "
                                                                  "then 16)"})
    hard_rollouts: str = field(default="64,128", metadata={"help": "last round only: more rollouts for problems still "
                                                                   "unsolved, in turn (paper round 4: 64 then 128)"})
    ppm_from_round: int = field(default=3, metadata={"help": "first round whose MCTS uses the PPM (paper: 3)"})
    # MCTS
    candidates: int = field(default=8, metadata={"help": "k, candidates per expansion in data generation (paper: 8; "
                                                         "code: 12)"})
    c_puct: float = field(default=2.0, metadata={"help": "c in Eq. 1 (paper: 2)"})
    uct: str = field(default="rstar", metadata={"help": "rstar (unvisited children score 0, the code) | textbook "
                                                        "(unvisited first)"})
    max_depth: int = field(default=16, metadata={"help": "steps before a path is a dead end (paper: 16)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the policy (code: 1.0; 0.7 for "
                                                              "the 236B bootstrap)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (code: 1.0)"})
    max_step_tokens: int = field(default=2048, metadata={"help": "max tokens per step (code: 2048)"})
    max_model_len: int = field(default=4096, metadata={"help": "context length (code: 4096)"})
    exec_timeout: float = field(default=30.0, metadata={"help": "seconds per program run (code: 30)"})
    unsafe_exec: bool = field(default=False, metadata={"help": "run model-written code even where the sandbox has only "
                                                               "rlimits (no root: no filesystem or network isolation)"})
    # SFT of policy_{r+1} from the base
    sft_epochs: int = field(default=2, metadata={"help": "epochs over the top-2 trajectories (paper: 2)"})
    sft_lr: float = field(default=7e-6, metadata={"help": "learning rate, linear decay (paper: 7e-6)"})
    sft_batch: int = field(default=128, metadata={"help": "sequences per optimizer step (paper: 128)"})
    sft_micro: int = field(default=4, metadata={"help": "sequences per forward (gradient accumulation)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)"})
    top_k_sft: int = field(default=2, metadata={"help": "correct trajectories per problem kept for SFT (paper: 2)"})
    ppm_args: str = field(default="", metadata={"help": "extra flags for ppm.py (e.g. '--epochs 2')"})
    # evaluation: the reward-model ablation
    eval_runs: int = field(default=8, metadata={"help": "K: independent MCTS searches per test problem, each giving "
                                                        "its highest-value answer; also the samples of ORM best-of-K and "
                                                        "maj@K (code: 8; 16 for AIME/AMC; the paper's ^64: 64)"})
    eval_rollouts: int = field(default=12, metadata={"help": "MCTS rollouts (iterations) of each search (code: 12)"})
    eval_candidates: int = field(default=32, metadata={"help": "k at evaluation (code: 32)"})
    top_n: int = field(default=4, metadata={"help": "the vote over the K searches' answers keeps the top_n by value "
                                                    "(code eval_maj.py: 4)"})
    maj_samples: int = field(default=64, metadata={"help": "whole samples per test problem for the majority-vote curve "
                                                           "maj@1..maj_samples, set beside each search at equal "
                                                           "generated tokens (at least K)"})
    eval_methods: str = field(default="ppm,pqm,oracle,orm,maj", metadata={"help": "comma list: ppm, pqm (verifier-guided "
                                                                               "searches), oracle (the toy's exact "
                                                                               "checker guides them), orm, maj"})


# Toy scale (the default run fits 45 minutes on 2 cores): 2 rounds over 800 training problems with the paper's
# 8 and 16 rollouts, 4 candidates per step, SFT at the toy's learning rate; the ablation on 100 test problems:
# 8 searches of 4 rollouts per problem, the majority curve up to 32 whole samples (about the searches' tokens).
TOY = dict(rounds=2, rollouts="8,16", hard_rollouts="", n_problems=800, n_eval_problems=100, candidates=4,
           max_step_tokens=80, max_model_len=1024, exec_timeout=5.0, sft_epochs=8, sft_lr=2e-3, sft_batch=8, sft_micro=8,
           weight_decay=0.01, eval_runs=8, eval_rollouts=4, eval_candidates=4, maj_samples=32, backend="hf",
           ppm_args="--min_edit 1 --epochs 2 --lr 1e-3 --batch 32 --batch_tokens 8192 --max_len 1024 --eval_frac 0.1")


# ----------------------------------------------------------------------------- the tree
@dataclass
class Node:
    text: str = ""  # the step as written (tag included; an END_CODE step carries the output step after it)
    parent: "Node | None" = None
    children: list = field(default_factory=list)
    N: int = 0  # visits
    W: float = 0.0  # value sum
    terminal: bool = False
    kind: str = "root"  # root | step | code (END_CODE + output) | answer | dead (code failed, malformed, too deep)
    answer: str | None = None
    correct: bool | None = None
    value: float | None = None  # the verifier's value of this node, when one scored it
    depth: int = 0

    @property
    def Q(self) -> float:
        return self.W / self.N if self.N else 0.0

    def path(self) -> list["Node"]:
        out, n = [], self
        while n.parent is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def steps(self) -> list[str]:
        return [n.text for n in self.path()]


def uct(parent: Node, child: Node, c: float, rule: str = "rstar") -> float:
    """Eq. 1: Q + c sqrt(ln N_parent / N). rstar: 0 (Q and exploration) for an unvisited child, as the code;
    textbook: +inf for an unvisited child."""
    if child.N == 0:
        return math.inf if rule == "textbook" else 0.0
    if parent.N == 0:
        return child.Q
    return child.Q + c * math.sqrt(math.log(parent.N) / child.N)


def select_child(node: Node, c: float, rule: str = "rstar") -> Node | None:
    """The non-terminal child of highest UCT, ties to the first in sample order; None when every child is
    terminal (the node then becomes terminal itself)."""
    best, best_u = None, -math.inf
    for ch in node.children:
        if ch.terminal:
            continue
        u = uct(node, ch, c, rule)
        if u > best_u:
            best, best_u = ch, u
    return best


def backup(node: Node, value: float) -> None:
    """Eq. 2: add the leaf's value to every node from it up to the root, one visit each."""
    while node is not None:
        node.N += 1
        node.W += value
        node = node.parent


def local_update(node: Node, value: float) -> None:
    """A value that stays at its node: a dead end's -1, or a new node's PPM value as its first visit (Eq. 3)."""
    node.N += 1
    node.W += value


def classify(text: str, finish: str) -> str:
    """The kind of a sampled step, as the code parses it (rS agents/utils.py, rstar_step_result_unwrap): a
    sample holding "boxed" is an answer; any other is code to run, tagged or not (END_CODE: the program's
    last step); a prompt that did not fit the context gives an empty sample, a dead end."""
    if finish == "too_long":
        return "dead"
    if "boxed" in text:
        return "answer"
    return "code" if END_CODE in text else "step"


def new_children(node: Node, samples: list[tuple[str, str]], max_depth: int) -> list[Node]:
    """Children of one expansion from (text, finish) samples, as the code filters them (rS llms/llms.py):
    duplicate texts dropped; when a sample stopped at END_ANSWER, the first such sample is the only child
    (its siblings are dropped, so the node becomes terminal once selected). Beyond max_depth a non-answer
    child is a dead end. Code of step/code children still has to run (`run_children`)."""
    seen, uniq = set(), []
    for text, finish in samples:
        if text not in seen:
            seen.add(text)
            uniq.append((text, finish))
    ended = [s for s in uniq if s[1] == "stop" and s[0].endswith(END_ANSWER)]
    out = []
    for text, finish in ended[:1] or uniq:
        kind = classify(text, finish)
        ch = Node(text=text, parent=node, kind=kind, depth=node.depth + 1)
        if ch.depth > max_depth and kind != "answer":
            ch.kind = "dead"
        if kind == "answer":
            ch.answer = extract_answer(text)
        ch.terminal = ch.kind in ("answer", "dead")
        out.append(ch)
    return out


def run_children(children: list[Node], timeout: float, cache: dict) -> None:
    """Run each step/code child's program from scratch (utils.data.program_of: the code written since the
    last output, after the earlier blocks' code with its output discarded); a failure makes it a dead end;
    an END_CODE child gets the system's output step appended to its text."""
    todo = [ch for ch in children if ch.kind in ("step", "code")]
    progs = [program_of(ch.steps()) for ch in todo]
    fresh = sorted({p for p in progs if p not in cache})
    for p, r in zip(fresh, run_many(fresh, timeout=timeout)):
        cache[p] = (r.ok, r.stdout)
    for ch, p in zip(todo, progs):
        ok, out = cache[p]
        if not ok:
            ch.kind, ch.terminal = "dead", True
        elif ch.kind == "code":
            ch.text += output_step(out)


# ----------------------------------------------------------------------------- MCTS, lock-step over problems
class Tree:
    def __init__(self, problem: dict, prompt_ids: list[int]):
        self.problem, self.prompt_ids, self.root = problem, prompt_ids, Node()
        self.tokens = 0  # generated by the policy for this tree
        self.ids_of: dict[int, list[int]] = {}

    def prefix(self, node: Node, tok) -> list[int]:
        ids = list(self.prompt_ids)
        for n in node.path():
            if id(n) not in self.ids_of:
                self.ids_of[id(n)] = tok.encode(n.text, add_special_tokens=False)
            ids += self.ids_of[id(n)]
        return ids

    def answers(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out += [n] if n.kind == "answer" else []
            stack += n.children
        return out


def mcts(gen, trees: list[Tree], rollouts: int, k: int, args: Args, verifier=None, graded: bool = True,
         cache: dict | None = None, desc: str = "mcts") -> dict:
    """`rollouts` MCTS iterations on every tree, in lock-step: each depth level is one batched generation
    call over all trees that need an expansion, one batched sandbox call, one batched verifier call.
    graded: answers are backed up as +1/-1 from the grader (data generation); else as the verifier's value
    (evaluation). verifier: each new non-terminal node gets one visit of its value (Eq. 3), and answer
    nodes get a value either way. Returns counts (generated tokens, programs run, expansions)."""
    cache = {} if cache is None else cache
    stats = Counter()
    tok = gen.tokenizer
    for _ in tqdm(range(rollouts), desc=desc, leave=False):
        cur = {i: t.root for i, t in enumerate(trees) if not t.root.terminal}
        while cur:
            expand = [i for i, n in cur.items() if not n.children]
            if expand:
                prefixes = [trees[i].prefix(cur[i], tok) for i in expand]
                t0 = time.time()
                outs = gen.step(prefixes, n=k, max_tokens=args.max_step_tokens, temperature=args.temperature,
                                top_p=args.top_p, stop=CODE_STOPS, logprobs=False)
                stats["generate_s"] += time.time() - t0
                fresh = []
                for i, samples in zip(expand, outs):
                    trees[i].tokens += sum(len(s.token_ids) for s in samples)
                    stats["tokens"] += sum(len(s.token_ids) for s in samples)
                    cur[i].children = new_children(cur[i], [(s.text, s.finish) for s in samples], args.max_depth)
                    fresh += [(i, ch) for ch in cur[i].children]
                stats["expansions"] += len(expand)
                n_before, t0 = len(cache), time.time()
                run_children([ch for _, ch in fresh], args.exec_timeout, cache)
                stats["programs"] += len(cache) - n_before
                stats["execute_s"] += time.time() - t0
                t0 = time.time()
                _value_new(trees, fresh, verifier, graded, stats)
                stats["value_s"] += time.time() - t0
            nxt = {}
            for i, node in cur.items():
                ch = select_child(node, args.c_puct, args.uct)
                if ch is None:
                    node.terminal = True  # every child is terminal
                else:
                    nxt[i] = ch
            cur = nxt
    return dict(stats)


def _value_new(trees: list[Tree], fresh: list[tuple[int, Node]], verifier, graded: bool, stats: Counter) -> None:
    """Values of one level's new children: answers backed up to the root, dead ends -1 locally, and with a
    verifier one visit of its value for each new non-terminal node."""
    if verifier is not None:
        scored = [(i, ch) for i, ch in fresh if ch.kind != "dead"]
        probs, steps = [trees[i].problem["problem"] for i, _ in scored], [ch.steps() for _, ch in scored]
        if not scored:
            vals = []
        elif hasattr(verifier, "values"):  # kind ppm: tanh(raw / 5) in [-1, 1]
            vals = verifier.values(probs, steps)
        else:  # any other verifier kind: its last step's score in [0, 1], mapped onto [-1, 1]
            vals = [2 * s[-1] - 1 if s else 0.0 for s in verifier.score(probs, steps)]
        stats["verifier_calls"] += len(scored)
        for (_, ch), v in zip(scored, vals):
            ch.value = v
            if not ch.terminal:
                local_update(ch, v)  # Eq. 3: the PPM's value counts as the first visit
    for i, ch in fresh:
        if ch.kind == "dead":
            local_update(ch, -1.0)  # not backed up to the ancestors
        elif ch.kind == "answer":
            ch.correct = bool(grade(ch.text, trees[i].problem["answer"]))
            backup(ch, (1.0 if ch.correct else -1.0) if graded or ch.value is None else ch.value)


# ----------------------------------------------------------------------------- what a round's trees give
def mean_q(leaf: Node) -> tuple[float, float]:
    qs = [n.Q for n in leaf.path()]
    return sum(qs) / len(qs), min(qs)


def top_trajectories(tree: Tree, k: int = 2) -> list[list[str]]:
    """The SFT data of one problem: its k correct trajectories of highest mean Q over the path (ties: the
    higher minimum Q); then those holding "error" are dropped (after the cut to k, as rS
    train/sample_sft_data.py does, so a problem can give fewer than k)."""
    ok = sorted([a for a in tree.answers() if a.correct], key=mean_q, reverse=True)[:k]
    return [a.steps() for a in ok if not any("error" in s.lower() for s in a.steps())]


def tree_record(tree: Tree) -> dict:
    """A tree as JSON: nodes in BFS order with parent index, text, N, Q, kind, answer, correct, value."""
    nodes, order = [], [(tree.root, -1)]
    while order:
        n, parent = order.pop(0)
        idx = len(nodes)
        nodes.append({"parent": parent, "text": n.text, "N": n.N, "Q": round(n.Q, 6), "kind": n.kind,
                      "answer": n.answer, "correct": n.correct, "value": n.value})
        order += [(c, idx) for c in n.children]
    return {"problem": tree.problem["problem"], "answer": tree.problem["answer"], "nodes": nodes}


# ----------------------------------------------------------------------------- whole solutions (greedy, ORM, maj)
def solve_whole(gen, problems: list[dict], n: int, temperature: float, args: Args, seed: int = 0) -> list[list[dict]]:
    """n whole code-augmented solutions per problem: the program in one go (to END_CODE), run in the sandbox,
    the output step appended, then the answer step. Each: {steps, answer, correct, tokens}."""
    tok = gen.tokenizer
    prompts = [tok.encode(code_prompt(p["problem"]), add_special_tokens=False) for p in problems]
    first = gen.sample(prompts, n=n, temperature=temperature, top_p=args.top_p, max_tokens=args.max_step_tokens * 8,
                       stop=[END_CODE, END_ANSWER], seed=seed, logprobs=False)
    sols, progs = [], []
    for p, pr, outs in zip(problems, prompts, first):
        for s in outs:
            sols.append({"p": p, "ids": pr + s.token_ids, "steps": [s.text], "tokens": len(s.token_ids)})
            progs.append(program_of([s.text]) if END_CODE in s.text else None)
    runs = dict(zip([x for x in progs if x], run_many([x for x in progs if x], timeout=args.exec_timeout)))
    todo = []
    for sol, prog in zip(sols, progs):
        if prog and runs[prog].ok:
            o = output_step(runs[prog].stdout)
            sol["steps"].append(o)
            sol["ids"] = sol["ids"] + tok.encode(o, add_special_tokens=False)
            todo.append(sol)
    ans = gen.sample([s["ids"] for s in todo], n=1, temperature=temperature, top_p=args.top_p,
                     max_tokens=args.max_step_tokens, stop=[END_ANSWER], seed=seed + 1, logprobs=False)
    for sol, a in zip(todo, ans):
        sol["steps"].append(a[0].text)
        sol["tokens"] += len(a[0].token_ids)
    out = [[] for _ in problems]
    for j, sol in enumerate(sols):
        text = "".join(sol["steps"])
        ok = END_ANSWER in text or "boxed" in text
        out[j // n].append({"steps": sol["steps"], "answer": extract_answer(text) if ok else None,
                            "correct": bool(ok and grade(text, sol["p"]["answer"])), "tokens": sol["tokens"]})
    return out


# Copied from search.py:paired_interval
def paired_interval(a: list[float], b: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) over problems and its 95% interval from a paired bootstrap (problems resampled
    with replacement, both methods on the same draw): whether a gap over majority is more than noise."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(iters, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------- SFT from the base
def sft(base: str, rows: list[list[int | list]], args: Args, out: Path, log, dist: Dist | None = None) -> Path:
    """SFT of the base model on (prompt ids, [(step ids, trained?)]) rows: loss on the policy's steps + EOS,
    none on the prompt or the system's output steps; AdamW, linear decay, no warm-up (the paper's recipe).
    Under torchrun: FSDP2 (utils.train.shard), each rank a slice of every batch, the same number of forwards
    on every rank (a rank short of rows runs one with no loss), saved by rank 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dist = dist or setup_dist()
    tok = AutoTokenizer.from_pretrained(base)
    dev, fsdp = dist.device, dist.on
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()  # fp32 master weights
    model = shard(model, "fsdp", dist, args.bf16) if fsdp else model.to(dev)
    seqs = []
    for prompt, steps in rows:
        ids, lab = list(prompt), [-100] * len(prompt)
        for st, trained in steps:
            ids += st
            lab += st if trained else [-100] * len(st)
        seqs.append((ids + [tok.eos_token_id], lab + [tok.eos_token_id]))
    n_steps = max(1, args.sft_epochs * len(seqs) // args.sft_batch) if seqs else 0  # no data: the base as it is
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(1, n_steps))
    rng, order, losses = random.Random(args.seed), [], []
    world = dist.world if fsdp else 1
    for step in tqdm(range(n_steps), desc="sft", leave=False, disable=not dist.main):
        if len(order) < args.sft_batch:
            order += rng.sample(range(len(seqs)), len(seqs))
        batch, order = [seqs[i] for i in order[: args.sft_batch]], order[args.sft_batch:]
        n_tok = sum(sum(t != -100 for t in lab) for _, lab in batch)
        mine, total = batch[dist.rank::world], torch.zeros(1, device=dev)
        for m in range(0, max(1, math.ceil(len(batch) / world)), args.sft_micro):  # as many on every rank
            mb = mine[m: m + args.sft_micro] or [(batch[0][0], [-100] * len(batch[0][1]))]
            T = max(len(a) for a, _ in mb)
            ids = torch.full((len(mb), T), tok.pad_token_id or 0, dtype=torch.long)  # (B, T)
            lab = torch.full((len(mb), T), -100, dtype=torch.long)
            att = torch.zeros((len(mb), T), dtype=torch.long)
            for r, (a, b) in enumerate(mb):
                ids[r, : len(a)], lab[r, : len(b)], att[r, : len(a)] = torch.tensor(a), torch.tensor(b), 1
            with amp(args.bf16, dev):
                logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1).to(dev),
                                                     ignore_index=-100, reduction="sum") / n_tok  # token mean over the batch
            (loss * world).backward()  # FSDP averages the ranks' gradients: their sum is the batch's
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(float(all_reduce(total, torch.distributed.ReduceOp.SUM, dist) if fsdp else total))
    state = full_state(model, fsdp=fsdp)[0]  # a collective under FSDP: every rank calls it
    if dist.main:
        unwrap(model).save_pretrained(out, state_dict={k: v.cpu() for k, v in state.items()})
        tok.save_pretrained(out)
        log(f"sft: {len(seqs)} trajectories, {n_steps} steps" +
            (f", loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}" if losses else ": the base saved unchanged"))
    barrier(dist)
    return out


def sft_rows(trees: list[Tree], tok, k: int) -> list:
    rows = []
    for t in trees:
        for steps in top_trajectories(t, k):
            rows.append((t.prompt_ids, [(tok.encode(s, add_special_tokens=False), not s.startswith("\n<output>"))
                                        for s in _split_output(steps)]))
    return rows


def _split_output(steps: list[str]) -> list[str]:
    """An END_CODE node's text holds the system's output step: split it off (it is not trained on)."""
    out = []
    for s in steps:
        if END_CODE in s and "\n<output>" in s:
            a, b = s.split("\n<output>", 1)
            out += [a, "\n<output>" + b]
        else:
            out.append(s)
    return out


_PORTS = itertools.count(1)  # each ppm.py group under torchrun rendezvous on MASTER_PORT + the next of these


def train_ppm(trees_path: Path, init: str, out: Path, args: Args, objective: str = "ppm", dist: Dist | None = None) -> Path:
    """ppm.py in a subprocess: a verifier dir of kind ppm (or its pqm / orm ablations) from a round's trees.
    Under torchrun every rank starts one, and the children train as a process group of their own."""
    dist = dist or setup_dist()
    offset = next(_PORTS)
    barrier(dist)
    if not (out / "results.json").exists():  # ppm.py writes it last: a dir without it is retrained
        cmd = [sys.executable, str(Path(__file__).with_name("ppm.py")), "--trees", str(trees_path), "--model", init,
               "--out_dir", str(out), "--objective", objective, "--seed", str(args.seed), "--allow_empty", "true",
               "--bf16", str(args.bf16).lower()] + args.ppm_args.split()
        subprocess.run(cmd, check=True, env=child_group_env(dist, offset))
    barrier(dist)
    return out


def verifier_figures(vdir: Path, prefix: str) -> dict:
    """What explains a verifier's row: its training rows and held-out pairwise accuracy, on all pairs and on
    the final-step pairs alone (ppm.py's results.json)."""
    f = Path(vdir) / "results.json"
    keep = ("train_rows", "train_pairs", "heldout_pairs", "heldout_final_pairs", "heldout_pairwise_acc",
            "heldout_pairwise_acc_final")
    return {prefix + k: v for k, v in json.loads(f.read_text()).items() if k in keep} if f.exists() else {}


# ----------------------------------------------------------------------------- main
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_round(r: int, policy: str, verifier_dir: str | None, train: list[dict], args: Args, out: Path, log,
              dist: Dist | None = None) -> dict:
    """MCTS on the training problems with policy_r (PPM_r from --ppm_from_round), the trees and the SFT data.
    Under torchrun each rank searches its shard of the problems with its own engine; the trees, the SFT rows
    and the counts are gathered on every rank, and rank 0 writes the trees."""
    dist = dist or setup_dist()
    gen = _engine(policy, args, dist)
    tok = gen.tokenizer
    verifier = load_verifier(verifier_dir, device=dist.device) if verifier_dir and r >= args.ppm_from_round else None
    trees = [Tree(p, tok.encode(code_prompt(p["problem"]), add_special_tokens=False)) for p in rank_share(train, dist)]
    plan = _ints(args.rollouts)
    n_roll = plan[min(r, len(plan)) - 1]
    t0, cache = time.time(), {}
    stats = Counter(mcts(gen, trees, n_roll, args.candidates, args, verifier, cache=cache, desc=f"round {r} mcts"))
    if r == args.rounds:
        for extra in _ints(args.hard_rollouts):  # the paper's round 4: more rollouts for what is still unsolved
            left = [t for t in trees if not any(a.correct for a in t.answers())]
            if left:
                stats.update(mcts(gen, left, extra, args.candidates, args, verifier, cache=cache, desc=f"+{extra}"))
    solved = gather_lists(dist, [any(a.correct for a in t.answers()) for t in trees])
    distinct = gather_lists(dist, [len({a.answer for a in t.answers()}) for t in trees])
    records = gather_lists(dist, [tree_record(t) for t in trees])
    rows = gather_lists(dist, sft_rows(trees, tok, args.top_k_sft))
    stats = sum((Counter(c) for c in gather_lists(dist, [dict(stats)])), Counter())
    if dist.main:
        write_jsonl(out / "trees.jsonl", records)
    log(f"round {r}: solved {sum(solved)}/{len(solved)} training problems, {len(rows)} SFT trajectories, "
        f"{time.time() - t0:.0f} s")
    del gen
    return {"solved_frac": sum(solved) / len(solved), "sft_rows": len(rows), "rollouts": n_roll,
            "mcts_seconds": time.time() - t0, "distinct_answers_per_tree": float(np.mean(distinct)), **stats}, rows


def _engine(policy: str, args: Args, dist: Dist):
    """The rank's generation engine (vLLM on GPU, HF on CPU: --backend)."""
    extra = {"device": dist.device} if args.backend == "hf" else {}
    return load_backend(policy, backend=args.backend, max_model_len=args.max_model_len, seed=args.seed, **extra)


def evaluate_policy(policy: str, test: list[dict], args: Args, dist: Dist | None = None) -> list[bool]:
    """Per test problem, in order: is the greedy whole code-augmented solution right (each rank its shard
    under torchrun)."""
    dist = dist or setup_dist()
    sols = solve_whole(_engine(policy, args, dist), rank_share(test, dist), 1, 0.0, args)
    return gather_in_order([bool(s[0]["correct"]) for s in sols], len(test), dist)


def search_runs(gen, problems: list[dict], verifier, args: Args, desc: str) -> tuple[list[list[dict]], dict]:
    """The code's evaluation (rS run_example.sh, config/sft_eval_mcts.yaml): K = --eval_runs independent MCTS
    searches per problem, each of --eval_rollouts rollouts with the verifier's value as every new node's first
    visit and as the answers' backed-up value; each search keeps its answer node of highest value (rS
    agents/mcts.py record_intermediate_metric; eval_maj.py max_node_per_tree = 1). Per problem, per search:
    {answer, value, correct, tokens, distinct (answers in the tree)}; a search with no answer has answer None."""
    tok = gen.tokenizer
    K = args.eval_runs
    trees = [Tree(p, tok.encode(code_prompt(p["problem"]), add_special_tokens=False)) for p in problems for _ in range(K)]
    stats = mcts(gen, trees, args.eval_rollouts, args.eval_candidates, args, verifier, graded=False, desc=desc)
    runs = []
    for t in trees:
        best = max((a for a in t.answers() if a.value is not None), key=lambda a: a.value, default=None)
        runs.append({"answer": best.answer if best else None, "value": best.value if best else None,
                     "correct": bool(best and best.correct), "tokens": t.tokens,
                     "distinct": len({a.answer for a in t.answers()})})
    return [runs[j * K: (j + 1) * K] for j in range(len(problems))], stats


def top_vote(runs: list[dict], top_n: int = 4) -> dict:
    """rS eval_maj.py over one problem's searches: those with an answer, sorted by value, the top_n kept; the
    majority vote among them (ties: the higher-valued answer; the code draws one at random), the vote weighted
    by value (sum of values per answer), and the single highest-valued answer (the paper's pick, the code's
    "pass 1"). Each: whether the chosen answer is correct."""
    ranked = sorted([r for r in runs if r["answer"] is not None], key=lambda r: -r["value"])[:top_n]
    if not ranked:
        return {"vote": 0.0, "weighted": 0.0, "best": 0.0}
    count, weight = Counter(r["answer"] for r in ranked), Counter()
    for r in ranked:
        weight[r["answer"]] += r["value"]
    order = list(dict.fromkeys(r["answer"] for r in ranked))  # answers by their best value
    ok = {a: any(r["correct"] for r in ranked if r["answer"] == a) for a in order}
    return {"vote": float(ok[max(order, key=lambda a: count[a])]), "weighted": float(ok[max(order, key=lambda a: weight[a])]),
            "best": float(ranked[0]["correct"])}


def majority(samples: list[dict]) -> float:
    """maj@n over whole samples: the most frequent answer (ties: the first seen) is correct."""
    votes = Counter(x["answer"] for x in samples if x["answer"] is not None)
    top = votes.most_common(1)[0][0] if votes else None
    return float(any(x["correct"] for x in samples if x["answer"] == top) if top else 0.0)


def orm_pick(samples: list[dict], scores: list[float]) -> int:
    """ORM best-of-N: the highest-scored sample among those with an answer (the ORM is trained on answer
    nodes only, so its score of an unanswered sample is out of distribution), as utils.verifiers.best_of_n."""
    return max(range(len(samples)), key=lambda i: (samples[i]["answer"] is not None, scores[i]))


def oracle_value(problem: str, steps: list[str]) -> float:
    """The control's value of a partial solution, from the toy's exact checker (utils.toy.check_steps) in the
    PPM's place: +1 while every code step so far is right (the print that ends the program is right once
    every operation is done), -1 from the first wrong step on; an answer is +1 when it is correct."""
    from utils.toy import check_steps, parse_problem
    n_ops, code = len(parse_problem(problem)["ops"]), []
    for s in steps:
        if "boxed" in s:
            return 1.0 if check_steps(problem, code + [s], code=True).answer_correct else -1.0
        body = step_code(s).strip("\n")
        lines = [ln for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("#")]
        if lines and all(ln.strip().startswith("print(") for ln in lines):
            if len(code) != n_ops + 1:
                return -1.0  # the program ends before (or after) every operation is done
            continue
        code.append(body)
    return 1.0 if check_steps(problem, code, code=True).first_error == -1 else -1.0


class ToyOracle:
    """The exact per-step verifier of the toy world, scored like a PPM (`values`: one value per prefix)."""

    def values(self, problems: list[str], steps_lists: list[list[str]]) -> list[float]:
        return [oracle_value(p, s) for p, s in zip(problems, steps_lists)]


def ablation(policy: str, verifiers: dict, test: list[dict], args: Args, out: Path, log, dist: Dist | None = None) -> dict:
    """The reward-model ablation on the test problems: per verifier (PPM, PQM, the toy's exact checker as the
    control) K independent searches, voted as the code votes (top_vote); ORM best-of-K and maj@K over K whole
    samples; the majority curve maj@n up to --maj_samples, so that each search is set beside the vote at equal
    generated tokens; generated tokens per problem for every row. Under torchrun each rank takes its shard of
    the problems and the per-problem figures are gathered in problem order."""
    dist = dist or setup_dist()
    K, methods, per, cost, res = args.eval_runs, args.eval_methods.split(","), {}, {}, {}
    mine = rank_share(test, dist)
    gen = _engine(policy, args, dist)
    for name in ("ppm", "pqm", "oracle"):
        if name not in methods:
            continue
        if name == "oracle":
            try:
                [oracle_value(p["problem"], []) for p in test]
            except ValueError:
                log("oracle: the test problems are not the toy's, so there is no exact checker: row left out")
                continue
            v = ToyOracle()
        else:
            v = load_verifier(str(verifiers[name]), device=dist.device)
        runs, stats = search_runs(gen, mine, v, args, desc=f"{name}: {K} searches x {args.eval_rollouts} rollouts")
        votes = [top_vote(r, args.top_n) for r in runs]
        for key in ("vote", "weighted", "best"):
            per[f"{name}_{key}"] = [x[key] for x in votes]
        per[f"{name}_single"] = [float(r[0]["correct"]) for r in runs]  # one search alone: its own pick
        cost[f"tokens/{name}@{K}"] = [sum(x["tokens"] for x in r) for r in runs]
        cost[f"tokens/{name}_single"] = [r[0]["tokens"] for r in runs]
        cost[f"{name}/distinct_answers_per_tree"] = [np.mean([x["distinct"] for x in r]) for r in runs]
        cost[f"{name}/searches_without_answer"] = [np.mean([x["answer"] is None for x in r]) for r in runs]
        cost[f"{name}/pass@{K}"] = [any(x["correct"] for x in r) for r in runs]
        res[f"{name}/seconds"] = stats.get("generate_s", 0) + stats.get("execute_s", 0) + stats.get("value_s", 0)
    curve = []
    if {"orm", "maj"} & set(methods):
        M = max(K, args.maj_samples)
        sols = solve_whole(gen, mine, M, args.temperature, args, seed=args.seed + 7)
        curve = sorted({2 ** i for i in range(M.bit_length())} | {K, M})
        for n in curve:
            per[f"maj@{n}"] = [majority(s[:n]) for s in sols]
            cost[f"tokens/sample@{n}"] = [sum(x["tokens"] for x in s[:n]) for s in sols]
        per[f"pass@{K}"] = [float(any(x["correct"] for x in s[:K])) for s in sols]
        if "orm" in methods:
            v = load_verifier(str(verifiers["orm"]), device=dist.device)
            flat = [(p, x) for p, s in zip(mine, sols) for x in s[:K]]
            scores = v.values([p["problem"] for p, _ in flat], [x["steps"] for _, x in flat])
            per[f"orm_bon@{K}"] = [float(s[:K][orm_pick(s[:K], scores[j * K: (j + 1) * K])]["correct"])
                                   for j, s in enumerate(sols)]
    per = {k: gather_in_order(v, len(test), dist) for k, v in per.items()}
    res.update({k: float(np.mean(gather_in_order(v, len(test), dist))) for k, v in cost.items()})
    for name, xs in per.items():
        res[name if "@" in name else f"{name}@{K}"] = float(np.mean(xs))
    for name in ("ppm", "pqm", "oracle"):
        if f"{name}_vote" not in per:
            continue
        log(f"{name}: top-{args.top_n} vote of {K} searches {res[f'{name}_vote@{K}']:.1%}, "
            f"{res[f'tokens/{name}@{K}']:.0f} tokens per problem")
        pairs = [(f"{name}_{key}", f"maj@{K}") for key in ("vote", "weighted", "best", "single")]
        for a, b in pairs + [(f"{name}_vote", f"orm_bon@{K}"), (f"{name}_vote", "ppm_vote")]:
            if a != b and b in per:
                res[f"diff/{a}-{b.split('@')[0]}@{K}"] = list(paired_interval(per[a], per[b], seed=args.seed))
        if curve:  # the vote of as many whole samples as the K searches cost in generated tokens
            n = min(curve, key=lambda c: abs(math.log(max(1.0, res[f"tokens/sample@{c}"]) /
                                                     max(1.0, res[f"tokens/{name}@{K}"]))))
            res[f"equal_tokens/{name}"] = {"maj_n": n, "tokens_search": res[f"tokens/{name}@{K}"],
                                           "tokens_maj": res[f"tokens/sample@{n}"], "maj": res[f"maj@{n}"],
                                           "diff": list(paired_interval(per[f"{name}_vote"], per[f"maj@{n}"], seed=args.seed))}
    if dist.main:
        write_jsonl(out / "ablation_per_problem.jsonl", [{"problem": p["problem"], **{k: v[i] for k, v in per.items()}}
                                                         for i, p in enumerate(test)])
    return res


def main(args: Args) -> dict:
    if args.uct not in ("rstar", "textbook"):
        raise ValueError(f"--uct {args.uct!r}: rstar or textbook")
    dist = setup_dist()
    seed_all(args.seed + dist.rank)  # the ranks sample differently
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_line = (lambda s: tqdm.write(s)) if dist.main else (lambda s: None)  # noqa: E731
    if not args.model:
        from utils.toy import ensure_code_toy, ensure_toy
        for turn in ("main", "others"):  # rank 0 lays the toy world out first, the others then find it
            if dist.main == (turn == "main"):
                toy_dir = ensure_toy()
                code_dir = ensure_code_toy(toy_dir)
            barrier(dist)
        args.model, args.base = args.model or str(code_dir / "policy"), args.base or str(code_dir / "base")
        args.data, args.eval_data = args.data or str(toy_dir / "train.jsonl"), args.eval_data or str(toy_dir / "test.jsonl")
    if not (args.base and args.data and args.eval_data):
        raise ValueError("--base, --data and --eval_data are needed with --model")
    if dist.main:
        write_json(out / "config.json", asdict(args))
    train = load_problems(args.data, args.n_problems or None)
    test = load_problems(args.eval_data, args.n_eval_problems or None)
    isolation = require_isolation(args.unsafe_exec)  # before any model-written code runs
    metrics = MetricsLog(out, enabled=dist.main)
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    res["sandbox/isolation"] = isolation
    f0 = out / "round_0.json"  # the bootstrap's greedy result per test problem
    if not f0.exists():
        greedy0 = evaluate_policy(args.model, test, args, dist)
        if dist.main:
            write_json(f0, {"greedy_correct": greedy0})
        barrier(dist)
    prev = json.loads(f0.read_text())["greedy_correct"]
    res["round_0/greedy_acc"] = float(np.mean(prev))
    policy, ppm_dir = args.model, None
    for r in range(1, args.rounds + 1):
        rd = out / f"round_{r}"
        if (rd / "done.json").exists():  # a finished round: reuse it
            info = json.loads((rd / "done.json").read_text())
        else:
            rd.mkdir(exist_ok=True)
            info, rows = run_round(r, policy, ppm_dir, train, args, rd, log_line, dist)
            sft(args.base, rows, args, rd / "policy", log_line, dist)
            info.update(verifier_figures(train_ppm(rd / "trees.jsonl", str(rd / "policy"), rd / "ppm", args,
                                                   dist=dist), "ppm/"))
            info["greedy_correct"] = evaluate_policy(str(rd / "policy"), test, args, dist)
            info["greedy_acc"] = float(np.mean(info["greedy_correct"]))
            if dist.main:
                write_json(rd / "done.json", info)
            barrier(dist)
        policy, ppm_dir = str(rd / "policy"), str(rd / "ppm")
        res.update({f"round_{r}/{k}": v for k, v in info.items() if k != "greedy_correct"})
        res[f"diff/round_{r}-round_{r - 1}/greedy"] = list(paired_interval(info["greedy_correct"], prev, seed=args.seed))
        prev = info["greedy_correct"]
        metrics.log(r, **{f"round/{k}": v for k, v in info.items() if isinstance(v, (int, float))})
        log_line(f"round {r}: solved {info['solved_frac']:.1%} of training problems, SLM-{r} greedy "
                 f"{info['greedy_acc']:.1%}")
        if dist.main:
            write_json(out / "results.json", res)
    last = out / f"round_{args.rounds}"
    verifiers = {"ppm": last / "ppm"}
    for obj in [m for m in ("pqm", "orm") if m in args.eval_methods.split(",")]:
        verifiers[obj] = train_ppm(last / "trees.jsonl", str(last / "policy"), last / obj, args, objective=obj, dist=dist)
    for name, d in verifiers.items():
        res.update(verifier_figures(d, f"verifier/{name}/"))
    res.update(ablation(policy, verifiers, test, args, out, log_line, dist))
    if dist.main:
        write_json(out / "results.json", res)
        table = report(res, args)
        (out / "results.md").write_text(table)
        print(table)
    close_dist(dist)
    return res


PAPER = {1: (60.17, 69.6), 2: (66.60, 73.6), 3: (77.86, 75.8), 4: (90.25, 78.4)}
PAPER_RM = {"ppm": 89.4, "pqm": 88.2, "orm_bon": 82.6}  # the paper's reward-model ablation, MATH


def _ci(d) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if d else ""


def report(res: dict, args: Args) -> str:
    lines = ["| round | training problems solved | SLM-r greedy | minus the round before (95% paired) | paper: solved | "
             "paper: SLM-r MATH |", "|---|---|---|---|---|---|",
             f"| 0 (bootstrap) | | {100 * res['round_0/greedy_acc']:.1f}% | | | |"]
    for r in range(1, args.rounds + 1):
        ps, pg = PAPER.get(r, ("", ""))
        lines.append(f"| {r} | {100 * res[f'round_{r}/solved_frac']:.1f}% | {100 * res[f'round_{r}/greedy_acc']:.1f}% "
                     f"| {_ci(res.get(f'diff/round_{r}-round_{r - 1}/greedy'))} | {ps}% | {pg}% |")
    K = args.eval_runs
    lines += ["", f"| method (K = {K} searches of {args.eval_rollouts} rollouts, or K samples) | accuracy | tokens / "
              f"problem | minus maj@{K} (95% paired) | minus majority at equal tokens | paper (MATH) |",
              "|---|---|---|---|---|---|"]
    for name in ("oracle", "ppm", "pqm"):
        if f"{name}_vote@{K}" not in res:
            continue
        eq = res.get(f"equal_tokens/{name}")
        eqs = f"maj@{eq['maj_n']} {100 * eq['maj']:.1f}%: {_ci(eq['diff'])}" if eq else ""
        for key, label in (("vote", f"top-{args.top_n} vote"), ("weighted", "weighted vote"), ("best", "highest value"),
                           ("single", "one search alone")):
            tok = res[f"tokens/{name}_single" if key == "single" else f"tokens/{name}@{K}"]
            lines.append(f"| {name} MCTS, {label} | {100 * res[f'{name}_{key}@{K}']:.1f}% | {tok:.0f} | "
                         f"{_ci(res.get(f'diff/{name}_{key}-maj@{K}'))} | {eqs if key == 'vote' else ''} | "
                         f"{PAPER_RM.get(name, '') if key == 'best' else ''} |")
    for name, label in (("orm_bon", f"ORM best-of-{K}"), ("maj", f"majority of {K}"), ("pass", f"pass@{K}")):
        if f"{name}@{K}" in res:
            lines.append(f"| {label} | {100 * res[f'{name}@{K}']:.1f}% | {res.get(f'tokens/sample@{K}', 0):.0f} | | | "
                         f"{PAPER_RM.get(name, '')} |")
    curve = sorted(int(k.split("@")[1]) for k in res if k.startswith("maj@"))
    if curve:
        lines += ["", "| majority of n samples | " + " | ".join(str(n) for n in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| accuracy | " + " | ".join(f"{100 * res[f'maj@{n}']:.1f}%" for n in curve) + " |",
                  "| tokens / problem | " + " | ".join(f"{res[f'tokens/sample@{n}']:.0f}" for n in curve) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main, Args, TOY)
