// lmserve playground: chat over /v1/chat/completions (streamed), with the inference X-ray
// ("xray": true) and the engine timeline (/v1/engine/status). Plain ES module, no dependencies.

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, poll: null, lastRequestId: null };

// ---- settings kept in localStorage ----------------------------------------------------------
const stored = (key, fallback) => localStorage.getItem(`lmserve.${key}`) ?? fallback;
const store = (key, value) => localStorage.setItem(`lmserve.${key}`, value);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: headers() });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// ---- theme ----------------------------------------------------------------------------------
function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}
function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  const theme = dark ? "light" : "dark";
  applyTheme(theme);
  store("theme", theme);
}

// ---- models ---------------------------------------------------------------------------------
async function loadModels() {
  try {
    const models = (await (await api("/v1/models")).json()).data;
    const select = $("model");
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    setStatus("");
  } catch (error) {
    setStatus(`Could not list models: ${error.message}${$("api-key").value ? "" : " (an API key may be needed)"}`);
  }
}

// ---- chat -----------------------------------------------------------------------------------
function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  li.append(label, body);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function number(id, parse = parseFloat) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function requestBody(xray) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { model: $("model").value || undefined, messages, stream: true,
    temperature: number("temperature"), top_p: number("top-p"), top_k: number("top-k", parseInt),
    max_tokens: number("max-tokens", parseInt) };
  if (xray) body.xray = true;
  return body;
}

// Server-sent events from a fetch body: yields each event's data.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const li = addMessage("assistant", "");
  const content = li.querySelector(".content");
  const xrayOn = $("xray-toggle").checked;
  const xray = { prompt: null, tokens: [], started: performance.now() };
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("Generating…");
  if (xrayOn) startPolling();
  let reply = "";
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(requestBody(xrayOn)),
      signal: state.controller.signal });
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      state.lastRequestId = chunk.id;
      if (chunk.xray) xray.prompt = chunk.xray;
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          content.textContent = reply;
        }
        if (choice.xray) xray.tokens.push(...choice.xray);
        if (choice.finish_reason) li.dataset.finishReason = choice.finish_reason;
      }
      if (xrayOn) renderXray(xray, chunk.id);
    }
    setStatus("");
  } catch (error) {
    if (error.name === "AbortError") setStatus("Stopped.");
    else { setStatus(`Error: ${error.message}`); li.classList.add("error"); }
  } finally {
    state.history.push({ role: "assistant", content: reply });
    li.dataset.done = "true";
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    if (xrayOn) {
      renderXray(xray, state.lastRequestId);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "show-xray";
      button.textContent = "Show X-ray";
      button.addEventListener("click", () => renderXray(xray, null));
      li.append(button);
      stopPolling(true);
    }
    $("input").focus();
  }
}

// ---- X-ray ----------------------------------------------------------------------------------
const pct = (logprob) => (Math.exp(logprob) * 100);
const visible = (text) => text.replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/ /g, "·");
const ms = (seconds) => (seconds * 1000).toFixed(1) + " ms";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showXrayPanel() {
  $("xray").hidden = false;
  document.querySelector(".layout").classList.add("with-xray");
}

function renderXray(xray, requestId) {
  showXrayPanel();
  const prompt = xray.prompt;
  const tokens = xray.tokens;
  // timing
  const timing = $("xray-timing");
  const rows = [];
  if (prompt) {
    const prefill = prompt.prefill || [];
    const prefillTime = prefill.reduce((sum, p) => sum + ((p.end ?? p.start) - p.start), 0);
    rows.push(["prompt tokens", `${prompt.num_prompt_tokens} (${prompt.cached_tokens} from the prefix cache)`]);
    rows.push(["prefill", `${prefill.length} step(s), ${prefill.map((p) => p.tokens).join(" + ") || 0} tokens, ${ms(prefillTime)}`]);
  }
  if (tokens.length) {
    rows.push(["time to first token", ms(tokens[0].t)]);
    if (tokens.length > 1) {
      const decode = tokens[tokens.length - 1].t - tokens[0].t;
      rows.push(["decode", `${tokens.length - 1} tokens, ${ms(decode / (tokens.length - 1))}/token`]);
    }
    rows.push(["KV blocks held", `${tokens[tokens.length - 1].kv_blocks}${prompt ? ` of ${prompt.num_kv_blocks}, ${prompt.block_size} tokens each` : ""}`]);
    const p = tokens[0].params;
    rows.push(["sampling rule", p.greedy ? "greedy (argmax)" :
      `temperature ${p.temperature}, top-k ${p.top_k || "off"}, top-p ${p.top_p}, min-p ${p.min_p}`]);
  }
  timing.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  // prompt tokens
  const box = $("xray-prompt");
  if (prompt) {
    const special = new Set(prompt.special);
    box.replaceChildren(...prompt.prompt_tokens.map((piece, i) => {
      const span = el("span", "tok", visible(piece));
      if (special.has(i)) span.classList.add("special");
      if (i < prompt.cached_tokens) span.classList.add("cached");
      span.title = `#${i} id ${prompt.prompt_token_ids[i]}${i < prompt.cached_tokens ? " (prefix cache, block " + Math.floor(i / prompt.block_size) + ")" : ""}`;
      return span;
    }));
    $("xray-prompt-info").textContent = `(${prompt.num_prompt_tokens}; special tokens in colour, prefix-cache hits shaded)`;
  }
  // generated tokens
  const body = $("xray-tokens").querySelector("tbody");
  body.replaceChildren(...tokens.map((r, i) => {
    const tr = el("tr", "xray-token");
    const keptBy = new Map(r.top_processed.map(([text, lp, id]) => [id, lp]));
    const cands = el("div", "cands");
    for (const [text, lp, id] of r.top) {
      const label = el("span", "cand-text" + (id === r.token_id ? " sampled" : ""), (id === r.token_id ? "▸" : "") + visible(text));
      const bars = el("span", "bars");
      const raw = el("span", "raw"); raw.style.width = `${pct(lp)}%`;
      bars.append(raw);
      if (keptBy.has(id)) { const kept = el("span", "kept"); kept.style.width = `${pct(keptBy.get(id))}%`; bars.append(kept); }
      const p = el("span", "cand-p", `${pct(lp).toFixed(1)}%` + (keptBy.has(id) ? `→${pct(keptBy.get(id)).toFixed(0)}` : "→0"));
      cands.append(label, bars, p);
    }
    const previous = i ? tokens[i - 1].t : (prompt && prompt.prefill.length ? prompt.prefill[0].start : 0);
    const cells = [el("td", "num", String(i + 1)), el("td", "cand-text", visible(r.token)), el("td", "num", String(r.rank + 1)),
      el("td"), el("td", "num", String(r.kv_blocks)), el("td", "num", String(r.step)), el("td", "num", String(r.batch_size)),
      el("td", "num", ((r.t - previous) * 1000).toFixed(1))];
    cells[3].append(cands);
    tr.append(...cells);
    return tr;
  }));
  if (requestId) state.xrayRequest = requestId;
}

// ---- engine timeline ------------------------------------------------------------------------
async function pollStatus() {
  try {
    const status = await (await api("/v1/engine/status?steps=64")).json();
    $("engine-status").textContent = `running ${status.num_running}, waiting ${status.num_waiting}, ` +
      `KV cache ${(status.kv_cache_usage * 100).toFixed(1)}% of ${status.num_kv_blocks} blocks, ` +
      `prefix-cache hit rate ${(status.prefix_cache_hit_rate * 100).toFixed(1)}%, step ${status.step}`;
    const mine = state.xrayRequest || state.lastRequestId;
    $("timeline").replaceChildren(...status.steps.slice().reverse().map((step) => {
      const row = el("div", "step");
      row.append(el("span", "idx", `#${step.step} ${step.ms.toFixed(0)}ms`));
      for (const [id, prefill, decode] of step.requests) {
        const seg = el("span", `seg ${prefill ? "prefill" : "decode"}`);
        seg.style.width = `${Math.min(200, 3 + Math.log2(1 + prefill + decode) * 6)}px`;
        seg.title = `${id}: ${prefill ? prefill + " prefill" : decode + " decode"} tokens`;
        if (mine && id.startsWith(mine)) seg.classList.add("mine");
        row.append(seg);
      }
      if (step.preemptions) row.append(el("span", "preempt", ` ${step.preemptions} preempted`));
      return row;
    }));
  } catch (error) {
    $("engine-status").textContent = `engine status unavailable: ${error.message}`;
  }
}
function startPolling() {
  showXrayPanel();
  stopPolling(false);
  pollStatus();
  state.poll = setInterval(pollStatus, 500);
}
function stopPolling(final) {
  if (state.poll) clearInterval(state.poll);
  state.poll = null;
  if (final) pollStatus();
}

// ---- wiring ---------------------------------------------------------------------------------
function init() {
  applyTheme(stored("theme", ""));
  $("theme").addEventListener("click", toggleTheme);
  $("api-key").value = stored("apiKey", "");
  $("api-key").addEventListener("change", () => { store("apiKey", $("api-key").value.trim()); loadModels(); });
  $("xray-toggle").checked = stored("xray", "") === "1";
  $("xray-toggle").addEventListener("change", () => store("xray", $("xray-toggle").checked ? "1" : ""));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
  loadModels();
  $("input").focus();
}

init();
