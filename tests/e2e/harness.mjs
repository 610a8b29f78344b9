// Shared pieces of the end-to-end tests: a static server for the built site on 127.0.0.1 and
// Debian's Chromium with the flags this machine needs.
import http from "node:http";
import fs from "node:fs/promises";
import path from "node:path";
import { chromium } from "playwright-core";

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".mjs": "text/javascript",
  ".wasm": "application/wasm",
  ".css": "text/css",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".json": "application/json",
};

export async function serveDist(dist) {
  if (!dist) throw new Error("set SEFI_DIST to the output of `trunk build --release`");
  const root = path.resolve(dist);
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    let file = path.join(root, decodeURIComponent(url.pathname));
    if (!file.startsWith(root)) return res.writeHead(403).end();
    if (url.pathname.endsWith("/")) file = path.join(file, "index.html");
    try {
      const body = await fs.readFile(file);
      res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => server.close() };
}

export async function launch({ webgpu }) {
  const args = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
  ];
  if (webgpu) args.push("--enable-unsafe-webgpu");
  // playwright starts each browser with a fresh, empty profile of its own.
  return chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", headless: true, args });
}

/// Opens the site with every request watched: anything not addressed to 127.0.0.1 is recorded
/// and refused, so a leak fails the test instead of reaching the network.
export async function openPage(browser, url) {
  const context = await browser.newContext();
  const foreignRequests = [];
  await context.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (u.protocol === "blob:" || u.protocol === "data:" || u.hostname === "127.0.0.1") return route.continue();
    foreignRequests.push(u.href);
    return route.abort();
  });
  const page = await context.newPage();
  const consoleErrors = [];
  const workerUrls = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("worker", (w) => {
    workerUrls.push(w.url());
    w.on("console", (m) => m.type() === "error" && consoleErrors.push(`[worker] ${m.text()}`));
  });
  page.on("request", (r) => {
    const u = new URL(r.url());
    if (!["blob:", "data:"].includes(u.protocol) && u.hostname !== "127.0.0.1") foreignRequests.push(u.href);
  });
  await page.goto(url);
  return { page, consoleErrors, foreignRequests, workerUrls };
}
