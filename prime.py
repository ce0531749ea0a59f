"""prime.py: PRIME, online RL with an implicit process reward (Cui et al., "Process Reinforcement through
Implicit Rewards", arXiv 2502.01456; the implicit PRM: Yuan et al., arXiv 2412.01981), as PRIME-RL/PRIME's
code runs it.

Each RL step: sample prompts, K rollouts each at T = 1, grade them 0/1; keep prompts whose mean accuracy is
in [0.2, 0.8], sampling more until the batch is full (the surplus prompts wait for the next step, where they
are sampled and filtered again with the fresh ones). The implicit PRM pi_phi and a frozen reference start
as the SFT policy; a token's process reward is q_t = log pi_phi(y_t) - log pi_ref(y_t). The PRM is updated
first on this batch with BCE(sigma(beta * sum_t q_t), outcome), and the q of that same forward are the
process rewards ("single forward"). They are divided by the batch's largest |return-to-go|; RLOO runs
separately on the outcome (last token) and on the process rewards (per token), returns are summed (gamma = 1)
and whitened over the valid tokens; then PPO-clip on recomputed old logprobs, one epoch of 4 mini-batches,
no KL, no entropy bonus. The trained PRM is saved as a verifier dir of kind
`implicit` (utils/verifiers.py), so search.py and eval.py score it beside the PRM and the ORM.

Deviations (every one a code fact the paper leaves out is kept, and said where it is computed):
  1. Toy-scale hyperparameters (TOY below) replace the paper's when --model is empty.
  2. Under torchrun each rank normalises the process rewards of its own shard by its largest |return-to-go|,
     as the code's PRM workers do (--global_norm: the whole batch's); the returns are whitened with the whole
     batch's mean and variance, as the code's driver does.
  3. The micro-batch is --micro_batch sequences with a token-mean per sequence, then a mean over sequences
     (the original's 1 sequence per GPU micro-batch gives the same sequence-mean of token-means).
  4. Under torchrun, --shard fsdp (FSDP2, fully_shard per decoder layer, the default for real models) or ddp
     (the toy's) stands in for verl's FSDP workers; the PRM and the reference are sharded like the policy.
  5. If the filter cannot fill a batch in --max_rounds sampling rounds, the step goes on with what passed
     (the original samples until it fills).
  6. Rollouts come from vLLM (a colocated engine per rank, --vllm_memory of the GPU, weights pushed after
     every update, prefix cache reset) or HF; verl's sleep/offload of the idle engine is not done.
  7. (none: the code's two discounts are --gamma, the outcome's verifier_gamma, and --process_gamma, the process
     rewards' reward_model_gamma, both 1 in its run script; each source is discounted on its own, then summed.
     The script's reward_model.rm_coef 5 scales only the summed token_level_scores, which the code's RLOO does
     not read: the normalised process rewards enter the advantages at weight 1, as here.)
The code's other reference, --ref_type policy (q_t against the policy's old logprobs), holds no reference
model; its saved verifier takes the final policy as reference. Not in the code, off by default: --prm_epochs,
--prm_warmup (PRM rewards left out for N steps), and the toy's controls, q_t replaced by the exact checker's
token rewards (`oracle_rewards`), the rest unchanged: --process_rewards oracle (-1 on the last token of the
first wrong step; at process gamma 1 its return-to-go puts the same -1 on every earlier token, so it telescopes
into the outcome minus a state baseline: the "telescoping" control of --compare) and oracle_step (-1 on every
token of the first wrong step; at --process_gamma 0 the credit stays on that step: the "exact" control).

    python prime.py                                                  # toy world on CPU
    python prime.py --compare                                        # PRIME, RLOO and the controls; 3 seeds
    torchrun --nproc_per_node 8 prime.py --model Eurus-2-7B-SFT --data train.jsonl --bf16
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.data import build_prompt, load_problems, read_jsonl, split_steps, step_spans
from utils.generation import load_backend, vllm_available
from utils.grader import grade
from utils.train import (MetricsLog, all_reduce, close_dist, full_state, load_optimizer, run_main, seed_all, setup_dist,
                         shard, token_logprobs, unwrap, write_json)
from utils.verifiers import read_meta


@dataclass
class Args:
    # model and data
    model: str = field(default="", metadata={"help": "SFT policy: the init of the policy, the PRM and the reference; "
                                                     "empty: the toy policy"})
    data: str = field(default="", metadata={"help": "training prompts JSONL {problem, answer} (default: toy train)"})
    eval_data: str = field(default="", metadata={"help": "test problems JSONL (default: toy test)"})
    n_eval_problems: int = field(default=500, metadata={"help": "test problems evaluated (0: all)"})
    toy_dir: str = field(default="", metadata={"help": "toy world dir (default: built/cached by utils.toy)"})
    chat: bool = field(default=False, metadata={"help": "prompt with the tokenizer's chat template"})
    # rollouts
    prompts_per_step: int = field(default=256, metadata={"help": "prompts per RL step after the filter (paper: 256)"})
    k: int = field(default=4, metadata={"help": "rollouts per prompt (paper: 4)"})
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature (paper: 1.0)"})
    max_new_tokens: int = field(default=3072, metadata={"help": "max response tokens (paper: 3072)"})
    filter_low: float = field(default=0.2, metadata={"help": "keep prompts with mean accuracy >= this (paper: 0.2)"})
    filter_high: float = field(default=0.8, metadata={"help": "... and <= this (paper: 0.8)"})
    max_rounds: int = field(default=8, metadata={"help": "sampling rounds per step to fill the batch (deviation 5)"})
    backend: str = field(default="auto", metadata={"help": "rollouts: auto (vLLM on GPU when installed, else HF) | vllm | hf"})
    vllm_memory: float = field(default=0.4, metadata={"help": "vLLM gpu_memory_utilization per rank, beside training "
                                                              "(the code: 0.7, with the trainer's states offloaded)"})
    # implicit PRM
    beta: float = field(default=0.05, metadata={"help": "beta of the PRM loss (paper: 0.05)"})
    prm_lr: float = field(default=1e-6, metadata={"help": "PRM AdamW lr, constant (code: 1e-6)"})
    prm_grad_clip: float = field(default=10.0, metadata={"help": "PRM grad-norm clip (code: 10)"})
    process_rewards: str = field(default="implicit", metadata={"help": "implicit (the PRM's q_t) | none (outcome-only RLOO) "
                                                                     "| oracle (toy: the checker's -1 on the last token of the "
                                                                     "first wrong step) | oracle_step (toy: -1 on its every token)"})
    ref_type: str = field(default="freeze", metadata={"help": "the PRM's reference: freeze (the SFT policy; code default) "
                                                            "| policy (the policy's old logprobs; no reference held)"})
    prm_update: bool = field(default=True, metadata={"help": "update the PRM online (false: a frozen PRM)"})
    prm_init: str = field(default="", metadata={"help": "the PRM and its reference from an implicit verifier dir (a "
                                                       "prime.py run's prm/; the paper's frozen baseline: EurusPRM) or "
                                                       "an LM dir with the policy's tokenizer; empty: the SFT policy"})
    rescore: bool = field(default=False, metadata={"help": "take process rewards from a second forward after the PRM "
                                                           "update (paper B.2 'double forward'; default single)"})
    prm_epochs: int = field(default=1, metadata={"help": "PRM passes over each batch (code: 1); the rewards come "
                                                        "from the first pass's forward"})
    prm_warmup: int = field(default=0, metadata={"help": "RL steps that train the PRM but leave its rewards out of the "
                                                        "advantages (code: 0)"})
    # policy
    lr: float = field(default=5e-7, metadata={"help": "policy AdamW lr, constant after the warm-up (paper: 5e-7)"})
    warmup_steps: int = field(default=0, metadata={"help": "RL steps of linear policy-lr warm-up, lr * (step + 1) / N "
                                                         "(verl's lr_warmup_steps_ratio: 0 in PRIME's script)"})
    weight_decay: float = field(default=0.01, metadata={"help": "policy AdamW weight decay (verl default 0.01)"})
    grad_clip: float = field(default=1.0, metadata={"help": "policy grad-norm clip (code: 1.0)"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip epsilon (paper: 0.2)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each batch (paper: 1)"})
    mini_batches: int = field(default=4, metadata={"help": "optimizer steps per pass, for the policy and the PRM (code: 4)"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward (memory; deviation 3)"})
    gamma: float = field(default=1.0, metadata={"help": "discount of the outcome's return (code: verifier_gamma 1.0)"})
    process_gamma: float = field(default=1.0, metadata={"help": "discount of the process rewards' return (code: "
                                                              "reward_model_gamma 1.0; 0: each token its own reward)"})
    global_norm: bool = field(default=False, metadata={"help": "torchrun: normalise process rewards by the whole batch's "
                                                             "max |return-to-go| (the code: each rank its own; deviation 2)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 compute on GPU, fp32 master weights (as the code)"})
    shard: str = field(default="fsdp", metadata={"help": "torchrun: fsdp (FSDP2 over policy, PRM, reference) | ddp"})
    # run
    steps: int = field(default=592, metadata={"help": "RL steps (paper: 592)"})
    eval_every: int = field(default=16, metadata={"help": "test accuracy every N steps (paper: 16)"})
    save_every: int = field(default=16, metadata={"help": "checkpoint every N steps (paper: 16); --resume restarts there"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint"})
    compare: bool = field(default=False, metadata={"help": "run --compare_methods for every --seeds; print the curves"})
    compare_methods: str = field(default="rloo,prime,prime_gamma0,frozen_prm", metadata={
        "help": "rows of --compare (METHODS): rloo, prime, prime_gamma0 (PRIME at process gamma 0), frozen_prm (each "
                "seed's PRIME PRM, frozen), and on the toy telescoping (oracle) and exact (oracle_step, process gamma 0)"})
    compare_steps: int = field(default=0, metadata={"help": "RL steps of each --compare run (0: --steps)"})
    seeds: str = field(default="0,1,2", metadata={"help": "seeds of --compare"})
    out_dir: str = field(default="runs/prime", metadata={"help": "metrics.jsonl, results.json, checkpoint/, prm/"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, sampling and init"})


# Toy scale (the 0.28M-parameter toy policy on 2 CPU cores), applied when --model is empty. Policy lr 1e-4: at
# 3e-4 every method's greedy test accuracy fell below the SFT policy's (69.0 -> 65-67% for RLOO after 20 steps,
# 51% for PRIME at step 10) while T = 1 accuracy rose; a warm-up at 3e-4 did not help (docs/results/prime.md).
TOY = dict(prompts_per_step=32, max_new_tokens=160, backend="hf", prm_lr=6e-4, lr=1e-4, weight_decay=0.0,
           steps=60, eval_every=10, save_every=1, n_eval_problems=200, micro_batch=64, shard="ddp", compare_steps=20,
           compare_methods="rloo,prime,prime_gamma0,telescoping,exact")


# ----------------------------------------------------------------------------- the algorithm, piece by piece
def process_rewards(policy_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q_t = log pi_phi(y_t) - log pi_ref(y_t) on response tokens, 0 elsewhere. All (B, T)."""
    return (policy_logp - ref_logp) * mask  # implicit PRM, Eq. (3) without beta (beta only enters the loss)


def normalize_process_rewards(q: torch.Tensor, mask: torch.Tensor, max_abs: float | None = None) -> torch.Tensor:
    """q / (max over the batch of |return-to-go| + 1e-6): every process return-to-go is then <= 1, and beta
    cancels out (the code's `prime_norm: batch_norm`; `max_abs` is a precomputed global maximum)."""
    rtg = (q * mask).flip(-1).cumsum(-1).flip(-1)  # (B, T)
    m = (rtg.abs() * mask).max() if max_abs is None else max_abs
    return q / (m + 1e-6)


def prm_loss(q: torch.Tensor, mask: torch.Tensor, outcome: torch.Tensor, beta: float) -> torch.Tensor:
    """BCE(sigma(beta * sum_t q_t), outcome), mean over sequences (paper: L_CE, Eq. 4)."""
    return F.binary_cross_entropy_with_logits(beta * (q * mask).sum(-1), outcome.float())


def _masked_rloo(r: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The code's masked RLOO: per group of k rows, r_t * k/(k-1) - (sum_j mean_t r_j)/(k-1) on valid tokens.
    For a reward on the last token only this is r_i - mean_{j != i} r_j (Eq. 5's leave-one-out baseline)."""
    B = r.shape[0]
    mean = (r * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    base = mean.view(B // k, k).sum(-1, keepdim=True).expand(B // k, k).reshape(B, 1) / (k - 1)  # (B, 1)
    return (r * k / (k - 1) - base) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, stats: tuple | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens, var unbiased (verl's masked_whiten, mean shifted);
    `stats` = (mean, var) computed elsewhere (global statistics)."""
    if stats is None:
        n = mask.sum()
        mean = (x * mask).sum() / n
        var = (((x - mean) ** 2) * mask).sum() / n * (n / (n - 1))
    else:
        mean, var = stats
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def rloo_returns(outcome: torch.Tensor, process: torch.Tensor, mask: torch.Tensor, k: int, gamma: float = 1.0,
                 whiten_stats: tuple | None = None, process_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME's compute_rloo_returns + masked whitening. outcome (B,), process and mask (B, T); rows in groups
    of k. Each source is RLOO'd and discounted on its own (the outcome by gamma, the process rewards by
    process_gamma, default gamma), then the returns are summed. Returns (advantages, returns), both (B, T)."""
    last = mask.cumsum(-1) == mask.sum(-1, keepdim=True)  # (B, T): the last valid token
    last = last & mask.bool()
    r_out = torch.zeros_like(process)
    r_out[last] = outcome.float()[last.any(-1)]
    pg = gamma if process_gamma is None else process_gamma
    returns = (discounted_returns(_masked_rloo(r_out, last.float(), k) * mask, gamma) +  # Eq. (5), each source
               discounted_returns(_masked_rloo(process, mask, k) * mask, pg)) * mask
    return masked_whiten(returns, mask, whiten_stats), returns  # NOTE: the whitening is in the code, not the paper


def discounted_returns(reward: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = r_t + gamma * R_{t+1}, (B, T), by a reverse loop as the code does: never dividing by gamma^t, which
    underflows in float32 on long responses (0.95^3072 is 0, and every return would be NaN)."""
    if gamma == 1.0:
        return reward.flip(-1).cumsum(-1).flip(-1)
    if gamma == 0.0:
        return reward.clone()
    out, run = torch.zeros_like(reward), torch.zeros_like(reward[:, 0])
    for t in reversed(range(reward.shape[1])):
        run = reward[:, t] + gamma * run
        out[:, t] = run
    return out


def process_return_abs(p: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |process return-to-go| over the valid tokens (a log figure: how much the process rewards move)."""
    rtg = (p * mask).flip(-1).cumsum(-1).flip(-1)  # (B, T)
    return ((rtg.abs() * mask).sum() / mask.sum().clamp(min=1)).item()


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, eps: float):
    """PPO-clip: -min(rho A, clip(rho, 1-eps, 1+eps) A), token-mean per sequence, mean over sequences.
    Returns (loss, clipped fraction)."""
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    per_seq = -(surr * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # deviation 3
    clipped = (((ratio - 1).abs() > eps).float() * mask).sum() / mask.sum().clamp(min=1)
    return per_seq.mean(), clipped


def group_filter(acc: list[float], k: int, low: float, high: float) -> list[bool]:
    """Per prompt (k consecutive rollouts): keep iff low <= mean accuracy <= high (inclusive, as the code)."""
    return [low <= sum(acc[i: i + k]) / k <= high for i in range(0, len(acc), k)]


def pairwise_accuracy(score: torch.Tensor, outcome: torch.Tensor, k: int) -> float:
    """The code's `compute_dpo_accuracy`: per group, over pairs i < j with different outcomes, a hit when
    (s_i > s_j) == (o_i > o_j), weighted by |o_i - o_j| (so a tie in score is a hit when the wrong sample comes
    first, a miss otherwise); a group with no such pair counts 0.5; the mean over groups."""
    accs = []
    for g in range(0, len(score), k):
        s, o = score[g: g + k].tolist(), outcome[g: g + k].tolist()
        pairs = [(i, j) for i in range(len(s)) for j in range(i + 1, len(s))]
        w = sum(abs(o[i] - o[j]) for i, j in pairs)
        accs.append(sum(((s[i] - s[j] > 0) == (o[i] - o[j] > 0)) * abs(o[i] - o[j]) for i, j in pairs) / w if w else 0.5)
    return sum(accs) / len(accs) if accs else float("nan")


def oracle_rewards(problem: str, response_ids: list[int], tok, every_token: bool = False) -> list[float]:
    """The controls' exact token rewards (toy only): -1 on the last token (the separator) of the checker's first
    wrong step, 0 elsewhere: the change of the exact value (1 until a step is wrong, then 0: the toy's errors are
    never undone), which an implicit PRM's q_t estimates. every_token: -1 on each token of that step (for
    --process_gamma 0, where a token's process return is its own reward). Per-step correctness would pay for
    length."""
    from utils.toy import check_steps
    steps, ends = step_spans(tok, response_ids)
    r = [0.0] * len(response_ids)
    bad = check_steps(problem, steps).first_error if steps else -1
    if bad >= 0:
        start = (ends[bad - 1] if bad else 0) if every_token else ends[bad] - 1
        r[start: ends[bad]] = [-1.0] * (ends[bad] - start)
    return r


# ----------------------------------------------------------------------------- tensors from rollouts
def logprobs_of(model, batch: dict, rows: list[int], pad: int, device) -> torch.Tensor:
    """token_logprobs of the batch's rows, (len(rows), T) padded to the batch's longest response."""
    return token_logprobs(model, [batch["prompts"][i] for i in rows], [batch["responses"][i] for i in rows], pad, device,
                          width=batch["T"])[0]


def collect(gen, problems: list[dict], cursor: dict, buffer: list, args: Args, step: int, tok, dist,
            logprobs: bool = False) -> tuple:
    """Fill the step's batch as the code does (ray_trainer.py: get_from_buffer, add_to_buffer): the prompts
    carried over (up to a batch) go first with a round of fresh ones; K rollouts each, graded; rounds until
    prompts_per_step groups (this rank's share) pass the filter. The surplus passing prompts wait for the next
    step as prompts, to be sampled and filtered again. `logprobs`: keep the generator's (to check its weights)."""
    want = max(1, args.prompts_per_step // dist.world)
    kept, seen, rounds, n_rollouts, right, passed = [], 0, 0, 0, 0.0, 0
    carried = buffer[:want]
    del buffer[:want]
    while len(kept) < want and rounds < args.max_rounds:
        take, carried, fresh = carried, [], []
        while len(fresh) < want:  # this rank's slice of the epoch's shuffled order
            if cursor["pos"] >= len(cursor["order"]):
                cursor["epoch"] += 1
                cursor["order"] = _order(len(problems), args.seed + cursor["epoch"])
                cursor["pos"] = 0
            j = cursor["order"][cursor["pos"]]
            cursor["pos"] += 1
            if j % dist.world == dist.rank:
                fresh.append(problems[j])
        take = take + fresh
        prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in take]
        outs = gen.sample(prompts, n=args.k, temperature=args.temperature, max_tokens=args.max_new_tokens,
                          seed=args.seed * 100003 + step * 1009 + rounds * 7 + dist.rank, logprobs=logprobs)
        for p, pr, o in zip(take, prompts, outs):
            acc = [float(grade(s.text, str(p["answer"]))) for s in o]
            right += sum(acc)
            group = {"problem": p, "prompt": pr, "responses": [list(s.token_ids) for s in o], "acc": acc}
            if logprobs:
                group["gen_logp"] = [list(s.logprobs or []) for s in o]
            if group_filter(acc, args.k, args.filter_low, args.filter_high)[0]:
                kept.append(group)
                passed += 1
        seen += len(take)
        n_rollouts += len(take) * args.k
        rounds += 1
    buffer.extend(g["problem"] for g in kept[want:])  # carried into the next step: the prompts alone
    return kept[:want], {"rollout/acc": right / max(1, n_rollouts), "rollout/filtered_frac": 1 - passed / max(1, seen),
                         "rollout/rounds": rounds, "rollout/rollouts": n_rollouts}


def _micro(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i: i + size] for i in range(0, len(rows), size)]


def _order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ----------------------------------------------------------------------------- one RL step
def rl_step(policy, prm, ref, popt, ropt, groups: list[dict], args: Args, tok, dist, step: int = 0) -> dict:
    """PRM update (rewards from the same forward), advantages, PPO update. Returns the step's metrics."""
    dev, pad, k = dist.device, tok.pad_token_id or 0, args.k
    batch = {"prompts": [g["prompt"] for g in groups for _ in g["responses"]],
             "responses": [r for g in groups for r in g["responses"]]}
    batch["T"], batch["pad"] = max(1, max(len(r) for r in batch["responses"])), pad
    if all("gen_logp" in g for g in groups):
        batch["gen_logp"] = torch.tensor([lp + [0.0] * (batch["T"] - len(lp)) for g in groups for lp in g["gen_logp"]],
                                         device=dev)  # (B, T)
    B = len(batch["responses"])
    outcome = torch.tensor([a for g in groups for a in g["acc"]], device=dev)  # (B,)
    mask = torch.zeros((B, batch["T"]), device=dev)  # (B, T)
    for i, r in enumerate(batch["responses"]):
        mask[i, : len(r)] = 1
    rows = list(range(B))
    m = {}
    t = time.time()
    # 1. implicit PRM: q from the forward that is backpropagated ("single forward"); groups stay whole
    if args.process_rewards != "implicit":  # outcome-only RLOO (no PRM at all), or the exact checker's rewards
        q = torch.zeros((B, batch["T"]), device=dev)
        if args.process_rewards in ("oracle", "oracle_step"):
            for i, (g, r) in enumerate((g, r) for g in groups for r in g["responses"]):
                q[i, : len(r)] = torch.tensor(oracle_rewards(g["problem"]["problem"], r, tok,
                                                             args.process_rewards == "oracle_step"), device=dev)
            m["train/oracle_wrong_frac"] = (q.sum(-1) < 0).float().mean().item()  # solutions with a wrong step
        return _policy_step(policy, popt, batch, outcome, q, mask, args, dist, step, m)
    ref_model = ref if args.ref_type == "freeze" else policy  # "policy": the policy before this step's update
    q, ref_lp = torch.zeros((B, batch["T"]), device=dev), torch.zeros((B, batch["T"]), device=dev)
    # NOTE: the reference runs on exactly the PRM's micro-batches: PRM = reference then gives q = 0 to the bit
    # ("policy": these are the old logprobs, dp_prime.py's `ref_log_prob = data['old_log_probs']`)
    # (other batch shapes leave ~1e-7 of float noise, which the max-|return| normalisation would blow up)
    losses = []
    size = k * math.ceil(B / k / args.mini_batches)  # mini-batches in order, whole groups (the PRM's own batching)
    mbs = [rows[i: i + size] for i in range(0, B, size)]
    for epoch, mb in [(e, mb) for e in range(args.prm_epochs if args.prm_update else 1) for mb in mbs]:
        ropt.zero_grad(set_to_none=True)
        loss = 0.0
        for micro in _micro(mb, args.micro_batch):  # gradient accumulation: one backward per micro-batch
            if epoch == 0:
                with torch.no_grad():
                    ref_lp[micro] = logprobs_of(ref_model, batch, micro, pad, dev)
            with torch.set_grad_enabled(args.prm_update):
                lp = logprobs_of(prm, batch, micro, pad, dev)
                q_micro = process_rewards(lp, ref_lp[micro], mask[micro])
                part = prm_loss(q_micro, mask[micro], outcome[micro], args.beta) * len(micro) / len(mb)
            if args.prm_update:
                part.backward()
            if epoch == 0:
                q[micro] = q_micro.detach()  # the process rewards come from this same forward
            loss += part.item()
        if args.prm_update:
            torch.nn.utils.clip_grad_norm_(prm.parameters(), args.prm_grad_clip)
            ropt.step()
        if epoch == 0:
            losses.append(loss)  # the loss on the batch as it arrives, before the PRM has fitted it
    if args.rescore:  # double forward: rewards from the updated PRM, on the same micro-batches
        with torch.no_grad():
            for micro in _micro(rows, args.micro_batch):
                ref_lp[micro] = logprobs_of(ref_model, batch, micro, pad, dev)
                q[micro] = process_rewards(logprobs_of(prm, batch, micro, pad, dev), ref_lp[micro],
                                           mask[micro])
    seq = args.beta * q.sum(-1)
    m.update({"train/prm_loss": sum(losses) / len(losses), "train/prm_pairwise_acc": pairwise_accuracy(seq, outcome, k)})
    m["time/prm"] = time.time() - t
    return _policy_step(policy, popt, batch, outcome, q, mask, args, dist, step, m)


def _policy_step(policy, popt, batch: dict, outcome, q, mask, args: Args, dist, step: int, m: dict) -> dict:
    """Advantages from the outcome and the process rewards q, then the PPO update."""
    dev, pad, k, rows = dist.device, batch["pad"], args.k, list(range(len(batch["responses"])))
    # 2. advantages: normalised process rewards + outcome, RLOO each, summed; the code normalises on each rank
    # (the PRM worker) and whitens on the driver over the whole batch (deviation 2)
    t = time.time()
    if args.process_rewards != "none" and step >= args.prm_warmup:
        rtg = (q * mask).flip(-1).cumsum(-1).flip(-1)
        mx = all_reduce((rtg.abs() * mask).max().reshape(1), torch.distributed.ReduceOp.MAX, dist)[0] \
            if args.global_norm else None
        p = normalize_process_rewards(q, mask, mx)
    else:
        p = torch.zeros_like(q)
    adv, ret = rloo_returns(outcome, p, mask, k, args.gamma, process_gamma=args.process_gamma)
    if dist.on:  # whitened with the whole batch's mean and variance, as the driver does
        s = all_reduce(torch.stack([(ret * mask).sum(), (ret ** 2 * mask).sum(), mask.sum()]).double(),
                       torch.distributed.ReduceOp.SUM, dist)
        mean = s[0] / s[2]
        adv = masked_whiten(ret, mask, (mean.float(), ((s[1] / s[2] - mean ** 2) * s[2] / (s[2] - 1)).float()))
    m.update({"train/outcome_acc": outcome.mean().item(), "train/process_return_abs": process_return_abs(p, mask),
              "train/adv_mean": ((adv * mask).sum() / mask.sum()).item(), "train/return_std": ret[mask.bool()].std().item()})
    # 3. PPO-clip on old logprobs recomputed by the trained policy (not the generator's)
    with torch.no_grad():
        old = torch.cat([logprobs_of(policy, batch, mb, pad, dev) for mb in _micro(rows, args.micro_batch)])
    if "gen_logp" in batch:  # the generator's own weights (vLLM, FSDP's HF copy) vs the trained policy's
        m["rollout/logprob_diff"] = (((old - batch["gen_logp"]).abs() * mask).sum() / mask.sum()).item()
    for g in popt.param_groups:  # linear warm-up over the first warmup_steps RL steps (stateless: resumes exactly)
        g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else args.lr
    clip_fracs, plosses = [], []
    for _ in range(args.ppo_epochs):
        order = rows[:]
        random.Random(args.seed * 7919 + step * 31 + len(plosses)).shuffle(order)  # a new order every step
        for i in range(args.mini_batches):
            mb = order[i::args.mini_batches]
            if not mb:
                continue
            popt.zero_grad(set_to_none=True)
            loss = cf = 0.0
            for micro in _micro(mb, args.micro_batch):  # gradient accumulation: one backward per micro-batch
                lp = logprobs_of(policy, batch, micro, pad, dev)
                part, c = ppo_loss(lp, old[micro], adv[micro], mask[micro], args.clip_eps)
                (part * len(micro) / len(mb)).backward()
                loss, cf = loss + part.item() * len(micro) / len(mb), cf + c.item() * len(micro) / len(mb)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            popt.step()
            plosses.append(loss)
            clip_fracs.append(cf)
    m.update({"train/policy_loss": sum(plosses) / len(plosses), "train/clip_frac": sum(clip_fracs) / len(clip_fracs),
              "time/policy": time.time() - t, "train/tokens": int(mask.sum().item()), "train/lr": popt.param_groups[0]["lr"]})
    return m


# ----------------------------------------------------------------------------- evaluation, checkpoints
def evaluate(gen, problems: list[dict], args: Args, tok, n_samples: int = 4) -> dict:
    """Test accuracy: greedy, and per sample at T = 1 (n_samples per problem). On toy problems also the
    greedy accuracy by number of operations and, greedy and sampled, how many solutions first go wrong by
    each error kind (utils.toy.first_error_kind: misread, slip, skip, operand, other-op, other)."""
    prompts = [tok.encode(build_prompt(p["problem"], tok, args.chat), add_special_tokens=False) for p in problems]
    greedy = gen.sample(prompts, n=1, temperature=0.0, max_tokens=args.max_new_tokens, logprobs=False)
    sampled = gen.sample(prompts, n=n_samples, temperature=1.0, max_tokens=args.max_new_tokens, seed=args.seed + 7,
                         logprobs=False)
    g = [grade(o[0].text, str(p["answer"])) for p, o in zip(problems, greedy)]
    s = [grade(c.text, str(p["answer"])) for p, o in zip(problems, sampled) for c in o]
    res = {"greedy_acc": sum(g) / len(g), "sample_acc": sum(s) / len(s)}
    if all("ops" in p for p in problems):  # the toy world: its exact checker
        from utils.toy import first_error_kind
        by_ops: dict = {}
        for p, ok in zip(problems, g):
            by_ops.setdefault(str(len(p["ops"])), []).append(ok)
        res["greedy_acc_by_ops"] = {n: sum(v) / len(v) for n, v in sorted(by_ops.items())}
        for name, outs in (("greedy", greedy), ("sample", sampled)):
            kinds = [first_error_kind(p["problem"], split_steps(c.text) or [c.text]) for p, o in zip(problems, outs)
                     for c in o]
            res[f"{name}_first_errors"] = {k: kinds.count(k) / len(kinds) for k in sorted(set(kinds)) if k != "none"}
    return res


def save_state(out: Path, step: int, policy, prm, popt, ropt, cursor: dict, buffer: list, extra: dict, dist,
               fsdp: bool = False) -> None:
    """out/checkpoint/state.pt, written by rank 0 and replaced atomically: a kill at any moment leaves the
    previous one whole. Every rank calls it (FSDP gathers the shards)."""
    (pol, popt_sd), (rm, ropt_sd) = full_state(policy, popt, fsdp), full_state(prm, ropt, fsdp)
    if not dist.main:
        return
    d = out / "checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "policy": pol, "prm": rm, "popt": popt_sd, "ropt": ropt_sd, "cursor": cursor,
                "buffer": buffer, "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, **extra},
               d / "state.pt.tmp")
    os.replace(d / "state.pt.tmp", d / "state.pt")


def save_verifier(out: Path, prm, ref, tok, args: Args, states: tuple[dict, dict]) -> Path:
    """The trained implicit PRM as a verifier dir (kind `implicit`), its reference inside it; `states` are
    their whole state dicts (full_state)."""
    d = out / "prm"
    unwrap(prm).save_pretrained(d, state_dict=states[0])
    tok.save_pretrained(d)
    unwrap(ref).save_pretrained(d / "reference", state_dict=states[1])
    write_json(d / "verifier.json", {"kind": "implicit", "beta": args.beta, "reference": "reference",
                                     "chat": args.chat, "step_tag": "\n\n"})
    return d


# ----------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    if args.compare:
        return compare(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    dist = setup_dist()
    seed_all(args.seed)
    out = Path(args.out_dir)
    toy = not args.model
    if toy:
        from utils.toy import ensure_toy
        tdir = Path(args.toy_dir) if args.toy_dir else ensure_toy()
        args.model = str(tdir / "policy")
        args.data, args.eval_data = args.data or str(tdir / "train.jsonl"), args.eval_data or str(tdir / "test.jsonl")
    if not (args.k >= 2 and 0 <= args.filter_low <= args.filter_high <= 1 and args.mini_batches >= 1):
        raise ValueError("--k must be >= 2, 0 <= --filter_low <= --filter_high <= 1, --mini_batches >= 1")
    if args.process_rewards not in ("implicit", "none", "oracle", "oracle_step") or args.ref_type not in ("freeze", "policy"):
        raise ValueError("--process_rewards implicit|none|oracle|oracle_step, --ref_type freeze|policy")
    if args.process_rewards.startswith("oracle") and not toy:
        raise ValueError(f"--process_rewards {args.process_rewards} needs the toy world's checker (leave --model empty)")
    problems = load_problems(args.data)
    test = load_problems(args.eval_data, args.n_eval_problems or None) if args.eval_data else []
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(args))
    dev, fsdp = dist.device, dist.on and args.shard == "fsdp"
    bf16 = args.bf16 and dev.type == "cuda"  # fp32 master weights, bf16 compute (FSDP mixed precision or autocast)
    if args.shard not in ("fsdp", "ddp"):
        raise ValueError(f"--shard must be fsdp or ddp, not {args.shard!r}")
    tok = AutoTokenizer.from_pretrained(args.model)
    cursor, buffer, start, results, st = {"epoch": 0, "pos": 0, "order": _order(len(problems), args.seed)}, [], 0, {}, None
    ckpt = out / "checkpoint" / "state.pt"
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        cursor, buffer, start, results = st["cursor"], st["buffer"], st["step"], st["results"]
        random.setstate(st["rng"]["python"])
        torch.set_rng_state(st["rng"]["torch"])
        if dist.main and (out / "metrics.jsonl").exists():  # drop rows logged after the checkpoint
            rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] <= start]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = []
    src = {"policy": args.model, "prm": args.model, "reference": args.model}
    if args.prm_init and (Path(args.prm_init) / "verifier.json").exists():
        meta = read_meta(args.prm_init)
        if meta.get("kind") != "implicit":
            raise ValueError(f"--prm_init {args.prm_init}: not an implicit verifier dir (kind {meta.get('kind')!r})")
        ref_dir = Path(meta["reference"])
        src.update(prm=args.prm_init, reference=str(ref_dir if ref_dir.is_absolute() else Path(args.prm_init) / ref_dir))
    elif args.prm_init:  # a causal LM with the policy's tokenizer (a larger one): the PRM and its reference from it
        if not (Path(args.prm_init) / "config.json").exists() or \
                AutoTokenizer.from_pretrained(args.prm_init).get_vocab() != tok.get_vocab():
            raise ValueError(f"--prm_init {args.prm_init}: not an implicit verifier dir nor an LM with the policy's tokenizer")
        src.update(prm=args.prm_init, reference=args.prm_init)
    names = ("policy", "prm") + (("reference",) if args.ref_type == "freeze" else ())  # "policy": no reference held
    for name in names:  # one at a time: a rank holds one whole model at most
        m = AutoModelForCausalLM.from_pretrained(src[name], dtype=torch.float32)  # fp32 master weights
        if st is not None and name in st:
            m.load_state_dict(st[name])
        if name == "reference":
            m.requires_grad_(False).eval()
        models.append(shard(m if fsdp else m.to(dev), args.shard, dist, bf16, train=name != "reference"))
    policy, prm, ref = models + [None] * (3 - len(models))  # FSDP moves each rank's shards to its device itself
    backend = args.backend if args.backend != "auto" else "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    if backend == "vllm":  # its own copy of the weights, pushed after every update
        gen = load_backend(args.model, backend="vllm", gpu_memory_utilization=args.vllm_memory)
    elif fsdp:  # an unsharded HF copy on each rank, synced like vLLM's
        gen = load_backend(args.model, backend="hf", tokenizer=tok, device=dev)
    else:  # HF samples with the policy module itself: nothing to sync
        gen = load_backend(args.model, backend="hf", model=unwrap(policy), tokenizer=tok, device=dev)
    own_copy = backend == "vllm" or fsdp  # the generator holds its own weights, synced after every update
    if start and own_copy:  # a resumed policy into the generator's copy
        gen.update_weights(unwrap(policy))
    popt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ropt = torch.optim.AdamW(prm.parameters(), lr=args.prm_lr, weight_decay=0.0)
    if st is not None:
        load_optimizer(policy, popt, st["popt"], fsdp)
        load_optimizer(prm, ropt, st["ropt"], fsdp)
        del st
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and not fsdp else contextlib.nullcontext
    log = MetricsLog(out, enabled=dist.main)
    if dist.main and "sft/greedy_acc" not in results and test:
        with amp():
            results.update({f"sft/{k}": v for k, v in evaluate(gen, test, args, tok).items()})
        print(f"SFT policy: greedy {100 * results['sft/greedy_acc']:.1f}%, T=1 {100 * results['sft/sample_acc']:.1f}%")
    rollouts = results.get("rollouts", 0)
    desc = {"implicit": "PRIME", "none": "RLOO", "oracle": "RLOO + the checker's last-token rewards",
            "oracle_step": "RLOO + the checker's step rewards"}[args.process_rewards]
    last_eval = None  # the evaluation of the last step, which is the final one
    bar = tqdm(range(start, args.steps), desc=desc, disable=not dist.main, initial=start, total=args.steps)
    for step in bar:
        t = time.time()
        unwrap(policy).eval()
        with amp():
            groups, m = collect(gen, problems, cursor, buffer, args, step, tok, dist, logprobs=own_copy)
        m["time/rollout"] = time.time() - t
        n = torch.tensor([len(groups)], device=dev)
        n = int(all_reduce(n, torch.distributed.ReduceOp.MIN, dist)[0]) if dist.on else len(groups)
        buffer[:0] = [g["problem"] for g in groups[n:]]  # every rank updates on as many groups (DDP); the rest's
        m["rollout/carried"] = len(buffer)  # prompts wait for the next step, to be sampled and filtered again
        rollouts += int(all_reduce(torch.tensor([m["rollout/rollouts"]], device=dev), torch.distributed.ReduceOp.SUM, dist)[0])
        if n:
            unwrap(policy).train()
            with amp():
                m.update(rl_step(policy, prm, ref, popt, ropt, groups[:n], args, tok, dist, step))
        t = time.time()
        gen.update_weights(unwrap(policy))  # vLLM / FSDP's HF copy (a no-op when HF samples with the policy)
        m["time/weight_sync"] = time.time() - t
        m["rollouts"] = rollouts
        m["train/reward"] = m.pop("rollout/acc")
        m["tokens_per_s"] = m.get("train/tokens", 0) / max(1e-9, sum(v for k, v in m.items() if k.startswith("time/")))
        if dist.main and test and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            unwrap(policy).eval()
            with amp():
                ev = evaluate(gen, test, args, tok)
            m.update({f"eval/{k}": v for k, v in ev.items()})
            last_eval = ev if step + 1 == args.steps else None
        if dist.main:
            log.log(step + 1, **m)
            bar.set_postfix(reward=f"{m['train/reward']:.3f}", prm_loss=f"{m.get('train/prm_loss', float('nan')):.3f}")
        results["rollouts"] = rollouts
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_state(out, step + 1, policy, prm, popt, ropt, cursor, buffer, {"results": results}, dist, fsdp)
    weights = [full_state(m, fsdp=fsdp)[0] for m in (policy, prm, ref) if m is not None]  # collectives under FSDP
    if dist.main:
        if test:
            unwrap(policy).eval()
            with amp():
                ev = last_eval or evaluate(gen, test, args, tok)  # the same policy, the same sampling seed
            results.update({f"final/{k}": v for k, v in ev.items()})
        results["wall_s"] = time.time() - t0
        unwrap(policy).save_pretrained(out / "policy", state_dict=weights[0])
        tok.save_pretrained(out / "policy")
        # ref_type "policy": the last policy stands as the saved verifier's reference
        save_verifier(out, prm, ref if ref is not None else policy, tok, args, (weights[1], weights[-1 if ref is not None else 0]))
        write_json(out / "results.json", results)
        print(json.dumps({k: v for k, v in results.items() if "/" in k}, indent=2))
    close_dist(dist)
    return results


# ----------------------------------------------------------------------------- --compare
METHODS = {"rloo": {"process_rewards": "none"}, "prime": {}, "prime_gamma0": {"process_gamma": 0.0},
           "frozen_prm": {"prm_update": False},
           # the toy's exact controls: the checker's -1 summed over every earlier token (telescoping), and on every
           # token of the first wrong step with nothing summed (exact)
           "telescoping": {"process_rewards": "oracle"},
           "exact": {"process_rewards": "oracle_step", "process_gamma": 0.0}}
CHECKER = ("telescoping", "exact")  # the toy world only


def smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1): i + 1]) / len(xs[max(0, i - w + 1): i + 1]) for i in range(len(xs))]


def rollouts_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first rollout count at which a (rollouts, smoothed reward) curve reaches target."""
    return next((r for r, v in curve if v >= target), None)


def compare(args: Args) -> dict:
    """--compare_methods (METHODS) on the same budget for every seed: learning curves, final test accuracy, the
    final T = 1 accuracy minus RLOO's per seed, how many rollouts each needs to reach RLOO's final smoothed
    training reward, and (with the exact control) the share of its gain over RLOO each row keeps. The frozen
    PRM is the one this seed's PRIME run trained (--prm_init: another); a frozen PRM that is still the SFT
    policy would give q = 0 exactly, i.e. RLOO itself."""
    out, seeds, res, curves = Path(args.out_dir), [int(s) for s in args.seeds.split(",")], {}, {}
    asked = [n for n in args.compare_methods.split(",") if n]
    if set(asked) - set(METHODS) or "rloo" not in asked:
        raise ValueError(f"--compare_methods {args.compare_methods!r}: a comma list of {', '.join(METHODS)}, with rloo")
    if args.model and set(asked) & set(CHECKER):
        print(f"--compare: {', '.join(n for n in asked if n in CHECKER)} need the toy world's checker; left out")
    methods = [n for n in METHODS if n in asked and (n not in CHECKER or not args.model)]  # prime before frozen_prm
    if "frozen_prm" in methods and "prime" not in methods and not args.prm_init:
        raise ValueError("--compare_methods frozen_prm freezes each seed's PRIME PRM: list prime too (or --prm_init)")
    args = replace(args, steps=args.compare_steps or args.steps)
    for name in methods:
        over = METHODS[name]
        for s in seeds:
            d = out / f"{name}_seed{s}"
            kw = dict(over)
            if name == "frozen_prm" and not args.prm_init:  # the PRM this seed's PRIME run trained, frozen
                kw["prm_init"] = str(out / f"prime_seed{s}" / "prm")
            done = (d / "results.json").exists() and len(read_jsonl(d / "metrics.jsonl")) >= args.steps
            r = json.loads((d / "results.json").read_text()) if done else \
                main(replace(args, compare=False, seed=s, out_dir=str(d), resume=True, **kw))  # a finished run is kept
            rows = read_jsonl(d / "metrics.jsonl")
            curves[name, s] = {
                "rollouts": [x["rollouts"] for x in rows], "reward": smooth([x["train/reward"] for x in rows]), "r": r,
                "step_s": [sum(v for k, v in x.items() if k.startswith("time/")) for x in rows],
                "eval": [(x["rollouts"], x["eval/greedy_acc"], x["eval/sample_acc"]) for x in rows if "eval/greedy_acc" in x]}
    target = sum(curves["rloo", s]["reward"][-1] for s in seeds) / len(seeds)
    table = ["| method | final smoothed reward | final greedy | final T=1 | rollouts to RLOO's final reward | s/step |",
             "|---|---|---|---|---|---|"]
    for name in methods:
        cs = [curves[name, s] for s in seeds]
        fin = [c["reward"][-1] for c in cs]
        need = [rollouts_to_reach(list(zip(c["rollouts"], c["reward"])), target) for c in cs]
        total = cs[0]["rollouts"][-1]
        for key in ("greedy_acc", "sample_acc"):
            vals = [c["r"][f"final/{key}"] for c in cs]
            res[f"{name}/final/{key}"] = sum(vals) / len(vals)
            res[f"{name}/final/{key}_seeds"] = vals
        res[f"{name}/final_smoothed_reward"] = sum(fin) / len(fin)
        res[f"{name}/rollouts_to_rloo_final_reward"] = need
        res[f"{name}/seconds_per_step"] = sum(sum(c["step_s"]) / len(c["step_s"]) for c in cs) / len(cs)
        ok = [total / x for x in need if x]
        res[f"{name}/sample_efficiency_vs_rloo"] = sum(ok) / len(ok) if len(ok) == len(need) else None
        table.append(f"| {name} | {_spread(fin)} | {_spread([c['r']['final/greedy_acc'] for c in cs], 100)} | "
                     f"{_spread([c['r']['final/sample_acc'] for c in cs], 100)} | {need} (of {total}) | "
                     f"{res[f'{name}/seconds_per_step']:.1f} |")
    for name in methods:  # T = 1 accuracy against RLOO's, per seed, and the share of the exact control's gain
        d = [curves[name, s]["r"]["final/sample_acc"] - curves["rloo", s]["r"]["final/sample_acc"] for s in seeds]
        res[f"{name}/final_sample_acc_minus_rloo"], res[f"{name}/final_sample_acc_minus_rloo_seeds"] = sum(d) / len(d), d
    if "exact" in methods:
        gain = res["exact/final_sample_acc_minus_rloo"]
        saved = lambda n: [1 - (x or curves[n, s]["rollouts"][-1]) / curves[n, s]["rollouts"][-1]  # noqa: E731
                           for s, x in zip(seeds, res[f"{n}/rollouts_to_rloo_final_reward"])]
        mean_saved = {n: sum(saved(n)) / len(seeds) for n in methods}  # share of each run's rollouts
        se = mean_saved["exact"] - mean_saved["rloo"]  # what the control saves beyond RLOO's own seeds
        for name in methods:  # None: the control gains nothing (or saves under 5% of the rollouts) to share
            res[f"{name}/share_of_exact_final"] = res[f"{name}/final_sample_acc_minus_rloo"] / gain if gain > 0 else None
            res[f"{name}/share_of_exact_rollouts_saved"] = (mean_saved[name] - mean_saved["rloo"]) / se if se >= 0.05 else None
    res["sft/greedy_acc"], res["sft/sample_acc"] = (curves["rloo", seeds[0]]["r"][f"sft/{k}"] for k in ("greedy_acc", "sample_acc"))
    if "prime" in methods:
        res["prime_cost_per_step_vs_rloo"] = res["prime/seconds_per_step"] / res["rloo/seconds_per_step"]
    curve = ["| rollouts | " + " | ".join(f"{n} reward / greedy" for n in methods) + " |", "|---|" + "---|" * len(methods)]
    for i, (r, _, _) in enumerate(curves["rloo", seeds[0]]["eval"]):
        cells = []
        for name in methods:
            ev = [curves[name, s]["eval"][i] for s in seeds if i < len(curves[name, s]["eval"])]
            rw = [dict(zip(curves[name, s]["rollouts"], curves[name, s]["reward"])).get(e[0]) for s, e in zip(seeds, ev)]
            cells.append(f"{_spread([x for x in rw if x is not None])} / {_spread([e[1] for e in ev], 100)}")
        curve.append(f"| {r} | " + " | ".join(cells) + " |")
    vs = ["| method | final T=1 minus RLOO, points (per seed) | share of the exact control's gain: final T=1 | "
          "... rollouts saved to RLOO's final reward |", "|---|---|---|---|"]
    for name in methods:
        vs.append(f"| {name} | {100 * res[f'{name}/final_sample_acc_minus_rloo']:+.1f} ("
                  + ", ".join(f"{100 * x:+.1f}" for x in res[f"{name}/final_sample_acc_minus_rloo_seeds"]) + ") | "
                  + " | ".join("-" if res.get(f"{name}/{k}") is None else f"{100 * res[f'{name}/{k}']:.0f}%"
                               for k in ("share_of_exact_final", "share_of_exact_rollouts_saved")) + " |")
    md = (f"RLOO's final smoothed training reward: {target:.3f} (mean of {len(seeds)} seeds)\n\n" + "\n".join(table) +
          "\n\n" + "\n".join(vs) +
          "\n\nlearning curves (mean ± half-range over seeds; reward smoothed over 10 steps)\n\n" + "\n".join(curve) + "\n")
    md += _error_tables(curves, seeds, res, methods)
    (out / "compare.md").write_text(md)
    write_json(out / "results.json", res)
    print(md)
    return res


def _error_tables(curves: dict, seeds: list[int], res: dict, methods: list[str]) -> str:
    """Toy runs: test accuracy by number of operations and the share of solutions whose first wrong step is of
    each kind, SFT beside each method's final policy (mean over seeds)."""
    sft = curves["rloo", seeds[0]]["r"]
    if "final/greedy_first_errors" not in sft:
        return ""
    cols = {"SFT": [{k[4:]: v for k, v in sft.items() if k.startswith("sft/")}]}
    cols.update({n: [{k[6:]: v for k, v in curves[n, s]["r"].items() if k.startswith("final/")} for s in seeds]
                 for n in methods})
    md = ""
    for key, title in (("greedy_acc_by_ops", "greedy test accuracy by operations in the problem"),
                       ("greedy_first_errors", "greedy test solutions whose first wrong step is a ..."),
                       ("sample_first_errors", "T = 1 test solutions whose first wrong step is a ...")):
        mean = {c: {k: sum(r[key].get(k, 0.0) for r in rs) / len(rs) for k in set().union(*(r[key] for r in rs))}
                for c, rs in cols.items()}
        for n in methods:
            res[f"{n}/final/{key}"] = mean[n]
        res[f"sft/{key}"] = mean["SFT"]
        rows = sorted(set().union(*mean.values()))
        md += (f"\n{title} (%)\n\n| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n" +
               "".join(f"| {k} | " + " | ".join(f"{100 * mean[c].get(k, 0.0):.1f}" for c in cols) + " |\n" for k in rows))
    return md


def _spread(xs: list[float], scale: float = 1.0) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    return f"{scale * m:.3g} ± {scale * (max(xs) - min(xs)) / 2:.2g}"


if __name__ == "__main__":
    run_main(main, Args, TOY)
