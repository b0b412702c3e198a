// The page frame (header, navigation, status line, main area) and the small
// pieces every page uses.

import { ApiError } from './api';
import { append, clear, h } from './dom';
import { logout } from './pages/login';
import { session } from './session';

export const app = document.getElementById('app') as HTMLDivElement;
/** The page's content area (pages append to it; replaced by shell()). */
export let main: HTMLElement;
let statusEl: HTMLElement;

export function shell(): void {
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
      { class: `role role-${session.role}`, 'data-testid': 'role', title: session.who?.token ? `token ${session.who.token.name}` : 'Unix socket' },
      `Role: ${session.role}`,
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

export function markNav(): void {
  for (const a of app.querySelectorAll<HTMLAnchorElement>('nav a')) {
    const here = a.getAttribute('href') === location.pathname || (a.getAttribute('href') === '/' && location.pathname === '/vms');
    if (here) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

/** Show a message in the status line (errors are announced assertively). */
export function say(text: string, kind: 'info' | 'error' | 'ok' = 'info'): void {
  clear(statusEl);
  if (!text) return;
  statusEl.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  append(
    statusEl,
    h('p', { class: `msg msg-${kind}` }, text, h('button', { type: 'button', class: 'ghost small', 'aria-label': 'Dismiss message', onclick: () => clear(statusEl) }, '×')),
  );
}

export function errText(e: unknown): string {
  if (e instanceof ApiError) return e.message;
  return e instanceof Error ? e.message : String(e);
}

export function heading(text: string, ...extra: (Node | string)[]): HTMLHeadingElement {
  return h('h1', { tabindex: '-1' }, text, ...extra);
}

export function stateBadge(state: string): HTMLSpanElement {
  return h('span', { class: `badge state-${state}`, 'data-state': state }, state);
}
