"""Every log event, every `reason=` and every `error what=` the code can write is in docs/logs.md.

The lines are built in several places (Session._log, the Log actions of admission, the
drivers' EventLog.event calls, the checks' Verdict fields, Session._close for `end`), so
this test reads the source with `ast` instead of trusting a list:

- an *emitter* is a call to `Log(...)`, `_log(...)` or `<log>.event(...)` whose first
  argument is the event name; its `reason=` / `what=` keyword, or its `("reason", X)` /
  `("what", X)` pair, is a value of that event;
- `Verdict(check, ...)` (checks.Verdict; a module's own Verdict class, like s25r's, is
  not it) logs under `checks.CHECKS[check].event`, with the `("reason", X)` pair of its
  fields;
- `_close(X)` is the `end` line's reason X.

A value is resolved to strings: a literal; both arms of `a if c else b`; a parameter of the
enclosing function, through every call of that function in libtarpit/ and wrappers/; and
the few values that come from elsewhere, each resolved where it is made (RESOLVERS below:
the greylist's Decision, the relay's close=, the Admission's reason, the HELO rules). A
value this test cannot resolve fails it, naming the file and line: teach it, do not skip.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOGS_MD = ROOT / "docs" / "logs.md"
EMITTERS = {"Log", "_log", "event"}
FIELDS = ("reason", "what")
# Values the code can build that are never written, with why (checked to still exist).
NEVER_LOGGED = {
    ("greylist_pass", "reason", "off"):
        "Greylist.check answers it only for a normal client without greylist_normal, and "
        "Session._greylist_check never asks for one (it passes suspicious=True, or the plain "
        "greylist that sets greylist_normal)",
}


def sources() -> list[Path]:
    return sorted([*ROOT.glob("libtarpit/*.py"), *ROOT.glob("wrappers/*.py")])


@dataclass(frozen=True)
class Found:
    """One thing the code can log: event, and field/value (None for the event itself)."""

    event: str
    field: str | None
    value: str | None
    where: str


class Unresolved(Exception):
    pass


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


class Scan:
    """The parsed sources, with each node's enclosing function, and the resolver."""

    def __init__(self, paths: list[Path]):
        self.trees: dict[str, ast.Module] = {}
        self.owner: dict[int, ast.FunctionDef | None] = {}
        self.file_of: dict[int, str] = {}
        for path in paths:
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(), rel)
            self.trees[rel] = tree
            self._index(tree, None, rel)

    def _index(self, node: ast.AST, func: ast.FunctionDef | None, rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            self.owner[id(child)] = func
            self.file_of[id(child)] = rel
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            self._index(child, inner, rel)

    def calls(self, rel: str | None = None):
        for name, tree in self.trees.items():
            if rel is None or name == rel:
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call):
                        yield name, node

    def where(self, node: ast.AST) -> str:
        return f"{self.file_of.get(id(node), '?')}:{getattr(node, 'lineno', '?')}"

    def functions(self, name: str) -> list[ast.FunctionDef]:
        return [n for t in self.trees.values() for n in ast.walk(t)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]

    def returns(self, func: ast.FunctionDef) -> set[str]:
        """The string literals a function returns (through `a if c else b`)."""
        out: set[str] = set()
        for node in ast.walk(func):
            if isinstance(node, ast.Return) and node.value is not None:
                out |= self.resolve(node.value, None, none=True)
        return out

    def resolve(self, expr: ast.expr, event: str | None, depth: int = 0, none: bool = False) -> set[str]:
        """The strings `expr` can be; Unresolved (with file:line) when this test cannot tell.

        `none`: a None literal is no value (a rule function that returns None found nothing).
        """
        if depth > 6:
            raise Unresolved(f"{self.where(expr)}: {ast.unparse(expr)} (too deep)")
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if none and isinstance(expr, ast.Constant) and expr.value is None:
            return set()
        if isinstance(expr, ast.IfExp):
            return (self.resolve(expr.body, event, depth + 1, none)
                    | self.resolve(expr.orelse, event, depth + 1, none))
        text = ast.unparse(expr)
        for pattern, resolver in RESOLVERS.items():
            if re.fullmatch(pattern, text):
                return resolver(self, expr, event)
        func = self.owner.get(id(expr))
        if isinstance(expr, ast.Name) and func is not None:
            params = [a.arg for a in func.args.args]
            if expr.id in params:
                return self._through_callers(func, params.index(expr.id), expr.id, event, depth)
        raise Unresolved(f"{self.where(expr)}: {text}")

    def _through_callers(self, func: ast.FunctionDef, index: int, param: str,
                         event: str | None, depth: int) -> set[str]:
        method = bool(func.args.args) and func.args.args[0].arg == "self"
        out: set[str] = set()
        sites = 0
        for _, call in self.calls():
            if _name(call.func) != func.name or call is None:
                continue
            arg = next((k.value for k in call.keywords if k.arg == param), None)
            position = index - 1 if method and isinstance(call.func, ast.Attribute) else index
            if arg is None and 0 <= position < len(call.args):
                arg = call.args[position]
            if arg is None:
                continue
            sites += 1
            out |= self.resolve(arg, event, depth + 1)
        if not sites:
            raise Unresolved(f"{self.where(func)}: parameter {param} of {func.name}() has no caller")
        return out


def _decision(scan: Scan, expr: ast.expr, event: str | None) -> set[str]:
    """greylist.Decision(action, reason): the reasons of the action this event logs."""
    action = {"greylist_pass": "pass", "greylist_defer": "defer"}[event]
    out: set[str] = set()
    for _, call in scan.calls("libtarpit/greylist.py"):
        if _name(call.func) == "Decision" and len(call.args) >= 2 \
                and isinstance(call.args[0], ast.Constant) and call.args[0].value == action:
            reason = call.args[1]
            if isinstance(reason, ast.Call):  # self._pass_reason(rec): what that method returns
                for func in scan.functions(_name(reason.func) or ""):
                    out |= scan.returns(func)
            else:
                out |= scan.resolve(reason, event)
    assert out, f"no Decision({action!r}, ...) found in libtarpit/greylist.py"
    return out


def _close_keyword(scan: Scan, expr: ast.expr, event: str | None) -> set[str]:
    """A queued local reply's close=: every close="..." given to a call."""
    out = {v for _, call in scan.calls() for k in call.keywords if k.arg == "close"
           for v in scan.resolve(k.value, event)}
    assert out, "no close= keyword found"
    return out


def _admission_reason(scan: Scan, expr: ast.expr, event: str | None) -> set[str]:
    """Admission.reason: its default, and reason= in Admission(...) or adm._replace(...)."""
    from libtarpit.admission import Admission

    out = {Admission().reason}
    for _, call in scan.calls("libtarpit/admission.py"):
        receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
        if _name(call.func) == "Admission" or (
                _name(call.func) == "_replace" and isinstance(receiver, ast.Name) and receiver.id == "adm"):
            out |= {v for k in call.keywords if k.arg == "reason" for v in scan.resolve(k.value, event)}
    return out


def _helo_rules(scan: Scan, expr: ast.expr, event: str | None) -> set[str]:
    """checks.helo's reason: whatever a function in checks._HELO_RULES returns."""
    from libtarpit import checks

    assert scan.owner[id(expr)].name == "helo", scan.where(expr)
    return {v for _, rule in checks._HELO_RULES for f in scan.functions(rule.__name__)
            for v in scan.returns(f)}


RESOLVERS = {
    r"decision\.reason": _decision,
    r"p\.close": _close_keyword,
    r"adm\.reason": _admission_reason,
    r"reason": _helo_rules,  # the only bare `reason` that is no parameter: checks.helo's
}


def _pairs(node: ast.expr | None):
    """("reason", X) / ("what", X) pairs in a tuple of pairs (Log's and Verdict's fields)."""
    if isinstance(node, ast.Tuple):
        for item in node.elts:
            if (isinstance(item, ast.Tuple) and len(item.elts) == 2
                    and isinstance(item.elts[0], ast.Constant) and item.elts[0].value in FIELDS):
                yield item.elts[0].value, item.elts[1]


def _own_verdict(scan: Scan, rel: str) -> bool:
    """True for a module with a Verdict class of its own (s25r's), which logs nothing."""
    return rel != "libtarpit/checks.py" and any(
        isinstance(n, ast.ClassDef) and n.name == "Verdict" for n in scan.trees[rel].body)


def _verdict_events(scan: Scan, call: ast.Call) -> set[str]:
    from libtarpit import checks

    check = call.args[0] if call.args else None
    if isinstance(check, ast.Constant):
        return {checks.CHECKS[check.value].event}
    # checks.helo loops over _HELO_RULES: its check names are that table's
    assert scan.owner[id(call)].name == "helo", scan.where(call)
    return {checks.CHECKS[name].event for name, _ in checks._HELO_RULES}


def collect(scan: Scan) -> tuple[set[Found], list[str]]:
    """Return everything the sources can log, and what could not be resolved."""

    found: set[Found] = set()
    unresolved: list[str] = []

    def add(events: set[str], field: str | None, expr: ast.expr | None, where: str) -> None:
        for event in events:
            if expr is None:
                found.add(Found(event, None, None, where))
                continue
            try:
                values = scan.resolve(expr, event)
            except Unresolved as e:
                unresolved.append(f"{event} {field}=: {e}")
                continue
            found.update(Found(event, field, v, where) for v in values)

    for rel, call in scan.calls():
        name, where = _name(call.func), scan.where(call)
        func = scan.owner.get(id(call))
        if name in EMITTERS and call.args:
            first = call.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                events = {first.value}
            elif isinstance(first, ast.Attribute) and first.attr == "event":
                continue  # a driver writing a Log action built elsewhere (found there)
            elif func is not None and func.name == "_log":
                continue  # Session._log itself: its callers are the emitters
            elif func is not None and func.name == "_judge":
                continue  # a verdict's event: found at its Verdict(...) below
            else:
                unresolved.append(f"event: {where}: {ast.unparse(first)}")
                continue
            add(events, None, None, where)
            for k in call.keywords:
                if k.arg in FIELDS:
                    add(events, k.arg, k.value, where)
            for field, expr in _pairs(call.args[1] if len(call.args) > 1 else None):
                add(events, field, expr, where)
        elif name == "Verdict" and call.args and not _own_verdict(scan, rel):
            events = _verdict_events(scan, call)
            add(events, None, None, where)
            for field, expr in _pairs(call.args[3] if len(call.args) > 3 else None):
                add(events, field, expr, where)
        elif name == "_close" and call.args and rel == "libtarpit/session.py":
            add({"end"}, "reason", call.args[0], where)
    found = {f for f in found if (f.event, f.field, f.value) not in NEVER_LOGGED}
    return found, unresolved


def sections(markdown: str) -> dict[str, str]:
    """docs/logs.md's `### \\`event\\`` sections: event -> its text (to the next heading)."""
    out: dict[str, str] = {}
    parts = re.split(r"^### `([a-z_]+)`[ \t]*$", markdown, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = re.split(r"^#{1,3} ", body, maxsplit=1, flags=re.M)[0]
    return out


def missing(found: set[Found], markdown: str) -> list[str]:
    """What `found` has that `markdown` does not document, one line each.

    An event needs its `### \\`event\\`` section; an `end` reason or an `error` what= needs
    a table row starting with it (`| \\`value\\` |`); any other reason needs `value` in
    backquotes, or reason=value, in its event's section.
    """
    docs = sections(markdown)
    out: list[str] = []
    for f in sorted(found, key=lambda f: (f.event, f.field or "", f.value or "")):
        text = docs.get(f.event)
        if text is None:
            out.append(f"event {f.event} (logged at {f.where}) has no ### `{f.event}` section")
        elif f.value is None:
            continue
        elif f.event in ("end", "error"):
            if not re.search(rf"^\| `{re.escape(f.value)}` \|", text, re.M):
                out.append(f"{f.event} {f.field}={f.value} (logged at {f.where}) is not a row "
                           f"of the table in ### `{f.event}`")
        elif f"`{f.value}`" not in text and f"{f.field}={f.value}" not in text:
            out.append(f"{f.event} {f.field}={f.value} (logged at {f.where}) is not "
                       f"mentioned in ### `{f.event}`")
    return sorted(set(out))


@pytest.fixture(scope="module")
def scanned() -> tuple[set[Found], list[str]]:
    return collect(Scan(sources()))


def test_every_value_the_code_logs_is_resolved(scanned):
    _, unresolved = scanned
    assert unresolved == [], "teach this test where these values come from:\n" + "\n".join(unresolved)


def test_the_scan_finds_what_we_know_is_logged(scanned):
    """If a refactor hid the emitters from the scan, the coverage test would pass on nothing."""
    found, _ = scanned
    events = {f.event for f in found}
    values = {(f.event, f.value) for f in found}
    assert {"connect", "exec", "end", "error", "tarpit_start", "tarpit_lost", "tarpit_done",
            "pipelining", "pregreet", "greet_lost", "helo_reject", "rcpt_reject",
            "greylist_defer", "greylist_pass", "auth", "tls", "conn_limit"} <= events
    assert {("end", "timeout"), ("end", "session_limit"), ("end", "policy"), ("end", "tempfail"),
            ("end", "conn_limit"), ("end", "tarpit_lost"), ("error", "config"),
            ("error", "control"), ("error", "internal"), ("error", "rdns"), ("error", "greylist"),
            ("error", "backend"), ("error", "exec"), ("helo_reject", "literal"),
            ("helo_reject", "nodot"), ("rcpt_reject", "unknown_user"),
            ("greylist_defer", "too_early"), ("greylist_pass", "sat_through"),
            ("greylist_pass", "no_tarpit")} <= values


def test_never_logged_values_still_exist(scanned):
    """An exclusion must name something the code still builds, or it hides nothing."""
    scan = Scan(sources())
    for event, field, value in NEVER_LOGGED:
        assert value in _decision(scan, None, event), (event, field, value)


def test_every_event_reason_and_what_is_in_logs_md(scanned):
    found, _ = scanned
    gaps = missing(found, LOGS_MD.read_text())
    assert gaps == [], "docs/logs.md lacks:\n" + "\n".join(gaps)


def test_every_event_section_in_logs_md_is_logged_by_the_code(scanned):
    found, _ = scanned
    documented = set(sections(LOGS_MD.read_text()))
    assert documented - {f.event for f in found} == set(), "documented but never logged"


def test_the_check_fails_on_a_doc_without_them(scanned):
    found, _ = scanned
    doc = LOGS_MD.read_text()
    without_row = doc.replace("| `session_limit` |", "| session limit |")
    assert any("end reason=session_limit" in g for g in missing(found, without_row))
    without_section = re.sub(r"^### `slow_data`$", "### slow data", doc, flags=re.M)
    assert any(g.startswith("event slow_data") for g in missing(found, without_section))
