#!/usr/bin/env node
// A worker for the convert stage only (convert jobs and the convert stage of P2V flows): for machines beside
// the storage, while capture workers run near the sources. Same options as `ferry worker` (REDIS_URL,
// --concurrency, --data-dir, ...). `ferry worker` serves every stage.
import('../bundle/index.js').then((cli) => cli.main([...process.argv.slice(0, 2), 'worker', '--stages', 'convert', ...process.argv.slice(2)]));
