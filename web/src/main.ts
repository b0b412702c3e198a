// The vireo web UI: VM list with live charts, create/edit forms, power
// actions, live serial consoles and a console wall, one module per page
// (pages/) over a small router (router.ts). It only calls the public REST
// API (see daemon/openapi.json; api.ts has its generated types) with the
// session's token.

import '@xterm/xterm/css/xterm.css';
import './style.css';
import { onUnauthorized, setToken, takeTokenFromHash, token } from './api';
import { append, clear, h } from './dom';
import { app, errText, shell } from './layout';
import { loginPage } from './pages/login';
import { route } from './router';
import { identify } from './session';

async function boot(): Promise<void> {
  takeTokenFromHash();
  onUnauthorized(() => {
    if (!document.getElementById('login-h')) {
      setToken(null);
      loginPage('The daemon no longer accepts your token (revoked?); log in again.');
    }
  });
  try {
    if ((await identify()) === 'unauthorized') {
      const had = token() !== null;
      setToken(null);
      loginPage(had ? 'Your token was refused (unknown or revoked); log in again.' : undefined);
      return;
    }
  } catch (e) {
    clear(app);
    append(app, h('main', { id: 'main' }, h('h1', {}, 'vireo'), h('p', { class: 'msg msg-error', role: 'alert' }, `Cannot reach the daemon: ${errText(e)}`)));
    return;
  }
  shell();
  await route();
}

void boot();
