// The create and edit forms of a VM definition.

import { ApiError, call, vmPath, type Vm } from '../api';
import { append, h } from '../dom';
import { errText, heading, main, say } from '../layout';
import { navigate } from '../router';
import { canAdmin, session } from '../session';

const FIELDS = ['name', 'image', 'kernel', 'initrd', 'cmdline', 'vcpus', 'memory_mib', 'accel', 'disks', 'nets', 'vsock', 'rng', 'balloon'] as const;
type Field = (typeof FIELDS)[number];

export async function editPage(name: string): Promise<void> {
  try {
    formPage(await call<Vm>('GET', vmPath(name)));
  } catch (e) {
    append(main, heading(`Edit ${name}`), h('p', { class: 'msg msg-error', role: 'alert' }, errText(e)));
  }
}

export function formPage(vm: Vm | null): void {
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
  const why = !canAdmin() ? `Your role (${session.role}) cannot ${editing ? 'edit' : 'create'} VMs.` : vm && !mayChange ? `${vm.name} is ${vm.state}: stop it to edit its definition.` : null;
  append(main, h('div', { class: 'titlebar' }, h('h1', { id: 'form-h', tabindex: '-1' }, title)), why ? h('p', { class: 'note' }, why) : null, form);
}
