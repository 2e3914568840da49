#!/usr/bin/env node
// Thin entry into the built CLI (npm run build). It loads the esbuild bundle of dist/: a few chunks instead of
// a hundred modules start a command measurably faster, and each command's code is loaded only when it runs.
import('../bundle/index.js').then((cli) => cli.main(process.argv));
