// A VM's power actions (start, stop, pause, ...) as buttons, by role.

import { call, vmPath, type Vm } from './api';
import { confirmDialog } from './dialogs';
import { h } from './dom';
import { errText, say } from './layout';
import { navigate } from './router';
import { canAdmin, canOperate, session } from './session';

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

export function actionButtons(vm: Vm, after: () => void): HTMLDivElement {
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
        title: ok ? null : `Your role (${session.role}) cannot ${ACTION_LABEL[a].toLowerCase()} VMs`,
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

export function uptime(vm: Vm): number | null {
  if (vm.state !== 'running' && vm.state !== 'paused') return null;
  if (typeof vm.uptime_secs === 'number') return vm.uptime_secs;
  if (!vm.started_at) return null;
  const t = Date.parse(vm.started_at);
  return Number.isNaN(t) ? null : Math.max(0, (Date.now() - t) / 1000);
}
