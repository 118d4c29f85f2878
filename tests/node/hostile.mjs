// Hostile client for `dynakv serve` (scripts/soak.sh runs it beside load.mjs): one at a time, for
// --seconds, it sends what broke or stalled the server before (issue 18) and checks the answer:
//   deep       a JSON body nested 100,000 deep                      -> 400
//   deepstop   the same nesting inside "stop"                       -> 400
//   chunked    a chunked body of 4 MiB, past --max-body (1 MiB)     -> 413
//   slow       a request head trickled a byte per second            -> closed by the server (10 s deadline)
//   badutf8    a prompt with invalid UTF-8 and NUL bytes            -> 200 or 400, never 5xx
//   hugemax    max_tokens 10^12 (capped by the server)              -> 200 or 400, never 5xx
// Prints {"sent": N, "as_expected": N, "unexpected": N, "by_kind": {...}, "problems": [...]} as JSON.
//
//   node tests/node/hostile.mjs --url http://127.0.0.1:PORT [--seconds 600] [--seed 1]
import http from 'node:http';
import net from 'node:net';

const opt = { seconds: 600, seed: 1 };
for (let i = 2; i < process.argv.length; i += 2) opt[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
opt.seconds = Number(opt.seconds);
if (!opt.url) {
  console.error('usage: node hostile.mjs --url URL [--seconds S] [--seed N]');
  process.exit(2);
}
const target = new URL(opt.url);

let state = Number(opt.seed) >>> 0;
function random() {  // mulberry32, as load.mjs
  state = (state + 0x6d2b79f5) >>> 0;
  let t = state;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

const counts = { sent: 0, as_expected: 0, unexpected: 0, by_kind: {} };
const problems = [];
function record(kind, ok, detail) {
  counts.sent += 1;
  counts.by_kind[kind] ??= { sent: 0, as_expected: 0 };
  counts.by_kind[kind].sent += 1;
  if (ok) {
    counts.as_expected += 1;
    counts.by_kind[kind].as_expected += 1;
  } else {
    counts.unexpected += 1;
    if (problems.length < 20) problems.push(`${kind}: ${detail}`);
  }
}

// POST with a given body (a Buffer or string); chunked when `chunks` is given. Resolves to
// {status, body} or {error}.
function post(body, chunks) {
  return new Promise((resolve) => {
    const headers = { 'Content-Type': 'application/json' };
    if (!chunks) headers['Content-Length'] = Buffer.byteLength(body);
    const req = http.request({ host: target.hostname, port: target.port, path: '/v1/completions', method: 'POST',
                               headers, timeout: 120000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { if (text.length < 4096) text += d; });
      res.on('end', () => resolve({ status: res.statusCode, body: text }));
      res.on('error', (e) => resolve({ error: e.message }));
    });
    req.on('timeout', () => { req.destroy(new Error('timeout')); });
    req.on('error', (e) => resolve({ error: e.message }));
    if (chunks) {
      let sent = 0;
      const piece = Buffer.alloc(64 * 1024, 'a');
      const more = () => {
        while (sent < chunks) {
          sent += 1;
          if (!req.write(piece)) { req.once('drain', more); return; }
        }
        req.end();
      };
      more();
    } else {
      req.end(body);
    }
  });
}

function nested(depth) { return '['.repeat(depth) + ']'.repeat(depth); }

// A connection that trickles a request head a byte a second; resolves to the seconds until the
// server closed it (or -1 if it was still open after 30 s).
function slow() {
  return new Promise((resolve) => {
    const head = 'GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: ';
    const t0 = Date.now();
    const s = net.connect(Number(target.port), target.hostname);
    let i = 0, done = false;
    const finish = (v) => { if (!done) { done = true; clearInterval(timer); s.destroy(); resolve(v); } };
    const timer = setInterval(() => {
      if ((Date.now() - t0) > 30000) return finish(-1);
      s.write(head[i % head.length]);
      i += 1;
    }, 1000);
    s.on('close', () => finish((Date.now() - t0) / 1000));
    s.on('error', () => finish((Date.now() - t0) / 1000));
  });
}

const kinds = {
  async deep() {
    const r = await post(nested(100000));
    record('deep', r.status === 400, JSON.stringify(r).slice(0, 200));
  },
  async deepstop() {
    const body = `{"prompt": "In the beginning", "max_tokens": 2, "stop": ${nested(100000)}}`;
    const r = await post(body);
    record('deepstop', r.status === 400, JSON.stringify(r).slice(0, 200));
  },
  async chunked() {
    const r = await post(null, 64);  // 64 x 64 KiB = 4 MiB
    // The server may answer 413 and close before the whole body is sent (EPIPE/ECONNRESET on our side).
    const ok = r.status === 413 || (r.error !== undefined && /EPIPE|ECONNRESET|socket hang up/.test(r.error));
    record('chunked', ok, JSON.stringify(r).slice(0, 200));
  },
  async slow() {
    const s = await slow();
    record('slow', s > 0 && s < 15, `closed after ${s} s`);
  },
  async badutf8() {
    const body = Buffer.concat([Buffer.from('{"prompt": "In the \u0000 beg'), Buffer.from([0xff, 0xfe, 0xc3]),
                                Buffer.from('inning", "max_tokens": 4, "temperature": 0}')]);
    const r = await post(body);
    record('badutf8', r.status === 200 || r.status === 400, JSON.stringify(r).slice(0, 200));
  },
  async hugemax() {
    const r = await post(JSON.stringify({ prompt: 'And God said', max_tokens: 1e12, temperature: 0 }));
    record('hugemax', r.status === 200 || r.status === 400 || r.status === 503, JSON.stringify(r).slice(0, 200));
  },
};

const names = Object.keys(kinds);
const until = Date.now() + opt.seconds * 1000;
const slowOnes = [];
while (Date.now() < until) {
  const k = names[Math.floor(random() * names.length)];
  if (k === 'slow') slowOnes.push(kinds.slow());  // runs beside the others
  else await kinds[k]();
  await new Promise((r) => setTimeout(r, 200));
}
await Promise.all(slowOnes);
console.log(JSON.stringify({ ...counts, problems }, null, 2));
