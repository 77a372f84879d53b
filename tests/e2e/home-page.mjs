// Browser end-to-end test of the home page and the API docs (kernel-readiness item 6) in
// headless Chromium.
//
// Starts the real `bulwark` binary on embedded defaults, opens http://<addr>/ with no token,
// checks what it lists, follows its link to the API docs, waits for the Swagger UI to render the
// auction paths from /api/openapi.json, then authorizes with a token and runs
// GET /api/auction/auctions from the UI. Every request to another origin is refused and counted:
// the pages must work with no network.
//
// Env: BULWARK_BIN, CHROMIUM (see harness.mjs),
// SCREENSHOT_DIR (optional: where to save a PNG of each page).
// Exit code 0 when every check passed; each check prints one line.
import path from "node:path";
import { check, freePort, launchBrowser, ready, run, startServer, tempDir, token } from "./harness.mjs";

const shots = process.env.SCREENSHOT_DIR;
const dir = tempDir("bulwark-e2e-home-");

async function main() {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  startServer(dir, port);
  if (!check(await ready(base), `bulwark ready on ${base}`)) return;
  const admin = token(dir, port, "e2e-admin", "admin");

  const browser = await launchBrowser();
  const context = await browser.newContext();
  const outside = [];
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base + "/")) return route.continue();
    outside.push(url);
    return route.abort();
  });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // The home page: no token, lists version and modules, links the docs.
  const res = await page.goto(base + "/");
  check(res.status() === 200, `GET / answers 200 with no token (${res.status()})`);
  check((await page.title()) === "Bulwark", "the title is Bulwark");
  const version = await page.textContent("#version");
  check(/^\d+\.\d+\.\d+/.test(version), `it shows the version (${version})`);
  const enabled = await page.$$eval('#modules li[data-enabled="true"]', (lis) => lis.map((li) => li.dataset.module));
  check(["cache", "auction", "annotation", "pipeline", "reporting"].every((m) => enabled.includes(m)),
    `it lists the enabled modules (${enabled.join(", ")})`);
  const room = await page.textContent('#pages li[data-module="auction"]');
  check(room.includes("/auction/{id}") && room.includes("token: viewer"),
    "it shows the auction room page and that it needs a token");
  const labeling = await page.textContent('#pages li[data-module="annotation"]');
  check(labeling.includes("/annotation/") && labeling.includes("token: annotator"),
    "it links the labeling page and says it needs an annotator token");
  for (const href of ["/readyz", "/metrics", "/api/openapi.json", "/annotation/"]) {
    check(await page.$(`a[href="${href}"]`) !== null, `it links ${href}`);
  }
  if (shots) await page.screenshot({ path: path.join(shots, "home.png"), fullPage: true });

  // Follow the link to the API docs; Swagger UI renders the auction paths.
  await page.getByRole("link", { name: "Interactive API docs" }).click();
  await page.waitForURL(base + "/api/docs/", { timeout: 10_000 });
  check(true, "the home page links the API docs (/api/docs/)");
  const list = '.opblock-summary-path[data-path="/api/auction/auctions"]';
  await page.waitForSelector(list, { timeout: 20_000 });
  check((await page.textContent(list)).includes("/api/auction/auctions"),
    "the Swagger UI renders /api/auction/auctions from /api/openapi.json");
  const paths = await page.$$eval(".opblock-summary-path", (els) => els.map((e) => e.dataset.path));
  check(paths.includes("/api/auction/auctions/{id}/bids") && paths.includes("/readyz"),
    `kernel and auction paths are listed (${paths.length} operations)`);
  if (shots) await page.screenshot({ path: path.join(shots, "api-docs.png") });

  // Authorize with a token and run one call from the UI.
  await page.click("button.authorize");
  await page.fill(".auth-container input", admin);
  await page.click('.auth-btn-wrapper button.authorize');
  await page.click(".auth-btn-wrapper button.btn-done");
  const op = page.locator("#operations-auction-list");
  await op.locator(".opblock-summary").click();
  // "Try it out" is on from the start (tryItOutEnabled), so Execute is there at once.
  await op.locator("button.execute").click();
  const status = op.locator(".live-responses-table tr.response .response-col_status").first();
  await status.waitFor({ timeout: 10_000 });
  const code = (await status.textContent()).trim();
  check(code === "200", `GET /api/auction/auctions runs from the docs with the token (${code})`);

  check(outside.length === 0, `nothing was requested from another origin (${outside.join(", ") || "none"})`);
  check(errors.length === 0, `no script errors (${errors.join("; ") || "none"})`);
}

await run(main);
