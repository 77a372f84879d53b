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
    - every rate( / irate( / increase( range is `[$__rate_interval]`.
  dashboards/alerts/*.rules.yaml
    - every alerting rule has `for`, `labels.severity` (page|ticket), annotations `summary`,
      `description`, `runbook_url`; the runbook file exists and has the anchor;
    - dashboards/alerts/*_test.yaml has, for every alert, a case where it fires and one where it
      does not.
  Every metric named in a PromQL expression (panel targets, template queries, rules) exists in the
  /metrics dump, or is listed in dashboards/metrics-allowlist.txt with a comment naming the test
  that exercises it (and still appears in the Rust sources).

Python 3.11 standard library only: YAML is read with a small parser for the block-style subset
these files use (promtool validates the full files separately).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

RUNBOOK_URL_PREFIX = "https://github.com/bulwark/bulwark/blob/main/"
SEVERITIES = {"page", "ticket"}
RATE_FUNCS = ("rate", "irate", "increase")

# PromQL functions, aggregations, keywords and modifiers: never metric names.
PROMQL_WORDS = {
    # aggregations and their modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio", "by", "without",
    # binary operators and vector matching
    "and", "or", "unless", "bool", "on", "ignoring", "group_left", "group_right", "atan2",
    # modifiers and literals
    "offset", "start", "end", "inf", "nan", "Inf", "NaN", "le", "quantile",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sort_by_label", "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
    # Grafana template functions
    "label_values", "query_result", "metrics", "label_names",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Z = "(?<![\\w$:.])"  # a token starts here: not inside a word, a $variable or a number
TOKEN_RE = re.compile(Z + r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*[{\[)]|\s|$)")
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")


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


# --------------------------------------------------------------------------- a small YAML reader


class YamlError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"" and (i == 0 or line[i - 1] in " \t:-[{,"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            break
        out.append(ch)
    return "".join(out).rstrip()


KEY_RE = re.compile(r"""^("(?:[^"\\]|\\.)*"|'[^']*'|[^'"\s#\-\[{][^:]*?|-[^\s:][^:]*?)\s*:(?:\s+(.*))?$""")


def _scalar(text: str, where: int):
    t = text.strip()
    if t == "":
        return None
    if t.startswith('"'):
        if not t.endswith('"') or len(t) < 2:
            raise YamlError(f"line {where}: unterminated double-quoted string")
        try:
            return json.loads(t)
        except json.JSONDecodeError as e:
            raise YamlError(f"line {where}: bad double-quoted string: {e}") from None
    if t.startswith("'"):
        if not t.endswith("'") or len(t) < 2:
            raise YamlError(f"line {where}: unterminated single-quoted string")
        return t[1:-1].replace("''", "'")
    if t == "[]":
        return []
    if t == "{}":
        return {}
    if t[0] in "[{&*!|>%@`":
        raise YamlError(f"line {where}: unsupported YAML construct {t[:20]!r}")
    if t in ("true", "True"):
        return True
    if t in ("false", "False"):
        return False
    if t in ("null", "~"):
        return None
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if re.fullmatch(r"-?\d+\.\d*", t):
        return float(t)
    return t


def yaml_load(text: str):
    """Block-style YAML subset: mappings, sequences, plain/quoted scalars, |/> block scalars."""
    raw = text.split("\n")
    lines: list[tuple[int, str, int]] = []  # (indent, content, line number)
    i = 0
    while i < len(raw):
        line = raw[i].rstrip("\r")
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise YamlError(f"line {i + 1}: tab in indentation")
        content = _strip_comment(line)
        if content.strip() in ("---", "..."):
            i += 1
            continue
        if content.strip():
            indent = len(content) - len(content.lstrip(" "))
            lines.append((indent, content.strip(), i + 1))
            m = re.search(r"(?::|^-)\s*([|>])([+-]?)\s*$", content.strip())
            if m:  # block scalar: keep its lines verbatim (comments included)
                body = []
                j = i + 1
                while j < len(raw) and (raw[j].strip() == "" or len(raw[j]) - len(raw[j].lstrip(" ")) > indent):
                    body.append(raw[j].rstrip("\r"))
                    j += 1
                lines.append((-1, "\n".join(body), i + 2))
                i = j
                continue
        i += 1

    def block_scalar(style: str, chomp: str, body: str) -> str:
        blines = body.split("\n")
        while blines and not blines[-1].strip():
            blines.pop()
        nonempty = [b for b in blines if b.strip()]
        ind = min((len(b) - len(b.lstrip(" ")) for b in nonempty), default=0)
        blines = [b[ind:] for b in blines]
        if style == "|":
            s = "\n".join(blines)
        else:
            parts, para = [], []
            for b in blines:
                if b.strip():
                    para.append(b.strip())
                else:
                    parts.append(" ".join(para))
                    para = []
            parts.append(" ".join(para))
            s = "\n".join(parts)
        return s if chomp == "-" else s + "\n"

    pos = 0

    def value_after(rest: str, indent: int, lineno: int):
        nonlocal pos
        m = re.fullmatch(r"([|>])([+-]?)", rest.strip()) if rest else None
        if m:
            body = lines[pos][1] if pos < len(lines) and lines[pos][0] == -1 else ""
            if pos < len(lines) and lines[pos][0] == -1:
                pos += 1
            return block_scalar(m.group(1), m.group(2), body)
        if rest:
            if pos < len(lines) and lines[pos][0] > indent:
                raise YamlError(f"line {lines[pos][2]}: multi-line plain scalars are not supported")
            return _scalar(rest, lineno)
        if pos < len(lines) and lines[pos][0] > indent:
            return parse(lines[pos][0])
        if pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("-"):
            return parse(indent)  # "key:\n- item" at the same indent
        return None

    def parse(indent: int):
        nonlocal pos
        indent_, content, lineno = lines[pos]
        if content == "-" or content.startswith("- "):
            seq = []
            while pos < len(lines) and lines[pos][0] == indent and (
                lines[pos][1] == "-" or lines[pos][1].startswith("- ")
            ):
                _, content, lineno = lines[pos]
                rest = content[1:].lstrip(" ")
                if not rest:
                    pos += 1
                    seq.append(value_after("", indent, lineno))
                elif KEY_RE.match(rest):
                    # "- key: value": a mapping whose column is after the dash
                    lines[pos] = (indent + len(content) - len(rest), rest, lineno)
                    seq.append(parse(lines[pos][0]))
                else:
                    pos += 1
                    seq.append(value_after(rest, indent, lineno))
            return seq
        mapping: dict = {}
        while pos < len(lines) and lines[pos][0] == indent:
            _, content, lineno = lines[pos]
            if content.startswith("- ") or content == "-":
                break
            m = KEY_RE.match(content)
            if not m:
                raise YamlError(f"line {lineno}: expected 'key: value', got {content[:40]!r}")
            key = _scalar(m.group(1), lineno)
            if key in mapping:
                raise YamlError(f"line {lineno}: duplicate key {key!r}")
            pos += 1
            mapping[key] = value_after((m.group(2) or "").strip(), indent, lineno)
        if pos < len(lines) and lines[pos][0] > indent:
            raise YamlError(f"line {lines[pos][2]}: unexpected indentation")
        return mapping

    if not lines:
        return None
    result = parse(lines[0][0])
    if pos != len(lines):
        raise YamlError(f"line {lines[pos][2]}: unexpected content")
    return result


# --------------------------------------------------------------------------- PromQL


def strip_promql(expr: str) -> str:
    """The expression without strings, label matchers, grouping labels and durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"#[^\n]*", " ", s)  # PromQL comments
    s = re.sub(r"\{[^{}]*\}", "{}", s)
    s = GROUPING_RE.sub(lambda m: f"{m.group(1)} ()", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    return s


def metric_names(expr: str) -> set[str]:
    s = strip_promql(expr)
    # Grafana's label_values(metric, label) / label_values(label): the label is no metric.
    s = re.sub(r"\blabel_values\s*\(\s*[a-zA-Z_]\w*\s*\)", "label_values()", s)
    s = re.sub(r"\blabel_values\s*\(([^(),]*),\s*[a-zA-Z_]\w*\s*\)", r"label_values(\1 )", s)
    names = set()
    for m in TOKEN_RE.finditer(s):
        tok = m.group(1)
        if tok in PROMQL_WORDS or tok.lower() in ("inf", "nan"):
            continue
        names.add(tok)
    return names


def matching_paren(s: str, open_idx: int) -> int:
    depth = 0
    quote = None
    for i in range(open_idx, len(s)):
        ch = s[i]
        if quote:
            if ch == "\\":
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(s)


def rate_interval_problems(expr: str) -> list[str]:
    problems = []
    for m in re.finditer(Z + r"(" + "|".join(RATE_FUNCS) + r")\s*\(", expr):
        start = m.end() - 1
        arg = expr[start : matching_paren(expr, start) + 1]
        ranges = re.findall(r"\[([^\]]*)\]", re.sub(r"\{[^{}]*\}", "{}", arg))
        if not ranges:
            problems.append(f"{m.group(1)}() without a range selector")
        for r in ranges:
            if r.strip() != "$__rate_interval":
                problems.append(f"{m.group(1)}(...[{r}]) must use [$__rate_interval]")
    return problems


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


def lint_dashboard(where: str, text: str, report: Report) -> list[tuple[str, str]]:
    """Returns (location, expr) of every PromQL expression."""
    exprs: list[tuple[str, str]] = []
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as e:
        report.bad(where, f"invalid JSON: {e}")
        return exprs
    if not isinstance(dash, dict):
        report.bad(where, "not a JSON object")
        return exprs
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
            exprs.append((vw, q))
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
            for problem in rate_interval_problems(expr):
                report.bad(tw, problem)
            exprs.append((tw, expr))
    return exprs


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


def lint_rules(where: str, text: str, report: Report, runbook_lookup) -> tuple[list[tuple[str, str]], set[str], set[str]]:
    """Returns expressions, alert names and recorded metric names."""
    exprs: list[tuple[str, str]] = []
    alerts: set[str] = set()
    recorded: set[str] = set()
    try:
        doc = yaml_load(text)
    except YamlError as e:
        report.bad(where, f"cannot read YAML: {e}")
        return exprs, alerts, recorded
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        report.bad(where, "no `groups`")
        return exprs, alerts, recorded
    for g in groups:
        for r in (g or {}).get("rules") or []:
            name = r.get("alert") or r.get("record")
            rw = f"{where} {'alert' if 'alert' in r else 'record'} {name}"
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                report.bad(rw, "no `expr`")
            else:
                exprs.append((rw, expr))
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
    return exprs, alerts, recorded


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
        for t in (doc or {}).get("tests") or []:
            for a in (t or {}).get("alert_rule_test") or []:
                (fires if a.get("exp_alerts") else quiet).add(a.get("alertname"))
    for a in sorted(alerts):
        if a not in fires:
            report.bad("dashboards/alerts/*_test.yaml", f"alert {a} has no test case where it fires")
        if a not in quiet:
            report.bad("dashboards/alerts/*_test.yaml", f"alert {a} has no test case where it does not fire")


# --------------------------------------------------------------------------- metrics cross-check


def check_metrics(
    exprs: list[tuple[str, str]],
    recorded: set[str],
    dump_text: str,
    allow: dict[str, str],
    sources: str | None,
    report: Report,
) -> dict[str, str]:
    names, types = parse_metrics_dump(dump_text)
    status: dict[str, str] = {}
    users: dict[str, list[str]] = {}
    for where, expr in exprs:
        for name in sorted(metric_names(expr)):
            base = base_name(name, types, allow)
            users.setdefault(base, []).append(where)
            if name in recorded or metric_exists(name, names, types):
                status[base] = "ok"
            elif base in allow:
                status.setdefault(base, "allow-listed")
            else:
                status[base] = "MISSING"
                report.bad(where, f"metric {name} is not in the /metrics dump (nor allow-listed)")
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
    exprs: list[tuple[str, str]] = []
    alerts: set[str] = set()
    recorded: set[str] = set()

    dashboards = sorted((root / "dashboards" / "grafana").glob("*.json"))
    if not dashboards:
        report.bad("dashboards/grafana", "no dashboards found")
    for f in dashboards:
        rel = str(f.relative_to(root))
        before = len(exprs)
        exprs += lint_dashboard(rel, f.read_text(), report)
        report.notes.append(f"dashboard {rel}: {len(exprs) - before} expressions")

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
        exprs += e
        alerts |= a
        recorded |= r
        report.notes.append(f"rules {rel}: {len(a)} alerts, {len(r)} recording rules")
    tests = [(str(f.relative_to(root)), f.read_text()) for f in sorted((root / "dashboards" / "alerts").glob("*_test.yaml"))]
    lint_rule_tests(tests, alerts, report)

    allow_file = root / "dashboards" / "metrics-allowlist.txt"
    allow = parse_allowlist(allow_file.read_text(), str(allow_file.relative_to(root)), report) if allow_file.is_file() else {}
    sources = "\n".join(p.read_text(errors="replace") for d in ("modules", "app") for p in sorted((root / d).rglob("*.rs")))
    status = check_metrics(exprs, recorded, dump_text, allow, sources or None, report)
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

    # Metric extraction.
    got = metric_names(
        'sum by (module, le) (rate(bulwark_http_request_duration_seconds_bucket{module=~"$module", status="a b"}[$__rate_interval]))'
        ' / on (job) group_left (version) bulwark_build_info and up == 0 or vector(0) > bool 1e3'
    )
    expect(got == {"bulwark_http_request_duration_seconds_bucket", "bulwark_build_info", "up"}, f"metric extraction {sorted(got)}")
    expect(metric_names('label_values(bulwark_build_info{job=~"$job"}, instance)') == {"bulwark_build_info"}, "label_values() metric")
    expect(metric_names("label_values(bulwark_build_info, job)") == {"bulwark_build_info"}, "label_values() without matchers")
    expect(metric_names("label_values(job)") == set(), "label_values(label) names no metric")
    expect(metric_names("x offset 10m unless y") == {"x", "y"}, "offset and unless")
    expect(rate_interval_problems("rate(a[5m]) + increase(b{c=\"[1m]\"}[$__rate_interval])") == ["rate(...[5m]) must use [$__rate_interval]"], "rate interval check")

    # The YAML subset reader.
    y = yaml_load("a: 1\nb:\n  - x: 'q''s'\n    y: |\n      l1\n      l2\n  - \"z\"\nc: >-\n  f1\n  f2\nd: []\n")
    expect(y == {"a": 1, "b": [{"x": "q's", "y": "l1\nl2\n"}, "z"], "c": "f1 f2", "d": []}, f"yaml subset {y!r}")

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
    expect(not r.violations, f"a good dashboard passes {r.violations}")

    broken_dash = {
        "templating": templ,
        "panels": [
            {"id": 1, "type": "row", "panels": [{
                "id": 2, "type": "timeseries", "datasource": {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"},
                "fieldConfig": {"defaults": {}},
                "targets": [{"refId": "A", "expr": "sum(rate(m_total[5m])) + renamed_metric_total"}]}]},
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
    r = Report()
    lint_dashboard("bad.json", "{not json", r)
    expect(has(r, "invalid JSON"), "invalid JSON rejected")

    good_rules = """groups:
  - name: g
    rules:
      - alert: GoodAlert
        expr: sum(rate(m_total[5m])) > 1
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
    expect(not r.violations and alerts == {"GoodAlert"}, f"a good rule passes {r.violations}")

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
"""
    r = Report()
    e, alerts, rec = lint_rules("broken.rules.yaml", broken_rules, r, lookup)
    check_metrics(e, rec, dump, {}, None, r)
    expect(has(r, "no `for:`"), "broken rule: missing for rejected")
    expect(has(r, "labels.severity"), "broken rule: missing severity rejected")
    expect(has(r, "annotation `description` missing"), "broken rule: missing description rejected")
    expect(has(r, "no anchor #no-such-anchor"), "broken rule: runbook anchor missing rejected")
    expect(has(r, "metric bulwark_consumer_lag_messages is not in the /metrics dump"), "broken rule: invented metric rejected")

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
    check_metrics([("x", "rate(lazy_total[5m])")], set(), dump, allow, "fn f() {}", r)
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
