// The console wall: the serial consoles of several VMs side by side.

import { call, type Vm, type VmList } from '../api';
import { ConsoleView } from '../console';
import { append, h } from '../dom';
import { errText, heading, main, say, stateBadge } from '../layout';
import { every, onLeave } from '../router';
import { canOperate } from '../session';

export async function wallPage(): Promise<void> {
  const params = new URLSearchParams(location.search);
  const chosen = new Set((params.get('vms') ?? '').split(',').map((s) => s.trim()).filter(Boolean));
  let vms: Vm[] = [];
  try {
    vms = (await call<VmList>('GET', '/v1/vms')).vms;
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
    call<VmList>('GET', '/v1/vms')
      .then((l) => {
        for (const v of l.vms) if (v.state === 'running' || v.state === 'paused') tiles.get(v.name)?.con.reconnect();
      })
      .catch(() => {});
  });
  onLeave(() => {
    for (const n of [...tiles.keys()]) remove(n);
  });
}
