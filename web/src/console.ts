// A live serial console: xterm.js over the daemon's console WebSocket
// (GET /v1/vms/{name}/console/ws). The server sends the scrollback first as
// one binary frame, then every output chunk; what is typed goes back as
// binary frames (refused by the server for viewer tokens, and not sent at all
// here when the UI knows the role is viewer).

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { streamUrl, token, vmPath } from './api';
import { h } from './dom';

export interface ConsoleOptions {
  name: string;
  readOnly: boolean;
  /** Called with a short status line ("connected", "VM stopped", ...). */
  onStatus?: (text: string) => void;
  fontSize?: number;
}

export class ConsoleView {
  readonly el: HTMLDivElement;
  readonly term: Terminal;
  private fit = new FitAddon();
  private ws: WebSocket | null = null;
  private resize: ResizeObserver;
  private closed = false;
  private opened = false;
  /** The VM stopped (the server said so): no reconnecting until reconnect(). */
  ended = false;
  private retry: number | null = null;

  constructor(private opts: ConsoleOptions) {
    this.el = h('div', {
      class: 'term',
      'data-vm': opts.name,
      role: 'region',
      'aria-label': `Serial console of ${opts.name}${opts.readOnly ? ' (read-only)' : ''}`,
    });
    this.term = new Terminal({
      convertEol: false,
      cursorBlink: !opts.readOnly,
      disableStdin: opts.readOnly,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace',
      fontSize: opts.fontSize ?? 14,
      scrollback: 5000,
      screenReaderMode: false,
      theme: { background: '#0b0f14', foreground: '#e6edf3', cursor: '#7ee787' },
    });
    this.term.loadAddon(this.fit);
    this.resize = new ResizeObserver(() => this.fitNow());
  }

  /** Put the terminal in the page (the element must be attached) and connect. */
  start(): void {
    this.term.open(this.el);
    // Tab belongs to the guest's shell; Shift+Tab leaves the console, so the
    // keyboard is never trapped in it.
    this.term.attachCustomKeyEventHandler((e) => !(e.key === 'Tab' && e.shiftKey));
    this.term.textarea?.setAttribute('aria-label', `Console input for ${this.opts.name}`);
    this.resize.observe(this.el);
    this.fitNow();
    if (!this.opts.readOnly) {
      this.term.onData((data) => this.send(data));
    }
    this.connect();
  }

  focus(): void {
    this.term.focus();
  }

  private fitNow(): void {
    if (this.closed || this.el.clientWidth === 0 || this.el.clientHeight === 0) return;
    try {
      this.fit.fit();
    } catch {
      /* not laid out yet */
    }
  }

  private status(text: string): void {
    this.opts.onStatus?.(text);
  }

  private send(data: string): void {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(new TextEncoder().encode(data));
    }
  }

  private connect(): void {
    if (this.closed) return;
    this.retry = null;
    this.status('connecting…');
    const ws = new WebSocket(streamUrl(vmPath(this.opts.name, '/console/ws'), true));
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let first = true;
    ws.onopen = () => {
      this.opened = true;
      this.status(this.opts.readOnly ? 'connected (read-only)' : 'connected');
    };
    ws.onmessage = (ev: MessageEvent) => {
      if (ev.data instanceof ArrayBuffer) {
        if (first) {
          // A reconnect gets the scrollback again: start from a clean screen.
          this.term.reset();
          first = false;
        }
        this.term.write(new Uint8Array(ev.data));
        return;
      }
      this.control(String(ev.data));
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed || this.ended) return;
      if (!this.opened) {
        // No live console (older daemon, or the VM has no process): show the
        // scrollback the daemon keeps, read-only.
        void this.scrollbackOnly();
        return;
      }
      this.opened = false;
      this.status('disconnected; reconnecting…');
      this.retry = window.setTimeout(() => this.connect(), 2000);
    };
  }

  private control(text: string): void {
    let msg: { event?: string; reason?: string; error?: { message?: string } };
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.error) {
      this.status(msg.error.message ?? 'console error');
    } else if (msg.event === 'stopped') {
      this.status(`VM stopped${msg.reason ? `: ${msg.reason}` : ''}`);
      this.term.write(`\r\n\x1b[2m[vireo: the VM stopped${msg.reason ? ` (${msg.reason})` : ''}]\x1b[0m\r\n`);
      this.opened = false;
      this.ended = true;
    }
  }

  /** Connect again (after the VM stopped and started again). */
  reconnect(): void {
    if (this.closed || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    this.ended = false;
    if (this.retry !== null) clearTimeout(this.retry);
    this.retry = null;
    this.connect();
  }

  private async scrollbackOnly(): Promise<void> {
    try {
      const text = await fetchText(vmPath(this.opts.name, '/console'));
      this.term.reset();
      this.term.write(text.replace(/\r?\n/g, '\r\n'));
      this.status('no live console: showing the scrollback');
    } catch (e) {
      this.status(`console unavailable: ${(e as Error).message}`);
    }
    if (!this.closed) this.retry = window.setTimeout(() => this.connect(), 5000);
  }

  dispose(): void {
    this.closed = true;
    if (this.retry !== null) clearTimeout(this.retry);
    this.resize.disconnect();
    this.ws?.close();
    this.term.dispose();
  }
}

async function fetchText(path: string): Promise<string> {
  // The scrollback is text/plain, not JSON.
  const headers: Record<string, string> = {};
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const res = await fetch(path, { headers, cache: 'no-store' });
  const body = await res.text();
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    try {
      msg = JSON.parse(body).error.message ?? msg;
    } catch {
      /* not JSON */
    }
    throw new Error(msg);
  }
  return body;
}
