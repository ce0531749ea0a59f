import json

import pytest

from utils import data

SHARED = data.DATA_DIR


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b"\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:3: invalid JSON"):
        data.read_jsonl(p)
    p.write_text('{"problem": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:2: expected a JSON object"):
        data.read_jsonl(p)
    p.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl:2: missing field\(s\) \['answer'\]"):
        data.read_jsonl(p, required=("problem", "answer"))


def test_write_append_roundtrip(tmp_path):
    p = tmp_path / "sub" / "o.jsonl"
    data.write_jsonl(p, [{"a": 1}])
    data.write_jsonl(p, [{"b": "é"}], append=True)
    assert data.read_jsonl(p) == [{"a": 1}, {"b": "é"}]


def test_steps_split_join():
    text = "Step one.\n\nStep two.\n\n\n\nThe answer is 3."
    assert data.split_steps(text) == ["Step one.", "Step two.", "The answer is 3."]
    assert data.split_steps(data.join_steps(["a", "b"])) == ["a", "b"]


def test_prompts(tiny_model_dir):
    from transformers import AutoTokenizer

    assert data.build_prompt("What is 1+1?") == "Question: What is 1+1?\nAnswer:\n"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = data.build_prompt("What is 1+1?", tok, chat=True)
    assert data.SYSTEM_PROMPT in chat and chat.endswith("<|im_start|>assistant\n")


def test_real_benchmarks_load():
    """The benchmark files ship in data/ (a fresh clone needs nothing beside it); row counts per data/README.md."""
    assert SHARED == data.Path(data.__file__).resolve().parent.parent / "data" or "STEPWISE_DATA" in data.os.environ
    for name, n in [("math500", 500), ("gsm8k_test", 1319), ("aime24", 30), ("amc23", 40), ("minerva_math", 272),
                    ("olympiadbench", 675), ("college_math", 2818), ("math_test", 5000)]:
        rows = data.load_problems(name)
        assert len(rows) == n and all(r["problem"] and r["answer"] for r in rows)
    for split, n in [("gsm8k", 400), ("math", 1000), ("olympiadbench", 1000), ("omnimath", 1000)]:
        assert len(data.read_jsonl(data.resolve_data(f"processbench_{split}"), required=("steps", "label"))) == n
    readme = (SHARED / "README.md").read_text()
    for f in sorted(SHARED.glob("*.jsonl")):
        assert f"`{f.name}`" in readme, f"{f.name} is not described in data/README.md"


def test_processbench_converter():
    rows = data.read_jsonl(SHARED / "processbench_gsm8k.jsonl")
    for r in rows:
        s = data.from_processbench(r)
        if r["label"] == -1:
            assert s["completions"] == r["steps"] and all(s["labels"])
        else:
            assert len(s["labels"]) == r["label"] + 1 and s["labels"][-1] is False and all(s["labels"][:-1])


def test_prm800k_converter():
    rows = data.read_jsonl(SHARED / "prm800k_sample.jsonl")
    conv = [data.from_prm800k(r) for r in rows]
    assert all(c["prompt"] and len(c["completions"]) == len(c["labels"]) >= 1 for c in conv)
    assert any(c["labels"][-1] is False for c in conv)  # found_error records end on a negative step
    first = conv[0]  # hand-read: step 1 "Hey, you know Vieta's formulas, right?" rated +1
    assert first["completions"][0] == "Hey, you know Vieta's formulas, right?" and first["labels"][0] is True
    strict = [data.from_prm800k(r, neutral=False) for r in rows]
    assert sum(map(sum, (c["labels"] for c in strict))) <= sum(map(sum, (c["labels"] for c in conv)))


def test_math_shepherd_converter():
    row = {"input": "Janet has 3 eggs. How many? Step 1: 3 - 1 = 2 ки\nStep 2: 2 * 2 = 5 ки\nStep 3: The answer is: 5 ки",
           "label": "Janet has 3 eggs. How many? Step 1: 3 - 1 = 2 +\nStep 2: 2 * 2 = 5 -\nStep 3: The answer is: 5 -"}
    s = data.from_math_shepherd(row)
    assert s["prompt"] == "Janet has 3 eggs. How many?"
    assert s["completions"] == ["Step 1: 3 - 1 = 2", "Step 2: 2 * 2 = 5", "Step 3: The answer is: 5"]
    assert s["labels"] == [True, False, False]
    bad = {**row, "label": row["label"].replace("+", "?")}
    with pytest.raises(data.DataError, match="step 1"):
        data.from_math_shepherd(bad)


def test_first_error_truncate():
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "labels": [1.0, 0.75, 0.25, 1.0]}
    assert data.first_error_truncate(row) == {"prompt": "p", "completions": ["a", "b", "c"], "labels": [1.0, 0.75, 0.25]}
