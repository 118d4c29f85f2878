// Load client for `dynakv serve` (plain fetch, no SDK): N concurrent clients send a bounded
// number of requests, a mix of good greedy completions (each answer checked against the expected
// text), malformed ones (bad JSON, bad fields: 400 expected) and streams the client hangs up on
// after the first event. Prints the counts as JSON; `crashed` (a transport error or a 5xx other
// than 503 on a request the client did not abort) must stay 0, and /health must answer 200 at the
// end. Stops by itself: after --requests requests or --seconds seconds, whichever comes first.
//
//   node tests/node/load.mjs --url http://127.0.0.1:PORT [--expected expected.json]
//        [--clients 32] [--requests 256] [--seconds 60] [--mix good,bad,hangup] [--seed 1]
//        [--backoff MS after a 503, default 100]
// expected.json: {"max_tokens": 16, "prompts": [{"prompt": "...", "text": "..."}, ...]}; without it
// (a throughput run, scripts/serve_bench.sh) built-in prompts are sent and any well-formed 200
// counts as ok, with --max-tokens tokens asked for (default 32).
import { readFileSync } from 'node:fs';

function args() {
  const a = { clients: 32, requests: 256, seconds: 60, mix: '0.7,0.2,0.1', seed: 1, backoff: 100, 'max-tokens': 32 };
  for (let i = 2; i < process.argv.length; i += 2) a[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
  for (const k of ['clients', 'requests', 'seconds', 'seed', 'backoff', 'max-tokens']) a[k] = Number(a[k]);
  a.mix = a.mix.split(',').map(Number);
  if (!a.url) {
    console.error('usage: node load.mjs --url URL [--expected FILE] [--clients N] [--requests N] [--seconds S] [--mix g,b,h]');
    process.exit(2);
  }
  return a;
}

const opt = args();
const builtin = ['In the beginning God created', 'The Fulton County Grand Jury said', 'And God said, Let there be',
                 'It recommended that Fulton legislators act', 'Blessed is the man that walketh not'];
const expected = opt.expected ? JSON.parse(readFileSync(opt.expected, 'utf8'))
                              : { max_tokens: opt['max-tokens'], prompts: builtin.map((prompt) => ({ prompt })) };

// A small seeded generator (mulberry32), so a run's mix is reproducible.
let state = opt.seed >>> 0;
function random() {
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (list) => list[Math.floor(random() * list.length)];

const malformed = [
  ['/v1/completions', '{"prompt": "unterminated'],
  ['/v1/completions', '[1, 2, 3]'],
  ['/v1/completions', '{"prompt": 5}'],
  ['/v1/completions', '{"prompt": "a", "max_tokens": -3}'],
  ['/v1/completions', '{"prompt": "a", "temperature": "hot"}'],
  ['/v1/completions', '{"prompt": "a", "stop": [1]}'],
  ['/v1/chat/completions', '{"messages": []}'],
  ['/v1/chat/completions', '{"messages": [{"role": "robot", "content": "x"}]}'],
  ['/v1/chat/completions', '{"messages": "hello"}'],
];

const counts = { sent: 0, ok: 0, wrong: 0, rejected_400: 0, rejected_503: 0, hung_up: 0, crashed: 0,
                 completion_tokens: 0 };
const problems = [];
function problem(what) {
  if (problems.length < 10) problems.push(what);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// A client told 503 (queue full) waits a little before its next request, as Retry-After asks.
async function refused(res) {
  await res.text();
  counts.rejected_503 += 1;
  await sleep(opt.backoff);
}

async function post(path, body, signal) {
  return fetch(`${opt.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal });
}

// Reads an SSE body into the concatenated text deltas; null when the stream carried an error.
async function readStream(res) {
  const raw = await res.text();
  let text = '', usage = null;
  for (const block of raw.split('\n\n')) {
    if (!block.startsWith('data: ')) continue;
    const data = block.slice(6);
    if (data === '[DONE]') continue;
    const chunk = JSON.parse(data);
    if (chunk.error) return { error: chunk.error };
    text += chunk.choices[0]?.text ?? '';
    usage = chunk.usage ?? usage;
  }
  return { text, usage };
}

async function good() {
  const p = pick(expected.prompts);
  const stream = random() < 0.5;
  const res = await post('/v1/completions', JSON.stringify({ prompt: p.prompt, max_tokens: expected.max_tokens,
                                                             temperature: 0, stream }));
  if (res.status === 503) return refused(res);
  if (res.status !== 200) { counts.crashed += 1; problem(`good: HTTP ${res.status} ${await res.text()}`); return; }
  const r = stream ? await readStream(res) : await res.json().then((b) => ({ text: b.choices[0].text, usage: b.usage }));
  if (r.error) {
    if (r.error.code === 'timeout') { counts.rejected_503 += 1; return; }
    counts.crashed += 1;
    problem(`good: stream error ${JSON.stringify(r.error)}`);
    return;
  }
  if (p.text === undefined ? typeof r.text === 'string' : r.text === p.text) {
    counts.ok += 1;
    counts.completion_tokens += r.usage?.completion_tokens ?? 0;
  } else {
    counts.wrong += 1;
    problem(`wrong answer for ${JSON.stringify(p.prompt)}: ${JSON.stringify(r.text)} != ${JSON.stringify(p.text)}`);
  }
}

async function bad() {
  const [path, body] = pick(malformed);
  const res = await post(path, body);
  const text = await res.text();
  let shaped = false;
  try { shaped = typeof JSON.parse(text).error?.message === 'string'; } catch { shaped = false; }
  if (res.status === 400 && shaped) counts.rejected_400 += 1;
  else { counts.crashed += 1; problem(`bad: HTTP ${res.status} ${text}`); }
}

async function hangup() {
  const p = pick(expected.prompts);
  const ctl = new AbortController();
  try {
    const res = await post('/v1/completions', JSON.stringify({ prompt: p.prompt, max_tokens: 200, temperature: 0,
                                                               stream: true }), ctl.signal);
    if (res.status === 503) return refused(res);
    const reader = res.body.getReader();
    await reader.read();  // the first event, then hang up
    ctl.abort();
    counts.hung_up += 1;
  } catch (e) {
    if (e.name === 'AbortError') counts.hung_up += 1;
    else { counts.crashed += 1; problem(`hangup: ${e.message}`); }
  }
}

async function one() {
  const r = random();
  counts.sent += 1;
  try {
    if (r < opt.mix[0]) await good();
    else if (r < opt.mix[0] + opt.mix[1]) await bad();
    else await hangup();
  } catch (e) {
    counts.crashed += 1;
    problem(`transport: ${e.cause?.code ?? ''} ${e.message}`);
  }
}

const start = performance.now();
const deadline = start + opt.seconds * 1000;
let issued = 0;
async function client() {
  while (issued < opt.requests && performance.now() < deadline) {
    issued += 1;
    await one();
  }
}
await Promise.all(Array.from({ length: opt.clients }, client));
const seconds = (performance.now() - start) / 1000;

let health = 0, metrics = {};
try {
  health = (await fetch(`${opt.url}/health`)).status;
  const text = await (await fetch(`${opt.url}/metrics`)).text();
  for (const line of text.split('\n')) {
    const m = line.match(/^(dynakv_[a-z_]+) ([0-9.e+-]+)$/);
    if (m) metrics[m[1]] = Number(m[2]);
  }
} catch (e) {
  problem(`after the run: ${e.message}`);
}
console.log(JSON.stringify({ ...counts, seconds, requests_per_s: counts.ok / seconds,
                             tokens_per_s: counts.completion_tokens / seconds, health, metrics, problems }, null, 2));
