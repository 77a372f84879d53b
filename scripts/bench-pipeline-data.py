#!/usr/bin/env python3
"""Data-engine benchmarks of the pipeline module (issue 13), run by scripts/bench-pipeline-data.

Prints figures and ratios from one run; asserts nothing about speed. Every figure on our side is
a real `sql` task run by `bulwark pipeline test` (the task type the scheduler's workers run,
without the scheduler), timed from outside the process (process start to exit, so start-up,
planning and the output write are included) and with the task's own details (bytes scanned,
file bytes). Peers run the same query on the same files in the same run, in the bench venv:
DuckDB and Polars on every row, pandas on one day (10 % of the rows).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

COLS = ["event_id", "user_id", "kind", "amount", "at", "c5", "c6", "c7", "c8", "c9"]
DAILY_SQL = (
    "SELECT day, kind, count(*) AS events, sum(amount) AS amount, min(amount) AS lo, "
    "max(amount) AS hi FROM events GROUP BY day, kind ORDER BY day, kind"
)

# One day's folder has no `day` column (it is the partition folder): the same query by kind.
DAY_SQL = DAILY_SQL.replace("day, kind", "kind")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def generate(data, rows, days, distinct_users):
    import duckdb

    if os.path.isdir(data) and os.path.exists(os.path.join(data, ".complete")):
        meta = json.load(open(os.path.join(data, ".complete")))
        if meta == {"rows": rows, "days": days, "users": distinct_users}:
            log(f"reusing {data}")
            return
        shutil.rmtree(data)
    os.makedirs(data, exist_ok=True)
    t = time.time()
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = false")
    con.execute(
        f"""
        COPY (
          SELECT
            i AS event_id,
            (i * 7919) % {distinct_users} AS user_id,
            ['view', 'click', 'purchase', 'cart'][(i % 4) + 1] AS kind,
            (i * 31) % 5000 AS amount,
            TIMESTAMP '2026-11-01' + to_seconds(i * 86400 * {days} // {rows}) AS at,
            i * 3 AS c5, i * 5 AS c6, i % 1000 AS c7, i % 77 AS c8, (i * 13) % 100000 AS c9,
            strftime(DATE '2026-11-01' + CAST((i * {days}) // {rows} AS INTEGER), '%Y-%m-%d') AS day
          FROM range({rows}) t(i)
        ) TO '{data}' (FORMAT parquet, PARTITION_BY (day), ROW_GROUP_SIZE 1000000, OVERWRITE_OR_IGNORE)
        """
    )
    json.dump({"rows": rows, "days": days, "users": distinct_users}, open(os.path.join(data, ".complete"), "w"))
    log(f"generated {rows:,} rows in {time.time() - t:.1f}s")


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".parquet"):
                total += os.path.getsize(os.path.join(root, f))
    return total


def bulwark_task(binary, work, dag_dir, task, env_extra=None):
    """Run one task with `bulwark pipeline test`; (seconds, report, peak RSS KiB of that child)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK")}
    env.update({
        "BULWARK__DATA_DIR": work,
        "RUST_LOG": "warn",
    })
    env.update(env_extra or {})
    t = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(
            [binary, "pipeline", "test", "bench_data", task, "--date", "2026-11-01", "--dir", dag_dir],
            env=env, cwd=work, stdout=out, stderr=err, text=True,
        )
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the max over all children).
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.time() - t
        code = p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        log(stderr[-3000:])
        raise SystemExit(f"bulwark task {task} failed (exit {code})")
    report = json.loads(stdout.strip().splitlines()[-1])
    return seconds, report, usage.ru_maxrss

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ballista(binary, work, executors=2):
    """A Ballista scheduler and `executors` executors from our binary, on loopback."""
    import urllib.request
    port = free_port()
    procs = [subprocess.Popen([binary, "pipeline", "ballista-scheduler", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "scheduler.log"), "w"))]
    for i in range(executors):
        procs.append(subprocess.Popen(
            [binary, "pipeline", "ballista-executor", "--scheduler", f"127.0.0.1:{port}",
             "--listen", f"127.0.0.1:{free_port()}", "--work-dir", os.path.join(work, f"executor-{i}"),
             "--vcores", str(max(1, (os.cpu_count() or 2) // executors))],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"executor-{i}.log"), "w")))
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit("ballista did not become ready")
        time.sleep(0.2)
    time.sleep(2)  # let the second executor register too
    return port, procs


def write_dag(dag_dir, data, day_data):
    agg_all = ", ".join(
        f"count({c}) AS n_{c}" if c == "kind" else (f"max({c}) AS m_{c}" if c == "at" else f"sum({c}) AS s_{c}")
        for c in COLS
    )
    text = textwrap.dedent(f"""\
        start_date = "2026-11-01"
        [tasks.daily]
        type = "sql"
        query = "{DAILY_SQL}"
        sources.events = {{ format = "parquet", path = "{data}" }}
        output = {{ table = "daily", format = "parquet" }}

        [tasks.daily_one_day]
        type = "sql"
        query = "{DAY_SQL}"
        sources.events = {{ format = "parquet", path = "{day_data}" }}
        output = {{ table = "daily_one_day", format = "parquet" }}

        [tasks.two_columns]
        type = "sql"
        query = "SELECT sum(event_id) AS a, sum(user_id) AS b FROM events"
        sources.events = {{ format = "parquet", path = "{data}" }}

        [tasks.all_columns]
        type = "sql"
        query = "SELECT {agg_all} FROM events"
        sources.events = {{ format = "parquet", path = "{data}" }}

        [tasks.many_groups]
        type = "sql"
        query = "SELECT count(*) AS users, sum(n) AS events FROM (SELECT user_id, count(*) AS n, max(amount) AS m FROM events GROUP BY user_id)"
        sources.events = {{ format = "parquet", path = "{data}" }}
        """)
    os.makedirs(dag_dir, exist_ok=True)
    open(os.path.join(dag_dir, "bench_data.toml"), "w").write(text)


def timed(fn, repeat):
    best = None
    out = None
    for _ in range(repeat):
        t = time.time()
        out = fn()
        s = time.time() - t
        best = s if best is None else min(best, s)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--users", type=int, default=50_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--only", default="", help="comma list of parts: daily,day,pushdown,memory,ballista")
    a = ap.parse_args()

    import duckdb
    import polars as pl

    generate(a.data, a.rows, a.days, a.users)
    day_data = os.path.join(a.data, "day=2026-11-01")
    file_bytes = dir_bytes(a.data)
    work = tempfile.mkdtemp(prefix="bench-data-")
    dag_dir = os.path.join(work, "dags")
    write_dag(dag_dir, a.data, day_data)
    res = {"rows": a.rows, "parquet_bytes": file_bytes, "cores": os.cpu_count()}

    parts = set(a.only.split(",")) if a.only else {"daily", "day", "pushdown", "memory", "ballista"}
    # Arrow (in-memory) size of the data: 9 eight-byte columns + the kind string (~5 bytes + offset).
    res["arrow_bytes_estimate"] = a.rows * (9 * 8 + 9)
    glob = os.path.join(a.data, "**", "*.parquet")
    if "daily" in parts:
        log("daily aggregation: bulwark sql task")
        runs = [bulwark_task(a.binary, work, dag_dir, "daily") for _ in range(a.repeat)]
        res["bulwark_s"] = min(r[0] for r in runs)
        res["bulwark_bytes_scanned"] = runs[0][1]["details"]["bytes_scanned"]
        ours = runs[0][1]["details"]["rows"]

        log("daily aggregation: duckdb")
        q = DAILY_SQL.replace("FROM events", f"FROM read_parquet('{glob}', hive_partitioning = true)")
        res["duckdb_s"], d_rows = timed(lambda: duckdb.connect().execute(q).fetchall(), a.repeat)

        log("daily aggregation: polars")

        def polars_daily(path):
            return (
                pl.scan_parquet(path, hive_partitioning=True)
                .group_by(["day", "kind"])
                .agg(pl.len().alias("events"), pl.col("amount").sum(), pl.col("amount").min().alias("lo"),
                     pl.col("amount").max().alias("hi"))
                .sort(["day", "kind"])
                .collect()
            )

        res["polars_s"], p_df = timed(lambda: polars_daily(glob), a.repeat)
        if not (ours == len(d_rows) == p_df.height):
            raise SystemExit(f"MISMATCH: result rows bulwark {ours}, duckdb {len(d_rows)}, polars {p_df.height}")
        fastest = min(res["duckdb_s"], res["polars_s"])
        res["ratio_vs_fastest_peer"] = fastest / res["bulwark_s"]

    if "day" in parts:
        log("one day (10 %): bulwark, duckdb, polars, pandas")
        res["day_bulwark_s"] = min(bulwark_task(a.binary, work, dag_dir, "daily_one_day")[0] for _ in range(a.repeat))
        dglob = os.path.join(day_data, "*.parquet")
        qd = DAY_SQL.replace("FROM events", f"FROM read_parquet('{dglob}')")
        res["day_duckdb_s"], _ = timed(lambda: duckdb.connect().execute(qd).fetchall(), a.repeat)
        res["day_polars_s"], _ = timed(lambda: pl.scan_parquet(dglob).group_by("kind").agg(
            pl.len().alias("events"), pl.col("amount").sum(), pl.col("amount").min().alias("lo"),
            pl.col("amount").max().alias("hi")).collect(), a.repeat)

        def pandas_day():
            import pandas as pd
            df = pd.read_parquet(day_data, columns=["kind", "amount"])
            return df.groupby("kind")["amount"].agg(["count", "sum", "min", "max"])

        res["day_pandas_s"], _ = timed(pandas_day, a.repeat)
        res["day_ratio_vs_pandas"] = res["day_pandas_s"] / res["day_bulwark_s"]

    if "pushdown" in parts:
        log("projection pushdown: 2 of 10 columns vs all")
        _, two, _ = bulwark_task(a.binary, work, dag_dir, "two_columns")
        _, alls, _ = bulwark_task(a.binary, work, dag_dir, "all_columns")
        res["pushdown_bytes_two"] = two["details"]["bytes_scanned"]
        res["pushdown_bytes_all"] = alls["details"]["bytes_scanned"]
        res["pushdown_ratio"] = res["pushdown_bytes_two"] / max(1, res["pushdown_bytes_all"])

    if "memory" in parts:
        log(f"memory-bounded: {a.users:,} groups with a {a.memory_mb} MiB pool, then unbounded")
        env = {"BULWARK__PIPELINE__ENGINE__MEMORY_LIMIT_MB": str(a.memory_mb)}
        s, rep, rss = bulwark_task(a.binary, work, dag_dir, "many_groups", env)
        res["bounded_s"] = s
        res["bounded_peak_rss_kib"] = rss
        s2, rep2, rss2 = bulwark_task(a.binary, work, dag_dir, "many_groups")
        res["unbounded_s"] = s2
        res["unbounded_peak_rss_kib"] = rss2
    if "ballista" in parts:
        log("ballista: the daily aggregation on a scheduler + 2 executors vs in process")
        port, procs = start_ballista(a.binary, work)
        try:
            env = {"BULWARK__PIPELINE__ENGINE__KIND": "ballista",
                   "BULWARK__PIPELINE__ENGINE__SCHEDULER_URL": f"df://127.0.0.1:{port}"}
            runs = [bulwark_task(a.binary, work, dag_dir, "daily", env) for _ in range(a.repeat)]
            if runs[0][1]["details"].get("engine") != "ballista":
                raise SystemExit(f"the task did not run on ballista: {runs[0][1]}")
            res["ballista_s"] = min(r[0] for r in runs)
            local = res.get("bulwark_s") or min(bulwark_task(a.binary, work, dag_dir, "daily")[0] for _ in range(a.repeat))
            res["ballista_in_process_s"] = local
            res["ballista_overhead_ratio"] = res["ballista_s"] / local
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
