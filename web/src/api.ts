// The daemon's public REST API, as the UI uses it. Every call carries the
// session's token as a Bearer header (WebSocket and EventSource URLs carry it
// as ?access_token=, since browsers cannot set their headers).

import type { components } from './generated/openapi';

// The types are generated from the daemon's OpenAPI document (itself
// generated from the Rust types) by scripts/build-web: a field added in Rust
// reaches this type checker without anyone copying it.
type Schemas = components['schemas'];
export type Role = Schemas['Role'];
export type Vm = Schemas['Vm'];
export type Snapshot = Schemas['Snapshot'];
export type SnapshotList = Schemas['SnapshotList'];
export type VmList = Schemas['VmList'];
export type Stats = Schemas['StatsList'];
export type WhoAmI = Schemas['WhoAmI'];
type ErrorBody = Schemas['Error'];

/** An API error: the HTTP status and the body's code and message. */
export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }

  /** The field the message names first ("vcpus: must be ..." -> "vcpus"). */
  get field(): string | null {
    const m = /^([a-z_]+)(\[\d+\])?(\.[a-z_]+)?: /.exec(this.message);
    return m ? m[1] : null;
  }
}

const TOKEN_KEY = 'vireo.token';

export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t: string | null): void {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Take `#token=...` from the URL (how `vireo ui` hands the session over). */
export function takeTokenFromHash(): void {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    setToken(decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
}

/** Called when a request other than /v1/whoami gets 401 (token revoked). */
let unauthorized: (() => void) | null = null;

export function onUnauthorized(f: () => void): void {
  unauthorized = f;
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: 'application/json' };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res: Response;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, 'unreachable', `cannot reach the vireo daemon: ${String(e)}`);
  }
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  let json: unknown = undefined;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    /* not JSON */
  }
  if (res.status === 401 && path !== '/v1/whoami') unauthorized?.();
  if (!res.ok) {
    const err = (json as Partial<ErrorBody> | undefined)?.error;
    throw new ApiError(
      res.status,
      err?.code ?? `http_${res.status}`,
      err?.message ?? `HTTP ${res.status}: ${text.slice(0, 200)}`,
    );
  }
  return json as T;
}

/** A URL for WebSocket/EventSource, with the token in the query. */
export function streamUrl(path: string, ws: boolean): string {
  const u = new URL(path, location.href);
  if (ws) u.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const t = token();
  if (t) u.searchParams.set('access_token', t);
  return u.toString();
}

export const vmPath = (name: string, tail = ''): string =>
  `/v1/vms/${encodeURIComponent(name)}${tail}`;
