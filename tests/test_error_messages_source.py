"""Source check: no error message in csrc/ inserts a number or a shape into a std::ostream.

On the lent H100/H200 machines every TORCH_CHECK whose message held an integer or a shape crashed
the process (SIGSEGV) instead of raising, in the C++ and the CUDA sources alike: that toolchain's
link put libstdc++'s numeric stream insertion into the extension (see csrc/include/tpswarp/show.h,
which formats numbers without a stream). This test parses every TORCH_CHECK* in csrc/ and fails on
a message argument that is not a string, an op/argument name, a dtype, a device or a ``show(...)``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"

# Message arguments that insert as text: string literals, the op and argument names, show(...),
# std::string(...), dtypes (ScalarType prints its name), devices (printed inside libc10), and
# the helpers that return std::string.
ALLOWED = [
    r'(?:"(?:[^"\\]|\\.)*"\s*)+',
    r"(?:op|kOp|name|a_name|b_name)",
    r"show\(.*\)",
    r"std::string\(.*\)",
    r"tps_item_list\(.*\)",
    r"[\w.>-]*scalar_type\(\)",
    r"[\w.>-]*device\(\)",
    r"(?:t|dtype)",
]
ALLOWED_RE = re.compile(r"^(?:" + "|".join(ALLOWED) + r")$", re.S)


def _sources():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu") and p.name != "show.h")


def _split_args(text):
    """Top-level comma-separated arguments of a macro call's argument text."""
    args, depth, cur, in_str, esc = [], 0, [], False, False
    for ch in text:
        if in_str:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "([{<" and ch != "<":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    args.append("".join(cur).strip())
    return args


def _checks(source):
    """(line, arguments) of each TORCH_CHECK* call in ``source``."""
    for m in re.finditer(r"\bTORCH_CHECK\w*\s*\(", source):
        depth, i, in_str = 1, m.end(), False
        while depth:
            ch = source[i]
            if in_str:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        yield source.count("\n", 0, m.start()) + 1, _split_args(source[m.end():i - 1])


def test_the_parser_flags_a_shape_and_passes_show():
    bad = 'TORCH_CHECK_VALUE(x.dim() == 4, op, ": `x` must be 4-D, got ", x.sizes(), " (", n, ")");'
    good = 'TORCH_CHECK_VALUE(f(a, b), op, ": `x` ", show(x.sizes()), " on ", x.device(), "");'
    flagged = [a for _, args in _checks(bad) for a in args[1:] if not ALLOWED_RE.match(a)]
    assert flagged == ["x.sizes()", "n"]
    assert [a for _, args in _checks(good) for a in args[1:] if not ALLOWED_RE.match(a)] == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(CSRC)))
def test_error_messages_insert_no_numbers(path):
    offending = [f"{path.name}:{line}: {arg}" for line, args in _checks(path.read_text())
                 for arg in args[1:] if not ALLOWED_RE.match(arg)]
    assert not offending, "wrap numbers and shapes in show(...) (tpswarp/show.h):\n" + "\n".join(offending)
