import { join } from 'node:path';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { imagesIdentical, requireTool, tempDir } from './helpers/env.js';
import { startService, writeRandomFile, type Service } from './helpers/service.js';

describe('dashboard in headless Chromium', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let service: Service;
  let browser: Browser;

  beforeAll(async () => {
    const executablePath = requireTool('/usr/bin/chromium', 'chromium');
    ({ dir, cleanup } = await tempDir('ferry-dashboard-'));
    // Incompressible data converted with compression: long enough for the bar to be seen between 0 and 100.
    await writeRandomFile(join(dir, 'random.raw'), 128 * 1024 * 1024);
    service = await startService(dir);
    browser = await chromium.launch({
      executablePath,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
    });
  });

  afterAll(async () => {
    await browser?.close();
    await service?.stop();
    await cleanup();
  });

  test('submits a conversion and shows its progress bar moving until the job completes', async () => {
    const page = await browser.newPage();
    const pageErrors: string[] = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    await page.goto(service.baseUrl);

    await page.fill('#token', 'wrong-token');
    await page.click('#login-form button');
    await expect.poll(() => page.textContent('#login-error')).toMatch(/refused/);
    await page.fill('#token', service.token);
    await page.click('#login-form button');
    await page.waitForSelector('#submit-form [name=targetFormat] option[value=qcow2]', { state: 'attached' });

    // Every value the job's progress bar takes, as the page sets it.
    await page.evaluate(() => {
      const seen: number[] = [];
      (window as unknown as { progressSeen: number[] }).progressSeen = seen;
      new MutationObserver((mutations) => {
        for (const m of mutations) if (m.target instanceof HTMLProgressElement && m.target.closest('#jobs')) seen.push(m.target.value);
      }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['value'] });
    });

    await page.fill('#submit-form [name=source]', 'random.raw');
    await page.fill('#submit-form [name=target]', 'dashboard.qcow2');
    await page.selectOption('#submit-form [name=targetFormat]', 'qcow2');
    await page.check('#submit-form [name=compress]');
    await page.click('#submit-form button[type=submit]');
    await expect.poll(() => page.textContent('#submit-result')).toMatch(/^submitted [0-9a-f]{8}$/);

    const row = page.locator('#jobs tbody tr').first();
    await row.locator('.state', { hasText: 'completed' }).waitFor({ timeout: 60_000 });
    const seen = await page.evaluate(() => (window as unknown as { progressSeen: number[] }).progressSeen);
    expect(seen.some((v) => v > 0 && v < 100), `progress values: ${seen.join(', ')}`).toBe(true);
    expect(seen[seen.length - 1]).toBe(100);
    expect(await row.locator('progress').evaluate((p: HTMLProgressElement) => p.value)).toBe(100);
    expect(await row.locator('.paths').textContent()).toBe('random.raw → dashboard.qcow2 (qcow2)');

    // The job's page: its fields and its log.
    await row.locator('a').click();
    await page.waitForSelector('#job-view:not([hidden])');
    expect(await page.textContent('#job-fields dd[data-field=state]')).toBe('completed');
    await expect.poll(() => page.textContent('#job-log')).toMatch(/convert: attempt 1 of 3[\s\S]*completed/);
    expect(await page.isHidden('#cancel')).toBe(true);
    expect(pageErrors).toEqual([]);
    expect(await imagesIdentical(join(dir, 'random.raw'), join(dir, 'dashboard.qcow2'))).toBe(true);
  });

  test('shows why a submission is refused', async () => {
    const page = await browser.newPage();
    await page.goto(service.baseUrl);
    await page.evaluate((token) => localStorage.setItem('ferry.token', token), service.token);
    await page.reload();
    await page.waitForSelector('#submit-form [name=targetFormat] option[value=qcow2]', { state: 'attached' });
    await page.fill('#submit-form [name=source]', '../outside.raw');
    await page.fill('#submit-form [name=target]', 'x.qcow2');
    await page.click('#submit-form button[type=submit]');
    await expect.poll(() => page.textContent('#submit-result')).toMatch(/source\.path '\.\.\/outside\.raw' leaves the data dir/);
  });
});
