// Browser end-to-end test of the auction page (issue 4, A1, A9, A10) in headless Chromium.
//
// Starts the real `bulwark` binary on embedded defaults, creates an auction, opens the page as two
// bidders, bids in one page and sees it broadcast in the other, then SIGKILLs the server, bids
// while it is down, restarts it on the same port and data, and checks that both pages reconnect,
// re-render from the full state, and that the bid made while offline was resent and applied.
//
// Env: BULWARK_BIN, CHROMIUM (see harness.mjs).
// Exit code 0 when every check passed; each check prints one line.
import { check, freePort, launchBrowser, ready, run, startServer, tempDir, token } from "./harness.mjs";

const dir = tempDir("bulwark-e2e-");

async function main() {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  let server = startServer(dir, port);
  if (!check(await ready(base), `bulwark ready on ${base}`)) return;
  const admin = token(dir, port, "e2e-admin", "admin");
  const ann = token(dir, port, "ann", "bidder");
  const ben = token(dir, port, "ben", "bidder");
  const res = await fetch(base + "/api/auction/auctions", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${admin}` },
    body: JSON.stringify({ title: "E2E lot", ends_at: new Date(Date.now() + 10 * 60_000).toISOString(), start_price: 100, min_increment: 10 }),
  });
  if (!check(res.status === 201, `auction created (${res.status})`)) return;
  const { id } = await res.json();

  const browser = await launchBrowser();
  const pageA = await browser.newPage();
  const pageB = await browser.newPage();
  await pageA.goto(`${base}/auction/${id}?token=${ann}`);
  await pageB.goto(`${base}/auction/${id}?token=${ben}`);
  const open = '#conn[data-state="open"]';
  await pageA.waitForSelector(open, { timeout: 10_000 });
  await pageB.waitForSelector(open, { timeout: 10_000 });
  check(true, "both pages connected");
  check((await pageA.textContent("#title")) === "E2E lot", "the page rendered the state (title)");
  check(!pageA.url().includes("token="), "the token is removed from the address bar");

  // Bid in A; A sees its outcome, B sees the broadcast.
  await pageA.fill("#amount", "150");
  await pageA.click("#bid");
  await pageA.waitForFunction(() => document.querySelector("#mine li")?.textContent.includes("accepted"), null, { timeout: 10_000 });
  check(true, "page A shows its bid accepted");
  await pageB.waitForFunction(() => document.querySelector("#highest").textContent.replace(/\D/g, "") === "150", null, { timeout: 10_000 });
  check(true, "page B sees the bid broadcast (highest 150)");
  check((await pageB.textContent("#leader")).includes("ann"), "page B shows the leader");

  // Kill the server; both pages notice and try to reconnect.
  server.kill("SIGKILL");
  await new Promise((r) => server.once("exit", r));
  await pageA.waitForSelector('#conn[data-state="reconnecting"]', { timeout: 10_000 });
  check(true, "page A shows it is reconnecting after the server died");
  // A bid while offline stays pending and is sent after the reconnect.
  await pageB.fill("#amount", "200");
  await pageB.click("#bid");
  check((await pageB.textContent("#mine")).includes("sending"), "page B keeps the offline bid pending");

  server = startServer(dir, port);
  check(await ready(base), "bulwark restarted on the same port and data");
  await pageA.waitForSelector(open, { timeout: 20_000 });
  await pageB.waitForSelector(open, { timeout: 20_000 });
  check(true, "both pages reconnected");
  await pageB.waitForFunction(() => document.querySelector("#mine li")?.textContent.includes("accepted"), null, { timeout: 15_000 });
  check(true, "page B's offline bid was resent and accepted");
  await pageA.waitForFunction(() => document.querySelector("#highest").textContent.replace(/\D/g, "") === "200", null, { timeout: 15_000 });
  check(true, "page A shows the new highest (200) from the reconnected room");
  const rows = await pageA.$$eval("#bids li", (lis) => lis.length);
  check(rows === 2, `page A lists both bids after re-rendering from the state (${rows})`);
  const countdown = await pageA.textContent("#countdown");
  check(/^\d+ s$/.test(countdown), `countdown runs from the server clock (${countdown})`);
}

await run(main);
