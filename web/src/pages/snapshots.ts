// A VM's snapshots panel: take, restore, clone, delete.

import { ApiError, call, vmPath, type Snapshot, type SnapshotList, type Vm } from '../api';
import { confirmDialog, promptDialog } from '../dialogs';
import { clear, fmtBytes, h } from '../dom';
import { errText, say } from '../layout';
import { canAdmin, canOperate, session } from '../session';


/** The VM page's Snapshots panel: list, take, restore, clone, delete. */
export function snapshotsPanel(name: string, current: () => Vm, after: () => void): { el: HTMLElement; refresh: () => Promise<void> } {
  const tag = h('input', { type: 'text', id: 'snap-tag', autocomplete: 'off', placeholder: 'default: the UTC time', pattern: '[A-Za-z0-9._-]{1,64}', disabled: !canOperate() });
  const take = h('button', { type: 'button', class: 'small', disabled: !canOperate(), title: canOperate() ? null : `Your role (${session.role}) cannot take snapshots` }, 'Take snapshot');
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
      const restore = button('Restore', `Restore ${name} from ${t}`, canOperate(), `Your role (${session.role}) cannot restore snapshots`);
      const clone = button('Clone', `Clone ${name} from ${t}`, canAdmin(), `Your role (${session.role}) cannot clone VMs`);
      const del = button('Delete', `Delete snapshot ${t}`, canAdmin() && s.clones.length === 0, s.clones.length ? `Clones depend on it: ${s.clones.join(', ')}` : `Your role (${session.role}) cannot delete snapshots`, true);
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
      render((await call<SnapshotList>('GET', vmPath(name, '/snapshots'))).snapshots);
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
