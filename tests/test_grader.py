"""Grader decisions: one test per normalisation rule, with near misses that must stay unequal."""
import json
import time

import pytest

from utils.data import DATA_DIR, read_jsonl
from utils.grader import extract_answer, grade, grade_batch, is_equiv

EQUAL = {
    "fractions": [("\\dfrac{1}{2}", "\\frac12"), ("\\tfrac{3}{4}", "0.75"), ("\\frac1{10}", "\\frac{1}{10}"), ("2/4", "0.5")],
    "left/right": [("\\left(1,2\\right)", "(1,2)"), ("\\left[0,1\\right)", "[0,1)")],
    "spaces": [("3 \\, 110", "3110"), ("x + 1", "x+1"), ("1\\!000", "1000")],
    "text units": [("5 \\text{ cm}", "5"), ("65 \\text{ children tickets }", "65"), ("166 \\, \\text{cm}^2", "166"),
                   ("12 dollars", "12"), ("4 square units", "4")],
    "degrees": [("30^\\circ", "30"), ("45^{\\circ}", "45"), ("90°", "90")],
    "percent": [("50\\%", "50"), ("50%", "0.5"), ("12.5\\%", "12.5")],
    "thousands": [("1,000", "1000"), ("3,\\!110,\\!400", "3110400"), ("1{,}234", "1234")],
    "x= prefix": [("x=5", "5"), ("k = \\frac{1}{2}", "0.5"), ("x+22", "f(x)=x+22")],
    "numbers": [("1.5e4", "15000"), ("1.5\\times10^{4}", "15000"), ("1\\frac{1}{2}", "\\frac{3}{2}"),
                ("0.\\overline{3}", "\\frac13"), (".5", "0.5"), ("+7", "7"), ("-\\frac{2}{3}", "-\\dfrac{2}{3}")],
    "symbolic": [("2\\sqrt{2}", "\\sqrt{8}"), ("\\pi/2", "\\frac{\\pi}{2}"), ("1-\\frac{1}{e}", "\\frac{e-1}{e}"),
                 ("(x+1)^2", "x^2+2x+1"), ("\\sqrt[3]{8}", "2"), ("y=2x+3", "y=3+2x")],
    "tuples/intervals": [("(1, 2)", "(1,2)"), ("[-1, 3)", "[-1,3)"), ("(-\\infty, 2) \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2)")],
    "sets": [("\\{1,2,3\\}", "\\{3,1,2\\}"), ("1, 2", "2, 1"), ("2 \\text{ and } 3", "3, 2")],
    "matrices": [("\\begin{pmatrix} \\frac{1}{5} \\\\ -\\frac{3}{5} \\end{pmatrix}", "\\begin{pmatrix} 1/5 \\\\ -3/5 \\end{pmatrix}")],
    "choices": [("\\text{(B)}", "B"), ("(C)", "C"), ("D", "(D)")],
    "infinity": [("\\infty", "∞"), ("(-\\infty,0]", "x \\le 0")],
    "pm": [("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}"), ("±1, ±7", "1,-1,7,-7")],
    "inequalities": [("x > 2", "(2, \\infty)"), ("x \\geq -1", "[-1,\\infty)"), ("2 < x \\le 5", "(2,5]")],
    "words": [("\\text{Monday}", "monday")],
    "function equations": [("f(y) = 1", "f(x)=1"), ("f(t)=t^2", "f(x) = x^2")],
    "assignments": [("(f(n), g(n)) = (n, 1)", "f(n)=n, g(n)=1"), ("b=2, a=1", "a=1,b=2"), ("(n, 1)", "f(n)=n, g(n)=1")],
    "sets of sets": [("\\{1, 2\\}, \\{-3\\}", "1,2,-3")],
    "quantifiers": [("\\frac{\\pi}{6} + k\\pi \\text{ for } k \\in \\mathbb{Z}", "\\frac{1}{6}\\pi+\\pi k"),
                    ("2\\pi n, where n is an integer", "2n\\pi")],
}
ONE_WAY = ("x= prefix", "choices", "assignments", "sets of sets")  # a gold-side form a prediction may drop
UNEQUAL = [("3", "3.5"), ("(1,2)", "[1,2]"), ("x^2", "2x"), ("1-\\frac{1}{e}", "1+\\frac{1}{e}"), ("\\{1,2\\}", "\\{1,3\\}"),
           ("1, 2", "1, 2, 3"), ("50\\%", "5"), ("\\sqrt{2}", "1.414"), ("A", "B"), ("(2,\\infty)", "x \\ge 2"),
           ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"), ("x=5", "x=6"), ("", "0"),
           ("\\frac{1}{2}", "\\frac{1}{3}"), ("10^{10^{10^{10}}}", "5"), ("monday", "tuesday"), ("1 \\pm 2", "3"),
           ("f(y)=2y", "f(x)=x"), ("(1, n)", "f(n)=n, g(n)=1"), ("a=1, b=3", "a=1, b=2"), ("\\{1,2\\},\\{3\\}", "1,2,4"),
           ("\\frac{\\pi}{6}+k\\pi", "\\frac{5\\pi}{6}+k\\pi")]


@pytest.mark.parametrize("rule", sorted(EQUAL))
def test_equal_rule(rule):
    for a, b in EQUAL[rule]:
        assert is_equiv(a, b), (rule, a, b)
        assert is_equiv(b, a) or rule in ONE_WAY, (rule, b, a)


@pytest.mark.parametrize("a,b", UNEQUAL)
def test_near_misses_stay_unequal(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_extract_answer_forms():
    cases = {
        "so $\\boxed{\\frac{1}{2}}$.": "\\frac{1}{2}",
        "\\boxed{\\{1, \\{2\\}\\}} then \\fbox{7}": "7",
        "The result is \\boxed 4 and done": "4",
        "Final Answer: The final answer is $5$. I hope it is correct.": "5",
        "Natalia sold 48 clips.\n#### 72": "72",
        "We get it. The answer is 3.5.": "3.5",
        "<think>so \\boxed{1}</think>\nThe answer is 2.": "2",
        "Thus the total is **8**.": "8",
        "So the function is: \\[f(x) = 1 - x.\\] It is injective, unlike \\(f(x)\\) before.": "f(x) = 1 - x",
        "The probability is approximately \\(1/3\\), for fixed \\(A\\) and \\(B\\).": "1/3",
        "He gets $7.00 in change. Verna pays $20.": "20",
        "Therefore, the value of \\(f(9)\\) is \\(33\\).": "33",
        "The solutions are \\(x = -1\\), \\(x = 2\\), and \\(x = -2\\).": "-2",
        "the answer is \\$15.": "15",
        "no answer here": None,
        "": None,
    }
    for text, want in cases.items():
        assert extract_answer(text) == want, text


def test_grade_spread_out_list_answers():
    text = "So the roots are:\n\nThe solutions are \\(x = -1\\), \\(x = 2\\), and \\(x = -2\\)."
    assert grade(text, "-1, 2, -2") and not grade(text, "-1, 2")
    assert grade("Thus \\boxed{5} and \\boxed{-2}.", "-2, 5") and not grade("Thus \\boxed{5}.", "-2, 5")
    assert grade("the values are \\(-1, 0,\\) and \\(1\\).", "-1,0,1")


def test_never_raises_or_hangs():
    hostile = ["10^{10^{10^{10}}}", "2^{2^{2^{100}}}", "{" * 5000 + "1" + "}" * 5000, "\\frac{1}{", "\\boxed{",
               "((((", "\\sqrt[", "x" * 1_000_000, "日本語", "\x00\xff", "9" * 5000, "\\frac{1}{0}", "0^0", "1/0"]
    for a in hostile:
        for b in hostile[:6] + ["1", "x"]:
            t = time.monotonic()
            assert is_equiv(a, b, timeout=1.0) in (True, False)
            assert grade(a, b, timeout=1.0) in (True, False)
            assert time.monotonic() - t < 2 * 1.0 + 0.5, (a[:30], b[:30])


def test_grade_batch_matches_grade():
    resp = [f"so \\boxed{{{i % 7}}}" for i in range(200)]
    gold = [str(i % 5) for i in range(200)]
    assert grade_batch(resp, gold, workers=2) == [grade(r, g) for r, g in zip(resp, gold)]


def test_reference_solutions_grade_correct():
    rows = read_jsonl(DATA_DIR / "math_test.jsonl") + read_jsonl(DATA_DIR / "gsm8k_test.jsonl")
    bad = [r["answer"] for r in rows if not is_equiv(extract_answer(r["solution"]), r["answer"])]
    assert len(rows) == 6319 and not bad, bad[:10]


def test_processbench_final_answer_agreement():
    rows = [r for s in ("gsm8k", "math", "olympiadbench") for r in read_jsonl(DATA_DIR / f"processbench_{s}.jsonl")
            if r["answer"] is not None]
    preds = grade_batch(["\n\n".join(r["steps"]) for r in rows], [r["answer"] for r in rows])
    agree = sum(p == r["final_answer_correct"] for p, r in zip(preds, rows)) / len(rows)
    assert agree >= 0.985, agree  # measured 98.6% (math-verify 97.6% on the same rows)
