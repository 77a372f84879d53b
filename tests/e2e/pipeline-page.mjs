// Browser end-to-end test of the pipeline page (P4) in headless Chromium.
//
// Starts the real `bulwark` binary on embedded defaults with a fast scheduler
// (pipeline.reload_interval 200ms, scheduler_interval 50ms), writes a DAG file into
// <data_dir>/dags/etl.toml (a daily chain extract → transform → load of shell tasks echoing
// {{ ds }}; catchup off and an end_date in the past, so the scheduler creates no run by itself)
// and a broken one, and drives /pipeline/?token=ADMIN:
//  - the import error is shown (file:line message) and the DAG is listed;
//  - Trigger (with a logical date) creates a run and its grid cells turn success without a
//    reload; a second trigger of the same date shows the 409 next to the form;
//  - clicking a cell shows the task instance and its log, which holds the echoed date; the graph
//    and the duration chart are drawn;
//  - Clear with downstream: the dry run lists exactly transform and load, Confirm reruns them and
//    try 2 appears with its own log;
//  - Backfill: the dry run says 3 dates; creating it adds 3 backfill runs to the grid and the
//    progress reaches 3/3;
//  - a viewer token sees the page and gets a clear "not allowed" message from Trigger (no run);
//  - a running task's log is tailed live (slow.toml: echo, sleep 5, echo) until complete;
//  - polling pauses while the tab is hidden and resumes when it is shown;
//  - the paused toggle works for the admin.
// Every request to another origin is refused and counted; script errors and CSP violations fail.
//
// Env: BULWARK_BIN, CHROMIUM (see harness.mjs), SCREENSHOT_DIR (optional PNGs).
// Exit code 0 when every check passed; each check prints one line.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { check, freePort, launchBrowser, ready, run, startServer, tempDir, token } from "./harness.mjs";

const shots = process.env.SCREENSHOT_DIR;
const dir = tempDir("bulwark-e2e-pipeline-");
const T = { timeout: 30_000 };
const day = (n) => new Date(Date.now() - n * 86_400_000).toISOString().slice(0, 10);

const DAG = `
description = "Extract, transform and load one day."
schedule = "@daily"
catchup = false
start_date = "${day(8)}"
end_date = "${day(6)}"
owner = "data-team"
tags = ["e2e", "etl"]

[tasks.extract]
type = "shell"
command = "echo extract {{ ds }}"

[tasks.transform]
type = "shell"
depends_on = ["extract"]
command = "echo transform {{ ds }} try {{ try_number }}"

[tasks.load]
type = "shell"
depends_on = ["transform"]
command = "echo load {{ ds }}"
`;

async function main() {
  const dags = path.join(dir, "data", "dags");
  mkdirSync(dags, { recursive: true });
  writeFileSync(path.join(dags, "etl.toml"), DAG);
  writeFileSync(path.join(dags, "slow.toml"), 'schedule = "none"\nstart_date = "2026-11-01"\n[tasks.sleepy]\ntype = "shell"\ncommand = "echo begin {{ ds }}; sleep 5; echo end"\n');
  // A sql task with a quality check that quarantines every tenth row (issue 13, P10).
  writeFileSync(path.join(dags, "gated.toml"), 'schedule = "none"\nstart_date = "2026-11-01"\n[tasks.gate]\ntype = "sql"\n' +
    'query = "SELECT value AS id, CASE WHEN value % 10 = 0 THEN NULL ELSE value END AS v FROM generate_series(1, 100)"\n' +
    'output = { table = "gated_out" }\nchecks = [{ expect = "not_null", column = "v", policy = "quarantine", mostly = 0.5 }]\n');
  writeFileSync(path.join(dags, "broken.toml"), 'schedule = "@daily"\nstart_date = "2026-11-01"\n[tasks.a]\ntype = "shell"\ncommand = "true"\ndepends_on = ["nope"]\n');
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const serverLog = path.join(dir, "server.log");
  startServer(dir, port, {
    BULWARK__PIPELINE__RELOAD_INTERVAL: "200ms",
    BULWARK__PIPELINE__SCHEDULER_INTERVAL: "50ms",
  }, serverLog);
  if (!check(await ready(base), `bulwark ready on ${base}`)) return;
  const admin = token(dir, port, "e2e-admin", "admin");
  const viewer = token(dir, port, "e2e-viewer", "viewer");
  const call = async (method, p, who = admin, body) => {
    const res = await fetch(base + "/api/pipeline" + p, {
      method,
      headers: { authorization: `Bearer ${who}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  };

  const browser = await launchBrowser();
  const outside = [];
  const errors = [];
  const open = async (who, tok) => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(base + "/")) return route.fallback();
      outside.push(url);
      return route.abort();
    });
    const page = await context.newPage();
    page.on("pageerror", (e) => errors.push(`${who}: ${e}`));
    page.on("console", (m) => { if (m.type() === "error" && !/Failed to load resource|net::ERR_/.test(m.text())) errors.push(`${who} console: ${m.text()}`); });
    let loads = 0; // document loads (history.replaceState does not count)
    page.on("load", () => { loads++; });
    const res = await page.goto(`${base}/pipeline/?token=${tok}`);
    return { page, res, loads: () => loads };
  };
  // Waits for what depends on the engine (runs finishing): false on timeout, so that the check
  // after it fails with what the page shows instead of ending the test.
  const soft = (p) => p.then(() => true, () => false);
  const text = (page, sel) => page.textContent(sel).then((t) => (t || "").trim());

  // ------------------------------------------------------------ list and import errors
  const { page: a, res, loads } = await open("admin", admin);
  check(res.status() === 200 && (res.headers()["content-type"] || "").startsWith("text/html"), `GET /pipeline/ answers 200 text/html (${res.status()})`);
  const csp = res.headers()["content-security-policy"] || "";
  check(csp.includes("default-src 'none'") && /script-src 'nonce-[0-9a-f]+'/.test(csp) && csp.includes("connect-src 'self'"),
    `it sends a strict Content-Security-Policy (${csp.slice(0, 60)}…)`);
  check(!a.url().includes("token="), "the token is removed from the address bar");
  await a.waitForSelector('#dag-rows tr[data-dag="etl"]', T);
  const row = await text(a, '#dag-rows tr[data-dag="etl"]');
  check(row.includes("@daily") && row.includes("data-team") && row.includes("e2e") && row.includes("no run yet"),
    `the DAG list shows etl with schedule, owner, tags and no run yet (${row.replace(/\s+/g, " ")})`);
  await a.waitForSelector("#import-errors:not(.hidden) li", T);
  const imp = await text(a, "#import-list");
  check(/broken\.toml(:\d+)? .*nope/.test(imp), `the import error is shown above the list as file:line message (${imp})`);

  // --------------------------------------------------------------- trigger → live grid
  await a.click('button[data-dag="etl"]');
  await a.waitForSelector('#dag-view:not(.hidden) #grid th.task', T);
  check((await a.$$eval("#grid tbody th.task", (ths) => ths.map((t) => t.textContent))).join() === "extract,transform,load", "the grid lists the tasks as rows");
  const legend = await text(a, "#legend");
  check(["none", "scheduled", "queued", "running", "success", "failed", "up_for_retry", "upstream_failed", "skipped", "deferred"].every((s) => legend.includes(s)),
    `the legend names every state in text (${legend.replace(/\s+/g, " ")})`);
  const date = day(1);
  await a.fill("#trigger-date", date);
  await a.fill("#trigger-conf", '{"who": "e2e"}');
  await a.click("#trigger-go");
  await a.waitForSelector('#trigger-msg[data-kind="ok"]', T);
  const runId = await a.getAttribute("#trigger-msg", "data-run");
  check(runId && runId.startsWith("manual__" + date), `Trigger created run ${runId}`);
  const apiRun = await call("GET", `/dags/etl/dagRuns/${encodeURIComponent(runId)}`);
  check(apiRun.status === 200 && apiRun.body.conf.who === "e2e" && apiRun.body.run_type === "manual", `the run carries the conf from the form (${JSON.stringify(apiRun.body && apiRun.body.conf)})`);
  const cells = (st) => a.$$eval(`#grid button.cell[data-run="${runId}"]`, (bs, s) => bs.filter((b) => b.dataset.state === s).length, st);
  await soft(a.waitForFunction((r) => [...document.querySelectorAll(`#grid button.cell`)].filter((b) => b.dataset.run === r && b.dataset.state === "success").length === 3, runId, T));
  check((await cells("success")) === 3, `the run's three grid cells turned success without a reload (${await a.$$eval(`#grid button.cell[data-run="${runId}"]`, (bs) => bs.map((b) => b.dataset.state).join(" "))})`);
  // The run's own state is set by the scheduler's next pass after its last task, so it can trail the cells by one poll.
  await soft(a.waitForFunction((r) => { const h = document.querySelector(`#grid thead button[data-run="${r}"]`); return h && h.dataset.state === "success"; }, runId, T));
  const header = await a.getAttribute(`#grid thead button[data-run="${runId}"]`, "data-state");
  check(header === "success", `the run header shows the run's state (${header})`);
  await soft(a.waitForFunction(() => document.querySelector('#dag-rows tr[data-dag="etl"]').dataset.lastState === "success", null, T));
  check((await text(a, '#dag-rows tr[data-dag="etl"]')).includes(date), "the DAG list shows the last run's state and logical date");
  check((await a.$$eval("#graph g[data-task]", (gs) => gs.map((g) => `${g.dataset.task}:${g.dataset.state}`))).join() === "extract:success,transform:success,load:success",
    "the graph shows the three tasks coloured by the run's states");
  check((await a.$$eval("#graph line", (ls) => ls.map((l) => l.dataset.edge))).join() === "extract>transform,transform>load", "the graph draws the two edges");
  const xs = await a.$$eval("#graph rect", (rs) => rs.map((r) => Number(r.getAttribute("x"))));
  check(xs[0] < xs[1] && xs[1] < xs[2], `tasks are laid out by dependency depth (x ${xs.join(", ")})`);

  // A second trigger of the same date: the 409 is shown next to the form.
  await a.click("#trigger-go");
  await a.waitForSelector('#trigger-msg[data-kind="error"]', T);
  check((await a.getAttribute("#trigger-msg", "data-status")) === "409" && (await text(a, "#trigger-msg")).length > 0,
    `a second trigger of the same date shows the conflict next to the form (${await text(a, "#trigger-msg")})`);

  // ------------------------------------------------------------- task instance and log
  await a.click(`#grid button.cell[data-run="${runId}"][data-task="transform"]`);
  await soft(a.waitForSelector('#ti:not(.hidden)[data-state="success"]', T));
  await soft(a.waitForSelector('#log[data-complete="true"]', T));
  const log1 = await text(a, "#log");
  check(log1.includes(`transform ${date} try 1`), `the log shows the echoed date (${log1.slice(0, 80)})`);
  const kv = await text(a, "#ti-kv");
  check(/try\s*1 of/.test(kv) && kv.includes("exit code0") && /duration\d/.test(kv.replace(/\s+/g, "")), `details show try, exit code and duration (${kv.replace(/\s+/g, " ").slice(0, 160)})`);
  check((await text(a, "#ti-rendered")).includes(`echo transform ${date}`), "the rendered job is shown as JSON");
  await soft(a.waitForSelector('#durations rect[data-ms]:not([data-ms=""])', T));
  check((await a.$$eval("#durations rect[data-run]", (rs) => rs.length)) === 1, "the duration chart has a bar for the run");

  // --------------------------------------------------------------- clear: dry run, confirm
  await a.check("#clear-down");
  await a.click("#clear-dry");
  await a.waitForSelector("#clear-confirm:not(.hidden)", T);
  const listed = await a.$$eval("#clear-list li", (lis) => lis.map((l) => `${l.dataset.task}@${l.dataset.run}`).sort());
  check(listed.join() === `load@${runId},transform@${runId}`, `the dry run lists exactly transform and load (${listed.join(", ")})`);
  const before = await call("GET", `/dags/etl/dagRuns/${encodeURIComponent(runId)}/taskInstances/transform`);
  check(before.body.try_number === 1, "the dry run changed nothing (still try 1)");
  await a.click("#clear-confirm");
  await a.waitForSelector('#clear-msg[data-kind="ok"]', T);
  check((await text(a, "#clear-msg")).includes("Cleared 2"), `Confirm cleared them (${await text(a, "#clear-msg")})`);
  check(await soft(a.waitForSelector('#tries button[data-try="2"]', T)), "try 2 appears in the try tabs");
  await soft(a.waitForFunction(() => document.querySelector("#log").dataset.try === "2" && document.querySelector("#log").dataset.complete === "true", null, T));
  check((await text(a, "#log")).includes(`transform ${date} try 2`), `the log follows try 2 (${(await text(a, "#log")).slice(0, 80)})`);
  await a.click('#tries button[data-try="1"]');
  await soft(a.waitForFunction(() => document.querySelector("#log").dataset.try === "1" && document.querySelector("#log").dataset.complete === "true", null, T));
  check((await text(a, "#log")).includes("try 1"), "the try 1 tab shows the first try's log");
  check(await soft(a.waitForFunction((r) => [...document.querySelectorAll(`#grid button.cell`)].filter((b) => b.dataset.run === r && b.dataset.state === "success").length === 3, runId, T)),
    "after the rerun the run's cells are all success again");

  // ----------------------------------------------------------------------- backfill
  await a.fill("#bf-from", day(8));
  await a.fill("#bf-to", day(6));
  await a.fill("#bf-max", "2");
  await a.click("#bf-dry");
  await a.waitForFunction(() => document.querySelector("#bf-msg").dataset.count !== "", null, T);
  check((await a.getAttribute("#bf-msg", "data-count")) === "3" && (await text(a, "#bf-msg")).includes("3 logical date"),
    `the backfill dry run shows the dates count (${await text(a, "#bf-msg")})`);
  check((await call("GET", "/backfills?dag_id=etl")).body.backfills.length === 0, "the dry run created no backfill");
  await a.click("#bf-create");
  await a.waitForSelector('#bf-msg[data-kind="ok"]', T);
  check(await soft(a.waitForFunction(() => document.querySelectorAll('#grid thead button[data-run-type="backfill"]').length === 3, null, T)), "creating it adds 3 backfill runs to the grid");
  await soft(a.waitForSelector('#backfills li[data-finished="3"][data-total="3"]', { timeout: 60_000 }));
  check((await text(a, "#backfills")).includes("3/3 finished"), `the backfill progress reaches 3/3 (${await text(a, "#backfills")})`);
  await a.waitForFunction(() => document.querySelectorAll("#durations rect[data-run]").length === 4, null, T).catch(() => {});
  const bars = await a.$$eval("#durations rect[data-run]", (rs) => rs.map((r) => r.dataset.run));
  check(bars.length === 4 && bars[3] === runId, `the duration chart follows the grid: a bar per run, oldest left (${bars.length} bars)`);
  const heads = await a.$$eval("#grid thead button[data-run]", (bs) => bs.map((b) => b.dataset.run));
  check(heads.length === 4 && heads[3] === runId, `runs are columns, oldest left (${heads.join(", ")})`);
  const bf = await a.$eval("#backfills li[data-backfill]", (li) => li.textContent);
  check(!/failed/.test(bf), `no backfill run failed (${bf})`);
  const states = await a.$$eval("#grid button.cell", (bs) => bs.map((b) => b.dataset.state));
  check(states.length === 12 && states.every((s) => s === "success"), `every grid cell shows success, live (${states.join(" ")})`);
  check(loads() === 1, `no reload happened (${loads()} page load)`);
  if (shots) await a.screenshot({ path: path.join(shots, "pipeline-admin.png"), fullPage: true });

  // ------------------------------------------------------------------- backfill error
  await a.fill("#bf-from", day(6));
  await a.fill("#bf-to", day(8));
  await a.click("#bf-dry");
  await a.waitForSelector('#bf-msg[data-kind="error"]', T);
  check((await a.getAttribute("#bf-to", "aria-invalid")) === "true" && (await text(a, "#bf-msg")).includes("to_date"),
    `a reversed range is shown next to the form and marks the field (${await text(a, "#bf-msg")})`);

  // ------------------------------------------------------------------------- viewer
  const runsBefore = (await call("GET", "/dags/etl/dagRuns")).body.dag_runs.length;
  const { page: v } = await open("viewer", viewer);
  await v.waitForSelector('button[data-dag="etl"]', T);
  await v.click('button[data-dag="etl"]');
  await v.waitForSelector("#grid button.cell", T);
  check((await v.$$eval("#grid thead button[data-run]", (bs) => bs.length)) === 4, "the viewer sees the page and the grid");
  await v.click("#trigger-go");
  await v.waitForSelector('#trigger-msg[data-kind="error"]', T);
  const msg = await text(v, "#trigger-msg");
  check((await v.getAttribute("#trigger-msg", "data-status")) === "403" && msg.includes("Not allowed") && msg.includes("admin"),
    `a viewer's Trigger gets a clear message (${msg})`);
  check((await call("GET", "/dags/etl/dagRuns")).body.dag_runs.length === runsBefore, "and no run was created");
  if (shots) await v.screenshot({ path: path.join(shots, "pipeline-viewer.png"), fullPage: true });

  // ------------------------------------------------------- live log of a running task
  await a.click('button[data-dag="slow"]');
  await a.waitForSelector('#dag-view[data-dag="slow"]', T);
  await a.fill("#trigger-date", "2026-11-20");
  await a.fill("#trigger-conf", "");
  await a.click("#trigger-go");
  await a.waitForSelector('#trigger-msg[data-kind="ok"]', T);
  const slowRun = await a.getAttribute("#trigger-msg", "data-run");
  await a.waitForSelector(`#grid button.cell[data-run="${slowRun}"][data-task="sleepy"]`, T);
  await a.click(`#grid button.cell[data-run="${slowRun}"][data-task="sleepy"]`);
  const live = await soft(a.waitForFunction(() => {
    const l = document.querySelector("#log");
    return l.textContent.includes("begin 2026-11-20") && !l.textContent.includes("end") && l.dataset.complete === "false";
  }, null, T));
  check(live, "the log of a running task shows its first line before the task ends (live tail)");
  await soft(a.waitForSelector('#log[data-complete="true"]', T));
  // The details refresh on the next poll (every 2 s), after the log may already be complete.
  await soft(a.waitForSelector('#ti[data-state="success"]', T));
  check((await text(a, "#log")).includes("end") && (await a.getAttribute("#ti", "data-state")) === "success",
    `the tail goes on to the end and stops when the try is complete (${(await text(a, "#log")).replace(/\s+/g, " ")})`);
  await a.click('button[data-dag="etl"]');
  await a.waitForSelector('#dag-view[data-dag="etl"] #grid button.cell', T);

  // ------------------------------------------------- polling pauses while the tab is hidden
  let gridCalls = 0;
  a.on("request", (r) => { if (r.url().includes("/api/pipeline/dags/etl/grid")) gridCalls++; });
  const setHidden = (h) => a.evaluate((hidden) => {
    Object.defineProperty(document, "hidden", { value: hidden, configurable: true });
    Object.defineProperty(document, "visibilityState", { value: hidden ? "hidden" : "visible", configurable: true });
    document.dispatchEvent(new Event("visibilitychange"));
  }, h);
  await new Promise((r) => setTimeout(r, 2500));
  check(gridCalls >= 1, `the grid is polled while the tab is visible (${gridCalls} calls in 2.5 s)`);
  await setHidden(true);
  await new Promise((r) => setTimeout(r, 1000)); // a poll under way may still finish
  gridCalls = 0;
  await new Promise((r) => setTimeout(r, 4500));
  check(gridCalls === 0, `polling pauses while the tab is hidden (${gridCalls} grid calls in 4.5 s)`);
  await setHidden(false);
  await new Promise((r) => setTimeout(r, 1000));
  check(gridCalls >= 1, `and resumes at once when it is shown again (${gridCalls} calls)`);

  // ------------------------------------------- a sql task's checks next to the task (P10)
  const g = await call("POST", "/dags/gated/dagRuns", admin, { dag_run_id: "g1" });
  check(g.status === 200 || g.status === 201, `the sql DAG is triggered (${g.status})`);
  let gState = "";
  for (let i = 0; i < 120 && !["success", "failed"].includes(gState); i++) {
    await new Promise((r) => setTimeout(r, 500));
    gState = (await call("GET", "/dags/gated/dagRuns/g1")).body.state;
  }
  check(gState === "success", `the sql run succeeds (${gState})`);
  await a.click('button[data-dag="gated"]');
  await a.waitForSelector('#dag-view[data-dag="gated"] #grid button.cell[data-run="g1"]', T);
  await a.click('#grid button.cell[data-run="g1"][data-task="gate"]');
  await soft(a.waitForSelector('#ti-checks tr[data-check="not_null(v)"]', T));
  check((await a.getAttribute('#ti-checks tr[data-check="not_null(v)"]', "data-passed")) === "true",
    "the try's quality check is listed next to the task, passed (90 % of rows are not null)");
  const dataKv = (await text(a, "#ti-data-kv")).replace(/\s+/g, " ");
  check(dataKv.includes("10 rows") && dataKv.includes("gated_out_quarantine") && dataKv.includes("90 rows"),
    `the try's data shows 90 rows written and 10 quarantined (${dataKv})`);
  await a.click('button[data-dag="etl"]');
  await a.waitForSelector('#dag-view[data-dag="etl"] #grid button.cell', T);

  // -------------------------------------------------------------------------- pause
  await a.click('button[data-pause="etl"]');
  await a.waitForSelector('button[data-pause="etl"][aria-pressed="true"]', T);
  check((await call("GET", "/dags/etl")).body.is_paused === true, "the admin's paused toggle pauses the DAG");

  // The engine's own account: a finished task it could not record stays `running` until the
  // zombie sweep fails it (seen with SQLite: "database is locked", code 517).
  const lost = readFileSync(serverLog, "utf8").split("\n").filter((l) => l.includes("Cannot record a finished task"));
  check(lost.length === 0, `the engine recorded every finished task (${lost.length} lost: ${lost.slice(0, 2).join(" ") || "none"})`);
  check(outside.length === 0, `nothing was requested from another origin (${outside.join(", ") || "none"})`);
  check(errors.length === 0, `no script errors or CSP violations (${errors.join("; ") || "none"})`);
}

await run(main);
