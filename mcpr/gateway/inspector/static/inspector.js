// The inspector page: requests from the gateway's event store, live, with their detail and replay.
//
// Everything shown that came through the gateway (bodies, headers, tool names, session ids) was
// written by whoever called or answered the MCP server, so it only ever reaches the page as text:
// elements are made with el() and filled through textContent, never innerHTML.
"use strict";

const state = {
  filters: { tool: "", method: "", status: "", session: "" },
  older: null,      // the cursor of the next page of older requests
  lastId: 0,        // the newest request the list holds: the live feed starts after it
  source: null,     // the EventSource of the live feed
  picked: null,     // the id of the request shown in detail
  info: {},
  sessionsTimer: null,
};

const $ = (selector) => document.querySelector(selector);

// An element with attributes (className, text, dataset entries as data-*, on* handlers) and children.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function params(values) {
  const out = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) if (value !== "" && value !== null && value !== undefined) out.set(key, value);
  return out.toString();
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const value = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(value.error || `HTTP ${response.status}`);
  return value;
}

function showError(error) {
  const box = $("#error");
  box.hidden = !error;
  box.textContent = error ? String(error.message || error) : "";
}

// -- the list

function clock(seconds) {
  const d = new Date(seconds * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function shortSession(id) { return id ? id.slice(0, 8) : ""; }

function rowFor(r, fresh) {
  const via = el("span", { className: `badge ${r.via}`, text: r.via });
  const tr = el("tr", { "data-id": r.id, className: [r.failed ? "failed" : "", fresh ? "fresh" : ""].join(" ").trim(),
                        onclick: () => showDetail(r.id) },
    el("td", { text: clock(r.started) }),
    el("td", {}, via),
    el("td", { text: r.method }),
    el("td", { className: "status", text: r.error_code !== null ? `${r.status ?? "-"} (${r.error_code})` : (r.status ?? r.outcome) }),
    el("td", { text: r.mcp_method || r.path }),
    el("td", { className: "target", text: r.tool || r.resource || r.prompt || "" }),
    el("td", { text: shortSession(r.session_id), title: r.session_id || "" }),
    el("td", { text: r.latency_ms === null ? "-" : Math.round(r.latency_ms) }));
  if (r.id === state.picked) tr.classList.add("picked");
  return tr;
}

async function loadList() {
  showError(null);
  const tbody = $("#requests tbody");
  try {
    const page = await api("/api/requests?" + params({ ...state.filters, limit: 100 }));
    tbody.replaceChildren(...page.requests.map((r) => rowFor(r, false)));
    state.older = page.older;
    state.lastId = page.last_id;
    $("#older").hidden = state.older === null;
    $("#empty").hidden = page.requests.length > 0;
    follow();
  } catch (error) {
    showError(error);
  }
}

async function loadOlder() {
  if (state.older === null) return;
  try {
    const page = await api("/api/requests?" + params({ ...state.filters, before: state.older, limit: 100 }));
    $("#requests tbody").append(...page.requests.map((r) => rowFor(r, false)));
    state.older = page.older;
    $("#older").hidden = state.older === null;
  } catch (error) {
    showError(error);
  }
}

// -- the live feed

function follow() {
  if (state.source) state.source.close();
  const live = $("#live");
  const source = new EventSource("/api/live?" + params({ ...state.filters, after: state.lastId }));
  state.source = source;
  source.onopen = () => { live.className = "live on"; live.textContent = "live"; };
  source.onerror = () => { live.className = "live off"; live.textContent = "reconnecting"; };
  source.addEventListener("request", (event) => {
    const r = JSON.parse(event.data);
    if (document.querySelector(`#requests tr[data-id="${Number(r.id)}"]`)) return;
    state.lastId = Math.max(state.lastId, r.id);
    $("#requests tbody").prepend(rowFor(r, true));
    $("#empty").hidden = true;
    refreshSessionsSoon();
  });
  source.addEventListener("gap", () => { source.close(); loadList(); });  // too much missed: reload
}

// -- sessions

function refreshSessionsSoon() {
  if (state.sessionsTimer !== null) return;
  state.sessionsTimer = setTimeout(() => { state.sessionsTimer = null; loadSessions(); }, 500);
}

async function loadSessions() {
  try {
    const { sessions } = await api("/api/sessions?limit=100");
    const items = sessions.map((s) => el("li", {
        "data-session": s.session_id, className: s.session_id === state.filters.session ? "picked" : "",
        title: s.session_id, onclick: () => pickSession(s.session_id) },
      el("strong", { text: s.client_name ? `${s.client_name} ${s.client_version || ""}` : "unknown client" }),
      el("span", { className: "meta", text: `${shortSession(s.session_id)} · ${s.requests} req · ${s.errors} err · ${s.active ? "active" : s.state}` })));
    $("#sessions").replaceChildren(...items);
  } catch (error) {
    showError(error);
  }
}

function pickSession(id) {
  state.filters.session = id || "";
  const chip = $("#session-filter");
  chip.hidden = !id;
  chip.querySelector("code").textContent = shortSession(id);
  for (const li of document.querySelectorAll("#sessions li")) li.classList.toggle("picked", li.dataset.session === id);
  loadList();
}

// -- a request's detail

function prettyJSON(value) { return JSON.stringify(value, null, 2); }

function bodyView(body, id) {
  const box = el("div", { id });
  if (body.events) {
    if (!body.events.length) box.append(el("p", { className: "muted", text: "no events" }));
    body.events.forEach((e, i) => box.append(el("div", { className: "event" },
      el("div", { className: "name", text: `event ${i + 1}: ${e.event}${e.id ? ` (id ${e.id})` : ""}` }),
      el("pre", { text: e.json !== null ? prettyJSON(e.json) : e.data }))));
  } else if (body.json !== null && body.json !== undefined) {
    box.append(el("pre", { text: prettyJSON(body.json) }));
  } else {
    box.append(el("pre", { text: body.text || "(empty)" }));
  }
  if (body.truncated) box.append(el("p", { className: "muted", text: `kept ${body.kept} of ${body.size} bytes` }));
  return box;
}

function headersView(headers) {
  return el("table", { className: "headers" },
    el("tbody", {}, ...headers.map(([name, value]) => el("tr", {}, el("td", { text: name }), el("td", { text: value })))));
}

function ms(value) { return value === null || value === undefined ? "-" : `${value.toFixed(1)} ms`; }

const NOT_SENT = new Set(["host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
  "upgrade", "expect", "accept-encoding", "proxy-authorization", "proxy-connection", "x-forwarded-for",
  "x-forwarded-host", "x-forwarded-proto", "forwarded", "via"]);

function shellQuote(text) { return "'" + String(text).replace(/'/g, "'\\''") + "'"; }

function curlFor(d) {
  const base = state.info.gateway || location.origin;
  const parts = ["curl", "-sS", "-N", "-X", d.method, shellQuote(base + d.target)];
  for (const [name, value] of d.request_headers) if (!NOT_SENT.has(name)) parts.push("-H", shellQuote(`${name}: ${value}`));
  if (d.request_body.text) parts.push("--data-raw", shellQuote(d.request_body.text));
  return parts.join(" ");
}

async function copyCurl(d, button) {
  const command = curlFor(d);
  $("#curl").value = command;
  $("#curl").hidden = false;
  try {
    await navigator.clipboard.writeText(command);
    button.textContent = "copied";
  } catch (error) {
    $("#curl").select();
    button.textContent = "select and copy";
  }
  setTimeout(() => { button.textContent = "copy as curl"; }, 1500);
}

function editableHeaders(d) {
  return d.request_headers.filter(([name]) => !NOT_SENT.has(name)).map(([n, v]) => `${n}: ${v}`).join("\n");
}

function parseHeaders(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean).map((line) => {
    const at = line.indexOf(":");
    if (at < 1) throw new Error(`not a header line: ${line}`);
    return [line.slice(0, at).trim(), line.slice(at + 1).trim()];
  });
}

async function replay(d, edited) {
  const out = $("#replay-answer");
  out.replaceChildren(el("p", { className: "muted", text: "replaying…" }));
  try {
    const request = {};
    if (edited) {
      request.body = $("#edit-body").value;
      request.headers = parseHeaders($("#edit-headers").value);
    }
    const result = await api(`/api/requests/${d.id}/replay`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(request) });
    const left = result.sent.left_out.length ? `; not sent (redacted in the store): ${result.sent.left_out.join(", ")}` : "";
    out.replaceChildren(
      el("h3", { text: `Replay answer: HTTP ${result.answer.status}` }),
      el("p", { className: "muted", text: `sent ${result.sent.method} ${result.sent.target}${left}` }),
      bodyView(result.answer.body, "replay-body"));
  } catch (error) {
    out.replaceChildren(el("p", { className: "error", text: `replay failed: ${error.message}` }));
  }
}

async function showDetail(id) {
  state.picked = id;
  for (const tr of document.querySelectorAll("#requests tbody tr")) tr.classList.toggle("picked", Number(tr.dataset.id) === id);
  const pane = $("#detail");
  pane.hidden = false;
  let d;
  try {
    d = await api(`/api/requests/${id}`);
  } catch (error) {
    pane.replaceChildren(el("p", { className: "error", text: error.message }));
    return;
  }
  if (state.picked !== id) return;
  const curlButton = el("button", { type: "button", id: "copy-curl", text: "copy as curl", onclick: () => copyCurl(d, curlButton) });
  const actions = el("div", { className: "actions" }, curlButton);
  const editor = el("div", { id: "editor", hidden: true },
    el("h3", { text: "Edit and replay" }),
    el("label", { text: "headers (name: value)" }), el("textarea", { id: "edit-headers", value: editableHeaders(d) }),
    el("label", { text: "body" }), el("textarea", { id: "edit-body", value: d.request_body.text }),
    el("div", { className: "actions" }, el("button", { type: "button", id: "send-edited", text: "send edited", onclick: () => replay(d, true) })));
  if (d.replayable) {
    actions.prepend(el("button", { type: "button", id: "replay", text: "replay", onclick: () => replay(d, false) }),
                    el("button", { type: "button", id: "edit", text: "edit…", onclick: () => { editor.hidden = !editor.hidden; } }));
  }
  const what = [d.mcp_method, d.tool || d.resource || d.prompt].filter(Boolean).join(" ");
  pane.replaceChildren(
    el("h2", { text: `#${d.id} ${d.method} ${d.target}` }),
    el("p", {}, el("strong", { text: what || d.route }), " ",
      el("span", { className: d.failed ? "error" : "muted",
        text: `HTTP ${d.status ?? "-"} · ${d.outcome}${d.error_code !== null ? ` · error ${d.error_code}: ${d.error_message}` : ""}` })),
    el("dl", { className: "timings" },
      el("dt", { text: "total" }), el("dd", { text: ms(d.latency_ms) }),
      el("dt", { text: "upstream (to headers)" }), el("dd", { text: ms(d.upstream_ms) }),
      el("dt", { text: "downstream (body)" }), el("dd", { text: ms(d.downstream_ms) }),
      el("dt", { text: "via" }), el("dd", { text: d.via }),
      el("dt", { text: "session" }), el("dd", { text: d.session_id || "-" }),
      el("dt", { text: "client" }), el("dd", { text: d.client_name ? `${d.client_name} ${d.client_version || ""}` : "-" })),
    actions,
    el("textarea", { id: "curl", readOnly: true, hidden: true }),
    editor,
    el("div", { id: "replay-answer" }),
    el("h3", { text: "Request" }), bodyView(d.request_body, "request-body"),
    el("h3", { text: "Response" }), bodyView(d.response_body, "response-body"),
    el("h3", { text: "Request headers" }), headersView(d.request_headers),
    el("h3", { text: "Response headers" }), headersView(d.response_headers));
}

// -- start

async function start() {
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    for (const key of ["tool", "method", "status"]) state.filters[key] = String(form.get(key) || "").trim();
    loadList();
  });
  $("#clear-session").addEventListener("click", () => pickSession(""));
  $("#older").addEventListener("click", loadOlder);
  try {
    state.info = await api("/api/info");
    $("#where").textContent = `${state.info.gateway || "gateway"} → ${state.info.upstream} · store ${state.info.store}`;
  } catch (error) {
    showError(error);
  }
  await Promise.all([loadList(), loadSessions()]);
}

start();
