"""Answer extraction and grading for math completions (GSM8K, AIME, MATH-500).

`extract_answer` takes the last `\\boxed{...}` / `\\fbox{...}` (nested braces), else the last `#### x` line,
else the last number in the text. `grade(completion, gold)` extracts and compares with `is_equivalent`.

Equivalence, after normalising the LaTeX (`\\left`/`\\right`, `$`, `%`, degrees, `\\text{}` wrappers, trailing
unit words, thousands separators `1,000` / `1{,}000` / `1\\,000` / `1,\\!000`):
- plain text answers compare case-insensitively (`\\text{(C)}` == `C`, `\\text{Evelyn}` == `evelyn`);
- tuples and intervals compare element by element and their brackets must match (`(1,2]` != `[1,2]`);
  bare comma lists, `\\{...\\}` sets and `a \\pm b` compare as unordered multisets; matrices by entry;
- scalars are parsed by a small recursive-descent parser (no eval) and evaluated exactly with `Fraction`
  where possible (`0.5` == `\\frac12`), else as complex floats with relative tolerance 1e-8 (`\\sqrt{12}` ==
  `2\\sqrt3`, `\\frac{\\pi}{2}`); expressions with variables are compared at random rational points;
- `x = 5` matches `5`; two equations match when lhs - rhs agree up to sign.
Decisions: `1,000` is one thousand (a comma followed by exactly three digits in a lone number) while
`1.000` is one; `1,5` is the list {1, 5}, not 1.5. `204_5` matches `204` (base subscript dropped).
A rounded decimal (`0.333`) does not match `\\frac13`. Nothing here raises: bad input grades False.
"""
from __future__ import annotations

import cmath
import math
import operator
import random
import re
from fractions import Fraction

__all__ = ["extract_answer", "grade", "is_equivalent", "normalize_answer"]

_MAX_ANSWER_CHARS = 2000  # longer "answers" are compared as strings only (bounds parser/regex work)

# ---------------------------------------------------------------- extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.M)
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)"
                        r"|(?:(?<![\w)\]}.])-)?(?<![\d.])\.\d+")


def _braced(s: str, start: int) -> tuple[str, int] | None:
    """`s[start] == '{'`: the content up to the matching brace and the index after it (None if unclosed)."""
    depth = 0
    for j in range(start, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1:j], j + 1
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer written in `completion` (raw text, not normalised), or None if there is none.

    A truncated last `\\boxed{` (no closing brace) gives None rather than an earlier guess.
    """
    if not isinstance(completion, str):
        return None
    boxes = list(_BOX_RE.finditer(completion))
    if boxes:
        j = boxes[-1].end()
        while j < len(completion) and completion[j] == " ":
            j += 1
        if j < len(completion) and completion[j] == "{":
            got = _braced(completion, j)
            content = got[0] if got else ""
        else:  # `\boxed 5`: TeX takes one token
            m = re.match(r"[^\s$]+", completion[j:])
            content = m.group(0) if m else ""
        return content.strip() or None
    hashes = [h for h in _HASH_RE.findall(completion) if h]
    if hashes:
        return hashes[-1]
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------- normalisation
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit|operatorname|boxed)"
_UNIT_TEXT_RE = re.compile(r"(?<=[\d}).])\s*" + _TEXT_CMD + r"\s*\{\s*[A-Za-z][A-Za-z\s.]*\}"
                           r"\s*(?:\^\s*\{?\d\}?)?\s*\.?\s*$")
_UNIT_WORDS_RE = re.compile(r"(?<=[\d}).])\s*[A-Za-z]{2,}\.?(?:\s+[A-Za-z]+\.?)*(?:\^\{?\d\}?)?\s*$")
_THOUSANDS_SEP_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|,\\,)\s*(?=\d{3}(?!\d))")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BARE_WORDS = re.compile(r"(?<![\\A-Za-z])(pi|sqrt|infty|inf)(?![A-Za-z])")
_REPLACEMENTS = [("\u2212", "-"), ("\u00d7", r"\times "), ("\u00b7", r"\cdot "), ("\u00f7", r"\div "),
                 ("\u00b0", r"^\circ"), ("\u03c0", r"\pi "), ("\u221e", r"\infty "), ("\u221a", r"\sqrt"),
                 (r"\$", ""), ("$", ""), (r"\%", ""), ("%", ""), (r"\dfrac", r"\frac"),
                 (r"\tfrac", r"\frac"), (r"\cfrac", r"\frac"), (r"\displaystyle", ""), (r"\!", ""),
                 (r"\,", " "), (r"\;", " "), (r"\:", " "), (r"\ ", " "), ("~", " "), (r"\qquad", " "),
                 (r"\quad", " ")]


def normalize_answer(answer: str) -> str:
    """A compact canonical form of an answer string (spaces kept only between a command and a letter)."""
    s = answer.strip().strip("*").strip()  # markdown bold: `#### **18**`
    s = _THOUSANDS_SEP_RE.sub("", s).replace("\\\\", "\x01")  # protect row breaks `\\`
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)
    s = _UNIT_TEXT_RE.sub("", s)
    for _ in range(5):  # unwrap \text{...} (possibly nested)
        s, n = re.subn(_TEXT_CMD + r"\s*\{([^{}]*)\}", r"\1", s)
        if not n:
            break
    s = _BARE_WORDS.sub(lambda m: "\\" + ("infty" if m.group(1) == "inf" else m.group(1)) + " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(\\[A-Za-z]+) (?=[A-Za-z])", "\\1\x00", s).replace(" ", "").replace("\x00", " ")
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"^[A-Za-z]\\in(?![A-Za-z])", "", s)  # `x \in [a,b]`
    s = (s.rstrip(".") if not s.endswith("..") else s).replace("\x01", "\\\\")
    m = re.fullmatch(r"\(([A-Za-z])\)", s)  # multiple-choice `(C)`
    return m.group(1) if m else s


# ---------------------------------------------------------------- structure
def _split_top(s: str, sep: str) -> list[str]:
    """Split at `sep` outside any brackets (any of ([{ opens, any of )]} closes: intervals mix them)."""
    parts, depth, last, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[last:i])
            last = i = i + len(sep)
            continue
        i += 1
    parts.append(s[last:])
    return parts


def _wraps(s: str, start: int) -> bool:
    """The bracket at `s[start]` closes exactly at the last character."""
    depth = 0
    for j in range(start, len(s)):
        depth += (s[j] in "([{") - (s[j] in ")]}")
        if depth == 0:
            return j == len(s) - 1
    return False


def _expand_pm(elems: list[str]) -> list[str]:
    out = []
    for e in elems:
        halves = _split_top(e, r"\pm")
        if len(halves) == 2:
            left, right = halves
            out += [f"{left}+({right})" if left else right, f"{left}-({right})"]
        else:
            out.append(e)
    return out


def _structure(s: str) -> tuple:
    m = re.fullmatch(r"\\begin\{([pbBvV]?matrix)\}(.*)\\end\{\1\}", s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r]
        return ("matrix", [r.split("&") for r in rows])
    if _THOUSANDS_RE.fullmatch(s):
        return ("scalar", s.replace(",", ""))
    if len(parts := _split_top(s, r"\cup")) > 1:
        return ("union", parts)
    if s.startswith("\\{") and s.endswith("\\}") and _wraps(s, 1):
        return ("set", _expand_pm(_split_top(s[2:-2], ",")))
    if s and s[0] in "([" and s[-1] in ")]" and _wraps(s, 0):
        elems = _split_top(s[1:-1], ",")
        if len(elems) > 1:
            return ("tuple", s[0] + s[-1], elems)
    elems = _split_top(s, ",")
    if len(elems) > 1 or len(_split_top(s, r"\pm")) == 2:
        return ("set", _expand_pm(elems))
    if len(sides := _split_top(s, "=")) == 2:
        return ("eq", sides[0], sides[1])
    return ("scalar", s)


_VAR_RE = re.compile(r"[A-Za-z](?:_\w)?|\\[A-Za-z]+")


def _equal(a: str, b: str) -> bool:
    if a == b:
        return a != ""
    if re.fullmatch(r"[A-Za-z ]+", a) and re.fullmatch(r"[A-Za-z ]+", b):
        return a.casefold() == b.casefold()
    sa, sb = _structure(a), _structure(b)
    if sa[0] == "eq" and sb[0] != "eq" and _VAR_RE.fullmatch(sa[1]):
        return _equal(sa[2], b)
    if sb[0] == "eq" and sa[0] != "eq" and _VAR_RE.fullmatch(sb[1]):
        return _equal(a, sb[2])
    if sa[0] != sb[0]:
        return False
    kind = sa[0]
    if kind == "scalar":
        return _scalar_equal(a, b)
    if kind == "eq":
        sides = [_parse(x) for x in (sa[1], sa[2], sb[1], sb[2])]
        return None not in sides and _same_value(("-", *sides[:2]), ("-", *sides[2:]), up_to_sign=True)
    if kind == "tuple":
        return sa[1] == sb[1] and _all_equal(sa[2], sb[2])
    if kind == "union":
        return _all_equal(sa[1], sb[1])
    if kind == "matrix":
        return len(sa[1]) == len(sb[1]) and all(_all_equal(r, q) for r, q in zip(sa[1], sb[1]))
    return _multiset_equal(sa[1], sb[1])  # set


def _all_equal(xs: list[str], ys: list[str]) -> bool:
    return len(xs) == len(ys) and all(_equal(x, y) for x, y in zip(xs, ys))


def _multiset_equal(xs: list[str], ys: list[str]) -> bool:
    if len(xs) != len(ys):
        return False
    if len(xs) > 50:  # pairwise matching is quadratic: long lists must match as sorted strings
        return sorted(xs) == sorted(ys)
    left = list(ys)
    for x in xs:
        hit = next((k for k, y in enumerate(left) if _equal(x, y)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _scalar_equal(a: str, b: str) -> bool:
    base_a, base_b = re.fullmatch(r"(\w+)_\d+", a), re.fullmatch(r"(\w+)_\d+", b)
    if (base_a and base_a.group(1) == b) or (base_b and base_b.group(1) == a):
        return True
    ta, tb = _parse(a), _parse(b)
    # Drop trailing unit words only when that is what stands between the answer and a number.
    if ta is None or (_vars(ta) and tb is not None and not _vars(tb)):
        ta = _parse(_UNIT_WORDS_RE.sub("", a)) or ta
    if tb is None or (_vars(tb) and ta is not None and not _vars(ta)):
        tb = _parse(_UNIT_WORDS_RE.sub("", b)) or tb
    return ta is not None and tb is not None and _same_value(ta, tb)


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


def _parse(s: str) -> tuple | None:
    """AST of a scalar expression, or None if it is not one we can read (words, unknown commands)."""
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not s or len(s) > _MAX_ANSWER_CHARS or re.search(r"(?<![\\A-Za-z])[A-Za-z]{3,}", s):
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


def _vars(node: tuple) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    return set().union(*(_vars(c) for c in node[1:] if isinstance(c, tuple)))


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


def _same_value(a: tuple, b: tuple, up_to_sign: bool = False) -> bool:
    """a == b as numbers; with variables, at random rational points (exact for polynomials).
    `up_to_sign` also accepts a == -b (equations compared as lhs - rhs)."""
    names = sorted(_vars(a) | _vars(b))
    rng = random.Random(20240611)
    points = [{v: Fraction(rng.randint(150, 950), 311) for v in names} for _ in range(4 if names else 1)]
    try:
        pairs = [(_eval(a, env), _eval(b, env)) for env in points]
    except (ArithmeticError, ValueError, TypeError, KeyError):
        return False
    if all(_close(x, y) for x, y in pairs):
        return True
    return up_to_sign and all(_close(x, -y) for x, y in pairs)


# ---------------------------------------------------------------- public
def is_equivalent(prediction: str, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer (both raw strings). Never raises."""
    try:
        if not isinstance(prediction, str) or not isinstance(gold, str):
            return False
        a, b = normalize_answer(prediction), normalize_answer(gold)
        if len(a) > _MAX_ANSWER_CHARS or len(b) > _MAX_ANSWER_CHARS:
            return a == b and a != ""
        return _equal(a, b)
    except Exception:  # noqa: BLE001 - grading must never crash a run: unreadable means wrong
        return False


def grade(completion: str, gold: str) -> bool:
    """True when the final answer of `completion` equals `gold`. Never raises (bad input grades False)."""
    try:
        pred = extract_answer(completion)
        if pred is None or not isinstance(gold, str):
            return False
        if _BOX_RE.search(gold):
            gold = extract_answer(gold) or gold
        return is_equivalent(pred, gold)
    except Exception:  # noqa: BLE001
        return False
