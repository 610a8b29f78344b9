// Shared pieces of the end-to-end tests: a static server on 127.0.0.1 for the built site and
// the test fixtures (with byte ranges, as model hosts answer them, and a log of every request
// it receives), and Debian's Chromium with the flags this machine needs.
import http from "node:http";
import fs from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".mjs": "text/javascript",
  ".wasm": "application/wasm",
  ".css": "text/css",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".jpg": "image/jpeg",
  ".jpeg": "image/jpeg",
  ".json": "application/json",
  ".txt": "text/plain; charset=utf-8",
};

const here = path.dirname(fileURLToPath(import.meta.url));

/// The fixtures the server offers by default: the tiny models and the test photos.
export const FIXTURES_DIR = path.resolve(here, "../fixtures/sd");
export const PHOTOS_DIR = path.resolve(here, "../fixtures/photos");
/// The tiny CLIP models, served at `/clip/` (another model host, as `/fixtures/` is).
export const CLIP_DIR = path.resolve(here, "../fixtures/clip");

/// The file below `root` that a URL path names, or null when it would leave `root`.
function resolveBelow(root, urlPath) {
  const file = path.resolve(root, "." + urlPath);
  return file === root || file.startsWith(root + path.sep) ? file : null;
}

/// Parses a `Range` header for a body of `size` bytes: `bytes=N-`, `bytes=N-M` or `bytes=-N`
/// (the last N bytes). Returns `{ start, end }` (inclusive), `"unsatisfiable"`, or null when
/// there is no usable range (the whole body is sent, as HTTP allows).
function parseRange(header, size) {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header?.trim() ?? "");
  if (!m || (m[1] === "" && m[2] === "")) return null;
  let start;
  let end;
  if (m[1] === "") {
    // A suffix: the last N bytes.
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    start = Math.max(size - n, 0);
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
    if (m[2] !== "" && Number(m[2]) < start) return null;
  }
  return start >= size ? "unsatisfiable" : { start, end };
}

/// Parses a `_headers` file (the format Netlify and Cloudflare Pages read): a line that starts
/// with `/` begins a rule for the paths it matches, the indented `Name: value` lines under it
/// are that rule's headers, and `#` lines are comments. A `*` matches any run of characters
/// (`/*` is every path, `/sefi-worker*` a prefix); a pattern without one matches its path only.
/// Returns `[{ pattern, test, headers }]` in file order, `headers` as `[[name, value]]` with
/// the name in lower case.
function parseHeaders(text) {
  const rules = [];
  text.split(/\r?\n/).forEach((line, i) => {
    const trimmed = line.trim();
    if (trimmed === "" || trimmed.startsWith("#")) return;
    // A rule's path starts the line; its headers are indented.
    if (!/^\s/.test(line)) {
      if (!trimmed.startsWith("/")) throw new Error(`_headers line ${i + 1}: expected a path, got ${trimmed}`);
      const source = trimmed.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*");
      rules.push({ pattern: trimmed, test: new RegExp(`^${source}$`), headers: [] });
      return;
    }
    const colon = trimmed.indexOf(":");
    // A header before any path, or one without a name, would be silently lost on a host:
    // fail the test run instead.
    if (rules.length === 0 || colon <= 0) throw new Error(`_headers line ${i + 1}: expected a header under a path, got ${trimmed}`);
    rules.at(-1).headers.push([trimmed.slice(0, colon).trim().toLowerCase(), trimmed.slice(colon + 1).trim()]);
  });
  return rules;
}

/// The headers that `rules` (from `parseHeaders`) give a URL path: those of every rule that
/// matches, in file order. A header that several rules set is sent once for each (Cloudflare
/// Pages joins the values with commas, which HTTP reads as the same list: two policies, both
/// enforced).
function headersFor(rules, pathname) {
  const out = {};
  for (const rule of rules) {
    if (!rule.test.test(pathname)) continue;
    for (const [name, value] of rule.headers) out[name] = name in out ? [].concat(out[name], value) : value;
  }
  return out;
}

/// Serves the built site at `/`, `fixtures` (default: tests/fixtures/sd) at `/fixtures/`,
/// `photos` (default: tests/fixtures/photos) at `/photos/`, and the tiny CLIP models at
/// `/clip/`, on 127.0.0.1 and a free port.
///
/// The site's files get the headers of `<dist>/_headers`, as a static host would send them (so
/// the worker runs under the Content-Security-Policy its script arrives with); none if the
/// file is missing. The fixture mounts stand in for another host (the model host) and get none.
///
/// Returns `{ url, origin, requests, clearRequests, addFile, throttle, close }`:
/// - `requests`: every request received, in order, as `{ method, url, range }` (`url` is
///   the path and query, `range` the `Range` header or null);
/// - `addFile(urlPath, buffer)`: serves `buffer` at `urlPath` (for example a broken
///   `/fixtures/bad.safetensors`), before any file on disk;
/// - `throttle(bytesPerSecond)`: sends the fixtures' bodies at that rate (null: at once).
export async function serveDist(dist, { fixtures = FIXTURES_DIR, photos = PHOTOS_DIR } = {}) {
  if (!dist) throw new Error("set SEFI_DIST to the output of `trunk build --release`");
  const site = path.resolve(dist);
  const mounts = [
    { prefix: "/fixtures/", root: path.resolve(fixtures) },
    { prefix: "/photos/", root: path.resolve(photos) },
    { prefix: "/clip/", root: CLIP_DIR },
  ];
  const extra = new Map();
  const requests = [];
  /// Bytes per second for the fixture mounts (null: as fast as possible).
  let slow = null;
  let siteRules = [];
  try {
    siteRules = parseHeaders(await fs.readFile(path.join(site, "_headers"), "utf8"));
  } catch (e) {
    // An older build without the file: serve without headers, as before.
    if (e.code !== "ENOENT") throw e;
  }

  /// The bytes a URL path names, or null.
  async function lookUp(pathname) {
    if (extra.has(pathname)) return { body: extra.get(pathname), name: pathname };
    const mount = mounts.find((m) => pathname.startsWith(m.prefix));
    let file = mount
      ? resolveBelow(mount.root, pathname.slice(mount.prefix.length - 1))
      : resolveBelow(site, pathname);
    if (!file) return null;
    if (!mount && pathname.endsWith("/")) file = path.join(file, "index.html");
    try {
      return { body: await fs.readFile(file), name: file };
    } catch {
      // Missing, a folder, or unreadable: all answered 404.
      return null;
    }
  }

  const server = http.createServer(async (req, res) => {
    requests.push({ method: req.method, url: req.url, range: req.headers.range ?? null });
    let pathname;
    try {
      pathname = decodeURIComponent(new URL(req.url, "http://127.0.0.1").pathname);
    } catch {
      return res.writeHead(400).end();
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      return res.writeHead(405, { allow: "GET, HEAD" }).end();
    }
    const onSite = !mounts.some((m) => pathname.startsWith(m.prefix));
    const siteHeaders = onSite ? headersFor(siteRules, pathname) : {};
    const found = await lookUp(pathname);
    if (!found) return res.writeHead(404, siteHeaders).end();

    const { body, name } = found;
    const headers = {
      "content-type": TYPES[path.extname(name).toLowerCase()] ?? "application/octet-stream",
      "accept-ranges": "bytes",
      ...siteHeaders,
    };
    const range = req.headers.range ? parseRange(req.headers.range, body.length) : null;
    if (range === "unsatisfiable") {
      return res.writeHead(416, { ...headers, "content-range": `bytes */${body.length}` }).end();
    }
    let status = 200;
    let part = body;
    if (range) {
      status = 206;
      part = body.subarray(range.start, range.end + 1);
      headers["content-range"] = `bytes ${range.start}-${range.end}/${body.length}`;
    }
    headers["content-length"] = part.length;
    res.writeHead(status, headers);
    if (req.method === "HEAD") return res.end();
    if (!slow || !mounts.some((m) => pathname.startsWith(m.prefix))) return res.end(part);
    // A slow host: the body in small pieces, so that a test can act in the middle of a file.
    const piece = Math.max(1, Math.round(slow / 20));
    for (let at = 0; at < part.length && !res.destroyed; at += piece) {
      res.write(part.subarray(at, at + piece));
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    res.end();
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const origin = `http://127.0.0.1:${server.address().port}`;
  return {
    url: `${origin}/`,
    origin,
    requests,
    throttle: (bytesPerSecond) => {
      slow = bytesPerSecond;
    },
    clearRequests: () => {
      requests.length = 0;
    },
    addFile: (urlPath, buffer) => {
      extra.set(urlPath, Buffer.from(buffer));
    },
    close: () =>
      new Promise((resolve) => {
        server.close(resolve);
        // Chromium keeps connections open; without this `close` would wait for them.
        server.closeAllConnections();
      }),
  };
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

/// What has been seen in a browser context, kept per context so that pages opened again in
/// the same context add to the same lists.
const watched = new WeakMap();

function isLocal(u) {
  return u.protocol === "blob:" || u.protocol === "data:" || u.hostname === "127.0.0.1";
}

/// Routes and records everything a context does (once per context).
async function watchContext(context) {
  let seen = watched.get(context);
  if (seen) return seen;
  seen = { consoleErrors: [], foreignRequests: [], workerUrls: [], requests: [] };
  watched.set(context, seen);
  // Anything not addressed to 127.0.0.1 is recorded and refused, so a leak fails the test
  // instead of reaching the network.
  await context.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (isLocal(u)) return route.continue();
    seen.foreignRequests.push(u.href);
    return route.abort();
  });
  // Every request of the context's pages and their workers, whether routed or not.
  context.on("request", (r) => {
    seen.requests.push({ method: r.method(), url: r.url(), postData: r.postDataBuffer() });
  });
  return seen;
}

/// Opens the site with every request watched: anything not addressed to 127.0.0.1 is recorded
/// and refused, console errors (of the page and its workers) are recorded, and so is every
/// request the page and its workers make.
///
/// `options.context` reuses a context (its storage, its routes and its records); otherwise a
/// new one is made with `options.contextOptions`. `options.goto: false` opens the page
/// without navigating.
///
/// Returns `{ page, context, consoleErrors, foreignRequests, workerUrls, requests }`, where
/// `requests` holds `{ method, url, postData }` (`postData` a Buffer or null).
export async function openPage(browser, url, options = {}) {
  const context = options.context ?? (await browser.newContext(options.contextOptions));
  const seen = await watchContext(context);
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && seen.consoleErrors.push(m.text()));
  page.on("pageerror", (e) => seen.consoleErrors.push(String(e)));
  page.on("worker", (w) => {
    seen.workerUrls.push(w.url());
    w.on("console", (m) => m.type() === "error" && seen.consoleErrors.push(`[worker] ${m.text()}`));
  });
  page.on("request", (r) => {
    const u = new URL(r.url());
    if (!isLocal(u)) seen.foreignRequests.push(u.href);
  });
  if (options.goto !== false) await page.goto(url);
  return { page, context, ...seen };
}
