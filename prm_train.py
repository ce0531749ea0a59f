"""prm_train.py: a discriminative process reward model (PRM) from human or Monte-Carlo step labels.

Papers: "Let's Verify Step by Step" (Lightman et al., arXiv 2305.20050); Math-Shepherd (Wang et al.,
arXiv 2312.08935); OmegaPRM (Luo et al., arXiv 2406.06592). Heads as in Math-Shepherd/OpenR (`lm2`)
and Qwen2.5-Math-PRM/TRL (`cls`).

A causal LM reads the prompt and the solution steps; after each step the step tag (the "\\n\\n"
separator by default) is appended at the token level, and the PRM's P(step is correct) is read at the
tag's last token. One forward pass scores every step. Step labels come from a JSONL in the stepwise
format (PRM800K, Math-Shepherd and ProcessBench convert to it, see utils/data.py), or are made here
from policy samples:
  mc       Math-Shepherd: roll out K completions from each step prefix; hard label = any reaches the
           gold answer, soft = the fraction that does;
  omega    OmegaPRM's binary search for the first error of a wrong solution: MC-estimate the middle
           prefix and recurse, K*log2(M) rollouts instead of K*M;
  outcome  the ORM baseline: every step gets the solution's final outcome;
  exact    (toy only) the toy checker's step labels: the ceiling that MC labels aim at.
With --select_prm, which samples get labelled is chosen by a trained PRM, as in Let's Verify's
active learning (section 4.2): mostly the wrong-answer samples it finds most convincing.
Each PRM is saved as a verifier dir (HF model + verifier.json, kind `prm`) and evaluated by loading it
back through utils/verifiers.py, which holds the model wrapper, the encoding and the scoring that
search.py and eval.py use.

Deviations from the papers:
  1. Hard MC labels of a solution whose own answer is right are all positive with no rollouts: the
     solution is itself a completion of each of its prefixes that reaches the answer.
  2. `omega` is the binary search only, not OmegaPRM's tree search over (state, rollout) pairs; it
     labels wrong solutions up to their first error, right ones all positive.
  3. The tag is the step separator, not an added token (" ки"): the policy saw "\\n\\n" in its own
     text, and TRL's PRMTrainer reads the same position. `--step_tag "<extra_0>"` gives Qwen's form.
  4. Toy-scale hyperparameters (TOY below) replace the papers' when --model is empty. There the PRM
     learns from the toy checker's exact step labels (the stand-in for PRM800K's human labels; `--labels
     mc` for Math-Shepherd's) and fine-tunes from the toy's verifier base, a model 13 times the
     policy trained on the same SFT data: as in Let's Verify, the verifier is no smaller than the generator.

    python prm_train.py                                      # toy world on CPU: exact step labels + the ORM
    python prm_train.py --labels mc --out_dir runs/prm_mc    # Math-Shepherd's MC labels instead
    python prm_train.py --labels outcome --samples_per_problem 16 --epochs 2 --baselines "" --out_dir runs/orm16
    python prm_train.py --init runs/orm16/outcome --lr 5e-4 --epochs 2 --baselines ""   # MC labels from that ORM
    torchrun --nproc_per_node 8 prm_train.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --chat \\
        --labels prm800k_stepwise.jsonl --head cls --bf16
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import build_prompt, first_error_truncate, load_problems, read_jsonl, split_steps, write_jsonl
from utils.generation import load_backend
from utils.grader import grade
from utils.train import (MetricsLog, amp, close_dist, gather_lists, git_commit, latest_checkpoint, run_main,
                         save_checkpoint, seed_all, setup_dist, unwrap, write_json)
from utils.verifiers import (build_prm, collate, encode, first_error_prediction, load_verifier, make_batches,
                             processbench_f1)


@dataclass
class Args:
    # model and data
    model: str = field(default="", metadata={"help": "PRM init checkpoint (HF dir or hub id); empty: the toy policy"})
    policy: str = field(default="", metadata={"help": "policy that writes and completes solutions (default: --model)"})
    init: str = field(default="", metadata={"help": "local model dir every PRM here is fine-tuned from, e.g. a trained "
                                                    "ORM (default: --model; on the toy its 3.6M verifier base)"})
    data: str = field(default="", metadata={"help": "problems JSONL {problem, answer} to sample from (default: toy train)"})
    labels: str = field(default="mc", metadata={"help": "mc | omega | outcome | exact (toy) | a stepwise JSONL path"})
    baselines: str = field(default="", metadata={"help": "comma list of extra label sources trained on the same "
                                                         "solutions and steps, e.g. outcome,exact"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    chat: bool = field(default=False, metadata={"help": "build prompts with the tokenizer's chat template"})
    # labelling (Math-Shepherd / OmegaPRM)
    n_problems: int = field(default=0, metadata={"help": "problems to sample solutions for (0: all)"})
    samples_per_problem: int = field(default=4, metadata={"help": "policy solutions per problem"})
    select_prm: str = field(default="", metadata={"help": "active learning (Let's Verify 4.2): a trained PRM dir that "
                                                          "picks which samples to label ('' = uniform samples)"})
    select_from: int = field(default=16, metadata={"help": "with --select_prm: samples drawn per problem to pick "
                                                           "from (Let's Verify: 1000)"})
    select_wrong: float = field(default=0.8, metadata={"help": "with --select_prm: share of the picks that are the most "
                                                               "convincing wrong-answer samples (Let's Verify: 0.8)"})
    mc_rollouts: int = field(default=8, metadata={"help": "completions per prefix K (Math-Shepherd: N=8; OmegaPRM: k=8)"})
    label_type: str = field(default="hard", metadata={"help": "hard | soft (Math-Shepherd HE/SE; its data is HE)"})
    first_error: bool = field(default=True, metadata={"help": "drop steps after the first negative (PRM800K/ProcessBench)"})
    mc_monotone: bool = field(default=False, metadata={"help": "mc: prefixes after one with MC = 0 are labelled 0 "
                                                                  "without rollouts (OmegaPRM's assumption; "
                                                                  "Math-Shepherd rolls out every prefix)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature for solutions and rollouts"})
    rollout_temperature: float = field(default=-1.0, metadata={"help": "completer temperature for mc/omega "
                                                                       "rollouts (< 0: --temperature)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "max tokens per solution / rollout"})
    backend: str = field(default="auto", metadata={"help": "auto | vllm | hf"})
    # model head
    head: str = field(default="lm2", metadata={"help": "lm2 (two label tokens, Math-Shepherd/OpenR) | cls "
                                                       "(token classification, Qwen2.5-Math-PRM/TRL)"})
    pos_token: str = field(default="+", metadata={"help": "lm2 positive label token (Math-Shepherd)"})
    neg_token: str = field(default="-", metadata={"help": "lm2 negative label token (Math-Shepherd)"})
    step_tag: str = field(default="\n\n", metadata={"help": "ids appended after each step; P(correct) is read at its last token"})
    # optimisation (search-and-learn H4 recipe / OpenR)
    lr: float = field(default=1e-5, metadata={"help": "peak lr (notes: 1e-5 <=1.5B, 1e-6 for 7B; H4 recipe 1e-6)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the labelled solutions (H4 recipe: 1)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup fraction, then cosine (H4: 50 steps)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (OpenR: 0.01)"})
    batch_tokens: int = field(default=16384, metadata={"help": "tokens per micro-batch (padded), per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_len: int = field(default=2048, metadata={"help": "max tokens per solution; later steps are dropped (H4: 2048)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: epochs decide)"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast, GPU or CPU (the papers train in bf16)"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing"})
    # evaluation and output
    eval_data: str = field(default="", metadata={"help": "ProcessBench-format JSONL {problem, steps, label} to "
                                                         "evaluate on (default on the toy: fresh policy samples on test)"})
    n_eval_problems: int = field(default=500, metadata={"help": "toy test problems sampled for toy ProcessBench"})
    threshold: float = field(default=0.5, metadata={"help": "first step with P(correct) < threshold is the error"})
    out_dir: str = field(default="runs/prm", metadata={"help": "outputs: labels, metrics.jsonl, prm/, eval.json"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in out_dir"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, shuffling and init"})


# Toy scale (applied when --model is empty): exact step labels of 2,400 policy solutions, a PRM and an ORM fine-tuned
# from the toy's 3.6M verifier base, sized for a second job of minutes. NOTE: the budget is what trains: two epochs at
# 2,048 tokens a batch are about 490 optimizer steps at lr 1e-3 (lr x steps 0.49; toy ProcessBench F1 0.72), where one
# epoch at 8,192 tokens and lr 5e-4 (75 steps, lr x steps 0.04) gave 0.50 (docs/results/prm_train.md).
TOY = dict(labels="exact", n_problems=1200, samples_per_problem=2, temperature=1.0, rollout_temperature=0.7,
           max_new_tokens=200, backend="hf", lr=1e-3, epochs=2.0, warmup_ratio=0.05, weight_decay=0.01,
           batch_tokens=2048, max_len=1024, n_eval_problems=500, baselines="outcome")


# ----------------------------------------------------------------------------- the PRM's verifier.json
def prm_meta(args: Args) -> dict:
    """How the PRM reads a solution (utils/verifiers.py, kind prm): head, label tokens, step tag, prompt."""
    return {"kind": "prm", "head": args.head, "pos_token": args.pos_token, "neg_token": args.neg_token,
            "step_tag": args.step_tag, "chat": args.chat}


# ----------------------------------------------------------------------------- labels from rollouts
def sample_solutions(gen, tok, problems: list[dict], args: Args) -> list[dict]:
    """samples_per_problem policy solutions per problem; with --select_prm, picked from select_from."""
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in problems]
    outs = gen.sample(prompts, n=args.select_from if args.select_prm else args.samples_per_problem,
                      temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed)
    groups = []
    for p, pr, o in zip(problems, prompts, outs):
        groups.append([{"problem": p["problem"], "answer": p["answer"], "steps": steps, "prompt_ids": pr,
                        "correct": bool(grade(s.text, p["answer"]))} for s in o if (steps := split_steps(s.text))])
    if args.select_prm:
        groups = select_convincing(groups, args)
    return [r for g in groups for r in g]


def select_convincing(groups: list[list[dict]], args: Args) -> list[list[dict]]:
    """Active learning as in "Let's Verify Step by Step" 4.2: a selector PRM scores every sample (the
    product of its step scores, the paper's solution score); per problem keep the select_wrong share of
    samples_per_problem as the most convincing wrong-answer samples, the rest as the most convincing
    of what remains (right or wrong)."""
    verifier = load_verifier(args.select_prm, batch_tokens=args.batch_tokens, max_len=args.max_len)
    flat = [r for g in groups for r in g]
    scores = verifier.score([r["problem"] for r in flat], [r["steps"] for r in flat])
    for r, s in zip(flat, scores):
        r["select_score"] = math.prod(s)
    n_wrong = round(args.select_wrong * args.samples_per_problem)
    out = []
    for g in groups:
        g = sorted(g, key=lambda r: -r["select_score"])
        pick = [r for r in g if not r["correct"]][:n_wrong]
        chosen = {id(r) for r in pick}
        out.append(pick + [r for r in g if id(r) not in chosen][: args.samples_per_problem - len(pick)])
    return out


def prefix_ids(tok, row: dict, k: int, step_tag: str) -> list[int]:
    """Prompt + the first k steps, each followed by the separator, as the policy wrote them."""
    ids = list(row["prompt_ids"])
    for s in row["steps"][:k]:
        ids += tok.encode(s + step_tag, add_special_tokens=False)
    return ids


def mc_estimate(gen, tok, rows: list[dict], ks: list[int], args: Args, salt: int) -> list[float]:
    """Fraction of K policy completions of rows[i]'s first ks[i] steps that reach the gold answer."""
    if not rows:
        return []
    prefixes = [prefix_ids(tok, r, k, "\n\n") for r, k in zip(rows, ks)]
    temp = args.rollout_temperature if args.rollout_temperature >= 0 else args.temperature
    outs = gen.sample(prefixes, n=args.mc_rollouts, temperature=temp, max_tokens=args.max_new_tokens,
                      seed=args.seed + 7919 * salt, logprobs=False)
    return [sum(grade(c.text, r["answer"]) for c in o) / len(o) for r, o in zip(rows, outs)]


def label_mc(gen, tok, rows: list[dict], args: Args) -> int:
    """Math-Shepherd: each step prefix of each solution gets an MC value. Returns rollouts spent.
    Prefixes are estimated front to back; a solution stops at its first zero when the steps after it
    are dropped anyway (hard labels, first-error truncation) or are assumed wrong (`mc_monotone`)."""
    stop_at_zero = args.mc_monotone or (args.label_type == "hard" and args.first_error)
    for r in rows:
        last = float(r["correct"])  # the last prefix is the whole solution
        r["mc"] = [1.0] * (len(r["steps"]) - 1) + [last] if r["correct"] and args.label_type == "hard" else \
            [None] * (len(r["steps"]) - 1) + [last]  # deviation 1
    spent, k = 0, 1
    while True:
        todo = [i for i, r in enumerate(rows) if k < len(r["steps"]) and r["mc"][k - 1] is None
                and not (stop_at_zero and 0.0 in r["mc"][: k - 1])]
        if not todo:
            break
        for i, v in zip(todo, mc_estimate(gen, tok, [rows[i] for i in todo], [k] * len(todo), args, salt=k)):
            rows[i]["mc"][k - 1] = v
        spent += len(todo) * args.mc_rollouts
        k += 1
    for r in rows:
        if stop_at_zero and 0.0 in r["mc"]:  # after the first zero: 0 (dropped if truncated)
            z = r["mc"].index(0.0)
            r["mc"] = r["mc"][: z + 1] + [0.0] * (len(r["mc"]) - z - 1)
        r["labels"] = [v if args.label_type == "soft" else v > 0 for v in r["mc"]]  # Math-Shepherd SE / HE
    return spent


def label_omega(gen, tok, rows: list[dict], args: Args) -> int:
    """OmegaPRM's binary search for the first error: lo = steps known to keep MC > 0, hi = a prefix
    length known to have MC = 0 (the whole wrong solution). All searches advance together, one batched
    MC estimate per round. Returns rollouts spent."""
    spent, state = 0, {}
    for i, r in enumerate(rows):
        if r["correct"]:
            r["labels"] = [True] * len(r["steps"])
        else:
            state[i] = [0, len(r["steps"])]
    rnd = 0
    while any(hi - lo > 1 for lo, hi in state.values()):
        act = [i for i, (lo, hi) in state.items() if hi - lo > 1]
        mids = [(state[i][0] + state[i][1]) // 2 for i in act]
        values = mc_estimate(gen, tok, [rows[i] for i in act], mids, args, salt=100 + rnd)
        spent += len(act) * args.mc_rollouts
        for i, m, v in zip(act, mids, values):
            state[i][0 if v > 0 else 1] = m
        rnd += 1
    for i, (lo, hi) in state.items():
        e = hi - 1  # first error: the step that takes the MC value to zero
        rows[i]["labels"] = [True] * e + [False] + [False] * (len(rows[i]["steps"]) - e - 1)
    return spent


def exact_labels(row: dict) -> list[bool]:
    """Toy checker: a step is good while no step up to it is wrong (what an MC label estimates)."""
    from utils.toy import check_steps
    fe = check_steps(row["problem"], row["steps"], row["answer"]).first_error
    return [fe == -1 or i < fe for i in range(len(row["steps"]))]


def to_stepwise(rows: list[dict], first_error: bool) -> list[dict]:
    out = [{"prompt": r["problem"], "completions": r["steps"], "labels": r["labels"]} for r in rows]
    return [first_error_truncate(r) if first_error else r for r in out]


# ----------------------------------------------------------------------------- evaluation (ProcessBench)
def evaluate(verifier, rows: list[dict], args: Args, kinds: list[str] | None = None) -> dict:
    """ProcessBench F1 at the threshold (and a sweep), plus step accuracy on the labelled steps; with
    `kinds` (the kind of each row's first error), how many of each kind the PRM locates. `verifier` is
    the saved PRM dir loaded through utils/verifiers.py, so training and search read the same scores."""
    scores = verifier.score([r["problem"] for r in rows], [r["steps"] for r in rows])
    labels = [r["label"] for r in rows]
    preds = [first_error_prediction(s, args.threshold) for s in scores]
    res = processbench_f1(preds, labels)
    if kinds:
        res["by_first_error"] = {k: {"found": sum(p == y for p, y, kk in zip(preds, labels, kinds) if kk == k),
                                     "n": kinds.count(k)} for k in sorted(set(kinds))}
    res["sweep"] = {f"{t:.1f}": round(processbench_f1([first_error_prediction(s, t) for s in scores], labels)["f1"], 4)
                    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
    hits = [(p >= args.threshold) == (y == -1 or i < y)
            for s, y in zip(scores, labels) for i, p in enumerate(s) if y == -1 or i <= y]
    res["step_acc"] = sum(hits) / max(1, len(hits))
    return res


# ----------------------------------------------------------------------------- training
def train(name: str, init: str, stepwise: list[dict], args: Args, dist, log) -> Path:
    """Fine-tune a PRM from `init` on stepwise rows; saves out_dir/<name>/ (HF dir + verifier.json)."""
    out = Path(args.out_dir) / name
    seed_all(args.seed)
    dtype = torch.float32
    meta = prm_meta(args)
    prm, tok = build_prm(init, meta, dtype)
    if args.grad_ckpt:
        prm.model.gradient_checkpointing_enable()
    examples = []
    for r in stepwise:
        ids, tags = encode(tok, r["prompt"], r["completions"], meta, args.max_len)
        if tags:
            examples.append({"ids": ids, "tags": tags, "labels": [float(y) for y in r["labels"][: len(tags)]]})
    if not examples:
        raise ValueError(f"{name}: no labelled steps to train on")
    rng = random.Random(args.seed)
    epochs = math.ceil(args.epochs)
    batches = []
    for ep in range(epochs):
        b = make_batches(examples, args.batch_tokens, rng)
        batches += b[: round(len(b) * min(1.0, args.epochs - ep))]
    per_rank = len(batches) // dist.world
    batches = batches[dist.rank * per_rank: (dist.rank + 1) * per_rank]  # same count on every rank
    total = per_rank // args.grad_accum
    if args.max_steps:
        total = min(total, args.max_steps)
    start = 0
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt:
        prm.model.load_state_dict(type(prm.model).from_pretrained(ckpt, dtype=dtype).state_dict())
        start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    prm.to(dist.device)
    model = torch.nn.parallel.DistributedDataParallel(prm) if dist.on else prm
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    warm = max(1, int(args.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, total)))))
    if ckpt and (ckpt / "optimizer.pt").exists():
        st = torch.load(ckpt / "optimizer.pt", map_location="cpu")
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.train()
    bar = tqdm(range(start, total), desc=f"train {name}", disable=not dist.main)
    for step in bar:
        tot_loss, tot_hit, tot_n = 0.0, 0, 0
        for micro in batches[step * args.grad_accum: (step + 1) * args.grad_accum]:
            ids, mask, tb, tt, y = collate(micro, pad, dist.device)
            with amp(args.bf16, dist.device):
                z = model(ids, mask, tb, tt).float()  # (N,)
            loss = F.binary_cross_entropy_with_logits(z, y)  # soft targets: -[q log p + (1-q) log(1-p)]
            (loss / args.grad_accum).backward()
            tot_loss += loss.item() / args.grad_accum
            tot_hit += int(((z > 0) == (y >= 0.5)).sum())
            tot_n += len(y)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{tot_loss:.4f}", acc=f"{tot_hit / max(1, tot_n):.3f}")
        log.log(step + 1, **{f"train/{name}/loss": tot_loss, f"train/{name}/tag_acc": tot_hit / max(1, tot_n),
                             f"train/{name}/grad_norm": float(gn), f"train/{name}/lr": sched.get_last_lr()[0]})
        if args.save_every and (step + 1) % args.save_every == 0 and dist.main:
            p = save_checkpoint(out, step + 1, unwrap(model).model, tok)
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, p / "optimizer.pt")
    prm = unwrap(model)
    if dist.main:
        prm.model.save_pretrained(out)
        tok.save_pretrained(out)
        meta.update(labels=name, train_steps=total, train_solutions=len(examples),
                    train_tags=sum(len(e["tags"]) for e in examples))
        write_json(out / "verifier.json", meta)
        (out / "prm.json").unlink(missing_ok=True)  # an older run's file in the same dir
    return out


# ----------------------------------------------------------------------------- main
def main(args: Args):
    t0 = time.time()
    dist = setup_dist()
    seed_all(args.seed)
    out = Path(args.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(args) | {"commit": git_commit()})
    log = MetricsLog(out, enabled=dist.main)
    toy = not args.model
    if toy:
        from utils.toy import ensure_toy, toy_processbench
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model = str(tdir / "policy")
        args.data = args.data or str(tdir / "train.jsonl")
        toy_test = read_jsonl(tdir / "test.jsonl")
    policy = args.policy or args.model
    sources = [args.labels] + [b for b in args.baselines.split(",") if b]
    if "exact" in sources and not toy:
        raise ValueError("--labels exact needs the toy world's checker (leave --model empty)")
    if args.init and not (Path(args.init) / "config.json").exists():
        raise ValueError(f"--init {args.init}: not a local model dir (no config.json)")
    if args.select_prm and not any((Path(args.select_prm) / f).exists() for f in ("verifier.json", "prm.json")):
        raise ValueError(f"--select_prm {args.select_prm}: not a verifier dir (no verifier.json)")
    if args.select_prm and not (args.select_from >= args.samples_per_problem and 0 <= args.select_wrong <= 1):
        raise ValueError("--select_from must be >= --samples_per_problem and --select_wrong in [0, 1]")
    if toy and not args.init:  # verifiers the policy's size do not learn to spot its errors (docs/results/search.md)
        from utils.toy import ensure_verifier_base
        args.init = str(ensure_verifier_base(tdir))
    results, gen = {"labels": args.labels}, None

    # 1. solutions and labels (cached in out_dir/solutions.jsonl, so a rerun or --resume skips this)
    sol_path = out / "solutions.jsonl"
    if args.labels.endswith(".jsonl"):
        stepwise = {args.labels: read_jsonl(args.labels, required=("prompt", "completions", "labels"))}
        rows = []
    else:
        spent = json.loads((out / "labelling.json").read_text()) if (out / "labelling.json").exists() else {}
        if sol_path.exists():  # a rerun labels the cached solutions with any new source only
            rows = read_jsonl(sol_path)
        else:
            gen = load_backend(policy, backend=args.backend, max_model_len=args.max_len)
            problems = load_problems(args.data, args.n_problems or None)
            t = time.time()
            rows = gather_lists(dist, sample_solutions(gen, gen.tokenizer, problems[dist.rank::dist.world], args))
            spent["n_too_long"] = sum(gather_lists(dist, [gen.n_too_long]))  # prompts over the context: no samples
            if dist.main:
                print(f"sampled {len(rows)} solutions ({sum(r['correct'] for r in rows)} right) in {time.time() - t:.0f}s")
        missing = [src for src in sources if f"labels_{src}" not in rows[0]] if rows else []
        if missing:
            mine = rows[dist.rank::dist.world]  # each rank labels a slice, then all gather
            for src in missing:
                t = time.time()
                if src in ("mc", "omega"):
                    if gen is None:
                        gen = load_backend(policy, backend=args.backend, max_model_len=args.max_len)
                    for r in mine:
                        r["prompt_ids"] = gen.tokenizer.encode(build_prompt(r["problem"], gen.tokenizer, args.chat),
                                                               add_special_tokens=False)
                    n = sum(gather_lists(dist, [(label_mc if src == "mc" else label_omega)(gen, gen.tokenizer, mine, args)]))
                    for r in mine:
                        r[f"labels_{src}"] = r.pop("labels")
                    spent[src] = {"rollouts": n, "solutions": len(rows), "seconds": time.time() - t}
                elif src == "outcome":
                    for r in mine:
                        r["labels_outcome"] = [r["correct"]] * len(r["steps"])
                elif src == "exact":
                    for r in mine:
                        r["labels_exact"] = exact_labels(r)
                else:
                    raise ValueError(f"unknown label source {src!r} (mc, omega, outcome, exact or a .jsonl)")
            rows = gather_lists(dist, mine)
            if dist.main:
                write_jsonl(sol_path, [{k: v for k, v in r.items() if k not in ("prompt_ids", "mc")} for r in rows])
                write_json(out / "labelling.json", spent)
        stepwise = {}
        for src in sources:  # an ORM's every step carries the outcome: no first-error truncation there
            stepwise[src] = to_stepwise([{**r, "labels": r[f"labels_{src}"]} for r in rows],
                                        args.first_error and src != "outcome")
        results["n_too_long"] = spent.get("n_too_long", 0)
        for src, s in ((k, v) for k, v in spent.items() if isinstance(v, dict)):
            results[f"rollouts_per_solution/{src}"] = s["rollouts"] / max(1, s["solutions"])
            if dist.main:
                print(f"{src}: {s['rollouts']} rollouts for {s['solutions']} solutions "
                      f"({s['rollouts'] / max(1, s['solutions']):.1f} per labelled solution)")
        if toy and rows:
            exact = [exact_labels(r) for r in rows]
            for src in ("mc", "omega"):
                if f"labels_{src}" in rows[0]:
                    pairs = [(bool(a >= 0.5), b) for r, ex in zip(rows, exact)
                             for a, b in zip(to_stepwise([{**r, "labels": r[f"labels_{src}"]}], args.first_error)[0]["labels"], ex)]
                    results[f"{src}_label_agreement"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
        results["n_solutions"] = len(rows)
        results["solution_accuracy"] = sum(r["correct"] for r in rows) / max(1, len(rows))

    # 2. evaluation set: given ProcessBench-format rows, or fresh policy samples on toy test problems
    eval_rows = []
    if args.eval_data:
        eval_rows = read_jsonl(args.eval_data, required=("problem", "steps", "label"))
    elif toy and dist.main:
        ev_path = out / "toy_processbench.jsonl"
        if ev_path.exists():
            eval_rows = read_jsonl(ev_path)
        else:
            gen = gen or load_backend(policy, backend=args.backend, max_model_len=args.max_len)
            eval_rows = toy_processbench(gen, toy_test[: args.n_eval_problems], args.chat, args.temperature,
                                         args.max_new_tokens, args.seed)
            write_jsonl(ev_path, eval_rows)
        results["eval_error_rate"] = sum(r["label"] != -1 for r in eval_rows) / max(1, len(eval_rows))
    del gen
    kinds = None
    if toy and eval_rows and not args.eval_data:
        from utils.toy import first_error_kind
        kinds = [first_error_kind(r["problem"], r["steps"]) for r in eval_rows]

    # 3. train one PRM per label source on the same solutions and the same number of steps; evaluate
    for src, rows_src in stepwise.items():
        name = Path(src).stem if src.endswith(".jsonl") else src
        path = train(name, args.init or args.model, rows_src, args, dist, log)
        if dist.main and eval_rows:
            ev = evaluate(load_verifier(str(path), dist.device, batch_tokens=args.batch_tokens, max_len=args.max_len),
                          eval_rows, args, kinds)
            results[f"eval/{name}"] = ev
            print(f"{name:8s} ProcessBench F1 {ev['f1']:.3f} (erroneous {ev['acc_erroneous']:.3f}, "
                  f"correct {ev['acc_correct']:.3f}), step acc {ev['step_acc']:.3f}, sweep {ev['sweep']}")
    if dist.main and eval_rows and (out / "eval.json").exists():  # keep PRMs trained by earlier runs here
        results = {**{k: v for k, v in json.loads((out / "eval.json").read_text()).items() if k.startswith("eval/")},
                   **results}
    if dist.main and eval_rows:
        head = results.get(f"eval/{Path(args.labels).stem if args.labels.endswith('.jsonl') else args.labels}", {})
        results["toy_processbench_f1" if toy else "processbench_f1"] = head.get("f1")
        results["step_acc"] = head.get("step_acc")
        for b in ("outcome", "exact", "mc", "omega"):
            if f"eval/{b}" in results and b != args.labels:
                results[{"exact": "exact_label_f1"}.get(b, f"{b}_f1")] = results[f"eval/{b}"]["f1"]
        results["mc_label_agreement"] = results.get("mc_label_agreement", results.get("omega_label_agreement"))
        results["wall_s"] = time.time() - t0
        write_json(out / "eval.json", results)
        print(json.dumps({k: v for k, v in results.items() if not k.startswith("eval/")}, indent=2))
    close_dist(dist)


if __name__ == "__main__":
    run_main(main, Args, TOY)
