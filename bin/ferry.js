#!/usr/bin/env node
// Thin entry: everything lives in the built CLI (npm run build).
import('../dist/cli/index.js').then((cli) => cli.main(process.argv));
