// The dashboard: plain DOM, no framework. It uses the public /v1 API with the token the user pastes, and
// one server-sent events stream (/v1/events, read with fetch so it can carry the Authorization header)
// for live progress.
const $ = (selector) => document.querySelector(selector);
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
const jobs = new Map();
let token = localStorage.getItem('ferry.token') ?? '';
let watching = false;

class Unauthorized extends Error {}

async function api(path, init = {}) {
  const headers = { authorization: `Bearer ${token}` };
  if (init.body) headers['content-type'] = 'application/json';
  const res = await fetch(path, { ...init, headers });
  if (res.status === 401) throw new Unauthorized('the token was refused');
  if (!res.ok) {
    const problem = await res.json().catch(() => ({}));
    throw new Error(problem.detail ?? `${res.status} ${res.statusText}`);
  }
  return res;
}

function showLogin(message = '') {
  $('#login').hidden = false;
  $('#jobs-view').hidden = true;
  $('#job-view').hidden = true;
  $('#login-error').textContent = message;
}

/** Reads the SSE stream; reconnects (and reloads the list, to catch up) when it drops. */
async function watchEvents() {
  if (watching) return;
  watching = true;
  try {
    const res = await api('/v1/events');
    $('#connection').textContent = 'live';
    await loadJobs();
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
        if (data) upsert(JSON.parse(data));
      }
    }
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin(err.message);
  } finally {
    watching = false;
  }
  $('#connection').textContent = 'reconnecting…';
  setTimeout(watchEvents, 2000);
}

async function loadJobs() {
  const page = await (await api('/v1/jobs?limit=100')).json();
  for (const job of page.jobs.reverse()) upsert(job);
}

async function loadFormats() {
  const formats = await (await api('/v1/formats')).json();
  const source = $('#submit-form [name=sourceFormat]');
  const target = $('#submit-form [name=targetFormat]');
  if (target.options.length) return;
  for (const f of formats) {
    source.append(new Option(f.name, f.name));
    if (f.writable) target.append(new Option(f.name, f.name, f.name === 'qcow2', f.name === 'qcow2'));
  }
}

function percent(job) {
  return job.progress.total > 0 ? Math.floor((job.progress.done / job.progress.total) * 100) : job.state === 'completed' ? 100 : 0;
}

function describePaths(job) {
  const s = job.spec ?? {};
  return s.source?.path && s.target?.path ? `${s.source.path} → ${s.target.path} (${s.target.format})` : '';
}

function upsert(job) {
  jobs.set(job.id, job);
  renderRow(job);
  if (location.hash === `#/jobs/${job.id}`) renderDetail(job, true);
}

function renderRow(job) {
  const body = $('#jobs tbody');
  let row = body.querySelector(`tr[data-job-id="${job.id}"]`);
  if (!row) {
    row = document.createElement('tr');
    row.dataset.jobId = job.id;
    row.innerHTML = '<td><a></a></td><td class="type"></td><td class="state"></td><td class="stage"></td><td><progress max="100" value="0"></progress> <span class="percent"></span></td><td class="paths"></td><td class="created"></td>';
    row.querySelector('a').href = `#/jobs/${job.id}`;
    row.querySelector('a').textContent = job.id.slice(0, 8);
    body.prepend(row);
  }
  row.querySelector('.type').textContent = job.type;
  const state = row.querySelector('.state');
  state.textContent = job.state;
  state.className = `state state-${job.state}`;
  row.querySelector('.stage').textContent = job.stage ?? '';
  row.querySelector('progress').value = percent(job);
  row.querySelector('.percent').textContent = `${percent(job)}%`;
  row.querySelector('.paths').textContent = describePaths(job);
  row.querySelector('.created').textContent = new Date(job.createdAt).toLocaleString();
  $('#no-jobs').hidden = true;
}

let logTimer;
function renderDetail(job, fromEvent = false) {
  $('#job-id').textContent = job.id;
  const fields = $('#job-fields');
  fields.replaceChildren();
  const show = { type: job.type, state: job.state, stage: job.stage, attempts: job.attempts, worker: job.worker, created: job.createdAt, started: job.startedAt, finished: job.finishedAt, request: describePaths(job) };
  if (job.error) show.error = `${job.error.type}: ${job.error.message}`;
  if (job.result) show.result = JSON.stringify(job.result, null, 2);
  for (const [name, value] of Object.entries(show)) {
    if (value === null || value === undefined || value === '') continue;
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = String(value);
    dd.dataset.field = name;
    fields.append(dt, dd);
  }
  $('#job-progress').max = 100;
  $('#job-progress').value = percent(job);
  $('#job-percent').textContent = `${percent(job)}%`;
  $('#cancel').hidden = TERMINAL.has(job.state);
  // The log changes with the state; progress events alone do not need it reloaded each time.
  clearTimeout(logTimer);
  logTimer = setTimeout(() => loadLog(job.id), fromEvent ? 500 : 0);
}

async function loadLog(id) {
  $('#job-log').textContent = await (await api(`/v1/jobs/${id}/log`)).text();
}

async function route() {
  if (!token) return showLogin();
  $('#login').hidden = true;
  const match = /^#\/jobs\/([\w-]+)$/.exec(location.hash);
  $('#jobs-view').hidden = Boolean(match);
  $('#job-view').hidden = !match;
  if (match) {
    try {
      renderDetail(jobs.get(match[1]) ?? (await (await api(`/v1/jobs/${match[1]}`)).json()));
    } catch (err) {
      if (err instanceof Unauthorized) return showLogin(err.message);
      $('#job-fields').textContent = err.message;
    }
  }
}

function parseOptions(text) {
  const options = {};
  for (const pair of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const at = pair.indexOf('=');
    if (at < 1) throw new Error(`option '${pair}' is not key=value`);
    options[pair.slice(0, at)] = pair.slice(at + 1);
  }
  return options;
}

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const result = $('#submit-result');
  result.className = '';
  try {
    const source = { path: form.source.value.trim() };
    if (form.sourceFormat.value) source.format = form.sourceFormat.value;
    const target = { path: form.target.value.trim(), format: form.targetFormat.value, compress: form.compress.checked };
    const options = parseOptions(form.options.value);
    if (Object.keys(options).length) target.options = options;
    const res = await api('/v1/jobs', { method: 'POST', body: JSON.stringify({ type: 'convert', source, target }) });
    const { id } = await res.json();
    result.textContent = `submitted ${id.slice(0, 8)}`;
  } catch (err) {
    result.className = 'error';
    result.textContent = err.message;
  }
}

async function start() {
  if (!token) return showLogin();
  try {
    await loadFormats();
  } catch (err) {
    if (err instanceof Unauthorized) return showLogin(err.message);
    throw err;
  }
  await route();
  void watchEvents();
}

$('#login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = $('#token').value.trim();
  localStorage.setItem('ferry.token', token);
  void start();
});
$('#submit-form').addEventListener('submit', submit);
$('#cancel').addEventListener('click', async () => {
  const id = $('#job-id').textContent;
  try {
    upsert(await (await api(`/v1/jobs/${id}`, { method: 'DELETE' })).json());
  } catch (err) {
    $('#cancel-result').textContent = err.message;
  }
});
window.addEventListener('hashchange', () => void route());
void start();
