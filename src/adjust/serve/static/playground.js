// adjust playground: runs one streaming /v1/completions request per panel (same prompt, seed, K) with
// stream_options.include_steps, and draws each step event onto a canvas of cells as it arrives (one pass at a
// time, at most one per `Step delay` ms).
"use strict";

const $ = (id) => document.getElementById(id);
const SIDES = ["left", "right"];
const DEFAULTS = { left: "parallel", right: "adjust" };
let modelId = null;

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const m = body.data[0];
    modelId = m.id;
    for (const side of SIDES) {
      const sel = $("strategy-" + side);
      sel.innerHTML = "";
      for (const name of m.strategies) {
        const o = document.createElement("option");
        o.value = o.textContent = name;
        if (name === DEFAULTS[side]) o.selected = true;
        sel.appendChild(o);
      }
    }
    $("model-line").textContent = `model ${m.id} | context ${m.context_length} tokens | joint sampler: ` +
      (m.sampler ? "yes" : "no (ADJUST unavailable)");
  } catch (e) {
    $("model-line").textContent = "could not list models: " + e.message;
    $("model-line").className = "legend error";
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setState(side, state, text) {
  $("panel-" + side).dataset.state = state;
  $("state-" + side).textContent = text || state;
  $("state-" + side).className = state === "error" ? "state error" : "state";
}

function makeCanvas(side, n) {
  const c = $("canvas-" + side);
  c.innerHTML = "";
  for (let i = 0; i < n; i++) {
    const cell = document.createElement("span");
    cell.className = "cell";
    cell.dataset.pos = i;
    cell.textContent = "\u00b7";
    c.appendChild(cell);
  }
  return c;
}

// One panel's run: one streaming request; its step events are drawn as they arrive.
async function runSide(side, params) {
  const strategy = $("strategy-" + side).value;
  $("title-" + side).textContent = strategy === "exact" ? "exact (K=1)" : `${strategy} (K=${params.k})`;
  $("text-" + side).textContent = "";
  $("stats-" + side).textContent = "";
  const canvas = makeCanvas(side, params.maxTokens);
  const tokens = new Array(params.maxTokens).fill(null);
  const pieces = new Array(params.maxTokens).fill("");
  setState(side, "running", "decoding\u2026");
  const body = {
    model: modelId, prompt: params.prompt, max_tokens: params.maxTokens, seed: params.seed,
    temperature: params.temperature, strategy: strategy, tokens_per_pass: strategy === "exact" ? 1 : params.k,
    stream: true, stream_options: { include_steps: true, include_usage: true },
  };
  const delay = Math.max(0, Number($("delay").value) || 0);
  let passes = 0, text = "", stats = null, failure = null;
  // each pass is drawn as its event arrives, but no faster than one per `delay` ms
  let drawn = Promise.resolve();
  const draw = (ev) => {
    for (const old of canvas.querySelectorAll(".new")) old.classList.remove("new");
    for (const [pos, tok, piece] of ev.unmasked) {
      tokens[pos] = tok;
      pieces[pos] = piece;
      const cell = canvas.children[pos];
      cell.textContent = piece.length ? piece.replace(/\n/g, "\u21b5") : "\u2423";
      cell.classList.add("filled", "new");
      cell.style.background = `hsl(${(ev.step * 37) % 360} 70% 88%)`;
      cell.title = `pass ${ev.step}, token ${tok}`;
    }
    for (let i = 1; i < tokens.length; i++) {
      const repeat = tokens[i] !== null && tokens[i] === tokens[i - 1] && pieces[i].trim() !== "";
      canvas.children[i].classList.toggle("dup", repeat);
    }
    setState(side, "running", `pass ${ev.step + 1}`);
    return delay ? new Promise((r) => setTimeout(r, delay)) : null;
  };
  try {
    const resp = await fetch("/v1/completions", { method: "POST", headers: authHeaders(), body: JSON.stringify(body) });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : resp.status + " " + resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        if (ev.object === "adjust.step") {
          passes += 1;
          drawn = drawn.then(() => draw(ev));
        }
        else if (ev.choices && ev.choices.length) text += ev.choices[0].text || "";
        if (ev.adjust_stats) stats = ev.adjust_stats;
      }
    }
  } catch (e) {
    failure = e;
  }
  await drawn;
  for (const old of canvas.querySelectorAll(".new")) old.classList.remove("new");
  if (failure) {
    setState(side, "error", "error: " + failure.message);
    $("text-" + side).textContent = failure.message;
    $("text-" + side).classList.add("error");
    return;
  }
  $("text-" + side).classList.remove("error");
  $("text-" + side).textContent = text;
  if (stats) {
    $("stats-" + side).textContent = `${stats.full_passes} full passes | ${stats.sampler_passes} sampler passes | ` +
      `${stats.tokens_per_full_pass} tokens per full pass`;
  }
  setState(side, "done", `done in ${passes} passes`);
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!modelId) await loadModel();
  const params = {
    prompt: $("prompt").value,
    k: Number($("k").value),
    maxTokens: Math.max(1, Number($("max-tokens").value) || 32),
    seed: Number($("seed").value) || 0,
    temperature: Number($("temperature").value),
  };
  $("run").disabled = true;
  try {
    await Promise.all(SIDES.map((side) => runSide(side, params)));
  } finally {
    $("run").disabled = false;
  }
});

$("api-key").addEventListener("change", loadModel);
loadModel();
