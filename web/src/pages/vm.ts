// One VM: its definition, live serial console, actions and snapshots.

import { ApiError, call, vmPath, type Vm } from '../api';
import { actionButtons, uptime } from '../actions';
import { ConsoleView } from '../console';
import { append, clear, fmtDuration, h } from '../dom';
import { errText, heading, main, say, stateBadge } from '../layout';
import { every, navigate, onLeave, onVmEvents } from '../router';
import { canOperate } from '../session';
import { snapshotsPanel } from './snapshots';

export async function detailPage(name: string): Promise<void> {
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
  onLeave(() => con.dispose());
  every(2000, () => void reload());
  every(5000, () => void snaps.refresh());
  void snaps.refresh();
  onVmEvents(() => void reload());
}
