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

import re

from engine.tasks.latex_expr import MAX_ANSWER_CHARS, THOUSANDS_RE, parse_expression, same_value, variables

__all__ = ["extract_answer", "grade", "is_equivalent", "normalize_answer"]


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
    if THOUSANDS_RE.fullmatch(s):
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
        sides = [parse_expression(x) for x in (sa[1], sa[2], sb[1], sb[2])]
        return None not in sides and same_value(("-", *sides[:2]), ("-", *sides[2:]), up_to_sign=True)
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
    ta, tb = parse_expression(a), parse_expression(b)
    # Drop trailing unit words only when that is what stands between the answer and a number.
    if ta is None or (variables(ta) and tb is not None and not variables(tb)):
        ta = parse_expression(_UNIT_WORDS_RE.sub("", a)) or ta
    if tb is None or (variables(tb) and ta is not None and not variables(ta)):
        tb = parse_expression(_UNIT_WORDS_RE.sub("", b)) or tb
    return ta is not None and tb is not None and same_value(ta, tb)


# ---------------------------------------------------------------- public
def is_equivalent(prediction: str, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer (both raw strings). Never raises."""
    try:
        if not isinstance(prediction, str) or not isinstance(gold, str):
            return False
        a, b = normalize_answer(prediction), normalize_answer(gold)
        if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
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
