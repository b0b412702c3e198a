// A small router: paths to pages (History API), and what a page starts
// (timers, event streams) ends when it is left.

import { streamUrl } from './api';
import { append, clear, h } from './dom';
import { heading, main, markNav, shell } from './layout';
import { formPage, editPage } from './pages/form';
import { detailPage } from './pages/vm';
import { listPage } from './pages/list';
import { wallPage } from './pages/wall';

let teardown: (() => void)[] = [];

export function navigate(path: string): void {
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

/** The pages by path; a page's parameters are its pattern's groups (URI-decoded). */
const ROUTES: [RegExp, (...params: string[]) => void | Promise<void>][] = [
  [/^\/(?:vms|index\.html)?$/, listPage],
  [/^\/vms\/new$/, () => formPage(null)],
  [/^\/vms\/([^/]+)\/edit$/, editPage],
  [/^\/vms\/([^/]+)$/, detailPage],
  [/^\/wall$/, wallPage],
];

/** Tear the current page down (its timers, streams and consoles). */
export function leavePage(): void {
  for (const t of teardown) t();
  teardown = [];
}

/** Run `f` when the current page is left. */
export function onLeave(f: () => void): void {
  teardown.push(f);
}

export async function route(): Promise<void> {
  leavePage();
  if (!main || !main.isConnected) shell();
  clear(main);
  markNav();
  const p = location.pathname;
  const found = ROUTES.map(([re, page]) => [re.exec(p), page] as const).find(([m]) => m);
  if (found) {
    const [m, page] = found;
    await page(...(m?.slice(1) ?? []).map(decodeURIComponent));
  } else {
    append(main, heading('Page not found'), h('p', {}, 'There is nothing at ', h('code', {}, p), '. ', h('a', { href: '/', 'data-nav': '' }, 'Back to the VM list')));
  }
  const h1 = main.querySelector<HTMLElement>('h1');
  document.title = h1?.textContent ? `${h1.textContent.trim()} · vireo` : 'vireo';
  h1?.focus({ preventScroll: true });
}

export function every(ms: number, f: () => void): void {
  const id = window.setInterval(f, ms);
  onLeave(() => clearInterval(id));
}

/** Subscribe to the daemon's event stream; `onVm` runs on every VM state change. */
export function onVmEvents(onVm: () => void): void {
  if (typeof EventSource === 'undefined') return;
  const es = new EventSource(streamUrl('/v1/events', false));
  es.addEventListener('vm', () => onVm());
  es.onerror = () => {
    // No event stream (older daemon) or a denied token: polling still runs.
    if (es.readyState === EventSource.CLOSED) es.close();
  };
  onLeave(() => es.close());
}
