// Browser test of the fluxcap web UI, in headless Chromium (Debian's `chromium`)
// driven by playwright-core. tests/it/ui.rs starts `fluxcap serve` against the
// local Kinesis stack and runs this; it can also run by hand:
//
//   FLUXCAP_URL='http://127.0.0.1:8080/#token=...' STREAM=orders TARGET_STREAM=orders-copy \
//   EXPECTED_COUNT=300 ARTIFACTS=tests/artifacts/ui node tests/browser/ui.mjs
//
// Env: FLUXCAP_URL (with #token=...), STREAM (source), TARGET_STREAM (an existing
// Kinesis stream, replayed into), EXPECTED_COUNT (records in STREAM), ARTIFACTS
// (directory for screenshots and the downloaded CSV), CHROMIUM (default
// /usr/bin/chromium), REPLAY_TIMEOUT_MS (default 60000).
// Exit 0 when every step passed; 1 with a message naming the failed step.
// playwright-core resolves from NODE_PATH or from <repo>/.local/node (scripts/setup).

import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..');

function loadPlaywright() {
  const require = createRequire(import.meta.url);
  try {
    return require('playwright-core');
  } catch {
    try {
      return require(path.join(repo, '.local', 'node', 'node_modules', 'playwright-core'));
    } catch {
      fail('setup', 'playwright-core not found: run scripts/setup (installs it into .local/node)');
    }
  }
}

function env(name, dflt) {
  const v = process.env[name] ?? dflt;
  if (v === undefined || v === '') fail('setup', `environment variable ${name} is required`);
  return v;
}

let step = 'setup';
function fail(where, msg) {
  console.error(`ui.mjs: FAILED at step "${where}": ${msg}`);
  process.exit(1);
}
function check(cond, msg) {
  if (!cond) throw new Error(msg);
}
function log(msg) {
  console.log(`ui.mjs: ${msg}`);
}

const URL0 = env('FLUXCAP_URL');
const STREAM = env('STREAM');
const TARGET = env('TARGET_STREAM');
const EXPECTED = Number(env('EXPECTED_COUNT'));
const ARTIFACTS = path.resolve(env('ARTIFACTS'));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const REPLAY_TIMEOUT = Number(process.env.REPLAY_TIMEOUT_MS || 60000);
if (!Number.isInteger(EXPECTED)) fail('setup', `EXPECTED_COUNT is not an integer: ${process.env.EXPECTED_COUNT}`);
if (!fs.existsSync(CHROMIUM)) fail('setup', `${CHROMIUM} not found: install Debian's chromium (scripts/setup does) or set CHROMIUM`);
if (!URL0.includes('#token=')) fail('setup', 'FLUXCAP_URL must carry #token=...');
fs.mkdirSync(ARTIFACTS, { recursive: true });

const { chromium } = loadPlaywright();
const base = URL0.split('#')[0];
const sqlName = `"${STREAM.replace(/"/g, '""')}"`;

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fluxcap-ui-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  acceptDownloads: true,
  viewport: { width: 1280, height: 900 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
}).catch((e) => fail('launch', `cannot start ${CHROMIUM}: ${e.message}`));
context.setDefaultTimeout(15000);

const pageErrors = [];
const consoleErrors = [];
let page;
let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = path.join(ARTIFACTS, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${path.relative(process.cwd(), file) || file}`);
}
function watchPage(p) {
  p.on('pageerror', (e) => pageErrors.push(e.message));
  // HTTP error answers the UI handles (401 without a token, 400 for bad SQL) are
  // logged by Chromium as "Failed to load resource"; anything else is a bug.
  p.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) consoleErrors.push(m.text());
  });
}

async function textOf(sel) {
  return (await page.locator(sel).first().textContent() ?? '').trim();
}

try {
  // ---- 0. without a token: the token form ----
  step = 'token form';
  page = context.pages()[0] ?? await context.newPage();
  watchPage(page);
  await page.goto(`${base}#sql`);
  await page.locator('body[data-ready="true"]').waitFor();
  await page.locator('#token-panel').waitFor({ state: 'visible' });
  check(await page.locator('#token-input').evaluate((e) => e === document.activeElement),
    'the token input should have the focus when a token is needed');
  await screenshot('token-form');
  // pageerrors/console errors so far are expected 401s only
  consoleErrors.length = 0;

  // ---- 1. with the token: it leaves the address bar ----
  step = 'open';
  await page.goto(URL0);
  await page.reload(); // the token is now in sessionStorage only
  await page.locator('body[data-ready="true"]').waitFor();
  check(!page.url().includes('token='), `the token should be removed from the address bar, URL is ${page.url()}`);
  check(await page.locator('#token-panel').isHidden(), 'the token form should be hidden once a token is known');
  check((await page.locator('#nav-sql').getAttribute('aria-current')) === 'page', 'SQL should be the current view');

  // ---- 2. SQL: run a query with Ctrl+Enter ----
  step = 'sql';
  const query = `SELECT count(*) AS n FROM ${sqlName}`;
  await page.locator('#sql-input').fill(query);
  await page.locator('#sql-input').press('Control+Enter');
  const cell = page.locator('#sql-result tbody tr:first-child td:first-child');
  await page.locator('#sql-result tbody tr').first().waitFor({ timeout: 30000 });
  const err = await textOf('#sql-error');
  check(err === '', `query error shown: ${err}`);
  const header = (await page.locator('#sql-result thead th').allTextContents()).map((s) => s.trim());
  check(JSON.stringify(header) === JSON.stringify(['n']), `result header should be ["n"], got ${JSON.stringify(header)}`);
  const got = (await cell.textContent()).trim();
  check(got === String(EXPECTED), `count(*) should be ${EXPECTED}, the table shows ${got}`);
  const meta = await textOf('#sql-meta');
  check(/^1 row in [\d.]+ ms/.test(meta), `row count and elapsed time should show, got "${meta}"`);
  log(`SQL: ${query} -> ${got} (${meta})`);
  await screenshot('sql-result');

  // a bad query shows an error in the alert region
  step = 'sql error';
  await page.locator('#sql-input').fill('SELEC nonsense');
  await page.locator('#sql-run').click();
  await page.locator('#sql-error:not(:empty)').waitFor();
  log(`SQL error shown: ${await textOf('#sql-error')}`);
  await screenshot('sql-error');

  // ---- 3. CSV download ----
  step = 'csv';
  await page.locator('#sql-input').fill(query);
  const [download] = await Promise.all([
    page.waitForEvent('download', { timeout: 30000 }),
    page.locator('#sql-csv').click(),
  ]);
  check(download.suggestedFilename() === 'result.csv', `download should be named result.csv, got ${download.suggestedFilename()}`);
  const csvPath = path.join(ARTIFACTS, 'result.csv');
  await download.saveAs(csvPath);
  const csv = fs.readFileSync(csvPath, 'utf8').replace(/\r\n/g, '\n').trim().split('\n');
  check(csv.length === 2 && csv[0].trim() === 'n' && csv[1].trim() === String(EXPECTED),
    `CSV should be "n" then "${EXPECTED}", got ${JSON.stringify(csv)}`);
  log(`CSV: ${JSON.stringify(csv)}`);

  // ---- 4. Streams ----
  step = 'streams';
  await page.locator('#nav-streams').click();
  check(page.url().endsWith('#streams'), `URL should end with #streams, got ${page.url()}`);
  const stream = page.locator(`article[data-stream="${STREAM}"]`);
  await stream.locator('[data-testid="shard-table"] tbody tr').first().waitFor({ timeout: 30000 });
  const shardRows = await stream.locator('[data-testid="shard-table"] tbody tr').count();
  check(shardRows >= 1, 'the shard table has no rows');
  const archived = (await stream.locator('[data-testid="shard-table"] tbody tr td:nth-child(3)').allTextContents())
    .reduce((a, t) => a + (Number(t.replace(/[^\d]/g, '')) || 0), 0);
  check(archived > 0, 'the shard table shows no archived records');
  const bars = await stream.locator('svg[data-testid="archive-chart"] rect.bar').count();
  check(bars >= 1, 'the archive chart has no bars');
  const title = await stream.locator('svg[data-testid="archive-chart"] > title').textContent();
  check(/Archive size per day/.test(title), `the chart needs a title, got "${title}"`);
  log(`Streams: ${shardRows} shards, ${archived} records archived, ${bars} day(s) in the chart`);
  await screenshot('streams');

  // ---- 5. Replay: dry run ----
  step = 'dry run';
  await page.locator('#nav-replay').click();
  await page.locator(`#r-stream option[value="${STREAM}"]`).waitFor({ state: 'attached' });
  await page.locator('#r-stream').selectOption(STREAM);
  await page.locator('#r-to').fill(`kinesis://${TARGET}`);
  check(await page.locator('#r-start').isDisabled(), 'Start replay should be disabled before a dry run');
  await page.locator('#r-dry').click();
  await page.locator('#dry-records').waitFor({ timeout: 60000 }).catch(async (e) => {
    throw new Error(`no dry-run figures (${await textOf('#replay-error') || e.message})`);
  });
  const dryRecords = Number(await page.locator('#dry-records').getAttribute('data-value'));
  check(dryRecords === EXPECTED, `dry run should count ${EXPECTED} records, shows ${dryRecords}`);
  const dryShards = await page.locator('[data-testid="dry-shards"] tbody tr').count();
  check(dryShards >= 1, 'the dry run lists no target shards');
  check(await page.locator('#r-start').isEnabled(), 'Start replay should be enabled after a dry run');
  log(`Dry run: ${await textOf('[data-testid="dry-figures"]')}`);
  await screenshot('replay-dry-run');

  // ---- 6. Replay: start, follow progress to done ----
  step = 'replay';
  await page.locator('#r-start').click();
  await page.locator('#progress').waitFor({ state: 'visible', timeout: 30000 });
  await page.locator('#progress[data-state]').waitFor({ timeout: 30000 });
  const replayId = await page.locator('#progress').getAttribute('data-id');
  log(`Replay ${replayId} started (state ${await textOf('#p-state')})`);
  await screenshot('replay-progress');
  const handle = await page.waitForFunction(
    () => {
      const s = document.querySelector('#progress')?.dataset.state;
      return ['done', 'failed', 'cancelled'].includes(s) ? s : null;
    },
    null,
    { timeout: REPLAY_TIMEOUT, polling: 250 },
  ).catch(async () => {
    throw new Error(`replay did not finish within ${REPLAY_TIMEOUT} ms (state ${await textOf('#p-state')}, ${await textOf('#p-figures')})`);
  });
  const final = await handle.jsonValue();
  const figures = await textOf('#p-figures');
  await screenshot(`replay-${final}`);
  check(final === 'done', `replay ended ${final}: ${await textOf('#p-error')} (${figures})`);
  const sent = Number(await page.locator('#p-figures').getAttribute('data-sent'));
  check(sent === EXPECTED, `replay should have sent ${EXPECTED} records, shows ${sent} (${figures})`);
  const bar = await page.locator('#p-bar').evaluate((b) => [b.value, b.max]);
  check(bar[0] === bar[1], `the progress bar should be full, is ${bar[0]}/${bar[1]}`);
  check(await page.locator('#p-cancel').isDisabled(), 'Cancel should be disabled once done');
  check(await page.locator('#p-resume').isDisabled(), 'Resume should be disabled once done');
  log(`Replay ${replayId}: ${final}, ${figures}`);

  // the list shows it as done
  step = 'replay list';
  await page.locator(`#replays-table tbody tr[data-id="${replayId}"] .state-done`).waitFor({ timeout: 10000 });

  step = 'page errors';
  check(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join(' | ')}`);
  check(consoleErrors.length === 0, `console errors: ${consoleErrors.join(' | ')}`);
  await screenshot('final');
  log(`all steps passed; artifacts in ${ARTIFACTS}`);
} catch (e) {
  try { if (page) await page.screenshot({ path: path.join(ARTIFACTS, 'failure.png'), fullPage: true }); } catch { /* ignore */ }
  if (pageErrors.length) console.error(`page errors: ${pageErrors.join(' | ')}`);
  if (consoleErrors.length) console.error(`console errors: ${consoleErrors.join(' | ')}`);
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  fail(step, `${e.message}${process.env.UI_TEST_DEBUG ? `\n${e.stack}` : ''} (screenshot: ${path.join(ARTIFACTS, 'failure.png')})`);
}
await context.close();
fs.rmSync(userDataDir, { recursive: true, force: true });
process.exit(0);
