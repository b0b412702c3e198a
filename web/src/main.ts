// The vireo web UI: VM list with live charts, create/edit forms, power
// actions, live serial consoles and a console wall. It only calls the public
// REST API (see daemon/openapi.json) with the session's token.

import '@xterm/xterm/css/xterm.css';
import './style.css';
import {
  ApiError,
  call,
  onUnauthorized,
  setToken,
  streamUrl,
  takeTokenFromHash,
  token,
  vmPath,
  type Role,
  type Snapshot,
  type Stats,
  type Vm,
  type WhoAmI,
} from './api';
import { ConsoleView } from './console';
import { append, clear, fmtBytes, fmtDuration, fmtRate, h, sparkline } from './dom';

// ---------------------------------------------------------------- session

let role: Role = 'viewer';
let who: WhoAmI | null = null;

/** Operator actions: start/stop/pause/resume/reboot, typing in consoles. */
const canOperate = (): boolean => role === 'operator' || role === 'admin';
/** Admin actions: create, edit, delete. */
const canAdmin = (): boolean => role === 'admin';

type Identity = 'ok' | 'unauthorized';

async function identify(): Promise<Identity> {
  try {
    who = await call<WhoAmI>('GET', '/v1/whoami');
    role = who.role;
    return 'ok';
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return 'unauthorized';
    if (e instanceof ApiError && e.status === 404) {
      // A daemon without tokens (Unix socket only): every caller is admin.
      who = null;
      role = 'admin';
      return 'ok';
    }
    throw e;
  }
}

// ---------------------------------------------------------------- layout

const app = document.getElementById('app') as HTMLDivElement;
let main: HTMLElement;
let statusEl: HTMLElement;
let teardown: (() => void)[] = [];

function shell(): void {
  clear(app);
  const nav = h(
    'nav',
    { 'aria-label': 'Main' },
    navLink('/', 'Virtual machines'),
    navLink('/vms/new', 'New VM'),
    navLink('/wall', 'Console wall'),
  );
  const user = h(
    'div',
    { class: 'user' },
    h(
      'span',
      { class: `role role-${role}`, 'data-testid': 'role', title: who?.token ? `token ${who.token.name}` : 'Unix socket' },
      `Role: ${role}`,
    ),
    h('button', { type: 'button', class: 'ghost', onclick: logout }, 'Log out'),
  );
  statusEl = h('div', { id: 'status', class: 'status', role: 'status', 'aria-live': 'polite' });
  main = h('main', { id: 'main', tabindex: '-1' });
  append(app, h('header', { class: 'top' }, h('a', { class: 'brand', href: '/', 'data-nav': '' }, 'vireo'), nav, user), statusEl, main);
}

function navLink(href: string, text: string): HTMLAnchorElement {
  return h('a', { href, 'data-nav': '' }, text);
}

function markNav(): void {
  for (const a of app.querySelectorAll<HTMLAnchorElement>('nav a')) {
    const here = a.getAttribute('href') === location.pathname || (a.getAttribute('href') === '/' && location.pathname === '/vms');
    if (here) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

/** Show a message in the status line (errors are announced assertively). */
function say(text: string, kind: 'info' | 'error' | 'ok' = 'info'): void {
  clear(statusEl);
  if (!text) return;
  statusEl.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  append(
    statusEl,
    h('p', { class: `msg msg-${kind}` }, text, h('button', { type: 'button', class: 'ghost small', 'aria-label': 'Dismiss message', onclick: () => clear(statusEl) }, '×')),
  );
}

function errText(e: unknown): string {
  if (e instanceof ApiError) return e.message;
  return e instanceof Error ? e.message : String(e);
}

function heading(text: string, ...extra: (Node | string)[]): HTMLHeadingElement {
  return h('h1', { tabindex: '-1' }, text, ...extra);
}

function stateBadge(state: string): HTMLSpanElement {
  return h('span', { class: `badge state-${state}`, 'data-state': state }, state);
}

/** A modal confirmation (Esc or Cancel: no). */
function confirmDialog(title: string, text: string, confirmLabel: string): Promise<boolean> {
  return new Promise((resolve) => {
    const cancel = h('button', { type: 'button', value: 'no' }, 'Cancel');
    const ok = h('button', { type: 'button', class: 'danger', value: 'yes' }, confirmLabel);
    const dlg = h(
      'dialog',
      { class: 'confirm', 'aria-labelledby': 'dlg-title', 'aria-describedby': 'dlg-text' },
      h('h2', { id: 'dlg-title' }, title),
      h('p', { id: 'dlg-text' }, text),
      h('div', { class: 'buttons' }, cancel, ok),
    );
    let answer = false;
    cancel.addEventListener('click', () => dlg.close());
    ok.addEventListener('click', () => {
      answer = true;
      dlg.close();
    });
    dlg.addEventListener('close', () => {
      dlg.remove();
      resolve(answer);
    });
    document.body.append(dlg);
    dlg.showModal();
    cancel.focus();
  });
}

// ---------------------------------------------------------------- routing

function navigate(path: string): void {
  history.pushState(null, '', path);
  void route();
}

document.addEventListener('click', (ev) => {
  const a = (ev.target as Element | null)?.closest?.('a[data-nav]') as HTMLAnchorElement | null;
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  ev.preventDefault();
  navigate(a.getAttribute('href') ?? '/');
});
window.addEventListener('popstate', () => void route());

async function route(): Promise<void> {
  for (const t of teardown) t();
  teardown = [];
  if (!main || !main.isConnected) shell();
  clear(main);
  markNav();
  const p = location.pathname;
  let m: RegExpExecArray | null;
  if (p === '/' || p === '/vms' || p === '/index.html') listPage();
  else if (p === '/vms/new') formPage(null);
  else if ((m = /^\/vms\/([^/]+)\/edit$/.exec(p))) await editPage(decodeURIComponent(m[1]));
  else if ((m = /^\/vms\/([^/]+)$/.exec(p))) await detailPage(decodeURIComponent(m[1]));
  else if (p === '/wall') await wallPage();
  else {
    append(main, heading('Page not found'), h('p', {}, 'There is nothing at ', h('code', {}, p), '. ', h('a', { href: '/', 'data-nav': '' }, 'Back to the VM list')));
  }
  const h1 = main.querySelector<HTMLElement>('h1');
  document.title = h1?.textContent ? `${h1.textContent.trim()} · vireo` : 'vireo';
  h1?.focus({ preventScroll: true });
}

function every(ms: number, f: () => void): void {
  const id = window.setInterval(f, ms);
  teardown.push(() => clearInterval(id));
}

/** Subscribe to the daemon's event stream; `onVm` runs on every VM state change. */
function onVmEvents(onVm: () => void): void {
  if (typeof EventSource === 'undefined') return;
  const es = new EventSource(streamUrl('/v1/events', false));
  es.addEventListener('vm', () => onVm());
  es.onerror = () => {
    // No event stream (older daemon) or a denied token: polling still runs.
    if (es.readyState === EventSource.CLOSED) es.close();
  };
  teardown.push(() => es.close());
}

// ---------------------------------------------------------------- actions

type Action = 'start' | 'stop' | 'force-stop' | 'pause' | 'resume' | 'reboot' | 'edit' | 'delete' | 'console';

const ACTION_LABEL: Record<Action, string> = {
  start: 'Start',
  stop: 'Stop',
  'force-stop': 'Force stop',
  pause: 'Pause',
  resume: 'Resume',
  reboot: 'Reboot',
  edit: 'Edit',
  delete: 'Delete',
  console: 'Console',
};

function actionsFor(vm: Vm): Action[] {
  switch (vm.state) {
    case 'running':
      return ['stop', 'force-stop', 'pause', 'reboot'];
    case 'paused':
      return ['resume', 'force-stop', 'reboot'];
    default:
      return ['start', 'edit', 'delete'];
  }
}

function allowed(a: Action): boolean {
  if (a === 'console') return true;
  if (a === 'edit' || a === 'delete') return canAdmin();
  return canOperate();
}

function actionButtons(vm: Vm, after: () => void): HTMLDivElement {
  const box = h('div', { class: 'actions', role: 'group', 'aria-label': `Actions for ${vm.name}` });
  for (const a of actionsFor(vm)) {
    const ok = allowed(a);
    const b = h(
      'button',
      {
        type: 'button',
        class: a === 'delete' || a === 'force-stop' ? 'danger small' : 'small',
        'data-action': a,
        'aria-label': `${ACTION_LABEL[a]} ${vm.name}`,
        disabled: !ok,
        title: ok ? null : `Your role (${role}) cannot ${ACTION_LABEL[a].toLowerCase()} VMs`,
      },
      ACTION_LABEL[a],
    );
    b.addEventListener('click', () => void runAction(vm, a, b, after));
    box.append(b);
  }
  return box;
}

async function runAction(vm: Vm, a: Action, button: HTMLButtonElement, after: () => void): Promise<void> {
  const n = vm.name;
  if (a === 'edit') return navigate(`/vms/${encodeURIComponent(n)}/edit`);
  if (a === 'console') return navigate(`/vms/${encodeURIComponent(n)}`);
  if (a === 'delete' && !(await confirmDialog(`Delete ${n}?`, `The definition of ${n} is removed. Its disk images are kept.`, `Delete ${n}`))) return;
  if (a === 'force-stop' && !(await confirmDialog(`Force stop ${n}?`, `The VM process is killed at once, like pulling the power cord: unsaved guest data is lost.`, `Force stop ${n}`))) return;
  const requests: Record<string, [string, string, unknown?]> = {
    start: ['POST', vmPath(n, '/start')],
    stop: ['POST', vmPath(n, '/stop'), {}],
    'force-stop': ['POST', vmPath(n, '/kill')],
    pause: ['POST', vmPath(n, '/pause')],
    resume: ['POST', vmPath(n, '/resume')],
    reboot: ['POST', vmPath(n, '/reboot')],
    delete: ['DELETE', vmPath(n)],
  };
  const [method, path, body] = requests[a];
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  say(`${ACTION_LABEL[a]} ${n}…`);
  try {
    await call(method, path, body);
    say(`${ACTION_LABEL[a]} ${n}: done`, 'ok');
    if (a === 'delete' && location.pathname !== '/') navigate('/');
  } catch (e) {
    say(`${ACTION_LABEL[a]} ${n} failed: ${errText(e)}`, 'error');
  } finally {
    button.disabled = false;
    button.removeAttribute('aria-busy');
    after();
  }
}

function uptime(vm: Vm): number | null {
  if (vm.state !== 'running' && vm.state !== 'paused') return null;
  if (typeof vm.uptime_secs === 'number') return vm.uptime_secs;
  if (!vm.started_at) return null;
  const t = Date.parse(vm.started_at);
  return Number.isNaN(t) ? null : Math.max(0, (Date.now() - t) / 1000);
}

// ---------------------------------------------------------------- stats

interface Sample {
  cpu: number | null; // % of the VM's vCPUs
  mem: number | null; // bytes resident
  disk: number | null; // bytes/s read + written
  net: number | null; // bytes/s received + sent
}

const HISTORY = 60;
const history_ = new Map<string, Sample[]>();
let lastStats: Stats | null = null;
let statsAvailable: boolean | null = null;

function rate(cur: number | null, prev: number | null, dt: number): number | null {
  if (cur === null || prev === null || dt <= 0) return null;
  return Math.max(0, (cur - prev) / dt);
}

const sum = (a: number | null, b: number | null): number | null => (a === null && b === null ? null : (a ?? 0) + (b ?? 0));

/** Fold a /v1/stats sample into the per-VM histories (rates from the previous sample). */
function addStats(s: Stats, vcpus: Map<string, number>): void {
  const prev = new Map((lastStats?.vms ?? []).map((v) => [v.name, v]));
  const dt = lastStats ? s.time - lastStats.time : 0;
  for (const v of s.vms) {
    const p = prev.get(v.name);
    const active = v.state === 'running' || v.state === 'paused';
    let sample: Sample = { cpu: null, mem: active ? v.memory_rss_bytes : null, disk: null, net: null };
    if (p && active) {
      const cpu = rate(v.cpu_seconds, p.cpu_seconds, dt);
      sample = {
        cpu: cpu === null ? null : (cpu * 100) / Math.max(1, vcpus.get(v.name) ?? 1),
        mem: v.memory_rss_bytes,
        disk: rate(sum(v.disk_read_bytes, v.disk_write_bytes), sum(p.disk_read_bytes, p.disk_write_bytes), dt),
        net: rate(sum(v.net_rx_bytes, v.net_tx_bytes), sum(p.net_rx_bytes, p.net_tx_bytes), dt),
      };
    }
    const hist = history_.get(v.name) ?? [];
    hist.push(sample);
    while (hist.length > HISTORY) hist.shift();
    history_.set(v.name, hist);
  }
  lastStats = s;
}

function chartCell(name: string, key: keyof Sample, label: string, fmt: (n: number | null) => string, max?: number): HTMLTableCellElement {
  const hist = history_.get(name) ?? [];
  const values = hist.map((s) => s[key]);
  const last = values.length ? values[values.length - 1] : null;
  const text = statsAvailable === false ? 'n/a' : fmt(last);
  return h('td', { class: 'chart', 'data-chart': key }, sparkline(values, `${label} of ${name}: ${text}`, max), h('span', { class: 'num' }, text));
}

// ---------------------------------------------------------------- VM list

const selectedForWall = new Set<string>();

function listPage(): void {
  const wallBtn = h('button', { type: 'button', id: 'open-wall' }, 'Open console wall');
  wallBtn.addEventListener('click', () => {
    const names = [...selectedForWall];
    navigate(`/wall${names.length ? `?vms=${names.map(encodeURIComponent).join(',')}` : ''}`);
  });
  const newBtn = canAdmin()
    ? h('a', { class: 'button primary', href: '/vms/new', 'data-nav': '' }, 'New VM')
    : h('button', { type: 'button', class: 'primary', disabled: true, title: `Your role (${role}) cannot create VMs` }, 'New VM');
  const tbody = h('tbody');
  const table = h(
    'table',
    { class: 'vms', 'aria-describedby': 'vms-caption' },
    h('caption', { id: 'vms-caption', class: 'sr-only' }, 'Virtual machines with their state, resources and activity over the last two minutes'),
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Select for the console wall')),
        ...['Name', 'State', 'vCPUs', 'Memory', 'Uptime', 'CPU', 'Memory used', 'Disk I/O', 'Network', 'Actions'].map((t) => h('th', { scope: 'col' }, t)),
      ),
    ),
    tbody,
  );
  const empty = h('p', { class: 'empty', hidden: true }, 'No VMs yet. ', canAdmin() ? h('a', { href: '/vms/new', 'data-nav': '' }, 'Create one.') : 'An admin can create one.');
  const note = h('p', { class: 'note', hidden: true });
  append(main, h('div', { class: 'titlebar' }, heading('Virtual machines'), h('div', { class: 'toolbar' }, wallBtn, newBtn)), note, h('div', { class: 'table-wrap' }, table), empty);

  const rows = new Map<string, { tr: HTMLTableRowElement; key: string }>();
  let busy = false;
  const refresh = async (): Promise<void> => {
    if (busy) return;
    busy = true;
    try {
      const [list, stats] = await Promise.all([
        call<{ vms: Vm[] }>('GET', '/v1/vms'),
        call<Stats>('GET', '/v1/stats').catch((e: unknown) => {
          if (e instanceof ApiError && e.status === 404) statsAvailable = false;
          return null;
        }),
      ]);
      if (stats) {
        statsAvailable = true;
        addStats(stats, new Map(list.vms.map((v) => [v.name, v.vcpus])));
      }
      note.hidden = statsAvailable !== false;
      note.textContent = 'This daemon does not report statistics (GET /v1/stats); charts are off.';
      render(list.vms);
    } catch (e) {
      say(`Cannot list VMs: ${errText(e)}`, 'error');
    } finally {
      busy = false;
    }
  };
  const render = (vms: Vm[]): void => {
    empty.hidden = vms.length > 0;
    const seen = new Set<string>();
    for (const vm of vms) {
      seen.add(vm.name);
      const focused = document.activeElement as HTMLElement | null;
      const old = rows.get(vm.name);
      const key = `${vm.state}`;
      const tr = old?.tr ?? h('tr', { 'data-vm': vm.name });
      // Keep the cells that hold focus: rebuild only what changed.
      const check = h('input', {
        type: 'checkbox',
        id: `sel-${vm.name}`,
        'aria-label': `Show ${vm.name} on the console wall`,
        checked: selectedForWall.has(vm.name),
      });
      check.addEventListener('change', () => (check.checked ? selectedForWall.add(vm.name) : selectedForWall.delete(vm.name)));
      const cells: HTMLTableCellElement[] = [
        h('td', {}, check),
        h('th', { scope: 'row' }, h('a', { href: `/vms/${encodeURIComponent(vm.name)}`, 'data-nav': '' }, vm.name)),
        h('td', {}, stateBadge(vm.state)),
        h('td', { class: 'n' }, String(vm.vcpus)),
        h('td', { class: 'n' }, `${vm.memory_mib} MiB`),
        h('td', { class: 'n' }, fmtDuration(uptime(vm))),
        chartCell(vm.name, 'cpu', 'CPU', (n) => (n === null ? '—' : `${n.toFixed(0)}%`), 100),
        chartCell(vm.name, 'mem', 'Memory used', fmtBytes, vm.memory_mib * 1024 * 1024),
        chartCell(vm.name, 'disk', 'Disk I/O', fmtRate),
        chartCell(vm.name, 'net', 'Network', fmtRate),
        h('td', {}, actionButtons(vm, () => void refresh())),
      ];
      if (!old) {
        append(tr, ...cells);
        tbody.append(tr);
      } else {
        // Replace cell by cell, but leave a cell holding the focus alone
        // unless the VM's state changed (its buttons differ then).
        cells.forEach((c, i) => {
          const cur = tr.children[i] as HTMLElement | undefined;
          if (!cur) return tr.append(c);
          const holdsFocus = focused !== null && cur.contains(focused);
          if (holdsFocus && (i === 0 || old.key === key)) return;
          cur.replaceWith(c);
          if (holdsFocus) {
            const again = (focused?.dataset.action && c.querySelector<HTMLElement>(`[data-action="${focused.dataset.action}"]`)) || c.querySelector<HTMLElement>('button:not([disabled]), a');
            again?.focus();
          }
        });
      }
      rows.set(vm.name, { tr, key });
    }
    for (const [name, r] of rows) {
      if (!seen.has(name)) {
        r.tr.remove();
        rows.delete(name);
        selectedForWall.delete(name);
      }
    }
  };
  void refresh();
  every(2000, () => void refresh());
  onVmEvents(() => void refresh());
}

// ---------------------------------------------------------------- VM page

async function detailPage(name: string): Promise<void> {
  let vm: Vm;
  try {
    vm = await call<Vm>('GET', vmPath(name));
  } catch (e) {
    append(main, heading(name), h('p', { class: 'msg msg-error', role: 'alert' }, errText(e)), h('a', { href: '/', 'data-nav': '' }, 'Back to the VM list'));
    return;
  }
  const badge = h('span', {});
  const actions = h('div', {});
  const facts = h('dl', { class: 'facts' });
  const consoleStatus = h('span', { class: 'console-status', 'aria-live': 'polite', 'data-testid': 'console-status' });
  const paint = (v: Vm): void => {
    vm = v;
    // Started again after it stopped: its console is a new one.
    if ((v.state === 'running' || v.state === 'paused') && con.ended) con.reconnect();
    clear(badge);
    badge.append(stateBadge(v.state));
    const focused = document.activeElement as HTMLElement | null;
    const hadFocus = focused !== null && actions.contains(focused);
    clear(actions);
    actions.append(actionButtons(v, () => void reload()));
    if (hadFocus) actions.querySelector<HTMLElement>(`[data-action="${focused?.dataset.action}"]`)?.focus();
    clear(facts);
    const row = (k: string, val: string | null | undefined): void => {
      if (val === null || val === undefined || val === '') return;
      append(facts, h('dt', {}, k), h('dd', {}, val));
    };
    row('vCPUs', String(v.vcpus));
    row('Memory', `${v.memory_mib} MiB`);
    row('Accelerator', v.accel);
    row('Guest kit', v.image);
    row('Kernel', v.kernel);
    row('Initrd', v.initrd);
    row('Command line', v.cmdline);
    v.disks.forEach((d, i) => row(`Disk ${i}`, d));
    v.nets.forEach((d, i) => row(`NIC ${i}`, d));
    row('vsock', v.vsock);
    row('RNG', v.rng === null ? null : v.rng || 'on');
    row('Balloon', v.balloon === null ? null : v.balloon || 'on');
    row('Uptime', uptime(v) === null ? null : fmtDuration(uptime(v)));
    row('Created', v.created_at);
    row('Last exit', v.last_exit ? `${v.last_exit} (${v.last_exit_at ?? ''})` : null);
  };
  const reload = async (): Promise<void> => {
    try {
      paint(await call<Vm>('GET', vmPath(name)));
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) return navigate('/');
      say(errText(e), 'error');
    }
  };
  const con = new ConsoleView({ name, readOnly: !canOperate(), onStatus: (t) => (consoleStatus.textContent = t) });
  const snaps = snapshotsPanel(name, () => vm, () => void reload());
  append(
    main,
    h('div', { class: 'titlebar' }, heading(name, ' ', badge), actions),
    h(
      'div',
      { class: 'detail' },
      h('section', { class: 'panel facts-panel', 'aria-labelledby': 'def-h' }, h('h2', { id: 'def-h' }, 'Definition'), facts),
      h(
        'section',
        { class: 'panel console-panel', 'aria-labelledby': 'con-h' },
        h('div', { class: 'panel-head' }, h('h2', { id: 'con-h' }, 'Serial console'), consoleStatus),
        con.el,
        h('p', { class: 'hint' }, canOperate() ? 'Click the console (or Tab to it) and type: it goes to the guest\u2019s serial port. Shift+Tab leaves the console.' : 'Read-only: your role cannot type into consoles.'),
      ),
    ),
    snaps.el,
  );
  paint(vm);
  con.start();
  teardown.push(() => con.dispose());
  every(2000, () => void reload());
  every(5000, () => void snaps.refresh());
  void snaps.refresh();
  onVmEvents(() => void reload());
}

// ---------------------------------------------------------------- snapshots

/** Ask for a new VM's name in a modal dialog; null when cancelled. */
function promptDialog(title: string, label: string, confirmLabel: string): Promise<string | null> {
  return new Promise((resolve) => {
    const input = h('input', { type: 'text', id: 'dlg-input', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9][A-Za-z0-9._-]{0,62}' });
    const cancel = h('button', { type: 'button' }, 'Cancel');
    const ok = h('button', { type: 'submit' }, confirmLabel);
    const form = h('form', { method: 'dialog' }, h('label', { for: 'dlg-input' }, label), input, h('div', { class: 'buttons' }, cancel, ok));
    const dlg = h('dialog', { class: 'confirm', 'aria-labelledby': 'dlg-title' }, h('h2', { id: 'dlg-title' }, title), form);
    let answer: string | null = null;
    cancel.addEventListener('click', () => dlg.close());
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!input.reportValidity()) return;
      answer = input.value.trim();
      dlg.close();
    });
    dlg.addEventListener('close', () => {
      dlg.remove();
      resolve(answer);
    });
    document.body.append(dlg);
    dlg.showModal();
    input.focus();
  });
}

/** The VM page's Snapshots panel: list, take, restore, clone, delete. */
function snapshotsPanel(name: string, current: () => Vm, after: () => void): { el: HTMLElement; refresh: () => Promise<void> } {
  const tag = h('input', { type: 'text', id: 'snap-tag', autocomplete: 'off', placeholder: 'default: the UTC time', pattern: '[A-Za-z0-9._-]{1,64}', disabled: !canOperate() });
  const take = h('button', { type: 'button', class: 'small', disabled: !canOperate(), title: canOperate() ? null : `Your role (${role}) cannot take snapshots` }, 'Take snapshot');
  const tbody = h('tbody', {});
  const table = h(
    'table',
    { class: 'vms snaps', 'aria-labelledby': 'snap-h' },
    h('thead', {}, h('tr', {}, ...['Tag', 'Taken', 'Memory', 'On disk', 'Clones', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
    tbody,
  );
  const empty = h('p', { class: 'hint', hidden: true }, 'No snapshots yet.');
  const el = h(
    'section',
    { class: 'panel snaps-panel', 'aria-labelledby': 'snap-h' },
    h('h2', { id: 'snap-h' }, 'Snapshots'),
    h('div', { class: 'snap-take' }, h('label', { for: 'snap-tag' }, 'Tag'), tag, take),
    h('div', { class: 'table-wrap' }, table),
    empty,
  );
  let key = '';
  const act = async (label: string, f: () => Promise<unknown>, button?: HTMLButtonElement): Promise<void> => {
    if (button) {
      button.disabled = true;
      button.setAttribute('aria-busy', 'true');
    }
    say(`${label}…`);
    try {
      await f();
      say(`${label}: done`, 'ok');
    } catch (e) {
      say(`${label} failed: ${errText(e)}`, 'error');
    } finally {
      if (button) {
        button.disabled = false;
        button.removeAttribute('aria-busy');
      }
      await refresh();
      after();
    }
  };
  const button = (label: string, aria: string, enabled: boolean, why: string, danger = false): HTMLButtonElement =>
    h('button', { type: 'button', class: danger ? 'danger small' : 'small', 'aria-label': aria, disabled: !enabled, title: enabled ? null : why }, label);
  const render = (list: Snapshot[]): void => {
    const k = JSON.stringify(list.map((s) => [s.tag, s.clones, s.size_bytes]));
    if (k === key) return;
    key = k;
    clear(tbody);
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
    for (const s of list) {
      const t = s.tag;
      const restore = button('Restore', `Restore ${name} from ${t}`, canOperate(), `Your role (${role}) cannot restore snapshots`);
      const clone = button('Clone', `Clone ${name} from ${t}`, canAdmin(), `Your role (${role}) cannot clone VMs`);
      const del = button('Delete', `Delete snapshot ${t}`, canAdmin() && s.clones.length === 0, s.clones.length ? `Clones depend on it: ${s.clones.join(', ')}` : `Your role (${role}) cannot delete snapshots`, true);
      const snapPath = `${vmPath(name)}/snapshots/${encodeURIComponent(t)}`;
      restore.addEventListener('click', async () => {
        const running = current().state === 'running' || current().state === 'paused';
        const text = running
          ? `${name} is ${current().state}: its process is replaced by the one saved in ${t}, and its disks are rolled back to the snapshot. What happened since is lost.`
          : `${name} starts from ${t}; its disks are rolled back to the snapshot.`;
        if (!(await confirmDialog(`Restore ${name} from ${t}?`, text, `Restore ${t}`))) return;
        await act(`Restore ${name} from ${t}`, () => call('POST', `${snapPath}/restore`), restore);
      });
      clone.addEventListener('click', async () => {
        const n = await promptDialog(`Clone ${name} from ${t}`, 'Name of the new VM', 'Clone');
        if (!n) return;
        await act(`Clone ${name} from ${t} as ${n}`, () => call('POST', vmPath(name, '/clone'), { name: n, from_snapshot: t }), clone);
      });
      del.addEventListener('click', async () => {
        if (!(await confirmDialog(`Delete snapshot ${t}?`, `The snapshot ${t} of ${name} and its files are removed.`, `Delete ${t}`))) return;
        await act(`Delete snapshot ${t}`, () => call('DELETE', snapPath), del);
      });
      const clones = s.clones.length ? h('td', {}, ...s.clones.flatMap((c, i) => [i ? ', ' : '', h('a', { href: `/vms/${encodeURIComponent(c)}`, 'data-nav': '' }, c)])) : h('td', {}, '—');
      tbody.append(
        h(
          'tr',
          { 'data-snapshot': t },
          h('th', { scope: 'row' }, t, s.parent ? h('span', { class: 'hint' }, ` (diff of ${s.parent})`) : ''),
          h('td', {}, s.created_at.replace('T', ' ').replace('Z', ' UTC')),
          h('td', { class: 'n' }, fmtBytes(s.memory_bytes)),
          h('td', { class: 'n' }, fmtBytes(s.size_bytes)),
          clones,
          h('td', {}, h('div', { class: 'actions', role: 'group', 'aria-label': `Actions for snapshot ${t}` }, restore, clone, del)),
        ),
      );
    }
  };
  const refresh = async (): Promise<void> => {
    try {
      render((await call<{ snapshots: Snapshot[] }>('GET', vmPath(name, '/snapshots'))).snapshots);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) say(`Cannot list snapshots: ${errText(e)}`, 'error');
    }
  };
  take.addEventListener('click', async () => {
    if (tag.value && !tag.reportValidity()) return;
    const body = tag.value.trim() ? { tag: tag.value.trim() } : {};
    await act(`Snapshot ${name}`, () => call('POST', vmPath(name, '/snapshots'), body), take);
    tag.value = '';
  });
  return { el, refresh };
}

// ---------------------------------------------------------------- forms

const FIELDS = ['name', 'image', 'kernel', 'initrd', 'cmdline', 'vcpus', 'memory_mib', 'accel', 'disks', 'nets', 'vsock', 'rng', 'balloon'] as const;
type Field = (typeof FIELDS)[number];

async function editPage(name: string): Promise<void> {
  try {
    formPage(await call<Vm>('GET', vmPath(name)));
  } catch (e) {
    append(main, heading(`Edit ${name}`), h('p', { class: 'msg msg-error', role: 'alert' }, errText(e)));
  }
}

function formPage(vm: Vm | null): void {
  const editing = vm !== null;
  const mayChange = canAdmin() && (!vm || vm.state === 'stopped' || vm.state === 'crashed');
  const errs = new Map<Field | 'form', HTMLElement>();
  const err = (f: Field | 'form'): HTMLElement => {
    const e = h('p', { id: `err-${f}`, class: 'field-error', 'aria-live': 'polite' });
    errs.set(f, e);
    return e;
  };
  const field = (f: Field, label: string, control: HTMLElement, hint?: string): HTMLDivElement => {
    control.id = `f-${f}`;
    control.setAttribute('name', f);
    const described = [`err-${f}`, hint ? `hint-${f}` : ''].filter(Boolean).join(' ');
    control.setAttribute('aria-describedby', described);
    return h('div', { class: 'field', 'data-field': f }, h('label', { for: `f-${f}` }, label), control, hint ? h('p', { id: `hint-${f}`, class: 'hint' }, hint) : null, err(f));
  };
  const text = (value: string | null | undefined, extra: Record<string, string> = {}): HTMLInputElement => h('input', { type: 'text', value: value ?? '', autocomplete: 'off', spellcheck: 'false', ...extra });
  const num = (value: number, min: number): HTMLInputElement => h('input', { type: 'number', value: String(value), min: String(min), step: '1', inputmode: 'numeric' });
  const area = (lines: string[]): HTMLTextAreaElement => {
    const t = h('textarea', { rows: '2', spellcheck: 'false' });
    t.value = lines.join('\n');
    return t;
  };

  const name = text(vm?.name, { required: 'true' });
  if (editing) name.readOnly = true;
  const useKernel = !!vm?.kernel;
  const srcImage = h('input', { type: 'radio', name: 'source', id: 'src-image', value: 'image', checked: !useKernel });
  const srcKernel = h('input', { type: 'radio', name: 'source', id: 'src-kernel', value: 'kernel', checked: useKernel });
  const image = text(vm?.image, { placeholder: '/var/lib/vireo/guest-kit' });
  const kernel = text(vm?.kernel, { placeholder: '/boot/vmlinuz' });
  const initrd = text(vm?.initrd);
  const cmdline = text(vm?.cmdline, { placeholder: 'console=ttyS0 panic=-1 reboot=k' });
  const vcpus = num(vm?.vcpus ?? 1, 1);
  const memory = num(vm?.memory_mib ?? 256, 1);
  const accel = h('select', {}, ...['auto', 'kvm', 'emu'].map((a) => h('option', { value: a, selected: (vm?.accel ?? 'auto') === a }, a)));
  const disks = area(vm?.disks ?? []);
  const nets = area(vm?.nets ?? []);
  const vsock = text(vm?.vsock, { placeholder: 'cid=3,socket=/run/vm.vsock' });
  const rngOn = h('input', { type: 'checkbox', id: 'f-rng-on', checked: vm ? vm.rng !== null : false });
  const rng = text(vm?.rng ?? '', { placeholder: 'options, e.g. bw=1M (optional)' });
  const balloonOn = h('input', { type: 'checkbox', id: 'f-balloon-on', checked: vm ? vm.balloon !== null : false });
  const balloon = text(vm?.balloon ?? '', { placeholder: 'options, e.g. target=128 (optional)' });

  const kernelBox = h(
    'div',
    { class: 'group', id: 'kernel-fields' },
    field('kernel', 'Kernel', kernel, 'Absolute path on the daemon\u2019s host: ELF vmlinux or bzImage.'),
    field('initrd', 'Initrd (optional)', initrd),
  );
  const imageBox = h('div', { class: 'group', id: 'image-fields' }, field('image', 'Guest kit directory', image, 'Absolute path of a kit made by `vireo image build --out DIR`.'));
  const syncSource = (): void => {
    kernelBox.hidden = !srcKernel.checked;
    imageBox.hidden = srcKernel.checked;
  };
  srcImage.addEventListener('change', syncSource);
  srcKernel.addEventListener('change', syncSource);
  syncSource();
  const syncToggles = (): void => {
    rng.disabled = !rngOn.checked || !mayChange;
    balloon.disabled = !balloonOn.checked || !mayChange;
  };
  rngOn.addEventListener('change', syncToggles);
  balloonOn.addEventListener('change', syncToggles);

  const submit = h('button', { type: 'submit', class: 'primary', disabled: !mayChange }, editing ? 'Save changes' : 'Create VM');
  const form = h(
    'form',
    { class: 'vm-form', novalidate: true, 'aria-labelledby': 'form-h' },
    err('form'),
    h(
      'fieldset',
      {},
      h('legend', {}, 'Identity and boot'),
      field('name', 'Name', name, editing ? 'A VM keeps its name.' : 'Letters, digits, \u2018-\u2019, \u2018_\u2019 and \u2018.\u2019; up to 63 characters.'),
      h(
        'fieldset',
        { class: 'radios' },
        h('legend', {}, 'Boot from'),
        h('label', { for: 'src-image' }, srcImage, ' a guest kit'),
        h('label', { for: 'src-kernel' }, srcKernel, ' a kernel (and initrd)'),
      ),
      imageBox,
      kernelBox,
      field('cmdline', 'Kernel command line (optional)', cmdline, 'Replaces the kit\u2019s command line when set.'),
    ),
    h('fieldset', {}, h('legend', {}, 'Resources'), field('vcpus', 'vCPUs', vcpus), field('memory_mib', 'Memory (MiB)', memory), field('accel', 'Accelerator', accel, 'auto: KVM when it can run the guest at hardware speed, the emulator otherwise.')),
    h(
      'fieldset',
      {},
      h('legend', {}, 'Devices'),
      field('disks', 'Disks (one per line)', disks, 'vireo run --disk options, e.g. path=/srv/web.qcow2,id=root'),
      field('nets', 'Network interfaces (one per line)', nets, 'vireo run --net options, e.g. tap=tap0 (a MAC is fixed when none is given)'),
      field('vsock', 'vsock (optional)', vsock),
      h('div', { class: 'toggle' }, h('label', { for: 'f-rng-on' }, rngOn, ' Random number generator')),
      field('rng', 'RNG options', rng),
      h('div', { class: 'toggle' }, h('label', { for: 'f-balloon-on' }, balloonOn, ' Memory balloon')),
      field('balloon', 'Balloon options', balloon),
    ),
    h('div', { class: 'buttons' }, submit, h('a', { class: 'button', href: vm ? `/vms/${encodeURIComponent(vm.name)}` : '/', 'data-nav': '' }, 'Cancel')),
  );
  if (!mayChange) {
    for (const el of form.querySelectorAll<HTMLInputElement>('input, select, textarea')) el.disabled = true;
  }
  syncToggles();

  const clearErrors = (): void => {
    for (const [, e] of errs) e.textContent = '';
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  };
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clearErrors();
    const opt = (el: HTMLInputElement): string | null => (el.value.trim() === '' ? null : el.value.trim());
    const lines = (t: HTMLTextAreaElement): string[] => t.value.split('\n').map((l) => l.trim()).filter(Boolean);
    const int = (el: HTMLInputElement): number => (el.value.trim() === '' ? NaN : Number(el.value));
    const body: Record<string, unknown> = {
      vcpus: int(vcpus),
      memory_mib: int(memory),
      accel: accel.value,
      image: srcKernel.checked ? null : opt(image),
      kernel: srcKernel.checked ? opt(kernel) : null,
      initrd: srcKernel.checked ? opt(initrd) : null,
      cmdline: opt(cmdline),
      disks: lines(disks),
      nets: lines(nets),
      vsock: opt(vsock),
      rng: rngOn.checked ? rng.value.trim() : null,
      balloon: balloonOn.checked ? balloon.value.trim() : null,
    };
    // Numbers the browser could not parse go to the API as-is, so its
    // message names the field (JSON has no NaN: send the text).
    for (const [k, el] of [['vcpus', vcpus], ['memory_mib', memory]] as const) {
      if (!Number.isInteger(body[k])) body[k] = el.value;
    }
    if (!editing) {
      body.name = name.value.trim();
      for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
    }
    submit.disabled = true;
    try {
      const saved = editing ? await call<Vm>('PATCH', vmPath(vm.name), body) : await call<Vm>('POST', '/v1/vms', body);
      say(editing ? `Saved ${saved.name}` : `Created ${saved.name}`, 'ok');
      navigate(`/vms/${encodeURIComponent(saved.name)}`);
    } catch (e) {
      let f: string | null = e instanceof ApiError ? e.field : null;
      if (f === 'kernel' && !srcKernel.checked) f = 'image';
      const target = f && errs.has(f as Field) ? (f as Field) : 'form';
      const box = errs.get(target);
      if (box) box.textContent = errText(e);
      const control = target === 'form' ? null : form.querySelector<HTMLElement>(`#f-${target}`);
      if (control) {
        control.setAttribute('aria-invalid', 'true');
        if (control instanceof HTMLInputElement && control.disabled && target === 'rng') rngOn.focus();
        else control.focus();
      } else {
        box?.setAttribute('role', 'alert');
      }
    } finally {
      submit.disabled = !mayChange;
    }
  });

  const title = editing ? `Edit ${vm.name}` : 'New VM';
  const why = !canAdmin() ? `Your role (${role}) cannot ${editing ? 'edit' : 'create'} VMs.` : vm && !mayChange ? `${vm.name} is ${vm.state}: stop it to edit its definition.` : null;
  append(main, h('div', { class: 'titlebar' }, h('h1', { id: 'form-h', tabindex: '-1' }, title)), why ? h('p', { class: 'note' }, why) : null, form);
}

// ---------------------------------------------------------------- console wall

async function wallPage(): Promise<void> {
  const params = new URLSearchParams(location.search);
  const chosen = new Set((params.get('vms') ?? '').split(',').map((s) => s.trim()).filter(Boolean));
  let vms: Vm[] = [];
  try {
    vms = (await call<{ vms: Vm[] }>('GET', '/v1/vms')).vms;
  } catch (e) {
    say(`Cannot list VMs: ${errText(e)}`, 'error');
  }
  if (chosen.size === 0) for (const v of vms) if (v.state === 'running' || v.state === 'paused') chosen.add(v.name);
  const grid = h('div', { class: 'wall', 'data-testid': 'wall' });
  const tiles = new Map<string, { el: HTMLElement; con: ConsoleView }>();
  const picker = h('fieldset', { class: 'picker' }, h('legend', {}, 'Consoles on the wall'));
  const syncUrl = (): void => {
    const names = [...tiles.keys()];
    history.replaceState(null, '', `/wall${names.length ? `?vms=${names.map(encodeURIComponent).join(',')}` : ''}`);
    grid.dataset.count = String(names.length);
  };
  const add = (name: string): void => {
    if (tiles.has(name)) return;
    const status = h('span', { class: 'console-status' });
    const con = new ConsoleView({ name, readOnly: !canOperate(), fontSize: 12, onStatus: (t) => (status.textContent = t) });
    const el = h(
      'section',
      { class: 'tile', 'aria-label': `Console of ${name}`, 'data-vm': name },
      h('div', { class: 'tile-head' }, h('h2', {}, h('a', { href: `/vms/${encodeURIComponent(name)}`, 'data-nav': '' }, name)), status),
      con.el,
    );
    grid.append(el);
    con.start();
    tiles.set(name, { el, con });
    syncUrl();
  };
  const remove = (name: string): void => {
    const t = tiles.get(name);
    if (!t) return;
    t.con.dispose();
    t.el.remove();
    tiles.delete(name);
    syncUrl();
  };
  for (const v of vms) {
    const box = h('input', { type: 'checkbox', id: `wall-${v.name}`, checked: chosen.has(v.name) });
    box.addEventListener('change', () => (box.checked ? add(v.name) : remove(v.name)));
    append(picker, h('label', { for: `wall-${v.name}`, class: 'pick' }, box, ` ${v.name} `, stateBadge(v.state)));
  }
  if (vms.length === 0) append(picker, h('p', {}, 'No VMs.'));
  append(
    main,
    h('div', { class: 'titlebar' }, heading('Console wall')),
    h('p', { class: 'hint' }, 'The serial consoles of the chosen VMs, side by side. Click a console to type into it', canOperate() ? '.' : ' (read-only for your role).'),
    picker,
    grid,
  );
  for (const n of chosen) if (vms.some((v) => v.name === n)) add(n);
  // Reconnect the consoles of VMs that started again.
  every(3000, () => {
    if (![...tiles.values()].some((t) => t.con.ended)) return;
    call<{ vms: Vm[] }>('GET', '/v1/vms')
      .then((l) => {
        for (const v of l.vms) if (v.state === 'running' || v.state === 'paused') tiles.get(v.name)?.con.reconnect();
      })
      .catch(() => {});
  });
  teardown.push(() => {
    for (const n of [...tiles.keys()]) remove(n);
  });
}

// ---------------------------------------------------------------- login

function loginPage(message?: string): void {
  for (const t of teardown) t();
  teardown = [];
  clear(app);
  const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true, 'aria-describedby': 'token-hint login-error' });
  const error = h('p', { id: 'login-error', class: 'field-error', role: 'alert' }, message ?? '');
  const form = h(
    'form',
    { class: 'login', 'aria-labelledby': 'login-h' },
    h('h1', { id: 'login-h' }, 'vireo'),
    h('p', {}, 'Log in with an API token.'),
    h('div', { class: 'field' }, h('label', { for: 'token' }, 'API token'), input, h('p', { id: 'token-hint', class: 'hint' }, 'An admin makes one with ', h('code', {}, 'vireo token create --role viewer'), '.'), error),
    h('button', { type: 'submit', class: 'primary' }, 'Log in'),
  );
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    error.textContent = '';
    const t = input.value.trim();
    if (!t) {
      error.textContent = 'Enter a token.';
      input.focus();
      return;
    }
    setToken(t);
    try {
      if ((await identify()) === 'unauthorized') {
        setToken(null);
        error.textContent = 'The daemon refused this token (unknown or revoked).';
        input.focus();
        return;
      }
    } catch (e) {
      setToken(null);
      error.textContent = errText(e);
      return;
    }
    if (location.pathname === '/login') history.replaceState(null, '', '/');
    shell();
    void route();
  });
  append(app, h('main', { id: 'main', class: 'login-page' }, form));
  input.focus();
}

function logout(): void {
  setToken(null);
  who = null;
  loginPage();
}

// ---------------------------------------------------------------- start

async function boot(): Promise<void> {
  takeTokenFromHash();
  onUnauthorized(() => {
    if (!document.getElementById('login-h')) {
      setToken(null);
      loginPage('The daemon no longer accepts your token (revoked?); log in again.');
    }
  });
  try {
    if ((await identify()) === 'unauthorized') {
      const had = token() !== null;
      setToken(null);
      loginPage(had ? 'Your token was refused (unknown or revoked); log in again.' : undefined);
      return;
    }
  } catch (e) {
    clear(app);
    append(app, h('main', { id: 'main' }, h('h1', {}, 'vireo'), h('p', { class: 'msg msg-error', role: 'alert' }, `Cannot reach the daemon: ${errText(e)}`)));
    return;
  }
  shell();
  await route();
}

void boot();
