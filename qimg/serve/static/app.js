// qimg web page: a plain client of the server's HTTP API (no framework, no CDN, works offline).
// Jobs are submitted with `Prefer: respond-async`, followed on /v1/jobs/{id}/events (SSE read with fetch, so the
// API key header can be sent), and their files fetched with the key into blob URLs.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const KEY_STORE = "qimg.apiKey";

const state = {
  key: localStorage.getItem(KEY_STORE) || "",
  job: null,          // the job being followed
  models: [],
  editFiles: [],      // File objects for the edit tab
  layersFile: null,   // File for the layers tab
  layers: [],         // [{id, name, visible}] bottom to top
  blobs: new Map(),   // file id -> object URL
};

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// ---- API key ----------------------------------------------------------------------------------------------
let keyWaiters = null;
function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-dialog p").textContent = message || "This server needs an API key.";
  $("#key-input").value = state.key;
  if (!dialog.open) dialog.showModal();
  if (!keyWaiters) keyWaiters = [];
  return new Promise((resolve) => keyWaiters.push(resolve));
}
function keyDone(saved) {
  const dialog = $("#key-dialog");
  if (saved) {
    state.key = $("#key-input").value.trim();
    if (state.key) localStorage.setItem(KEY_STORE, state.key); else localStorage.removeItem(KEY_STORE);
    state.blobs.clear();
  }
  if (dialog.open) dialog.close();
  const waiters = keyWaiters || [];
  keyWaiters = null;
  waiters.forEach((w) => w(saved));
}

// ---- HTTP ---------------------------------------------------------------------------------------------------
async function api(path, options = {}, retried = false) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", "Bearer " + state.key);
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError("cannot reach the server: " + err.message, 0);
  }
  if (res.status === 401 && !retried) {
    let message = "This server needs an API key.";
    try { message = (await res.json()).error.message; } catch (_) { /* keep the default */ }
    if (await askKey(message)) return api(path, options, true);
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { const body = await res.json(); if (body.error && body.error.message) message = body.error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(message, res.status);
  }
  return res;
}

async function fileUrl(id) {
  if (state.blobs.has(id)) return state.blobs.get(id);
  const res = await api(`/v1/files/${encodeURIComponent(id)}`);
  const url = URL.createObjectURL(await res.blob());
  state.blobs.set(id, url);
  return url;
}

// ---- messages ----------------------------------------------------------------------------------------------
function showError(err) {
  $("#error-text").textContent = err && err.message ? err.message : String(err);
  $("#error").hidden = false;
}
function clearError() { $("#error").hidden = true; $("#error-text").textContent = ""; }

// ---- tabs ------------------------------------------------------------------------------------------------------
function selectTab(name) {
  $$(".tabs button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.tab === name)));
  $$(".panel").forEach((p) => { p.hidden = p.dataset.kind !== name; });
  history.replaceState(null, "", "#" + name);
}

// ---- models and health ---------------------------------------------------------------------------------------
async function loadModels() {
  const res = await api("/v1/models");
  state.models = (await res.json()).data;
  $$(".model-select").forEach((select) => {
    const task = select.dataset.task;
    const fit = state.models.filter((m) => m.tasks === null || m.tasks.includes(task));
    select.innerHTML = "";
    fit.forEach((m) => {
      const opt = document.createElement("option");
      opt.value = m.id; opt.textContent = m.id + (m.state === "loaded" ? "" : ` (${m.state})`);
      select.append(opt);
    });
    if (!fit.length) {
      const opt = document.createElement("option");
      opt.value = ""; opt.textContent = `(no model does ${task})`;
      select.append(opt);
    }
  });
  // an embedded tiny model offers its own example prompts as placeholders (it draws coloured shapes only)
  const chosen = (select) => state.models.find((m) => m.id === select.value);
  [["#panel-generate", "#gen-prompt", "generate"], ["#panel-edit", "#edit-prompt", "edit"]].forEach(([form, box, task]) => {
    const model = chosen($(`${form} .model-select`));
    const examples = model && model.details && model.details.examples;
    if (examples && examples[task]) {
      $(box).placeholder = examples[task][0];
      $(box).title = "this server's model is the embedded qimg-tiny; it knows prompts like: " + examples[task].join(" | ");
    }
  });
  // the sampler menus list what the server's pipelines offer (their describe()), euler first as the default
  const offered = state.models.find((m) => m.details && Array.isArray(m.details.samplers));
  if (offered) {
    $$(".sampler-select").forEach((select) => {
      const chosen = select.value;
      select.innerHTML = "";
      offered.details.samplers.slice().sort((a, b) => (a === "euler" ? -1 : b === "euler" ? 1 : 0)).forEach((name) => {
        const opt = document.createElement("option");
        opt.value = name === "euler" ? "" : name; opt.textContent = name === "euler" ? "euler (default)" : name;
        select.append(opt);
      });
      select.value = chosen;
    });
  }
}

async function checkHealth() {
  try {
    const res = await fetch("/health");
    const health = await res.json();
    const names = Object.entries(health.models).map(([k, v]) => (v === "loaded" ? k : `${k}: ${v}`));
    $("#server-status").textContent = `qimg ${health.version} · ${names.join(", ")}`;
    return health;
  } catch (err) {
    $("#server-status").textContent = "server unreachable";
    return null;
  }
}

// ---- progress ----------------------------------------------------------------------------------------------------
function progressStart(job) {
  state.job = job;
  $("#progress-box").hidden = false;
  $("#progress").max = 1; $("#progress").value = 0;
  $("#progress-step").textContent = `${job.id}: queued`;
  $("#progress-eta").textContent = "";
  $("#preview").hidden = true;
  $("#cancel").disabled = false;
}
function progressUpdate(ev) {
  const bar = $("#progress");
  if (ev.stage === "denoise") {
    bar.max = ev.total; bar.value = ev.step;
    $("#progress-step").textContent = `step ${ev.step}/${ev.total}` + (ev.cache_skipped ? ` (cache skipped ${ev.cache_skipped} model calls)` : "");
    $("#progress-eta").textContent = ev.eta == null ? "" : `· ETA ${ev.eta.toFixed(1)} s`;
  } else {
    $("#progress-step").textContent = ev.stage === "decode" ? `decoding… (${bar.value}/${bar.max})` : "encoding…";
  }
  if (ev.preview) {
    $("#preview").src = "data:image/png;base64," + ev.preview;
    $("#preview").hidden = false;
  }
}
function progressEnd(job) {
  const bar = $("#progress");
  $("#cancel").disabled = true;
  if (job.status === "succeeded") {
    const steps = (job.result && job.result.steps) || (job.params && job.params.steps);
    if (bar.max <= 1 && steps) bar.max = steps;
    bar.value = bar.max;
    const secs = job.timings && job.timings.run_s != null ? ` in ${job.timings.run_s.toFixed(1)} s` : "";
    $("#progress-step").textContent = `done: ${bar.value}/${bar.max}${secs}`;
  } else {
    $("#progress-step").textContent = job.status;
  }
  $("#progress-eta").textContent = "";
  $("#preview").hidden = true;
  state.job = null;
}

// Read /v1/jobs/{id}/events (SSE) until "done"; returns the final job.
async function follow(jobId) {
  const res = await api(`/v1/jobs/${jobId}/events`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finalJob = null;
  while (finalJob === null) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message"; const data = [];
      block.split("\n").forEach((line) => {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      });
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (event === "progress") progressUpdate(payload);
      else if (event === "status") $("#progress-step").textContent = `${jobId}: ${payload.job.status}`;
      else if (event === "done") { finalJob = payload.job; break; }
    }
  }
  try { await reader.cancel(); } catch (_) { /* already closed */ }
  if (finalJob === null) finalJob = await (await api(`/v1/jobs/${jobId}`)).json();
  return finalJob;
}

async function runJob(path, body, button) {
  clearError();
  button.disabled = true;
  try {
    const headers = { Prefer: "respond-async" };
    let payload = body;
    if (!(body instanceof FormData)) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
    const res = await api(path, { method: "POST", headers, body: payload });
    const job = await res.json();
    progressStart(job);
    refreshHistory();
    const final = await follow(job.id);
    progressEnd(final);
    refreshHistory();
    if (final.status === "queued") {  // the server stopped first; it keeps the job and runs it when it starts again
      throw new ApiError("the server stopped before this job ran; it stays queued and runs when the server starts " +
                         "again (see the history)", 0);
    }
    if (final.status !== "succeeded") {
      throw new ApiError(final.error ? final.error.message : `job ${final.status}`, 0);
    }
    if (final.params && final.params.warning) showError(`note: ${final.params.warning}`);
    return final;
  } finally {
    button.disabled = false;
  }
}

// ---- form helpers -------------------------------------------------------------------------------------------------
function formFields(form) {
  const out = {};
  new FormData(form).forEach((value, key) => {
    if (typeof value === "string" && value.trim() !== "") out[key] = value.trim();
  });
  return out;
}
// the page's one LoRA field (name + scale) as the API's `loras` list; multipart forms send it as JSON text
function loraFields(fields, asText) {
  const out = { ...fields };
  if (out.lora) {
    const loras = [{ name: out.lora, scale: out.lora_scale ? parseFloat(out.lora_scale) : 1 }];
    out.loras = asText ? JSON.stringify(loras) : loras;
  }
  delete out.lora; delete out.lora_scale;
  return out;
}
async function loadLoras() {
  let loras = [];
  try { loras = (await (await api("/v1/loras")).json()).data; } catch (err) { return; }
  $$(".lora-select").forEach((select) => {
    const chosen = select.value;
    select.innerHTML = '<option value="">(none)</option>';
    loras.filter((l) => !l.error).forEach((l) => {
      const opt = document.createElement("option");
      opt.value = l.id;
      opt.textContent = l.id + (l.ranks && l.ranks.length ? ` (rank ${l.ranks.join("-")})` : "");
      select.append(opt);
    });
    select.value = chosen;
  });
  $$(".lora-field").forEach((label) => { label.hidden = !loras.length; });
}
const INTS = ["steps", "seed", "n", "layers", "resolution"];
const FLOATS = ["guidance_scale"];
function typed(fields) {
  const out = { ...fields };
  INTS.forEach((k) => { if (k in out) out[k] = parseInt(out[k], 10); });
  FLOATS.forEach((k) => { if (k in out) out[k] = parseFloat(out[k]); });
  return out;
}

async function showImages(container, files) {
  container.innerHTML = "";
  for (const f of files) {
    const img = document.createElement("img");
    img.alt = "result"; img.dataset.fileId = f.id;
    img.src = await fileUrl(f.id);
    const link = document.createElement("a");
    link.href = img.src; link.download = f.filename; link.title = "download"; link.append(img);
    container.append(link);
  }
}

// ---- generate ------------------------------------------------------------------------------------------------------
async function onGenerate(ev) {
  ev.preventDefault();
  const form = $("#panel-generate");
  const body = typed(loraFields(formFields(form), false));
  body.response_format = "url";
  try {
    const job = await runJob("/v1/images/generations", body, $("#gen-run"));
    await showImages($("#gen-result"), job.outputs);
  } catch (err) { showError(err); }
}

// ---- edit -----------------------------------------------------------------------------------------------------------
function renderEditThumbs() {
  const box = $("#edit-thumbs");
  box.innerHTML = "";
  state.editFiles.forEach((file, i) => {
    const div = document.createElement("div"); div.className = "thumb";
    const img = document.createElement("img"); img.src = URL.createObjectURL(file); img.alt = file.name;
    const rm = document.createElement("button"); rm.type = "button"; rm.textContent = "×"; rm.title = "remove";
    rm.onclick = () => { state.editFiles.splice(i, 1); renderEditThumbs(); };
    div.append(img, rm); box.append(div);
  });
}
function addEditFiles(files) {
  const images = Array.from(files).filter((f) => /^image\//.test(f.type));
  state.editFiles = state.editFiles.concat(images);
  if (state.editFiles.length > 10) {
    state.editFiles = state.editFiles.slice(0, 10);
    showError("at most 10 images: the extra ones were left out");
  }
  renderEditThumbs();
}
function setCompare(beforeUrl, afterUrl) {
  $("#compare-before").src = beforeUrl;
  $("#compare-after").src = afterUrl;
  $("#edit-compare").hidden = false;
  updateCompare();
}
function updateCompare() {
  const v = $("#compare-range").value;
  $("#compare-after").style.clipPath = `inset(0 0 0 ${v}%)`;
  $("#compare-line").style.left = `${v}%`;
}
async function onEdit(ev) {
  ev.preventDefault();
  if (!state.editFiles.length) { showError("drop 1 to 10 images to edit first"); return; }
  const fields = loraFields(formFields($("#panel-edit")), true);
  const body = new FormData();
  Object.entries(fields).forEach(([k, v]) => body.append(k, v));
  state.editFiles.forEach((f) => body.append(state.editFiles.length > 1 ? "image[]" : "image", f, f.name));
  try {
    const job = await runJob("/v1/images/edits", body, $("#edit-run"));
    await showImages($("#edit-result"), job.outputs);
    setCompare(URL.createObjectURL(state.editFiles[0]), await fileUrl(job.outputs[0].id));
  } catch (err) { showError(err); }
}

// ---- layers ---------------------------------------------------------------------------------------------------------
function setLayersFile(file) {
  if (!file || !/^image\//.test(file.type)) { showError("that is not an image"); return; }
  state.layersFile = file;
  const box = $("#layers-thumbs"); box.innerHTML = "";
  const div = document.createElement("div"); div.className = "thumb";
  const img = document.createElement("img"); img.src = URL.createObjectURL(file); img.alt = file.name;
  div.append(img); box.append(div);
}
async function renderLayers() {
  const stack = $("#layers-stack"), list = $("#layer-list");
  stack.innerHTML = ""; list.innerHTML = "";
  if (!state.layers.length) return;
  const base = document.createElement("img");
  base.className = "base"; base.alt = ""; base.src = await fileUrl(state.layers[0].id);
  stack.append(base);
  for (const layer of state.layers) {  // bottom to top: later elements paint on top
    const img = document.createElement("img");
    img.alt = layer.name; img.src = await fileUrl(layer.id); img.hidden = !layer.visible;
    img.dataset.fileId = layer.id;
    stack.append(img);
  }
  const n = state.layers.length;
  [...state.layers].reverse().forEach((layer, r) => {  // the list shows the top layer first
    const i = n - 1 - r;
    const li = document.createElement("li");
    li.dataset.fileId = layer.id;
    if (!layer.visible) li.classList.add("hidden-layer");
    const vis = document.createElement("input");
    vis.type = "checkbox"; vis.checked = layer.visible; vis.title = "visible"; vis.className = "layer-visible";
    vis.setAttribute("aria-label", `show ${layer.name}`);
    vis.onchange = () => { layer.visible = vis.checked; renderLayers(); };
    const thumb = document.createElement("img"); thumb.className = "checker"; thumb.alt = "";
    fileUrl(layer.id).then((u) => { thumb.src = u; });
    const name = document.createElement("span"); name.className = "name"; name.textContent = layer.name;
    const up = document.createElement("button"); up.type = "button"; up.className = "small layer-up"; up.textContent = "↑";
    up.title = "move up"; up.disabled = i === n - 1;
    up.onclick = () => { [state.layers[i], state.layers[i + 1]] = [state.layers[i + 1], state.layers[i]]; renderLayers(); };
    const down = document.createElement("button"); down.type = "button"; down.className = "small layer-down"; down.textContent = "↓";
    down.title = "move down"; down.disabled = i === 0;
    down.onclick = () => { [state.layers[i], state.layers[i - 1]] = [state.layers[i - 1], state.layers[i]]; renderLayers(); };
    li.append(vis, thumb, name, up, down);
    list.append(li);
  });
  $("#layers-view").hidden = false;
}
function showLayers(job) {
  state.layers = job.outputs.filter((f) => f.role === "layer").sort((a, b) => a.index - b.index)
    .map((f, i) => ({ id: f.id, name: `Layer ${i + 1}`, visible: true }));
  return renderLayers();
}
async function onLayers(ev) {
  ev.preventDefault();
  if (!state.layersFile) { showError("drop an image to decompose first"); return; }
  const fields = loraFields(formFields($("#panel-layers")), true);
  const body = new FormData();
  Object.entries(fields).forEach(([k, v]) => body.append(k, v));
  body.append("format", "json");
  body.append("image", state.layersFile, state.layersFile.name);
  try {
    const job = await runJob("/v1/images/layers", body, $("#layers-run"));
    await showLayers(job);
  } catch (err) { showError(err); }
}
async function downloadLayers(format) {
  clearError();
  const visible = state.layers.filter((l) => l.visible);
  if (!visible.length) { showError("no visible layer to download"); return; }
  try {
    const res = await api("/v1/images/layers/export", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ layers: visible.map((l) => l.id), format, names: visible.map((l) => l.name) }),
    });
    const file = await res.json();
    const blob = await (await api(`/v1/files/${file.id}`)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = `qimg-layers.${format}`;
    document.body.append(a); a.click(); a.remove();
  } catch (err) { showError(err); }
}

// ---- history ------------------------------------------------------------------------------------------------------------
let historyBusy = false;
async function refreshHistory() {
  if (historyBusy) return;
  historyBusy = true;
  try {
    const res = await api("/v1/jobs?limit=40");
    const jobs = (await res.json()).data;
    const list = $("#history");
    list.innerHTML = "";
    for (const job of jobs) {
      const li = document.createElement("li");
      li.dataset.jobId = job.id; li.dataset.status = job.status; li.dataset.kind = job.kind;
      const shown = job.kind === "layers" ? job.inputs[0] : (job.outputs[0] || job.inputs[0]);
      if (shown && job.status === "succeeded") {
        const img = document.createElement("img"); img.alt = job.params.prompt || job.kind;
        img.className = "checker";
        fileUrl(shown.id).then((u) => { img.src = u; }).catch(() => {});
        li.append(img);
      } else {
        const ph = document.createElement("div"); ph.className = "noimg"; ph.textContent = job.status;
        li.append(ph);
      }
      const meta = document.createElement("div"); meta.className = "meta";
      meta.textContent = `${job.kind} · ${job.status}${job.params.prompt ? " · " + job.params.prompt : ""}`;
      meta.title = job.error ? job.error.message : (job.params.prompt || "");
      li.append(meta);
      li.onclick = () => openJob(job);
      list.append(li);
    }
  } catch (err) {
    if (err.status !== 401) showError(err);
  } finally {
    historyBusy = false;
  }
}
async function openJob(job) {
  clearError();
  selectTab(job.kind === "layers" ? "layers" : job.kind);
  if (job.status !== "succeeded") { showError(job.error ? job.error.message : `job ${job.status}`); return; }
  try {
    if (job.kind === "generate") {
      const form = $("#panel-generate");
      form.prompt.value = job.params.prompt || "";
      form.negative_prompt.value = job.params.negative_prompt || "";
      form.seed.value = job.result.seed != null ? job.result.seed : "";
      await showImages($("#gen-result"), job.outputs);
    } else if (job.kind === "edit") {
      $("#panel-edit").prompt.value = job.params.prompt || "";
      await showImages($("#edit-result"), job.outputs);
      if (job.inputs.length) setCompare(await fileUrl(job.inputs[0].id), await fileUrl(job.outputs[0].id));
    } else if (job.kind === "layers") {
      await showLayers(job);
    }
  } catch (err) { showError(err); }
}

// ---- drop zones --------------------------------------------------------------------------------------------------------
function dropZone(zone, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) onFiles(e.dataTransfer.files);
  });
}

// ---- start ------------------------------------------------------------------------------------------------------------------
function init() {
  $$(".tabs button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));
  $("#error-close").onclick = clearError;
  $$(".dice").forEach((b) => b.addEventListener("click", () => {
    $("#" + b.dataset.for).value = Math.floor(Math.random() * 2 ** 31);
  }));
  $("#panel-generate").addEventListener("submit", onGenerate);
  $("#panel-edit").addEventListener("submit", onEdit);
  $("#panel-layers").addEventListener("submit", onLayers);
  $("#edit-files").addEventListener("change", (e) => { addEditFiles(e.target.files); e.target.value = ""; });
  $("#layers-file").addEventListener("change", (e) => { setLayersFile(e.target.files[0]); e.target.value = ""; });
  dropZone($("#edit-drop"), addEditFiles);
  dropZone($("#layers-drop"), (files) => setLayersFile(files[0]));
  $("#compare-range").addEventListener("input", updateCompare);
  $$(".downloads button").forEach((b) => b.addEventListener("click", () => downloadLayers(b.dataset.format)));
  $("#cancel").addEventListener("click", async () => {
    if (!state.job) return;
    try { await api(`/v1/jobs/${state.job.id}`, { method: "DELETE" }); } catch (err) { showError(err); }
  });
  $("#history-refresh").onclick = refreshHistory;
  $("#key-button").onclick = () => askKey("API key for this server (kept in this browser's local storage).");
  $("#key-save").onclick = (e) => { e.preventDefault(); keyDone(true); };
  $("#key-cancel").onclick = () => keyDone(false);
  $("#key-dialog").addEventListener("cancel", () => keyDone(false));
  const tab = location.hash.slice(1);
  selectTab(["generate", "edit", "layers"].includes(tab) ? tab : "generate");
  start();
}

async function start() {
  const health = await checkHealth();
  if (health && health.auth && !state.key) await askKey("This server needs an API key.");
  try { await loadModels(); } catch (err) { showError(err); }
  loadLoras();
  refreshHistory();
  setInterval(checkHealth, 15000);
}

document.addEventListener("DOMContentLoaded", init);
