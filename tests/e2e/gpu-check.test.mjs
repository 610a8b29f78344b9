// The built site in Debian's Chromium: the page loads, the GPU check runs in the worker on
// WebGPU and shows numbers that agree with an independent reference, the console stays clean,
// and no request leaves 127.0.0.1.
//
// Needs SEFI_DIST (a `trunk build --release` output) and /usr/bin/chromium; scripts/test.sh
// provides both.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { serveDist, launch, openPage } from "./harness.mjs";

let server;
before(async () => {
  server = await serveDist(process.env.SEFI_DIST);
});
after(() => server?.close());

// The same inputs and maths as src/check/mod.rs, written again so that the page is checked
// against an implementation that shares no code with it.
function reference() {
  const [M, K, N] = [8, 16, 4];
  const x = Array.from({ length: M * K }, (_, i) => Math.sin(0.37 * i + 0.1));
  const w = Array.from({ length: K * N }, (_, i) => 0.5 * Math.cos(0.23 * i));
  const c = Array.from({ length: M * N }, (_, i) => (i % 5) / 4 - 0.5);
  let loss = 0;
  const dz = new Array(M * N).fill(0);
  for (let i = 0; i < M; i++) {
    const z = [];
    for (let j = 0; j < N; j++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[i * K + k] * w[k * N + j];
      z.push(s);
    }
    const max = Math.max(...z);
    const e = z.map((v) => Math.exp(v - max));
    const sum = e.reduce((a, b) => a + b, 0);
    const p = e.map((v) => v / sum);
    const pc = p.reduce((a, pj, j) => a + pj * c[i * N + j], 0);
    for (let j = 0; j < N; j++) {
      const t = Math.tanh(z[j]);
      loss += (p[j] * c[i * N + j] + t * t) / (M * N);
      dz[i * N + j] = (p[j] * (c[i * N + j] - pc) + 2 * t * (1 - t * t)) / (M * N);
    }
  }
  const grad = [];
  for (let k = 0; k < K; k++)
    for (let j = 0; j < N; j++) {
      let s = 0;
      for (let i = 0; i < M; i++) s += x[i * K + k] * dz[i * N + j];
      grad.push(s);
    }
  return { loss, grad };
}

function assertClose(got, want, what) {
  const rel = Math.abs(got - want) / Math.max(Math.abs(want), 1e-3);
  assert.ok(rel <= 1e-4, `${what}: page shows ${got}, reference ${want} (relative error ${rel})`);
}

test("the GPU check runs burn autodiff on WebGPU inside the worker", async () => {
  const browser = await launch({ webgpu: true });
  try {
    const { page, consoleErrors, foreignRequests, workerUrls } = await openPage(browser, server.url);
    const status = page.getByTestId("gpu-status");
    await page.waitForSelector('[data-testid=gpu-status]:not([data-state=checking])', { timeout: 180_000 });
    assert.equal(await status.getAttribute("data-state"), "ok", await status.textContent());

    const want = reference();
    // The page prints the loss with 7 decimals.
    const loss = Number(await page.getByTestId("check-loss").textContent());
    assert.ok(Math.abs(loss - want.loss) <= 1e-4 * Math.abs(want.loss) + 5e-8, `loss ${loss} vs ${want.loss}`);
    const grad = JSON.parse(await page.getByTestId("check-grad").getAttribute("data-values"));
    assert.equal(grad.length, want.grad.length);
    grad.forEach((g, i) => assertClose(g, want.grad[i], `dL/dW[${i}]`));

    const adapter = await page.getByTestId("gpu-adapter").textContent();
    assert.ok(adapter.length > 0);
    assert.match(await page.getByTestId("gpu-max-buffer").textContent(), /^\d+ MiB$/);
    assert.match(await page.getByTestId("gpu-f16").textContent(), /^(yes|no)$/);

    // The computation ran in the worker, not on the page's thread.
    assert.ok(workerUrls.some((u) => u.endsWith("/sefi-worker_loader.js")), `workers: ${workerUrls}`);
    assert.deepEqual(consoleErrors, []);
    assert.deepEqual(foreignRequests, []);
  } finally {
    await browser.close();
  }
});

test("without WebGPU the page explains what to do", async () => {
  const browser = await launch({ webgpu: false });
  try {
    const { page, foreignRequests } = await openPage(browser, server.url);
    await page.waitForSelector('[data-testid=gpu-status]:not([data-state=checking])', { timeout: 120_000 });
    const status = page.getByTestId("gpu-status");
    assert.equal(await status.getAttribute("data-state"), "no-webgpu", await status.textContent());
    const text = await status.textContent();
    assert.match(text, /WebGPU/);
    assert.match(text, /Chrome|Edge|Safari|Firefox/);
    assert.deepEqual(foreignRequests, []);
  } finally {
    await browser.close();
  }
});

test("the Content-Security-Policy refuses connections to hosts it does not list", async () => {
  const browser = await launch({ webgpu: false });
  try {
    const { page, foreignRequests } = await openPage(browser, server.url);
    const outcome = await page.evaluate(async () => {
      const violations = [];
      document.addEventListener("securitypolicyviolation", (e) => violations.push(e.effectiveDirective));
      let refused = false;
      try {
        await fetch("https://example.org/upload", { method: "POST", body: "photo" });
      } catch {
        refused = true;
      }
      await new Promise((r) => setTimeout(r, 100));
      return { refused, violations };
    });
    assert.ok(outcome.refused);
    // One event per policy that refuses it: the <meta> one, and the header's where the server
    // sends www/_headers (the same policy twice).
    assert.ok(outcome.violations.length >= 1, "the page saw no securitypolicyviolation event");
    assert.deepEqual([...new Set(outcome.violations)], ["connect-src"], `violations: ${outcome.violations}`);
    // The browser refused it before any request existed.
    assert.deepEqual(foreignRequests, []);
    const policy = await page.locator("meta[http-equiv=Content-Security-Policy]").getAttribute("content");
    assert.match(policy, /connect-src 'self' https:\/\/huggingface\.co https:\/\/\*\.huggingface\.co https:\/\/\*\.hf\.co;/);
  } finally {
    await browser.close();
  }
});

test("the GPU worker runs under the site's Content-Security-Policy and can reach no other host", async () => {
  // A server the worker could reach if its policy did not stop it: 127.0.0.1 (which the
  // test's routing lets through) on another port, so not 'self'. It answers anyone (CORS),
  // so only the policy can make a fetch to it fail.
  const reached = [];
  const bystander = http.createServer((req, res) => {
    reached.push(`${req.method} ${req.url}`);
    res.writeHead(200, { "access-control-allow-origin": "*" }).end("reached");
  });
  await new Promise((resolve) => bystander.listen(0, "127.0.0.1", resolve));
  const bystanderUrl = `http://127.0.0.1:${bystander.address().port}/collect`;
  // It is up and answers: a refusal below is the browser's, not a dead port.
  assert.equal(await (await fetch(bystanderUrl)).text(), "reached");
  reached.length = 0;

  // The worker starts only where navigator.gpu exists.
  const browser = await launch({ webgpu: true });
  try {
    const { page, foreignRequests } = await openPage(browser, server.url, { goto: false });
    const appears = page.waitForEvent("worker", {
      predicate: (w) => w.url().endsWith("/sefi-worker_loader.js"),
      timeout: 60_000,
    });
    await page.goto(server.url);
    const worker = await appears;
    const meta = await page.locator("meta[http-equiv=Content-Security-Policy]").getAttribute("content");

    // A worker is governed by the headers its script arrived with, not by the page's <meta>.
    const loader = await fetch(worker.url());
    assert.equal(
      loader.headers.get("content-security-policy"),
      meta,
      `${worker.url()} must arrive with the page's policy as a Content-Security-Policy header ` +
        "(www/_headers, served by the test server as a static host would), or the worker runs unrestricted",
    );

    const outcome = await worker.evaluate(
      async ({ bystanderUrl }) => {
        const violations = [];
        self.addEventListener("securitypolicyviolation", (e) =>
          violations.push({ directive: e.effectiveDirective, blocked: e.blockedURI, policy: e.originalPolicy }),
        );
        async function attempt(url, init) {
          try {
            const res = await fetch(url, init);
            return `answered ${res.status}: ${await res.text()}`;
          } catch (e) {
            return `refused: ${e}`;
          }
        }
        // The site itself stays reachable: fetch works here, and only other hosts are refused.
        const self_ = await attempt("./sefi-worker_loader.js");
        const local = await attempt(bystanderUrl);
        const upload = await attempt("https://example.org/upload", { method: "POST", body: "photo" });
        // The violation events are queued as tasks after the refusals.
        for (let i = 0; i < 50 && violations.length < 2; i++) await new Promise((r) => setTimeout(r, 20));
        return { self_, local, upload, violations };
      },
      { bystanderUrl },
    );

    assert.match(outcome.self_, /^answered 200/, `the worker could not fetch its own site: ${outcome.self_}`);
    assert.match(
      outcome.local,
      /^refused/,
      `the worker reached another 127.0.0.1 port (${bystanderUrl}); its policy should refuse it: ${outcome.local}`,
    );
    assert.match(outcome.upload, /^refused/, `the worker's POST to example.org was not refused: ${outcome.upload}`);
    assert.deepEqual(
      outcome.violations.map((v) => v.directive),
      ["connect-src", "connect-src"],
      `the worker should see one connect-src violation per refused fetch: ${JSON.stringify(outcome.violations)}`,
    );
    for (const v of outcome.violations) {
      assert.equal(v.policy, meta, `the worker enforced a policy other than the page's: ${v.policy}`);
    }
    assert.deepEqual(reached, [], "the other 127.0.0.1 server received requests from the worker");
    // The browser refused both before any request existed, so the routing saw none either.
    assert.deepEqual(foreignRequests, [], "requests left 127.0.0.1");
    assert.ok(
      !server.requests.some((r) => r.url.startsWith("/upload") || r.url.startsWith("/collect")),
      `the site's server received the refused requests: ${JSON.stringify(server.requests)}`,
    );
  } finally {
    await browser.close();
    bystander.closeAllConnections();
    await new Promise((resolve) => bystander.close(resolve));
  }
});
