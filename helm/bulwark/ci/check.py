#!/usr/bin/env python3
"""Offline checks of the Bulwark Helm chart (called by scripts/check-helm inside .venv-helm).

No cluster and no helm binary: helm-python-sdk (Helm's Go SDK through a C ABI) lints and renders,
kubernetes-validate validates the rendered core objects strictly against KUBE_VERSION, and the
assertions below check what the chart promises (rolling updates, draining, PDB/Service/
ServiceMonitor wiring, HPA, single-source rules and dashboards, the annotation module's section
and exports volume, the pipeline module's section and DAG folder, the reporting module's section
and its two secret URLs, a closed values schema, a README that lists every value).

Usage:
  check.py                 run every check; exit 1 when any fails
  check.py --write-readme  regenerate the values table in README.md (from values.schema.json
                           and values.yaml), then run every check
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import sys
import tarfile
import tempfile
import traceback

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

CHART = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(CHART))
# Oldest Kubernetes version the chart supports (Chart.yaml kubeVersion ">=1.27.0-0").
KUBE_VERSION = "1.27.0"
RELEASE, NAMESPACE = "bulwark", "bulwark"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
README_BEGIN, README_END = "<!-- values:begin -->", "<!-- values:end -->"
# Schema nodes that are Kubernetes objects passed through verbatim (validated after rendering by
# kubernetes-validate --strict instead) or Helm's own `global`: no additionalProperties: false.
PASSTHROUGH = {"global", "podSecurityContext", "securityContext", "affinity", "tolerations[]",
               "extraEnv[]"}

failures: list[str] = []
passed = 0


def check(cond: bool, what: str) -> bool:
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print(f"  FAIL {what}")
    return cond


def step(title: str) -> None:
    print(f"\n== {title}")


def load_yaml(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def seconds(duration: str) -> float:
    """A Bulwark duration ("500ms", "5s", "2m", "1h", "1m30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"bad duration {duration!r}")
    return sum(int(n) * units[u] for n, u in parts)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render(chart: helm.Chart, values: dict | None) -> list[dict]:
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                docs.append(doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in by_kind(docs, kind) if d["metadata"]["name"] == name), None)


# ---------------------------------------------------------------------------------------------
# Structural schemas of the two prometheus-operator kinds (kubernetes-validate has no CRDs).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "labels"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                                     "any": {"type": "boolean"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                           "targetLabel": {"type": "string"},
                                           "action": {"type": "string"},
                                           "regex": {"type": "string"},
                                           "replacement": {"type": "string"}}}},
                    }}},
            }},
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "labels"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1},
                            "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }}},
                }}},
        }},
    },
}


# ---------------------------------------------------------------------------------------------
def schema_is_closed(schema: dict) -> None:
    step("values.schema.json: additionalProperties at every object level")
    problems = []

    def walk(node: dict, path: str) -> None:
        if not isinstance(node, dict):
            return
        key = path.rsplit(".", 1)[-1]
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "object" in types and key not in PASSTHROUGH:
            if "additionalProperties" not in node:
                problems.append(path or "(root)")
            elif node["additionalProperties"] is True:
                problems.append(f"{path} (additionalProperties: true)")
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}" if path else name)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        for alt in node.get("oneOf", []) + node.get("anyOf", []):
            walk(alt, path)

    walk(schema, "")
    check(not problems, f"schema objects without additionalProperties: {problems}")
    check(schema.get("additionalProperties") is False, "schema root has additionalProperties: false")


def readme_rows(schema: dict, values: dict) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every value: closed objects are expanded."""
    rows = []

    def typ(node: dict) -> str:
        if "oneOf" in node:
            return " or ".join(typ(a) for a in node["oneOf"])
        t = node.get("type", "any")
        t = "/".join(t) if isinstance(t, list) else t
        if "enum" in node:
            t += " (" + ", ".join(map(str, node["enum"])) + ")"
        return t

    def walk(node: dict, path: str, default) -> None:
        props = node.get("properties")
        if node.get("type") == "object" and props and node.get("additionalProperties") is False \
                and path.split(".")[-1] not in PASSTHROUGH | {"resources"}:
            for name, sub in props.items():
                sub_default = default.get(name) if isinstance(default, dict) else None
                if isinstance(default, dict) and name not in default:
                    sub_default = "(unset)"
                walk(sub, f"{path}.{name}" if path else name, sub_default)
            return
        shown = default if default == "(unset)" else json.dumps(default)
        desc = node.get("description", "").replace("|", "\\|").replace("\n", " ")
        rows.append((path, typ(node), shown, desc))

    walk(schema, "", values)
    return rows


def readme_table(schema: dict, values: dict) -> str:
    lines = [README_BEGIN,
             "<!-- Generated from values.schema.json and values.yaml by ci/check.py --write-readme;",
             "     scripts/check-helm fails when this table is out of date. -->",
             "| key | type | default | description |", "|---|---|---|---|"]
    for key, t, default, desc in readme_rows(schema, values):
        default = default.replace("|", "\\|")
        lines.append(f"| `{key}` | {t} | `{default}` | {desc} |")
    lines.append(README_END)
    return "\n".join(lines)


def check_readme(schema: dict, values: dict, write: bool) -> None:
    step("README.md lists every value")
    path = os.path.join(CHART, "README.md")
    text = open(path).read()
    if README_BEGIN not in text or README_END not in text:
        check(False, f"README.md has no {README_BEGIN} ... {README_END} block")
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    table = readme_table(schema, values)
    if write:
        with open(path, "w") as f:
            f.write(head + table + tail)
        print("  README.md values table regenerated")
        text = open(path).read()
    current = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    check(README_BEGIN + current + README_END == table,
          "README.md values table is out of date: run helm/bulwark/ci/check.py --write-readme "
          "(.venv-helm/bin/python)")
    listed = set(re.findall(r"^\| `([^`]+)` \|", current, re.M))

    missing = []

    def walk(node, path):
        # A key is listed itself, or (an empty object whose sub-keys the schema defines) by them.
        if path and (path in listed or (node == {} and any(k.startswith(path + ".") for k in listed))):
            return
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        else:
            missing.append(path)

    walk(values, "")
    check(not missing, f"values.yaml keys missing from the README table: {missing}")
    print(f"  {len(listed)} values listed")


def lint(values_files: list[str]) -> None:
    step(f"helm lint --strict --kube-version v{KUBE_VERSION}")
    for vf in [None] + values_files:
        values = load_yaml(vf) if vf else None
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in report["messages"] if m["severity"] >= 2] + \
              [{"error": e} for e in report["errors"]]
        label = os.path.relpath(vf, CHART) if vf else "values.yaml"
        for m in report["messages"]:
            if m["severity"] < 2:
                print(f"  note ({label}): {m.get('path')}: {m['error']}")
        check(not bad, f"lint {label}: {bad}")
        if not bad:
            print(f"  ok   {label}")


def validate_core(docs: list[dict], label: str) -> None:
    for d in docs:
        kind, name = d["kind"], d["metadata"].get("name")
        if kind in CRD_KINDS:
            schema = SERVICE_MONITOR_SCHEMA if kind == "ServiceMonitor" else PROMETHEUS_RULE_SCHEMA
            try:
                jsonschema.validate(d, schema)
                check(True, "")
            except jsonschema.ValidationError as e:
                check(False, f"{label}: {kind}/{name} structure: {e.message} at {list(e.path)}")
            continue
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
            check(True, "")
        except kubernetes_validate.ValidationError as e:
            check(False, f"{label}: {kind}/{name} invalid for Kubernetes {KUBE_VERSION}: "
                         f"{'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            check(False, f"{label}: {kind}/{name}: {e.message}")


def assertions(docs: list[dict], values: dict, label: str, rules_by_name: dict,
               dashboards: dict) -> None:
    fullname = RELEASE  # release name contains the chart name
    web = named(docs, "Deployment", f"{fullname}-web")
    if not check(web is not None, f"{label}: web Deployment exists"):
        return
    web_labels = web["spec"]["template"]["metadata"]["labels"]
    deployments = by_kind(docs, "Deployment")

    # Every Deployment: probes, preStop, grace period.
    pre = values["lifecycle"]["preStopSleepSeconds"]
    drain = seconds(values["config"]["drain"]["grace"]) + seconds(values["config"]["drain"]["timeout"])
    for dep in deployments:
        n = dep["metadata"]["name"]
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        check(dep["spec"]["selector"]["matchLabels"].items()
              <= dep["spec"]["template"]["metadata"]["labels"].items(),
              f"{label}: {n} selector matches its pod labels")
        live, ready, start = (c.get(p, {}).get("httpGet", {}).get("path")
                              for p in ("livenessProbe", "readinessProbe", "startupProbe"))
        check(live == "/livez" and ready == "/readyz" and start is not None,
              f"{label}: {n} probes: liveness /livez, readiness /readyz, a startupProbe ({live}, {ready}, {start})")
        check(live != ready, f"{label}: {n} readiness and liveness paths differ")
        ps = c.get("lifecycle", {}).get("preStop", {})
        got_pre = int(ps["exec"]["command"][1]) if "exec" in ps else ps.get("sleep", {}).get("seconds")
        check(ps.get("exec", {}).get("command", ["sleep"])[0] == "sleep" and got_pre == pre,
              f"{label}: {n} preStop sleeps {pre}s (got {ps})")
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        check(tgps > pre + drain,
              f"{label}: {n} terminationGracePeriodSeconds {tgps} > preStop {pre} + drain {drain}")
        args = c.get("args", [])
        check("--config" in args and "serve" in args and "--role" in args,
              f"{label}: {n} runs serve --role with --config")
        env = {e["name"]: e for e in c.get("env", [])}
        check(all("valueFrom" in env[k] for k in env if k.startswith("BULWARK__") and
                  k.split("__")[-1] in ("URL", "READ_URL", "HS256_SECRET", "SOURCE_URL", "REPLICA_URL")),
              f"{label}: {n} secret env vars come from secretKeyRef")
        for k in ("BULWARK__DATABASE__URL", "BULWARK__BUS__URL", "BULWARK__REDIS__URL"):
            check(k in env, f"{label}: {n} has {k}")
        jwks = values["config"]["auth"]["jwks_url"]
        check(("BULWARK__AUTH__HS256_SECRET" in env) == (not jwks),
              f"{label}: {n} HS256 secret injected exactly when no JWKS URL")
        ports = {p["name"] for p in c["ports"]}
        check({"http", "metrics"} <= ports, f"{label}: {n} exposes http and metrics ports")

    # web and worker: rolling updates never go below the desired count.
    for role in ("web", "worker"):
        dep = named(docs, "Deployment", f"{fullname}-{role}")
        if dep is None:
            check(role == "worker" and not values["worker"]["enabled"], f"{label}: {role} Deployment exists")
            continue
        s = dep["spec"]["strategy"]
        check(s["type"] == "RollingUpdate" and s["rollingUpdate"]["maxUnavailable"] == 0,
              f"{label}: {role} maxUnavailable is 0 ({s})")
        check(s["rollingUpdate"]["maxSurge"] == values[role]["maxSurge"],
              f"{label}: {role} maxSurge from values")
        hpa = named(docs, "HorizontalPodAutoscaler", f"{fullname}-{role}")
        if values[role]["autoscaling"]["enabled"]:
            check("replicas" not in dep["spec"], f"{label}: no replicas on {role} when the HPA is on")
            check(hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"],
                  f"{label}: {role} HPA targets the Deployment")
            if hpa:
                check(hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] ==
                      values[role]["autoscaling"]["scaleDownStabilizationWindowSeconds"],
                      f"{label}: {role} HPA scale-down stabilization window")
        else:
            check(dep["spec"].get("replicas") == values[role]["replicaCount"],
                  f"{label}: {role} replicas = replicaCount without HPA")
            check(hpa is None, f"{label}: no {role} HPA when autoscaling is off")
        pdb = named(docs, "PodDisruptionBudget", f"{fullname}-{role}")
        if values[role]["podDisruptionBudget"]["enabled"]:
            pod_labels = dep["spec"]["template"]["metadata"]["labels"]
            check(pdb is not None and pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(),
                  f"{label}: {role} PDB selector matches the {role} pod labels")
            others = [d for d in deployments if d is not dep and pdb and
                      pdb["spec"]["selector"]["matchLabels"].items()
                      <= d["spec"]["template"]["metadata"]["labels"].items()]
            check(not others, f"{label}: {role} PDB selects no other role's pods")

    sched = named(docs, "Deployment", f"{fullname}-scheduler")
    if values["scheduler"]["enabled"]:
        n = values["scheduler"]["replicaCount"]
        strategy = (sched or {}).get("spec", {}).get("strategy", {})
        check(sched is not None and sched["spec"].get("replicas") == n,
              f"{label}: scheduler replicas = scheduler.replicaCount ({n})")
        if n == 1:
            check(strategy.get("type") == "Recreate", f"{label}: one scheduler replica: strategy Recreate ({strategy})")
        else:
            # Never more than replicaCount schedulers: one pod replaced at a time, no surge.
            check(strategy.get("type") == "RollingUpdate" and strategy["rollingUpdate"] ==
                  {"maxUnavailable": 1, "maxSurge": 0},
                  f"{label}: {n} scheduler replicas: RollingUpdate, maxUnavailable 1, maxSurge 0 ({strategy})")
        check(named(docs, "PodDisruptionBudget", f"{fullname}-scheduler") is None,
              f"{label}: no scheduler PDB")
    else:
        check(sched is None, f"{label}: no scheduler when disabled")

    # Service -> web pods; named metrics port; ServiceMonitor port exists on its Service.
    svc = named(docs, "Service", fullname)
    check(svc is not None and svc["spec"]["selector"].items() <= web_labels.items(),
          f"{label}: Service selects the web pods")
    check(svc is not None and {p["name"] for p in svc["spec"]["ports"]} >= {"http", "metrics"},
          f"{label}: Service has http and metrics ports")
    for sm in by_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in by_kind(docs, "Service") if sel.items() <= s["metadata"]["labels"].items()]
        check(len(targets) == 1, f"{label}: ServiceMonitor selects exactly one Service ({len(targets)})")
        for t in targets:
            names = {p["name"] for p in t["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                check(ep["port"] in names, f"{label}: ServiceMonitor port {ep['port']!r} exists on Service {t['metadata']['name']}")
            pods = [d for d in deployments
                    if t["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            check(len(pods) == len(deployments), f"{label}: the metrics Service covers every role")
        for k, v in values["metrics"]["serviceMonitor"]["labels"].items():
            check(sm["metadata"]["labels"].get(k) == v, f"{label}: ServiceMonitor label {k}")
    check(bool(by_kind(docs, "ServiceMonitor")) == values["metrics"]["serviceMonitor"]["enabled"],
          f"{label}: ServiceMonitor rendered exactly when enabled")

    # Config: the ConfigMap carries the drain values from the same keys; no secrets in it.
    cm = named(docs, "ConfigMap", fullname)
    toml_text = cm["data"]["bulwark.toml"]
    try:
        import tomllib
        conf = tomllib.loads(toml_text)
        check(conf["drain"] == values["config"]["drain"], f"{label}: [drain] rendered from config.drain")
        check(conf["server"]["listen"].endswith(f":{values['ports']['http']}") and
              conf["server"]["metrics_listen"].endswith(f":{values['ports']['metrics']}"),
              f"{label}: listen addresses from ports")
        check("url" not in conf["database"] and "url" not in conf["bus"] and "url" not in conf["redis"]
              and "hs256_secret" not in conf["auth"]
              and not {"source_url", "replica_url"} & set(conf.get("reporting", {})),
              f"{label}: no secret in the ConfigMap")
        check(conf["database"]["migrate_on_start"] == (not values["migrations"]["enabled"]),
              f"{label}: migrate_on_start is off when the migration Job runs")
        annotation_rendered(docs, conf, values, label)
        pipeline_rendered(docs, conf, values, label)
        reporting_rendered(docs, conf, values, label)
    except Exception as e:  # noqa: BLE001
        check(False, f"{label}: ConfigMap bulwark.toml is not valid TOML: {e}")

    # And Bulwark itself accepts it: `bulwark config check` on the rendered file, with the
    # secrets the pods get from Secrets supplied as the same environment variables.
    binary = os.environ.get("BULWARK_BIN", os.path.join(REPO, "target", "debug", "bulwark"))
    if os.path.exists(binary):
        import subprocess
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bulwark.toml")
            with open(path, "w") as f:
                f.write(toml_text)
            env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK")}
            env.update({
                "BULWARK__DATABASE__URL": "postgres://bulwark:secret@db:5432/bulwark",
                "BULWARK__BUS__URL": "nats://nats:4222",
                "BULWARK__REDIS__URL": "redis://redis:6379/0",
            })
            if "jwks_url" not in conf.get("auth", {}):
                env["BULWARK__AUTH__HS256_SECRET"] = "x" * 48
            # The reporting URLs, when the pods get them (capture on: [reporting] must then name
            # its tables, which Bulwark checks together with the URL).
            pod_env = {e["name"] for e in web["spec"]["template"]["spec"]["containers"][0].get("env", [])}
            if "BULWARK__REPORTING__SOURCE_URL" in pod_env:
                env["BULWARK__REPORTING__SOURCE_URL"] = "postgres://replicator:secret@primary:5432/app"
            if "BULWARK__REPORTING__REPLICA_URL" in pod_env:
                env["BULWARK__REPORTING__REPLICA_URL"] = "postgres://reader:secret@replica:5432/app"
            out = subprocess.run([binary, "--config", path, "config", "check"], env=env, cwd=tmp,
                                 capture_output=True, text=True)
            check(out.returncode == 0, f"{label}: `bulwark config check` accepts the rendered config"
                  + ("" if out.returncode == 0 else f" ({out.stderr.strip()})"))
    else:
        print(f"  note {label}: {binary} not built; rendered config not checked by bulwark itself")

    # Migrations: a pre-install,pre-upgrade hook Job running `migrate up`.
    job = named(docs, "Job", f"{fullname}-migrate")
    if values["migrations"]["enabled"]:
        ann = (job or {}).get("metadata", {}).get("annotations", {})
        check(job is not None and ann.get("helm.sh/hook") == "pre-install,pre-upgrade"
              and "helm.sh/hook-delete-policy" in ann, f"{label}: migration hook Job")
        if job:
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            check(args[-2:] == ["migrate", "up"], f"{label}: the Job runs migrate up")
            vol = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"][0]
            hook_cm = named(docs, "ConfigMap", vol["configMap"]["name"])
            check(hook_cm is not None and "pre-install" in hook_cm["metadata"]["annotations"].get("helm.sh/hook", "")
                  and hook_cm["data"] == cm["data"], f"{label}: the Job's config is a hook ConfigMap equal to the main one")

    # Ingress: WebSocket-friendly timeouts.
    ing = by_kind(docs, "Ingress")
    check(bool(ing) == values["ingress"]["enabled"], f"{label}: Ingress rendered exactly when enabled")
    for i in ing:
        t = str(values["ingress"]["websocketTimeoutSeconds"])
        a = i["metadata"].get("annotations", {})
        check(a.get("nginx.ingress.kubernetes.io/proxy-read-timeout") == t and
              a.get("nginx.ingress.kubernetes.io/proxy-send-timeout") == t,
              f"{label}: Ingress proxy read/send timeouts {t}s")

    # Single source: PrometheusRule groups equal the parsed rules files; dashboards equal the JSON.
    prs = by_kind(docs, "PrometheusRule")
    if values["metrics"]["prometheusRule"]["enabled"]:
        check(len(prs) == len(rules_by_name), f"{label}: one PrometheusRule per rules file")
        for pr in prs:
            src = pr["metadata"]["annotations"]["bulwark.io/source"]
            expected = rules_by_name.get(os.path.basename(src))
            check(expected is not None and pr["spec"]["groups"] == expected["groups"],
                  f"{label}: PrometheusRule {pr['metadata']['name']} groups equal {src}")
            for k, v in values["metrics"]["prometheusRule"]["labels"].items():
                check(pr["metadata"]["labels"].get(k) == v, f"{label}: PrometheusRule label {k}")
    else:
        check(not prs, f"{label}: no PrometheusRule when disabled")
    dcms = [d for d in by_kind(docs, "ConfigMap") if "-dashboard-" in d["metadata"]["name"]]
    if values["metrics"]["dashboards"]["enabled"]:
        check(len(dcms) == len(dashboards), f"{label}: one dashboard ConfigMap per dashboard")
        lab, lv = values["metrics"]["dashboards"]["label"], values["metrics"]["dashboards"]["labelValue"]
        for d in dcms:
            check(d["metadata"]["labels"].get(lab) == lv, f"{label}: {d['metadata']['name']} labelled {lab}={lv}")
            for fname, content in d["data"].items():
                check(dashboards.get(fname) == content, f"{label}: {fname} in the ConfigMap equals dashboards/grafana/{fname}")
                json.loads(content)
    else:
        check(not dcms, f"{label}: no dashboard ConfigMaps when disabled")


def annotation_rendered(docs: list[dict], conf: dict, values: dict, label: str) -> None:
    """annotation.enabled: [annotation] is annotation.settings plus export_dir = exports.mountPath,
    and every role mounts the exports volume there (the claim when one is named). Disabled: no
    [annotation] section and no such volume."""
    a = values["annotation"]
    want = dict(a["settings"], export_dir=a["exports"]["mountPath"]) if a["enabled"] else None
    check(conf.get("annotation") == want, f"{label}: [annotation] is {want} (got {conf.get('annotation')})")
    for dep in by_kind(docs, "Deployment"):
        n = dep["metadata"]["name"]
        spec = dep["spec"]["template"]["spec"]
        vol = next((v for v in spec.get("volumes", []) if v["name"] == "annotation-exports"), None)
        mounts = [m["mountPath"] for m in spec["containers"][0].get("volumeMounts", [])
                  if m["name"] == "annotation-exports"]
        if not a["enabled"]:
            check(vol is None and not mounts, f"{label}: {n} has no exports volume while annotation is disabled")
            continue
        claim = a["exports"]["existingClaim"]
        want_vol = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
        check(vol is not None and {k: v for k, v in vol.items() if k != "name"} == want_vol,
              f"{label}: {n} exports volume is {want_vol} (got {vol})")
        check(mounts == [a["exports"]["mountPath"]], f"{label}: {n} mounts the exports volume at export_dir ({mounts})")


def pipeline_rendered(docs: list[dict], conf: dict, values: dict, label: str) -> None:
    """pipeline.enabled: [pipeline] is dags_folder = dags.mountPath, reload_interval,
    worker_slots, parallelism = workerSlots x worker replicas; the scheduler, worker and web pods mount the DAG volume read-only there, from
    the claim, the named ConfigMap, the chart's <release>-dags ConfigMap (dags.files: its data
    equals the files, each valid TOML) or an emptyDir. Disabled: no section, volume or ConfigMap."""
    import tomllib
    p = values["pipeline"]
    d = p["dags"]
    w = values["worker"]
    workers = w["autoscaling"]["maxReplicas"] if w["autoscaling"]["enabled"] else w["replicaCount"]
    # parallelism: every worker slot of the deployment (the HPA's maximum when it scales).
    e = p["engine"]
    engine = {"kind": e["kind"], "memory_limit_mb": e["memoryLimitMb"]}
    if e["kind"] == "ballista":
        engine["scheduler_url"] = e["schedulerUrl"]
    want = ({"dags_folder": d["mountPath"], "reload_interval": p["reloadInterval"],
             "worker_slots": p["workerSlots"], "parallelism": p["workerSlots"] * workers,
             "engine": engine}
            if p["enabled"] else None)
    check(conf.get("pipeline") == want, f"{label}: [pipeline] is {want} (got {conf.get('pipeline')})")
    dags_cm = named(docs, "ConfigMap", f"{RELEASE}-dags")
    if p["enabled"] and d["files"]:
        check(dags_cm is not None and dags_cm["data"] == d["files"],
              f"{label}: ConfigMap {RELEASE}-dags holds pipeline.dags.files verbatim")
        for fname, content in d["files"].items():
            try:
                dag = tomllib.loads(content)
                check(isinstance(dag.get("tasks"), dict) and dag["tasks"],
                      f"{label}: DAG file {fname} has [tasks.*]")
            except tomllib.TOMLDecodeError as e:
                check(False, f"{label}: DAG file {fname} is not valid TOML: {e}")
        want_vol = {"configMap": {"name": f"{RELEASE}-dags"}}
    else:
        check(dags_cm is None, f"{label}: no {RELEASE}-dags ConfigMap without pipeline.dags.files")
        if d["existingClaim"]:
            want_vol = {"persistentVolumeClaim": {"claimName": d["existingClaim"], "readOnly": True}}
        elif d["configMap"]:
            want_vol = {"configMap": {"name": d["configMap"]}}
        else:
            want_vol = {"emptyDir": {}}
    roles = [dep for dep in by_kind(docs, "Deployment")]
    check(len(roles) == 1 + values["worker"]["enabled"] + values["scheduler"]["enabled"],
          f"{label}: every enabled role has a Deployment")
    for dep in roles:
        n = dep["metadata"]["name"]
        spec = dep["spec"]["template"]["spec"]
        vol = next((v for v in spec.get("volumes", []) if v["name"] == "pipeline-dags"), None)
        mounts = [m for m in spec["containers"][0].get("volumeMounts", []) if m["name"] == "pipeline-dags"]
        if not p["enabled"]:
            check(vol is None and not mounts, f"{label}: {n} has no DAG volume while pipeline is disabled")
            continue
        check(vol is not None and {k: v for k, v in vol.items() if k != "name"} == want_vol,
              f"{label}: {n} DAG volume is {want_vol} (got {vol})")
        check([(m["mountPath"], m.get("readOnly")) for m in mounts] == [(d["mountPath"], True)],
              f"{label}: {n} mounts the DAG volume read-only at dags_folder ({mounts})")


def render_cases(chart: helm.Chart, base: dict, cases: dict, rendered) -> None:
    """Render `base` merged with each case's values and run `rendered(docs, conf, values, label)`
    and the core validation on it."""
    import tomllib

    for what, over in cases.items():
        values = deep_merge(base, over)
        try:
            docs = render(chart, values)
        except helm.HelmError as e:
            check(False, f"{what}: render failed: {e}")
            continue
        conf = tomllib.loads(named(docs, "ConfigMap", RELEASE)["data"]["bulwark.toml"])
        before = passed
        rendered(docs, conf, values, what)
        validate_core(docs, what)
        print(f"  ok   {what}: {passed - before} checks passed")


def pipeline_tests(chart: helm.Chart, base: dict) -> None:
    """The pipeline cases that no ci/*-values.yaml covers (ci/pipeline-values.yaml is the
    dags.files case with two schedulers), rendered in memory; and the guard against two DAG
    sources."""
    step("pipeline: disabled, a DAG claim, a named ConfigMap; two DAG sources refused")
    cases = {
        "pipeline disabled": {"pipeline": {"enabled": False}},
        "pipeline DAGs from a claim": {"pipeline": {"dags": {"existingClaim": "bulwark-dags"}}},
        "pipeline sql tasks on a Ballista cluster":
            {"pipeline": {"engine": {"kind": "ballista", "schedulerUrl": "df://ballista-scheduler:50050",
                                     "memoryLimitMb": 2048}}},
        "pipeline DAGs from a named ConfigMap, another mount path":
            {"pipeline": {"dags": {"configMap": "my-dags", "mountPath": "/srv/dags"}}},
    }
    render_cases(chart, base, cases, pipeline_rendered)
    for what, dags in {
        "existingClaim and configMap": {"existingClaim": "c", "configMap": "m"},
        "configMap and files": {"configMap": "m", "files": {"a.toml": "dag_id = 'a'\n"}},
    }.items():
        try:
            chart.render(values=deep_merge(base, {"pipeline": {"dags": dags}}), name=RELEASE,
                         namespace=NAMESPACE, is_install=True)
            check(False, f"pipeline.dags with {what} was accepted")
        except helm.HelmError as e:
            check("at most one of existingClaim, configMap and files" in str(e),
                  f"pipeline.dags with {what} fails naming the rule: {e}")
            print(f"  ok   pipeline.dags with {what}: render fails")
    try:
        chart.render(values=deep_merge(base, {"pipeline": {"engine": {"kind": "ballista"}}}),
                     name=RELEASE, namespace=NAMESPACE, is_install=True)
        check(False, "pipeline.engine.kind ballista without a schedulerUrl was accepted")
    except helm.HelmError as e:
        check("pipeline.engine.schedulerUrl" in str(e),
              f"ballista without a schedulerUrl fails naming the key: {e}")
        print("  ok   pipeline.engine.kind ballista without schedulerUrl: render fails")


def annotation_tests(chart: helm.Chart, base: dict) -> None:
    """annotation.enabled false, rendered in memory: no ci/*-values.yaml turns it off (the
    enabled cases, emptyDir by default and a claim in ci/annotation-values.yaml, are ci files,
    so `bulwark config check` sees their [annotation] section)."""
    step("annotation: disabled (no section, no exports volume)")
    cases = {
        "annotation disabled": {"annotation": {"enabled": False}},
    }
    for what, over in cases.items():
        values = deep_merge(base, over)
        try:
            docs = render(chart, values)
        except helm.HelmError as e:
            check(False, f"{what}: render failed: {e}")
            continue
        import tomllib
        conf = tomllib.loads(named(docs, "ConfigMap", RELEASE)["data"]["bulwark.toml"])
        before = passed
        annotation_rendered(docs, conf, values, what)
        validate_core(docs, what)
        print(f"  ok   {what}: {passed - before} checks passed")


def reporting_rendered(docs: list[dict], conf: dict, values: dict, label: str) -> None:
    """reporting.enabled: [reporting] is reporting.settings, with [[reporting.tables]] = tables and
    [reporting.reports.<name>] = reports (Bulwark merges these over config/default.toml's);
    disabled: no section. The two URLs never appear in it: every Bulwark container (each role
    and the migration Job) gets BULWARK__REPORTING__SOURCE_URL / __REPLICA_URL from a
    secretKeyRef exactly when the secret's key is set, from the Secret named like the database
    URL's (its own name, else secrets.existingSecret, else the release's full name)."""
    r = values["reporting"]
    if r["enabled"]:
        want = dict(r["settings"])
        if r["tables"]:
            want["tables"] = r["tables"]
        if r["reports"]:
            want["reports"] = r["reports"]
    else:
        want = None
    check(conf.get("reporting") == want, f"{label}: [reporting] is {want} (got {conf.get('reporting')})")
    s = values["secrets"]
    containers = [(d["metadata"]["name"], d["spec"]["template"]["spec"]["containers"][0])
                  for d in by_kind(docs, "Deployment") + by_kind(docs, "Job")]
    for var, ref in (("BULWARK__REPORTING__SOURCE_URL", s["reportingSourceUrl"]),
                     ("BULWARK__REPORTING__REPLICA_URL", s["reportingReplicaUrl"])):
        secret = ref["name"] or s["existingSecret"] or RELEASE
        want_env = ({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": ref["key"]}}}
                    if ref["key"] else None)
        for n, c in containers:
            got = next((e for e in c.get("env", []) if e["name"] == var), None)
            check(got == want_env, f"{label}: {n} {var} is {want_env} (got {got})")
    if s["reportingSourceUrl"]["key"]:
        check(bool(r["enabled"] and r["tables"]), f"{label}: capture on names its tables")


def reporting_tests(chart: helm.Chart, base: dict) -> None:
    """The reporting cases that no ci/*-values.yaml covers (ci/reporting-values.yaml is capture
    on, with the replica for backfills and a report of its own), rendered in memory; and the
    template's guards against a source URL Bulwark would refuse."""
    step("reporting: defaults, disabled, replica only, a Secret per URL; a source without tables refused")
    cases = {
        "reporting by default (empty section, no URL)": {},
        "reporting disabled": {"reporting": {"enabled": False}},
        "reporting replica only (backfills, no capture)":
            {"secrets": {"reportingReplicaUrl": {"key": "replica-url"}},
             "reporting": {"settings": {"summary_interval": "15m"}}},
        "reporting URLs from Secrets of their own":
            {"secrets": {"reportingSourceUrl": {"name": "pg-replication", "key": "url"},
                         "reportingReplicaUrl": {"name": "pg-replica", "key": "url"}},
             "reporting": {"tables": [{"name": "sales.orders", "key": ["order_id", "line"],
                                       "target": "orders", "time_column": "created_at"}]}},
    }
    render_cases(chart, base, cases, reporting_rendered)
    for what, over, needle in (
        ("a source URL without reporting.tables",
         {"secrets": {"reportingSourceUrl": {"key": "source-url"}}}, "reporting.tables"),
        ("a source URL with reporting disabled",
         {"secrets": {"reportingSourceUrl": {"key": "source-url"}},
          "reporting": {"enabled": False, "tables": [{"name": "bids"}]}}, "reporting.enabled"),
    ):
        try:
            chart.render(values=deep_merge(base, over), name=RELEASE, namespace=NAMESPACE,
                         is_install=True)
            check(False, f"{what} was accepted")
        except helm.HelmValuesError as e:
            check(False, f"{what} failed on the schema, not the template's guard: {e}")
        except helm.HelmError as e:
            check(needle in str(e), f"{what} fails naming {needle}: {e}")
            print(f"  ok   {what}: render fails")


def negative_tests(chart: helm.Chart, base: dict) -> None:
    step("negative tests: the schema rejects bad values (render must fail)")
    cases = {
        "unknown top-level key": {"replicas": 3},
        "unknown nested key": {"web": {"replicaCunt": 2}},
        "unknown config key": {"config": {"server": {"listn": "0.0.0.0:1"}}},
        "a secret typed into the config": {"config": {"database": {"url": "postgres://u:p@h/d"}}},
        "replicaCount: \"three\"": {"web": {"replicaCount": "three"}},
        "replicaCount: -1": {"web": {"replicaCount": -1}},
        "port 70000": {"ports": {"http": 70000}},
        "drain.grace \"5 seconds\"": {"config": {"drain": {"grace": "5 seconds"}}},
        "trace_sample_ratio 2": {"config": {"telemetry": {"trace_sample_ratio": 2}}},
        "annotation.settings.overlap 0": {"annotation": {"settings": {"overlap": 0}}},
        "annotation.settings.overlap 101": {"annotation": {"settings": {"overlap": 101}}},
        "an unknown annotation.settings key": {"annotation": {"settings": {"lock_tll": "5m"}}},
        "config.moduleSettings.annotation (annotation.settings is the place)":
            {"config": {"moduleSettings": {"annotation": {"overlap": 2}}}},
        "config.moduleSettings.pipeline (pipeline.* is the place)":
            {"config": {"moduleSettings": {"pipeline": {"worker_slots": 2}}}},
        "pipeline.workerSlots 0": {"pipeline": {"workerSlots": 0}},
        "pipeline.reloadInterval \"5 seconds\"": {"pipeline": {"reloadInterval": "5 seconds"}},
        "a relative pipeline.dags.mountPath": {"pipeline": {"dags": {"mountPath": "dags"}}},
        "a DAG file name without .toml": {"pipeline": {"dags": {"files": {"daily.yaml": "x = 1"}}}},
        "an unknown pipeline key": {"pipeline": {"dagsFolder": "/dags"}},
        "an unknown pipeline.engine.kind": {"pipeline": {"engine": {"kind": "spark"}}},
        "a pipeline.engine.schedulerUrl that is not df://host:port":
            {"pipeline": {"engine": {"schedulerUrl": "http://x"}}},
        "scheduler.replicaCount 3": {"scheduler": {"replicaCount": 3}},
        "config.moduleSettings.reporting (reporting.* is the place)":
            {"config": {"moduleSettings": {"reporting": {"summary_interval": "10m"}}}},
        "the source URL typed into reporting.settings (secrets.reportingSourceUrl is the place)":
            {"reporting": {"settings": {"source_url": "postgres://replicator:pw@db/app"}}},
        "a replica URL typed into reporting.settings":
            {"reporting": {"settings": {"replica_url": "postgres://reader:pw@replica/app"}}},
        "the URL itself as secrets.reportingSourceUrl.key":
            {"secrets": {"reportingSourceUrl": {"key": "postgres://replicator:pw@db:5432/app"}}},
        "an unknown secrets.reportingReplicaUrl key":
            {"secrets": {"reportingReplicaUrl": {"secret": "pg-replica"}}},
        "reporting.settings.summary_interval \"5 minutes\"":
            {"reporting": {"settings": {"summary_interval": "5 minutes"}}},
        "reporting.settings.slot with upper case and a dash":
            {"reporting": {"settings": {"slot": "Bad-Slot"}}},
        "reporting.settings.sink_batch 0": {"reporting": {"settings": {"sink_batch": 0}}},
        "reporting.settings.max_report_days 10001":
            {"reporting": {"settings": {"max_report_days": 10001}}},
        "an unknown reporting.settings key": {"reporting": {"settings": {"summary_intervall": "5m"}}},
        "an unknown reporting key": {"reporting": {"sourceUrl": "postgres://x@db/app"}},
        "a reporting table name that is not schema.table":
            {"reporting": {"tables": [{"name": "bids; drop table x"}]}},
        "a reporting table without a name": {"reporting": {"tables": [{"time_column": "at"}]}},
        "an unknown reporting table key": {"reporting": {"tables": [{"name": "bids", "keys": ["id"]}]}},
        "a report time_unit \"hours\"":
            {"reporting": {"reports": {"r": {"table": "cdc_public_bids", "time_column": "at",
                                             "time_unit": "hours", "metrics": {"n": "count(*)"}}}}},
        "a report without metrics":
            {"reporting": {"reports": {"r": {"table": "cdc_public_bids", "time_column": "at",
                                             "metrics": {}}}}},
        "a report metric with two statements":
            {"reporting": {"reports": {"r": {"table": "cdc_public_bids", "time_column": "at",
                                             "metrics": {"n": "count(*); drop table x"}}}}},
        "a report name with upper case":
            {"reporting": {"reports": {"Daily": {"table": "cdc_public_bids", "time_column": "at",
                                                 "metrics": {"n": "count(*)"}}}}},
    }
    for what, over in cases.items():
        values = deep_merge(base, over)
        try:
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            check(False, f"values with {what} were accepted")
        except helm.HelmValuesError as e:
            check(True, "")
            first = str(e).strip().splitlines()[-1].strip()
            print(f"  ok   {what}: rejected ({first})")
        except helm.HelmError as e:
            check(False, f"values with {what} failed for another reason than the schema: {e}")
    # The template's own guard: production without a JWT secret or JWKS URL.
    values = deep_merge(base, {"secrets": {"jwtSecret": {"key": ""}}})
    try:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        check(False, "production without a JWT secret or JWKS URL was accepted")
    except helm.HelmError as e:
        check("jwks_url" in str(e), f"production without JWT secret fails naming jwks_url: {e}")
        print("  ok   production without a JWT secret or JWKS URL: render fails")


def single_source() -> tuple[dict, dict]:
    step("single source: files/dashboards is a symlink to dashboards/, packaging follows it")
    link = os.path.join(CHART, "files", "dashboards")
    check(os.path.islink(link) and os.path.realpath(link) == os.path.join(REPO, "dashboards"),
          "helm/bulwark/files/dashboards is a symlink to ../../../dashboards")
    rules = {os.path.basename(p): load_yaml(p)
             for p in sorted(glob.glob(os.path.join(REPO, "dashboards/alerts/*.rules.yaml")))}
    dashboards = {os.path.basename(p): open(p).read()
                  for p in sorted(glob.glob(os.path.join(REPO, "dashboards/grafana/*.json")))}
    check(bool(rules) and bool(dashboards), "rules and dashboards exist")
    copies = []
    for root, _dirs, files in os.walk(CHART, followlinks=False):
        copies += [os.path.join(root, f) for f in files
                   if f.endswith((".rules.yaml", ".json")) and f != "values.schema.json"]
    check(not copies, f"no copies of rules or dashboards in the chart: {copies}")
    with tempfile.TemporaryDirectory() as tmp:
        archive = helm.package(CHART, destination=tmp)
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
            for f in dashboards:
                check(f"bulwark/files/dashboards/grafana/{f}" in names, f"package contains dashboard {f}")
            for f in rules:
                check(f"bulwark/files/dashboards/alerts/{f}" in names, f"package contains rules {f}")
            check(not [n for n in names if n.endswith("_test.yaml") or "/ci/" in n],
                  "package leaves out rule tests and ci/")
            print(f"  packaged {os.path.basename(archive)}: {len(names)} files, symlinked dashboards included")
        # The packaged chart renders the same objects as the directory.
        with helm.Chart.load(archive) as packed:
            check(any(f["name"].endswith(".rules.yaml") for f in packed.files), "packaged chart has the rules")
    return rules, dashboards


def main() -> int:
    write_readme = "--write-readme" in sys.argv[1:]
    helm.disable_logging()
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else '?'}, "
          f"Kubernetes {KUBE_VERSION}")
    schema = json.load(open(os.path.join(CHART, "values.schema.json")))
    defaults = load_yaml(os.path.join(CHART, "values.yaml"))
    values_files = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    for required in ("default-values.yaml", "hpa-values.yaml", "jwks-values.yaml", "annotation-values.yaml",
                     "pipeline-values.yaml", "reporting-values.yaml"):
        check(os.path.join(CHART, "ci", required) in values_files, f"ci/{required} exists")

    schema_is_closed(schema)
    check_readme(schema, defaults, write_readme)
    rules, dashboards = single_source()
    lint(values_files)

    chart = helm.Chart.load(CHART)
    for vf in values_files:
        label = os.path.basename(vf)
        step(f"render {label}, validate for Kubernetes {KUBE_VERSION} (--strict), assert")
        over = load_yaml(vf) or {}
        try:
            docs = render(chart, over)
        except helm.HelmError as e:
            check(False, f"{label}: render failed: {e}")
            continue
        before = passed
        kinds = sorted({d["kind"] for d in docs})
        validate_core(docs, label)
        assertions(docs, deep_merge(defaults, over), label, rules, dashboards)
        print(f"  {len(docs)} objects ({', '.join(kinds)}); {passed - before} checks passed")
    annotation_tests(chart, deep_merge(defaults, load_yaml(os.path.join(CHART, "ci", "default-values.yaml"))))
    pipeline_tests(chart, deep_merge(defaults, load_yaml(os.path.join(CHART, "ci", "default-values.yaml"))))
    reporting_tests(chart, deep_merge(defaults, load_yaml(os.path.join(CHART, "ci", "default-values.yaml"))))
    negative_tests(chart, load_yaml(os.path.join(CHART, "ci", "default-values.yaml")))
    chart.close()

    print()
    print(f"{passed} passed, {len(failures)} failed")
    for f in failures:
        print(f"  - {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
