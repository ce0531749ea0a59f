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
    # the kinds the held-out pairs missed (each with near misses in UNEQUAL)

    "latex variants": [("\\cfrac{2}{5}", "0.4"), ("\\cfrac{3}{4}", "0.75"), ("\\textbf{(B)}", "B"), ("\\text{(B)}", "\\textbf{(B)}"),
                       ("\\mathbf{(C)}", "C"), ("12 \\textnormal{ km}", "12"), ("5 \\textbf{ cm}", "5"), ("\\sqrt[3]5", "\\sqrt[3]{5}"),
                       ("\\sqrt[4]{16}", "2"), ("4,\\! 205,\\! 000", "4205000"), ("1,\\!000,\\!000", "1000000")],
    "relations": [("y \\neq 2", "y != 2"), ("a \\ne 0", "a != 0"), ("-2x \\ge -6", "x \\le 3"), ("3x + 3 > 9", "x > 2"),
                  ("y = 2x - 1", "2x - y - 1 = 0"), ("y = -x + 3", "x + y = 3"), ("x^2 + y^2 = 4", "2x^2 + 2y^2 = 8"),
                  ("3x^2 = 12", "x^2 = 4"), ("t \\in (1, 5]", "(1, 5]"), ("(1,5]", "1 < t \\le 5"), ("t \\in (1,5]", "1 < t \\le 5"),
                  ("s \\in [2, 7)", "2 \\le s < 7"), ("x \\in (-\\infty,1) \\cup (2, \\infty)", "(-\\infty,1)\\cup(2,\\infty)")],
    "structures": [("\\left[\\begin{array}{cc}1 & 2\\\\3 & 4\\end{array}\\right]", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
                   ("\\left(\\begin{array}{c}1\\\\2\\end{array}\\right)", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
                   ("3\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}3\\\\6\\end{pmatrix}"),
                   ("-\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix}-1\\\\2\\end{pmatrix}"),
                   ("\\frac{1}{2}\\begin{pmatrix}2\\\\4\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
                   ("2\\begin{bmatrix}1&0\\\\0&1\\end{bmatrix}", "\\begin{bmatrix}2&0\\\\0&2\\end{bmatrix}"),
                   ("\\{2 \\pm \\sqrt{3}\\}", "\\{2+\\sqrt{3}, 2-\\sqrt{3}\\}"), ("\\{1 \\pm \\sqrt{5}\\}", "\\{1-\\sqrt{5}, 1+\\sqrt{5}\\}"),
                   ("(1;2),(3;4)", "(3,4),(1,2)"), ("(2;5)", "(2,5)"), ("(1,2) \\text{ or } (3,4)", "(3,4),(1,2)"),
                   ("(0,1) \\text{ or } (1,0)", "(1,0),(0,1)"), ("1, 1, 2", "1, 2, 1"), ("\\{3, 3, 5\\}", "\\{5, 3\\}")],
    "labelled golds": [("6, 8", "BC=6, CA=8"), ("3, 4", "AB=3, BC=4"), ("5", "|PQ| = 5"), ("7", "|AC| = 7"), ("2:3", "m:n = 2:3"),
                       ("1:4", "a:b = 1:4"), ("\\frac{2}{3}", "\\frac{PR}{QR} = \\frac{2}{3}"), ("\\frac12", "\\frac{AE}{EC} = \\frac{1}{2}"),
                       ("(1,2),(3,4)", "a=1,b=2;a=3,b=4"), ("(2,1),(1,2)", "x=1,y=2;x=2,y=1"), ("y = t^2", "g(t) = t^2"),
                       ("y = 2s", "h(s) = 2s"), ("(-1,1)", "-1 < h(x) < 1"), ("(0,2]", "0 < f(x) \\le 2"),
                       ("2\\sqrt{2}", "2\\sqrt{2} \\approx 2.83"), ("\\sqrt{3}", "\\sqrt{3} \\approx 1.73"), ("1.73", "\\sqrt{3} \\approx 1.73")],
    "numbers and times": [("2 3/4", "2.75"), ("2 3/4", "\\frac{11}{4}"), ("1 1/2", "1.5"), ("3 2/5", "\\frac{17}{5}"),
                          ("9:05:00", "9:05"), ("10:45:00", "10:45"), ("7:15 \\text{ PM}", "19:15"), ("3:20 PM", "15:20"),
                          ("11:05 \\text{ AM}", "11:05"), ("3^2 5^3", "3^2 \\cdot 5^3"), ("2^3 3^2", "72")],
    "symbolic: commuted, trig": [("\\sin x", "\\cos(\\frac{\\pi}{2} - x)"), ("\\tan x", "\\frac{\\sin x}{\\cos x}"),
                                  ("a_k b_{n-k}", "b_{n-k} a_k"),
                 ("x_1 y_2 + x_2 y_1", "y_1 x_2 + y_2 x_1"),
                 ("\\sum_{k=0}^{n} a_k b_{n-k}", "\\sum_{k=0}^{n} b_{n-k} a_k")],
}
# the six kinds of a later held-out set's misses, written here (the held-out pairs stay outside): each kind's equal
# pairs, and in NEAR_MISSES what must stay different
KINDS = {
    "tuple lists, repeats": [("(3,4),(1,2),(1,2)", "(1,2),(3,4)"), ("(3, 4), (1,2)", "(1,2),(3,4),(1,2)"),
                             ("(1,2), (3,4), (1, 2)", "(1,2),(3,4)"), ("(2,-1),(0,0)", "(0,0),(2,-1),(0,0)"),
                             ("(1, 1, 2), (0, 1, 3)", "(0,1,3),(1,1,2),(0,1,3)"), ("(a,b),(b,a)", "(b, a), (a,b), (b,a)")],
    "list separators": [("1; 2; 3", "1,2,3"), ("(1,2); (3,4)", "(1,2),(3,4)"), ("-2; 5", "5, -2"), ("\\{1, 2\\}", "1, 2"),
                        ("\\{-3, 4\\}", "4,-3"), ("1 or 2", "1,2"), ("x = 1 or x = 2", "1, 2"), ("x=1, x=-2", "-2,1"),
                        ("-1 \\text{ or } 3", "3,-1"), ("\\frac{1}{2} \\text{ or } 2", "2, \\frac12")],
    "labelled ratios": [("3:5", "P:Q = 3:5"), ("3:5", "AB:BC = 3:5"), ("3 : 5", "P : Q = 3 : 5"), ("3:5", "PA:PB=3:5"),
                        ("3:5", "AP:PB = 3:5"), ("2:7", "x:y=2:7"), ("3:5", "S_1:S_2 = 3:5"), ("1:2", "V_A:V_B=1:2"),
                        ("3:5", "\\overline{AP}:\\overline{PB}=3:5"), ("3:5", "[ABC]:[DEF] = 3:5"),
                        ("3:5", "r_1 : r_2 = 3 : 5")],
    "big-operator products": [("y = \\sum_{k=1}^{n} x^k k", "y = \\sum_{k=1}^{n} k x^k"),
                              ("y=\\sum_{i=0}^{n} b a_i", "y = \\sum_{i=0}^n a_i b"),
                              ("y = \\prod_{k=1}^{n} x k", "y=\\prod_{k=1}^{n} k x"),
                              ("y = \\sum_{j=1}^{m} c_j x^j", "y=\\sum_{j=1}^{m} x^j c_j"),
                              ("S = \\sum_{k=0}^{n} \\binom{n}{k} x^k", "S = \\sum_{k=0}^{n} x^k \\binom{n}{k}")],
    "bare-brace sets": [("{3,1,2}", "\\{1,2,3\\}"), ("\\{3,1,2\\}", "{1,2,3}"), ("{b,a}", "{a,b}"), ("{-1, 4}", "\\{4,-1\\}"),
                        ("{\\frac{1}{2}, 3}", "\\{3, 0.5\\}")],
    "degrees in trig": [("\\cos 70^\\circ", "\\sin 20^\\circ"), ("\\sin 20^\\circ", "\\cos 70^{\\circ}"),
                        ("\\tan 40^\\circ", "\\cot 50^\\circ"), ("\\cos(70^\\circ)", "\\sin 20°"), ("2\\cos 60^\\circ", "1"),
                        ("\\sec 30^\\circ", "\\csc 60^\\circ"), ("\\sin 15^\\circ", "\\cos 75^\\circ")],
}
NEAR_MISSES = [("(1,2),(4,3)", "(1,2),(3,4)"), ("(1,2),(1,2)", "(1,2),(3,4)"), ("(1,2),(3,4),(5,6)", "(1,2),(3,4),(1,2)"),
               ("1; 3", "1,2"), ("\\{1,3\\}", "1,2"), ("1 or 3", "1,2"), ("x = 1 or x = 3", "1, 2"), ("1; 2; 3", "1,2"),
               ("5:3", "P:Q=3:5"), ("3:4", "P:Q=3:5"), ("5:3", "S_1:S_2 = 3:5"), ("3:5", "[ABC]:[DEF] = 5:3"), ("y=\\sum_{k=1}^{n} x^k", "y=\\sum_{k=1}^{n} kx^k"),
               ("y=\\sum_{k=0}^{n} kx^k", "y=\\sum_{k=1}^{n+1} kx^k"), ("y=\\prod_{k=1}^{n} x", "y=\\prod_{k=1}^{n} kx"),
               ("y = \\sum_{k=1}^{n} k x^k", "z = \\sum_{k=1}^{n} k x^k"), ("{1,2}", "\\{1,2,3\\}"), ("{1,2,4}", "\\{1,2,3\\}"),
               ("\\cos 20^\\circ", "\\sin 20^\\circ"), ("\\cos 70", "\\sin 20^\\circ"), ("\\cos 70^\\circ", "\\sin 20"),
               ("\\tan 50^\\circ", "\\cot 50^\\circ"), ("\\sin 70^\\circ", "\\sin 20^\\circ")]
EQUAL.update(KINDS)
ONE_WAY = ("x= prefix", "choices", "assignments", "sets of sets", "labelled golds")  # gold-side forms a prediction may drop
UNEQUAL = [("3", "3.5"), ("(1,2)", "[1,2]"), ("x^2", "2x"), ("1-\\frac{1}{e}", "1+\\frac{1}{e}"), ("\\{1,2\\}", "\\{1,3\\}"),
           ("1, 2", "1, 2, 3"), ("50\\%", "5"), ("\\sqrt{2}", "1.414"), ("A", "B"), ("(2,\\infty)", "x \\ge 2"),
           ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"), ("x=5", "x=6"), ("", "0"),
           ("\\frac{1}{2}", "\\frac{1}{3}"), ("10^{10^{10^{10}}}", "5"), ("monday", "tuesday"), ("1 \\pm 2", "3"),
           ("f(y)=2y", "f(x)=x"), ("(1, n)", "f(n)=n, g(n)=1"), ("a=1, b=3", "a=1, b=2"), ("\\{1,2\\},\\{3\\}", "1,2,4"),
           ("\\frac{\\pi}{6}+k\\pi", "\\frac{5\\pi}{6}+k\\pi"),
           # near misses of the kinds above
           ("\\sqrt[3]5", "\\sqrt{5}"), ("\\sqrt[3]{8}", "\\sqrt{8}"), ("(B)", "(D)"), ("\\textbf{(A)}", "(E)"), ("1,\\!000", "100"),
               ("x \\le 3", "x \\ge 3"), ("x > 2", "x \\ge 2"), ("3x+3 > 9", "x < 2"), ("-2x \\ge -6", "x \\ge 3"),
               ("2x - y = 1", "2x - y = 2"), ("x + y = 3", "x - y = 3"), ("x^2 + y^2 = 4", "x^2 + y^2 = 8"), ("(1,5]", "[1,5]"),
               ("[2,7)", "(2,7)"), ("t \\in (1,5]", "1 \\le t \\le 5"), ("y \\neq 2", "y = 2"),
               ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}"),
               ("3\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}3\\\\5\\end{pmatrix}"), ("(1,2)", "(2,1)"), ("(2;5)", "(5,2)"),
               ("\\{1\\pm\\sqrt{5}\\}", "\\{1+\\sqrt{5}\\}"), ("2:3", "3:2"), ("1:4", "4:1"), ("8, 6", "BC=6, CA=8"), ("4, 3", "AB=3, BC=4"),
               ("(0,2)", "0 < f(x) \\le 2"), ("(1,2),(3,5)", "a=1,b=2;a=3,b=4"), ("y = t^3", "g(t) = t^2"), ("2.83", "2\\sqrt{3} \\approx 3.46"),
               ("2 3/4", "23/4"), ("1 1/2", "11/2"), ("7:15", "19:15"), ("3:20", "15:20"), ("9:05", "9:50"), ("11:05 AM", "11:05 PM"),
               ("3^2 5^3", "3^{25^3}"), ("\\sin x", "\\cos x"), ("\\tan x", "\\cot x"), ("x_1 y_2", "x_2 y_1"),
               ("\\sum_{k=0}^{n} a_k b_{n-k}", "\\sum_{k=1}^{n} a_k b_{n-k}"), ("\\sum_{k=0}^{n} a_k b_k", "\\sum_{k=0}^{n} a_k b_{n-k}")] + NEAR_MISSES


@pytest.mark.parametrize("rule", sorted(EQUAL))
def test_equal_rule(rule):
    for a, b in EQUAL[rule]:
        assert is_equiv(a, b), (rule, a, b)
        assert is_equiv(b, a) or rule in ONE_WAY, (rule, b, a)


@pytest.mark.parametrize("a,b", UNEQUAL)
def test_near_misses_stay_unequal(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_the_six_kinds_score_and_stay_fast():
    """Every pair of the six kinds above graded right both ways, each call well under 5 s (the issue's bound)."""
    pairs = [(a, b, True) for v in KINDS.values() for a, b in v] + [(a, b, False) for a, b in NEAR_MISSES]
    slowest, hits = 0.0, 0
    for a, b, want in pairs:
        for x, y in ((a, b), (b, a)):
            t = time.monotonic()
            hits += is_equiv(x, y) == want
            slowest = max(slowest, time.monotonic() - t)
    assert hits == 2 * len(pairs) and slowest < 5.0, (hits, 2 * len(pairs), slowest)


def test_extract_answer_forms():
    cases = {
        "so $\\boxed{\\frac{1}{2}}$.": "\\frac{1}{2}",
        "\\boxed{\\{1, \\{2\\}\\}} then \\fbox{7}": "7",
        "The result is \\boxed 4 and done": "4",
        "Final Answer: The final answer is $5$. I hope it is correct.": "5",
        # Minerva's format: its closing line wins over boxes in earlier steps
        "So $x = \\boxed{4}$ at first.\n\nThen $y = \\boxed{8}$.\n\nFinal Answer: The final answer is $12$. I hope it is correct.": "12",
        "We try \\boxed{2}. Final Answer: The final answer is \\frac{1}{3}. I hope it is correct.": "\\frac{1}{3}",
        "so \\boxed{7}.\n\nThe final answer is positive, since both factors are negative.": "7",
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
