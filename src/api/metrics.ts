import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { isTerminal, JOB_STATES, type JobRecord } from '../jobs/model.js';
import type { JobStore } from '../jobs/store.js';

/**
 * Prometheus metrics. Job counts are read from the store at scrape time, so they are right whichever
 * process ran the jobs; byte and duration figures are taken from the store's change events, which reach
 * this process from every worker.
 */
export function createMetrics(store: JobStore): { registry: Registry; stop: () => void } {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'ferry_' });
  new Gauge({
    name: 'ferry_jobs',
    help: 'Jobs by state',
    labelNames: ['state'],
    registers: [registry],
    async collect() {
      for (const state of JOB_STATES) this.set({ state }, (await store.list({ state, offset: 0, limit: 0 })).total);
    },
  });
  const bytes = new Counter({ name: 'ferry_job_bytes_converted_total', help: 'Disk bytes processed by completed jobs', labelNames: ['type'], registers: [registry] });
  const finished = new Counter({ name: 'ferry_jobs_finished_total', help: 'Jobs that reached a final state', labelNames: ['type', 'state'], registers: [registry] });
  const duration = new Histogram({
    name: 'ferry_job_duration_seconds',
    help: 'Time from a job starting to its final state',
    labelNames: ['type', 'state'],
    buckets: [0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600],
    registers: [registry],
  });
  const stop = store.subscribe((record: JobRecord) => {
    if (!isTerminal(record.state)) return;
    finished.inc({ type: record.type, state: record.state });
    if (record.state === 'completed') bytes.inc({ type: record.type }, record.progress.done);
    if (record.startedAt && record.finishedAt) {
      duration.observe({ type: record.type, state: record.state }, (Date.parse(record.finishedAt) - Date.parse(record.startedAt)) / 1000);
    }
  });
  return { registry, stop };
}
