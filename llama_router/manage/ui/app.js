// llama-router's dashboard: plain JavaScript, no build step. It reads the same endpoints scripts do:
// /events (lifecycle events, and with ?requests=1 the queue and finished requests), /overview,
// /config, /activity, /logs/<model>, /router/log, and sends /models/load, /models/unload, /unload and
// /requests/<id>/cancel. Data is put on the page with textContent only, never as HTML.
//
// With hundreds of models the page redraws what changed, not every panel: an update marks panels
// stale, only the panel on screen is drawn, a model's card or row is rebuilt only when its figures
// changed, and finished requests are added to the activity table rather than redrawing it.
// The panel and its filters live in the URL's hash (`#models?q=qwen&state=loaded`), so a link shows
// the same view.
"use strict";

const KEY_STORE = "llama-router-key";
const state = {
  overview: null,
  timeline: [],
  requests: [],
  activity: [],
  audit: [], // management calls (load, unload, ...): the timeline shows them
  lastEvent: 0,
  panel: "devices",
  params: new URLSearchParams(),
  stale: new Set(), // panels whose data changed while they were not on screen
};
const PANELS_DRAWN = { devices: () => renderDevices(), models: () => renderModels(), timeline: () => renderTimeline(), queue: () => renderQueue(), activity: () => renderActivity(new Set()) };
const colors = ["#2f6fed", "#1f9d55", "#c2410c", "#7047c2", "#0e9f9f", "#b83280", "#6b7a12", "#a15c07"];

// ------------------------------------------------------------------------------------------ helpers

const $ = (selector) => document.querySelector(selector);

function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "style") element.style.cssText = value; // CSSOM: allowed by the page's CSP
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 90) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(value / 60);
  return `${minutes}:${String(Math.floor(value % 60)).padStart(2, "0")} min`;
}

function ms(value) {
  return value === null || value === undefined ? "–" : value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(0)} ms`;
}

function num(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

let modelIndex = new Map(); // model name -> its place in the overview (colours, lookups)
function colorOf(model) {
  const index = modelIndex.get(model);
  return colors[(index === undefined ? modelIndex.size : index) % colors.length];
}

function modelOf(name) {
  const index = modelIndex.get(name);
  return index === undefined ? undefined : state.overview.models[index];
}

function toast(message, bad = false) {
  const element = h("div", { class: bad ? "toast bad" : "toast" }, message);
  $("#toasts").append(element);
  setTimeout(() => element.remove(), bad ? 8000 : 3500);
}

// ------------------------------------------------------------------------------------------ HTTP

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), ...authHeaders() },
  });
  if (response.status === 401) {
    askForKey("The router refused the key (or needs one).");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = null;
    try {
      const body = await response.json();
      message = body.error?.message || message;
      code = body.error?.code || null;
    } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, message, code);
  }
  return response;
}

const getJson = async (path) => (await call(path)).json();

async function post(path, body) {
  const options = { method: "POST" };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  return (await call(path, options)).json();
}

// Server-sent events read from a fetch (EventSource cannot send an Authorization header).
async function readSse(response, onData, onComment, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  while (!signal?.aborted) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
      } else if (line.startsWith(":")) {
        onComment?.(line.slice(1).trim());
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ keys

function askForKey(reason) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = sessionStorage.getItem(KEY_STORE) ? reason : "";
  if (!dialog.open) dialog.showModal();
}

function setUpKeys() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("#key-input").value = "";
    $("#key-dialog").close();
    $("#forget-key").hidden = false;
    reconnect();
  });
  $("#forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    $("#forget-key").hidden = true;
    reconnect();
  });
}

// ------------------------------------------------------------------------------------------ events

let events = null; // the AbortController of the /events read
let retry = 1000;

function setLive(on, text) {
  const live = $("#live");
  live.classList.toggle("off", !on);
  live.textContent = text;
}

function reconnect() {
  if (events) events.abort();
  connect();
}

async function connect() {
  const controller = new AbortController();
  events = controller;
  try {
    const response = await call("/events?requests=1", { signal: controller.signal });
    retry = 1000;
    setLive(true, "live");
    await readSse(response, (data) => onEvent(JSON.parse(data)), null, controller.signal);
  } catch (error) {
    if (controller.signal.aborted) return;
    if (error instanceof ApiError && error.status === 401) {
      setLive(false, "needs a key");
      return; // the key dialog reconnects
    }
  }
  if (controller.signal.aborted || events !== controller) return;
  setLive(false, "reconnecting…");
  setTimeout(() => events === controller && connect(), retry);
  retry = Math.min(retry * 2, 10000);
}

let overviewTimer = null;
function refreshOverview(delay = 120) {
  clearTimeout(overviewTimer);
  overviewTimer = setTimeout(loadOverview, delay);
}

async function loadOverview() {
  try {
    state.overview = await getJson("/overview");
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) toast(`overview: ${error.message}`, true);
    return;
  }
  modelIndex = new Map(state.overview.models.map((m, index) => [m.model, index]));
  state.timeline = state.overview.timeline.slice();
  state.requests = state.overview.requests;
  liveCounts();
  renderAll();
}

function onEvent(event) {
  state.lastEvent = Date.now();
  if (event.event === "snapshot") {
    // The stream is followed from here on: what was written before it is read now, so no row
    // falls between a read and the stream.
    refreshOverview(0);
    loadActivity();
    loadAudit();
    return;
  }
  if (event.event === "requests") {
    state.requests = event.requests;
    if (state.panel === "queue") renderQueue();
    else state.stale.add("queue");
    queueCount();
    liveCounts();
    addActivity(event.activity, event.activity_dropped);
    return;
  }
  if (event.event === "download_progress") return; // many a second while a model downloads
  if (event.event === "loading_progress") {
    showProgress(event.model, event.percent); // several a second while a model loads
    return;
  }
  state.timeline.push(event);
  if (state.timeline.length > 1000) state.timeline.splice(0, state.timeline.length - 1000);
  if (event.event === "reloaded" || event.event === "config_error") loadConfig();
  refreshOverview();
}

// ------------------------------------------------------------------------------------------ panels

// The hash: `#<panel>?<filters>`. Filters typed or chosen on the page are written back with
// replaceState (no history entry per keystroke, no hashchange); a hash pasted or clicked is read here.
function readHash() {
  const [name, query] = (location.hash || "#devices").slice(1).split("?");
  return { name, params: new URLSearchParams(query || "") };
}

function writeHash() {
  const query = state.params.toString();
  history.replaceState(null, "", `#${state.panel}${query ? `?${query}` : ""}`);
}

function setParam(name, value) {
  if (value) state.params.set(name, value);
  else state.params.delete(name);
  writeHash();
}

// Each panel's filter controls and the hash parameter each one is.
const FILTERS = {
  models: { "#models-q": "q", "#models-state": "state", "#models-source": "source" },
  activity: { "#activity-model": "model", "#activity-status": "status", "#activity-kind": "kind" },
  timeline: { "#timeline-model": "model", "#timeline-kind": "kind" },
  logs: { "#log-source": "model" },
};

function controlsFromHash() {
  for (const [selector, name] of Object.entries(FILTERS[state.panel] || {})) {
    const control = $(selector);
    const value = state.params.get(name) || "";
    if (control.tagName === "SELECT" && value && ![...control.options].some((o) => o.value === value)) {
      control.append(h("option", { value }, value)); // a model the list does not have (yet)
    }
    control.value = value;
  }
}

function showPanel() {
  const { name, params } = readHash();
  const before = `${state.panel}?${state.params}`;
  state.panel = document.getElementById(`panel-${name}`) ? name : "devices";
  state.params = params;
  controlsFromHash();
  if (state.panel === "activity" && before !== `${state.panel}?${state.params}`) loadActivity();
  for (const panel of document.querySelectorAll(".panel")) {
    panel.classList.toggle("shown", panel.id === `panel-${state.panel}`);
  }
  for (const link of document.querySelectorAll("#tabs a")) {
    link.classList.toggle("active", link.dataset.panel === state.panel);
  }
  document.title = `llama-router · ${document.getElementById(`panel-${state.panel}`).dataset.title}`;
  if (state.panel === "logs") followLog();
  else stopLog();
  if (state.panel === "config") loadConfig();
  if (state.panel === "timeline" || state.stale.has(state.panel)) draw(state.panel);
}

function draw(panel) {
  state.stale.delete(panel);
  PANELS_DRAWN[panel]?.();
}

// New overview: the panel on screen is drawn now, the others when they are shown.
function renderAll() {
  fillModelSelects();
  for (const panel of Object.keys(PANELS_DRAWN)) {
    if (panel === state.panel) draw(panel);
    else state.stale.add(panel);
  }
  queueCount();
}

function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}

// How far a model's load has come (where its llama-server reports it): a bar on its card and a fill
// in its share of each device, updated in place as reports arrive.
function progressBar(model, percent) {
  if (percent === null || percent === undefined) return null;
  return h(
    "span",
    { class: "loadbar", "data-progress": model, title: `loading: ${percent} %`, style: `--p:${percent}%` },
    h("span", { class: "fill", style: `width:${percent}%` }),
    h("span", { class: "pct" }, `${percent} %`),
  );
}

function showProgress(model, percent) {
  if (!state.overview) return;
  let known = true;
  for (const entry of [...state.overview.models, ...state.overview.devices.flatMap((device) => device.models)]) {
    if (entry.model !== model) continue;
    known = known && entry.progress !== null && entry.progress !== undefined;
    entry.progress = percent;
  }
  if (!known) {
    renderDevices();
    renderModels();
    return;
  }
  for (const bar of document.querySelectorAll(".loadbar")) {
    if (bar.dataset.progress !== model) continue;
    bar.title = `loading: ${percent} %`;
    bar.style.setProperty("--p", `${percent}%`);
    bar.querySelector(".fill").style.width = `${percent}%`;
    bar.querySelector(".pct").textContent = `${percent} %`;
  }
}

// Devices: a bar per budget with the resident models stacked in it (a loading one filling its share).
let devicesDrawn = "";
function renderDevices() {
  const overview = state.overview;
  // Redrawn only when what it shows changed (the overview also changes for other panels).
  const signature = JSON.stringify([overview.devices, overview.readahead, overview.memory_notes, [...modelIndex.keys()]]);
  if (signature === devicesDrawn) return;
  devicesDrawn = signature;
  const root = $("#devices");
  root.replaceChildren();
  for (const device of overview.devices) {
    const budget = device.budget || 1;
    const bar = h("div", { class: "budget", title: `budget ${bytes(device.budget)}` });
    for (const item of device.models) {
      const share = Math.min(100, (item.bytes / budget) * 100);
      bar.append(
        h(
          "div",
          {
            class: `segment ${item.status}`,
            style: `width:${share}%;background:${colorOf(item.model)}`,
            title: `${item.model}: ${bytes(item.bytes)} (${item.source})`,
          },
          progressBar(item.model, item.progress),
          h("span", { class: "label" }, `${item.model} ${bytes(item.bytes)}`),
        ),
      );
    }
    const rows = device.models.map((item) =>
      h(
        "tr",
        { "data-model": item.model },
        h("td", {}, h("span", { class: "swatch", style: `background:${colorOf(item.model)}` }), item.model),
        h("td", {}, statusBadge(item.status), " ", progressBar(item.model, item.progress)),
        h("td", { class: "num" }, bytes(item.bytes)),
        h("td", {}, h("span", { class: `badge source-${item.source}` }, item.source)),
        h("td", { class: "placement" }, item.placement ? item.placement.why : ""),
      ),
    );
    const free = Math.max(0, device.budget - device.used);
    const detail = [device.source, device.detail, device.shares ? `shares ${device.shares}` : null].filter(Boolean);
    root.append(
      h(
        "div",
        { class: "device", "data-device": device.name },
        h(
          "div",
          { class: "device-head" },
          h("h3", {}, device.name),
          h("span", { class: "sub" }, `${bytes(device.used)} used of ${bytes(device.budget)} budget · ${bytes(free)} free · ${bytes(device.total)} total · ${detail.join(" · ")}`),
        ),
        bar,
        rows.length
          ? h("table", { class: "stack" }, h("tbody", {}, rows))
          : h("p", { class: "empty" }, "No model holds memory here."),
      ),
    );
  }
  const readahead = overview.readahead;
  $("#readahead-state").textContent = readahead.enabled
    ? "Read-ahead is on: the files of standby and recently stopped models are read into the page cache while RAM is free, so a restart reads from memory."
    : "Read-ahead is off (server.readahead: false).";
  // Each file once, with the profiles that use it (many profiles often share one file).
  const table = h("table", { class: "stack" }, h("tbody", {}, readahead.files.map((file) => {
    const share = file.cached_bytes === null || !file.bytes ? null : file.cached_bytes / file.bytes;
    const shown = file.profiles.slice(0, 6).join(", ") + (file.profiles.length > 6 ? ` and ${file.profiles.length - 6} more` : "");
    return h(
      "tr",
      { "data-path": file.path, "data-profiles": file.profiles.length },
      h("td", { class: "code" }, file.path),
      h("td", { class: "profiles", title: file.profiles.join(", ") }, `${file.profiles.length === 1 ? "" : `${file.profiles.length} profiles: `}${shown}`),
      h("td", {}, h("span", { class: "cachebar" }, h("span", { style: `width:${((share || 0) * 100).toFixed(1)}%` }))),
      h("td", { class: "num" }, share === null ? "unknown" : `${bytes(file.cached_bytes)} of ${bytes(file.bytes)} (${(share * 100).toFixed(0)}%)`),
    );
  })));
  $("#readahead").replaceChildren(table);
  $("#memory-notes").replaceChildren(...overview.memory_notes.map((note) => h("li", {}, note)));
}

// The log lines behind a learned footprint, per device, to check against nvidia-smi.
function whyDetails(model, why) {
  return h(
    "details",
    { class: "why" },
    h("summary", {}, "the log lines behind each device's figure"),
    why.map(([device, lines]) =>
      h(
        "div",
        { class: "why-device", "data-device": device },
        h("strong", {}, `${device} ${bytes(model.footprint[device])}`),
        h("ul", {}, lines.map((entry) => h("li", {}, h("span", { class: "num" }, bytes(entry.bytes)), " ", h("code", {}, entry.line)))),
      ),
    ),
  );
}

// Models: cards (everything about a few models) or a table (many at a glance), filtered and sorted
// as the hash says. A model's card or row is built once and rebuilt only when its figures change.
const TABLE_AFTER = 12; // more models than this: the table is the default view
const MODEL_COLUMNS = {
  name: (m) => m.model.toLowerCase(),
  state: (m) => m.status,
  footprint: (m) => Object.values(m.footprint).reduce((a, b) => a + b, 0),
  load: (m) => m.load_seconds ?? -1,
  used: (m) => m.last_used ?? 0,
  requests: (m) => { const c = requestCounts.get(m.model); return c ? c.running * 1000 + c.waiting : 0; },
  ttl: (m) => m.ttl ?? -1,
  source: (m) => m.footprint_source,
};
const modelNodes = new Map(); // model name -> { signature, card, row }
let requestCounts = new Map(); // profile -> { running, waiting }, from the requests now

function modelView() {
  const view = state.params.get("view");
  if (view === "cards" || view === "table") return view;
  return (state.overview?.models.length || 0) > TABLE_AFTER ? "table" : "cards";
}

// The filter box: each word must be in the name or an alias, or be the model's state or source.
function modelPasses(model, words, wantedState, wantedSource) {
  if (wantedState && model.status !== wantedState) return false;
  if (wantedSource && model.footprint_source !== wantedSource) return false;
  const names = [model.model, ...model.aliases].join("\n").toLowerCase();
  return words.every((word) => names.includes(word) || word === model.status || word === model.footprint_source);
}

function shownModels() {
  const words = (state.params.get("q") || "").toLowerCase().split(/\s+/).filter(Boolean);
  const wantedState = state.params.get("state") || "";
  const wantedSource = state.params.get("source") || "";
  const shown = state.overview.models.filter((m) => modelPasses(m, words, wantedState, wantedSource));
  const column = MODEL_COLUMNS[state.params.get("sort")] ? state.params.get("sort") : null;
  if (column) {
    const key = MODEL_COLUMNS[column];
    const sign = state.params.get("dir") === "desc" ? -1 : 1;
    shown.sort((a, b) => { const x = key(a), y = key(b); return x < y ? -sign : x > y ? sign : 0; });
  }
  return shown;
}

function renderModels() {
  const models = state.overview.models;
  const view = modelView();
  const shown = shownModels();
  const seen = new Set();
  const wanted = shown.map((model) => {
    const signature = JSON.stringify(model);
    let nodes = modelNodes.get(model.model);
    if (!nodes || nodes.signature !== signature) {
      nodes = { signature, card: null, row: null };
      modelNodes.set(model.model, nodes);
    }
    seen.add(model.model);
    if (view === "table") return (nodes.row ??= modelRow(model));
    return (nodes.card ??= modelCard(model));
  });
  for (const name of modelNodes.keys()) if (!modelIndex.has(name)) modelNodes.delete(name);
  reconcile(view === "table" ? $("#models-table tbody") : $("#models"), wanted);
  $("#models").hidden = view !== "cards";
  $("#models-table").hidden = view !== "table";
  $("#view-cards").classList.toggle("active", view === "cards");
  $("#view-table").classList.toggle("active", view === "table");
  $("#models-count").textContent = shown.length === models.length ? `${models.length} models` : `${shown.length} of ${models.length} models`;
  $("#models-none").hidden = shown.length > 0;
  const sort = state.params.get("sort");
  for (const th of document.querySelectorAll("#models-table th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === sort);
    th.classList.toggle("desc", th.dataset.sort === sort && state.params.get("dir") === "desc");
  }
}

// Make `container`'s children the `wanted` nodes, in order, touching only those that differ: a
// model whose row changed costs one removal and one insertion, not a redraw of the table.
function reconcile(container, wanted) {
  const keep = new Set(wanted);
  for (const child of [...container.children]) if (!keep.has(child)) child.remove();
  wanted.forEach((node, index) => {
    const at = container.children[index];
    if (at !== node) container.insertBefore(node, at || null);
  });
}

function footprintText(model) {
  return Object.entries(model.footprint).map(([device, n]) => `${device} ${bytes(n)}`).join(", ") || "–";
}

// Running and waiting requests; in the table, a dash for none.
function requestsText(model, compact) {
  const counts = requestCounts.get(model.model) || { running: 0, waiting: 0 };
  if (compact && !counts.running && !counts.waiting && !model.draining) return "–";
  return `${counts.running} running · ${counts.waiting} waiting${model.draining ? " · draining" : ""}`;
}

function actions(model) {
  const canLoad = !["loaded", "standby", "loading"].includes(model.status);
  const canUnload = ["loaded", "standby", "loading"].includes(model.status);
  return [
    h("button", { class: "primary load", disabled: !canLoad, onclick: () => act("/models/load", model.model, "load") }, "Load"),
    h("button", { class: "unload", disabled: !canUnload, onclick: () => act("/models/unload", model.model, "unload") }, "Unload"),
  ];
}

function modelRow(model) {
  return h(
    "tr",
    { class: "model", "data-model": model.model },
    h("td", { class: "name", title: [model.model, ...model.aliases].join("\n") }, h("span", { class: "swatch", style: `background:${colorOf(model.model)}` }), model.model,
      model.aliases.length ? h("span", { class: "aliases" }, `also ${model.aliases.join(", ")}`) : null),
    h("td", {}, statusBadge(model.status), progressBar(model.model, model.progress)),
    h("td", {}, footprintText(model)),
    h("td", { class: "num" }, seconds(model.load_seconds)),
    h("td", { title: model.last_used ? new Date(model.last_used * 1000).toISOString() : "" }, model.last_used ? clock(model.last_used) : "–"),
    h("td", { class: "live-requests compact" }, requestsText(model, true)),
    h("td", { class: "ttl", "data-expires": model.ttl_expires_at ?? null }, ttlText(model)),
    h("td", {}, h("span", { class: `badge source-${model.footprint_source}` }, model.footprint_source)),
    h("td", { class: "actions" }, actions(model)),
  );
}

function modelCard(model) {
  const chips = [];
  if (model.pinned) chips.push(h("span", { class: "chip" }, "pinned"));
  if (model.standby_profile) chips.push(h("span", { class: "chip" }, "standby"));
  chips.push(h("span", { class: "chip" }, `priority ${model.priority}`));
  if (model.keep_context) chips.push(h("span", { class: "chip" }, "keeps context"));
  const rows = [
    ["footprint", h("span", {}, `${footprintText(model)} `, h("span", { class: `badge source-${model.footprint_source}` }, model.footprint_source))],
    ["load time", seconds(model.load_seconds)],
    ["loads · restarts", `${model.loads} · ${model.restarts}`],
    ["requests", h("span", { class: "live-requests" }, requestsText(model))],
    ["ttl", h("span", { class: "ttl", "data-expires": model.ttl_expires_at ?? null }, ttlText(model))],
  ];
  const why = Object.entries(model.footprint_why || {});
  if (why.length) rows.push(["why this number", whyDetails(model, why)]);
  if (model.retry_at) rows.push(["back-off", h("span", { class: "retry", "data-at": model.retry_at }, retryText(model.retry_at))]);
  if (model.keep_context) rows.push(["saved context", bytes(model.saved_context_bytes)]);
  if (model.aliases.length) rows.push(["aliases", model.aliases.join(", ")]);
  if (model.fallback.length) rows.push(["fallback", model.fallback.join(" → ")]);
  if (model.pid) rows.push(["process", `pid ${model.pid}`]);
  return h(
    "div",
    { class: "card model", "data-model": model.model },
    h("h3", {}, h("span", { class: "swatch", style: `background:${colorOf(model.model)}` }), model.model, statusBadge(model.status), progressBar(model.model, model.progress)),
    h("div", { class: "sub" }, model.description || " "),
    h("div", {}, chips),
    h("dl", {}, rows.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)])),
    model.last_error && model.status !== "loaded" ? h("div", { class: "sub" }, model.last_error.split("\n")[0]) : null,
    model.log_tail ? h("pre", { class: "log-tail" }, model.log_tail.join("\n")) : null,
    h("div", { class: "actions" }, actions(model)),
  );
}

// The requests now, counted per model: only the cells whose count changed are written.
function liveCounts() {
  const counts = new Map();
  for (const request of state.requests) {
    const entry = counts.get(request.profile) || { running: 0, waiting: 0 };
    entry[request.state === "waiting" ? "waiting" : "running"]++;
    counts.set(request.profile, entry);
  }
  const changed = new Set([...counts.keys(), ...requestCounts.keys()].filter((name) => {
    const a = counts.get(name), b = requestCounts.get(name);
    return !a || !b || a.running !== b.running || a.waiting !== b.waiting;
  }));
  requestCounts = counts;
  for (const name of changed) {
    const model = modelOf(name);
    const nodes = modelNodes.get(name);
    if (!model || !nodes) continue;
    for (const node of [nodes.card, nodes.row]) {
      const cell = node?.querySelector(".live-requests");
      if (cell) cell.textContent = requestsText(model, cell.classList.contains("compact"));
    }
  }
}

function ttlText(model) {
  if (!model.ttl) return "none";
  if (!model.ttl_expires_at) return `${seconds(model.ttl)} once idle`;
  const left = Math.max(0, model.ttl_expires_at - Date.now() / 1000);
  return `unloads in ${seconds(left)} (ttl ${seconds(model.ttl)})`;
}

function retryText(at) {
  const left = at - Date.now() / 1000;
  return left > 0 ? `retries in ${seconds(left)} (at ${clock(at)})` : `retry due (${clock(at)})`;
}

async function act(path, model, what) {
  try {
    await post(path, model === undefined ? undefined : { model });
    toast(model ? `${what}: ${model}` : what);
  } catch (error) {
    toast(`${what}${model ? ` ${model}` : ""} refused: ${error.message}`, true);
  }
  refreshOverview(0);
}

// Timeline: one lane per model, coloured by state, with the causes of stops written on the strip.
const STOP_CAUSES = { swap: "swap", ttl: "TTL", budget: "budget", out_of_memory: "out of memory", unhealthy: "unhealthy", unload: "unload", load_timeout: "load timeout", drain_timeout: "drain timeout", shutdown: "shutdown" };

function renderTimeline() {
  if (!state.overview) return;
  const now = Date.now() / 1000;
  const chosen = $("#timeline-window").value;
  const first = Math.min(...state.timeline.filter((e) => e.model).map((e) => e.time), ...state.audit.map((row) => row.time));
  // "auto": from the first event kept to now, so a young router's few seconds fill the strip.
  const windowSeconds = chosen === "auto" ? Math.min(3600, Math.max(5, Number.isFinite(first) ? (now - first) * 1.1 : 300)) : Number(chosen);
  const start = now - windowSeconds;
  // Lanes for the models something happened to (or that hold memory), as the filters say.
  const onlyModel = state.params.get("model") || "";
  const kind = state.params.get("kind") || "";
  const lifecycle = kind === "management" ? [] : state.timeline;
  const audit = kind === "lifecycle" ? [] : state.audit.filter((row) => !onlyModel || row.model === onlyModel);
  const active = new Set([...lifecycle, ...audit].filter((e) => e.model).map((e) => e.model));
  const models = state.overview.models
    .filter((m) => (active.has(m.model) || !["unloaded", "failed"].includes(m.status)) && (!onlyModel || m.model === onlyModel))
    .map((m) => m.model);
  const width = Math.max(600, $("#timeline-strip").clientWidth - 24);
  const left = 120;
  const lane = 30;
  const height = 26 + lane * models.length + 18;
  const right = 90; // room for the last cause written beside "now"
  const x = (t) => left + ((Math.max(t, start) - start) / windowSeconds) * (width - left - right);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img" });
  // Ticks on round times: whole seconds, then minutes, as the window grows.
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800].find((n) => windowSeconds / n <= 7) || 3600;
  for (let t = Math.ceil(start / step) * step; t <= now; t += step) {
    svg.append(s("line", { x1: x(t), x2: x(t), y1: 18, y2: height - 14, stroke: "#eef0f3" }));
    svg.append(s("text", { x: x(t), y: 12, "text-anchor": "middle", class: "axis" }, clock(t)));
  }
  models.forEach((model, index) => {
    const y = 24 + index * lane;
    svg.append(s("text", { x: 0, y: y + 15, class: "lane-label" }, model));
    svg.append(s("rect", { x: left, y: y + 4, width: width - left - right, height: 14, fill: "#f4f5f7", rx: 3 }));
    let phase = null;
    let since = start;
    const draw = (until) => {
      if (!phase || until < start) return;
      const fill = { loading: "#d98b04", loaded: "#1f9d55", stopping: "#9aa2b1" }[phase];
      svg.append(s("rect", { x: x(since), y: y + 4, width: Math.max(2, x(until) - x(since)), height: 14, fill, rx: 3, class: `phase ${phase}`, "data-model": model }));
    };
    for (const event of lifecycle) {
      if (event.model !== model) continue;
      const next = { loading: "loading", ready: "loaded", stopping: "stopping", stopped: null, failed: null }[event.event];
      if (next === undefined) {
        if (event.event === "unhealthy" && event.time >= start) mark(svg, x(event.time), y, "#d64545", "unhealthy");
        continue;
      }
      draw(event.time);
      phase = next;
      since = event.time;
      if (event.time < start) continue;
      if (event.event === "failed") mark(svg, x(event.time), y, "#d64545", "failed", event.reason);
      if (event.event === "stopping") mark(svg, x(event.time), y, "#1d2330", STOP_CAUSES[event.cause] || event.cause, event.reason);
    }
    draw(now);
    for (const row of audit) {
      if (row.model !== model || row.time < start) continue;
      const at = x(row.time);
      const group = s("g", { class: "audit", "data-action": row.action });
      group.append(s("rect", { x: at - 3, y: y + 8, width: 6, height: 6, transform: `rotate(45 ${at} ${y + 11})`, fill: row.status >= 400 ? "#d64545" : "#2f6fed" }));
      group.append(s("title", {}, `${row.action} by ${row.key || "no key"} from ${row.client || "–"}: ${row.status}`));
      svg.append(group);
    }
  });
  svg.append(s("line", { x1: x(now), x2: x(now), y1: 18, y2: height - 14, stroke: "#2f6fed", "stroke-dasharray": "3 3" }));
  $("#timeline-strip").replaceChildren(svg);

  // The table: lifecycle events and management calls together, newest first.
  const rows = [
    ...lifecycle.filter((event) => event.model && (!onlyModel || event.model === onlyModel)),
    ...audit,
  ].filter((event) => event.time >= start);
  rows.sort((a, b) => a.time - b.time);
  const body = $("#timeline-table tbody");
  body.replaceChildren(
    ...rows.slice(-200).reverse().map((event) =>
      event.action
        ? h(
          "tr",
          { class: "manage", "data-model": event.model, "data-action": event.action },
          h("td", {}, clock(event.time)),
          h("td", {}, event.model || "–"),
          h("td", {}, h("span", { class: "badge action" }, event.action.replace("_", " "))),
          h("td", {}, ""),
          h("td", {}, `${event.status}${event.error ? ` ${event.error}` : ""} · ${event.key || "no key"} · ${event.client || "–"}${event.detail ? ` · ${event.detail}` : ""}`),
        )
        : h(
          "tr",
          { "data-model": event.model },
          h("td", {}, clock(event.time)),
          h("td", {}, event.model),
          h("td", {}, event.event),
          h("td", {}, event.cause ? STOP_CAUSES[event.cause] || event.cause : ""),
          h("td", {}, describeEvent(event)),
        ),
    ),
  );
}

function mark(svg, at, y, color, label, title) {
  const group = s("g", { class: "mark" });
  group.append(s("path", { d: `M${at - 4},${y + 1} L${at + 4},${y + 1} L${at},${y + 7} Z`, fill: color }));
  group.append(s("text", { x: at + 5, y: y + 29, class: "cause" }, label));
  if (title) group.append(s("title", {}, title));
  svg.append(group);
}

function describeEvent(event) {
  switch (event.event) {
    case "loading": return event.placement ? `placed: ${event.placement.why}` : "";
    case "ready": return `loaded in ${seconds(event.load_seconds)}`;
    case "stopping": return event.reason;
    case "failed": case "unhealthy": return (event.reason || "").split("\n")[0];
    case "footprint": return Object.entries(event.bytes).map(([d, n]) => `${d} ${bytes(n)}`).join(", ") + " learned";
    case "fallback": return `answered by ${event.served_by}`;
    default:
      if (event.event.startsWith("context_")) return `${event.slots} slot(s), ${num(event.tokens)} tokens, ${bytes(event.bytes)}${event.error ? `: ${event.error}` : ""}`;
      return "";
  }
}

// Queue and in flight.
function renderQueue() {
  const body = $("#queue-table tbody");
  const now = Date.now() / 1000;
  body.replaceChildren(
    ...state.requests.map((request) => {
      const waited = request.state === "waiting" ? now - request.arrived : request.waited;
      const running = request.state === "running" ? now - request.arrived - request.waited : null;
      return h(
        "tr",
        { "data-id": request.id, "data-model": request.model },
        h("td", {}, request.id),
        h("td", {}, request.model),
        h("td", {}, request.client || "–"),
        h("td", {}, request.path),
        h("td", {}, h("span", { class: `badge state ${request.state === "waiting" ? "status-loading" : "status-loaded"}` }, request.state)),
        h("td", { class: "waited" }, seconds(waited)),
        h("td", { class: "running" }, running === null ? "–" : seconds(running)),
        h("td", {}, h("button", { class: "danger cancel", onclick: () => cancelRequest(request.id) }, "Cancel")),
      );
    }),
  );
  $("#queue-empty").hidden = state.requests.length > 0;
  $("#queue-table").hidden = state.requests.length === 0;
}

function queueCount() {
  const waiting = state.requests.filter((r) => r.state === "waiting").length;
  const text = state.requests.length ? `${waiting}/${state.requests.length}` : "";
  if ($("#queue-count").textContent !== text) $("#queue-count").textContent = text;
}

async function cancelRequest(id) {
  try {
    await post(`/requests/${id}/cancel`);
    toast(`request ${id} cancelled`);
  } catch (error) {
    toast(`cancel ${id} refused: ${error.message}`, true);
  }
}

// Activity: rows from SQLite, then from `requests` events as requests end.
function activityFilter() {
  return { model: $("#activity-model").value, status: $("#activity-status").value, kind: $("#activity-kind").value };
}

function passes(row, filter) {
  if (filter.model && row.model !== filter.model && row.served_by !== filter.model) return false;
  if (filter.kind && (filter.kind === "management") !== Boolean(row.action)) return false;
  const failed = row.status >= 400 || row.error;
  switch (filter.status) {
    case "": return true;
    case "ok": return !failed;
    case "error": return Boolean(failed);
    default: return String(row.status)[0] === filter.status[0];
  }
}

const ACTIVITY_KEPT = 500; // rows the page holds

let activityAsked = 0; // the newest read: an older answer that comes later is dropped
async function loadActivity() {
  const params = new URLSearchParams({ limit: "200" });
  const filter = activityFilter();
  for (const [name, value] of Object.entries(filter)) if (value) params.set(name, value);
  const asked = ++activityAsked;
  let rows;
  try {
    rows = (await getJson(`/activity?${params}`)).activity;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) toast(`activity: ${error.message}`, true);
    return;
  }
  if (asked !== activityAsked) return;
  state.activity = rows;
  if (state.panel === "activity") draw("activity");
  else state.stale.add("activity");
}

// The management calls for the timeline (kept apart from the activity panel's own filters).
async function loadAudit() {
  try {
    state.audit = (await getJson("/activity?kind=management&limit=500")).activity.reverse();
  } catch (error) {
    return; // the activity panel says what went wrong
  }
  if (state.panel === "timeline") renderTimeline();
  else state.stale.add("timeline");
}

// Rows not held yet: an event may carry a row that a read made just before it already returned.
function unheld(rows, held) {
  const ids = new Set(held.map((row) => row.id));
  return rows.filter((row) => !ids.has(row.id));
}

function addActivity(rows, dropped) {
  const audit = unheld(rows.filter((row) => row.action), state.audit);
  if (audit.length) {
    state.audit = state.audit.concat(audit).slice(-500);
    if (state.panel === "timeline") renderTimeline();
    else state.stale.add("timeline");
  }
  if (dropped > 0) {
    loadActivity();
    return;
  }
  const filter = activityFilter();
  const fresh = unheld(rows.filter((row) => passes(row, filter)), state.activity).reverse();
  if (!fresh.length) return;
  state.activity = fresh.concat(state.activity).slice(0, ACTIVITY_KEPT);
  if (state.panel !== "activity") {
    state.stale.add("activity");
    return;
  }
  // Only the new rows are built; the oldest past the limit leave.
  const body = $("#activity-table tbody");
  body.prepend(...fresh.map((row) => activityRow(row, true)));
  while (body.children.length > ACTIVITY_KEPT) body.lastElementChild.remove();
  $("#activity-empty").hidden = true;
}

function renderActivity() {
  $("#activity-table tbody").replaceChildren(...state.activity.map((row) => activityRow(row, false)));
  $("#activity-empty").hidden = state.activity.length > 0;
}

function outcome(row) {
  return h("td", { class: row.status >= 400 || row.error ? "st-bad" : "st-ok", title: row.error || "" }, row.error ? `${row.status} ${row.error}` : row.status);
}

function activityRow(row, fresh) {
  const attrs = { class: fresh ? "fresh" : null, "data-id": row.id, "data-model": row.model, "data-action": row.action };
  if (row.action) {
    // A management call: what was done to which model, by which key, from where.
    return h(
      "tr",
      { ...attrs, class: `manage${fresh ? " fresh" : ""}` },
      h("td", { title: new Date(row.time * 1000).toISOString() }, clock(row.time)),
      h("td", {}, row.model || "–"),
      h("td", {}, h("span", { class: "badge action" }, row.action.replace("_", " ")), row.detail ? ` ${row.detail}` : ""),
      outcome(row),
      h("td", { colspan: 6, class: "detail" }, `${row.path || ""}`),
      h("td", {}, ms(row.duration_ms)),
      h("td", {}, row.key || "–"),
      h("td", {}, row.client || "–"),
    );
  }
  return h(
    "tr",
    attrs,
    h("td", { title: new Date(row.time * 1000).toISOString() }, clock(row.time)),
    h("td", {}, row.served_by && row.served_by !== row.model ? `${row.model} → ${row.served_by}` : row.model),
    h("td", {}, row.path),
    outcome(row),
    h("td", { class: "prompt" }, num(row.prompt_tokens)),
    h("td", { class: "cached" }, num(row.cached_tokens)),
    h("td", {}, num(row.prefill_tps, 1)),
    h("td", { class: "generated" }, num(row.generated_tokens)),
    h("td", {}, num(row.decode_tps, 1)),
    h("td", {}, ms(row.ttft_ms)),
    h("td", {}, ms(row.duration_ms)),
    h("td", {}, row.key || "–"),
    h("td", {}, row.client || "–"),
  );
}

async function exportCsv() {
  const filter = activityFilter();
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(filter)) if (value) params.set(name, value);
  try {
    const response = await call(`/activity.csv?${params}`);
    const blob = await response.blob();
    const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "")?.[1] || "activity.csv";
    const link = h("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(link);
    link.click();
    setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  } catch (error) {
    toast(`CSV export: ${error.message}`, true);
  }
}

// Logs: a model's output or the router's own lines, followed live.
let logReader = null;

function stopLog() {
  if (logReader) logReader.abort();
  logReader = null;
}

async function followLog() {
  stopLog();
  const source = $("#log-source").value;
  if (state.panel === "logs") setParam("model", source);
  const follow = $("#log-follow").checked;
  const path = source ? `/logs/${encodeURIComponent(source)}` : "/router/log";
  const controller = new AbortController();
  logReader = controller;
  const pre = $("#log");
  pre.textContent = "";
  try {
    const response = await call(`${path}?lines=500${follow ? "&follow=1" : ""}`, { signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    while (!controller.signal.aborted) {
      const { value, done } = await reader.read();
      if (done) break;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 30;
      pre.append(decoder.decode(value, { stream: true }));
      if (pre.childNodes.length > 2000) pre.firstChild.remove();
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
  } catch (error) {
    if (!controller.signal.aborted) pre.append(`\n[dashboard] ${error.message}\n`);
  }
}

// Config: the profiles as the router sees them.
async function loadConfig() {
  if (state.panel !== "config") return;
  let config;
  try {
    config = await getJson("/config");
  } catch (error) {
    toast(`config: ${error.message}`, true);
    return;
  }
  const reload = config.reload;
  const parts = [h("p", {}, "File: ", h("code", {}, config.path))];
  if (reload) {
    const last = reload.last_reload;
    parts.push(h("p", {}, last ? `Last reload ${clock(last.time)} (${last.trigger}, ${last.seconds}s): ${["kept", "restarted", "added", "removed"].map((k) => `${k} ${(last[k] || []).join(", ") || "none"}`).join("; ")}` : `Not reloaded since the start (${reload.generation} reloads). ${reload.watching ? "The file is watched." : "The file is not watched."}`));
    if (reload.last_error) {
      parts.push(h("div", { class: "card", style: "border-color:#d64545" }, h("strong", {}, `Last reload failed ${clock(reload.last_error.time)} (${reload.last_error.trigger}); the running config stays:`), h("pre", {}, reload.last_error.message)));
    }
  }
  $("#config-reload").replaceChildren(...parts);
  const value = (v) => (v === null || v === undefined ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
  $("#config-server tbody").replaceChildren(
    ...Object.entries(config.server).map(([key, v]) => h("tr", {}, h("td", {}, key), h("td", { class: "code" }, value(v)))),
  );
  $("#config-profiles").replaceChildren(
    ...Object.entries(config.profiles).map(([name, profile]) =>
      h(
        "div",
        { class: "card", "data-model": name },
        h("h3", {}, name),
        h("div", { class: "sub" }, profile.description || " "),
        h("dl", {}, Object.entries(profile)
          .filter(([key]) => !["name", "description", "command"].includes(key))
          .map(([key, v]) => [h("dt", {}, key), h("dd", { class: "code" }, value(v))])),
        h("div", { class: "sub" }, "command"),
        h("code", {}, profile.command.join(" ")),
      ),
    ),
  );
}

// Playground: a streamed chat with any profile; the loading comments show while it swaps in.
let chat = { messages: [], controller: null };

let selectsFilled = "";
function fillModelSelects() {
  const models = state.overview.models;
  const names = models.map((m) => m.model).join("\n");
  if (names === selectsFilled) return updateChatStatus();
  selectsFilled = names;
  for (const id of ["#chat-model", "#activity-model", "#log-source", "#timeline-model"]) {
    const select = $(id);
    const keep = select.value;
    const first = id === "#chat-model" ? [] : [select.options[0]];
    select.replaceChildren(...first, ...models.map((m) => h("option", { value: m.model }, m.model)));
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }
  updateChatStatus();
}

function updateChatStatus() {
  const model = state.overview && modelOf($("#chat-model").value);
  const badge = $("#chat-model-status");
  badge.className = `badge status-${model?.status || ""}`;
  badge.textContent = model?.status || "";
}

function chatMessage(role, text, extra) {
  const element = h("div", { class: `msg ${role}` }, h("div", { class: "who" }, extra || role), h("div", { class: "text" }, text));
  $("#chat-log").append(element);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return element;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  const model = $("#chat-model").value;
  if (!text || !model || chat.controller) return;
  $("#chat-input").value = "";
  chat.messages.push({ role: "user", content: text });
  chatMessage("user", text);
  const reply = chatMessage("assistant", "", model);
  reply.classList.add("streaming");
  const out = reply.querySelector(".text");
  let thinking = null;
  let answer = "";
  let timings = null;
  const started = performance.now();
  chat.controller = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  $("#chat-state").textContent = `asking ${model}…`;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      signal: chat.controller.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: chat.messages, stream: true, max_tokens: Number($("#chat-max").value) || 64, stream_options: { include_usage: true } }),
    });
    await readSse(
      response,
      (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.timings) timings = chunk.timings;
        const delta = chunk.choices?.[0]?.delta || {};
        if (delta.reasoning_content) {
          if (!thinking) thinking = reply.insertBefore(h("div", { class: "thinking" }), out);
          thinking.append(delta.reasoning_content);
        }
        if (delta.content) {
          $("#chat-state").textContent = "";
          reply.dataset.chunks = String(Number(reply.dataset.chunks || 0) + 1);
          answer += delta.content;
          out.textContent = answer;
          $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
        }
      },
      (comment) => { $("#chat-state").textContent = comment; },
      chat.controller.signal,
    );
    chat.messages.push({ role: "assistant", content: answer });
    const stats = [`${((performance.now() - started) / 1000).toFixed(2)} s`];
    if (timings) stats.push(`${timings.prompt_n + timings.cache_n} prompt tokens (${timings.cache_n} cached)`, `${timings.predicted_n} generated at ${num(timings.predicted_per_second, 1)} tok/s`);
    reply.append(h("div", { class: "stats" }, stats.join(" · ")));
  } catch (error) {
    if (!chat.controller.signal.aborted) {
      reply.classList.add("error");
      out.textContent = error.message;
    } else {
      reply.append(h("div", { class: "stats" }, "stopped"));
    }
  } finally {
    reply.classList.remove("streaming");
    reply.classList.add("done");
    chat.controller = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
    $("#chat-state").textContent = "";
  }
}

// ------------------------------------------------------------------------------------------ start

function tick() {
  // Countdowns and running times move on the page itself; nothing is fetched for them.
  if (state.panel === "queue" && state.requests.length) renderQueue();
  if (!state.overview || state.panel !== "models") return;
  for (const element of document.querySelectorAll("#panel-models .ttl[data-expires]")) {
    const model = modelOf(element.closest("[data-model]").dataset.model);
    const text = model ? ttlText(model) : null;
    if (text !== null && element.textContent !== text) element.textContent = text;
  }
  for (const element of document.querySelectorAll("#panel-models .retry[data-at]")) element.textContent = retryText(Number(element.dataset.at));
}

function start() {
  setUpKeys();
  window.addEventListener("hashchange", showPanel);
  $("#timeline-window").addEventListener("change", renderTimeline);
  // Filters: each control writes its hash parameter, then the panel is drawn again.
  for (const [panel, controls] of Object.entries(FILTERS)) {
    for (const [selector, name] of Object.entries(controls)) {
      $(selector).addEventListener($(selector).tagName === "INPUT" ? "input" : "change", () => {
        if (state.panel === panel) setParam(name, $(selector).value);
        if (panel === "models") renderModels();
        if (panel === "timeline") renderTimeline();
      });
    }
  }
  for (const view of ["cards", "table"]) {
    $(`#view-${view}`).addEventListener("click", () => { setParam("view", view); renderModels(); });
  }
  for (const th of document.querySelectorAll("#models-table th[data-sort]")) {
    th.addEventListener("click", () => {
      const same = state.params.get("sort") === th.dataset.sort;
      state.params.set("sort", th.dataset.sort);
      setParam("dir", same && state.params.get("dir") !== "desc" ? "desc" : "");
      renderModels();
    });
  }
  window.addEventListener("resize", () => state.panel === "timeline" && renderTimeline());
  $("#unload-all").addEventListener("click", () => act("/unload", undefined, "unload all"));
  $("#activity-model").addEventListener("change", loadActivity);
  $("#activity-status").addEventListener("change", loadActivity);
  $("#activity-kind").addEventListener("change", loadActivity);
  $("#activity-csv").addEventListener("click", exportCsv);
  $("#log-source").addEventListener("change", followLog);
  $("#log-follow").addEventListener("change", followLog);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) sendChat(event);
  });
  $("#chat-stop").addEventListener("click", () => chat.controller?.abort());
  $("#chat-clear").addEventListener("click", () => { chat.messages = []; $("#chat-log").replaceChildren(); });
  $("#chat-model").addEventListener("change", updateChatStatus);
  showPanel();
  connect();
  setInterval(tick, 1000);
  setInterval(() => state.panel === "timeline" && renderTimeline(), 5000);
}

start();
