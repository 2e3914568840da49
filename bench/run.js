// npm run bench [-- --runs N] [-- --only TEXT]: runs every benchmark suite and records the figures in
// docs/benchmarks.md. Needs a built tree (npm run setup) and the peers it compares against (qemu-img).
import { runConvertBench } from './convert.js';

const args = process.argv.slice(2);
const value = (flag) => {
  const i = args.indexOf(flag);
  return i >= 0 ? args[i + 1] : undefined;
};
const runs = Number(value('--runs') ?? 5);
const only = value('--only');

await runConvertBench({ runs, only });
await (await import('./jobs.js')).runJobsBench();
await (await import('./live.js')).runLiveBench();
await (await import('./capture.js')).runCaptureBench({ runs: Math.min(runs, 3) });
await (await import('./inject.js')).runInjectBench({ runs: Math.min(runs, 2) });
