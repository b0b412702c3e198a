// The VM list's live charts: per-VM histories of /v1/stats samples.

import type { Stats } from './api';
import { h, sparkline } from './dom';

interface Sample {
  cpu: number | null; // % of the VM's vCPUs
  mem: number | null; // bytes resident
  disk: number | null; // bytes/s read + written
  net: number | null; // bytes/s received + sent
}

const HISTORY = 60;
const history_ = new Map<string, Sample[]>();
let lastStats: Stats | null = null;
/** Whether the daemon reports statistics (null: not known yet). */
export const statsState: { available: boolean | null } = { available: null };

function rate(cur: number | null, prev: number | null, dt: number): number | null {
  if (cur === null || prev === null || dt <= 0) return null;
  return Math.max(0, (cur - prev) / dt);
}

const sum = (a: number | null, b: number | null): number | null => (a === null && b === null ? null : (a ?? 0) + (b ?? 0));

/** Fold a /v1/stats sample into the per-VM histories (rates from the previous sample). */
export function addStats(s: Stats, vcpus: Map<string, number>): void {
  const prev = new Map((lastStats?.vms ?? []).map((v) => [v.name, v]));
  const dt = lastStats ? s.time - lastStats.time : 0;
  for (const v of s.vms) {
    const p = prev.get(v.name);
    const active = v.state === 'running' || v.state === 'paused';
    let sample: Sample = { cpu: null, mem: active ? v.memory_rss_bytes : null, disk: null, net: null };
    if (p && active) {
      const cpu = rate(v.cpu_seconds, p.cpu_seconds, dt);
      sample = {
        cpu: cpu === null ? null : (cpu * 100) / Math.max(1, vcpus.get(v.name) ?? 1),
        mem: v.memory_rss_bytes,
        disk: rate(sum(v.disk_read_bytes, v.disk_write_bytes), sum(p.disk_read_bytes, p.disk_write_bytes), dt),
        net: rate(sum(v.net_rx_bytes, v.net_tx_bytes), sum(p.net_rx_bytes, p.net_tx_bytes), dt),
      };
    }
    const hist = history_.get(v.name) ?? [];
    hist.push(sample);
    while (hist.length > HISTORY) hist.shift();
    history_.set(v.name, hist);
  }
  lastStats = s;
}

export function chartCell(name: string, key: keyof Sample, label: string, fmt: (n: number | null) => string, max?: number): HTMLTableCellElement {
  const hist = history_.get(name) ?? [];
  const values = hist.map((s) => s[key]);
  const last = values.length ? values[values.length - 1] : null;
  const text = statsState.available === false ? 'n/a' : fmt(last);
  return h('td', { class: 'chart', 'data-chart': key }, sparkline(values, `${label} of ${name}: ${text}`, max), h('span', { class: 'num' }, text));
}
