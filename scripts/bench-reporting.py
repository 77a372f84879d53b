"""Change-capture benchmarks of the reporting module (issue 15), printed as JSON.

1. Throughput and lag: a captured table receives --rows inserts (transactions of --batch rows,
   as fast as psql sends them) and then the same number of updates; we time from the first write
   to the moment the sink's applied counter (`bulwark_reporting_changes_applied_total`) reaches
   the number of changes, and read the apply-lag quantiles (commit on the source → merged into
   Delta) from /metrics. The Delta table is then read by the `deltalake` package and compared.
2. Primary overhead: pgbench (TPC-B-like, --clients, --seconds) on the same database, four
   conditions per round (--rounds N repeats them; medians and per-round ratios): no capture
   (baseline); the floor — PostgreSQL's own pg_recvlogical streaming the same tables to
   /dev/null, the least any reader of a logical slot costs the primary; capture on (bulwark
   reading pgbench_accounts/tellers/branches with --capture-mode and applying them); and the
   naive alternative — a job that copies pgbench_accounts with SELECT every --naive-every
   seconds (the brief's "batch job every minute", compressed so that a short round sees several
   copies). Besides TPS, each condition reports the primary's CPU per transaction (all
   PostgreSQL processes' user+system time over the round / transactions). --isolate-primary
   pins PostgreSQL to CPU 0 and everything else to CPU 1, as separate machines would be.
3. Report API (R4): bulwark on its embedded defaults with a year of summary rows for the
   shipped `bids_per_day` report; wrk (64 connections, 2 threads, --report-seconds) asks for a
   30-day range through the cache; the baseline is nginx serving the same JSON body as a
   static file under the same wrk run settings. wrk is closed-loop: its latencies are at the
   highest rate the machine sustains, with wrk, bulwark (or nginx) sharing 2 cores.

Everything runs on this machine: PostgreSQL, NATS, bulwark and pgbench share 2 cores, so the
capture's CPU competes with the primary's, which a deployment on separate machines would not.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PG = os.environ.get("BULWARK_TEST_POSTGRES_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres")
NATS = os.environ.get("BULWARK_TEST_NATS_URL", "nats://127.0.0.1:4222")
PGBIN = "/usr/lib/postgresql/15/bin"


def db_url(name):
    return PG.rsplit("/", 1)[0] + "/" + name


def psql(url, sql, quiet=True):
    out = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"psql failed: {sql[:120]}: {out.stderr}")
    return out.stdout.strip()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text, name, labels=None):
    total = None
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = m.group(2) or ""
        if labels and not all(f'{k}="{v}"' in lab for k, v in labels.items()):
            continue
        total = (total or 0.0) + float(m.group(3))
    return total


def bucket_quantile(text, name, q):
    """Prometheus' histogram_quantile over a histogram's cumulative `le` buckets: linear inside
    the bucket that holds the q-th observation; also that bucket's upper bound (the resolution)."""
    buckets = []
    for line in text.splitlines():
        m = re.match(rf'^{name}_bucket\{{.*le="([^"]+)".*\}}\s+(\S+)$', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, float(m.group(2))))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return {"value": lower, "bucket_le": "+Inf"}
            inside = count - below
            frac = (rank - below) / inside if inside else 1.0
            return {"value": round(lower + (le - lower) * frac, 4), "bucket_le": le}
        lower, below = le, count
    return None


class Bulwark:
    def __init__(self, binary, source, tables, slot, role="all", poll="20ms", cpus=None, mode="stream"):
        self.dir = tempfile.mkdtemp(prefix="bench-reporting-")
        self.port = free_port()
        tables_toml = "\n".join(f'[[reporting.tables]]\nname = "{t}"' for t in tables)
        with open(os.path.join(self.dir, "bulwark.toml"), "w") as f:
            f.write(f"""data_dir = "{self.dir}/data"
[server]
listen = "127.0.0.1:{self.port}"
[bus]
url = "{NATS}"
prefix = "{slot}"
[telemetry]
log_level = "warn"
[reporting]
source_url = "{source}"
slot = "{slot}"
publication = "{slot}"
capture_mode = "{mode}"
poll_interval = "{poll}"
{tables_toml}
""")
        self.log = open(os.path.join(self.dir, "log"), "w")
        pinned = ["taskset", "-c", cpus] if cpus else []
        self.proc = subprocess.Popen(pinned + [binary, "--config", "bulwark.toml", "serve", "--role", role], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise SystemExit("bulwark did not become ready; log in " + self.dir)

    def applied(self, table):
        return metric(metrics(self.port), "bulwark_reporting_changes_applied_total", {"table": table}) or 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drop_slot(url, slot):
    psql(url, f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")


def throughput(args, url):
    slot = "bench_cdc_events"
    drop_slot(url, slot)
    psql(url, "DROP TABLE IF EXISTS bench_events; CREATE TABLE bench_events (id bigint PRIMARY KEY, "
              "account int NOT NULL, amount numeric(12,2) NOT NULL, note text, at timestamptz NOT NULL DEFAULT now())")
    b = Bulwark(args.binary, url, ["public.bench_events"], slot, mode=args.capture_mode)
    try:
        n, batch = args.rows, args.batch
        t0 = time.time()
        sql = []
        for start in range(1, n + 1, batch):
            end = min(n, start + batch - 1)
            sql.append(f"INSERT INTO bench_events (id, account, amount, note) SELECT g, g % 1000, g * 0.01, "
                       f"'note ' || g FROM generate_series({start}, {end}) g;")
        for start in range(1, n + 1, batch):
            end = min(n, start + batch - 1)
            sql.append(f"UPDATE bench_events SET amount = amount + 1 WHERE id BETWEEN {start} AND {end};")
        if args.rate:
            # Paced: one statement of --batch rows every batch/rate seconds, so the lag is
            # measured at a steady rate and not behind a burst's backlog.
            writer = subprocess.Popen(["psql", url, "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, text=True)
            for i, stmt in enumerate(sql):
                due = t0 + i * batch / args.rate
                if due > time.time():
                    time.sleep(due - time.time())
                writer.stdin.write(stmt + "\n")
                writer.stdin.flush()
            writer.stdin.close()
            if writer.wait() != 0:
                raise SystemExit("psql writer failed")
        else:
            subprocess.run(["psql", url, "-q", "-v", "ON_ERROR_STOP=1"], input="\n".join(sql), text=True, check=True)
        written = time.time() - t0
        want = 2 * n
        while b.applied("public.bench_events") < want:
            if time.time() - t0 > args.timeout:
                raise SystemExit(f"applied {b.applied('public.bench_events')} of {want} in {args.timeout}s; log in {b.dir}")
            time.sleep(0.05)
        total = time.time() - t0
        text = metrics(b.port)
        q = {k: bucket_quantile(text, "bulwark_reporting_apply_lag_seconds", float(k)) for k in ("0.5", "0.99", "1")}
        path = os.path.join(b.dir, "data", "warehouse", "cdc_public_bench_events")
        check = subprocess.run([sys.executable, "-c",
                                "import sys,deltalake,pyarrow.compute as pc;t=deltalake.DeltaTable(sys.argv[1]).to_pyarrow_table();"
                                "l=t.filter(pc.invert(t['_deleted']));print(l.num_rows, pc.sum(l['amount']).as_py())", path],
                               capture_output=True, text=True)
        src = psql(url, "SELECT count(*) || ' ' || sum(amount) FROM bench_events")
        return {
            "rows": n, "changes": want, "batch": batch, "offered_rows_per_second": args.rate or "unpaced",
            "source_write_seconds": round(written, 2),
            "capture_and_apply_seconds": round(total, 2),
            "changes_per_second": round(want / total),
            "apply_lag_seconds": q,
            "delta_equals_source": check.stdout.split() == src.split(),
            "delta": check.stdout.strip(), "source": src,
        }
    finally:
        b.stop()
        drop_slot(url, slot)
        shutil.rmtree(b.dir, ignore_errors=True)


def postgres_pids():
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def postgres_cpu_seconds():
    """CPU seconds the whole PostgreSQL server used so far: every live process's user+system
    time, plus the postmaster's reaped children (backends that already exited)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = postgres_pids()
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (stat field 3): utime, stime, cutime, cstime are fields 14-17.
        total += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in pids:  # the postmaster: its parent is not a postgres process
            total += int(fields[13]) + int(fields[14])
    return total / tick


def pin(pids, cpus):
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


def pgbench(url, args):
    cmd = [f"{PGBIN}/pgbench", "-n", "-c", str(args.clients), "-j", "2", "-T", str(args.seconds), url]
    if args.isolate_primary:
        cmd = ["taskset", "-c", "1"] + cmd
    cpu0 = postgres_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = postgres_cpu_seconds() - cpu0
    m = re.search(r"tps = ([0-9.]+) \(without initial", out)
    tps = float(m.group(1)) if m else 0.0
    tx = re.search(r"number of transactions actually processed: (\d+)", out)
    n = int(tx.group(1)) if tx else 0
    return {"tps": tps, "primary_cpu_ms_per_tx": round(1000 * cpu / n, 3) if n else None}


def overhead(args, url):
    subprocess.run([f"{PGBIN}/pgbench", "-i", "-q", "-s", str(args.scale), url], capture_output=True, check=True)
    nats = [int(p) for p in subprocess.run(["pgrep", "-x", "nats-server"], capture_output=True, text=True).stdout.split()]
    if args.isolate_primary:
        # The primary alone on CPU 0 (backends fork from the postmaster and inherit it);
        # pgbench, NATS and bulwark — which a deployment runs on other machines — on CPU 1.
        pin(postgres_pids(), "0")
        pin(nats, "1")
    try:
        rounds = []
        for _ in range(args.rounds):
            rounds.append(overhead_round(args, url))
    finally:
        if args.isolate_primary:
            pin(postgres_pids(), "0-1")
            pin(nats, "0-1")
    def median(key):
        v = sorted(r[key] for r in rounds)
        return v[len(v) // 2]
    out = {"rounds": rounds}
    for k in ("baseline", "floor_recvlogical", "cdc_on", "naive_select"):
        out[f"{k}_tps_median"] = median(f"{k}_tps")
        out[f"{k}_primary_cpu_ms_per_tx_median"] = median(f"{k}_primary_cpu_ms_per_tx")
    base = out["baseline_tps_median"] or 1.0
    out["cdc_on_ratio"] = round(out["cdc_on_tps_median"] / base, 3)
    out["floor_recvlogical_ratio"] = round(out["floor_recvlogical_tps_median"] / base, 3)
    out["naive_select_ratio"] = round(out["naive_select_tps_median"] / base, 3)
    out["cdc_on_ratio_per_round"] = [round(r["cdc_on_tps"] / (r["baseline_tps"] or 1.0), 3) for r in rounds]
    out["floor_ratio_per_round"] = [round(r["floor_recvlogical_tps"] / (r["baseline_tps"] or 1.0), 3) for r in rounds]
    out.update({"capture_mode": args.capture_mode, "capture_role": args.overhead_role, "poll_interval": args.overhead_poll, "clients": args.clients,
                "seconds": args.seconds, "scale": args.scale, "naive_every_seconds": args.naive_every,
                "isolate_primary": args.isolate_primary})
    return out


def overhead_round(args, url):
    """One round: pgbench without capture, with it, and beside the naive copy job."""
    r = {}
    b0 = pgbench(url, args)
    r["baseline_tps"], r["baseline_primary_cpu_ms_per_tx"] = b0["tps"], b0["primary_cpu_ms_per_tx"]
    slot = "bench_cdc_pgbench"
    drop_slot(url, slot)
    # The floor: PostgreSQL's own pg_recvlogical streaming the same publication to /dev/null.
    # Whatever reads a logical slot pays at least this on the primary (the walsender's decoding).
    floor_slot = "bench_cdc_floor"
    drop_slot(url, floor_slot)
    psql(url, "DROP PUBLICATION IF EXISTS bench_cdc_floor; CREATE PUBLICATION bench_cdc_floor FOR TABLE "
              "pgbench_accounts, pgbench_tellers, pgbench_branches")
    psql(url, f"SELECT pg_create_logical_replication_slot('{floor_slot}', 'pgoutput')")
    recv = subprocess.Popen((["taskset", "-c", "1"] if args.isolate_primary else []) + [
        f"{PGBIN}/pg_recvlogical", "-d", url, "--slot", floor_slot, "--start", "-o", "proto_version=1",
        "-o", "publication_names=bench_cdc_floor", "-f", "/dev/null", "-s", "1"])
    try:
        time.sleep(1)
        fl = pgbench(url, args)
        r["floor_recvlogical_tps"], r["floor_recvlogical_primary_cpu_ms_per_tx"] = fl["tps"], fl["primary_cpu_ms_per_tx"]
    finally:
        recv.terminate()
        recv.wait()
        drop_slot(url, floor_slot)
        psql(url, "DROP PUBLICATION IF EXISTS bench_cdc_floor")
    b = Bulwark(args.binary, url, ["public.pgbench_accounts", "public.pgbench_tellers", "public.pgbench_branches"], slot,
                args.overhead_role, args.overhead_poll, cpus="1" if args.isolate_primary else None,
                mode=args.capture_mode)
    try:
        # Let the initial snapshot finish before measuring (a capture-only process counts
        # what it captured; the sink counts what it applied).
        accounts = 100000 * args.scale
        counter = "bulwark_reporting_changes_applied_total" if args.overhead_role != "scheduler" \
            else "bulwark_reporting_snapshot_rows_total"
        while (metric(metrics(b.port), counter, {"table": "public.pgbench_accounts"}) or 0) < accounts:
            time.sleep(0.2)
        on = pgbench(url, args)
        r["cdc_on_tps"], r["cdc_on_primary_cpu_ms_per_tx"] = on["tps"], on["primary_cpu_ms_per_tx"]
        time.sleep(2)
        r["cdc_lag_after_round_bytes"] = metric(metrics(b.port), "bulwark_reporting_capture_lag_bytes")
    finally:
        b.stop()
        drop_slot(url, slot)
    stop = time.time() + args.seconds + 1
    copier = subprocess.Popen((["taskset", "-c", "1"] if args.isolate_primary else []) + ["bash", "-c",
                               f"while [ $(date +%s) -lt {int(stop)} ]; do psql '{url}' -Atqc 'SELECT * FROM pgbench_accounts' >/dev/null; "
                               f"sleep {args.naive_every}; done"])
    nv = pgbench(url, args)
    r["naive_select_tps"], r["naive_select_primary_cpu_ms_per_tx"] = nv["tps"], nv["primary_cpu_ms_per_tx"]
    copier.wait()
    return r


def wrk(url, args, headers=()):
    cmd = ["wrk", "-t", "2", "-c", str(args.connections), "-d", f"{args.report_seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    lat = {}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            lat[q] = round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 3)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests_per_second": float(rps.group(1)) if rps else 0.0, "latency_ms": lat,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def report_api(args):
    import sqlite3
    d = tempfile.mkdtemp(prefix="bench-report-api-")
    port = free_port()
    env = dict(os.environ, BULWARK__SERVER__LISTEN=f"127.0.0.1:{port}", BULWARK__TELEMETRY__LOG_LEVEL="warn")
    log = open(os.path.join(d, "log"), "w")
    proc = subprocess.Popen([args.binary, "serve"], cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    nginx = None
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                if time.time() > deadline:
                    raise SystemExit("bulwark did not become ready; log in " + d)
                time.sleep(0.2)
        # A year of summaries for the shipped report, three groups a day, as the DAG writes them.
        db = sqlite3.connect(os.path.join(d, "data", "bulwark.db"), timeout=30)
        now = int(time.time() * 1000)
        rows = []
        for day in range(365):
            date = time.strftime("%Y-%m-%d", time.gmtime(1767225600 + day * 86400))
            for g, outcome in enumerate(("accepted", "rejected", "late")):
                rows.append(("bids_per_day", date, json.dumps([outcome]),
                             json.dumps({"bids": 1000 + day + g, "amount": 12345.5 + day, "bidders": 40 + g}), now))
        db.executemany("INSERT INTO reporting_summaries (report, day, grp, metrics, refreshed_at_ms) "
                       "VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO reporting_summary_state (report, lsn, days, refreshed_at_ms) VALUES (?, ?, ?, ?)",
                   ("bids_per_day", 1, 365, now))
        db.commit()
        db.close()
        token = subprocess.run([args.binary, "token", "issue", "--sub", "bench", "--role", "viewer"], cwd=d,
                               capture_output=True, text=True, check=True).stdout.strip()
        path = "/api/reporting/reports/bids_per_day?from=2026-03-01&to=2026-03-30"
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        got_rows = len(json.loads(body)["rows"])
        if got_rows != 90:
            raise SystemExit(f"the report returned {got_rows} rows, expected 90")
        # The baseline: nginx serving the same bytes.
        # nginx's workers run as another user: the folder and the file must be readable to them.
        os.chmod(d, 0o755)
        www = os.path.join(d, "www")
        os.makedirs(www, mode=0o755)
        with open(os.path.join(www, "report.json"), "wb") as f:
            f.write(body)
        os.chmod(os.path.join(www, "report.json"), 0o644)
        nport = free_port()
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; default_type application/json;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen 127.0.0.1:{nport}; root {www}; }} }}
""")
        nginx = subprocess.Popen(["nginx", "-c", conf, "-p", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        ours = wrk(f"http://127.0.0.1:{port}{path}", args, [f"Authorization: Bearer {token}"])
        peer = wrk(f"http://127.0.0.1:{nport}/report.json", args)
        if peer["non_2xx"]:
            raise SystemExit(f"nginx answered {peer['non_2xx']} non-2xx responses; see {d}/nginx-error.log")
        text = metrics(port)
        return {
            "connections": args.connections, "seconds": args.report_seconds, "range_days": 30,
            "rows": got_rows, "body_bytes": len(body),
            "bulwark": ours, "nginx_static": peer,
            "p99_ratio_vs_nginx": round(ours["latency_ms"].get("99", 0) / max(peer["latency_ms"].get("99", 0), 1e-9), 2),
            "rps_ratio_vs_nginx": round(ours["requests_per_second"] / max(peer["requests_per_second"], 1e-9), 3),
            "warehouse_queries": metric(text, "bulwark_reporting_warehouse_queries_total"),
            "served_by_outcome": {o: metric(text, "bulwark_reporting_report_requests_total", {"cache": o})
                                  for o in ("hit", "stale", "miss", "bypass")},
        }
    finally:
        if nginx:
            nginx.terminate()
            nginx.wait(10)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--rate", type=int, default=0,
                   help="throughput: offer this many changed rows per second (0: as fast as psql sends)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--naive-every", type=int, default=10)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--overhead-poll", default="20ms",
                   help="overhead: the capture's reporting.poll_interval (the default config has 200ms)")
    p.add_argument("--overhead-role", default="all", choices=["all", "scheduler"],
                   help="overhead: `scheduler` runs the capture alone (no sink) to separate their costs")
    p.add_argument("--capture-mode", default="stream", choices=["stream", "poll"],
                   help="reporting.capture_mode of the bulwark under test")
    p.add_argument("--rounds", type=int, default=1,
                   help="overhead: repeat baseline/on/naive this many times; medians and per-round ratios")
    p.add_argument("--isolate-primary", action="store_true",
                   help="overhead: pin PostgreSQL to CPU 0 and pgbench, NATS and bulwark to CPU 1, as separate machines would be")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--report-seconds", type=int, default=20)
    p.add_argument("--only", default="throughput,overhead,report",
                   help="comma-separated parts: throughput, overhead, report")
    args = p.parse_args()
    args.binary = os.path.abspath(args.binary)
    parts = set(args.only.split(","))
    if args.skip_overhead:
        parts.discard("overhead")
    result = {}
    if "report" in parts:
        result["report_api"] = report_api(args)
        print(json.dumps(result), flush=True)
    if not parts & {"throughput", "overhead"}:
        print(json.dumps(result, indent=2))
        return
    name = "bench_cdc"
    psql(PG, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    psql(PG, f"CREATE DATABASE {name}")
    url = db_url(name)
    if "throughput" in parts:
        result["throughput"] = throughput(args, url)
        print(json.dumps(result), flush=True)
    if "overhead" in parts:
        result["overhead"] = overhead(args, url)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
