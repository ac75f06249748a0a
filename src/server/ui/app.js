// fluxcap web UI: plain ES module, no dependencies, no external URLs.
// Views: #sql, #streams, #replay. The API token comes from `#token=...` once,
// then lives in sessionStorage.

const TOKEN_KEY = 'fluxcap.token';
const VIEWS = ['sql', 'streams', 'replay'];
const POLL_MS = 500;
const TERMINAL = new Set(['done', 'failed', 'cancelled']);

const $ = (sel) => document.querySelector(sel);

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function fmtInt(n) {
  return n === null || n === undefined ? '–' : Number(n).toLocaleString('en-US');
}

function fmtDuration(secs) {
  if (secs === null || secs === undefined) return '–';
  const s = Number(secs);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function fmtTime(iso) {
  if (!iso) return '–';
  return String(iso).replace('T', ' ').replace(/\.\d+/, '').replace(/\+00:00$/, 'Z');
}

let statusTimer = null;
function status(msg, sticky = false) {
  const s = $('#status');
  s.textContent = msg;
  clearTimeout(statusTimer);
  if (!sticky && msg) statusTimer = setTimeout(() => { s.textContent = ''; }, 6000);
}

function showError(region, err) {
  const r = typeof region === 'string' ? $(region) : region;
  r.textContent = err ? (err.message || String(err)) : '';
}

// ---------- token & API ----------

function takeTokenFromHash() {
  const h = location.hash.replace(/^#/, '');
  if (!h.includes('token=')) return;
  const params = new URLSearchParams(h);
  const t = params.get('token');
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  params.delete('token');
  const view = params.get('view') || [...params.keys()].find((k) => VIEWS.includes(k)) || 'sql';
  // Remove the token from the address bar (and from history).
  history.replaceState(null, '', `${location.pathname}${location.search}#${view}`);
}

const token = () => sessionStorage.getItem(TOKEN_KEY) || '';

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, { raw = false } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, `Cannot reach the server (${e.message}).`);
  }
  if (resp.status === 401) {
    const msg = await errorMessage(resp);
    askForToken(token() ? `The server refused the token: ${msg}` : 'This page needs the API token.');
    throw new ApiError(401, `Not authorized: ${msg}`);
  }
  if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
  if (raw) return resp;
  return resp.status === 204 ? null : resp.json();
}

async function errorMessage(resp) {
  const text = await resp.text().catch(() => '');
  try {
    const j = JSON.parse(text);
    if (j && typeof j.error === 'string') return j.error;
  } catch { /* not JSON */ }
  return text.trim() || `${resp.status} ${resp.statusText}`;
}

function askForToken(why) {
  const p = $('#token-panel');
  $('#token-why').textContent = why;
  if (p.hidden) {
    p.hidden = false;
    $('#token-input').focus();
  }
}

function initToken() {
  $('#token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = $('#token-input').value.trim();
    if (!v) return;
    sessionStorage.setItem(TOKEN_KEY, v);
    $('#token-input').value = '';
    $('#token-panel').hidden = true;
    status('Token saved for this tab.');
    loaded.clear();
    showView(currentView(), false);
  });
  if (!token()) askForToken('This page needs the API token the server printed at start.');
}

// ---------- routing ----------

const loaded = new Set();

function currentView() {
  const v = location.hash.replace(/^#/, '');
  return VIEWS.includes(v) ? v : 'sql';
}

function showView(view, focus = true) {
  for (const v of VIEWS) {
    $(`#view-${v}`).hidden = v !== view;
    const link = $(`#nav-${v}`);
    if (v === view) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `fluxcap · ${view === 'sql' ? 'SQL' : view[0].toUpperCase() + view.slice(1)}`;
  if (focus) $(`#${view}-h`).focus();
  if (!token()) return;
  if (!loaded.has(view)) {
    loaded.add(view);
    if (view === 'sql') loadTables();
    if (view === 'streams') loadStreams();
    if (view === 'replay') { loadStreamChoices(); loadReplays(); }
  }
}

// ---------- streams (shared) ----------

let streamsCache = null;

async function fetchStreams(force = false) {
  if (!streamsCache || force) streamsCache = (await api('GET', '/api/streams')).streams || [];
  return streamsCache;
}

function sqlName(name) {
  return /^[a-z_][a-z0-9_]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
}

// ---------- SQL view ----------

let sqlBusy = false;

async function loadTables() {
  try {
    const streams = await fetchStreams();
    const names = streams.map((s) => sqlName(s.stream));
    $('#sql-tables').textContent = names.length
      ? `Tables: ${names.join(', ')} (each also as archive.NAME and live.NAME).`
      : 'No streams configured.';
  } catch (e) {
    if (e.status !== 401) $('#sql-tables').textContent = '';
  }
}

function sqlBody(extra = {}) {
  const sql = $('#sql-input').value.trim();
  if (!sql) throw new Error('Write a query first.');
  return { sql, ...extra };
}

async function runSql() {
  if (sqlBusy) return;
  showError('#sql-error', null);
  let body;
  try {
    const limit = parseInt($('#sql-limit').value, 10);
    body = sqlBody(Number.isFinite(limit) && limit > 0 ? { limit } : {});
  } catch (e) { showError('#sql-error', e); return; }
  sqlBusy = true;
  const run = $('#sql-run');
  run.disabled = true;
  $('#sql-result').setAttribute('aria-busy', 'true');
  $('#sql-meta').textContent = 'Running…';
  try {
    const res = await api('POST', '/api/sql', body);
    renderResult(res);
  } catch (e) {
    $('#sql-meta').textContent = '';
    showError('#sql-error', e);
  } finally {
    sqlBusy = false;
    run.disabled = false;
    $('#sql-result').removeAttribute('aria-busy');
  }
}

function cellText(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

function renderResult(res) {
  const table = $('#sql-result');
  const cols = res.columns || [];
  const rows = res.rows || [];
  const numeric = cols.map((c) => /^(U?Int|Float|Decimal)/i.test(c.type || ''));
  const head = el('tr', {}, cols.map((c) =>
    el('th', { scope: 'col', title: c.type, class: numeric[cols.indexOf(c)] ? 'num' : null }, c.name)));
  table.tHead.replaceChildren(head);
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement('tr');
    r.forEach((v, i) => {
      const td = document.createElement('td');
      const t = cellText(v);
      if (t === null) { td.textContent = 'NULL'; td.className = 'null'; }
      else { td.textContent = t; if (numeric[i]) td.className = 'num'; }
      tr.append(td);
    });
    frag.append(tr);
  }
  table.tBodies[0].replaceChildren(frag);
  const count = res.row_count ?? rows.length;
  table.caption.textContent = `Query result: ${count} ${count === 1 ? 'row' : 'rows'}`;
  table.hidden = false;
  const ms = res.elapsed_ms === undefined ? '' : ` in ${Number(res.elapsed_ms).toFixed(1)} ms`;
  $('#sql-meta').textContent = `${count} ${count === 1 ? 'row' : 'rows'}${ms}` +
    (res.truncated ? ` — truncated to ${rows.length} rows; Download CSV has them all.` : '.');
  $('#sql-meta').dataset.rowCount = String(count);
}

async function downloadCsv() {
  showError('#sql-error', null);
  let body;
  try { body = sqlBody({ format: 'csv', neutralize_formulas: $('#sql-csv-safe').checked }); } catch (e) { showError('#sql-error', e); return; }
  const btn = $('#sql-csv');
  btn.disabled = true;
  status('Preparing CSV…', true);
  try {
    const resp = await api('POST', '/api/sql', body, { raw: true });
    const blob = await resp.blob();
    const name = /filename="?([^";]+)"?/.exec(resp.headers.get('Content-Disposition') || '')?.[1] || 'result.csv';
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    status(`Downloaded ${name} (${fmtBytes(blob.size)}).`);
  } catch (e) {
    status('');
    showError('#sql-error', e);
  } finally {
    btn.disabled = false;
  }
}

function initSql() {
  $('#sql-form').addEventListener('submit', (ev) => { ev.preventDefault(); runSql(); });
  $('#sql-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runSql(); }
  });
  $('#sql-csv').addEventListener('click', downloadCsv);
}

// ---------- Streams view ----------

async function loadStreams() {
  showError('#streams-error', null);
  const btn = $('#streams-refresh');
  btn.disabled = true;
  $('#streams-list').setAttribute('aria-busy', 'true');
  try {
    const streams = await fetchStreams(true);
    renderStreams(streams);
    $('#streams-updated').textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (e) {
    showError('#streams-error', e);
  } finally {
    btn.disabled = false;
    $('#streams-list').removeAttribute('aria-busy');
  }
}

function renderStreams(streams) {
  const list = $('#streams-list');
  if (!streams.length) {
    list.replaceChildren(el('p', {}, 'No streams configured.'));
    return;
  }
  list.replaceChildren(...streams.map(renderStream));
}

function renderStream(s, idx) {
  const hid = `stream-h-${idx}`;
  const shards = s.shards || [];
  const atRisk = shards.filter((x) => x.warning).length;
  const art = el('article', { class: 'stream', 'aria-labelledby': hid, 'data-testid': `stream-${s.stream}`, 'data-stream': s.stream },
    el('h3', { id: hid }, s.stream),
    el('p', { class: 'meta' },
      `Format ${s.format} · retention ${s.retention_hours ?? '?'} h · ${shards.length} ${shards.length === 1 ? 'shard' : 'shards'}`,
      atRisk ? el('strong', { class: 'warn-text' }, ` · ${atRisk} at risk`) : null));
  if (s.warnings && s.warnings.length) {
    art.append(el('ul', { class: 'warnings', 'aria-label': `Warnings for ${s.stream}` },
      s.warnings.map((w) => el('li', {}, w))));
  }
  const table = el('table', { class: 'shards', 'data-testid': 'shard-table' },
    el('caption', {}, `Shards of ${s.stream}`),
    el('thead', {}, el('tr', {},
      el('th', { scope: 'col' }, 'Shard'),
      el('th', { scope: 'col' }, 'State'),
      el('th', { scope: 'col', class: 'num' }, 'Archived'),
      el('th', { scope: 'col' }, 'Last archived arrival'),
      el('th', { scope: 'col', class: 'num' }, 'Lag'),
      el('th', { scope: 'col', class: 'num' }, 'Expires in'),
      el('th', { scope: 'col' }, 'Risk'))),
    el('tbody', {}, shards.map((x) => el('tr', { class: x.warning ? 'warn' : null, 'data-shard': x.shard_id },
      el('th', { scope: 'row' }, x.shard_id),
      el('td', {}, x.state),
      el('td', { class: 'num' }, fmtInt(x.records_archived)),
      el('td', {}, x.last_archived_arrival ? el('time', { datetime: x.last_archived_arrival }, fmtTime(x.last_archived_arrival)) : '–'),
      el('td', { class: 'num' }, x.lag_ms === null || x.lag_ms === undefined ? '–' : fmtDuration(x.lag_ms / 1000)),
      el('td', { class: 'num' }, fmtDuration(x.expires_in_secs)),
      el('td', {}, x.warning ? el('strong', { class: 'warn-text' }, '⚠ at risk') : 'ok')))));
  art.append(el('div', { class: 'table-wrap' }, table));
  art.append(el('h4', {}, 'Archive size per day'));
  art.append(chart(s.stream, s.archive_by_day || [], idx));
  return art;
}

function chart(stream, days, idx) {
  if (!days.length) return el('p', { class: 'meta', 'data-testid': 'archive-chart-empty' }, 'Nothing archived yet.');
  const W = 640; const H = 200; const padL = 64; const padB = 36; const padT = 12; const padR = 8;
  const max = Math.max(1, ...days.map((d) => d.bytes || 0));
  const plotW = W - padL - padR; const plotH = H - padT - padB;
  const slot = plotW / days.length;
  const bw = Math.max(2, Math.min(48, slot * 0.7));
  const tid = `chart-t-${idx}`; const did = `chart-d-${idx}`;
  const root = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-labelledby': `${tid} ${did}`,
    'data-testid': 'archive-chart', preserveAspectRatio: 'xMinYMin meet',
  });
  root.append(svg('title', { id: tid }, `Archive size per day of ${stream}`));
  root.append(svg('desc', { id: did },
    days.map((d) => `${d.dt}: ${fmtBytes(d.bytes)} in ${d.files} ${d.files === 1 ? 'file' : 'files'}`).join('; ')));
  // axis and gridline at max
  root.append(svg('line', { x1: padL, y1: padT, x2: W - padR, y2: padT, class: 'grid' }));
  root.append(svg('line', { x1: padL, y1: padT + plotH, x2: W - padR, y2: padT + plotH, class: 'axis' }));
  root.append(svg('text', { x: padL - 6, y: padT + 4, class: 'ylabel', 'text-anchor': 'end' }, fmtBytes(max)));
  root.append(svg('text', { x: padL - 6, y: padT + plotH, class: 'ylabel', 'text-anchor': 'end' }, '0'));
  const every = Math.ceil(days.length / 10);
  days.forEach((d, i) => {
    const h = Math.max(1, ((d.bytes || 0) / max) * plotH);
    const x = padL + i * slot + (slot - bw) / 2;
    const bar = svg('rect', { x: x.toFixed(1), y: (padT + plotH - h).toFixed(1), width: bw.toFixed(1), height: h.toFixed(1), class: 'bar', 'data-dt': d.dt, 'data-bytes': d.bytes });
    bar.append(svg('title', {}, `${d.dt}: ${fmtBytes(d.bytes)}, ${d.files} ${d.files === 1 ? 'file' : 'files'}`));
    root.append(bar);
    if (i % every === 0) {
      root.append(svg('text', { x: (x + bw / 2).toFixed(1), y: H - padB + 16, class: 'xlabel', 'text-anchor': 'middle' }, String(d.dt).slice(5)));
    }
  });
  return root;
}

// ---------- Replay view ----------

let dryRunOk = false;
let pendingConfirm = null;

async function loadStreamChoices() {
  const sel = $('#r-stream');
  try {
    const streams = await fetchStreams();
    const prev = sel.value;
    sel.replaceChildren(...streams.map((s) => el('option', { value: s.stream }, s.stream)));
    if (prev && streams.some((s) => s.stream === prev)) sel.value = prev;
  } catch (e) {
    if (e.status !== 401) showError('#replay-error', e);
  }
}

function parseAnnotations(text) {
  const out = {};
  text.split('\n').forEach((line, i) => {
    const l = line.trim();
    if (!l) return;
    const eq = l.indexOf('=');
    if (eq <= 0) throw new Error(`Annotations, line ${i + 1}: expected key=value, got "${l}".`);
    out[l.slice(0, eq).trim()] = l.slice(eq + 1).trim();
  });
  return Object.keys(out).length ? out : null;
}

function replayBody(dryRun) {
  const f = $('#replay-form');
  const v = (name) => { const x = f.elements[name].value.trim(); return x === '' ? null : x; };
  const stream = v('stream');
  const to = v('to');
  if (!stream) throw new Error('Choose a source stream.');
  if (!to) throw new Error('Enter a target, for example kinesis://orders-restore.');
  if (!/^kinesis:\/\/\S+$/.test(to)) throw new Error('The target must be kinesis://STREAM.');
  const rate = v('rate');
  if (rate !== null && !(Number(rate) > 0)) throw new Error('Rate must be a positive number of records per second.');
  return {
    stream,
    to,
    since: v('since'),
    until: v('until'),
    where: v('where'),
    compact: f.elements.compact.checked,
    key: v('key'),
    tombstone: v('tombstone'),
    annotate: parseAnnotations(f.elements.annotate.value),
    no_annotate: f.elements.no_annotate.checked,
    dry_run: dryRun,
    rate: rate === null ? null : Number(rate),
    confirm_same_stream: false,
  };
}

function setDryRunOk(ok) {
  dryRunOk = ok;
  $('#r-start').disabled = !ok;
}

async function submitReplay(kind, confirm = false) {
  showError('#replay-error', null);
  hideConfirm();
  let body;
  try { body = replayBody(kind === 'dry'); } catch (e) { showError('#replay-error', e); return; }
  body.confirm_same_stream = confirm;
  const btn = kind === 'dry' ? $('#r-dry') : $('#r-start');
  btn.disabled = true;
  status(kind === 'dry' ? 'Running the dry run…' : 'Starting the replay…', true);
  try {
    const res = await api('POST', '/api/replays', body);
    if (kind === 'dry') {
      renderDryRun(res, body);
      setDryRunOk(true);
      status('Dry run finished: nothing was sent.');
    } else {
      status(`Replay ${res.id} started.`);
      setDryRunOk(false); // another start needs another dry run
      watch(res.id, true);
      loadReplays();
    }
  } catch (e) {
    status('');
    if (e.status === 409 && !confirm) {
      askConfirm(e.message, kind);
    } else {
      showError('#replay-error', e);
    }
  } finally {
    if (kind === 'dry') btn.disabled = false;
    else btn.disabled = !dryRunOk;
  }
}

function askConfirm(message, kind) {
  pendingConfirm = kind;
  $('#r-confirm-text').textContent = `${message} Replaying into the stream the records came from adds them to live traffic; consumers must follow the replay protocol.`;
  $('#r-confirm').hidden = false;
  $('#r-confirm-yes').textContent = kind === 'dry' ? 'Dry run into the source stream' : 'Replay into the source stream';
  $('#r-confirm-yes').focus();
}

function hideConfirm() {
  $('#r-confirm').hidden = true;
  pendingConfirm = null;
}

function renderDryRun(res, body) {
  const s = res.summary || {};
  const shards = s.shards || [];
  const box = $('#dry-summary');
  box.classList.remove('stale');
  box.replaceChildren(
    el('h3', {}, 'Dry run'),
    el('p', { 'data-testid': 'dry-figures' },
      'Would send ',
      el('strong', { id: 'dry-records', 'data-testid': 'dry-records', 'data-value': s.records }, fmtInt(s.records)),
      ' records (',
      el('span', { id: 'dry-bytes', 'data-value': s.bytes }, fmtBytes(s.bytes)),
      `) from ${body.stream} to ${body.to}, over ${shards.length} target ${shards.length === 1 ? 'shard' : 'shards'}; about `,
      el('strong', { id: 'dry-seconds', 'data-value': s.estimated_seconds }, fmtDuration(s.estimated_seconds)),
      ' at the configured limits. Nothing was sent.'),
    el('div', { class: 'table-wrap' }, el('table', { 'data-testid': 'dry-shards' },
      el('caption', {}, 'Per target shard'),
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Target shard'),
        el('th', { scope: 'col', class: 'num' }, 'Records'),
        el('th', { scope: 'col', class: 'num' }, 'Bytes'))),
      el('tbody', {}, shards.map((x) => el('tr', {},
        el('th', { scope: 'row' }, x.shard_id),
        el('td', { class: 'num' }, fmtInt(x.records)),
        el('td', { class: 'num' }, fmtBytes(x.bytes))))))));
}

// -- replays list --

async function loadReplays() {
  try {
    const res = await api('GET', '/api/replays');
    renderReplays(res.replays || []);
  } catch (e) {
    if (e.status !== 401) showError('#replay-error', e);
  }
}

function renderReplays(list) {
  const tbody = $('#replays-table').tBodies[0];
  if (!list.length) {
    tbody.replaceChildren(el('tr', {}, el('td', { colspan: 7, class: 'meta' }, 'No replays yet.')));
    return;
  }
  tbody.replaceChildren(...list.map((r) => el('tr', { 'data-id': r.id },
    el('th', { scope: 'row' }, el('code', {}, r.id)),
    el('td', {}, el('span', { class: `state state-${r.state}` }, r.state)),
    el('td', {}, r.source),
    el('td', {}, r.target),
    el('td', { class: 'num' }, `${fmtInt(r.sent)}${r.total === null || r.total === undefined ? '' : ` / ${fmtInt(r.total)}`}`),
    el('td', {}, fmtTime(r.created_at)),
    el('td', {}, el('button', { type: 'button', class: 'small', 'data-show': r.id, 'aria-label': `Show progress of ${r.id}` }, 'Show')))));
}

// -- progress --

let watching = null; // { id, timer, lastState }

function watch(id, focus = false) {
  if (watching) clearTimeout(watching.timer);
  watching = { id, timer: null, lastState: null, failures: 0 };
  const p = $('#progress');
  p.hidden = false;
  p.dataset.id = id;
  $('#p-id').textContent = id;
  $('#p-state').textContent = '…';
  $('#p-figures').textContent = '';
  showError('#p-error', null);
  $('#p-bar').removeAttribute('value');
  if (focus) $('#p-h').focus();
  poll(watching);
}

async function poll(w) {
  if (watching !== w) return;
  let info;
  try {
    info = await api('GET', `/api/replays/${encodeURIComponent(w.id)}`);
    w.failures = 0;
  } catch (e) {
    if (watching !== w) return;
    showError('#p-error', e);
    if (e.status === 404 || e.status === 401) return;
    w.failures++;
    w.timer = setTimeout(() => poll(w), Math.min(5000, POLL_MS * 2 ** w.failures));
    return;
  }
  if (watching !== w) return;
  renderProgress(info, w);
  if (!TERMINAL.has(info.state)) w.timer = setTimeout(() => poll(w), POLL_MS);
}

function renderProgress(r, w) {
  const stateEl = $('#p-state');
  stateEl.textContent = r.state;
  stateEl.className = `state state-${r.state}`;
  $('#progress').dataset.state = r.state;
  $('#p-route').textContent = `${r.source} → ${r.target}, created ${fmtTime(r.created_at)}`;
  const bar = $('#p-bar');
  if (r.total !== null && r.total !== undefined) {
    bar.max = Math.max(1, r.total);
    bar.value = Math.min(r.sent, bar.max);
  } else if (r.state === 'done') {
    bar.max = 1; bar.value = 1;
  } else {
    bar.removeAttribute('value');
  }
  const pct = r.total ? ` (${Math.floor((100 * r.sent) / r.total)} %)` : '';
  const total = r.total === null || r.total === undefined ? '' : ` / ${fmtInt(r.total)}`;
  const rate = r.records_per_sec === null || r.records_per_sec === undefined ? '' : ` · ${Number(r.records_per_sec).toFixed(1)} records/s`;
  const rej = r.rejected ? ` · ${fmtInt(r.rejected)} rejected` : '';
  const figs = $('#p-figures');
  figs.textContent = `${fmtInt(r.sent)}${total} records sent${pct}${rate}${rej}`;
  figs.dataset.sent = String(r.sent);
  bar.setAttribute('aria-valuetext', figs.textContent);
  showError('#p-error', r.error ? { message: r.error } : null);
  $('#p-cancel').disabled = !(r.state === 'running' || r.state === 'queued');
  $('#p-resume').disabled = !(r.state === 'failed' || r.state === 'cancelled');
  if (w.lastState !== r.state) {
    // Announce state changes only, not every tick.
    $('#p-announce').textContent = `Replay ${r.id} is ${r.state}.`;
    if (w.lastState !== null) loadReplays();
    w.lastState = r.state;
  }
}

async function cancelReplay() {
  if (!watching) return;
  const w = watching;
  $('#p-cancel').disabled = true;
  try {
    await api('DELETE', `/api/replays/${encodeURIComponent(w.id)}`);
    status(`Cancelling ${w.id}…`);
  } catch (e) {
    showError('#p-error', e);
  }
  clearTimeout(w.timer);
  poll(w);
}

async function resumeReplay() {
  if (!watching) return;
  const id = watching.id;
  $('#p-resume').disabled = true;
  try {
    await api('POST', `/api/replays/${encodeURIComponent(id)}/resume`);
    status(`Resumed ${id}.`);
    watch(id);
    loadReplays();
  } catch (e) {
    showError('#p-error', e);
    $('#p-resume').disabled = false;
  }
}

function initReplay() {
  const form = $('#replay-form');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const kind = ev.submitter && ev.submitter.value === 'start' ? 'start' : 'dry';
    if (kind === 'start' && !dryRunOk) return;
    submitReplay(kind);
  });
  const invalidate = () => {
    if (dryRunOk) {
      setDryRunOk(false);
      $('#dry-summary').classList.add('stale');
      status('The form changed: run the dry run again before starting.');
    }
  };
  form.addEventListener('input', invalidate);
  form.addEventListener('change', invalidate);
  $('#r-confirm-yes').addEventListener('click', () => {
    const kind = pendingConfirm || 'start';
    submitReplay(kind, true);
  });
  $('#r-confirm-no').addEventListener('click', () => { hideConfirm(); $('#r-to').focus(); });
  $('#replays-refresh').addEventListener('click', loadReplays);
  $('#replays-table').addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-show]');
    if (b) watch(b.dataset.show, true);
  });
  $('#p-cancel').addEventListener('click', cancelReplay);
  $('#p-resume').addEventListener('click', resumeReplay);
}

// ---------- start ----------

function init() {
  takeTokenFromHash();
  initToken();
  initSql();
  $('#streams-refresh').addEventListener('click', loadStreams);
  initReplay();
  window.addEventListener('hashchange', () => {
    if (location.hash.includes('token=')) { takeTokenFromHash(); $('#token-panel').hidden = true; loaded.clear(); }
    showView(currentView());
  });
  if (!VIEWS.includes(location.hash.replace(/^#/, ''))) history.replaceState(null, '', `${location.pathname}${location.search}#sql`);
  showView(currentView(), false);
  document.body.dataset.ready = 'true';
}

init();
