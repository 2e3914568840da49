// npm run bench [-- --runs N] [-- --suite NAME] [-- --only TEXT]: runs the benchmark suites (convert, jobs,
// live, capture, inject; all by default) and records their figures in docs/benchmarks.md. Needs a built
// tree (npm run setup) and the peers each suite compares against. --only picks convert rows by name and
// publishes nothing.
const args = process.argv.slice(2);
const value = (flag) => {
  const i = args.indexOf(flag);
  return i >= 0 ? args[i + 1] : undefined;
};
const runs = Number(value('--runs') ?? 5);
const only = value('--only');
const suite = value('--suite') ?? (only ? 'convert' : undefined);

const suites = {
  convert: async () => (await import('./convert.js')).runConvertBench({ runs, only }),
  jobs: async () => (await import('./jobs.js')).runJobsBench(),
  live: async () => (await import('./live.js')).runLiveBench(),
  capture: async () => (await import('./capture.js')).runCaptureBench({ runs: Math.min(runs, 3) }),
  inject: async () => (await import('./inject.js')).runInjectBench({ runs: Math.min(runs, 2) }),
};
if (suite && !suites[suite]) throw new Error(`unknown suite '${suite}' (suites: ${Object.keys(suites).join(', ')})`);
for (const [name, run] of Object.entries(suites)) if (!suite || suite === name) await run();
