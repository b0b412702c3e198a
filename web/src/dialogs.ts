// Modal dialogs: confirm an action, ask for a name.

import { h } from './dom';

/** A modal confirmation (Esc or Cancel: no). */
export function confirmDialog(title: string, text: string, confirmLabel: string): Promise<boolean> {
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

/** Ask for a new VM's name in a modal dialog; null when cancelled. */
export function promptDialog(title: string, label: string, confirmLabel: string): Promise<string | null> {
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
