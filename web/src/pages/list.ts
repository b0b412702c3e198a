// The VM list: every VM with its state, live charts and actions.

import { ApiError, call, type Stats, type Vm, type VmList } from '../api';
import { actionButtons, uptime } from '../actions';
import { append, fmtBytes, fmtDuration, fmtRate, h } from '../dom';
import { errText, heading, main, say, stateBadge } from '../layout';
import { every, navigate, onVmEvents } from '../router';
import { canAdmin, session } from '../session';
import { addStats, chartCell, statsState } from '../stats';

const selectedForWall = new Set<string>();

export function listPage(): void {
  const wallBtn = h('button', { type: 'button', id: 'open-wall' }, 'Open console wall');
  wallBtn.addEventListener('click', () => {
    const names = [...selectedForWall];
    navigate(`/wall${names.length ? `?vms=${names.map(encodeURIComponent).join(',')}` : ''}`);
  });
  const newBtn = canAdmin()
    ? h('a', { class: 'button primary', href: '/vms/new', 'data-nav': '' }, 'New VM')
    : h('button', { type: 'button', class: 'primary', disabled: true, title: `Your role (${session.role}) cannot create VMs` }, 'New VM');
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
        call<VmList>('GET', '/v1/vms'),
        call<Stats>('GET', '/v1/stats').catch((e: unknown) => {
          if (e instanceof ApiError && e.status === 404) statsState.available = false;
          return null;
        }),
      ]);
      if (stats) {
        statsState.available = true;
        addStats(stats, new Map(list.vms.map((v) => [v.name, v.vcpus])));
      }
      note.hidden = statsState.available !== false;
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
