// End-to-end client for `dynakv serve`, written with the official `openai` package:
// completions and chat completions, streaming and not, greedy, and one bad request; prints
// every request with its answer as one JSON object (tests/test_serve_e2e.cpp checks them).
//
//   node tests/node/openai_client.mjs http://127.0.0.1:PORT [MAX_TOKENS]
import OpenAI from 'openai';

const base = process.argv[2];
const maxTokens = Number(process.argv[3] ?? 24);
if (!base) {
  console.error('usage: node openai_client.mjs BASE_URL [MAX_TOKENS]');
  process.exit(2);
}
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60_000 });

const prompts = ['In the beginning God created', 'The jury said it did find that'];
const conversation = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Who made the heaven and the earth?' },
];

async function complete(prompt, stream) {
  const params = { model: 'dynakv', prompt, max_tokens: maxTokens, temperature: 0 };
  if (!stream) {
    const r = await client.completions.create(params);
    return { prompt, stream, id: r.id, object: r.object, text: r.choices[0].text,
             finish_reason: r.choices[0].finish_reason, usage: r.usage };
  }
  const s = await client.completions.create({ ...params, stream: true });
  let text = '', finish = null, usage = null, chunks = 0, object = null;
  for await (const chunk of s) {
    chunks += 1;
    object = chunk.object;
    text += chunk.choices[0]?.text ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
    usage = chunk.usage ?? usage;
  }
  return { prompt, stream, object, text, finish_reason: finish, usage, chunks };
}

async function chat(messages, stream) {
  const params = { model: 'dynakv', messages, max_tokens: maxTokens, temperature: 0 };
  if (!stream) {
    const r = await client.chat.completions.create(params);
    const m = r.choices[0].message;
    return { messages, stream, id: r.id, object: r.object, role: m.role, text: m.content,
             finish_reason: r.choices[0].finish_reason, usage: r.usage };
  }
  const s = await client.chat.completions.create({ ...params, stream: true });
  let text = '', role = null, finish = null, usage = null, chunks = 0, object = null;
  for await (const chunk of s) {
    chunks += 1;
    object = chunk.object;
    const delta = chunk.choices[0]?.delta ?? {};
    role = delta.role ?? role;
    text += delta.content ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
    usage = chunk.usage ?? usage;
  }
  return { messages, stream, object, role, text, finish_reason: finish, usage, chunks };
}

// A request the server must refuse: the SDK turns the 400 body into a BadRequestError.
async function badRequest() {
  try {
    await client.completions.create({ model: 'dynakv', prompt: 'x', max_tokens: -1 });
    return { status: 200 };
  } catch (e) {
    return { status: e.status, class: e.constructor.name, type: e.type, param: e.param, code: e.code,
             message: e.message };
  }
}

const models = await client.models.list();
const out = { models: models.data.map((m) => m.id), completions: [], chats: [], errors: [] };
for (const p of prompts) {
  for (const stream of [false, true]) out.completions.push(await complete(p, stream));
}
for (const stream of [false, true]) out.chats.push(await chat(conversation, stream));
out.errors.push(await badRequest());
console.log(JSON.stringify(out, null, 2));
