"""Symbolic equality for the grader: LaTeX read into sympy, compared in a worker process that is killed
when a call passes its timeout, so towers like 2^{2^{2^{100}}} cannot hang or exhaust the caller (C-level
big-integer work is not interruptible by signals, only by a kill). utils/grader.py calls symbolic_equal
last, after every cheaper rule.

    symbolic_equal(a, b, timeout) -> bool     two normalised answers; relations and intervals as sets of reals
    latex_to_sympy_str(s) -> str              the small LaTeX -> sympy translation used there
"""
from __future__ import annotations

import os
import re
import time

from utils.grader import _INEQ, _braced, _split_top


_LATEX_FUNCS = {"\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\cot": "cot", "\\sec": "sec", "\\csc": "csc",
                "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan", "\\ln": "log", "\\log": "log",
                "\\exp": "exp", "\\pi": "pi", "\\infty": "oo", "\\sqrt": "sqrt", "\\alpha": "alpha",
                "\\beta": "beta", "\\theta": "theta", "\\gamma": "gamma_", "\\phi": "phi", "\\mu": "mu"}


def latex_to_sympy_str(s: str) -> str:
    """A small LaTeX -> sympy-expression-string translation (fractions, binomials, roots, powers, functions)."""
    s = s.replace("\\{", "(").replace("\\}", ")")
    for cmd, form in (("\\frac", "(({})/({}))"), ("\\binom", "(binomial(({}),({})))")):  # two brace arguments
        while cmd in s:
            i = s.find(cmd)
            j = i + len(cmd)
            num = _braced(s, j) if j < len(s) and s[j] == "{" else None
            k = j + len(num) + 2 if num is not None else -1
            den = _braced(s, k) if num is not None and k < len(s) and s[k] == "{" else None
            if den is None:
                raise ValueError(f"bad {cmd}")
            s = s[:i] + form.format(num, den) + s[k + len(den) + 2:]
    base = r"\\log_(?:\{(\w+)\}|(\w))\s*"
    s = re.sub(base + r"\(([^()]*)\)", r"log((\3),(\1\2))", s)  # \log_{10}(2) -> log(2, 10)
    s = re.sub(base + r"(\w+)", r"log((\3),(\1\2))", s)  # \log_2 8
    while "\\sqrt[" in s:  # \sqrt[3]{x} -> nthroot((3),(x))
        i = s.find("\\sqrt[")
        j = s.find("]", i)
        arg = _braced(s, j + 1) if j > 0 and j + 1 < len(s) and s[j + 1] == "{" else None
        if arg is None:
            raise ValueError("bad \\sqrt[n]")
        s = s[:i] + f"nthroot(({s[i + 6: j]}),({arg}))" + s[j + 3 + len(arg):]
    for a, b in sorted(_LATEX_FUNCS.items(), key=lambda kv: -len(kv[0])):
        s = s.replace(a, f" {b} " if b not in ("sqrt",) else b)
    if "\\" in s:
        raise ValueError("unknown LaTeX command")
    for _ in range(3):  # n! and (d-k)! -> factorial(...)
        s = re.sub(r"(\w+|\([^()]*\)|\{[^{}]*\})\s*!", r" factorial(\1) ", s)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    return s


def _sympy_job(a: str, b: str) -> bool:
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    tr = standard_transformations + (implicit_multiplication_application, convert_xor)

    def parse(s):
        s = latex_to_sympy_str(s)
        local = {"E": sympy.E, "e": sympy.E, "pi": sympy.pi, "oo": sympy.oo, "i": sympy.I,
                 "nthroot": lambda n, x: sympy.root(x, n), "gamma_": sympy.Symbol("gamma")}
        if "=" in s:
            lhs, rhs = s.split("=", 1)
            return sympy.Eq(parse_expr(lhs, local_dict=local, transformations=tr, evaluate=False),
                            parse_expr(rhs, local_dict=local, transformations=tr, evaluate=False))
        return parse_expr(s, local_dict=local, transformations=tr, evaluate=False)

    def as_set(s):  # an interval, a union or an inequality in one variable, as a subset of the reals; else None
        parts = _split_top(s, "\\cup")
        if parts and len(parts) > 1:
            sets = [as_set(p) for p in parts]
            return sympy.Union(*sets) if all(x is not None for x in sets) else None
        m = re.fullmatch(r"([\[(])([^,]+),([^,]+)([\])])", s)
        if m:
            lo, hi = parse(m.group(2)), parse(m.group(3))
            return sympy.Interval(lo, hi, m.group(1) == "(", m.group(4) == ")")
        terms = re.split(r"(<=|>=|<|>)", s)
        if len(terms) < 3 or "=" in s.replace("<=", "").replace(">=", ""):
            return None
        ex = [parse(t) for t in terms[::2]]
        free = set().union(*(e.free_symbols for e in ex))
        if len(free) != 1:
            return None
        (v,) = free
        ops = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}
        out = sympy.S.Reals
        for lhs, op, rhs in zip(ex, terms[1::2], ex[1:]):
            out = out & sympy.solve_univariate_inequality(ops[op](lhs, rhs), v, relational=False)
        return out

    if _INEQ.search(a) or _INEQ.search(b):  # relations and intervals: compare the sets they describe
        sa, sb = as_set(a), as_set(b)
        return sa is not None and sb is not None and (sa == sb or sa.symmetric_difference(sb).is_empty is True)
    x, y = parse(a), parse(b)
    for e in (x, y):  # refuse towers like 10^{10^{10}} before anything evaluates them (mpmath floats are safe)
        for p in e.atoms(sympy.Pow):
            if any(abs(q.exp) > 1 for q in p.exp.atoms(sympy.Pow) if q.exp.is_Number):
                return str(x) == str(y)  # a tower a^(b^c): never evaluated
            ev = sympy.N(p.exp, 15) if not p.exp.free_symbols else None
            if ev is not None and (not ev.is_real or abs(ev) > 10000) or p.exp.free_symbols and p.exp.has(sympy.Pow):
                return str(x) == str(y)
    if isinstance(x, sympy.Eq) or isinstance(y, sympy.Eq):
        if not (isinstance(x, sympy.Eq) and isinstance(y, sympy.Eq)):
            return False
        dx, dy = x.lhs - x.rhs, y.lhs - y.rhs
        if sympy.simplify(dx - dy) == 0 or sympy.simplify(dx + dy) == 0:
            return True
        r = sympy.simplify(dx / dy)  # the same equation times a nonzero constant: x^2+y^2=4 == 2x^2+2y^2=8
        return bool(r.is_number and r != 0 and r.is_finite)
    x, y = sympy.sympify(x), sympy.sympify(y)
    if x == y:
        return True
    free = x.free_symbols | y.free_symbols
    if not free:
        vx, vy = sympy.N(x, 30), sympy.N(y, 30)
        if vx.is_real and vy.is_real:
            return bool(abs(vx - vy) <= 1e-9 * max(1, abs(vy)))
        return sympy.simplify(x - y) == 0
    if x.free_symbols != y.free_symbols:
        return False
    d = sympy.simplify(x - y)
    if d == 0:
        return True
    import random as _r
    rng = _r.Random(0)
    for _ in range(5):  # numeric identity check at random points, as a last resort
        sub = {s: sympy.Rational(rng.randint(1, 97), rng.randint(1, 13)) for s in free}
        v = sympy.N(d.subs(sub), 30)
        if not v.is_number or abs(v) > 1e-12:
            return False
    return True


def _worker_main():
    """Worker process: reads JSON [a, b] lines on stdin, answers "1"/"0" lines on stdout."""
    import json
    import sys
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB: a runaway bigint dies here
    except (ImportError, ValueError, OSError):
        pass
    import sympy  # noqa: F401 - import before saying ready
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            out = bool(_sympy_job(a, b))
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, parse errors: not equal
            out = False
        sys.stdout.write("1\n" if out else "0\n")
        sys.stdout.flush()


class _Worker:
    """One sympy process, started with the same interpreter; killed (and later restarted) on timeout."""

    def __init__(self):
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from utils.symbolic import _worker_main; _worker_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.warm = False

    def _line(self, deadline: float):
        import select
        ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], max(0.0, deadline - time.monotonic()))
        return self.proc.stdout.readline() if ready else None

    def ask(self, a: str, b: str, timeout: float):
        """True/False, or None when no answer came in time (the worker is then killed, unless it is
        still starting up: a cold start is not a hung job)."""
        import json
        deadline = time.monotonic() + timeout
        try:
            if not self.warm:
                if self._line(deadline) is None:
                    return None
                self.warm = True  # the worker printed "ready" once sympy was imported
            self.proc.stdin.write((json.dumps([a, b]) + "\n").encode())
            self.proc.stdin.flush()
            line = self._line(deadline)
            if line:
                return line.strip() == b"1"
        except (OSError, ValueError):
            pass
        self.proc.kill()  # too slow or dead: the next call starts a fresh worker
        self.proc.wait()
        return None


_WORKER: list = []


_SYMPY_CACHE: dict = {}


def _symbolic_cached(a: str, b: str, timeout: float) -> bool:
    if (a, b) in _SYMPY_CACHE:
        return _SYMPY_CACHE[a, b]
    if not _WORKER or _WORKER[0].proc.poll() is not None:
        _WORKER[:] = [_Worker()]
    out = _WORKER[0].ask(a, b, timeout)
    if out is not None and len(_SYMPY_CACHE) < 100000:  # a timeout is not an answer: not cached
        _SYMPY_CACHE[a, b] = out
    return bool(out)


def symbolic_equal(a: str, b: str, timeout: float) -> bool:
    """Whether sympy finds two normalised answers equal, asked of the worker process (cached); False on a
    timeout, a parse failure or STEPWISE_GRADER_NO_SYMPY."""
    if os.environ.get("STEPWISE_GRADER_NO_SYMPY"):
        return False
    return _symbolic_cached(a, b, timeout)
