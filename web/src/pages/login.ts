// The login page (a token, kept for the browser session) and logging out.

import { setToken } from '../api';
import { append, clear, h } from '../dom';
import { app, errText, shell } from '../layout';
import { leavePage, route } from '../router';
import { identify, session } from '../session';

export function loginPage(message?: string): void {
  leavePage();
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

export function logout(): void {
  setToken(null);
  session.who = null;
  loginPage();
}
