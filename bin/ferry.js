#!/usr/bin/env node
// Thin entry into the built CLI (npm run build). It loads the esbuild bundle of dist/: a few chunks instead of
// a hundred modules start a command measurably faster, and each command's code is loaded only when it runs.
import { setFlagsFromString } from 'node:v8';

// The image commands spend their time in native code and the kernel: optimizing their JavaScript glue with
// TurboFan costs more CPU than it saves (measured on a 4 GiB convert: a third of the user time). Baseline
// code (Sparkplug) is enough there; the long-running commands keep V8's defaults.
if (['info', 'convert', 'check', 'compare', 'map', 'measure'].includes(process.argv[2])) setFlagsFromString('--max-opt=2');
import('../bundle/index.js').then((cli) => cli.main(process.argv));
