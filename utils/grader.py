"""Answer extraction and equivalence for math answers: every reward, label and accuracy goes through here.

    extract_answer(text) -> str | None       "The final answer is X" after the last box, else the last \\boxed{}/\\fbox{},
                                             "#### X", "The answer is X"
    is_equiv(pred, gold, timeout=3.0) -> bool
    grade(response, gold) -> bool             extract + compare
    grade_batch(responses, golds) -> [bool]   all cores for the symbolic cases; parsed golds cached

Order of checks in `is_equiv`: normalised strings; multiple-choice letters; numbers (fractions, mixed
numbers, scientific notation, repeating decimals, percentages, with a relative tolerance); structures
(tuples, intervals, sets, unions, matrices, \\pm, inequalities read as intervals), clock times,
labelled golds ("BC=6, CA=8", "|PQ|=5") compared element-wise; last, symbolic equality with sympy
(utils/symbolic.py: a worker process killed when a call passes its timeout, so no input can hang or
exhaust the caller). It never raises.
"""
from __future__ import annotations

import functools
import math
import multiprocessing as mp
import os
import re
import time
from fractions import Fraction

MAX_LEN = 2000  # answers longer than this are compared as strings only
REL_TOL = 1e-6


# ----------------------------------------------------------------------------- extraction
def _braced(text: str, j: int, limit: int = 20000):
    """Content of the brace group opening at text[j] == '{', or None if unbalanced (or longer than limit)."""
    depth = 0
    for k in range(j, min(len(text), j + limit)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1: k]
    return None


def _last_boxed(text: str):
    for m in list(re.finditer(r"\\(?:boxed|fbox)\s*", text))[::-1][:20]:  # the last few only: bounded work
        j = m.end()
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is not None:
                return got
        elif j < len(text) and m.group(0).endswith(" "):  # "\boxed 4"
            return re.split(r"[\s$]", text[j:], maxsplit=1)[0]
    return None


_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:\.\s*$|\.\s+[A-Z]|\n|$)", re.I | re.S)
_MATH = re.compile(r"\\\((.+?)\\\)|\\\[(.+?)\\\]|\$\$(.+?)\$\$|\$(.+?)\$", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


_IS_MATH = re.compile(r"\b(is|are|equals)\s*(?:approximately\s+|about\s+|exactly\s+|equal to\s+)?:?\s*" + _MATH.pattern,
                      re.S)


def _clean(ans: str):
    ans = ans.replace("\\$", "").strip().strip("$").strip()
    ans = re.sub(r"\\[()\[\]]", "", ans)
    ans = re.sub(r"^(?:final\s+)?answer\s*:\s*", "", ans.strip(), flags=re.I).strip().strip("$").strip()
    ans = ans.rstrip(".,;: ")
    return ans or None


def _fallback(text: str):
    """No explicit marker: in the last paragraph, the last bold **X**, else whichever comes last of the last
    math segment (the right side of its last "=") and the last number outside math."""
    last = re.split(r"\n\s*\n", text.strip()[-1500:])[-1]
    bold = re.findall(r"\*\*(.+?)\*\*", last)
    if bold and re.search(r"\d", bold[-1]):
        return _clean(bold[-1])
    stated = [g for m in _IS_MATH.finditer(last) for g in m.groups()[1:] if g is not None and g.strip()
              and not re.match(r"\s*,?\s*(?:and\s+)?(?:\\[(\[]|\$)", last[m.end():])]  # not a list "are \\(1\\), \\(2\\)"
    stated = [g for g in stated if not re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}|\\$", g)]  # not "$7 in change. ..$"
    if stated:  # "the function is: \\[f(x) = 1 - x\\]" beats later mentions of \\(f(x)\\)
        return _clean(stated[-1])
    segs = [(m.end(), next(g for g in m.groups() if g is not None).strip()) for m in _MATH.finditer(last)]
    segs = [(e, g) for e, g in segs if g]
    outside = _MATH.sub(lambda m: " " * len(m.group(0)), last)
    nums = [(m.end(), m.group(0)) for m in _NUMBER.finditer(outside)]
    if segs and nums and nums[-1][0] > segs[-1][0]:  # text after the last math: keep the math value if repeated
        value = _clean(segs[-1][1].rsplit("=", 1)[-1]) or ""
        if normalize(value) in {normalize(v) for e, v in nums if e > segs[-1][0]}:
            return value
    if nums and (not segs or nums[-1][0] > segs[-1][0]):
        return _clean(nums[-1][1])
    return _clean(segs[-1][1].rsplit("=", 1)[-1]) if segs else None


_VALUE = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\}|\\sqrt\{\d+\})(?:\s*,)?")


def _list_candidates(text: str):
    """Several answers spread over the last paragraph: its boxes, or a closing run of math segments that
    are plain values ("-1, 0, and 1") or assignments to one name ("x = -1, x = 2"; "d(6) = 1/3 ... d(72) = 1/9")."""
    last = re.split(r"\n\s*\n", text.strip()[-3000:])[-1]
    boxes = [b for b in (_braced(last, m.end()) for m in re.finditer(r"\\boxed\s*(?=\{)", last)) if b]
    if len(boxes) > 1:
        yield ", ".join(boxes)
    segs = [g.strip() for m in _MATH.finditer(last) for g in m.groups() if g is not None and g.strip()]
    run, name = [], None
    for g in reversed(segs):
        m = re.fullmatch(r"([a-zA-Z])(?:\([^()=]*\))?\s*=\s*([^=]+)", g)
        if not m or (name and m.group(1) != name):
            break
        name = m.group(1)
        run.append(m.group(2).strip())
    if len(run) > 1:
        yield ", ".join(reversed(run))
    vals = []
    for g in reversed(segs):
        if not all(_VALUE.fullmatch(v.strip()) for v in g.split(",") if v.strip()):
            break
        vals.append(g.strip(" ,"))
    if len(vals) > 1:
        yield ", ".join(reversed(vals))


def extract_answer(text) -> str | None:
    """The final answer of a solution text, or None."""
    if not isinstance(text, str) or not text:
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    i = text.lower().rfind("final answer is")
    minerva = i >= 0 and (re.search(r"final answer:\s*the\s*$", text[max(0, i - 40): i], re.I)
                          or "i hope it is correct" in text[i: i + 400].lower())
    if minerva and i > max(text.rfind("\\boxed"), text.rfind("\\fbox")):  # Minerva's closing line beats earlier boxes
        return _clean(re.split(r"\.?\s*I hope it is correct", text[i + 15:].lstrip(" :"))[0])
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed) if boxed.strip() else None
    m = re.search(r"####\s*(.+)$", text, re.M)
    if m:
        return _clean(m.group(1).replace(",", ""))
    if i >= 0:
        return _clean(re.split(r"\.?\s*I hope it is correct", text[i + 15:].lstrip(" :"))[0])
    ms = list(_ANSWER_IS.finditer(text[-5000:]))
    if ms:
        return _clean(ms[-1].group(1))
    return _fallback(text)


# ----------------------------------------------------------------------------- normalisation
_UNIT_WORDS = (r"(?:sq(?:uare)?\s*)?(?:units?|cm|mm|km|m|meters?|metres?|inches|inch|in|feet|foot|ft|yards?|miles?|"
               r"degrees?|deg|radians?|rad|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|"
               r"dollars?|cents?|pounds?|lbs?|kg|g|grams?|ounces?|oz|liters?|litres?|ml|L|gallons?|cups?|"
               r"people|persons?|students?|apples?|marbles?|pages?|cookies?|books?|points?|ways|times|"
               r"mph|kph|percent|square|cubic)(?:\^?\{?[23]\}?)?")


_WRAPPERS = ("textnormal", "operatorname", "textbf", "textit", "textrm", "textup", "textsf", "texttt", "mathrm",
             "mathbf", "mathit", "mathsf", "boldsymbol", "mbox", "text")  # longest first: "\\text" is in "\\textbf"


def _unwrap_text(s: str) -> str:
    for cmd in _WRAPPERS:
        while (m := re.search(rf"\\{cmd}(?![a-zA-Z])", s)):
            i = m.start()
            j = i + len(cmd) + 1
            while j < len(s) and s[j] == " ":
                j += 1
            inner = _braced(s, j) if j < len(s) and s[j] == "{" else None
            if inner is None:
                s = s[:i] + s[i + len(cmd) + 1:]
            else:
                s = s[:i] + inner + s[j + len(inner) + 2:]
    return s


@functools.lru_cache(maxsize=65536)
def normalize(s: str) -> str:
    """Canonical string form of an answer (also used as the cache key of parsed golds)."""
    s = str(s).strip()
    if len(s) > MAX_LEN:
        return s
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("≠", "!="),
                 ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
                 ("~", " "), ("{,}", ","), ("\\quad", " "), ("\\qquad", " "),
                 ("\\le ", "\\leq "), ("\\ge ", "\\geq "), ("≤", "\\leq "), ("≥", "\\geq "), ("∞", "\\infty"),
                 ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\lvert", "|"), ("\\rvert", "|"), ("\\cdot", "*"),
                 ("\\times", "*"), ("×", "*"), ("−", "-"), ("\\infin", "\\infty"), ("±", "\\pm "), ("\\emptyset", "\\varnothing")):
        s = s.replace(a, b)
    s = re.sub(r"\\neq?(?![a-zA-Z])", "!=", s)
    s = re.sub(r"(?<=\d),\s*\\[!,]\s*(?=\d{3}(?!\d))", "", s)  # digit groups with thin spaces: "4,\\! 205,\\! 000"
    s = re.sub(r"(?<!\\)\\(?=\d)", "", s)  # "\\15" (a stripped "\\$15"), not a matrix row "\\\\1"
    s = re.sub(r"(?<!\\)\\[!,;:]|\\[Bb]igg?[lr]?(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # spacing commands (not the "\\" of a matrix row)
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+", ",", s)  # "2 \\text{ and } 3" -> "2,3"
    s = re.sub(r"(\d)\s*\\(?:text|mbox|mathrm)\{\s*(?!and\b|or\b|[AaPp]\.?[Mm]\.?\s*\})[A-Za-z][A-Za-z ]*\}"
               r"(?:\^\{?[23]\}?)?", r"\1", s)  # 65 \text{ tickets} (not "7:15 \text{ PM}")
    s = _TRIG_DEG.sub(r"\\\1(\2\\pi/180)", s)  # "\\cos 70^\\circ" -> "\\cos(70\\pi/180)": the angle in radians
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = _unwrap_text(s)
    s = re.sub(r"\\(?:le|leq|leqslant)(?![a-z])", "<=", s)
    s = re.sub(r"\\(?:ge|geq|geqslant)(?![a-z])", ">=", s)
    s = s.replace("\\lt", "<").replace("\\gt", ">")
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*:?\s*", "", s, flags=re.I)
    # a trailing quantifier: "\\frac{\\pi}{6}+k\\pi for k \\in \\mathbb{Z}", "..., where n is an integer"
    s = re.sub(r"(?:,|\s)*(?:(?:for|where)\s+(?:all\s+|any\s+|some\s+)?(?:integers?\s+)?)?[a-zA-Z]\s*\\in\s*"
               r"\\mathbb\s*\{?[ZN]\}?\s*\.?$|(?:,|\s)*(?:for|where)\s+[a-zA-Z]\s+(?:is|are)\s+(?:an?\s+)?"
               r"(?:integers?|natural numbers?)\s*\.?$", "", s)
    # "x = 5", "k=3": drop a single-variable left side (not "x+y=3", not "y=2x+1" equations of two sides)
    m = re.fullmatch(r"\s*([a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=\s*([^=<>]+)", s)
    if m and not re.search(r"[a-zA-Z]", re.sub(r"\\(?:frac|sqrt|pi|infty|pm|mp)", "", m.group(2))):
        s = m.group(2).strip()
    s = _same_name_values(s)  # "x=1, x=2" (from "x = 1 or x = 2") -> "1,2"
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"_\{(\w)\}", r"_\1", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\sqrt\s*\[([^\[\]]+)\]\s*(\d+|[a-zA-Z])", r"\\sqrt[\1]{\2}", s)  # \\sqrt[3]5
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*(?=[(\[]|\\\{)", "", s)  # "t \\in (1, 5]": the set itself
    s = re.sub(r"\\begin\{array\}\{[^{}]*\}(.*)\\end\{array\}", r"\\begin{matrix}\1\\end{matrix}", s)
    s = re.sub(r"^[(\[]\s*(\\begin\{matrix\}.*\\end\{matrix\})\s*[)\]]$", r"\1", s)  # [array] == bmatrix
    s = re.sub(r"\(([^();,]*;[^()]*)\)", lambda m: "(" + m.group(1).replace(";", ",") + ")", s)  # (1;2) == (1,2)
    s = re.sub(r"(\^(?:\{[^{}]*\}|\d+))\s+(?=[\d(])", r"\1*", s)  # "3^2 5^3": a product, not 3^25^3
    s = re.sub(r"(_(?:\{[^{}]*\}|[A-Za-z0-9]))\s+(?=[A-Za-z(])", r"\1*", s)  # "a_k b_{n-k}": a product
    m = re.fullmatch(r"(-?\d+)\s+(\d+)\s*/\s*(\d+)", s)  # mixed number "2 3/4" (never "23/4")
    if m and 0 < int(m.group(2)) < int(m.group(3)):
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    # numbers with units in words, "12 cm", "5 \text{ dollars}" (already unwrapped), "4 square units"
    m = re.fullmatch(rf"(.*?[\d}}])\s*(?:{_UNIT_WORDS})(?:\s+{_UNIT_WORDS})*\s*\.?", s) or \
        re.fullmatch(r"(-?[\d.,]+)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]{2,}){0,3}\s*\.?", s)  # "12 tomatoes"
    if m and re.search(r"\d", m.group(1)):
        s = m.group(1).strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s) if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    s = s.rstrip(".").strip() if not re.fullmatch(r".*\d\.", s) else s[:-1]
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    if not re.fullmatch(r"[A-Za-z ]+", s):  # drop spaces, but keep "\\pi k" from becoming "\\pik"
        s = re.sub(r"(\\[a-zA-Z]+) +(?=[a-zA-Z])", r"\1\0", s).replace(" ", "").replace("\0", " ")
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s.replace("+\\infty", "\\infty").replace("inf", "\\infty") if s in ("inf", "+inf", "+\\infty") else s


_TRIG_DEG = re.compile(r"\\(sin|cos|tan|cot|sec|csc)\s*\(?\s*(\d+(?:\.\d+)?)\s*(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|"
                       r"\\degree)\s*\)?")


def _same_name_values(s: str) -> str:
    """'x=1,x=-2' -> '1,-2': a list of values each assigned to the same one-letter name (a root list)."""
    items = _split_top(s) if "=" in s and "," in s else None
    pairs = [re.fullmatch(r"([a-zA-Z])\s*=\s*([^=<>]+)", x.strip()) for x in items or []]
    if len(pairs) < 2 or not all(pairs) or len({p.group(1) for p in pairs}) != 1:
        return s
    if any(re.search(r"[a-zA-Z]", re.sub(r"\\(?:frac|sqrt|pi|infty|pm|mp)", "", p.group(2))) for p in pairs):
        return s
    return ",".join(p.group(2).strip() for p in pairs)


# ----------------------------------------------------------------------------- numbers
def _to_number(s: str):
    """A Fraction or float for a plain numeric string (no symbols), else None."""
    if len(s) > 60:
        return None
    pct = s.endswith("\\%") or s.endswith("%")
    s = s[:-2] if s.endswith("\\%") else s[:-1] if s.endswith("%") else s
    neg = s.startswith("-")
    t = s[1:] if neg else s
    v = None
    try:
        if re.fullmatch(r"\d+", t):
            v = Fraction(int(t))
        elif re.fullmatch(r"\d*\.\d+|\d+\.\d*", t):
            v = Fraction(t)
        elif m := re.fullmatch(r"(\d*)\.(\d*)\\overline\{(\d+)\}", t):  # repeating decimal
            a, b, r = m.groups()
            v = Fraction(int(a or 0)) + (Fraction(int(b or 0), 10 ** len(b)) if b else 0) + \
                Fraction(int(r), (10 ** len(r) - 1) * 10 ** len(b))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)(?:e|E|\*10\^)\{?([-+]?\d{1,3})\}?", t):  # 1.5e4, 1.5*10^{4}
            v = Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
        elif m := re.fullmatch(r"\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}|(\d+)/(\d+)", t):
            a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            v = Fraction(a) / Fraction(b) if Fraction(b) else None
        elif m := re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", t):  # mixed number 1\frac{1}{2}
            if int(m.group(3)) and int(m.group(2)) < int(m.group(3)):
                v = int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    if v is None:
        return None
    v = -v if neg else v
    return (v, True) if pct else (v, False)


def _num_equal(a, b) -> bool:
    if a == b:
        return True
    fa, fb = float(a), float(b)
    return math.isclose(fa, fb, rel_tol=REL_TOL, abs_tol=1e-12)


_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(?:(a\.?m\.?|p\.?m\.?))?", re.I)


def _to_time(s: str):
    """Seconds after midnight of a clock time ("9:05", "9:05:00", "7:15PM"), else None. Without am/pm the
    hour is read as written: "7:15" is not "19:15"."""
    m = _TIME.fullmatch(s)
    if not m or int(m.group(2)) > 59 or int(m.group(3) or 0) > 59:
        return None
    h = int(m.group(1))
    if m.group(4):
        if not 1 <= h <= 12:
            return None
        h = h % 12 + (12 if m.group(4).lower().startswith("p") else 0)
    return h * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)


# ----------------------------------------------------------------------------- structures
_OPEN = {"(": ")", "[": "]", "\\{": "\\}", "{": "}"}


def _split_top(s: str, sep: str = ","):
    """Split at top-level separators (outside (), [], {}), or None if brackets do not balance."""
    out, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith(sep, i) and depth == 0:
            out.append(cur)
            cur, i = "", i + len(sep)
            continue
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0 and sep == ",":
                return None
        cur += c
        i += 1
    return out + [cur] if depth == 0 or sep != "," else None


def _structure(s: str):
    """(kind, items): kind is 'interval'/'tuple' with its brackets, 'set', 'list', 'union', 'matrix'; or None."""
    if "\\cup" in s:
        parts = _split_top(s, "\\cup")
        if parts and len(parts) > 1:
            return "union", parts
    m = re.fullmatch(r"(-|[-+]?\d+(?:\.\d+)?|[-+]?\\frac\{\d+\}\{\d+\})?\*?"
                     r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}", s)
    if m:  # "3\\begin{pmatrix}1\\\\2\\end{pmatrix}": the scalar multiplies every entry
        rows = [[_scaled(m.group(1), x) for x in r.split("&")] for r in m.group(2).split("\\\\") if r.strip()]
        return "matrix", rows
    if s.startswith("\\{") and s.endswith("\\}"):
        items = _split_top(s[2:-2])
        if items is not None:  # else "\\{1,2\\},\\{3\\}": a list of sets, below
            return "set", items
    if s.startswith("{") and _braced(s, 0) == s[1:-1] and (items := _split_top(s[1:-1])) and len(items) > 1:
        return "set", items  # bare braces "{3,1,2}": a set too
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        if _split_top(inner) is not None and _balanced(inner):
            items = _split_top(inner)
            if len(items) > 1:
                return "bracket" + s[0] + s[-1], items
    items = _split_top(s)
    if items is not None and len(items) > 1:
        return "list", items
    items = _split_top(s, ";") if items is not None and "=" not in s else None  # "1; 2", "(1,2); (3,4)"
    if items and len(items) > 1 and _balanced(s):
        return "list", items
    return None


def _scaled(c: str | None, x: str) -> str:
    """Entry x of a matrix multiplied by the scalar c ("-", "3", "\\frac{1}{2}", or None)."""
    if not c or c == "+":
        return x
    nc, nx = _to_number("-1" if c == "-" else c), _to_number(normalize(x))
    if nc and nx and not (nc[1] or nx[1]):
        v = nc[0] * nx[0]
        return str(v) if isinstance(v, Fraction) else repr(v)
    return f"{'-1' if c == '-' else c}*({x})"


def _balanced(s: str) -> bool:
    d = 0
    for c in s:
        d += c in "([{"
        d -= c in ")]}"
        if d < 0:
            return False
    return d == 0


def _interval_from_inequality(s: str):
    """'x>2' -> '(2,\\infty)', '2<x\\leq5' -> '(2,5]', 'x<=-1' -> '(-\\infty,-1]', '-1<h(x)<1' -> '(-1,1)';
    else None."""
    v = r"[a-zA-Z](?:\([a-z]\))?"
    m = re.fullmatch(rf"([^<>=]+?)(<=|<)({v})(<=|<)([^<>=]+)", s)
    if m:
        return ("[" if m.group(2) == "<=" else "(") + m.group(1) + "," + m.group(5) + ("]" if m.group(4) == "<=" else ")")
    m = re.fullmatch(rf"([^<>=]+?)(>=|>)({v})(>=|>)([^<>=]+)", s)
    if m:
        return ("[" if m.group(4) == ">=" else "(") + m.group(5) + "," + m.group(1) + ("]" if m.group(2) == ">=" else ")")
    m = re.fullmatch(rf"({v})(<=|<|>=|>)([^<>=]+)", s) or re.fullmatch(rf"([^<>=]+?)(<=|<|>=|>)({v})", s)
    if m:
        a, op, b = m.groups()
        if re.fullmatch(v, b) and not re.fullmatch(v, a):  # "2 < x" -> "x > 2"
            a, b, op = b, a, {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
        if op in ("<", "<="):
            return "(-\\infty," + b + ("]" if op == "<=" else ")")
        return ("[" if op == ">=" else "(") + b + ",\\infty)"
    return None


def _expand_pm(s: str):
    if "\\pm" not in s or s.count("\\pm") > 1 or s.startswith("\\{") and s.endswith("\\}"):
        return None  # inside a set the items are expanded (_match_unordered)
    return s.replace("\\pm", "+") + "," + s.replace("\\pm", "-")


# ----------------------------------------------------------------------------- comparison
_CHOICE = re.compile(r"^\(?([A-E])\)?$")


def _choice(s: str):
    m = _CHOICE.match(s) or re.match(r"^\(([A-E])\)", s) or re.match(r"^([A-E])[.:)]\s", s)
    return m.group(1) if m else None


def _equiv(a: str, b: str, deadline: float, depth: int = 0) -> bool:
    """Equivalence of two normalised answers (a: prediction, b: gold)."""
    if a == b:
        return True
    if not a or not b or depth > 4 or time.monotonic() > deadline or len(a) > MAX_LEN or len(b) > MAX_LEN:
        return False
    if a.lower() == b.lower() and re.fullmatch(r"[A-Za-z ]+", b):
        return True
    if "\\approx" in a or "\\approx" in b:  # "2\\sqrt{2}\\approx2.83": the exact value, else the stated approximation
        xa, xb = a.split("\\approx"), b.split("\\approx")
        return _equiv(xa[0], xb[0], deadline, depth + 1) or (
            len(xa) != len(xb) and _equiv(xa[-1], xb[-1], deadline, depth + 1))
    cb = _CHOICE.match(b)
    if cb:
        return _choice(a) == cb.group(1) or a == b
    na, nb = _to_number(a), _to_number(b)
    if na and nb:
        if _num_equal(na[0], nb[0]):
            return True
        if na[1] != nb[1]:  # one side has a percent sign: 50% == 0.5
            return _num_equal(na[0] * (100 if nb[1] else 1), nb[0] * (100 if na[1] else 1))
        return False
    if nb and nb[1] and not na:
        return False
    sa_, sb_ = _SUM.fullmatch(a), _SUM.fullmatch(b)
    if sa_ and sb_ and _bounds(sa_.group(1)) == _bounds(sb_.group(1)):  # the same \\sum_{k=0}^{n}: the summands
        return _equiv(_product(sa_.group(2)), _product(sb_.group(2)), deadline, depth + 1)
    ta, tb = _to_time(a), _to_time(b)
    if ta is not None and tb is not None:  # "9:05:00" == "9:05", "7:15PM" == "19:15"
        return ta == tb
    eq = re.compile(r"(?<![<>!])=")
    if ";" in b and ";" not in a and (sols := _solutions(b)):  # gold "a=1,b=2;a=3,b=4" vs "(1,2),(3,4)"
        return _equiv(a, sols, deadline, depth + 1)
    if eq.search(a) and not eq.search(b):  # "E(2020,1993)=76" vs "76": the last right-hand side
        return _equiv(eq.split(a)[-1], b, deadline, depth + 1)
    lb, la = _LABELLED.fullmatch(b), _LABELLED.fullmatch(a)
    if lb and not eq.search(a):  # gold "f(x)=x+22", "|PQ|=5", "m:n=2:3", "\\frac{PR}{QR}=\\frac{2}{3}" vs its value
        return _equiv(a, lb.group(2), deadline, depth + 1)
    if la and lb and la.group(1) != lb.group(1) and _equiv(la.group(2), lb.group(2), deadline, depth + 1):
        return True  # "y=t^2" vs "g(t)=t^2": the same value under two labels
    oa, ob = _OP_EQ.fullmatch(a), _OP_EQ.fullmatch(b)
    if oa and ob and oa.group(1) == ob.group(1):  # "y=\\sum_{k=1}^{n}x^kk" vs "y=\\sum_{k=1}^nkx^k": the sides
        return _equiv(oa.group(2), ob.group(2), deadline, depth + 1)
    fa, fb = _FUNC_EQ.fullmatch(a), _FUNC_EQ.fullmatch(b)
    if fa and fb and fa.group(1) == fb.group(1) and fa.group(2) != fb.group(2):  # "f(y)=y" vs "f(x)=x"
        rhs = re.sub(rf"(?<![\\a-zA-Z]){fa.group(2)}(?![a-zA-Z])", fb.group(2), fa.group(3))
        return _equiv(rhs, fb.group(3), deadline, depth + 1)
    da, db = _assignments(a), _assignments(b)
    if db and (da or not eq.search(a)):  # gold "f(n)=n,g(n)=1" vs "(f(n),g(n))=(n,1)" or "(n,1)"
        if da:
            return sorted(da) == sorted(db) and all(_equiv(da[k], db[k], deadline, depth + 1) for k in db)
        sa = _structure(a)
        vals = sa[1] if sa and sa[0] in ("list", "bracket()") else None
        return vals is not None and len(vals) == len(db) and all(
            _equiv(normalize(x), normalize(y), deadline, depth + 1) for x, y in zip(vals, db.values()))
    # structures
    ia, ib = _interval_from_inequality(a), _interval_from_inequality(b)
    if ia or ib:
        if _equiv(ia or a, ib or b, deadline, depth + 1):
            return True
        if not (_INEQ.search(ia or a) or _INEQ.search(ib or b)):
            return False  # both read as intervals: decided
        return _symbolic_equal(a, b, max(0.05, deadline - time.monotonic()))  # "-2x>=-6" vs "x<=3": sympy solves
    pa, pb = _expand_pm(a), _expand_pm(b)
    if pa or pb:
        return _equiv(pa or a, pb or b, deadline, depth + 1)
    sa, sb = _structure(a), _structure(b)
    if sa or sb:
        if not (sa and sb):
            return False
        (ka, xa), (kb, xb) = sa, sb
        tuples = ka == kb == "list" and all((_structure(normalize(x)) or ("",))[0] == "bracket()" for x in xa + xb)
        if ka == kb == "set" or tuples:  # a set lists each member once: {1,1,2} == {1,2}; so does a list of
            # tuples (the solutions of a system: "(1,2),(3,4),(1,2)" == "(3,4),(1,2)")
            xa, xb = list(dict.fromkeys(normalize(x) for x in xa)), list(dict.fromkeys(normalize(x) for x in xb))
        unordered = {"set", "list", "union"}
        if {ka, kb} == {"list", "bracket()"} and kb == "list":  # gold "1,2,3" listed, pred "(1,2,3)"
            ka = "list"
        if ka in unordered and kb in unordered and (ka == kb or {ka, kb} == {"set", "list"}):
            return _match_unordered(xa, xb, deadline, depth)
        if ka != kb or len(xa) != len(xb):
            return False
        if ka == "matrix":
            return all(len(ra) == len(rb) and all(_equiv(normalize(x), normalize(y), deadline, depth + 1)
                                                  for x, y in zip(ra, rb)) for ra, rb in zip(xa, xb))
        return all(_equiv(normalize(x), normalize(y), deadline, depth + 1) for x, y in zip(xa, xb))
    if re.fullmatch(r"[A-Za-z ]+", a) and re.fullmatch(r"[A-Za-z ]+", b):
        return False  # different words
    return _symbolic_equal(a, b, max(0.05, deadline - time.monotonic()))


_FUNC_EQ = re.compile(r"([a-zA-Z])\(([a-z])\)=([^=]+)")
# a label on the left of a gold's "=": a name, a function value, |PQ|, a ratio of names, a fraction of names
_PART = r"(?:[A-Za-z]{1,3}(?:_\{?\w+\}?)?|\\overline\{[A-Za-z]{1,3}\}|\[[A-Za-z]{1,4}\]|\|[A-Za-z]{1,3}\|)"  # of a ratio
_LABEL = (rf"[A-Za-z]{{1,4}}(?:_\{{?\w+\}}?)?(?:\([a-z]\))?|\|[A-Za-z]{{1,4}}\||{_PART}(?::{_PART})+"
          r"|\\frac\{[A-Za-z]{1,4}\}\{[A-Za-z]{1,4}\}")
_LABELLED = re.compile(rf"({_LABEL})=([^=<>]+)")
_INEQ = re.compile(r"<|>")
_OP_EQ = re.compile(r"([A-Za-z]{1,4}(?:\([a-z]\))?)=(\\(?:sum|prod)_.+)")  # a name = a big operator (its bounds hold "=")
_SUM = re.compile(r"(\\(?:sum|prod)_(?:\{[^{}]*\}|\w)\^(?:\{[^{}]*\}|\w))(.+)")


def _bounds(op: str) -> str:
    """A big operator's bounds without braces around one token: "\\sum_{i=0}^{n}" == "\\sum_{i=0}^n"."""
    return re.sub(r"([_^])\{(\w)\}", r"\1\2", op)


def _product(s: str) -> str:
    """A summand's run of one-letter symbols as a product: "xk" -> "x*k", "ba_i" -> "b*a_i" (commands kept whole)."""
    return re.sub(r"\\[a-zA-Z]+|[a-zA-Z]{2,}", lambda m: m.group(0) if m.group(0)[0] == "\\" else "*".join(m.group(0)), s)


def _solutions(s: str):
    """'a=1,b=2;a=3,b=4' (solutions separated by ';', each an assignment of the same names) -> '(1,2),(3,4)'."""
    parts = [_assignments(p) for p in _split_top(s, ";") or []]
    if len(parts) < 2 or not all(parts) or any(list(p) != list(parts[0]) for p in parts):
        return None
    return ",".join("(" + ",".join(p.values()) + ")" for p in parts)


def _assignments(s: str):
    """'a=1,b=2' or '(a,b)=(1,2)' -> {'a': '1', 'b': '2'} (two or more names); else None."""
    parts = re.split(r"(?<![<>!])=", s)
    if len(parts) == 2:
        la, ra = _structure(parts[0]), _structure(parts[1])
        if la and ra and la[0] == ra[0] == "bracket()" and len(la[1]) == len(ra[1]):
            return dict(zip(la[1], ra[1]))
        return None
    items = _split_top(s)
    if not items or len(items) < 2:
        return None
    pairs = [re.split(r"(?<![<>!])=", x) for x in items]
    if not all(len(p) == 2 and re.fullmatch(_LABEL, p[0]) for p in pairs):
        return None
    out = dict(pairs)
    return out if len(out) == len(pairs) else None


def _flatten_sets(items):
    """['\\{1,2\\}', '\\{3\\}'] -> ['1', '2', '3'] when every item is a set (pred '\\{..\\},\\{..\\}' vs a flat gold)."""
    out = []
    for x in items:
        st = _structure(normalize(x)) if normalize(x).startswith("\\{") else None
        if not st or st[0] != "set":
            return None
        out += st[1]
    return out


def _match_unordered(xa, xb, deadline, depth) -> bool:
    xa = [y for x in xa for y in (_expand_pm(normalize(x)) or x).split(",")] if any("pm" in x for x in xa) else xa
    xb = [y for x in xb for y in (_expand_pm(normalize(x)) or x).split(",")] if any("pm" in x for x in xb) else xb
    if len(xa) != len(xb) and not any(normalize(y).startswith("\\{") for y in xb):
        xa = _flatten_sets(xa) or xa
    if len(xa) != len(xb):
        return False
    left = [normalize(y) for y in xb]
    for x in xa:
        x = normalize(x)
        hit = next((k for k, y in enumerate(left) if _equiv(x, y, deadline, depth + 1)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def is_equiv(pred, gold, timeout: float = 3.0) -> bool:
    """Whether a predicted answer equals the gold one. Never raises; returns within ~timeout."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if len(pred) > 100 * MAX_LEN:
            return False
        return _equiv(normalize(pred), normalize(gold), time.monotonic() + timeout)
    except Exception:  # noqa: BLE001 - a grader must answer, never crash a training run
        return False


def grade(response: str, gold: str, timeout: float = 3.0) -> bool:
    """extract_answer + is_equiv; when the gold is a list, answers spread over the last paragraph
    ("\\boxed{5} and \\boxed{-2}", "\\(x = -1\\), \\(x = 2\\)") are also compared as one list."""
    if is_equiv(extract_answer(response), gold, timeout):
        return True
    if not isinstance(response, str) or not isinstance(gold, str) or _structure(normalize(gold)) is None:
        return False
    return any(is_equiv(c, gold, timeout) for c in _list_candidates(response))


def _symbolic_equal(a: str, b: str, timeout: float) -> bool:
    """The last resort of _equiv: sympy in a killable worker process (utils/symbolic.py)."""
    from utils.symbolic import symbolic_equal
    return symbolic_equal(a, b, timeout)


# ----------------------------------------------------------------------------- batched
def _grade_chunk(args):
    responses, golds, timeout = args
    return [grade(r, g, timeout) for r, g in zip(responses, golds)]


def grade_batch(responses, golds, timeout: float = 3.0, workers: int | None = None) -> list[bool]:
    """grade() over many pairs, split across processes (each with its own killable sympy worker)."""
    workers = workers or os.cpu_count() or 1
    n = len(responses)
    if workers <= 1 or n < 64:
        return [grade(r, g, timeout) for r, g in zip(responses, golds)]
    size = (n + workers - 1) // workers
    chunks = [(responses[i: i + size], golds[i: i + size], timeout) for i in range(0, n, size)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork" if os.name == "posix" else "spawn")) as ex:
        return [x for part in ex.map(_grade_chunk, chunks) for x in part]
