// Shared helpers of the browser end-to-end tests in this folder (auction-page.mjs, home-page.mjs,
// annotation-page.mjs, pipeline-page.mjs): where the binary and Chromium are, a temp data dir, one-line checks,
// starting `bulwark serve` on a free port and waiting for /readyz, issuing tokens, launching
// Chromium, and `run`, which runs a test's main, cleans up and exits 0 only when every check
// passed.
//
// Env: BULWARK_BIN (default ../../target/debug/bulwark), CHROMIUM (default /usr/bin/chromium).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, openSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const bin = path.resolve(process.env.BULWARK_BIN || path.join(here, "../../target/debug/bulwark"));
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";

// What `run` cleans up.
const dirs = [];
const servers = [];
let browser = null;
let failed = false;

// Prints one line, `ok  ` or `FAIL`, and returns ok; one FAIL makes the exit code 1.
export function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failed = true;
  return ok;
}

// A new temp directory (the server's working directory and data), removed by `run`.
export function tempDir(prefix) {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  dirs.push(dir);
  return dir;
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
    s.on("error", reject);
  });
}

// The environment of `bulwark`: this one without BULWARK_*, listening on 127.0.0.1:port, plus
// a test's own settings (`extra`, e.g. BULWARK__PIPELINE__RELOAD_INTERVAL).
const env = (port, extra = {}) => ({
  ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("BULWARK_"))),
  BULWARK__SERVER__LISTEN: `127.0.0.1:${port}`,
  BULWARK__DRAIN__GRACE: "0s",
  BULWARK__TELEMETRY__LOG_LEVEL: "warn",
  ...extra,
});

// Starts `bulwark serve` in dir on port (with the extra env settings; its stdout, the JSON log,
// into the file logFile when given); returns the child, which `run` kills if still running.
export function startServer(dir, port, extra = {}, logFile = null) {
  const out = logFile ? openSync(logFile, "w") : "ignore";
  const server = spawn(bin, ["serve"], { cwd: dir, env: env(port, extra), stdio: ["ignore", out, "inherit"] });
  servers.push(server);
  return server;
}

// Waits up to 15 s for base/readyz to answer 2xx.
export async function ready(base) {
  for (let i = 0; i < 150; i++) {
    try { if ((await fetch(base + "/readyz")).ok) return true; } catch { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  return false;
}

// A token from `bulwark token issue` with the same configuration as the server.
export function token(dir, port, sub, role) {
  return execFileSync(bin, ["token", "issue", "--sub", sub, "--role", role], { cwd: dir, env: env(port) })
    .toString().trim();
}

// Headless Chromium, closed by `run`.
export async function launchBrowser() {
  browser = await chromium.launch({ executablePath: browserPath, headless: true, args: ["--no-sandbox"] });
  return browser;
}

// Runs main (an uncaught error is one FAIL), cleans up, and exits 1 when any check failed.
export async function run(main) {
  try {
    await main();
  } catch (e) {
    check(false, `unexpected error: ${e && e.stack || e}`);
  } finally {
    if (browser) await browser.close().catch(() => {});
    for (const server of servers) if (server.exitCode === null) server.kill("SIGKILL");
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}
