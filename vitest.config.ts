import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Two cores: interop tests run qemu-img heavily, so two files at a time keep both busy without thrashing.
    maxWorkers: 2,
  },
});
