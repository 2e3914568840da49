// Bundles dist/cli into bundle/ (npm run build:ts), the code bin/ferry.js runs: a few chunks, split per
// command, start a command measurably faster than a hundred ESM modules.
// commander goes inside the bundle: every command loads it, and as a package it costs seven CommonJS files
// resolved and read one by one (about 4 ms of a 60 ms start here). The other dependencies stay external:
// only the commands that need them load them.
import { readFileSync } from 'node:fs';
import { build } from 'esbuild';

const BUNDLED = new Set(['commander']);
const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
const external = Object.keys(pkg.dependencies).filter((name) => !BUNDLED.has(name));

await build({
  entryPoints: ['dist/cli/index.js'],
  outdir: 'bundle',
  bundle: true,
  splitting: true,
  platform: 'node',
  format: 'esm',
  external,
  // commander is CommonJS: its require() calls of Node's own modules need a require inside an ES module.
  banner: { js: "import { createRequire as bundleRequire } from 'node:module'; const require = bundleRequire(import.meta.url);" },
  logLevel: 'warning',
});
