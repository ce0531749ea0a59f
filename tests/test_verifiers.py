"""utils/verifiers.py: encoding and heads, shared-prefix scoring, the oracle, the three public PRM formats
(each a tiny random model built in that format, scores checked against the format's own recipe written out
here), loading errors, and the aggregation / selection / ProcessBench rules by hand."""
import json
import random

import pytest
import torch

import utils.verifiers as V
from utils import toy
from utils.data import build_prompt


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_encode_appends_tags_at_token_level(tok):
    meta = V.PRM_DEFAULTS
    ids, tags = V.encode(tok, "What is 1+1?", ["1 + 1 = 2.", "The answer is \\boxed{2}."], meta)
    prompt = tok.encode(build_prompt("What is 1+1?"), add_special_tokens=False)
    s1, s2, sep = (tok.encode(x, add_special_tokens=False) for x in ("1 + 1 = 2.", "The answer is \\boxed{2}.", "\n\n"))
    assert ids == prompt + s1 + sep + s2 + sep
    assert tags == [len(prompt + s1 + sep) - 1, len(ids) - 1] and len(tags) == 2
    _, cut = V.encode(tok, "q", ["a" * 50, "b" * 50], meta, max_len=len(prompt) + 60)
    assert len(cut) == 1  # the step past max_len is dropped, not truncated mid-step


def test_lm2_head_is_two_way_softmax_at_tags(tiny_model_dir, tok):
    prm, _ = V.build_prm(str(tiny_model_dir), {"head": "lm2"})
    ids, tags = V.encode(tok, "q", ["x = 1", "y = 2"], V.PRM_DEFAULTS)
    x = torch.tensor([ids])
    with torch.no_grad():
        z = prm(x, torch.ones_like(x), torch.tensor([0, 0]), torch.tensor(tags))
        full = prm.model(input_ids=x).logits[0]  # (T, V)
    pos, neg = tok.encode("+", add_special_tokens=False)[0], tok.encode("-", add_special_tokens=False)[0]
    want = torch.softmax(full[tags][:, [pos, neg]], -1)[:, 0]
    assert torch.allclose(torch.sigmoid(z), want, atol=1e-5)
    with pytest.raises(ValueError):
        V.build_prm(str(tiny_model_dir), {"head": "lm2", "pos_token": "++"})  # label tokens must be single tokens


@pytest.mark.parametrize("head", ["lm2", "cls"])
def test_shared_prefix_scoring_matches_full_scoring(tiny_model_dir, head):
    """Beam siblings scored with their parent's prefix run once (KV cache copied per child) get the
    scores of scoring each solution whole; ragged parents, ragged children and an empty child included."""
    prm, tok = V.build_prm(str(tiny_model_dir), {"head": head})
    problems, steps, shared = [], [], []
    for p, parent, kids in [("Ann has 3 apples.", [], [["3 + 2 = 5"], ["3 * 2 = 6", "x"]]),
                            ("Bo has 12 pens and buys 4 more.", ["12 + 4 = 16", "then 16 - 1 = 15"],
                             [["ok"], ["The answer is \\boxed{15}."], [], ["a", "b", "c"]]),
                            ("Cy.", ["1"], [["2"]])]:
        for k in kids:
            problems.append(p), steps.append(parent + k), shared.append(len(parent))
    full = V.PRMVerifier(prm, tok, {"head": head}).score(problems, steps)
    for batch_tokens in (60, 10**6):  # one parent per chunk; all parents (ragged) in one chunk
        v = V.PRMVerifier(prm, tok, {"head": head}, batch_tokens=batch_tokens)
        part = v.score_shared(problems, steps, shared)
        assert [len(x) for x in part] == [len(x) for x in steps]
        assert max(abs(a - b) for u, w in zip(full, part) for a, b in zip(u, w)) < 1e-5
        assert v.tokens == sum(len(V.encode(tok, p, s, V.PRM_DEFAULTS, 4096)[0]) for p, s in zip(problems, steps))
    assert len({round(x, 6) for u in full for x in u}) > 3  # a random model: the scores differ


def test_oracle_scores_steps_before_the_first_error():
    rng = random.Random(0)
    o = V.load_verifier("oracle")
    seen = set()
    for _ in range(40):
        p = toy.make_problem(rng, 3)
        steps = toy.solve(p, rng, {"misread": 0.5, "slip": 0.3})
        fe = toy.check_steps(p["problem"], steps, p["answer"]).first_error
        s = o.score([p["problem"]], [steps])[0]
        assert s == [1.0 if fe == -1 or i < fe else 0.0 for i in range(len(steps))]
        seen.add(fe == -1)
    assert seen == {True, False} and o.tokens == 0


def test_implicit_kind_reads_the_cumulative_log_ratio(tiny_model_dir, tmp_path):
    """Kind implicit: sigma(beta * sum of log pi/pi_ref over the response up to each step's tag). With the
    PRM equal to its reference every score is exactly 0.5; otherwise it matches the sum written out here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tmp_path / "implicit"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for path in (d, d / "reference"):
        ref.save_pretrained(path)
        tok.save_pretrained(path)
    (d / "verifier.json").write_text(json.dumps({"kind": "implicit", "beta": 0.5, "reference": "reference"}))
    problem, steps = "Ann has 3 apples.", ["3 + 2 = 5", "The answer is \\boxed{5}."]
    assert V.load_verifier(str(d), device="cpu").score([problem], [steps])[0] == [0.5, 0.5]
    phi = _tiny_base(len(tok), seed=4)
    phi.save_pretrained(d)
    v = V.load_verifier(str(d), device="cpu")
    got = v.score([problem], [steps])[0]
    ids, tags = V.encode(tok, problem, steps, V.PRM_DEFAULTS)
    start = len(tok.encode(build_prompt(problem), add_special_tokens=False))
    x = torch.tensor([ids])
    with torch.no_grad():
        lr = [torch.log_softmax(m(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)
              for m in (phi, ref)]
    want = [torch.sigmoid(0.5 * (lr[0] - lr[1])[start - 1: t].sum()).item() for t in tags]
    assert got == pytest.approx(want, abs=1e-5) and abs(got[0] - 0.5) > 1e-3


# ----------------------------------------------------------------------------- public formats
def _tiny_base(vocab: int, seed: int):
    return toy.tiny_qwen2(vocab, hidden=64, layers=2, heads=2, seed=seed, init_std=0.2, max_len=512)


def test_qwen_prm_format(tmp_path):
    """Qwen2.5-Math-PRM: architectures Qwen2ForProcessRewardModel, `<extra_0>` a special token, weights
    model.* + score.0/score.2; scored without remote code. The model card's recipe: the chat template
    with the system prompt, assistant = steps joined by <extra_0> plus a trailing one, softmax(logits)[1]
    at every <extra_0>."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    d = tmp_path / "qwen_prm"
    t = toy.build_char_tokenizer(d)
    t.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    t.save_pretrained(d)
    lm = _tiny_base(len(t), seed=1)
    head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    torch.nn.init.normal_(head[2].weight, std=1.0)
    state = {f"model.{k}": v for k, v in lm.model.state_dict().items()}
    state.update({f"score.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    cfg = lm.config.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"], "num_labels": 2,
                                 "auto_map": {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}}
    (d / "config.json").write_text(json.dumps(cfg))
    assert V.detect_format(d) == "qwen-prm"
    v = V.load_verifier(str(d), device="cpu")
    problem, steps = "Ann has 3 apples and buys 2 more.", ["3 + 2 = 5", "The answer is \\boxed{5}."]
    got = v.score([problem], [steps])[0]

    tk = AutoTokenizer.from_pretrained(d)  # the card's recipe, written out
    msgs = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
            {"role": "user", "content": problem}, {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    ids = torch.tensor([tk.encode(tk.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)])
    with torch.no_grad():
        logits = head(lm.model(input_ids=ids).last_hidden_state)[0]  # (T, 2)
    at = ids[0] == tk.convert_tokens_to_ids("<extra_0>")
    want = torch.softmax(logits[at], -1)[:, 1].tolist()
    assert len(want) == 2 and got == pytest.approx(want, abs=1e-5)
    shifted = torch.softmax(logits[at.roll(-1)], -1)[:, 1].tolist()  # one token off: a different reading
    assert max(abs(a - b) for a, b in zip(got, shifted)) > 1e-3
    assert v.score_shared([problem] * 2, [steps, steps[:1] + ["x"]], [1, 1])[0] == pytest.approx(got, abs=1e-5)


def test_math_shepherd_format(tmp_path):
    """Math-Shepherd: a causal LM whose tokenizer has a single `ки` token; the model card's recipe:
    f"{question} {step 1} ки\\n{step 2} ки", the "+"/"-" logits at each ки, P(+) of their softmax."""
    d = tmp_path / "math-shepherd-tiny"  # detected by its name and its single-token ки
    t = toy.build_char_tokenizer(d)
    t.add_tokens(["ки"])
    t.save_pretrained(d)
    lm = _tiny_base(len(t), seed=2)
    lm.save_pretrained(d)
    assert V.detect_format(d) == "math-shepherd"
    v = V.load_verifier(str(d), device="cpu")
    problem, steps = "Bo has 12 pens.", ["12 + 4 = 16", "16 - 1 = 15", "The answer is: 15"]
    got = v.score([problem], [steps])[0]

    ids = torch.tensor([t.encode(f"{problem} {steps[0]} ки\n{steps[1]} ки\n{steps[2]} ки")])
    cand = [t.encode("+")[-1], t.encode("-")[-1]]
    with torch.no_grad():
        scores = lm(input_ids=ids).logits[:, :, cand].softmax(-1)[:, :, 0]
    want = scores[ids == t.encode("ки")[-1]].tolist()
    assert len(want) == 3 and got == pytest.approx(want, abs=1e-5)
    assert v.score_shared([problem], [steps], [2])[0] == pytest.approx(got, abs=1e-5)  # whole-text: rescored


def test_a_causal_lm_with_a_one_token_ki_is_not_guessed(tmp_path):
    """Llama-3's tokenizer has `ки` as one token too (search-and-learn's RLHFlow scorer relies on it): a causal
    LM is read as Math-Shepherd only when named so; otherwise its format must be given."""
    d = tmp_path / "Llama3.1-8B-PRM-Deepseek-Data"
    t = toy.build_char_tokenizer(d)
    t.add_tokens(["ки"])
    t.save_pretrained(d)
    _tiny_base(len(t), seed=2).save_pretrained(d)
    with pytest.raises(V.VerifierError, match="DIR:FORMAT"):
        V.load_verifier(str(d), device="cpu")
    assert V.load_verifier(f"{d}:math-shepherd", device="cpu").meta["text_format"] == "math-shepherd"
    assert V.load_verifier(f"{d}:rlhflow", device="cpu").meta["text_format"] == "rlhflow"
    with pytest.raises(V.VerifierError, match="step tags"):  # a step holding the tag: an error, not 0.5
        V.load_verifier(f"{d}:math-shepherd", device="cpu").score(["q"], [["a ки b", "c"]])


def _sentencepiece_like(d):
    """A Metaspace tokenizer with merged `▁ки`, `▁+`, `▁-` pieces and a BOS, as Mistral's SentencePiece has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:+-=*/\n{}\\") - {" "})
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "▁", "к", "и", "▁к", "▁ки", "▁+", "▁-"] + chars)}
    merges = [("▁", "к"), ("▁к", "и"), ("▁", "+"), ("▁", "-")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    t.save_pretrained(d)
    return t


def test_math_shepherd_format_with_a_sentencepiece_tokenizer(tmp_path):
    """`ки` and the label tokens are `▁`-prefixed pieces there: the card's recipe still finds every tag."""
    d = tmp_path / "math-shepherd-sp"
    t = _sentencepiece_like(d)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)  # a Llama config (Mistral's family): AutoTokenizer keeps the SentencePiece-style pieces
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(t), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    lm.save_pretrained(d)
    t = AutoTokenizer.from_pretrained(d)  # as the verifier loads it
    assert len(t.encode("ки", add_special_tokens=False)) == 1 and t.convert_ids_to_tokens(t.encode("+"))[-1] == "▁+"
    v = V.load_verifier(str(d), device="cpu")
    problem, steps = "Bo has 12 pens.", ["12 + 4 = 16", "16 - 1 = 15", "The answer is: 15"]
    got = v.score([problem], [steps])[0]
    ids = torch.tensor([t.encode(f"{problem} {steps[0]} ки\n{steps[1]} ки\n{steps[2]} ки")])
    assert ids[0, 0] == t.bos_token_id
    cand = [t.encode("+")[-1], t.encode("-")[-1]]
    with torch.no_grad():
        scores = lm(input_ids=ids).logits[:, :, cand].softmax(-1)[:, :, 0]
    want = scores[ids == t.encode("ки")[-1]].tolist()
    assert len(want) == 3 and got == pytest.approx(want, abs=1e-5)


def test_rlhflow_format(tmp_path):
    """RLHFlow's PRMs as search-and-learn scores them (its one-conversation-per-step reference, written out):
    user turns "{question} {step 1}", "{step 2}", ..., each answered "+"; P(+) of the +/- softmax at the
    position that predicts the last "+" (logits[-3] with a Llama-3-style template)."""
    d = tmp_path / "rlhflow"
    t = toy.build_char_tokenizer(d)
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t.save_pretrained(d)
    lm = _tiny_base(len(t), seed=6)
    lm.save_pretrained(d)
    v = V.load_verifier(f"{d}:rlhflow", device="cpu")
    problem, steps = "Di has 5 eggs.", ["5 * 3 = 15", "15 - 2 = 13", "The answer is \\boxed{13}."]
    got = v.score([problem], [steps])[0]
    cand = [t.encode("+")[-1], t.encode("-")[-1]]
    want, conv = [], []
    for k, s in enumerate(steps):
        conv += [{"content": problem + " " + s if k == 0 else s, "role": "user"}, {"content": "+", "role": "assistant"}]
        ids = torch.tensor([t.encode(t.apply_chat_template(conv, tokenize=False), add_special_tokens=False)])
        with torch.no_grad():
            want.append(lm(input_ids=ids).logits[:, -3, cand].softmax(-1)[0, 0].item())
    assert got == pytest.approx(want, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(got, got[1:])) > 1e-4  # per-step readings, not one value repeated


def test_trl_format(tmp_path):
    """TRL PRMTrainer checkpoint: token classification; [BOS] + prompt ids, then each step's ids followed
    by the separator's ids ("\\n"), softmax(logits)[1] at the separator's last token."""
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    d = tmp_path / "trl"
    t = toy.build_char_tokenizer(d)
    t.bos_token = "<|im_start|>"
    t.save_pretrained(d)
    cfg = _tiny_base(len(t), seed=3).config
    cfg.num_labels = 2
    torch.manual_seed(3)
    m = Qwen2ForTokenClassification(cfg).eval()  # eval: the head's dropout off, as the verifier runs it
    torch.nn.init.normal_(m.score.weight, std=1.0)
    m.save_pretrained(d)
    assert V.detect_format(d) == "trl"
    v = V.load_verifier(str(d), device="cpu")
    problem, steps = "Cy has 7 cards.", ["7 * 2 = 14", "The answer is \\boxed{14}."]
    got = v.score([problem], [steps])[0]

    tk = AutoTokenizer.from_pretrained(d)  # TRL's tokenize_row, written out
    ids, at = [tk.bos_token_id] + tk(problem, add_special_tokens=False)["input_ids"], []
    for s in steps:
        ids += tk(s, add_special_tokens=False)["input_ids"] + tk.encode("\n", add_special_tokens=False)
        at.append(len(ids) - 1)
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits[0]
    want = torch.softmax(logits[at], -1)[:, 1].tolist()
    assert got == pytest.approx(want, abs=1e-5) and ids[0] == tk.bos_token_id
    assert V.load_verifier(str(d), device="cpu", fmt="trl").score([problem], [steps])[0] == pytest.approx(got)
    # another separator (TRL's step_separator is not saved in config.json): verifier.json names the format
    (d / "verifier.json").write_text(json.dumps({"kind": "prm", "format": "trl", "step_tag": "\n\n"}))
    ids, at = [tk.bos_token_id] + tk(problem, add_special_tokens=False)["input_ids"], []
    for s in steps:
        ids += tk(s, add_special_tokens=False)["input_ids"] + tk.encode("\n\n", add_special_tokens=False)
        at.append(len(ids) - 1)
    with torch.no_grad():
        want2 = torch.softmax(m(input_ids=torch.tensor([ids])).logits[0][at], -1)[:, 1].tolist()
    assert V.load_verifier(str(d), device="cpu").score([problem], [steps])[0] == pytest.approx(want2, abs=1e-5)


def test_verifier_dirs_and_errors(tiny_model_dir, tmp_path):
    with pytest.raises(V.VerifierError, match="no verifier in"):
        V.load_verifier(str(tmp_path / "missing"))
    with pytest.raises(V.VerifierError, match="DIR:FORMAT"):  # a plain LM: no format to detect
        V.load_verifier(str(tiny_model_dir))
    with pytest.raises(V.VerifierError, match="unknown verifier format"):
        V.load_verifier(str(tiny_model_dir), fmt="nope")
    with pytest.raises(V.VerifierError, match="unknown verifier dtype"):
        V.load_verifier(str(tiny_model_dir) + ":trl", dtype="fp8")
    assert V.split_format("models/a:b:trl") == ("models/a:b", "trl") and V.split_format("d:x") == ("d:x", "")
    old = tmp_path / "old"  # a dir written by an earlier prm_train.py: prm.json, no kind
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(old)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(old)
    (old / "prm.json").write_text(json.dumps({"head": "lm2", "pos_token": "+", "neg_token": "-", "step_tag": "\n\n",
                                              "chat": False}))
    assert V.load_verifier(str(old)).kind == "prm"
    (old / "verifier.json").write_text(json.dumps({"kind": "telepathy"}))
    with pytest.raises(V.VerifierError, match="unknown verifier kind"):
        V.load_verifier(str(old))
    assert V.parse_verifiers("prm=a/b, orm=c,oracle") == {"prm": "a/b", "orm": "c", "oracle": "oracle"}
    with pytest.raises(V.VerifierError):
        V.parse_verifiers("x=a,x=b")


# ----------------------------------------------------------------------------- reading scores
def test_aggregations_by_hand():
    s = [0.9, 0.5, 0.8]
    assert V.aggregate(s, "last") == 0.8 and V.aggregate(s, "min") == 0.5
    assert abs(V.aggregate(s, "prod") - 0.36) < 1e-12 and abs(V.aggregate(s, "mean") - 2.2 / 3) < 1e-12
    with pytest.raises(ValueError):
        V.aggregate(s, "max")


def test_selection_rules():
    answers = ["3", "\\frac{6}{2}", "4", "4", "4", None]
    scores = [0.9, 0.8, 0.2, 0.3, 0.1, 0.99]
    g = V.AnswerGroups()
    assert V.majority(answers, g) == "4"  # 3 votes for 4, 2 for 3 (grouped by equivalence)
    assert V.best_of_n(answers, scores) == "3"  # highest score with an answer (None is skipped)
    assert V.weighted_vote(answers, scores, g) == "3"  # 1.7 for 3 vs 0.6 for 4
    assert V.majority([None, None], V.AnswerGroups()) is None


def test_processbench_f1_by_hand():
    # erroneous: labels 1, 2 (predicted 1, 0) -> 0.5; correct: 3 rows (predicted -1, -1, 0) -> 2/3
    r = V.processbench_f1([1, 0, -1, -1, 0], [1, 2, -1, -1, -1])
    assert r["acc_erroneous"] == 0.5 and abs(r["acc_correct"] - 2 / 3) < 1e-9
    assert abs(r["f1"] - 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)) < 1e-9
    assert V.first_error_prediction([0.9, 0.4, 0.2], 0.5) == 1 and V.first_error_prediction([0.9, 0.8], 0.5) == -1
