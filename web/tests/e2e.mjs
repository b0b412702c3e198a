// End-to-end test of the web UI: a real daemon (the release `vireo` binary)
// with a TLS listener and tokens, a real guest (the guest kit on the
// emulator), and Debian's Chromium driven by playwright-core.
//
//   node web/tests/e2e.mjs        (scripts/test-web runs it)
//
// Environment: VIREO_BIN (the vireo binary), VIREO_TEST_KIT (a guest kit;
// else target/tmp/guest-kit, built when missing), WEB_E2E_OUT (screenshots;
// default target/web-e2e), CHROMIUM (default /usr/bin/chromium),
// VIREO_E2E_ACCEL (default emu). Every main page is also checked with
// axe-core's WCAG 2.1 A/AA rules.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const target = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, 'target');
const bin = process.env.VIREO_BIN ?? path.join(target, 'release', 'vireo');
const out = process.env.WEB_E2E_OUT ?? path.join(target, 'web-e2e');
const accel = process.env.VIREO_E2E_ACCEL ?? 'emu';
const BOOT_TIMEOUT = Number(process.env.VIREO_E2E_BOOT_SECS ?? 240) * 1000;
const VM = 'e2e-web';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vireo-web-e2e-'));
const sock = path.join(tmp, 'vireo.sock');
const children = [];
let browser = null;
let shot = 0;
let port = 0;
let cert = null;

function log(msg) {
  console.log(`[e2e ${new Date().toISOString().slice(11, 19)}] ${msg}`);
}

function fail(msg) {
  throw new Error(msg);
}

/** Poll `f` until it returns a truthy value (or throw after `ms`). */
async function until(what, ms, f, every = 250) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) fail(`timed out after ${ms / 1000} s waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

const AXE = fs.readFileSync(path.join(root, 'web', 'node_modules', 'axe-core', 'axe.min.js'), 'utf8');

/** axe-core's WCAG 2.1 A/AA rules on the page as it is now: no violations. */
async function a11y(page, where) {
  // Evaluated through the debugging protocol, so the page's CSP allows it.
  await page.evaluate(AXE);
  const violations = await page.evaluate(async () => {
    const r = await window.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] });
    return r.violations.map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.map((n) => n.html.slice(0, 120)).join(' | ')}`);
  });
  if (violations.length) fail(`accessibility problems on ${where}:\n  ${violations.join('\n  ')}`);
}

async function snap(page, name) {
  shot += 1;
  const file = path.join(out, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${path.relative(root, file)}`);
}

/** One HTTP request; resolves { status, headers, body }. */
function request(opts, body) {
  return new Promise((resolve, reject) => {
    const mod = opts.socketPath || opts.protocol === 'http:' ? http : https;
    const req = mod.request({ timeout: 60000, ...opts }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('request timed out')));
    if (body !== undefined) req.end(typeof body === 'string' ? body : JSON.stringify(body));
    else req.end();
  });
}

/** The daemon's API over its Unix socket (admin). */
async function unix(method, p, body) {
  const headers = body === undefined ? {} : { 'content-type': 'application/json' };
  const r = await request({ socketPath: sock, method, path: p, headers }, body);
  return { ...r, json: r.body ? safeJson(r.body) : undefined };
}

function safeJson(s) {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}

function tls(method, p, tokenValue) {
  const headers = tokenValue ? { authorization: `Bearer ${tokenValue}` } : {};
  return request({ host: '127.0.0.1', port, method, path: p, headers, ca: cert });
}

function start(cmd, args, name) {
  const logFile = path.join(tmp, `${name}.log`);
  const fd = fs.openSync(logFile, 'w');
  const child = spawn(cmd, args, { stdio: ['ignore', fd, fd] });
  child.logFile = logFile;
  children.push(child);
  return child;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
    s.on('error', reject);
  });
}

function vireo(args, opts = {}) {
  return execFileSync(bin, args, { encoding: 'utf8', timeout: 120000, ...opts });
}

/** A new token's secret (`vireo token create` prints it alone on stdout). */
function createToken(role) {
  const text = vireo(['token', 'create', '--role', role, '--name', `e2e-${role}`], { env: { ...process.env, VIREO_SOCKET: sock } });
  const secret = text.trim().split('\n').pop().trim();
  if (!secret || /\s/.test(secret)) fail(`no token in the output of vireo token create: ${text}`);
  return secret;
}

function guestKit() {
  if (process.env.VIREO_TEST_KIT) return process.env.VIREO_TEST_KIT;
  const dir = path.join(target, 'tmp', 'guest-kit');
  if (!fs.existsSync(path.join(dir, 'vireo-kit.conf'))) {
    log(`building the guest kit in ${dir} (vireo image build)`);
    vireo(['image', 'build', '--out', dir], { stdio: 'inherit', timeout: 900000 });
  }
  return dir;
}

/** The text on screen in the console terminal of `vm` inside `scope`. */
async function termText(scope, vm) {
  return scope.locator(`.term[data-vm="${vm}"] .xterm-rows`).innerText();
}

const has42 = (text) => text.split('\n').some((l) => l.trim() === '42');

async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    // Playwright gives each launch a fresh temporary profile (--user-data-dir).
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
}

async function newPage(base) {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1360, height: 880 }, baseURL: base });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => log(`page error: ${e.message}`));
  return page;
}

async function login(page, secret) {
  await page.goto('/');
  await page.getByLabel('API token').fill(secret);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Virtual machines' }).waitFor();
}

async function confirm(page, label) {
  const dlg = page.getByRole('dialog');
  await dlg.waitFor();
  await dlg.getByRole('button', { name: label }).click();
}

async function vmState(page) {
  return page.locator('h1 [data-state]').getAttribute('data-state');
}

async function main() {
  fs.mkdirSync(out, { recursive: true });
  for (const f of fs.readdirSync(out)) if (f.endsWith('.png')) fs.rmSync(path.join(out, f));
  if (!fs.existsSync(bin)) fail(`${bin} not found: build it (cargo build --release) or set VIREO_BIN`);
  const kit = guestKit();

  // A self-signed certificate for 127.0.0.1, and the daemon on TLS + Unix.
  const certFile = path.join(tmp, 'cert.pem');
  const keyFile = path.join(tmp, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:FALSE', '-keyout', keyFile, '-out', certFile], { stdio: 'ignore' });
  cert = fs.readFileSync(certFile);
  port = await freePort();
  const daemon = start(bin, ['serve', '--state-dir', path.join(tmp, 'state'), '--storage', tmp, '--storage', path.dirname(kit), '--listen', `unix:${sock}`, '--listen', `tcp:127.0.0.1:${port}`, '--tls-cert', certFile, '--tls-key', keyFile], 'daemon');
  await until('the daemon', 30000, async () => {
    if (daemon.exitCode !== null) fail(`vireo serve exited: ${fs.readFileSync(daemon.logFile, 'utf8')}`);
    return (await tls('GET', '/v1/openapi.json')).status === 200;
  });
  const index = await tls('GET', '/');
  const built = fs.readFileSync(path.join(root, 'web', 'dist', 'index.html'), 'utf8');
  if (index.body !== built) fail(`${bin} serves another UI than web/dist: rebuild it after scripts/build-web (cargo build --release)`);
  const base = `https://127.0.0.1:${port}`;
  const admin = createToken('admin');
  const viewer = createToken('viewer');
  log(`daemon on ${base} and unix:${sock}; kit ${kit}`);

  browser = await launch();

  // ---- admin: log in, a refused token first
  let page = await newPage(base);
  await page.goto('/');
  await page.getByLabel('API token').waitFor();
  await snap(page, 'login');
  await a11y(page, 'the login page');
  await page.getByLabel('API token').fill('not-a-token');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#login-error', { hasText: 'refused' }).waitFor();
  await login(page, admin);
  await page.locator('[data-testid=role]', { hasText: 'admin' }).waitFor();
  await snap(page, 'list-empty');

  // ---- create from the form: a bad value lands next to its field
  await page.getByRole('link', { name: 'New VM' }).first().click();
  await page.getByLabel('Name').fill(VM);
  await page.getByLabel('Guest kit directory').fill(kit);
  await page.getByLabel('vCPUs').fill('0');
  await page.getByLabel('Accelerator').selectOption(accel);
  await page.getByRole('button', { name: 'Create VM' }).click();
  await page.locator('#err-vcpus', { hasText: 'vcpus' }).waitFor();
  if ((await page.getByLabel('vCPUs').getAttribute('aria-invalid')) !== 'true') fail('vcpus not marked invalid');
  await snap(page, 'create-error');
  await a11y(page, 'the create form with an error');
  await page.getByLabel('vCPUs').fill('1');
  await page.getByLabel('Memory (MiB)').fill('256');
  await page.getByRole('button', { name: 'Create VM' }).click();
  await page.waitForURL(`**/vms/${VM}`);
  if ((await vmState(page)) !== 'stopped') fail('a new VM should be stopped');

  // ---- start, pause/resume, and the shell on the console
  await page.getByRole('button', { name: `Start ${VM}` }).click();
  await until('state running', 30000, async () => (await vmState(page)) === 'running');
  log('waiting for the guest shell on the console (boot on the emulator)');
  await until('the shell prompt', BOOT_TIMEOUT, async () => {
    const text = await termText(page, VM);
    return text.includes('vireo-init: ready') && /[#$]\s*$/.test(text.trimEnd() + ' ');
  }, 1000);
  await snap(page, 'console-booted');
  await page.getByRole('button', { name: `Pause ${VM}` }).click();
  await until('state paused', 30000, async () => (await vmState(page)) === 'paused');
  await snap(page, 'paused');
  await page.getByRole('button', { name: `Resume ${VM}` }).click();
  await until('state running again', 30000, async () => (await vmState(page)) === 'running');
  await page.locator(`.term[data-vm="${VM}"]`).click();
  await page.keyboard.type('echo $((6*7))');
  await page.keyboard.press('Enter');
  await until('42 on the console', 60000, async () => has42(await termText(page, VM)));
  await snap(page, 'console-42');
  await a11y(page, 'the VM page');

  // ---- the list: state, resources, charts
  await page.getByRole('link', { name: 'Virtual machines' }).click();
  const row = page.locator(`tr[data-vm="${VM}"]`);
  await row.waitFor();
  await until('the CPU chart to have a value', 20000, async () => /\d+%/.test(await row.locator('td[data-chart=cpu] .num').innerText()));
  // A few 2 s samples, so the screenshot shows lines rather than dots.
  await until('three samples in the memory chart', 20000, async () => ((await row.locator('td[data-chart=mem] polyline').getAttribute('points')) ?? '').split(' ').length >= 3);
  await snap(page, 'list-running');
  await a11y(page, 'the VM list');

  // ---- console wall with the VM: the scrollback (with 42) arrives first
  await row.getByRole('checkbox').check();
  await page.getByRole('button', { name: 'Open console wall' }).click();
  await page.waitForURL('**/wall?vms=*');
  await until('42 on the wall', 30000, async () => has42(await termText(page.locator('[data-testid=wall]'), VM)));
  await snap(page, 'wall');
  await a11y(page, 'the console wall');

  // ---- through `vireo ui`: the page loads with #token, the console streams, a wrong token is refused
  await proxyCheck();

  // ---- viewer: sees everything, changes nothing
  const vpage = await newPage(base);
  await login(vpage, viewer);
  await vpage.locator('[data-testid=role]', { hasText: 'viewer' }).waitFor();
  const vrow = vpage.locator(`tr[data-vm="${VM}"]`);
  await vrow.waitFor();
  await checkAllDisabled(vpage, 'the list');
  if (!(await vpage.getByRole('button', { name: 'New VM' }).isDisabled())) fail('New VM is enabled for a viewer');
  await snap(vpage, 'viewer-list');
  await a11y(vpage, 'the VM list (viewer)');
  await vrow.getByRole('link', { name: VM }).click();
  await until('the viewer console to show 42', 30000, async () => has42(await termText(vpage, VM)));
  await checkAllDisabled(vpage, 'the VM page');
  if (!(await vpage.getByRole('button', { name: 'Take snapshot' }).isDisabled())) fail('Take snapshot is enabled for a viewer');
  await vpage.locator(`.term[data-vm="${VM}"]`).click();
  await vpage.keyboard.type('echo viewer$((3*3))x');
  await vpage.keyboard.press('Enter');
  // The server must refuse a viewer's input too (not only the UI).
  const refusal = await vpage.evaluate(
    (url) =>
      new Promise((resolve) => {
        const ws = new WebSocket(url);
        ws.onopen = () => ws.send('echo viewer$((4*4))y\r');
        ws.onmessage = (ev) => typeof ev.data === 'string' && resolve(ev.data);
        setTimeout(() => resolve('no answer'), 10000);
      }),
    `wss://127.0.0.1:${port}/v1/vms/${VM}/console/ws?access_token=${viewer}`,
  );
  if (!refusal.includes('forbidden')) fail(`a viewer's console input was not refused: ${refusal}`);
  // Give a typed command time to reach the guest and echo if it were sent
  // (nothing to poll for: the point is that nothing happens).
  await vpage.waitForTimeout(3000);
  const scrollback = await unix('GET', `/v1/vms/${VM}/console`);
  if (/viewer9x|viewer16y/.test(scrollback.body)) fail('a viewer typed into the console');
  await snap(vpage, 'viewer-console');
  await vpage.goto(`/vms/${VM}/edit`);
  await vpage.getByRole('heading', { name: `Edit ${VM}` }).waitFor();
  for (const el of await vpage.locator('form.vm-form input, form.vm-form select, form.vm-form textarea, form.vm-form button[type=submit]').all()) {
    if (!(await el.isDisabled())) fail(`an edit control is enabled for a viewer: ${await el.evaluate((e) => e.outerHTML)}`);
  }
  const denied = await tls('POST', `/v1/vms/${VM}/kill`, viewer);
  if (denied.status !== 403) fail(`viewer kill: expected 403, got ${denied.status}`);
  await vpage.context().close();

  // ---- admin again: reboot (returns once the new process runs), then
  // force stop and delete, each confirmed in a dialog
  await page.goto(`/vms/${VM}`);
  await page.getByRole('button', { name: `Reboot ${VM}` }).click();
  await page.locator('#status', { hasText: `Reboot ${VM}: done` }).waitFor({ timeout: 60000 });
  await until('state running after the reboot', 30000, async () => (await vmState(page)) === 'running');

  // ---- snapshots: take one, clone it (the clone runs beside the VM),
  // restore it into the running VM, delete it once the clone is gone
  const TAG = 'e2e-snap';
  const CLONE = `${VM}-clone`;
  await page.getByLabel('Tag', { exact: true }).fill(TAG);
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  const srow = page.locator(`tr[data-snapshot="${TAG}"]`);
  await srow.waitFor({ timeout: 120000 });
  const taken = (await unix('GET', `/v1/vms/${VM}/snapshots/${TAG}`)).json;
  if (taken?.memory_bytes !== 256 * 1024 * 1024) fail(`unexpected snapshot record: ${JSON.stringify(taken)}`);
  await snap(page, 'snapshot-taken');
  await a11y(page, 'the VM page with a snapshot');
  await srow.getByRole('button', { name: `Clone ${VM} from ${TAG}` }).click();
  const cdlg = page.getByRole('dialog');
  await cdlg.getByLabel('Name of the new VM').fill(CLONE);
  await snap(page, 'clone-dialog');
  await cdlg.getByRole('button', { name: 'Clone' }).click();
  await page.locator('#status', { hasText: `Clone ${VM} from ${TAG} as ${CLONE}: done` }).waitFor({ timeout: 120000 });
  const cloned = (await unix('GET', `/v1/vms/${CLONE}`)).json;
  if (cloned?.state !== 'running') fail(`the clone is not running: ${JSON.stringify(cloned)}`);
  await srow.getByRole('link', { name: CLONE }).waitFor();
  if (!(await srow.getByRole('button', { name: `Delete snapshot ${TAG}` }).isDisabled())) fail('a snapshot with a clone can be deleted');
  const pidBefore = (await unix('GET', `/v1/vms/${VM}`)).json.pid;
  await srow.getByRole('button', { name: `Restore ${VM} from ${TAG}` }).click();
  await confirm(page, `Restore ${TAG}`);
  await page.locator('#status', { hasText: `Restore ${VM} from ${TAG}: done` }).waitFor({ timeout: 120000 });
  const restored = (await unix('GET', `/v1/vms/${VM}`)).json;
  if (restored.state !== 'running' || restored.pid === pidBefore) fail(`the restore did not start a new process: ${JSON.stringify(restored)}`);
  await snap(page, 'snapshot-restored');
  for (const [m, p] of [['POST', `/v1/vms/${CLONE}/kill`], ['DELETE', `/v1/vms/${CLONE}`]]) {
    const r = await unix(m, p);
    if (r.status >= 300) fail(`${m} ${p}: ${r.status} ${r.body}`);
  }
  await until('Delete snapshot to be enabled', 20000, async () => !(await srow.getByRole('button', { name: `Delete snapshot ${TAG}` }).isDisabled()));
  await srow.getByRole('button', { name: `Delete snapshot ${TAG}` }).click();
  await confirm(page, `Delete ${TAG}`);
  await until('the snapshot row to go', 20000, async () => (await srow.count()) === 0);
  if ((await unix('GET', `/v1/vms/${VM}/snapshots/${TAG}`)).status !== 404) fail('the snapshot is still there');
  await page.getByRole('button', { name: `Force stop ${VM}` }).click();
  await snap(page, 'confirm-force-stop');
  await confirm(page, `Force stop ${VM}`);
  await until('state stopped', 30000, async () => (await vmState(page)) === 'stopped');
  // A stopped VM can be edited: the change goes out as PATCH.
  await page.getByRole('button', { name: `Edit ${VM}` }).click();
  await page.getByLabel('Memory (MiB)').fill('320');
  await page.getByRole('button', { name: 'Save changes' }).click();
  await page.waitForURL(`**/vms/${VM}`);
  await page.locator('.facts dd', { hasText: '320 MiB' }).waitFor();
  await page.getByRole('button', { name: `Delete ${VM}` }).click();
  await confirm(page, `Delete ${VM}`);
  await page.getByRole('heading', { name: 'Virtual machines' }).waitFor();
  await until('the VM to be gone', 10000, async () => (await unix('GET', `/v1/vms/${VM}`)).status === 404);
  await snap(page, 'deleted');
  log('PASS');
}

async function checkAllDisabled(page, where) {
  const buttons = await page.locator('button[data-action]').all();
  if (buttons.length === 0) fail(`no action buttons on ${where}`);
  for (const b of buttons) {
    if (!(await b.isDisabled())) fail(`${await b.getAttribute('aria-label')} is enabled for a viewer on ${where}`);
  }
}

async function proxyCheck() {
  const proxy = start(bin, ['ui', '--socket', sock, '--port', '0', '--no-open'], 'ui');
  const url = await until('the vireo ui URL', 15000, async () => {
    if (proxy.exitCode !== null) fail(`vireo ui exited: ${fs.readFileSync(proxy.logFile, 'utf8')}`);
    return /http:\/\/127\.0\.0\.1:\d+\/#token=[0-9a-f]+/.exec(fs.readFileSync(proxy.logFile, 'utf8'))?.[0];
  });
  const u = new URL(url);
  const secret = u.hash.slice('#token='.length);
  const get = (p, headers = {}) => request({ protocol: 'http:', host: '127.0.0.1', port: Number(u.port), path: p, headers });
  const wrong = await get('/v1/vms', { authorization: 'Bearer 0000' });
  if (wrong.status !== 401) fail(`vireo ui with a wrong token: expected 401, got ${wrong.status}`);
  if ((await get('/v1/vms')).status !== 401) fail('vireo ui without a token must answer 401');
  if ((await get(`/v1/vms?access_token=${secret}`)).status !== 200) fail('vireo ui refused its own token');
  const page = await newPage(`http://127.0.0.1:${u.port}`);
  await page.goto(url);
  await page.locator('[data-testid=role]', { hasText: 'admin' }).waitFor();
  await page.locator(`tr[data-vm="${VM}"]`).getByRole('link', { name: VM }).click();
  await until('42 through the proxy (WebSocket)', 30000, async () => has42(await termText(page, VM)));
  await snap(page, 'vireo-ui-proxy');
  await page.context().close();
  proxy.kill('SIGINT');
}

async function cleanup() {
  try {
    const list = await unix('GET', '/v1/vms');
    for (const vm of list.json?.vms ?? []) {
      if (vm.state === 'running' || vm.state === 'paused') await unix('POST', `/v1/vms/${encodeURIComponent(vm.name)}/kill`);
    }
  } catch {
    /* daemon already gone */
  }
  if (browser) await browser.close().catch(() => {});
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
}

try {
  await main();
  await cleanup();
  fs.rmSync(tmp, { recursive: true, force: true });
} catch (e) {
  console.error(`[e2e] FAIL: ${e.stack ?? e}`);
  for (const c of children) {
    try {
      console.error(`--- ${path.basename(c.logFile)} (last lines)\n${fs.readFileSync(c.logFile, 'utf8').split('\n').slice(-30).join('\n')}`);
    } catch {
      /* no log */
    }
  }
  if (browser) {
    for (const ctx of browser.contexts()) {
      for (const p of ctx.pages()) await p.screenshot({ path: path.join(out, `failure-${ctx.pages().indexOf(p)}.png`), fullPage: true }).catch(() => {});
    }
  }
  await cleanup();
  console.error(`[e2e] screenshots in ${out}; daemon state left in ${tmp}`);
  process.exit(1);
}
