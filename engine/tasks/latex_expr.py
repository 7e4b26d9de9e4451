"""A small LaTeX arithmetic subset for the grader: a recursive-descent parser (no eval) to a tuple AST,
and numeric comparison (exact with `Fraction` where possible, else complex floats with relative
tolerance 1e-8; expressions with variables compared at random rational points).

`parse_expression(s)` -> AST or None; `variables(ast)`; `same_value(a, b, up_to_sign=False)`.
"""
from __future__ import annotations

import cmath
import math
import operator
import random
import re
from fractions import Fraction

__all__ = ["MAX_ANSWER_CHARS", "THOUSANDS_RE", "parse_expression", "same_value", "variables"]

MAX_ANSWER_CHARS = 2000  # longer "answers" are compared as strings only (bounds parser/regex work)
THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # 1,000 or 12,345.5: one number


# ---------------------------------------------------------------- parser (LaTeX subset -> tuple AST)
_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\\[A-Za-z]+)|([A-Za-z])|(\\[{}]|[-+*/^(){}\[\]]))")
_FUNCS = {r"\sin": cmath.sin, r"\cos": cmath.cos, r"\tan": cmath.tan, r"\cot": lambda x: 1 / cmath.tan(x),
          r"\sec": lambda x: 1 / cmath.cos(x), r"\csc": lambda x: 1 / cmath.sin(x), r"\ln": cmath.log,
          r"\log": cmath.log10, r"\exp": cmath.exp, r"\arcsin": cmath.asin, r"\arccos": cmath.acos,
          r"\arctan": cmath.atan}
_ATOMS = {r"\pi": ("pi",), r"\infty": ("inf",), "i": ("i",)}
_CLOSE = {"(": ")", "{": "}", "\\{": "\\}", "[": "]"}


def _tokenize(s: str) -> list[str] | None:
    tokens, pos, s = [], 0, s.strip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m:
            return None
        tokens.append(m.group(m.lastindex))
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (+|- term)*; term := unary ((*|/|implicit) power)*; unary := -unary | power;
    power := primary (^ arg)?; TeX macro arguments are `{expr}` or a single token (`\\frac34`)."""

    def __init__(self, tokens: list[str]) -> None:
        self.t, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, expect: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expect is not None and tok != expect):
            raise ValueError(f"expected {expect!r}, got {tok!r}")
        self.i += 1
        return tok

    def expr(self) -> tuple:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = (self.take(), node, self.term())
        return node

    def term(self) -> tuple:
        node = self.unary()
        while (tok := self.peek()) is not None:
            if tok in ("*", r"\cdot", r"\times", "/", r"\div"):
                self.take()
                node = ("/" if tok in ("/", r"\div") else "*", node, self.unary())
            elif tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in ("(", "{", r"\frac", r"\sqrt") \
                    or tok in _ATOMS or tok in _FUNCS:
                node = ("*", node, self.power())
            else:
                return node
        return node

    def unary(self) -> tuple:
        if self.peek() in ("+", "-"):
            sign, operand = self.take(), self.unary()
            return ("neg", operand) if sign == "-" else operand
        return self.power()

    def power(self) -> tuple:
        base = self.primary()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.unary() if self.peek() in ("+", "-") else self.arg())
        return base

    def arg(self) -> tuple:
        tok = self.peek()
        if tok == "{":
            self.take()
            node = self.expr()
            self.take("}")
            return node
        if tok is not None and tok[0].isdigit() and len(tok) > 1:  # TeX takes one digit: \frac34
            self.t = self.t[:self.i] + [tok[0], tok[1:]] + self.t[self.i + 1:]
        return self.primary()

    def primary(self) -> tuple:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            node = ("num", Fraction(tok))
            if self.peek() == r"\frac" and tok.isdigit():  # mixed number 1\frac{4}{5} = 9/5
                saved = (self.i, list(self.t))
                frac = self.primary()
                if frac[1][0] == "num" and frac[2][0] == "num":
                    return ("+", node, frac)
                self.i, self.t = saved
            return node
        if tok in _CLOSE:
            node = self.expr()
            self.take(_CLOSE[tok])
            return node
        if tok == r"\frac":
            return ("/", self.arg(), self.arg())
        if tok == r"\sqrt":
            index = ("num", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return ("root", self.arg(), index)
        if tok in _ATOMS:
            return _ATOMS[tok]
        if tok in _FUNCS:
            return ("fn", tok, self.power())
        if tok.isalpha():
            return ("var", tok)
        raise ValueError(f"unexpected token {tok!r}")


def parse_expression(s: str) -> tuple | None:
    """AST of a scalar expression, or None if it is not one we can read (words, unknown commands)."""
    if THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not s or len(s) > MAX_ANSWER_CHARS or re.search(r"(?<![\\A-Za-z])[A-Za-z]{3,}", s):
        return None
    tokens = _tokenize(s)
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        node = parser.expr()
    except (ValueError, IndexError, ZeroDivisionError):
        return None
    return node if parser.i == len(parser.t) else None


def variables(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(variables(c) for c in node[1:] if isinstance(c, tuple)))


# ---------------------------------------------------------------- evaluation
Number = Fraction | float | complex


def _int_root(v: int, n: int) -> int | None:
    if v.bit_length() > 2000:
        return None
    r = math.isqrt(v) if n == 2 else round(v ** (1.0 / n))
    return next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** n == v), None)


def _root(x: Number, n: Number) -> Number:
    if isinstance(n, Fraction) and n.denominator == 1 and 2 <= n <= 64:
        k = int(n)
        if isinstance(x, Fraction) and x >= 0:
            num, den = _int_root(x.numerator, k), _int_root(x.denominator, k)
            if num is not None and den is not None:
                return Fraction(num, den)
        if k % 2 and complex(x).imag == 0 and complex(x).real < 0:
            return -((-complex(x).real) ** (1.0 / k))
    return complex(x) ** (1 / complex(n))


def _pow(a: Number, b: Number) -> Number:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1:
        bits = max(a.numerator.bit_length(), a.denominator.bit_length(), 1)
        if abs(b.numerator) * bits <= 65536:  # exact, but never a runaway big-int power
            return a ** b.numerator
    return complex(a) ** complex(b)


_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "^": _pow,
           "root": _root}
_CONSTANTS = {"pi": math.pi, "inf": math.inf, "i": 1j}


def _eval(node: tuple, env: dict[str, Number]) -> Number:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind in _CONSTANTS:
        return _CONSTANTS[kind]
    if kind == "neg":
        return -_eval(node[1], env)
    if kind == "fn":
        return _FUNCS[node[1]](complex(_eval(node[2], env)))
    return _BINARY[kind](_eval(node[1], env), _eval(node[2], env))


def _close(x: Number, y: Number) -> bool:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    x, y = complex(x), complex(y)
    if cmath.isnan(x) or cmath.isnan(y):
        return False
    if cmath.isinf(x) or cmath.isinf(y):
        return x == y
    return abs(x - y) <= 1e-8 * max(abs(x), abs(y)) + 1e-12


def same_value(a: tuple, b: tuple, up_to_sign: bool = False) -> bool:
    """a == b as numbers; with variables, at random rational points (exact for polynomials).
    `up_to_sign` also accepts a == -b (equations compared as lhs - rhs)."""
    names = sorted(variables(a) | variables(b))
    rng = random.Random(20240611)
    points = [{v: Fraction(rng.randint(150, 950), 311) for v in names} for _ in range(4 if names else 1)]
    try:
        pairs = [(_eval(a, env), _eval(b, env)) for env in points]
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return False
    if all(_close(x, y) for x, y in pairs):
        return True
    return up_to_sign and all(_close(x, -y) for x, y in pairs)


