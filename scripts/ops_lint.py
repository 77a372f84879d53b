#!/usr/bin/env python3
"""Lint Bulwark's dashboards and alert rules against each other and a real /metrics dump (O2, O3).

Usage:
  scripts/ops_lint.py --metrics FILE [--root DIR]   lint the repository's ops files
  scripts/ops_lint.py --self-test                     prove the linter rejects broken input

Checks (each failure is a violation; any violation exits 1):
  dashboards/grafana/*.json
    - valid JSON with a non-empty `uid`, a datasource template variable of type prometheus;
    - every panel (rows are walked into) has a unique integer `id`, `datasource` and every
      target's `datasource` refer to that variable, `fieldConfig.defaults.unit` is set;
    - every target's `expr` and every query variable parses as PromQL (Grafana's variables
      allowed in strings and ranges; label_values()/query_result()/metrics()/label_names() in
      variables);
    - every rate() / irate() / increase() range is `[$__rate_interval]`.
  dashboards/alerts/*.rules.yaml
    - valid YAML (no duplicate keys); every rule's `expr` parses as PromQL;
    - every alerting rule has `for`, `labels.severity` (page|ticket), annotations `summary`,
      `description`, `runbook_url`; the runbook file exists and has the anchor;
    - dashboards/alerts/*_test.yaml has, for every alert, a case where it fires and one where it
      does not.
  Every metric that a PromQL expression selects (the vector selectors of its parse tree: panel
  targets, template queries, rules) exists in the /metrics dump, is recorded by a recording rule,
  or is listed in dashboards/metrics-allowlist.txt with a comment naming the test that exercises
  it (and still appears in the Rust sources).

Needs PyYAML and promql-parser (Python bindings of the promql-parser crate), pinned in
scripts/requirements.txt; scripts/check-ops runs this file with that virtualenv's Python.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

try:
    import promql_parser as promql
    import yaml
except ImportError as e:  # pragma: no cover - depends on the interpreter
    sys.exit(
        f"ops_lint.py: cannot import {e.name}: run it with the scripts' virtualenv "
        "(scripts/check-ops does; or `.venv-helm/bin/python scripts/ops_lint.py`, "
        "pins in scripts/requirements.txt)"
    )

RUNBOOK_URL_PREFIX = "https://github.com/bulwark/bulwark/blob/main/"
SEVERITIES = {"page", "ticket"}
RATE_FUNCS = ("rate", "irate", "increase")
RATE_INTERVAL = "$__rate_interval"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------- reporting


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def bad(self, where: str, msg: str) -> None:
        self.violations.append(f"{where}: {msg}")

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}")


# --------------------------------------------------------------------------- YAML (PyYAML)


class YamlError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_load(text: str):
    """One YAML document, safely loaded; YamlError names the line and the problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise YamlError(f"{where}{problem}{f' ({context})' if context else ''}") from None


# --------------------------------------------------------------------------- PromQL (promql-parser)

# Grafana's variables in a dashboard expression: $name, ${name} and ${name:format}.
GRAFANA_VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")
# A Grafana variable used as a range ([$__rate_interval]) is parsed as a duration nobody writes,
# one per variable, so that the rate check can tell which variable the range was.
_SENTINEL_SECONDS = 900_000_000
# Grafana's own functions of query variables (not PromQL).
GRAFANA_QUERY_RE = re.compile(r"\s*(label_values|label_names|metrics|query_result)\s*\((.*)\)\s*", re.S)


@dataclass
class Query:
    """One parsed PromQL expression and where it was found."""

    where: str
    text: str  # as written in the file
    ast: object | None  # promql_parser.Expr; None for a Grafana query that names no metric
    ranges: dict[timedelta, str] = field(default_factory=dict)  # sentinel range -> Grafana variable


def one_line(expr: str, limit: int = 160) -> str:
    s = " ".join(expr.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def grafana_to_promql(expr: str) -> tuple[str, dict[timedelta, str]]:
    """PromQL for a dashboard expression: Grafana variables inside strings become plain words,
    those inside a range `[...]` become sentinel durations (returned, to map back). Variables
    anywhere else are left alone, so the expression fails to parse and is reported."""
    out: list[str] = []
    ranges: dict[str, int] = {}
    quote = None
    in_range = False
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\" and quote != "`":
                out.append(expr[i : i + 2])
                i += 2
                continue
            if ch == quote:
                quote = None
            elif ch == "$" and (m := GRAFANA_VAR_RE.match(expr, i)):
                out.append(f"grafana_var_{m.group(1) or m.group(2)}")
                i = m.end()
                continue
        elif ch in "\"'`":
            quote = ch
        elif ch == "#":  # a PromQL comment runs to the end of the line
            end = expr.find("\n", i)
            end = len(expr) if end < 0 else end
            out.append(expr[i:end])
            i = end
            continue
        elif ch == "[":
            in_range = True
        elif ch == "]":
            in_range = False
        elif ch == "$" and in_range and (m := GRAFANA_VAR_RE.match(expr, i)):
            var = "$" + (m.group(1) or m.group(2))
            seconds = ranges.setdefault(var, _SENTINEL_SECONDS + len(ranges))
            out.append(f"{seconds}s")
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out), {timedelta(seconds=s): v for v, s in ranges.items()}


def parse_promql(where: str, expr: str, report: Report, grafana: bool = False) -> Query | None:
    """Parse one expression; a parse error is a violation naming the place and the expression."""
    text, ranges = grafana_to_promql(expr) if grafana else (expr, {})
    try:
        ast = promql.parse(text)
    except ValueError as e:
        hint = ""
        if grafana and GRAFANA_VAR_RE.search(re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|\[[^\]]*\]', "", expr)):
            hint = " (Grafana variables are understood only inside strings and ranges)"
        report.bad(where, f"PromQL does not parse: {e}{hint}: {one_line(expr)}")
        return None
    return Query(where, expr, ast, ranges)


def _split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments (commas in strings, braces, parens left alone)."""
    parts, depth, quote, cur = [], 0, None, []
    for i, ch in enumerate(args):
        if quote:
            if ch == quote and args[i - 1] != "\\":
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_grafana_query(where: str, q: str, report: Report) -> Query | None:
    """A query variable: Grafana's label_values(), label_names(), metrics(), query_result(), or
    plain PromQL."""
    m = GRAFANA_QUERY_RE.fullmatch(q)
    if not m:
        return parse_promql(where, q, report, grafana=True)
    func, args = m.group(1), _split_args(m.group(2))
    if func == "metrics":  # metrics(regex): a regex over names, no selector
        return Query(where, q, None)
    if func == "query_result":
        return parse_promql(where, m.group(2), report, grafana=True)
    # label_values(label), label_values(selector, label), label_names(), label_names(selector)
    if func == "label_values":
        if not args or len(args) > 2 or not re.fullmatch(r"[a-zA-Z_]\w*", args[-1]):
            report.bad(where, f"label_values() takes (label) or (series selector, label): {one_line(q)}")
            return None
        selector = args[0] if len(args) == 2 else None
    else:
        if len(args) > 1:
            report.bad(where, f"label_names() takes at most a series selector: {one_line(q)}")
            return None
        selector = args[0] if args else None
    if selector is None:
        return Query(where, q, None)
    parsed = parse_promql(where, selector, report, grafana=True)
    if parsed is not None and not isinstance(parsed.ast, promql.VectorSelector):
        report.bad(where, f"{func}() needs a series selector, not {type(parsed.ast).__name__}: {one_line(q)}")
        return None
    return parsed


def walk(ast):
    """Every node of a parse tree, depth first."""
    nodes: list = []
    if ast is not None:
        promql.walk(ast, lambda n: nodes.append(n))
    return nodes


def selected_metrics(q: Query) -> tuple[set[str], list[str]]:
    """Metric names of the vector selectors in the parse tree (the selector's name, or its
    `__name__="..."` matchers); and the selectors whose name is only matched by a regex."""
    names: set[str] = set()
    unresolved: list[str] = []
    for node in walk(q.ast):
        if not isinstance(node, promql.VectorSelector):
            continue
        if node.name:
            names.add(node.name)
            continue
        groups = [node.matchers.matchers] + list(node.matchers.or_matchers or [])
        found = False
        for group in groups:
            for m in group:
                if m.name == "__name__" and m.op == promql.MatchOp.Equal:
                    names.add(m.value)
                    found = True
        if not found:
            unresolved.append(str(node))
    return names, unresolved


def rate_interval_problems(q: Query) -> list[str]:
    problems = []
    for node in walk(q.ast):
        if not isinstance(node, promql.Call) or node.func.name not in RATE_FUNCS:
            continue
        name = node.func.name
        arg = node.args[0] if node.args else None
        if not isinstance(arg, (promql.MatrixSelector, promql.SubqueryExpr)):
            problems.append(f"{name}() without a range selector")
            continue
        var = q.ranges.get(arg.range)
        if var != RATE_INTERVAL:
            shown = var or promql.display_duration(arg.range)
            problems.append(f"{name}(...[{shown}]) must use [{RATE_INTERVAL}]")
    return problems


def experimental_functions(q: Query) -> set[str]:
    """Functions that Prometheus runs only with --enable-feature=promql-experimental-functions."""
    return {n.func.name for n in walk(q.ast) if isinstance(n, promql.Call) and n.func.experimental}


# --------------------------------------------------------------------------- the /metrics dump


def parse_metrics_dump(text: str) -> tuple[set[str], dict[str, str]]:
    names: set[str] = set()
    types: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
                names.add(parts[2])
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line)
        if m:
            names.add(m.group(1))
    return names, types


def metric_exists(name: str, names: set[str], types: dict[str, str]) -> bool:
    if name in names:
        return True
    for suf in HISTOGRAM_SUFFIXES:
        if name.endswith(suf) and types.get(name[: -len(suf)]) in ("histogram", "summary"):
            return True
    return False


def base_name(name: str, types: dict[str, str], allow: dict[str, str]) -> str:
    """The histogram a _bucket/_sum/_count series belongs to (per the dump or the allow-list)."""
    for suf in HISTOGRAM_SUFFIXES:
        base = name[: -len(suf)]
        if name.endswith(suf) and (types.get(base) in ("histogram", "summary") or base in allow):
            return base
    return name


def parse_allowlist(text: str, where: str, report: Report) -> dict[str, str]:
    allow: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        name, _, comment = s.partition("#")
        name, comment = name.strip(), comment.strip()
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            report.bad(f"{where}:{n}", f"not a metric name: {name!r}")
            continue
        if not comment:
            report.bad(f"{where}:{n}", f"{name}: needs a comment naming the test that exercises it")
        allow[name] = comment
    return allow


# --------------------------------------------------------------------------- dashboards


def datasource_variables(dash: dict) -> set[str]:
    out = set()
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") == "datasource" and v.get("query") == "prometheus":
            out.add(v.get("name"))
    return out


def refers_to_variable(ds, variables: set[str]) -> bool:
    uid = ds.get("uid") if isinstance(ds, dict) else ds
    if isinstance(ds, dict) and ds.get("type") not in (None, "prometheus"):
        return False
    return isinstance(uid, str) and uid in {f"${v}" for v in variables} | {f"${{{v}}}" for v in variables}


def walk_panels(panels):
    for p in panels or []:
        yield p
        if p.get("type") == "row" or p.get("panels"):
            yield from walk_panels(p.get("panels"))


def lint_dashboard(where: str, text: str, report: Report) -> list[Query]:
    """Returns every parsed PromQL expression (targets and query variables)."""
    queries: list[Query] = []
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as e:
        report.bad(where, f"invalid JSON: {e}")
        return queries
    if not isinstance(dash, dict):
        report.bad(where, "not a JSON object")
        return queries
    if not isinstance(dash.get("uid"), str) or not dash["uid"].strip():
        report.bad(where, "missing stable `uid`")
    variables = datasource_variables(dash)
    if not variables:
        report.bad(where, "no templated datasource variable (templating.list[] type=datasource, query=prometheus)")
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        vw = f"{where} variable ${v.get('name')}"
        if not refers_to_variable(v.get("datasource"), variables):
            report.bad(vw, f"datasource {v.get('datasource')!r} is not the templated datasource variable")
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if isinstance(q, str) and q:
            parsed = parse_grafana_query(vw, q, report)
            if parsed is not None:
                queries.append(parsed)
    ids: dict[int, str] = {}
    for p in walk_panels(dash.get("panels")):
        pw = f"{where} panel {p.get('id')!r} {p.get('title', '')!r}"
        pid = p.get("id")
        if not isinstance(pid, int):
            report.bad(pw, "missing integer `id` (stable panel ids)")
        elif pid in ids:
            report.bad(pw, f"duplicate panel id (also {ids[pid]})")
        else:
            ids[pid] = p.get("title", "")
        if p.get("type") == "row":
            continue
        if not refers_to_variable(p.get("datasource"), variables):
            report.bad(pw, f"datasource {p.get('datasource')!r} is not the templated datasource variable")
        unit = (((p.get("fieldConfig") or {}).get("defaults")) or {}).get("unit")
        if not isinstance(unit, str) or not unit.strip():
            report.bad(pw, "fieldConfig.defaults.unit is not set")
        targets = p.get("targets") or []
        if not targets:
            report.bad(pw, "no targets")
        for t in targets:
            tw = f"{pw} target {t.get('refId')}"
            if "datasource" in t and not refers_to_variable(t["datasource"], variables):
                report.bad(tw, f"datasource {t['datasource']!r} is not the templated datasource variable")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                report.bad(tw, "no PromQL `expr`")
                continue
            parsed = parse_promql(tw, expr, report, grafana=True)
            if parsed is None:
                continue
            for problem in rate_interval_problems(parsed):
                report.bad(tw, problem)
            queries.append(parsed)
    return queries


# --------------------------------------------------------------------------- rules and runbooks


def github_anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for m in re.finditer(r'<a\s+(?:id|name)="([^"]+)"', line):
            anchors.add(m.group(1))
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = m.group(1).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def lint_rules(where: str, text: str, report: Report, runbook_lookup) -> tuple[list[Query], set[str], set[str]]:
    """Returns the parsed expressions, alert names and recorded metric names."""
    queries: list[Query] = []
    alerts: set[str] = set()
    recorded: set[str] = set()
    try:
        doc = yaml_load(text)
    except YamlError as e:
        report.bad(where, f"cannot read YAML: {e}")
        return queries, alerts, recorded
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        report.bad(where, "no `groups`")
        return queries, alerts, recorded
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            report.bad(f"{where} groups[{gi}]", "not a mapping")
            continue
        for ri, r in enumerate(g.get("rules") or []):
            if not isinstance(r, dict):
                report.bad(f"{where} group {g.get('name')!r} rules[{ri}]", "not a mapping")
                continue
            name = r.get("alert") or r.get("record")
            rw = f"{where} {'alert' if 'alert' in r else 'record'} {name}"
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                report.bad(rw, "no `expr`")
            else:
                parsed = parse_promql(rw, expr, report)
                if parsed is not None:
                    queries.append(parsed)
            if "record" in r:
                recorded.add(r["record"])
                continue
            alerts.add(name)
            if not r.get("for"):
                report.bad(rw, "no `for:`")
            sev = (r.get("labels") or {}).get("severity")
            if sev not in SEVERITIES:
                report.bad(rw, f"labels.severity is {sev!r}, want one of {sorted(SEVERITIES)}")
            ann = r.get("annotations") or {}
            for key in ("summary", "description", "runbook_url"):
                if not isinstance(ann.get(key), str) or not ann[key].strip():
                    report.bad(rw, f"annotation `{key}` missing")
            url = ann.get("runbook_url")
            if isinstance(url, str) and url.strip():
                problem = runbook_lookup(url.strip())
                if problem:
                    report.bad(rw, problem)
    return queries, alerts, recorded


def make_runbook_lookup(read_file):
    """read_file(relative path) -> text or None."""

    def lookup(url: str):
        path, sep, anchor = url.partition("#")
        if path.startswith(RUNBOOK_URL_PREFIX):
            path = path[len(RUNBOOK_URL_PREFIX) :]
        elif path.startswith("http"):
            return f"runbook_url {url} is not under {RUNBOOK_URL_PREFIX}"
        path = re.sub(r"^(\.\./)+", "", path)
        if not path.startswith("docs/runbooks/") or not path.endswith(".md"):
            return f"runbook_url {url} does not point into docs/runbooks/*.md"
        if not sep or not anchor:
            return f"runbook_url {url} has no #anchor"
        text = read_file(path)
        if text is None:
            return f"runbook {path} does not exist"
        if anchor not in github_anchors(text):
            return f"runbook {path} has no anchor #{anchor}"
        return None

    return lookup


def lint_rule_tests(tests: list[tuple[str, str]], alerts: set[str], report: Report) -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for where, text in tests:
        try:
            doc = yaml_load(text)
        except YamlError as e:
            report.bad(where, f"cannot read YAML: {e}")
            continue
        if not isinstance(doc, dict):
            report.bad(where, "not a YAML mapping with `tests`")
            continue
        for t in doc.get("tests") or []:
            for a in (t.get("alert_rule_test") if isinstance(t, dict) else None) or []:
                if isinstance(a, dict):
                    (fires if a.get("exp_alerts") else quiet).add(a.get("alertname"))
    for a in sorted(alerts):
        if a not in fires:
            report.bad("dashboards/alerts/*_test.yaml", f"alert {a} has no test case where it fires")
        if a not in quiet:
            report.bad("dashboards/alerts/*_test.yaml", f"alert {a} has no test case where it does not fire")


# --------------------------------------------------------------------------- metrics cross-check


def check_metrics(
    queries: list[Query],
    recorded: set[str],
    dump_text: str,
    allow: dict[str, str],
    sources: str | None,
    report: Report,
) -> dict[str, str]:
    names, types = parse_metrics_dump(dump_text)
    status: dict[str, str] = {}
    users: dict[str, list[str]] = {}
    for q in queries:
        selected, unresolved = selected_metrics(q)
        for sel in unresolved:
            report.warn(q.where, f"selector {sel} names no metric (only a regex on __name__): not checked against the dump")
        for fn in sorted(experimental_functions(q)):
            report.warn(q.where, f"{fn}() is experimental in Prometheus (needs --enable-feature=promql-experimental-functions)")
        for name in sorted(selected):
            base = base_name(name, types, allow)
            users.setdefault(base, []).append(q.where)
            if name in recorded or metric_exists(name, names, types):
                status[base] = "ok"
            elif base in allow:
                status.setdefault(base, "allow-listed")
            else:
                status[base] = "MISSING"
                report.bad(q.where, f"metric {name} is not in the /metrics dump (nor allow-listed)")
    for name, comment in allow.items():
        if metric_exists(name, names, types):
            report.warn("metrics-allowlist", f"{name} is in the dump now: remove it from the allow-list")
        if name not in users:
            report.warn("metrics-allowlist", f"{name} is not used by any dashboard or rule")
        if sources is not None and f'"{name}"' not in sources:
            report.bad("metrics-allowlist", f"{name} does not appear in the Rust sources: stale entry")
    return status


# --------------------------------------------------------------------------- the repository


def lint_repository(root: Path, dump_text: str) -> Report:
    report = Report()
    queries: list[Query] = []
    alerts: set[str] = set()
    recorded: set[str] = set()

    dashboards = sorted((root / "dashboards" / "grafana").glob("*.json"))
    if not dashboards:
        report.bad("dashboards/grafana", "no dashboards found")
    for f in dashboards:
        rel = str(f.relative_to(root))
        before = len(queries)
        queries += lint_dashboard(rel, f.read_text(), report)
        report.notes.append(f"dashboard {rel}: {len(queries) - before} PromQL expressions parsed")

    def read_rel(path: str):
        p = root / path
        return p.read_text() if p.is_file() else None

    lookup = make_runbook_lookup(read_rel)
    rule_files = sorted((root / "dashboards" / "alerts").glob("*.rules.yaml"))
    if not rule_files:
        report.bad("dashboards/alerts", "no *.rules.yaml found")
    for f in rule_files:
        rel = str(f.relative_to(root))
        e, a, r = lint_rules(rel, f.read_text(), report, lookup)
        queries += e
        alerts |= a
        recorded |= r
        report.notes.append(f"rules {rel}: {len(a)} alerts, {len(r)} recording rules, {len(e)} PromQL expressions parsed")
    tests = [(str(f.relative_to(root)), f.read_text()) for f in sorted((root / "dashboards" / "alerts").glob("*_test.yaml"))]
    lint_rule_tests(tests, alerts, report)

    allow_file = root / "dashboards" / "metrics-allowlist.txt"
    allow = parse_allowlist(allow_file.read_text(), str(allow_file.relative_to(root)), report) if allow_file.is_file() else {}
    sources = "\n".join(p.read_text(errors="replace") for d in ("modules", "app") for p in sorted((root / d).rglob("*.rs")))
    status = check_metrics(queries, recorded, dump_text, allow, sources or None, report)
    for name in sorted(status):
        extra = f"  # {allow[name]}" if status[name] == "allow-listed" else ""
        report.notes.append(f"metric {name}: {status[name]}{extra}")
    return report


def print_report(report: Report) -> None:
    for n in report.notes:
        print(f"  {n}")
    for w in report.warnings:
        print(f"WARN  {w}")
    for v in report.violations:
        print(f"FAIL  {v}")
    print(f"ops_lint: {len(report.violations)} violation(s), {len(report.warnings)} warning(s)")


# --------------------------------------------------------------------------- self-test


def self_test() -> int:
    failures: list[str] = []

    def expect(cond: bool, what: str) -> None:
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    def has(report: Report, needle: str) -> bool:
        return any(needle in v for v in report.violations)

    def metrics_of(expr: str, grafana: bool = True, variable: bool = False) -> set[str] | None:
        r = Report()
        q = parse_grafana_query("t", expr, r) if variable else parse_promql("t", expr, r, grafana=grafana)
        return None if q is None else selected_metrics(q)[0]

    # Metric names come from the vector selectors of the parse tree.
    got = metrics_of(
        'sum by (module, le) (rate(bulwark_http_request_duration_seconds_bucket{module=~"$module", status="a b"}[$__rate_interval]))'
        ' / on (job) group_left (version) bulwark_build_info and up == 0 or vector(0) > bool 1e3'
    )
    expect(got == {"bulwark_http_request_duration_seconds_bucket", "bulwark_build_info", "up"}, f"metric extraction {sorted(got or [])}")
    expect(metrics_of('label_values(bulwark_build_info{job=~"$job"}, instance)', variable=True) == {"bulwark_build_info"}, "label_values() metric")
    expect(metrics_of("label_values(bulwark_build_info, job)", variable=True) == {"bulwark_build_info"}, "label_values() without matchers")
    expect(metrics_of("label_values(job)", variable=True) == set(), "label_values(label) names no metric")
    expect(metrics_of('query_result(topk(5, sum by (route) (rate(m_total{job=~"${job:regex}"}[5m]))))', variable=True) == {"m_total"}, "query_result() metric")
    expect(metrics_of("x offset 10m unless y") == {"x", "y"}, "offset and unless")
    expect(metrics_of('{__name__="m_total", job="a"} or {__name__="n_total"}') == {"m_total", "n_total"}, "{__name__=...} selectors")
    # Functions nobody listed are functions, not metric names; strings and labels are not metrics.
    expect(
        metrics_of('sort_by_label(label_replace(m_total, "dst_total", "$1", "src", "(.*)"), "dst_total") + double_exponential_smoothing(g[10m], 0.5, 0.5)')
        == {"m_total", "g"},
        "newer functions (sort_by_label, double_exponential_smoothing) are not metrics",
    )
    r = Report()
    q = parse_promql("t", 'count({__name__=~"bulwark_.*"})', r)
    r2 = Report()
    check_metrics([q], set(), "", {}, None, r2)
    expect(q is not None and any("only a regex on __name__" in w for w in r2.warnings), "a regex-only selector is warned about")

    def rate_problems(expr: str) -> list[str]:
        q = parse_promql("t", expr, Report(), grafana=True)
        return rate_interval_problems(q) if q else ["does not parse"]

    expect(rate_problems('rate(a[5m]) + increase(b{c="[1m]"}[$__rate_interval])') == ["rate(...[5m]) must use [$__rate_interval]"], "rate interval check")
    expect(rate_problems("irate(a[$__interval])") == ["irate(...[$__interval]) must use [$__rate_interval]"], "rate interval check names the variable")
    expect(rate_problems("increase((a)[$__rate_interval:])") == [], "rate over a subquery with $__rate_interval")

    # PromQL that does not parse is rejected, with the place, the parser's message and the text.
    for expr, needle in [
        ("sum(rate(m_total[5m])) by (le", "PromQL does not parse"),
        ("rat(m_total[5m])", "unknown function"),
        ("rate(m_total)", "expected type matrix"),
        ("sum by ($label) (m_total)", "only inside strings and ranges"),
    ]:
        r = Report()
        parse_promql("where", expr, r, grafana=True)
        expect(has(r, needle) and r.violations[0].startswith("where: "), f"{expr!r} rejected ({r.violations[:1]})")

    # YAML through PyYAML, duplicate keys refused.
    y = yaml_load("a: 1\nb:\n  - x: 'q''s'\n    y: |\n      l1\n      l2\n  - \"z\"\nc: >-\n  f1\n  f2\nd: []\n")
    expect(y == {"a": 1, "b": [{"x": "q's", "y": "l1\nl2\n"}, "z"], "c": "f1 f2", "d": []}, f"yaml {y!r}")
    for text, needle in [("a: 1\nb: 2\na: 3\n", "line 3, column 1: duplicate key 'a' (first on line 1)"), ("a: [1\n", "line 2")]:
        try:
            yaml_load(text)
            expect(False, f"bad YAML {text!r} rejected")
        except YamlError as e:
            expect(needle in str(e), f"bad YAML rejected: {e}")

    dump = "# TYPE m_total counter\nm_total{a=\"1\"} 1\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 1\n"
    runbook = "# Runbook\n## GoodAlert\ntext\n"
    lookup = make_runbook_lookup(lambda p: runbook if p == "docs/runbooks/x.md" else None)
    ds = {"type": "prometheus", "uid": "${datasource}"}
    templ = {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]}

    good_dash = {
        "uid": "good", "templating": templ,
        "panels": [{"id": 1, "type": "row", "panels": [{
            "id": 2, "type": "timeseries", "datasource": ds, "fieldConfig": {"defaults": {"unit": "reqps"}},
            "targets": [{"refId": "A", "datasource": ds, "expr": "sum(rate(m_total[$__rate_interval]))"},
                        {"refId": "B", "expr": "histogram_quantile(0.99, sum by (le) (rate(h_seconds_bucket[$__rate_interval])))"}]}]}],
    }
    r = Report()
    e = lint_dashboard("good.json", json.dumps(good_dash), r)
    check_metrics(e, set(), dump, {}, None, r)
    expect(not r.violations and len(e) == 2, f"a good dashboard passes {r.violations}")

    broken_dash = {
        "templating": templ,
        "panels": [
            {"id": 1, "type": "row", "panels": [{
                "id": 2, "type": "timeseries", "datasource": {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"},
                "fieldConfig": {"defaults": {}},
                "targets": [{"refId": "A", "expr": "sum(rate(m_total[5m])) + renamed_metric_total"},
                            {"refId": "B", "expr": "sum(rate(m_total[$__rate_interval])"}]}]},
            {"id": 2, "type": "stat", "datasource": ds, "fieldConfig": {"defaults": {"unit": "s"}},
             "targets": [{"refId": "A", "expr": "m_total"}]},
        ],
    }
    r = Report()
    e = lint_dashboard("broken.json", json.dumps(broken_dash), r)
    check_metrics(e, set(), dump, {}, None, r)
    expect(has(r, "missing stable `uid`"), "broken dashboard: missing uid rejected")
    expect(has(r, "not the templated datasource variable"), "broken dashboard: hard-coded datasource in a nested panel rejected")
    expect(has(r, "unit is not set"), "broken dashboard: missing unit rejected")
    expect(has(r, "must use [$__rate_interval]"), "broken dashboard: rate(...[5m]) rejected")
    expect(has(r, "metric renamed_metric_total is not in the /metrics dump"), "broken dashboard: unknown metric rejected")
    expect(has(r, "duplicate panel id"), "broken dashboard: duplicate panel id rejected")
    expect(has(r, "target B: PromQL does not parse"), "broken dashboard: unparsable target rejected")
    r = Report()
    lint_dashboard("bad.json", "{not json", r)
    expect(has(r, "invalid JSON"), "invalid JSON rejected")

    good_rules = """groups:
  - name: g
    rules:
      - record: job:m:rate5m
        expr: sum by (job) (rate(m_total[5m]))
      - alert: GoodAlert
        expr: job:m:rate5m > 1 and sum(rate(h_seconds_bucket[5m])) > 0
        for: 5m
        labels:
          severity: page
        annotations:
          summary: s
          description: >-
            d
          runbook_url: https://github.com/bulwark/bulwark/blob/main/docs/runbooks/x.md#goodalert
"""
    r = Report()
    e, alerts, rec = lint_rules("good.rules.yaml", good_rules, r, lookup)
    check_metrics(e, rec, dump, {}, None, r)
    expect(not r.violations and alerts == {"GoodAlert"} and len(e) == 2, f"a good rule passes {r.violations}")

    broken_rules = """groups:
  - name: g
    rules:
      - alert: BrokenAlert
        expr: bulwark_consumer_lag_messages > 100
        labels:
          team: ops
        annotations:
          summary: s
          runbook_url: docs/runbooks/x.md#no-such-anchor
      - alert: UnparsableAlert
        expr: sum(rate(m_total[5m]) > 1
        for: 5m
        labels:
          severity: page
        annotations:
          summary: s
          description: d
          runbook_url: docs/runbooks/x.md#goodalert
"""
    r = Report()
    e, alerts, rec = lint_rules("broken.rules.yaml", broken_rules, r, lookup)
    check_metrics(e, rec, dump, {}, None, r)
    expect(has(r, "no `for:`"), "broken rule: missing for rejected")
    expect(has(r, "labels.severity"), "broken rule: missing severity rejected")
    expect(has(r, "annotation `description` missing"), "broken rule: missing description rejected")
    expect(has(r, "no anchor #no-such-anchor"), "broken rule: runbook anchor missing rejected")
    expect(has(r, "metric bulwark_consumer_lag_messages is not in the /metrics dump"), "broken rule: invented metric rejected")
    expect(has(r, "alert UnparsableAlert: PromQL does not parse"), "broken rule: unparsable expr rejected")
    r = Report()
    lint_rules("dup.rules.yaml", good_rules.replace("        for: 5m\n", "        for: 5m\n        for: 1m\n"), r, lookup)
    expect(has(r, "cannot read YAML: line") and has(r, "duplicate key 'for'"), f"rule file with a duplicate key rejected {r.violations}")

    tests = """tests:
  - input_series: []
    alert_rule_test:
      - eval_time: 5m
        alertname: GoodAlert
        exp_alerts:
          - exp_labels:
              severity: page
"""
    r = Report()
    lint_rule_tests([("t_test.yaml", tests)], {"GoodAlert", "Untested"}, r)
    expect(has(r, "GoodAlert has no test case where it does not fire"), "rule tests: missing negative case rejected")
    expect(has(r, "Untested has no test case where it fires"), "rule tests: untested alert rejected")

    r = Report()
    allow = parse_allowlist("lazy_total\nnot a name # x\n", "allow.txt", r)
    check_metrics([parse_promql("x", "rate(lazy_total[5m])", r)], set(), dump, allow, "fn f() {}", r)
    expect(has(r, "needs a comment"), "allow-list entry without a comment rejected")
    expect(has(r, "not a metric name"), "allow-list garbage rejected")
    expect(has(r, "does not appear in the Rust sources"), "stale allow-list entry rejected")

    print(f"ops_lint self-test: {len(failures)} failure(s)")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", type=Path, help="a /metrics dump of a running Bulwark")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--self-test", action="store_true", help="check that broken input is rejected")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if not args.metrics:
        ap.error("--metrics FILE is required (or --self-test)")
    report = lint_repository(args.root, args.metrics.read_text())
    print_report(report)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
