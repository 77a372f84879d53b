#!/usr/bin/env python3
"""Helper of scripts/bench-pipeline: writes the benchmark DAGs, drives one engine, computes figures.

    bench-pipeline.py write-dags --engine bulwark|airflow --out DIR [--fanout N]
                                 [--backfill-runs N] [--cmp-runs N] [--active-runs N]
    bench-pipeline.py bulwark --url URL --token-file F --out RESULT.json --label TEXT [...]
    bench-pipeline.py airflow --db-url URL --airflow BIN --out RESULT.json [...]   (the venv's python)
    bench-pipeline.py report RESULT.json...

The DAGs (the same on both sides; every task runs the shell command `true`):
  bench_fanout      one root task `start`, N tasks t0000..t{N-1} depending on it; no schedule;
                    max_active_tasks N+1 so the DAG itself never limits the fan-out.
  bench_chain       a -> b -> c, @daily from 1990-01-01 to the end of the backfill range,
                    catchup off: only the backfill creates its runs (the 10,000-run goal).
  bench_chain_cmp   the same chain, its own DAG, for the short backfill compared with Airflow.

Figures (every one computed from the engine's own timestamps, not from this script's clock,
except the `wall` lines):
  task start latency   per task instance: start_date - queued_at (Airflow: start_date -
                       queued_dttm), p50 / p99 / max over the fan-out run's instances.
  ready -> running     per instance with an upstream: start_date - the upstream's end_date. The
                       comparable latency: Bulwark queues every ready instance at once (pool
                       slots permitting) and they wait for a worker slot while queued, whereas
                       Airflow keeps them `scheduled` until its executor has a free slot, so its
                       queued -> running excludes that wait (Airflow's scheduled_dttm -> start
                       is printed too).
  scheduling rate      (n - 1) / (last queued_at - first queued_at) over the fan-out's N children
                       (the root is queued alone, before them).
  fan-out run          the run's queued_at -> end_date.
  backfill             the backfill's created_at -> the last of its runs' end_date; `wall` is
                       from the request (Airflow: the CLI call) to this script seeing it finished.
The bulwark side uses only the standard library; the airflow side needs psycopg2 (the venv has it).
"""

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

FROM_DATE = dt.date(1990, 1, 1)
TERMINAL_RUN = {"success", "failed"}
CHAIN_UPSTREAM = {"b": "a", "c": "b"}


def log(msg):
    print(f"bench-pipeline: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timestamps and statistics

_FRAC = re.compile(r"(\.\d{1,6})\d*")


def ts(value):
    """RFC 3339 text (any number of fraction digits, Z or an offset), or a datetime, to epoch s."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        d = value
    else:
        d = dt.datetime.fromisoformat(_FRAC.sub(r"\1", value.replace("Z", "+00:00"), count=1))
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d.timestamp()


def pct(values, p):
    """Nearest-rank percentile of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def latency_stats(pairs):
    """pairs: (queued_at, start_date) epoch seconds; returns ms statistics."""
    lat = [(s - q) * 1000.0 for q, s in pairs if q is not None and s is not None]
    if not lat:
        return None
    return {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat),
            "mean_ms": sum(lat) / len(lat)}


def rate(times):
    times = sorted(t for t in times if t is not None)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def ready_pairs(tis, upstream):
    """(upstream's end_date, start_date) of each instance of one run whose task has an upstream."""
    by_task = {t["task_id"]: t for t in tis}
    return [(by_task[upstream[t["task_id"]]]["end"], t["start"]) for t in tis
            if t["task_id"] in upstream and upstream[t["task_id"]] in by_task]


def fanout_figures(tis, root="start"):
    """tis: dicts with task_id, state, queued, start, end (epoch s) and, Airflow only, scheduled."""
    children = [t for t in tis if t["task_id"] != root]
    states = {}
    for t in tis:
        states[t["state"]] = states.get(t["state"], 0) + 1
    queued = [t["queued"] for t in children]
    return {
        "instances": len(tis),
        "states": states,
        "start_latency": latency_stats([(t["queued"], t["start"]) for t in tis]),
        "start_latency_children": latency_stats([(t["queued"], t["start"]) for t in children]),
        "ready_latency": latency_stats(ready_pairs(tis, {t["task_id"]: root for t in children})),
        "scheduled_latency": latency_stats([(t.get("scheduled"), t["start"]) for t in tis]),
        "schedule_rate_per_s": rate(queued),
        "queued_spread_s": (max(queued) - min(queued)) if queued and None not in queued else None,
        "first_queued_to_last_end_s": (max(t["end"] for t in tis if t["end"]) -
                                       min(t["queued"] for t in tis if t["queued"])),
    }


# ---------------------------------------------------------------- DAG files

def chain_days(runs):
    """Logical dates FROM_DATE .. FROM_DATE + runs - 1 (inclusive), DAG end_date one day later."""
    last = FROM_DATE + dt.timedelta(days=runs - 1)
    return FROM_DATE, last, last + dt.timedelta(days=1)


def write_dags(a):
    os.makedirs(a.out, exist_ok=True)
    children = [f"t{i:04d}" for i in range(a.fanout)]
    chains = {"bench_chain": a.backfill_runs, "bench_chain_cmp": a.cmp_runs}
    if a.engine == "bulwark":
        lines = ['dag_id = "bench_fanout"', 'description = "bench-pipeline: fan-out of no-op tasks"',
                 'schedule = "none"', f'start_date = "{FROM_DATE}"', "catchup = false",
                 "max_active_runs = 1", f"max_active_tasks = {a.fanout + 1}", "",
                 "[defaults]", "retries = 0", 'pool = "default"', "",
                 "[tasks.start]", 'type = "shell"', 'command = "true"', ""]
        for c in children:
            lines += [f"[tasks.{c}]", 'type = "shell"', 'depends_on = ["start"]', 'command = "true"', ""]
        with open(os.path.join(a.out, "bench_fanout.toml"), "w") as f:
            f.write("\n".join(lines))
        for dag_id, runs in chains.items():
            if runs <= 0:
                continue
            start, _, end = chain_days(runs)
            text = f'''dag_id = "{dag_id}"
description = "bench-pipeline: a -> b -> c, for backfills"
schedule = "@daily"
start_date = "{start}"
end_date = "{end}"
catchup = false
max_active_runs = {a.active_runs}
max_active_tasks = {3 * a.active_runs}

[defaults]
retries = 0
pool = "default"

[tasks.a]
type = "shell"
command = "true"

[tasks.b]
type = "shell"
depends_on = ["a"]
command = "true"

[tasks.c]
type = "shell"
depends_on = ["b"]
command = "true"
'''
            with open(os.path.join(a.out, f"{dag_id}.toml"), "w") as f:
                f.write(text)
    else:
        head = ("import pendulum\nfrom airflow.sdk import DAG\n"
                "from airflow.providers.standard.operators.bash import BashOperator\n\n")
        with open(os.path.join(a.out, "bench_fanout.py"), "w") as f:
            f.write(head + f'''with DAG(
    "bench_fanout",
    schedule=None,
    start_date=pendulum.datetime({FROM_DATE.year}, {FROM_DATE.month}, {FROM_DATE.day}, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    max_active_tasks={a.fanout + 1},
    is_paused_upon_creation=False,
    default_args={{"retries": 0}},
):
    start = BashOperator(task_id="start", bash_command="true")
    for i in range({a.fanout}):
        start >> BashOperator(task_id=f"t{{i:04d}}", bash_command="true")
''')
        for dag_id, runs in chains.items():
            if runs <= 0:
                continue
            start, _, end = chain_days(runs)
            with open(os.path.join(a.out, f"{dag_id}.py"), "w") as f:
                f.write(head + f'''with DAG(
    "{dag_id}",
    schedule="@daily",
    start_date=pendulum.datetime({start.year}, {start.month}, {start.day}, tz="UTC"),
    end_date=pendulum.datetime({end.year}, {end.month}, {end.day}, tz="UTC"),
    catchup=False,
    max_active_runs={a.active_runs},
    max_active_tasks={3 * a.active_runs},
    is_paused_upon_creation=False,
    default_args={{"retries": 0}},
):
    BashOperator(task_id="a", bash_command="true") >> BashOperator(task_id="b", bash_command="true") \\
        >> BashOperator(task_id="c", bash_command="true")
''')


# ---------------------------------------------------------------- Bulwark over its REST API

class Api:
    def __init__(self, url, token):
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method, path, body=None, ok=(200, 201)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        doc = json.loads(raw) if raw else None
        if ok is not None and status not in ok:
            raise RuntimeError(f"{method} {path} -> {status}: {raw[:500].decode(errors='replace')}")
        return status, doc

    def get(self, path):
        return self.call("GET", path)[1]

    def pages(self, path, key, **query):
        """Every item of a keyset-paginated list (limit 200, following next_cursor)."""
        items, cursor = [], None
        while True:
            q = dict(query, limit=200)
            if cursor:
                q["cursor"] = cursor
            doc = self.get(f"{path}?{urllib.parse.urlencode(q)}")
            items += doc[key]
            cursor = doc.get("next_cursor")
            if not cursor or not doc[key]:
                return items


def wait_dag(api, dag_id, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, doc = api.call("GET", f"/api/pipeline/dags/{dag_id}", ok=None)
        if status == 200:
            return doc
        time.sleep(0.25)
    _, errs = api.call("GET", "/api/pipeline/importErrors", ok=None)
    raise RuntimeError(f"DAG {dag_id} not loaded after {timeout}s; importErrors: {json.dumps(errs)[:2000]}")


def bulwark_tis(api, dag_id, run_id):
    path = f"/api/pipeline/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
    return [{"task_id": t["task_id"], "state": t["state"], "queued": ts(t.get("queued_at")),
             "start": ts(t.get("start_date")), "end": ts(t.get("end_date"))}
            for t in api.pages(path, "task_instances")]


def bulwark_backfill(api, dag_id, runs, active_runs, timeout, sample_runs):
    start, last, _ = chain_days(runs)
    body = {"dag_id": dag_id, "from_date": str(start), "to_date": str(last),
            "reprocess_behavior": "none", "max_active_runs": active_runs,
            "dry_run": True, "allow_large": True}
    _, dry = api.call("POST", "/api/pipeline/backfills", body)
    n_dry = len(dry.get("logical_dates", []))
    if n_dry != runs:
        log(f"{dag_id}: dry run lists {n_dry} logical dates for {start}..{last} (asked {runs})")
    body["dry_run"] = False
    t0 = time.time()
    _, bf = api.call("POST", "/api/pipeline/backfills", body)
    bf_id = bf["id"]
    log(f"{dag_id}: backfill {bf_id} of {bf.get('total_runs')} runs created")
    deadline = time.monotonic() + timeout
    while True:
        bf = api.get(f"/api/pipeline/backfills/{bf_id}")
        total = bf.get("total_runs") or runs
        done = (bf.get("finished_runs") or 0) >= total or str(bf.get("state")).lower() in (
            "completed", "complete", "success", "succeeded", "failed", "done", "finished", "cancelled")
        if done:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"backfill {bf_id} unfinished after {timeout}s: {bf}")
        time.sleep(0.2)
    wall = time.time() - t0
    dag_runs = [r for r in api.pages(f"/api/pipeline/dags/{dag_id}/dagRuns", "dag_runs", run_type="backfill")
                if r.get("backfill_id") in (None, bf_id)]
    states = {}
    for r in dag_runs:
        states[r["state"]] = states.get(r["state"], 0) + 1
    ends = [ts(r.get("end_date")) for r in dag_runs if r.get("end_date")]
    created = ts(bf.get("created_at"))
    out = {"runs": len(dag_runs), "total_runs": bf.get("total_runs"), "failed_runs": bf.get("failed_runs"),
           "run_states": states, "wall_s": wall,
           "end_to_end_s": (max(ends) - created) if ends and created else None,
           "runs_per_s": (len(dag_runs) / (max(ends) - created)) if ends and created else None}
    # Task start latency over the runs' instances (every run for a short backfill, a sample of a long one).
    picked = dag_runs if len(dag_runs) <= sample_runs else dag_runs[:: max(1, len(dag_runs) // sample_runs)]
    tis, ready = [], []
    for r in picked:
        one = bulwark_tis(api, dag_id, r["dag_run_id"])
        tis += one
        ready += ready_pairs(one, CHAIN_UPSTREAM)
    out["start_latency"] = latency_stats([(t["queued"], t["start"]) for t in tis])
    out["ready_latency"] = latency_stats(ready)
    out["latency_sampled_runs"] = len(picked)
    return out


def run_bulwark(a):
    api = Api(a.url, open(a.token_file).read().strip())
    res = {"engine": "bulwark", "label": a.label, "load_start": os.getloadavg()[0]}
    dags = ["bench_fanout"] + (["bench_chain_cmp"] if a.cmp_runs > 0 else []) + \
           (["bench_chain"] if a.backfill_runs > 0 else [])
    for d in dags:
        wait_dag(api, d, a.timeout)
        api.call("PATCH", f"/api/pipeline/dags/{d}", {"is_paused": False})
    status, _ = api.call("PATCH", "/api/pipeline/pools/default", {"slots": a.pool_slots}, ok=None)
    if status == 404:
        api.call("POST", "/api/pipeline/pools", {"name": "default", "slots": a.pool_slots})
    elif status not in (200, 201):
        raise RuntimeError(f"PATCH /api/pipeline/pools/default -> {status}")

    log(f"fan-out: triggering bench_fanout ({a.fanout} + 1 tasks)")
    t0 = time.time()
    _, run = api.call("POST", "/api/pipeline/dags/bench_fanout/dagRuns", {"conf": {}})
    run_id = run["dag_run_id"]
    deadline = time.monotonic() + a.timeout
    while run["state"] not in TERMINAL_RUN:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fan-out run {run_id} unfinished after {a.timeout}s: state {run['state']}")
        time.sleep(0.1)
        run = api.get(f"/api/pipeline/dags/bench_fanout/dagRuns/{urllib.parse.quote(run_id, safe='')}")
    wall = time.time() - t0
    fo = fanout_figures(bulwark_tis(api, "bench_fanout", run_id))
    fo.update(run_state=run["state"], wall_s=wall,
              run_s=ts(run["end_date"]) - ts(run.get("queued_at") or run["start_date"]))
    res["fanout"] = fo

    if a.cmp_runs > 0:
        log(f"backfill: bench_chain_cmp, {a.cmp_runs} runs")
        res["backfill_cmp"] = bulwark_backfill(api, "bench_chain_cmp", a.cmp_runs, a.active_runs, a.timeout, 10**9)
    if a.backfill_runs > 0:
        log(f"backfill: bench_chain, {a.backfill_runs} runs")
        res["backfill"] = bulwark_backfill(api, "bench_chain", a.backfill_runs, a.active_runs, a.timeout, 500)
    res["load_end"] = os.getloadavg()[0]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


# ---------------------------------------------------------------- Airflow through its CLI and metadata DB

def run_airflow(a):
    import psycopg2  # the Airflow venv's; this path runs under that venv's python

    conn = psycopg2.connect(a.db_url)
    conn.autocommit = True
    cur = conn.cursor()

    def q(sql, *args):
        cur.execute(sql, args)
        return cur.fetchall()

    def cli(*args):
        t = time.time()
        p = subprocess.run([a.airflow, *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return time.time() - t, p.stdout

    dags = ["bench_fanout"] + (["bench_chain_cmp"] if a.cmp_runs > 0 else [])
    deadline = time.monotonic() + a.timeout
    while True:
        have = {r[0]: r[1] for r in q("SELECT d.dag_id, d.is_paused FROM dag d JOIN serialized_dag s USING (dag_id) "
                                       "WHERE d.dag_id = ANY(%s)", dags)}
        if len(have) == len(dags):
            break
        if time.monotonic() > deadline:
            errs = q("SELECT filename, left(stacktrace, 1500) FROM import_error")
            raise RuntimeError(f"Airflow DAGs not parsed after {a.timeout}s (have {have}); import errors: {errs}")
        time.sleep(1)
    for d, paused in have.items():
        if paused:
            cli("dags", "unpause", d)
    res = {"engine": "airflow", "label": a.label, "load_start": os.getloadavg()[0]}

    log(f"airflow fan-out: triggering bench_fanout ({a.fanout} + 1 tasks)")
    t0 = time.time()
    cli_s = None if a.read_existing else cli("dags", "trigger", "bench_fanout")[0]
    (run_pk, run_id), = q("SELECT id, run_id FROM dag_run WHERE dag_id = 'bench_fanout' ORDER BY id DESC LIMIT 1")
    deadline = time.monotonic() + a.timeout
    while True:
        (state, queued_at, start_date, end_date), = q(
            "SELECT state, queued_at, start_date, end_date FROM dag_run WHERE id = %s", run_pk)
        if state in TERMINAL_RUN:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"Airflow fan-out run unfinished after {a.timeout}s: {state}")
        time.sleep(0.25)
    wall = time.time() - t0
    rows = q("SELECT task_id, state, queued_dttm, start_date, end_date, scheduled_dttm FROM task_instance "
             "WHERE dag_id = 'bench_fanout' AND run_id = %s", run_id)
    fo = fanout_figures([{"task_id": r[0], "state": r[1], "queued": ts(r[2]), "start": ts(r[3]),
                          "end": ts(r[4]), "scheduled": ts(r[5])} for r in rows])
    fo.update(run_state=state, wall_s=None if a.read_existing else wall, trigger_cli_s=cli_s, run_s=ts(end_date) - ts(queued_at or start_date))
    res["fanout"] = fo

    if a.cmp_runs > 0:
        start, last, _ = chain_days(a.cmp_runs)
        log(f"airflow backfill: bench_chain_cmp, {a.cmp_runs} runs")
        t0 = time.time()
        if not a.read_existing:
            cli("backfill", "create", "--dag-id", "bench_chain_cmp", "--from-date", str(start),
                "--to-date", str(last), "--max-active-runs", str(a.active_runs), "--reprocess-behavior", "none")
        (bf_id, created), = q("SELECT id, created_at FROM backfill WHERE dag_id = 'bench_chain_cmp' ORDER BY id DESC LIMIT 1")
        deadline = time.monotonic() + a.timeout
        while True:
            (total, unfinished), = q("SELECT count(*), count(*) FILTER (WHERE state NOT IN ('success', 'failed')) "
                                     "FROM dag_run WHERE backfill_id = %s", bf_id)
            if total > 0 and unfinished == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Airflow backfill {bf_id} unfinished after {a.timeout}s: {unfinished} of {total}")
            time.sleep(0.25)
        wall = time.time() - t0
        states = dict(q("SELECT state, count(*) FROM dag_run WHERE backfill_id = %s GROUP BY state", bf_id))
        (last_end,), = q("SELECT max(end_date) FROM dag_run WHERE backfill_id = %s", bf_id)
        tis = q("SELECT ti.queued_dttm, ti.start_date, ti.run_id, ti.task_id, ti.end_date, ti.scheduled_dttm "
                "FROM task_instance ti JOIN dag_run r "
                "ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id WHERE r.backfill_id = %s", bf_id)
        per_run, ready = {}, []
        for x in tis:
            per_run.setdefault(x[2], []).append({"task_id": x[3], "start": ts(x[1]), "end": ts(x[4])})
        for one in per_run.values():
            ready += ready_pairs(one, CHAIN_UPSTREAM)
        scheduled = q("SELECT count(*) FROM dag_run WHERE dag_id = 'bench_chain_cmp' AND run_type <> 'backfill'")[0][0]
        e2e = ts(last_end) - ts(created)
        res["backfill_cmp"] = {"runs": total, "run_states": states, "wall_s": None if a.read_existing else wall, "end_to_end_s": e2e,
                               "runs_per_s": total / e2e, "non_backfill_runs": scheduled,
                               "start_latency": latency_stats([(ts(x[0]), ts(x[1])) for x in tis]),
                               "ready_latency": latency_stats(ready),
                               "scheduled_latency": latency_stats([(ts(x[5]), ts(x[1])) for x in tis])}
    res["load_end"] = os.getloadavg()[0]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


# ---------------------------------------------------------------- report

def fmt(v, unit="", digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{unit}"


def report(files):
    results = [json.load(open(f)) for f in files]
    cols = [r["label"] for r in results]
    rows = []

    def g(r, *path):
        for p in path:
            if r is None:
                return None
            r = r.get(p)
        return r

    fan_n = next((g(r, "fanout", "instances") for r in results if g(r, "fanout")), "?")
    spec = [
        (f"fan-out ({fan_n} tasks): start latency p50", ("fanout", "start_latency", "p50_ms"), " ms", "-"),
        ("fan-out: start latency p99", ("fanout", "start_latency", "p99_ms"), " ms", "< 100 ms"),
        ("fan-out: start latency max", ("fanout", "start_latency", "max_ms"), " ms", "-"),
        ("fan-out: ready -> running p50 (start's end -> start)", ("fanout", "ready_latency", "p50_ms"), " ms", "-"),
        ("fan-out: ready -> running p99", ("fanout", "ready_latency", "p99_ms"), " ms", "-"),
        ("fan-out: scheduled -> running p99 (Airflow only)", ("fanout", "scheduled_latency", "p99_ms"), " ms", "-"),
        ("fan-out: scheduling rate (queued_at spread)", ("fanout", "schedule_rate_per_s"), "/s", ">= 2,000/s"),
        ("fan-out: run queued -> end", ("fanout", "run_s"), " s", "-"),
        ("fan-out: wall, trigger -> seen finished", ("fanout", "wall_s"), " s", "-"),
        ("short backfill: runs", ("backfill_cmp", "runs"), "", "-"),
        ("short backfill: created -> last run end", ("backfill_cmp", "end_to_end_s"), " s", "-"),
        ("short backfill: wall, request -> seen finished", ("backfill_cmp", "wall_s"), " s", "-"),
        ("short backfill: task start latency p50", ("backfill_cmp", "start_latency", "p50_ms"), " ms", "-"),
        ("short backfill: task start latency p99", ("backfill_cmp", "start_latency", "p99_ms"), " ms", "-"),
        ("short backfill: ready -> running p50 (upstream end -> start)", ("backfill_cmp", "ready_latency", "p50_ms"), " ms", "-"),
        ("short backfill: ready -> running p99", ("backfill_cmp", "ready_latency", "p99_ms"), " ms", "-"),
        ("long backfill: runs", ("backfill", "runs"), "", "-"),
        ("long backfill: created -> last run end", ("backfill", "end_to_end_s"), " s", "< 60 s (10,000 runs)"),
        ("long backfill: runs/s", ("backfill", "runs_per_s"), "/s", "-"),
        ("long backfill: task start latency p99 (sample)", ("backfill", "start_latency", "p99_ms"), " ms", "-"),
    ]
    for name, path, unit, goal in spec:
        vals = [g(r, *path) for r in results]
        if all(v is None for v in vals):
            continue
        digits = 0 if name.endswith("runs") else (1 if unit != " s" else 2)
        rows.append([name] + [fmt(v, unit, digits) for v in vals] + [goal])
    header = ["what"] + cols + ["goal"]
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    for r in results:
        if r.get("load_start") is not None:
            print(f"{r['label']}: 1-minute load average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end (2 cores)")
        st = g(r, "fanout", "states")
        if st:
            print(f"{r['label']}: fan-out instance states {st}; run {g(r, 'fanout', 'run_state')}")
        for k in ("backfill_cmp", "backfill"):
            if g(r, k):
                extra = f", non-backfill runs {g(r, k, 'non_backfill_runs')}" if g(r, k, "non_backfill_runs") is not None else ""
                print(f"{r['label']}: {k} run states {g(r, k, 'run_states')}{extra}")
    air = [r for r in results if r["engine"] == "airflow"]
    if air and any(r["engine"] == "bulwark" for r in results):
        af = air[0]
        print()
        print(f"ratios Bulwark / Airflow (same run; < 1 = Bulwark faster):")
        for r in results:
            if r["engine"] != "bulwark":
                continue
            for name, path in [("start latency p50", ("fanout", "start_latency", "p50_ms")),
                               ("start latency p99", ("fanout", "start_latency", "p99_ms")),
                               ("ready -> running p50", ("fanout", "ready_latency", "p50_ms")),
                               ("ready -> running p99", ("fanout", "ready_latency", "p99_ms")),
                               ("fan-out run queued -> end", ("fanout", "run_s")),
                               ("short backfill created -> last end", ("backfill_cmp", "end_to_end_s")),
                               ("short backfill task start latency p99", ("backfill_cmp", "start_latency", "p99_ms"))]:
                b, x = g(r, *path), g(af, *path)
                ratio = f"{b / x:.3f}x" if b is not None and x else "-"
                print(f"  {r['label']}: {name}: {ratio}")
            b, x = g(r, "fanout", "schedule_rate_per_s"), g(af, "fanout", "schedule_rate_per_s")
            print(f"  {r['label']}: scheduling rate (higher = Bulwark faster): "
                  f"{(f'{b / x:.2f}x') if b is not None and x else '-'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--fanout", type=int, default=1000)
        s.add_argument("--backfill-runs", type=int, default=10000)
        s.add_argument("--cmp-runs", type=int, default=100)
        s.add_argument("--active-runs", type=int, default=64)

    w = sub.add_parser("write-dags")
    w.add_argument("--engine", choices=["bulwark", "airflow"], required=True)
    w.add_argument("--out", required=True)
    common(w)
    b = sub.add_parser("bulwark")
    b.add_argument("--url", required=True)
    b.add_argument("--token-file", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--label", default="bulwark")
    b.add_argument("--pool-slots", type=int, default=2000)
    b.add_argument("--timeout", type=float, default=900)
    common(b)
    f = sub.add_parser("airflow")
    f.add_argument("--db-url", required=True)
    f.add_argument("--airflow", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--label", default="airflow 3.3.2")
    f.add_argument("--timeout", type=float, default=1800)
    f.add_argument("--read-existing", action="store_true",
                   help="trigger nothing: read the figures of the latest fan-out run and backfill in the DB")
    common(f)
    r = sub.add_parser("report")
    r.add_argument("files", nargs="+")
    a = p.parse_args()
    {"write-dags": write_dags, "bulwark": run_bulwark, "airflow": run_airflow, "report": lambda a: report(a.files)}[a.cmd](a)


if __name__ == "__main__":
    main()
