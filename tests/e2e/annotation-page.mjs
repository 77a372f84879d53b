// Browser end-to-end test of the labeling page (issue 11 item 8, N11) in headless Chromium.
//
// Starts the real `bulwark` binary on embedded defaults, creates projects and items through the
// API with an admin token, and drives /annotation/ from several browser contexts (one per
// annotator, each with its own token):
//  (b) the keyboard flow: "2" then Enter stores label #2; S skips (the item is free for others);
//      Z undoes the last submit with a correction (`supersedes`); a submit whose first try fails
//      on the network is retried with the same request_id; only skipped items left is said.
//  (a) two annotators label one project concurrently (overlap 1): no item gets more than its
//      overlap, every item reaches it.
//  (d) the overview, open meanwhile, shows the progress live (polling).
//  (c) lock expiry: the page goes offline (no heartbeat), the 3 s lock lapses, another
//      annotator claims the item, the page comes back and submits: it shows the lost-lock
//      message and moves on to another item.
// Every request to another origin is refused and counted; script errors and CSP violations fail.
//
// Env: BULWARK_BIN, CHROMIUM (see harness.mjs), SCREENSHOT_DIR (optional PNGs).
// Exit code 0 when every check passed; each check prints one line.
import path from "node:path";
import { check, freePort, launchBrowser, ready, run, startServer, tempDir, token } from "./harness.mjs";

const shots = process.env.SCREENSHOT_DIR;
const dir = tempDir("bulwark-e2e-annotation-");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  startServer(dir, port);
  if (!check(await ready(base), `bulwark ready on ${base}`)) return;
  const admin = token(dir, port, "e2e-admin", "admin");
  const tok = Object.fromEntries(["ann", "ben", "cat", "dan", "eve", "fay"].map((n) => [n, token(dir, port, n, "annotator")]));

  const call = async (method, p, who, body) => {
    const res = await fetch(base + "/api/annotation" + p, {
      method,
      headers: { authorization: `Bearer ${who}`, ...(body === undefined ? {} : { "content-type": typeof body === "string" ? "application/x-ndjson" : "application/json" }) },
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  };
  const project = async (name, n, extra) => {
    const p = await call("POST", "/projects", admin, { name, instructions: `Label each ${name} item.`, labels: ["cat", "dog", "bird"], overlap: 1, ...extra });
    if (p.status !== 201) throw new Error(`project ${name}: ${p.status} ${JSON.stringify(p.body)}`);
    const lines = Array.from({ length: n }, (_, i) => JSON.stringify({ external_id: `${name}-${i + 1}`, payload: { text: `${name} text ${i + 1}` } })).join("\n");
    const imp = await call("POST", `/projects/${p.body.id}/items`, admin, lines + "\n");
    if (imp.status !== 200 || imp.body.imported !== n) throw new Error(`import ${name}: ${imp.status} ${JSON.stringify(imp.body)}`);
    return p.body;
  };
  const annotations = async (pid) => {
    const all = [];
    let after = null;
    for (let i = 0; i < 100; i++) {
      const r = await call("GET", `/annotations?project=${pid}&limit=100${after ? "&after=" + after : ""}`, admin);
      all.push(...r.body.items);
      if (!r.body.next) break;
      after = r.body.next;
    }
    return all;
  };

  const browser = await launchBrowser();
  const outside = [];
  const errors = [];
  const contexts = {};
  const open = async (who, query = "") => {
    let context = contexts[who];
    if (!context) {
      context = contexts[who] = await browser.newContext();
      await context.route("**/*", (route) => {
        const url = route.request().url();
        if (url.startsWith(base + "/")) return route.fallback();
        outside.push(url);
        return route.abort();
      });
    }
    const page = await context.newPage();
    page.on("pageerror", (e) => errors.push(`${who}: ${e}`));
    page.on("console", (m) => { if (m.type() === "error" && !/Failed to load resource|net::ERR_/.test(m.text())) errors.push(`${who} console: ${m.text()}`); });
    const res = await page.goto(`${base}/annotation/?token=${tok[who]}${query}`);
    return { page, res };
  };
  const itemId = (page) => page.getAttribute("#item", "data-item-id");
  const waitItem = (page, notId) => page.waitForFunction((n) => {
    const id = document.querySelector("#item").dataset.itemId;
    return id && id !== String(n) && document.querySelector("#work").dataset.state === "labeling";
  }, notId ?? "", { timeout: 10_000 });
  const waitMsg = (page, kind) => page.waitForSelector(`#msg[data-kind="${kind}"]`, { timeout: 15_000 });

  // ---------------------------------------------------------------- (b) keyboard flow
  const p1 = await project("kbd", 4, { lock_ttl_seconds: 30 });
  const { page: a, res } = await open("ann");
  check(res.status() === 200 && (res.headers()["content-type"] || "").startsWith("text/html"), `GET /annotation/ answers 200 text/html (${res.status()})`);
  const csp = res.headers()["content-security-policy"] || "";
  check(csp.includes("default-src 'none'") && /script-src 'nonce-[0-9a-f]+'/.test(csp) && csp.includes("connect-src 'self'"),
    `it sends a strict Content-Security-Policy (${csp.slice(0, 60)}…)`);
  check(!a.url().includes("token="), "the token is removed from the address bar");
  await a.waitForSelector(`button[data-project="${p1.id}"]`, { timeout: 10_000 });
  check(true, "the project list shows the project");
  await a.click(`button[data-project="${p1.id}"]`);
  await waitItem(a);
  check(a.url().includes(`project=${p1.id}`), "opening a project changes the address without a reload");
  check((await a.textContent("#instructions")).includes("Label each kbd item."), "the instructions are shown");
  const labelsShown = await a.$$eval("#labels button", (bs) => bs.map((b) => b.textContent.trim()));
  check(labelsShown.join("|") === "1 cat|2 dog|3 bird", `label buttons with their keys (${labelsShown.join(", ")})`);
  check(/lock: \d+(\.\d)? s left/.test(await a.textContent("#lock")), `the lock countdown is shown (${await a.textContent("#lock")})`);
  const first = Number(await itemId(a));

  await a.keyboard.press("2");
  check((await a.getAttribute('#labels button[data-label="dog"]', "aria-pressed")) === "true", "key 2 picks label #2 (dog)");
  await a.keyboard.press("Enter");
  await waitMsg(a, "saved");
  await waitItem(a, first);
  let log = await annotations(p1.id);
  const firstRec = log.find((r) => r.item_id === first && r.annotator === "ann");
  check(firstRec && firstRec.labels.join() === "dog" && firstRec.lead_time_ms >= 0, `2 then Enter stored label dog on item ${first} (${JSON.stringify(firstRec && firstRec.labels)})`);
  const second = Number(await itemId(a));
  check(second !== first, `the next item (${second}) is shown without a reload`);

  // S: skip; the item is released at once (another annotator can claim it) and not handed back.
  await a.keyboard.press("s");
  await waitMsg(a, "skipped");
  await waitItem(a, second);
  const third = Number(await itemId(a));
  check(third !== second, `S skipped item ${second} and opened item ${third}`);
  const benNext = await call("GET", `/tasks/next?project=${p1.id}`, tok.ben);
  check(benNext.status === 200 && benNext.body.item.id === second, `the skipped item is free for another annotator (ben got ${benNext.body && benNext.body.item.id})`);
  await call("DELETE", `/data/${second}/lock`, tok.ben);

  // Z: undo the first submit with a correction.
  await a.keyboard.press("z");
  await a.waitForFunction((n) => document.querySelector("#item").dataset.itemId === String(n) && !document.querySelector("#correction-note").classList.contains("hidden"), first, { timeout: 10_000 });
  check((await a.getAttribute('#labels button[data-label="dog"]', "aria-pressed")) === "true", "Z reopened the last item with its label picked");
  await a.keyboard.press("3");
  await a.keyboard.press("Enter");
  await waitMsg(a, "corrected");
  log = await annotations(p1.id);
  const fix = log.find((r) => r.supersedes === firstRec.id);
  check(fix && fix.item_id === first && fix.labels.join() === "bird" && fix.annotator === "ann",
    `Z then 3, Enter stored a correction superseding ${firstRec.id} with label bird (${JSON.stringify(fix && fix.labels)})`);
  await waitItem(a, first);
  const fourth = Number(await itemId(a));
  check(fourth !== second, `after the correction the page goes on, still passing over the skipped item (item ${fourth})`);

  // A submit whose first try is lost on the network is retried with the same request_id.
  const sent = [];
  await a.route("**/api/annotation/annotations", async (route) => {
    const req = route.request();
    if (req.method() !== "POST") return route.fallback();
    sent.push(req.postDataJSON().request_id);
    if (sent.length === 1) return route.abort("failed");
    return route.fallback();
  });
  await a.keyboard.press("1");
  await a.keyboard.press("Enter");
  await waitMsg(a, "retrying");
  check(true, "a failed submit says it is retrying");
  await a.waitForFunction(() => ["saved", "only-skipped"].includes(document.querySelector("#msg").dataset.kind), null, { timeout: 15_000 });
  await a.unroute("**/api/annotation/annotations");
  log = await annotations(p1.id);
  const recs = log.filter((r) => r.item_id === fourth && r.annotator === "ann");
  check(sent.length >= 2 && sent.every((id) => id === sent[0]) && /^[0-9a-f-]{36}$/.test(sent[0]),
    `the retry carried the same request_id (${sent.length} tries, ${sent[0]})`);
  check(recs.length === 1 && recs[0].request_id === sent[0] && recs[0].labels.join() === "cat", `stored once, with that request_id (${recs.length} record)`);

  // Skip what is left until only skipped items remain; then show them again.
  for (let i = 0; i < 4 && (await a.getAttribute("#msg", "data-kind")) !== "only-skipped"; i++) {
    const cur = await itemId(a);
    await a.keyboard.press("s");
    await a.waitForFunction((c) => {
      const id = document.querySelector("#item").dataset.itemId;
      const s = document.querySelector("#work").dataset.state;
      return (s === "labeling" && id && id !== c) || (s === "empty" && document.querySelector("#msg").dataset.kind === "only-skipped");
    }, cur, { timeout: 10_000 });
  }
  check((await a.getAttribute("#msg", "data-kind")) === "only-skipped", `"only skipped items left" is said (${await a.textContent("#msg")})`);
  await a.click("#again");
  await waitItem(a);
  check(Number(await itemId(a)) === second, `"Show skipped items again" hands back the skipped item ${second}`);
  if (shots) await a.screenshot({ path: path.join(shots, "annotation-label.png"), fullPage: true });
  await a.keyboard.press("s"); // leave it skipped (released)

  // ------------------------------------------------- (a) concurrency, (d) live overview
  const N = 12;
  const p2 = await project("race", N, { lock_ttl_seconds: 30 });
  const { page: ov } = await open("fay", `&project=${p2.id}&view=overview`);
  await ov.waitForSelector('#view[data-view="overview"]', { timeout: 10_000 });
  await ov.waitForSelector(`#completion[data-items="${N}"]`, { timeout: 10_000 });
  check((await ov.getAttribute("#completion", "data-completed")) === "0", "the overview shows 0 complete at the start");

  const { page: c } = await open("cat", `&project=${p2.id}`);
  const { page: d } = await open("dan", `&project=${p2.id}`);
  const labelLoop = async (page, key) => {
    let n = 0;
    for (let i = 0; i < N + 2; i++) {
      await page.waitForFunction(() => ["labeling", "empty"].includes(document.querySelector("#work").dataset.state), null, { timeout: 15_000 });
      if ((await page.getAttribute("#work", "data-state")) === "empty") return n;
      const cur = await itemId(page);
      await page.keyboard.press(key);
      await page.keyboard.press("Enter");
      await page.waitForFunction((c0) => {
        const s = document.querySelector("#work").dataset.state;
        return s === "empty" || (s === "labeling" && document.querySelector("#item").dataset.itemId !== c0);
      }, cur, { timeout: 15_000 });
      n++;
    }
    return n;
  };
  const [nc, nd] = await Promise.all([labelLoop(c, "1"), labelLoop(d, "2")]);
  log = await annotations(p2.id);
  const perItem = new Map();
  for (const r of log.filter((x) => x.supersedes === null)) perItem.set(r.item_id, (perItem.get(r.item_id) || 0) + 1);
  check(nc + nd === N && nc > 0 && nd > 0, `two annotators labeled concurrently (cat ${nc}, dan ${nd})`);
  check([...perItem.values()].every((v) => v <= p2.overlap), `no item has more annotations than its overlap (${JSON.stringify([...perItem.values()])})`);
  check(perItem.size === N && [...perItem.values()].every((v) => v === p2.overlap), `every item reached its overlap (${perItem.size} of ${N})`);
  check((await c.getAttribute("#msg", "data-kind")) !== "error" && (await c.textContent("#msg")).includes("Nothing left"), "the page says when nothing is left");

  await ov.waitForSelector(`#completion[data-completed="${N}"]`, { timeout: 10_000 });
  check(true, `the overview updated itself to ${N} of ${N} complete`);
  const dist = await ov.$$eval("#dist tr", (trs) => Object.fromEntries(trs.map((t) => [t.dataset.label, Number(t.dataset.count)])));
  check(dist.cat === nc && dist.dog === nd && dist.bird === 0, `the label distribution is live (${JSON.stringify(dist)})`);
  const today = await ov.$$eval("#today tr", (trs) => Object.fromEntries(trs.map((t) => [t.dataset.annotator, Number(t.dataset.submitted)])));
  check(today.cat === nc && today.dan === nd, `per-annotator today is shown (${JSON.stringify(today)})`);
  check((await ov.getAttribute("#completion-bar", "aria-valuenow")) === "100", "the completion bar is full");
  if (shots) await ov.screenshot({ path: path.join(shots, "annotation-overview.png"), fullPage: true });

  // --------------------------------------------------------------- (c) lock expiry
  const p3 = await project("lapse", 3, { lock_ttl_seconds: 3 });
  const { page: e } = await open("eve", `&project=${p3.id}`);
  await waitItem(e);
  const held = Number(await itemId(e));
  // Heartbeats keep a 3 s lock alive for a while.
  await sleep(4500);
  const still = await call("GET", `/tasks/next?project=${p3.id}`, tok.fay);
  check(still.status === 200 && still.body.item.id !== held, `the heartbeat keeps the lock past its TTL (fay got item ${still.body && still.body.item.id}, not ${held})`);
  await call("DELETE", `/data/${still.body.item.id}/lock`, tok.fay);
  // Offline: no heartbeat; the lock lapses and the page shows it.
  await contexts.eve.setOffline(true);
  await e.waitForSelector('#lock[data-state="lapsed"]', { timeout: 10_000 });
  check(true, "offline, the countdown reaches 'lock lapsed'");
  await sleep(500);
  const taken = await call("GET", `/tasks/next?project=${p3.id}`, tok.fay);
  check(taken.status === 200 && taken.body.item.id === held, `another annotator claims the lapsed item (fay got ${taken.body && taken.body.item.id})`);
  await e.keyboard.press("3");
  await e.keyboard.press("Enter");
  await waitMsg(e, "retrying");
  await contexts.eve.setOffline(false);
  await waitMsg(e, "lost-lock");
  check((await e.textContent("#msg")).includes("was lost"), `the page shows the lost-lock message (${await e.textContent("#msg")})`);
  await waitItem(e, held);
  check(Number(await itemId(e)) !== held, `and moves on to another item (${await itemId(e)})`);
  log = await annotations(p3.id);
  check(!log.some((r) => r.item_id === held && r.annotator === "eve"), "the late label was not stored");
  if (shots) await e.screenshot({ path: path.join(shots, "annotation-lost-lock.png"), fullPage: true });

  check(outside.length === 0, `nothing was requested from another origin (${outside.join(", ") || "none"})`);
  check(errors.length === 0, `no script errors or CSP violations (${errors.join("; ") || "none"})`);
}

await run(main);
