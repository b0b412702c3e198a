// The session: who the UI acts as, from GET /v1/whoami.

import { ApiError, call, type Role, type WhoAmI } from './api';

/** Who the UI acts as: the token's role (admin without tokens). */
export const session: { role: Role; who: WhoAmI | null } = { role: 'viewer', who: null };

/** Operator actions: start/stop/pause/resume/reboot, typing in consoles. */
export const canOperate = (): boolean => session.role === 'operator' || session.role === 'admin';
/** Admin actions: create, edit, delete. */
export const canAdmin = (): boolean => session.role === 'admin';

export type Identity = 'ok' | 'unauthorized';

export async function identify(): Promise<Identity> {
  try {
    session.who = await call<WhoAmI>('GET', '/v1/whoami');
    session.role = session.who.role;
    return 'ok';
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return 'unauthorized';
    if (e instanceof ApiError && e.status === 404) {
      // A daemon without tokens (Unix socket only): every caller is admin.
      session.who = null;
      session.role = 'admin';
      return 'ok';
    }
    throw e;
  }
}
