"""ppm.py: rStar-Math's process preference model (Guan et al., arXiv 2501.04519, §3.3), trained on the MCTS
trees rstar_mcts.py writes, with the paper's reward-model ablation (--objective ppm | pqm | orm).

Pairs come from the trees' Q values, not from the Q values' size: at each node, up to 2 children of highest Q
that lead to a correct answer (positive) against up to 2 of lowest Q that lead to a wrong one (negative),
sharing the parent's prefix (up to 4 on one side when the other has only 1); a pair is kept when the
positive's Q beats the negative's by --margin, the positive's greedy best path has a higher mean Q than the
negative's worst path, and the two steps differ by --min_edit characters. Final-step pairs: the 2 correct
trajectories of highest mean Q against the 2 wrong ones of lowest, from the question. The loss is Eq. 4,
-log sigma(r_pos - r_neg) weighted by 1 / (pos_count * neg_count). The model is the policy's causal LM with a
scalar head on the last token (utils/verifiers.ValueHeadLM); it is saved as a verifier dir of kind `ppm`, so
rstar_mcts.py, search.py and eval.py score with it.

Ablation objectives on the same trees: pqm regresses tanh(r / 5) on every visited node's Q with MSE (the
paper's "PQM"); orm fits every answer's outcome with BCE on sigma(2 r / 5) = (tanh(r / 5) + 1) / 2 (an ORM).

Deviations:
  1. The paper says linear + tanh; the code trains the raw score and applies tanh(r / 5) only at inference:
     this file does what the code does.
  2. Eq. 4's sum over the batch is divided by the batch's pair count (a learning-rate scale).
  3. Held-out pairs: 5% of the problems (the code: a 5% split of the pairs), so a held-out pair's prefix was
     never trained on; the best epoch by held-out pairwise accuracy is kept, as the code keeps its best checkpoint.
  4. Toy-scale settings (TOY below) when --model is empty: among them --min_edit 1 (a toy step is one
     sentence and one line, and a misreading changes one character).
  5. Under torchrun the model is sharded with FSDP2 (the code: FSDP through HF Trainer); each rank scores a
     slice of every batch and runs as many forwards as the busiest rank.

    python ppm.py --trees runs/rstar/round_1/trees.jsonl                 # toy: the round-1 SFT policy as init
    python ppm.py --trees trees.jsonl --model SLM-r2 --objective pqm --out_dir runs/pqm
    torchrun --nproc_per_node 8 ppm.py --trees trees.jsonl --model SLM-r2 --bf16 true   # FSDP2 over the ranks
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import CODE_PROMPT, read_jsonl, write_jsonl
from utils.train import (Dist, MetricsLog, amp, close_dist, full_state, gather_lists, run_main, seed_all, setup_dist,
                         shard, write_json)
from utils.verifiers import ValueHeadLM, collate, encode, make_batches

OBJECTIVES = ("ppm", "pqm", "orm")


@dataclass
class Args:
    trees: str = field(default="", metadata={"help": "comma list of trees JSONL files (rstar_mcts.py's round_R/trees.jsonl)"})
    model: str = field(default="", metadata={"help": "init of the backbone: the round's SFT policy (empty: that "
                                                     "round's policy/ beside the trees)"})
    out_dir: str = field(default="", metadata={"help": "the verifier dir (default: ppm/ beside the trees)"})
    objective: str = field(default="ppm", metadata={"help": "ppm (pairwise, Eq. 4) | pqm (Q regressed, MSE) | orm "
                                                            "(outcome, BCE)"})
    margin: float = field(default=0.5, metadata={"help": "min Q_pos - Q_neg of a pair (code: 0.5)"})
    min_edit: int = field(default=20, metadata={"help": "min character edit distance between the two steps (code: 20)"})
    epochs: int = field(default=2, metadata={"help": "passes over the data (paper: 1; code README: 2)"})
    lr: float = field(default=7e-6, metadata={"help": "AdamW learning rate, linear decay, no warm-up (paper: 7e-6)"})
    batch: int = field(default=512, metadata={"help": "pairs (or rows) per optimizer step (paper: 512)"})
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per forward"})
    max_len: int = field(default=2048, metadata={"help": "max tokens of a scored sequence (code: 2048)"})
    eval_frac: float = field(default=0.05, metadata={"help": "share of problems held out (code: 5%)"})
    heldout_from: str = field(default="", metadata={"help": "another run's pairs.jsonl: its held-out problems are left "
                                                            "out of training and its held-out pairs are the ones "
                                                            "scored (the same for every run: curves over data)"})
    scale: float = field(default=5.0, metadata={"help": "inference value tanh(raw / scale) (code: 5)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on GPU, fp32 master weights (the paper trains in bf16)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    allow_empty: bool = field(default=False, metadata={"help": "no training rows (no tree with both outcomes): save the "
                                                               "untrained init (values ~ 0) instead of failing"})


TOY = dict(min_edit=1, epochs=3, lr=1e-3, batch=32, batch_tokens=8192, max_len=1024, eval_frac=0.1)


# ----------------------------------------------------------------------------- pairs from a tree
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def children_of(nodes: list[dict]) -> list[list[int]]:
    kids = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        if n["parent"] >= 0:
            kids[n["parent"]].append(i)
    return kids


def leaf_counts(nodes: list[dict], kids: list[list[int]]) -> list[tuple[int, int]]:
    """(correct answers, wrong answers) among the leaves under each node (dead ends count as neither)."""
    counts = [(0, 0)] * len(nodes)
    for i in reversed(range(len(nodes))):  # BFS order: children come after their parent
        n = nodes[i]
        if n["kind"] == "answer":
            counts[i] = (1, 0) if n["correct"] else (0, 1)
        else:
            counts[i] = (sum(counts[c][0] for c in kids[i]), sum(counts[c][1] for c in kids[i]))
    return counts


def path_mean_q(nodes: list[dict], kids: list[list[int]], counts: list[tuple[int, int]], i: int, best: bool) -> float:
    """Mean Q along the path from node i down, following the child of highest Q among those with a correct
    leaf (best) or of lowest Q among those with a wrong leaf (rS extra_rm_file.py build_partial_solution):
    dead ends are never followed."""
    qs = [nodes[i]["Q"]]
    while True:
        nxt = [c for c in kids[i] if counts[c][0 if best else 1]]
        if not nxt:
            return sum(qs) / len(qs)
        i = (max if best else min)(nxt, key=lambda c: nodes[c]["Q"])
        qs.append(nodes[i]["Q"])


def prefix_steps(nodes: list[dict], i: int) -> list[str]:
    out = []
    while nodes[i]["parent"] >= 0:
        out.append(nodes[i]["text"])
        i = nodes[i]["parent"]
    return out[::-1]


def ppm_pairs(tree: dict, margin: float = 0.5, min_edit: int = 20) -> list[dict]:
    """Sibling pairs from a tree's Q values (breadth first from the root) and the final-step pairs.
    Row: {problem, prefix (steps), pos, neg, pos_count, neg_count, q_pos, q_neg, final}."""
    nodes = tree["nodes"]
    kids = children_of(nodes)
    counts = leaf_counts(nodes, kids)
    rows, queue = [], [0]
    while queue:
        i = queue.pop(0)
        good = sorted([c for c in kids[i] if counts[c][0]], key=lambda c: -nodes[c]["Q"])
        bad = sorted([c for c in kids[i] if counts[c][1]], key=lambda c: nodes[c]["Q"])
        if good and bad:
            good, bad = good[: 4 if len(bad) == 1 else 2], bad[: 4 if len(good) == 1 else 2]
            for p in good:
                for n in bad:
                    if p == n:
                        continue
                    qp, qn = nodes[p]["Q"], nodes[n]["Q"]
                    if qp - qn < margin or (path_mean_q(nodes, kids, counts, p, True) <=
                                            path_mean_q(nodes, kids, counts, n, False)):
                        continue
                    if edit_distance(nodes[p]["text"], nodes[n]["text"]) < min_edit:
                        continue
                    rows.append({"problem": tree["problem"], "prefix": prefix_steps(nodes, i), "pos": nodes[p]["text"],
                                 "neg": nodes[n]["text"], "pos_count": len(good), "neg_count": len(bad), "q_pos": qp,
                                 "q_neg": qn, "final": False})
        queue += [c for c in kids[i] if counts[c][0] and counts[c][1]]  # recurse where both outcomes remain
    rows += final_pairs(tree, nodes)
    return rows


def final_pairs(tree: dict, nodes: list[dict], k: int = 2) -> list[dict]:
    """The paper's final-step pairs: the k correct full trajectories of highest mean Q against the k wrong
    ones of lowest mean Q, from the question alone."""
    def traj(i):
        idx = []
        while nodes[i]["parent"] >= 0:
            idx.append(i)
            i = nodes[i]["parent"]
        return idx[::-1]

    leaves = [(traj(i), nodes[i]["correct"]) for i, n in enumerate(nodes) if n["kind"] == "answer"]
    mean = lambda idx: sum(nodes[j]["Q"] for j in idx) / len(idx)  # noqa: E731
    good = sorted([t for t, c in leaves if c], key=mean, reverse=True)[:k]
    bad = sorted([t for t, c in leaves if not c], key=mean)[:k]
    return [{"problem": tree["problem"], "prefix": [], "pos": "".join(nodes[j]["text"] for j in g),
             "neg": "".join(nodes[j]["text"] for j in b), "pos_count": len(good), "neg_count": len(bad),
             "q_pos": mean(g), "q_neg": mean(b), "final": True} for g in good for b in bad]


def pqm_rows(tree: dict) -> list[dict]:
    """Every visited node that is not a dead end: its prefix, its step, its Q (the PQM's target)."""
    nodes = tree["nodes"]
    return [{"problem": tree["problem"], "prefix": prefix_steps(nodes, n["parent"]), "step": n["text"], "target": n["Q"]}
            for i, n in enumerate(nodes) if i and n["N"] and n["kind"] != "dead"]


def orm_rows(tree: dict) -> list[dict]:
    """Every answer of the tree as one whole trajectory with its outcome (the ORM's target, 1 or 0)."""
    nodes = tree["nodes"]
    return [{"problem": tree["problem"], "prefix": [], "step": "".join(prefix_steps(nodes, i)),
             "target": float(bool(n["correct"]))} for i, n in enumerate(nodes) if n["kind"] == "answer"]


# ----------------------------------------------------------------------------- losses
def bt_loss(r_pos: torch.Tensor, r_neg: torch.Tensor, pos_count: torch.Tensor, neg_count: torch.Tensor) -> torch.Tensor:
    """Eq. 4: -log sigma(r_pos - r_neg) / (pos_count * neg_count), summed over pairs, over the pair count."""
    w = 1.0 / (pos_count * neg_count)
    return (w * -F.logsigmoid(r_pos - r_neg)).sum() / len(r_pos)


def pqm_loss(raw: torch.Tensor, q: torch.Tensor, scale: float = 5.0) -> torch.Tensor:
    """The PQM ablation: MSE between tanh(raw / scale) and the node's Q value in [-1, 1]."""
    return F.mse_loss(torch.tanh(raw / scale), q)


def orm_loss(raw: torch.Tensor, outcome: torch.Tensor, scale: float = 5.0) -> torch.Tensor:
    """The ORM ablation: BCE of sigma(2 raw / scale) = (tanh(raw / scale) + 1) / 2 against the 0/1 outcome."""
    return F.binary_cross_entropy_with_logits(2 * raw / scale, outcome)


# ----------------------------------------------------------------------------- training
def score_rows(model, tok, rows: list[dict], keys: tuple[str, ...], meta: dict, args: Args, dev, grad: bool,
               dist: Dist | None = None):
    """Raw scores of prompt + prefix + row[key] for each key (one tensor per key, in row order). Under
    torchrun every rank runs as many forwards as the rank with the most (FSDP's collectives run per forward):
    the extra ones repeat a micro-batch and add 0 times their output to the first score."""
    ex = []
    for i, r in enumerate(rows):
        for key in keys:
            ids, tags = encode(tok, r["problem"], r["prefix"] + [r[key]], meta, args.max_len)
            ex.append({"ids": ids, "tags": tags[-1:], "i": i, "key": key})
    batches = make_batches(ex, args.batch_tokens, random.Random(0))
    n = len(batches)
    if dist is not None and dist.on:
        n = max(gather_lists(dist, [n]))
    vals, zero = {}, 0.0
    with torch.set_grad_enabled(grad):
        for j in range(n):
            batch = batches[j] if j < len(batches) else batches[0]
            ids, mask, tb, tt, _ = collate(batch, tok.pad_token_id or 0, dev)
            raw = model(ids, mask, tb, tt).float()  # (N,): fp32 under bf16 autocast too
            if j >= len(batches):
                zero = zero + 0.0 * raw.sum()
                continue
            for e, v in zip(batch, raw):
                vals[(e["key"], e["i"])] = v
    out = [torch.stack([vals[(key, i)] for i in range(len(rows))]) if rows else torch.zeros(0, device=dev) for key in keys]
    if rows and torch.is_tensor(zero):
        out[0] = out[0] + zero
    return out


def drop_too_long(tok, rows: list[dict], keys: tuple[str, ...], meta: dict, max_len: int) -> tuple[list[dict], int]:
    """The rows whose every scored sequence (prompt + prefix + row[key]) fits max_len, and how many did not:
    a step cut off by max_len would otherwise be scored at an earlier step's tag (or nowhere)."""
    keep = [r for r in rows if all(len(encode(tok, r["problem"], r["prefix"] + [r[k]], meta, max_len)[1]) ==
                                   len(r["prefix"]) + 1 for k in keys)]
    return keep, len(rows) - len(keep)


def pairwise_accuracy(model, tok, pairs: list[dict], meta: dict, args: Args, dev,
                      dist: Dist | None = None) -> tuple[float, float]:
    """Share of held-out pairs scored pos > neg: all pairs, and the final-step pairs alone (whole
    trajectories from the question: what picking one answer among several relies on). Under torchrun each
    rank scores a slice and the hits are gathered."""
    if not pairs:
        return float("nan"), float("nan")
    model.eval()
    rank, world = (dist.rank, dist.world) if dist is not None and dist.on else (0, 1)
    mine = pairs[rank::world] or pairs[:1]  # a rank with no pair still runs the forwards FSDP needs
    pos, neg = score_rows(model, tok, mine, ("pos", "neg"), meta, args, dev, grad=False, dist=dist)
    hits = [(bool(p > q), bool(r["final"])) for p, q, r in zip(pos.tolist(), neg.tolist(), mine)]
    hits = gather_lists(dist, hits if pairs[rank::world] else []) if world > 1 else hits
    all_hits, final = [h for h, _ in hits], [h for h, f in hits if f]
    return sum(all_hits) / len(all_hits), sum(final) / len(final) if final else float("nan")


def main(args: Args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if args.objective not in OBJECTIVES:
        raise ValueError(f"--objective {args.objective!r}: one of {', '.join(OBJECTIVES)}")
    if not args.trees:
        raise ValueError("--trees: the trees JSONL that rstar_mcts.py wrote (round_R/trees.jsonl)")
    dist = setup_dist()
    seed_all(args.seed)
    paths = [Path(p) for p in args.trees.split(",")]
    init = args.model or str(paths[0].parent / "policy")
    out = Path(args.out_dir or paths[0].parent / args.objective)
    out.mkdir(parents=True, exist_ok=True)
    if dist.main:
        write_json(out / "config.json", asdict(args))
    trees = [t for p in paths for t in read_jsonl(p, required=("problem", "answer", "nodes"))]
    rng = random.Random(args.seed)
    probs = sorted({t["problem"] for t in trees})
    fixed = [r for r in read_jsonl(args.heldout_from, required=("problem", "split")) if r["split"] == "eval"] \
        if args.heldout_from else None
    if fixed is not None:
        held = {r["problem"] for r in fixed}
    else:
        held = set(rng.sample(probs, max(1, int(args.eval_frac * len(probs))))) if len(probs) > 1 else set()
    pairs = {split: [r for t in trees if (t["problem"] in held) == (split == "eval")
                     for r in ppm_pairs(t, args.margin, args.min_edit)] for split in ("train", "eval")}
    if fixed is not None:
        pairs["eval"] = [{k: v for k, v in r.items() if k != "split"} for r in fixed]
    if dist.main:
        write_jsonl(out / "pairs.jsonl", [r | {"split": s} for s, rs in pairs.items() for r in rs])
    rows = pairs["train"] if args.objective == "ppm" else [
        r for t in trees if t["problem"] not in held for r in (pqm_rows(t) if args.objective == "pqm" else orm_rows(t))]
    if not rows and not args.allow_empty:
        raise ValueError(f"no {args.objective} training rows in {args.trees} (no tree with both outcomes?)")
    tok = AutoTokenizer.from_pretrained(init)
    dev, fsdp = dist.device, dist.on
    model = ValueHeadLM(AutoModelForCausalLM.from_pretrained(init))  # fp32 master weights
    model = shard(model, "fsdp", dist, args.bf16) if fsdp else model.to(dev)  # FSDP2 under torchrun
    meta = {"kind": "ppm", "objective": args.objective, "scale": args.scale, "prompt_template": CODE_PROMPT,
            "step_tag": "", "chat": False}
    keys = ("pos", "neg") if args.objective == "ppm" else ("step",)
    rows, too_long = drop_too_long(tok, rows, keys, meta, args.max_len)
    pairs["eval"], eval_too_long = drop_too_long(tok, pairs["eval"], ("pos", "neg"), meta, args.max_len)
    if (too_long or eval_too_long) and dist.main:
        print(f"ppm.py: {too_long} training rows and {eval_too_long} held-out pairs longer than --max_len "
              f"{args.max_len} left out", flush=True)
    if not rows and not args.allow_empty:
        raise ValueError(f"no {args.objective} training rows within --max_len {args.max_len} in {args.trees}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n_steps = max(1, args.epochs * ((len(rows) + args.batch - 1) // args.batch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / n_steps)
    log = MetricsLog(out, enabled=dist.main)
    best, best_final, step = -1.0, float("nan"), 0
    acc0, final0 = pairwise_accuracy(model, tok, pairs["eval"], meta, args, dev, dist)
    say = print if dist.main else (lambda *a, **k: None)
    say(f"ppm.py: {args.objective}, {len(rows)} training rows ({len(pairs['train'])} pairs), "
          f"{len(pairs['eval'])} held-out pairs; held-out pairwise accuracy at init {acc0:.3f}", flush=True)
    if not rows:
        say(f"ppm.py: warning: no {args.objective} training rows; saving the untrained init", flush=True)
    bar = tqdm(total=n_steps if rows else 0, desc=f"{args.objective} training", disable=not dist.main)
    for epoch in range(args.epochs if rows else 1):
        order = rng.sample(rows, len(rows))
        model.train()
        for b in range(0, len(order), args.batch):
            batch = order[b: b + args.batch]
            # under torchrun each rank takes a slice; the slice's mean loss times len(slice) * world / len(batch)
            # is the batch mean once FSDP averages the gradients over ranks
            mine = batch[dist.rank::dist.world] if dist.on else batch
            w = len(mine) * (dist.world if dist.on else 1) / len(batch)
            mine, w = (mine, w) if mine else (batch[:1], 0.0)
            if args.objective == "ppm":
                with amp(args.bf16, dev):
                    pos, neg = score_rows(model, tok, mine, ("pos", "neg"), meta, args, dev, grad=True, dist=dist)
                loss = bt_loss(pos, neg, torch.tensor([r["pos_count"] for r in mine], device=dev, dtype=torch.float),
                               torch.tensor([r["neg_count"] for r in mine], device=dev, dtype=torch.float))
            else:
                with amp(args.bf16, dev):
                    (raw,) = score_rows(model, tok, mine, ("step",), meta, args, dev, grad=True, dist=dist)
                target = torch.tensor([r["target"] for r in mine], device=dev, dtype=torch.float)
                loss = (pqm_loss if args.objective == "pqm" else orm_loss)(raw, target, args.scale)
            (loss * w).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            log.log(step, **{"train/loss": loss.item(), "train/lr": sched.get_last_lr()[0]})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc, final = pairwise_accuracy(model, tok, pairs["eval"], meta, args, dev, dist)
        log.log(step, **{"eval/pairwise_acc": acc, "eval/pairwise_acc_final": final, "epoch": epoch + 1})
        if acc >= best or acc != acc:  # keep the best epoch (NaN: no held-out pairs, keep the last)
            best, best_final = acc, final
            state = full_state(model, fsdp=fsdp)[0] if fsdp else None  # a collective under FSDP
            if dist.main:
                model.save(out, state)
                tok.save_pretrained(out)
                write_json(out / "verifier.json", meta | {"epoch": epoch + 1, "heldout_pairwise_acc": acc,
                                                          "heldout_pairwise_acc_final": final})
    bar.close()
    res = {"objective": args.objective, "train_rows": len(rows), "train_pairs": len(pairs["train"]),
           "heldout_pairs": len(pairs["eval"]), "too_long": too_long, "heldout_too_long": eval_too_long,
           "heldout_pairwise_acc_init": acc0, "heldout_pairwise_acc": best,
           "heldout_final_pairs": sum(bool(r["final"]) for r in pairs["eval"]), "heldout_pairwise_acc_final_init": final0,
           "heldout_pairwise_acc_final": best_final}
    if dist.main:
        write_json(out / "results.json", res)
        print(json.dumps(res), flush=True)
    close_dist(dist)
    return res


if __name__ == "__main__":
    run_main(main, Args, TOY)
