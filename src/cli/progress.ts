import type { Progress } from '../convert/pipeline.js';
import { formatSize } from '../util/size.js';

export type ProgressMode = 'none' | 'bar' | 'json';

export interface ProgressReporter {
  update(p: Progress): void;
  done(p: Progress): void;
}

/** Draws a bar on a terminal (stderr), steady percentages elsewhere, or JSON lines on stdout for programs. */
export function createProgress(mode: ProgressMode, label: string): ProgressReporter {
  if (mode === 'none') return { update: () => undefined, done: () => undefined };
  const started = performance.now();
  let lastDraw = 0;
  let lastPercentStep = -1;
  const rate = (p: Progress) => p.done / Math.max(0.001, (performance.now() - started) / 1000);
  const eta = (p: Progress) => (p.done > 0 ? ((p.total - p.done) / rate(p)) : undefined);

  if (mode === 'json') {
    const emit = (type: string, p: Progress) => {
      const seconds = eta(p);
      process.stdout.write(
        JSON.stringify({
          type,
          operation: label,
          done: p.done,
          total: p.total,
          percent: p.total ? Math.round((p.done / p.total) * 10000) / 100 : 100,
          bytesRead: p.bytesRead,
          bytesWritten: p.bytesWritten,
          rate: Math.round(rate(p)),
          eta: seconds === undefined ? null : Math.round(seconds * 10) / 10,
        }) + '\n',
      );
    };
    return {
      update(p) {
        const now = performance.now();
        if (now - lastDraw < 250) return;
        lastDraw = now;
        emit('progress', p);
      },
      done: (p) => emit('done', p),
    };
  }

  const tty = process.stderr.isTTY === true;
  const draw = (p: Progress, final: boolean) => {
    const pct = p.total ? (p.done / p.total) * 100 : 100;
    if (!tty) {
      const step = Math.floor(pct / 10);
      if (step !== lastPercentStep || final) process.stderr.write(`    (${pct.toFixed(2)}/100%)\n`);
      lastPercentStep = step;
      return;
    }
    const width = Math.max(10, Math.min(40, (process.stderr.columns ?? 80) - 50));
    const filled = Math.round((pct / 100) * width);
    const seconds = eta(p);
    const etaText = final ? `${((performance.now() - started) / 1000).toFixed(1)}s` : seconds === undefined ? '--' : `ETA ${Math.ceil(seconds)}s`;
    process.stderr.write(`\r${label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct.toFixed(1).padStart(5)}%  ${formatSize(Math.round(rate(p)))}/s  ${etaText}   ${final ? '\n' : ''}`);
  };
  return {
    update(p) {
      const now = performance.now();
      if (now - lastDraw < 100) return;
      lastDraw = now;
      draw(p, false);
    },
    done: (p) => draw(p, true),
  };
}
