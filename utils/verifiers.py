"""Verifiers: every kind of step scorer behind one interface, and the rules that read their scores.

A verifier is a directory, an HF model plus `verifier.json` ({"kind": ..., and what that kind needs}), or
the string "oracle" (the toy world's exact checker). `load_verifier(path_or_"oracle", device=...)` returns
an object with

    v.score(problems, steps_lists)                -> per-step scores in [0, 1], one forward pass per solution
    v.score_shared(problems, steps_lists, shared) -> the same scores; solutions whose first shared[i] steps
                                                     are equal (beam-search siblings) run that prefix once
    v.tokens                                      -> tokens scored so far (the verifier's compute)

Kinds (KINDS below; each method file that trains a verifier adds its kind here and nowhere else):
  prm     prm_train.py's PRM: a causal LM read at the step tag after each step, head `lm2` (logit of the
          positive minus the negative label token, Math-Shepherd/OpenR) or `cls` (token classification,
          TRL). An ORM is a prm trained on outcome labels.
  implicit  prime.py's implicit PRM: sigma(beta * log pi_phi/pi_ref summed up to the end of each step);
          verifier.json names beta and the reference model dir.
  ppm     ppm.py's process preference model (and its pqm / orm ablations): a scalar value head on a causal
          LM, read at the end of each step; score (tanh(raw / 5) + 1) / 2, `values()` gives tanh(raw / 5).
  pav     pav.py's process advantage verifier: value heads Q^pi and Q^mu (best-of-K of the policy) per
          prefix; a step's effective reward Q^pi + alpha * (Q^mu_h - Q^mu_{h-1}), `effective()` raw, `score`
          mapped to [0, 1]; pav.py's ORM is the same model with the one head q_pi.
  oracle  the toy checker: 1 for each step before the first wrong one, 0 from it on (an upper bound).
Public PRM formats load without a verifier.json: the format is detected where the config shows it, or
named with the dir, "DIR:FORMAT" (or `fmt`); a verifier.json {"format": NAME, ...} takes a format with
some of its settings changed (e.g. TRL's separator):
  qwen-prm       Qwen2.5-Math-PRM: chat template, `<extra_0>` after each step, a Linear-ReLU-Linear head on
                 the hidden state, P(correct) = softmax(...)[1] at each `<extra_0>`;
  math-shepherd  "{question} {step 1} ки\\n{step 2} ки...", P(+) of the 2-way softmax over the "+"/"-"
                 logits at each ки (the model card's recipe, whole text tokenized with BOS);
  rlhflow        RLHFlow's PRMs (search-and-learn's default): a chat of one user turn per step, each answered
                 "+"; P(+) of the "+"/"-" softmax where the assistant's "+" is predicted;
  trl            a TRL PRMTrainer checkpoint: [BOS] + prompt ids, then each step's ids + separator ids
                 ("\\n", TRL's default; `step_tag` in verifier.json), P(correct) = softmax(...)[1] at the
                 separator's last token.

Below the verifiers: step aggregation into one solution score, answer selection (majority, best-of-N,
weighted vote, answers grouped by the grader's equivalence) and ProcessBench's first-error reading.
"""
from __future__ import annotations

import functools
import json
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from utils.data import build_prompt
from utils.generation import kv_cache_kwargs
from utils.grader import is_equiv, normalize


class VerifierError(ValueError):
    """A verifier dir that cannot be loaded as asked (missing, unknown kind or format)."""


# What each public format's verifier.json would say (unset keys take PRM_DEFAULTS).
PRM_DEFAULTS = {"kind": "prm", "head": "lm2", "pos_token": "+", "neg_token": "-", "step_tag": "\n\n", "chat": False,
                "prompt_template": None, "bos": False, "text_format": "tokens"}
FORMATS = {
    "qwen-prm": {"head": "qwen", "step_tag": "<extra_0>", "chat": True},
    "math-shepherd": {"head": "lm2", "pos_token": "+", "neg_token": "-", "step_tag": "ки", "text_format": "math-shepherd"},
    "rlhflow": {"head": "lm2", "pos_token": "+", "neg_token": "-", "step_tag": "", "text_format": "rlhflow"},
    "trl": {"head": "cls", "step_tag": "\n", "prompt_template": "{problem}", "bos": True},
}


# ----------------------------------------------------------------------------- encoding
@functools.lru_cache(maxsize=1 << 16)
def _ids(tok, text: str) -> tuple:
    """tok.encode, memoized per tokenizer object (never changed after loading): a beam search rescores the
    same problems and parent steps at every depth."""
    return tuple(tok.encode(text, add_special_tokens=False))


def prompt_ids(tok, problem: str, meta: dict) -> list[int]:
    """The ids before the first step: build_prompt's plain or chat prompt, or meta's prompt_template."""
    tpl = meta.get("prompt_template")
    text = tpl.format(problem=problem) if tpl else build_prompt(problem, tok, meta.get("chat", False))
    bos = [tok.bos_token_id] if meta.get("bos") and tok.bos_token_id is not None else []
    return bos + list(_ids(tok, text))


def encode(tok, problem: str, steps: list[str], meta: dict, max_len: int = 2048) -> tuple[list[int], list[int]]:
    """(ids, tag positions): the prompt, then per step its ids + the tag's ids, appended at the token level
    (never by re-tokenizing a joined string); a step's score is read at its tag's last token. Steps past
    max_len are dropped. math-shepherd's text format tokenizes the whole text, as its model card does."""
    if meta.get("text_format") == "math-shepherd":
        tag = meta["step_tag"]
        ids = tok.encode(f"{problem} " + "".join(f"{s} {tag}\n" for s in steps).rstrip("\n"))
        tag_id = tok.encode(tag)[-1]
        tags = [i for i, t in enumerate(ids) if t == tag_id]
        if len(tags) != len(steps) and not (len(ids) > max_len and len(tags) < len(steps)):
            raise VerifierError(f"math-shepherd format: {len(tags)} step tags {tag!r} in the text of {len(steps)} steps "
                                f"(a step that contains the tag, or a tokenizer that merges it with its neighbours)")
        return ids[:max_len], [t for t in tags if t < max_len]
    if meta.get("text_format") == "rlhflow":
        return _rlhflow_encode(tok, problem, steps, meta, max_len)
    ids = prompt_ids(tok, problem, meta)
    tag, tags = list(_ids(tok, meta["step_tag"])), []
    for s in steps:
        nxt = ids + list(_ids(tok, s)) + tag
        if len(nxt) > max_len:
            break
        ids = nxt
        tags.append(len(ids) - 1)
    return ids, tags


def _rlhflow_encode(tok, problem: str, steps: list[str], meta: dict, max_len: int) -> tuple[list[int], list[int]]:
    """RLHFlow's PRMs as search-and-learn scores them: a chat with one user turn per step (the first is
    "{problem} {step 1}") each answered by an assistant "+"; a step's score is P("+") against "-" at the
    position that predicts its assistant turn's "+" (one forward over the whole chat)."""
    conv, tags = [], []
    for k, s in enumerate(steps):
        conv.append({"role": "user", "content": f"{problem} {s}" if k == 0 else s})
        tags.append(len(tok.encode(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                                   add_special_tokens=False)) - 1)
        conv.append({"role": "assistant", "content": meta["pos_token"]})
    ids = tok.encode(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
    plus = label_token_id(tok, meta["pos_token"], meta)
    if any(t + 1 >= len(ids) or ids[t + 1] != plus for t in tags):
        raise VerifierError("rlhflow format: the chat template does not put the assistant's '+' right after each "
                            "turn's generation prompt (not an RLHFlow PRM's template?)")
    return ids[:max_len], [t for t in tags if t < max_len]


def make_batches(examples: list[dict], batch_tokens: int, rng: random.Random, window: int = 256) -> list[list[dict]]:
    """Micro-batches of at most batch_tokens padded tokens: examples are shuffled, then sorted by length
    within windows of `window` (little padding, yet each batch a random mix of problems)."""
    order = examples[:]
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), window):
        cur = []
        for e in sorted(order[w: w + window], key=lambda e: len(e["ids"])):
            if cur and (len(cur) + 1) * len(e["ids"]) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(e)
        batches += [cur] if cur else []
    rng.shuffle(batches)
    return batches


def collate(batch: list[dict], pad_id: int, device):
    T = max(len(e["ids"]) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    tag_b, tag_t, target = [], [], []
    for r, e in enumerate(batch):
        ids[r, : len(e["ids"])] = torch.tensor(e["ids"])
        mask[r, : len(e["ids"])] = 1
        tag_b += [r] * len(e["tags"])
        tag_t += e["tags"]
        target += e.get("labels", [0.0] * len(e["tags"]))
    return (ids.to(device), mask.to(device), torch.tensor(tag_b, device=device), torch.tensor(tag_t, device=device),
            torch.tensor(target, dtype=torch.float, device=device))  # tags: (N,)


# ----------------------------------------------------------------------------- the PRM module
class PRM(torch.nn.Module):
    """Wraps an HF model; forward returns the logit of P(step correct) at each tag, shape (N,)."""

    def __init__(self, model, head: str, pos_id: int | None = None, neg_id: int | None = None):
        super().__init__()
        self.model, self.head, self.pos_id, self.neg_id = model, head, pos_id, neg_id

    def forward(self, ids, mask, tag_b, tag_t, cache=None, position_ids=None):
        """`cache` (a transformers Cache, filled in place) and `position_ids` let a caller run a shared
        prefix once and its continuations after it (score_shared); mask then spans both."""
        body = self.model if self.head == "cls" else self.model.model if self.head == "qwen" else self.model.base_model
        kw = dict(attention_mask=mask, position_ids=position_ids, **kv_cache_kwargs(body, cache))
        if self.head in ("cls", "qwen"):  # token classification: label 1 = correct
            logits = self.model(input_ids=ids, **kw).logits[tag_b, tag_t]  # (N, 2)
            return logits[:, 1] - logits[:, 0]
        h = self.model.base_model(input_ids=ids, **kw).last_hidden_state[tag_b, tag_t]  # (N, H)
        logits = self.model.get_output_embeddings()(h)  # (N, V): only at tags, not (B, T, V)
        return logits[:, self.pos_id] - logits[:, self.neg_id]  # 2-way softmax over (+, -) == sigmoid of this


class QwenPRMModel(torch.nn.Module):
    """Qwen2.5-Math-PRM's architecture without its remote code: the base transformer (`model.*` weights)
    and `score` = Linear(h, h) - ReLU - Linear(h, 2) (`score.0.*`, `score.2.*`) on every hidden state."""

    def __init__(self, base, hidden: int):
        super().__init__()
        self.model = base
        self.score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

    def forward(self, input_ids, **kw):  # kw: attention_mask, position_ids, the KV cache (named as the base takes it)
        h = self.model(input_ids=input_ids, **kw).last_hidden_state  # (B, T, H)
        return SimpleNamespace(logits=self.score(h.to(self.score[0].weight)))  # (B, T, 2): its dtype and device

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, **placed):
        from safetensors import safe_open
        from transformers import AutoModel
        from transformers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()  # the score.* weights are "unexpected" for the base: read below
        try:
            base = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=False, **placed)
        finally:
            logging.set_verbosity(level)
        m = cls(base, base.config.hidden_size)
        head = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                head.update({k[len("score."):]: st.get_tensor(k) for k in st.keys() if k.startswith("score.")})
        if set(head) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
            raise VerifierError(f"{path}: qwen-prm format needs score.0.* and score.2.* weights, found {sorted(head)}")
        m.score.load_state_dict(head)
        if placed:  # the head beside the last layer's output
            m.score.to(dtype=dtype, device=list(base.parameters())[-1].device)
            return m
        return m.to(dtype)


def label_token_id(tok, text: str, meta: dict) -> int:
    """The id of a label token: one token in this tokenizer (math-shepherd: the card's encode(text)[-1])."""
    if meta.get("text_format") in ("math-shepherd", "rlhflow"):  # as their scorers take them: encode(text)[-1]
        return tok.encode(text)[-1]
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"label token {text!r} is {len(ids)} tokens in this tokenizer; pick a single-token one")
    return ids[0]


def build_prm(path: str, meta: dict, dtype=torch.float32, device_map: str = ""):
    """(PRM, tokenizer) from an HF dir, initialised for the head in `meta` (prm_train.py fine-tunes this).
    device_map "auto": the weights spread over the visible GPUs as they load (a 72B PRM; needs accelerate)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    meta = {**PRM_DEFAULTS, **meta}
    tok = AutoTokenizer.from_pretrained(path)
    placed = {"device_map": device_map} if device_map else {}
    if device_map:
        try:
            import accelerate  # noqa: F401  (transformers places the weights with it)
        except ImportError:
            raise VerifierError("device_map needs the accelerate package (pip install accelerate)") from None
    if meta["head"] == "qwen":
        return PRM(QwenPRMModel.from_pretrained(path, dtype, **placed), "qwen"), tok
    if meta["head"] == "cls":
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=2, id2label={0: "incorrect", 1: "correct"}, label2id={"incorrect": 0, "correct": 1},
            dtype=dtype, **placed)
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return PRM(model, "cls"), tok
    if meta["head"] != "lm2":
        raise VerifierError(f"unknown head {meta['head']!r} (lm2, cls or qwen)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed)
    return PRM(model, "lm2", label_token_id(tok, meta["pos_token"], meta), label_token_id(tok, meta["neg_token"], meta)), tok


# ----------------------------------------------------------------------------- verifier kinds
class PRMVerifier:
    """Kind `prm` (and the public formats): per-step P(correct) from a PRM module."""
    kind = "prm"

    def __init__(self, prm: PRM, tok, meta: dict, batch_tokens: int = 16384, max_len: int = 4096):
        self.prm, self.tok, self.meta = prm.eval(), tok, {**PRM_DEFAULTS, **meta}
        self.batch_tokens, self.max_len, self.tokens = batch_tokens, max_len, 0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def encode(self, problem: str, steps: list[str]):
        return encode(self.tok, problem, steps, self.meta, self.max_len)

    @torch.no_grad()
    def score(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        """One forward pass per solution, batched by tokens. Steps that do not fit max_len get the last
        fitted step's score (so a list always matches its steps)."""
        dev = next(self.prm.parameters()).device
        ex = [dict(zip(("ids", "tags"), self.encode(p, s)), i=i) for i, (p, s) in enumerate(zip(problems, steps_lists))]
        self.tokens += sum(len(e["ids"]) for e in ex)
        out: list[list[float]] = [[] for _ in problems]
        batches = make_batches(ex, self.batch_tokens, random.Random(0))
        for batch in tqdm(batches, desc="verifier scoring", leave=False, disable=len(batches) < 50):
            ids, mask, tb, tt, _ = collate(batch, self.pad, dev)
            p = torch.sigmoid(self.prm(ids, mask, tb, tt).float()).tolist() if len(tt) else []
            k = 0
            for e in batch:
                out[e["i"]] = p[k: k + len(e["tags"])]
                k += len(e["tags"])
        return _pad_scores(out, steps_lists)

    @torch.no_grad()
    def score_shared(self, problems: list[str], steps_lists: list[list[str]], shared: list[int]) -> list[list[float]]:
        """score() for beam-search children: solutions whose first `shared[i]` steps are the same (siblings)
        run that prefix through the PRM once; its KV cache is copied to each sibling, which runs only its own
        new steps. Same scores and the same max_len cut; the verifier's counterpart of vLLM's prefix cache.
        (math-shepherd's whole-text tokenization has no stable prefix: it falls back to score().)"""
        from transformers import DynamicCache

        if self.meta["text_format"] != "tokens":
            return self.score(problems, steps_lists)
        groups = defaultdict(list)
        for i, (p, s, k) in enumerate(zip(problems, steps_lists, shared)):
            groups[(p, tuple(s[:k]))].append(i)
        items = []  # (parent ids, parent tags, [(i, new ids, new tags relative to the parent's end)])
        for (p, pre), idx in groups.items():
            pids, ptags = self.encode(p, list(pre))
            kids = []
            for i in idx:
                ids, tags = self.encode(p, steps_lists[i])
                self.tokens += len(ids)
                kids.append((i, ids[len(pids):], [t - len(pids) for t in tags[len(ptags):]]))
            items.append((pids, ptags, kids))
        items.sort(key=lambda it: len(it[0]))
        out, dev = [[] for _ in problems], next(self.prm.parameters()).device
        chunks, cost = [[]], 0
        for it in items:  # bound each chunk by its children's padded tokens
            c = len(it[2]) * (len(it[0]) + max(len(k[1]) for k in it[2]))
            if chunks[-1] and cost + c > self.batch_tokens:
                chunks, cost = chunks + [[]], 0
            chunks[-1].append(it)
            cost += c

        def padded(seqs, width):
            ids, mask = torch.full((len(seqs), width), self.pad), torch.zeros((len(seqs), width), dtype=torch.long)
            for r, x in enumerate(seqs):
                ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x, dtype=torch.long), 1
            return ids.to(dev), mask.to(dev)

        for chunk in chunks:
            ids, mask = padded([it[0] for it in chunk], max(len(it[0]) for it in chunk))  # parents: (P, Tp)
            tb = [g for g, it in enumerate(chunk) for _ in it[1]]
            cache = DynamicCache()
            lp = self.prm(ids, mask, torch.tensor(tb, dtype=torch.long),
                          torch.tensor([t for it in chunk for t in it[1]], dtype=torch.long), cache=cache)
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
            lc = self.prm(cids, torch.cat([mask[sel], cmask], 1),
                          torch.tensor([r for r, (_, kid) in enumerate(kids) for _ in kid[2]]),
                          torch.tensor([t for _, kid in kids for t in kid[2]], dtype=torch.long), cache=cache,
                          position_ids=pos)
            lc, k = torch.sigmoid(lc.float()).tolist(), 0
            for g, (i, _, tags) in kids:
                out[i] = p_scores[g] + lc[k: k + len(tags)]
                k += len(tags)
        return _pad_scores(out, steps_lists)


def _pad_scores(out: list[list[float]], steps_lists: list[list[str]]) -> list[list[float]]:
    """Steps past max_len repeat the last fitted score (0.5 when none fitted)."""
    return [(o + [o[-1] if o else 0.5] * len(s))[: len(s)] for o, s in zip(out, steps_lists)]


class OracleVerifier:
    """Kind `oracle` (toy world only): the exact checker's step labels as scores."""
    kind, tokens = "oracle", 0

    def score(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        from utils.toy import check_steps
        out = []
        for p, s in zip(problems, steps_lists):
            fe = check_steps(p, s).first_error
            out.append([float(fe == -1 or i < fe) for i in range(len(s))])
        return out

    def score_shared(self, problems, steps_lists, shared):
        return self.score(problems, steps_lists)


class ImplicitVerifier:
    """Kind `implicit` (prime.py): an implicit PRM (arXiv 2412.01981), a causal LM pi_phi trained so that
    beta * log pi_phi(y)/pi_ref(y) is the outcome reward. A step's score is sigma(beta * the log-ratio summed
    over every token up to the end of that step): sigma of the cumulative reward the implicit-PRM paper
    scores best-of-N with (so min aggregation picks the same step, and 0.5 means a cumulative reward of 0)."""
    kind = "implicit"

    def __init__(self, model, ref, tok, meta: dict, batch_tokens: int = 16384, max_len: int = 4096):
        self.model, self.ref, self.tok = model.eval(), ref.eval(), tok
        self.meta = {**PRM_DEFAULTS, **meta}
        self.beta, self.batch_tokens, self.max_len, self.tokens = float(self.meta["beta"]), batch_tokens, max_len, 0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.no_grad()
    def score(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        dev = next(self.model.parameters()).device
        ex = []
        for i, (p, s) in enumerate(zip(problems, steps_lists)):
            ids, tags = encode(self.tok, p, s, self.meta, self.max_len)
            ex.append({"ids": ids, "tags": tags, "i": i, "start": len(prompt_ids(self.tok, p, self.meta))})
        self.tokens += 2 * sum(len(e["ids"]) for e in ex)  # the PRM and its reference
        out: list[list[float]] = [[] for _ in problems]
        for batch in make_batches(ex, self.batch_tokens, random.Random(0)):
            ids, mask, _, _, _ = collate(batch, self.pad, dev)
            lr = []
            for m in (self.model, self.ref):
                logp = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                lr.append(logp.gather(-1, ids[:, 1:, None]).squeeze(-1))  # (B, T-1): log p of token t+1
            ratio = (lr[0] - lr[1]) * mask[:, 1:]
            for r, e in enumerate(batch):
                cum = ratio[r, e["start"] - 1:].cumsum(0)  # reward of the response tokens only
                out[e["i"]] = torch.sigmoid(self.beta * cum[[t - e["start"] for t in e["tags"]]]).tolist()
        return _pad_scores(out, steps_lists)

    def score_shared(self, problems, steps_lists, shared):
        return self.score(problems, steps_lists)


class ValueHeadLM(torch.nn.Module):
    """A causal LM's transformer with a linear head on the last hidden state (rStar-Math's PPM: one output;
    pav.py's PAV: one logit per value it predicts): dropout 0.1, then Linear(hidden, outputs) initialised near
    0 (weights N(5e-7, 1e-6), bias 1e-6, as rStar's code). forward returns the raw head at each (tag_b, tag_t)
    position: shape (N,) for one output, (N, outputs) for more."""

    def __init__(self, model, dropout: float = 0.1, outputs: int = 1):
        super().__init__()
        self.model = model
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(model.config.hidden_size, outputs)
        torch.nn.init.normal_(self.head.weight, mean=5e-7, std=1e-6)
        torch.nn.init.constant_(self.head.bias, 1e-6)

    def forward(self, ids, mask, tag_b, tag_t):
        h = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[tag_b, tag_t]  # (N, H)
        out = self.head(self.dropout(h.to(self.head.weight.dtype)))  # (N, outputs)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def save(self, path: str | Path, state_dict: dict | None = None) -> None:
        """The LM as an HF dir plus value_head.safetensors; state_dict: this module's whole state (e.g.
        gathered from FSDP shards by utils.train.full_state) in place of its own parameters."""
        from safetensors.torch import save_file
        sd = state_dict if state_dict is not None else self.state_dict()
        part = lambda pre: {k[len(pre):]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith(pre)}  # noqa: E731
        self.model.save_pretrained(path, state_dict=part("model."))
        save_file(part("head."), str(Path(path) / "value_head.safetensors"))

    @classmethod
    def load(cls, path: str | Path, dtype=torch.float32) -> "ValueHeadLM":
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        head = load_file(str(Path(path) / "value_head.safetensors"))
        m = cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype), outputs=head["weight"].shape[0])
        m.head.load_state_dict(head)
        return m.to(dtype)


class PPMVerifier:
    """Kind `ppm` (ppm.py: the PPM and its PQM / ORM ablations): a ValueHeadLM read at the last token of the
    prompt and each step; a step's value is tanh(raw / scale) in [-1, 1] (the code's inference rule, scale 5),
    its score (value + 1) / 2 in [0, 1]. verifier.json: objective, scale, prompt_template, step_tag ("")."""
    kind = "ppm"

    def __init__(self, model: ValueHeadLM, tok, meta: dict, batch_tokens: int = 16384, max_len: int = 4096):
        self.model, self.tok, self.meta = model.eval(), tok, {**PRM_DEFAULTS, "step_tag": "", **meta}
        self.scale, self.batch_tokens, self.max_len, self.tokens = float(self.meta.get("scale", 5.0)), batch_tokens, \
            max_len, 0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.no_grad()
    def step_values(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        dev = next(self.model.parameters()).device
        ex = [dict(zip(("ids", "tags"), encode(self.tok, p, s, self.meta, self.max_len)), i=i)
              for i, (p, s) in enumerate(zip(problems, steps_lists))]
        self.tokens += sum(len(e["ids"]) for e in ex)
        out: list[list[float]] = [[] for _ in problems]
        for batch in make_batches(ex, self.batch_tokens, random.Random(0)):
            ids, mask, tb, tt, _ = collate(batch, self.pad, dev)
            v = torch.tanh(self.model(ids, mask, tb, tt).float() / self.scale).tolist() if len(tt) else []
            k = 0
            for e in batch:
                out[e["i"]] = v[k: k + len(e["tags"])]
                k += len(e["tags"])
        return [(o + [o[-1] if o else 0.0] * len(s))[: len(s)] for o, s in zip(out, steps_lists)]

    def values(self, problems: list[str], steps_lists: list[list[str]]) -> list[float]:
        """The value of each whole prefix (its last step's): what MCTS initialises a new node with."""
        return [v[-1] if v else 0.0 for v in self.step_values(problems, steps_lists)]

    def score(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        return [[(x + 1) / 2 for x in v] for v in self.step_values(problems, steps_lists)]

    def score_shared(self, problems, steps_lists, shared):
        return self.score(problems, steps_lists)


def prefix_positions(tok, problem: str, steps: list[str], meta: dict, max_len: int = 4096) -> tuple[list[int], list[int]]:
    """(ids, positions): encode()'s ids, read at the prompt's last token (prefix 0, the question alone) and
    then at each step's tag (prefix h = the first h steps)."""
    ids, tags = encode(tok, problem, steps, meta, max_len)
    return ids, [len(prompt_ids(tok, problem, meta)) - 1] + tags


class PAVVerifier:
    """Kind `pav` (pav.py): a ValueHeadLM whose heads are logits of prefix values, read at the prompt's last
    token and at each step's tag; verifier.json names them (`heads`: "q_pi", the base policy's success
    probability, and "q_mu@K", best-of-K's) and sets `prover_k` and `alpha`. A step's effective reward is
    Q^pi_h + alpha * A^mu_h, with the progress A^mu_h = Q^mu_h - Q^mu_{h-1} (Q^mu_0: the question alone).
    `score` maps it to [0, 1] as (r + alpha) / (1 + 2 alpha) (same order); a dir with the one head "q_pi"
    (pav.py's ORM) scores sigma(q_pi). `alpha` and `prover_k` given to the loader override verifier.json's."""
    kind = "pav"

    def __init__(self, model: ValueHeadLM, tok, meta: dict, batch_tokens: int = 16384, max_len: int = 4096,
                 alpha: float | None = None, prover_k: int | None = None):
        self.model, self.tok, self.meta = model.eval(), tok, {**PRM_DEFAULTS, **meta}
        self.heads = list(self.meta["heads"])
        self.alpha = float(self.meta.get("alpha", 0.5) if alpha is None else alpha)
        self.prover_k = int(self.meta.get("prover_k", 4) if prover_k is None else prover_k)
        self.batch_tokens, self.max_len, self.tokens = batch_tokens, max_len, 0
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    @torch.no_grad()
    def prefix_values(self, problems: list[str], steps_lists: list[list[str]]) -> list[dict[str, list[float]]]:
        """Per solution, {head: [value of prefix 0, 1, ..., H]} (probabilities; prefixes past max_len repeat
        the last value that fit)."""
        dev = next(self.model.parameters()).device
        ex = [dict(zip(("ids", "tags"), prefix_positions(self.tok, p, s, self.meta, self.max_len)), i=i)
              for i, (p, s) in enumerate(zip(problems, steps_lists))]
        self.tokens += sum(len(e["ids"]) for e in ex)
        out: list[list] = [[] for _ in problems]
        for batch in make_batches(ex, self.batch_tokens, random.Random(0)):
            ids, mask, tb, tt, _ = collate(batch, self.pad, dev)
            v = torch.sigmoid(self.model(ids, mask, tb, tt).float()).reshape(len(tt), -1).tolist()  # (N, heads)
            k = 0
            for e in batch:
                out[e["i"]] = v[k: k + len(e["tags"])]
                k += len(e["tags"])
        return [{h: [r[j] for r in (o + o[-1:] * (len(s) + 1))[: len(s) + 1]] for j, h in enumerate(self.heads)}
                for o, s in zip(out, steps_lists)]

    def effective(self, problems: list[str], steps_lists: list[list[str]], alpha: float | None = None,
                  prover_k: int | None = None) -> list[list[float]]:
        """Per step h = 1..H: Q^pi_h + alpha * (Q^mu_h - Q^mu_{h-1})."""
        a = self.alpha if alpha is None else alpha
        mu = f"q_mu@{self.prover_k if prover_k is None else prover_k}"
        out = []
        for v in self.prefix_values(problems, steps_lists):
            q, m = v["q_pi"], v.get(mu)
            out.append([q[h] + (a * (m[h] - m[h - 1]) if m else 0.0) for h in range(1, len(q))])
        return out

    def score(self, problems: list[str], steps_lists: list[list[str]]) -> list[list[float]]:
        a = self.alpha if f"q_mu@{self.prover_k}" in self.heads else 0.0
        return [[(r + a) / (1 + 2 * a) for r in e] for e in self.effective(problems, steps_lists)]

    def score_shared(self, problems, steps_lists, shared):
        return self.score(problems, steps_lists)


def _load_pav_kind(path: Path, meta: dict, device, **kw) -> PAVVerifier:
    from transformers import AutoTokenizer
    return PAVVerifier(ValueHeadLM.load(path).to(device), AutoTokenizer.from_pretrained(str(path)), meta, **kw)


def _load_ppm_kind(path: Path, meta: dict, device, **kw) -> PPMVerifier:
    from transformers import AutoTokenizer
    return PPMVerifier(ValueHeadLM.load(path).to(device), AutoTokenizer.from_pretrained(str(path)), meta, **kw)


def _load_implicit_kind(path: Path, meta: dict, device, **kw) -> ImplicitVerifier:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = Path(meta["reference"])
    ref = ref if ref.is_absolute() else path / ref
    tok = AutoTokenizer.from_pretrained(str(path))
    model, ref_model = (AutoModelForCausalLM.from_pretrained(str(d)).to(device) for d in (path, ref))
    return ImplicitVerifier(model, ref_model, tok, meta, **kw)


def _load_prm_kind(path: Path, meta: dict, device, dtype=torch.float32, device_map: str = "", **kw) -> PRMVerifier:
    prm, tok = build_prm(str(path), meta, dtype, device_map=device_map)
    return PRMVerifier(prm if device_map else prm.to(device), tok, meta, **kw)


KINDS = {"prm": _load_prm_kind, "implicit": _load_implicit_kind, "ppm": _load_ppm_kind, "pav": _load_pav_kind}  # kind -> loader(path, meta, device, **options)


def detect_format(path: Path) -> str:
    """A public PRM format from config.json and the tokenizer (for dirs without verifier.json). Only what is
    unique to a format counts: Qwen's PRM architecture, TRL's token classification, and Math-Shepherd's
    dir name with its single-token `ки` (a Llama-3 tokenizer has one too, and RLHFlow's PRMs are plain
    causal LMs): any other causal LM needs its format named (`DIR:rlhflow`, `DIR:math-shepherd`)."""
    import sys
    cfg = json.loads((path / "config.json").read_text())
    arch = " ".join(cfg.get("architectures") or [])
    if "ProcessRewardModel" in arch:
        return "qwen-prm"
    if "TokenClassification" in arch:
        print(f"{path}: read as a TRL PRMTrainer checkpoint (step separator '\\n'; a checkpoint trained with "
              "train_on_last_step_only is an ORM: use --agg last; another separator: write verifier.json "
              '{"format": "trl", "step_tag": ...})', file=sys.stderr)
        return "trl"
    if "CausalLM" in arch and "math-shepherd" in path.resolve().name.lower():
        from transformers import AutoTokenizer
        if len(AutoTokenizer.from_pretrained(str(path)).encode("ки", add_special_tokens=False)) == 1:
            return "math-shepherd"
    raise VerifierError(f"{path}: no verifier.json, and config.json ({arch or 'no architectures'}) names no known PRM "
                        f"format: name it as DIR:FORMAT ({', '.join(FORMATS)})")


def read_meta(path: str | Path, fmt: str = "") -> dict:
    """What verifier.json says (prm_train.py's older prm.json dirs still load; {"format": NAME, ...} there
    takes a public format with its settings overridden, e.g. TRL's step separator), or a public format's."""
    p = Path(path)
    if not (p / "config.json").exists() and not (p / "verifier.json").exists():
        raise VerifierError(f"no verifier in {str(path)!r} (not a model dir; expected verifier.json or config.json)")
    if fmt:
        if fmt not in FORMATS:
            raise VerifierError(f"unknown verifier format {fmt!r} ({', '.join(FORMATS)})")
        return {**PRM_DEFAULTS, **FORMATS[fmt], "format": fmt}
    for name in ("verifier.json", "prm.json"):
        if (p / name).exists():
            meta = {**({"kind": "prm"} if name == "prm.json" else {}), **json.loads((p / name).read_text())}
            if meta.get("format"):
                if meta["format"] not in FORMATS:
                    raise VerifierError(f"{p / name}: unknown format {meta['format']!r} ({', '.join(FORMATS)})")
                meta = {**PRM_DEFAULTS, **FORMATS[meta["format"]], **meta}
            return meta
    f = detect_format(p)
    return {**PRM_DEFAULTS, **FORMATS[f], "format": f}


def split_format(path: str) -> tuple[str, str]:
    """"DIR:FORMAT" -> (DIR, FORMAT) when FORMAT is a public format's name; else (path, "")."""
    head, _, tail = path.rpartition(":")
    return (head, tail) if head and tail in FORMATS else (path, "")


def load_verifier(path: str, device=None, fmt: str = "", dtype: str = "auto", device_map: str = "", **kw):
    """A verifier dir (or "oracle"; "DIR:FORMAT" names a public format) -> an object with score /
    score_shared / tokens (see the docstring). dtype: auto (bfloat16 on CUDA, float32 on CPU) | bf16 |
    fp32; device_map "auto" spreads a large model over the visible GPUs (needs accelerate). `kw` go to the
    kind's loader (prm: batch_tokens, max_len)."""
    if path == "oracle":
        return OracleVerifier()
    path, fmt = split_format(path) if not fmt else (path, fmt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32, "bf16": torch.bfloat16,
              "fp32": torch.float32}
    if dtype not in dtypes:
        raise VerifierError(f"unknown verifier dtype {dtype!r} (auto, bf16, fp32)")
    meta = read_meta(path, fmt)
    if meta.get("kind") not in KINDS:
        raise VerifierError(f"{path}: unknown verifier kind {meta.get('kind')!r} ({', '.join(KINDS)})")
    if device_map and meta["kind"] != "prm":
        raise VerifierError(f"{path}: device_map is for PRM-kind verifiers (public PRMs), not kind {meta['kind']!r}")
    opts = {"dtype": dtypes[dtype], "device_map": device_map} if meta["kind"] == "prm" else {}
    return KINDS[meta["kind"]](Path(path), meta, device, **opts, **kw)


def parse_verifiers(spec: str) -> dict[str, str]:
    """"prm=DIR,orm=DIR,oracle" -> {"prm": DIR, "orm": DIR, "oracle": "oracle"} (names are unique)."""
    out = {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, path = item.partition("=")
        name, path = (name, path) if path else (Path(item).name or item, item)
        if name in out:
            raise VerifierError(f"verifier name {name!r} given twice in {spec!r}")
        out[name] = path
    return out


# ----------------------------------------------------------------------------- reading scores
def aggregate(scores: list[float], agg: str) -> float:
    """One solution score from its step scores: min, last, prod or mean."""
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


def auc(scores: list[float], labels: list[float]) -> float:
    """P(score of a right sample > score of a wrong one), ties half (the ROC AUC)."""
    import numpy as np
    s, y = np.asarray(scores, dtype=float), np.asarray(labels) > 0.5
    if y.all() or not y.any():
        return float("nan")
    ranks = np.empty(len(s))
    order = np.argsort(s, kind="mergesort")
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        ranks[s == v] = ranks[s == v].mean()
    return float((ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))


def first_error_prediction(scores: list[float], threshold: float) -> int:
    """ProcessBench's reading: the first step scored below the threshold, or -1."""
    return next((i for i, p in enumerate(scores) if p < threshold), -1)


def processbench_f1(preds: list[int], labels: list[int]) -> dict:
    """ProcessBench: accuracy on erroneous solutions (exact earliest-error index), on correct ones
    (predict -1), and their harmonic mean."""
    err = [p == y for p, y in zip(preds, labels) if y != -1]
    cor = [p == -1 for p, y in zip(preds, labels) if y == -1]
    a_err, a_cor = sum(err) / max(1, len(err)), sum(cor) / max(1, len(cor))
    f1 = 2 * a_err * a_cor / (a_err + a_cor) if a_err + a_cor else 0.0
    return {"f1": f1, "acc_erroneous": a_err, "acc_correct": a_cor, "n_erroneous": len(err), "n_correct": len(cor)}
