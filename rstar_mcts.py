"""rstar_mcts.py: rStar-Math's code-augmented MCTS and self-evolution (Guan et al., "rStar-Math: Small LLMs
Can Master Math Reasoning with Self-Evolved Deep Thinking", arXiv 2501.04519), as microsoft/rStar's
`rStar-math` branch runs it.

A solution is a Python program cut into steps (`# reasoning` + code + a stop tag; utils/data.py holds the
format); every candidate step is checked by re-running the code of all its ancestors plus itself, from
scratch, in utils/sandbox.py. Per problem, MCTS runs R rollouts; each walks from the root down, expanding
every childless node it meets at full width (k candidates, duplicates dropped, one answer child kept) and
moving to the child of highest UCT = Q + c sqrt(ln N_parent / N) (Eq. 1). An answer child is graded at once
and its +1/-1 backed up to the root (Eq. 2: terminal-guided annotation, rounds 1-2); a candidate whose code
fails, or too deep a path, is a dead end worth -1 to itself only. From round 3 each new node first gets one
visit valued by the PPM (Eq. 3: PPM-augmented annotation). Per round: MCTS on the training problems with
policy_r (and PPM_r), the top-2 correct trajectories per problem by mean Q become the SFT data, policy_{r+1}
is SFT'd from the base model (not from policy_r), and ppm.py trains PPM_{r+1} on the round's trees.
At the end, on test problems at an equal number of rollouts K: PPM-guided MCTS, PQM-guided MCTS, ORM
best-of-K and majority vote (the paper's reward-model ablation), with paired intervals.

Deviations:
  1. Unvisited children score 0 in UCT, not +infinity, as in the code (its exploration term is 0 when N = 0):
     a visited child with Q = -1 can win over unvisited siblings. --uct textbook gives the textbook rule.
  2. vLLM runs with prefix caching (the original leaves it off); HF generate on CPU.
  3. Code runs in utils/sandbox.py (a fresh process, namespace and limits per program); the original execs
     it in its own worker with shared globals. An error is a non-zero exit, not "error" in the output.
     Where the sandbox has only rlimits (no root) the run stops before any code runs unless --unsafe_exec;
     results.json records the mode (`sandbox/isolation`).
  4. Answers are checked by utils/grader.py, not MARIO_EVAL + math_equal.
  5. The PPM is trained by ppm.py in a subprocess (method files never import each other) and read back
     through utils/verifiers.py (kind ppm): tanh(raw / 5), the code's inference rule.
  6. At evaluation each MCTS run's answer is its answer node of highest verifier value (the paper); the
     code's top-4 vote over 8 to 64 independent runs is not done.
  7. Toy-scale settings (TOY below) replace the paper's when --model is empty; the round-1 policy is the
     toy's bootstrap code policy (the paper's: DeepSeek-Coder-V2-Instruct 236B, few-shot).
  8. SFT puts no loss on the system's output steps (the program's stdout is not the policy's to predict).
  9. One process: no torchrun sharding of the problems (the original spreads trees over vLLM workers).

    python rstar_mcts.py                                   # toy world on CPU: 2 rounds, then the ablation
    python rstar_mcts.py --model bootstrap_dir --base Qwen2.5-Math-7B --data train.jsonl --eval_data math500 \\
        --rounds 4 --backend vllm
"""
from __future__ import annotations

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

from utils.data import CODE_STOPS, END_ANSWER, END_CODE, END_STEP, code_prompt, load_problems, output_step, program_of
from utils.data import read_jsonl, write_jsonl
from utils.generation import load_backend
from utils.grader import extract_answer, grade
from utils.sandbox import require_isolation, run_many
from utils.train import MetricsLog, amp, run_main, seed_all, write_json
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
    eval_rollouts: int = field(default=16, metadata={"help": "K: MCTS rollouts, and samples for ORM best-of-K and "
                                                             "maj@K (paper ^64: 64 runs)"})
    eval_candidates: int = field(default=32, metadata={"help": "k at evaluation (code: 32)"})
    eval_methods: str = field(default="ppm_mcts,pqm_mcts,orm_bon,maj", metadata={"help": "comma list"})


# Toy scale (the default run fits 45 minutes on 2 cores): 2 rounds over 200 training problems with the paper's
# 8 and 16 rollouts, 4 candidates per step, SFT at the toy's learning rate; the ablation on 150 test problems.
TOY = dict(rounds=2, rollouts="8,16", hard_rollouts="", n_problems=200, n_eval_problems=150, candidates=4, max_step_tokens=80,
           max_model_len=1024, exec_timeout=5.0, sft_epochs=8, sft_lr=2e-3, sft_batch=8, sft_micro=8,
           weight_decay=0.01, eval_rollouts=8, eval_candidates=4, backend="hf",
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
    """The kind of a sampled step: answer | code | step | dead (no tag: EOS or the token limit)."""
    if END_ANSWER in text or "boxed" in text:
        return "answer"
    if END_CODE in text:
        return "code"
    if END_STEP in text and finish == "stop":
        return "step"
    return "dead"


def new_children(node: Node, samples: list[tuple[str, str]], max_depth: int) -> list[Node]:
    """Children of one expansion from (text, finish) samples: duplicates dropped, one answer child (the
    first), beyond max_depth a dead end. Code of step/code children still has to run (`run_children`)."""
    seen, out, answered = set(), [], False
    for text, finish in samples:
        if text in seen:
            continue
        seen.add(text)
        kind = classify(text, finish)
        if kind == "answer":
            if answered:
                continue
            answered = True
        ch = Node(text=text, parent=node, kind=kind, depth=node.depth + 1)
        if ch.depth > max_depth and kind != "answer":
            ch.kind = "dead"
        if kind == "answer":
            ch.answer = extract_answer(text)
        ch.terminal = ch.kind in ("answer", "dead")
        out.append(ch)
    return out


def run_children(children: list[Node], timeout: float, cache: dict) -> None:
    """Re-run each step/code child's whole program (ancestors + itself) from scratch; a failure makes it a
    dead end; an END_CODE child gets the system's output step appended to its text."""
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
    higher minimum Q), none holding an error."""
    ok = [a for a in tree.answers() if a.correct and not any("error" in s.lower() for s in a.steps())]
    ok.sort(key=lambda a: mean_q(a), reverse=True)
    return [a.steps() for a in ok[:k]]


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
def sft(base: str, rows: list[list[int | list]], args: Args, out: Path, log) -> Path:
    """SFT of the base model on (prompt ids, [(step ids, trained?)]) rows: loss on the policy's steps + EOS,
    none on the prompt or the system's output steps; AdamW, linear decay, no warm-up (the paper's recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(base).to(dev).train()
    seqs = []
    for prompt, steps in rows:
        ids, lab = list(prompt), [-100] * len(prompt)
        for st, trained in steps:
            ids += st
            lab += st if trained else [-100] * len(st)
        seqs.append((ids + [tok.eos_token_id], lab + [tok.eos_token_id]))
    n_steps = max(1, args.sft_epochs * len(seqs) // args.sft_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / n_steps)
    rng, order, losses = random.Random(args.seed), [], []
    for step in tqdm(range(n_steps), desc="sft", leave=False):
        if len(order) < args.sft_batch:
            order += rng.sample(range(len(seqs)), len(seqs))
        batch, order = [seqs[i] for i in order[: args.sft_batch]], order[args.sft_batch:]
        n_tok = sum(sum(t != -100 for t in lab) for _, lab in batch)
        total = 0.0
        for m in range(0, len(batch), args.sft_micro):
            mb = batch[m: m + args.sft_micro]
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
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(total)
    model.eval().cpu().save_pretrained(out)
    tok.save_pretrained(out)
    log(f"sft: {len(seqs)} trajectories, {n_steps} steps, loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
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


def train_ppm(trees_path: Path, init: str, out: Path, args: Args, objective: str = "ppm") -> Path:
    """ppm.py in a subprocess: a verifier dir of kind ppm (or its pqm / orm ablations) from a round's trees."""
    if not (out / "verifier.json").exists():
        cmd = [sys.executable, str(Path(__file__).with_name("ppm.py")), "--trees", str(trees_path), "--model", init,
               "--out_dir", str(out), "--objective", objective, "--seed", str(args.seed), "--allow_empty", "true",
               "--bf16", str(args.bf16).lower()] + args.ppm_args.split()
        subprocess.run(cmd, check=True)
    return out


# ----------------------------------------------------------------------------- main
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_round(r: int, policy: str, verifier_dir: str | None, train: list[dict], args: Args, out: Path, log) -> dict:
    """MCTS on the training problems with policy_r (PPM_r from --ppm_from_round), the trees and the SFT data."""
    gen = load_backend(policy, backend=args.backend, max_model_len=args.max_model_len, seed=args.seed)
    tok = gen.tokenizer
    verifier = load_verifier(verifier_dir) if verifier_dir and r >= args.ppm_from_round else None
    trees = [Tree(p, tok.encode(code_prompt(p["problem"]), add_special_tokens=False)) for p in train]
    plan = _ints(args.rollouts)
    n_roll = plan[min(r, len(plan)) - 1]
    t0, cache = time.time(), {}
    stats = Counter(mcts(gen, trees, n_roll, args.candidates, args, verifier, cache=cache, desc=f"round {r} mcts"))
    if r == args.rounds:
        for extra in _ints(args.hard_rollouts):  # the paper's round 4: more rollouts for what is still unsolved
            left = [t for t in trees if not any(a.correct for a in t.answers())]
            if left:
                stats.update(mcts(gen, left, extra, args.candidates, args, verifier, cache=cache, desc=f"+{extra}"))
    solved = [any(a.correct for a in t.answers()) for t in trees]
    write_jsonl(out / "trees.jsonl", [tree_record(t) for t in trees])
    rows = sft_rows(trees, tok, args.top_k_sft)
    log(f"round {r}: solved {sum(solved)}/{len(trees)} training problems, {len(rows)} SFT trajectories, "
        f"{time.time() - t0:.0f} s")
    del gen
    return {"solved_frac": sum(solved) / len(trees), "sft_rows": len(rows), "rollouts": n_roll,
            "mcts_seconds": time.time() - t0, **stats}, rows


def evaluate_policy(policy: str, test: list[dict], args: Args) -> float:
    gen = load_backend(policy, backend=args.backend, max_model_len=args.max_model_len, seed=args.seed)
    sols = solve_whole(gen, test, 1, 0.0, args)
    return float(np.mean([s[0]["correct"] for s in sols]))


def ablation(policy: str, verifiers: dict, test: list[dict], args: Args, out: Path, log) -> dict:
    """The reward-model ablation at K rollouts per problem on the test problems: PPM- and PQM-guided MCTS
    (each run's answer: its answer node of highest value), ORM best-of-K and maj@K over K whole samples."""
    K, methods, res, per = args.eval_rollouts, args.eval_methods.split(","), {}, {}
    gen = load_backend(policy, backend=args.backend, max_model_len=args.max_model_len, seed=args.seed)
    tok = gen.tokenizer
    for name in ("ppm", "pqm"):
        if f"{name}_mcts" not in methods:
            continue
        v = load_verifier(str(verifiers[name]))
        trees = [Tree(p, tok.encode(code_prompt(p["problem"]), add_special_tokens=False)) for p in test]
        stats = mcts(gen, trees, K, args.eval_candidates, args, v, graded=False, desc=f"{name} mcts@{K}")
        picks = [max(t.answers(), key=lambda a: a.value, default=None) for t in trees]
        per[f"{name}_mcts"] = [float(bool(a and a.correct)) for a in picks]
        res[f"tokens/{name}_mcts@{K}"] = stats.get("tokens", 0) / len(test)
    if {"orm_bon", "maj"} & set(methods):
        sols = solve_whole(gen, test, K, args.temperature, args, seed=args.seed + 7)
        per["maj"] = []
        for s in sols:
            votes = Counter(x["answer"] for x in s if x["answer"] is not None)
            top = votes.most_common(1)[0][0] if votes else None
            per["maj"].append(float(any(x["correct"] for x in s if x["answer"] == top) if top else 0.0))
        res[f"tokens/sample@{K}"] = float(np.mean([sum(x["tokens"] for x in s) for s in sols]))
        if "orm_bon" in methods:
            v = load_verifier(str(verifiers["orm"]))
            flat = [(p, x) for p, s in zip(test, sols) for x in s]
            scores = v.values([p["problem"] for p, _ in flat], [x["steps"] for _, x in flat])
            per["orm_bon"], j = [], 0
            for s in sols:
                # answered samples first (the ORM is trained on answer nodes only), as utils.verifiers.best_of_n
                best = max(range(len(s)), key=lambda i: (s[i]["answer"] is not None, scores[j + i]))
                per["orm_bon"].append(float(s[best]["correct"]))
                j += len(s)
        per["pass"] = [float(any(x["correct"] for x in s)) for s in sols]
    for name, xs in per.items():
        res[f"{name}@{K}"] = float(np.mean(xs))
    for a, b in (("ppm_mcts", "pqm_mcts"), ("pqm_mcts", "orm_bon"), ("orm_bon", "maj"), ("ppm_mcts", "orm_bon"),
                 ("ppm_mcts", "maj")):
        if a in per and b in per:
            res[f"diff/{a}-{b}@{K}"] = list(paired_interval(per[a], per[b]))
    write_jsonl(out / "ablation_per_problem.jsonl", [{"problem": p["problem"], **{k: v[i] for k, v in per.items()}}
                                                     for i, p in enumerate(test)])
    return res


def main(args: Args) -> dict:
    if args.uct not in ("rstar", "textbook"):
        raise ValueError(f"--uct {args.uct!r}: rstar or textbook")
    seed_all(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(args))
    log_line = lambda s: tqdm.write(s)  # noqa: E731
    if not args.model:
        from utils.toy import ensure_code_toy, ensure_toy
        toy_dir = ensure_toy()
        code_dir = ensure_code_toy(toy_dir)
        args.model, args.base = args.model or str(code_dir / "policy"), args.base or str(code_dir / "base")
        args.data, args.eval_data = args.data or str(toy_dir / "train.jsonl"), args.eval_data or str(toy_dir / "test.jsonl")
    if not (args.base and args.data and args.eval_data):
        raise ValueError("--base, --data and --eval_data are needed with --model")
    train = load_problems(args.data, args.n_problems or None)
    test = load_problems(args.eval_data, args.n_eval_problems or None)
    isolation = require_isolation(args.unsafe_exec)  # before any model-written code runs
    metrics = MetricsLog(out)
    res = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    res["sandbox/isolation"] = isolation
    res["round_0/greedy_acc"] = res.get("round_0/greedy_acc", evaluate_policy(args.model, test, args))
    policy, ppm_dir = args.model, None
    for r in range(1, args.rounds + 1):
        rd = out / f"round_{r}"
        if (rd / "done.json").exists():  # a finished round: reuse it
            info = json.loads((rd / "done.json").read_text())
        else:
            rd.mkdir(exist_ok=True)
            info, rows = run_round(r, policy, ppm_dir, train, args, rd, log_line)
            sft(args.base, rows, args, rd / "policy", log_line)
            train_ppm(rd / "trees.jsonl", str(rd / "policy"), rd / "ppm", args)
            info["greedy_acc"] = evaluate_policy(str(rd / "policy"), test, args)
            write_json(rd / "done.json", info)
        policy, ppm_dir = str(rd / "policy"), str(rd / "ppm")
        res.update({f"round_{r}/{k}": v for k, v in info.items()})
        metrics.log(r, **{f"round/{k}": v for k, v in info.items() if isinstance(v, (int, float))})
        log_line(f"round {r}: solved {info['solved_frac']:.1%} of training problems, SLM-{r} greedy "
                 f"{info['greedy_acc']:.1%}")
        write_json(out / "results.json", res)
    last = out / f"round_{args.rounds}"
    verifiers = {"ppm": last / "ppm"}
    for obj in ("pqm", "orm"):
        verifiers[obj] = train_ppm(last / "trees.jsonl", str(last / "policy"), last / obj, args, objective=obj)
    res.update(ablation(policy, verifiers, test, args, out, log_line))
    write_json(out / "results.json", res)
    table = report(res, args)
    (out / "results.md").write_text(table)
    print(table)
    return res


PAPER = {1: (60.17, 69.6), 2: (66.60, 73.6), 3: (77.86, 75.8), 4: (90.25, 78.4)}


def report(res: dict, args: Args) -> str:
    lines = ["| round | training problems solved | SLM-r greedy | paper: solved | paper: SLM-r MATH |",
             "|---|---|---|---|---|", f"| 0 (bootstrap) | | {100 * res['round_0/greedy_acc']:.1f}% | | |"]
    for r in range(1, args.rounds + 1):
        ps, pg = PAPER.get(r, ("", ""))
        lines.append(f"| {r} | {100 * res[f'round_{r}/solved_frac']:.1f}% | {100 * res[f'round_{r}/greedy_acc']:.1f}% "
                     f"| {ps}% | {pg}% |")
    K = args.eval_rollouts
    lines += ["", f"| method @ {K} rollouts | accuracy | minus the next row (95% paired interval) | paper (MATH) |",
              "|---|---|---|---|"]
    paper = {"ppm_mcts": 89.4, "pqm_mcts": 88.2, "orm_bon": 82.6, "maj": ""}
    nxt = {"ppm_mcts": "pqm_mcts", "pqm_mcts": "orm_bon", "orm_bon": "maj"}
    for m in ("ppm_mcts", "pqm_mcts", "orm_bon", "maj", "pass"):
        if f"{m}@{K}" not in res:
            continue
        d = res.get(f"diff/{m}-{nxt.get(m)}@{K}")
        ci = f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if d else ""
        lines.append(f"| {m} | {100 * res[f'{m}@{K}']:.1f}% | {ci} | {paper.get(m, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main, Args, TOY)
