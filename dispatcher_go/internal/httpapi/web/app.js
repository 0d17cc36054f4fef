// The dispatcher's web page: submit, watch a task's events live (SSE with
// resume by seq), cancel, answer call_user, approve held tool calls, browse
// past tasks. No framework, no build step.
"use strict";

const $ = (s) => document.querySelector(s);
const VIEW_KEY = "dispatcher.view";

// The task on screen: its events in seq order and the last seq shown.
const view = { taskId: "", lastSeq: 0, events: [], ended: false };
// Test and debugging counters: events that arrived out of order.
window.__dispatcher = { gaps: 0, dupes: 0, view };

let es = null;        // the EventSource of view.taskId
let retryTimer = null;
let saveTimer = null;

// ---- token and requests ----------------------------------------------------

function token() { return sessionStorage.getItem("dispatcher.token") || ""; }

function setToken(t) {
  sessionStorage.setItem("dispatcher.token", t);
  // EventSource cannot send headers: GET requests may carry the token in a
  // cookie (the server accepts it for GET only).
  document.cookie = "dispatcher_token=" + encodeURIComponent(t) + "; path=/api; SameSite=Strict" + (t ? "" : "; max-age=0");
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || (r.status + " " + r.statusText));
  return data;
}

// ---- saving the view across reloads ----------------------------------------

function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const v = { taskId: view.taskId, lastSeq: view.lastSeq, events: view.events, ended: view.ended };
  try {
    sessionStorage.setItem(VIEW_KEY, JSON.stringify(v));
  } catch (e) {
    // Too big (inline screenshots): keep only the id; a reload reads the
    // whole history again from seq 0.
    try { sessionStorage.setItem(VIEW_KEY, JSON.stringify({ taskId: view.taskId, lastSeq: 0, events: [] })); } catch (_) {}
  }
}

function saveSoon() { if (!saveTimer) saveTimer = setTimeout(saveNow, 200); }
window.addEventListener("pagehide", saveNow);

// ---- rendering ---------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function short(s, n) { s = String(s || ""); return s.length > n ? s.slice(0, n) + "…" : s; }

function kindOf(ev) {
  for (const k of ["state", "thought", "content", "tool_call", "tool_result", "error", "usage", "stage",
    "artifact", "result", "stop", "stopped", "user_input", "policy"]) {
    if (ev[k] !== undefined) return k;
  }
  return "unknown";
}

// statusName is a task status as the page shows it: the enum's own name
// (FAILURE stays FAILURE: never renamed to anything that reads as success).
function statusName(s) { return String(s || "").replace("TASK_STATUS_", ""); }

const TERMINAL = ["SUCCESS", "FAILURE", "CANCELLED"];

function describe(ev, k) {
  const v = ev[k] || {};
  switch (k) {
    case "state": return statusName(v.status) + (v.message ? ": " + v.message : "");
    case "thought": return (v.step_name ? "[" + v.step_name + "] " : "") + (v.delta || "");
    case "content": return v.text || "";
    case "tool_call": return v.tool_name + "(" + (v.arguments_json || "") + ")  #" + v.call_id;
    case "tool_result": {
      const r = v.result || {};
      const out = r.error ? "error " + r.error.code + ": " + r.error.message : (r.result_json || "");
      return r.tool_name + " #" + r.call_id + " → " + short(out, 2000) + (v.duration_ms ? "  (" + v.duration_ms + " ms)" : "");
    }
    case "usage": return "tokens in " + (v.input_tokens || 0) + " out " + (v.output_tokens || 0) + (v.cost ? " cost " + v.cost + " " + (v.currency || "") : "") + (v.model ? " model " + v.model : "");
    case "stage": return v.stage + (v.message ? ": " + v.message : "");
    case "artifact": return (v.kind || "artifact") + (v.description ? ": " + v.description : "");
    case "result": return String(v.outcome || "").replace("SESSION_OUTCOME_", "") + ": " + (v.result || "") + (v.message ? " — " + v.message : "");
    case "stop": return "stop: " + (v.reason || "") + (v.rule_id ? " [" + v.rule_id + "]" : "");
    case "stopped": return "stopped" + (v.reason ? ": " + v.reason : "");
    case "user_input": return "you: " + (v.text || "");
    case "error": return (v.code ? v.code + ": " : "") + (v.message || "");
    case "policy": {
      const act = String(v.action || "").replace("POLICY_ACTION_", "").toLowerCase();
      const out = v.hold_outcome ? " → " + String(v.hold_outcome).replace("HOLD_OUTCOME_", "").toLowerCase() : "";
      return act + out + (v.tool_name ? " " + v.tool_name + " #" + v.call_id : "") + " by rule " + v.rule_id + (v.reason ? ": " + v.reason : "");
    }
  }
  return JSON.stringify(ev);
}

// Streamed text (content, or thoughts of one step) arriving chunk by chunk
// is joined into one row; each chunk keeps its own element with its seq.
function renderEvent(ev) {
  const k = kindOf(ev);
  const last = $("#events").lastElementChild;
  const step = k === "thought" ? (ev.thought.step_name || "") : "";
  if ((k === "content" || k === "thought") && last && last.dataset.kind === k && last.dataset.step === step) {
    const chunk = el("span", "chunk", k === "content" ? ev.content.text || "" : ev.thought.delta || "");
    chunk.dataset.seq = String(ev.seq);
    last.querySelector(".text").append(chunk);
    return;
  }
  const row = el("div", "ev " + k);
  row.dataset.kind = k;
  row.dataset.step = step;
  if (k === "content" || k === "thought") {
    const text = el("span", "text");
    const chunk = el("span", "chunk", describe(ev, k));
    chunk.dataset.seq = String(ev.seq);
    text.append(chunk);
    row.append(el("span", "seq", ev.seq), el("span", "kind", k), text);
    $("#events").append(row);
    return;
  }
  row.dataset.seq = String(ev.seq);
  row.append(el("span", "seq", ev.seq), el("span", "kind", k), el("span", "text", describe(ev, k)));
  if (k === "artifact" && ev.artifact) {
    const a = ev.artifact;
    const src = a.data ? "data:" + (a.mime_type || "image/png") + ";base64," + a.data : (/^https?:|^data:image\//.test(a.uri || "") ? a.uri : "");
    if (src && /^image\//.test(a.mime_type || "image/png")) {
      const img = el("img");
      img.alt = a.description || a.kind || "screenshot";
      img.src = src;
      row.append(img);
    }
  }
  if (k === "policy" && ev.policy.action === "POLICY_ACTION_HOLD" && !ev.policy.hold_outcome) {
    const callId = ev.policy.call_id;
    const box = el("span", "hold");
    box.dataset.call = callId;
    for (const [label, verb] of [["Approve", "approve"], ["Reject", "reject"]]) {
      const b = el("button", verb, label);
      b.type = "button";
      b.dataset.call = callId;
      b.addEventListener("click", () => resolveHold(callId, verb));
      box.append(" ", b);
    }
    row.append(box);
  }
  $("#events").append(row);
}

// applyEvent updates the controls that depend on the events so far.
function applyEvent(ev) {
  const k = kindOf(ev);
  if (k === "policy" && ev.policy.hold_outcome) {
    document.querySelectorAll('.hold[data-call="' + CSS.escape(ev.policy.call_id) + '"]').forEach((e) => e.remove());
  }
  if (k === "stage" && ev.stage.stage === "call_user") {
    $("#reply").hidden = false;
    $("#reply-question").textContent = "The agent asks: " + (ev.stage.message || "(no message)");
  }
  if (k === "user_input") $("#reply").hidden = true;
  if (k === "usage") refreshTaskSoon();
  if (k === "state") {
    const st = statusName(ev.state.status);
    setStatus(st, ev.state.message);
    if (TERMINAL.includes(st)) {
      view.ended = true;
      $("#reply").hidden = true;
      document.querySelectorAll(".hold").forEach((e) => e.remove());
    }
  }
}

function onEvent(ev) {
  const seq = Number(ev.seq);
  if (seq <= view.lastSeq) { window.__dispatcher.dupes++; return; }
  if (seq !== view.lastSeq + 1) window.__dispatcher.gaps++;
  view.lastSeq = seq;
  view.events.push(ev);
  renderEvent(ev);
  applyEvent(ev);
  saveSoon();
}

function setStatus(st, msg) {
  const s = $("#status");
  s.textContent = st;
  s.className = "status " + st;
  if (msg !== undefined) $("#task-msg").textContent = msg || "";
}

function setConn(state) {
  const c = $("#conn");
  c.textContent = state;
  c.className = "conn " + state;
}

// ---- watching a task -----------------------------------------------------------

function showTask(id, restored) {
  closeStream();
  view.taskId = id;
  view.lastSeq = 0;
  view.events = [];
  view.ended = false;
  $("#events").textContent = "";
  $("#reply").hidden = true;
  $("#task-head").hidden = false;
  $("#task-id").textContent = id;
  setStatus("", "");
  $("#stats").textContent = "";
  $("#task-models").textContent = "";
  if (restored) {
    for (const ev of restored.events || []) {
      view.lastSeq = Number(ev.seq);
      view.events.push(ev);
      renderEvent(ev);
      applyEvent(ev);
    }
  }
  saveNow();
  refreshTask();
  openStream();
}

function closeStream() {
  clearTimeout(retryTimer);
  if (es) { es.close(); es = null; }
}

function openStream() {
  closeStream();
  if (view.ended) { setConn("ended"); return; }
  const id = view.taskId;
  // after_seq is where this page stands; on its own reconnects EventSource
  // sends Last-Event-ID, which the server prefers.
  es = new EventSource("/api/tasks/" + encodeURIComponent(id) + "/events?after_seq=" + view.lastSeq);
  const mine = es;
  es.onopen = () => setConn("live");
  es.onmessage = (m) => { if (view.taskId === id) onEvent(JSON.parse(m.data)); };
  es.addEventListener("end", () => {
    mine.close();
    if (es === mine) es = null;
    setConn("ended");
    saveNow();
    refreshTask();
    loadTasks();
  });
  es.addEventListener("stream_error", () => { mine.close(); retrySoon(); });
  es.onerror = () => {
    // CONNECTING: the browser retries by itself with Last-Event-ID.
    // CLOSED: it gave up (e.g. an error status); retry from our last seq.
    if (mine.readyState === EventSource.CLOSED) retrySoon();
    else setConn("retrying");
  };
}

function retrySoon() {
  setConn("retrying");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => { if (!view.ended) openStream(); }, 1000);
}

let refreshTimer = null;
function refreshTaskSoon() {
  if (!refreshTimer) refreshTimer = setTimeout(() => { refreshTimer = null; refreshTask(); }, 500);
}

async function refreshTask() {
  const id = view.taskId;
  if (!id) return;
  try {
    const t = await api("GET", "/api/tasks/" + encodeURIComponent(id));
    if (id !== view.taskId) return;
    const st = statusName(t.status);
    // A reply sent before the task's end event arrived is stale: it must
    // not take back the end the page shows (e.g. RUNNING over FAILURE).
    if (!TERMINAL.includes(st) && TERMINAL.includes($("#status").textContent)) return;
    setStatus(st, t.message);
    $("#stats").textContent = statsText(t.statistics) + (t.result ? "  result: " + short(t.result, 200) : "");
    // The models that ran, as the commander reported them (not the
    // configured name).
    $("#task-models").textContent = (t.models || []).length ? "models: " + t.models.join(", ") : "";
  } catch (e) {
    $("#task-msg").textContent = e.message;
  }
}

function statsText(s) {
  s = s || {};
  return "steps " + (s.steps || 0) + " · tokens " + (Number(s.totalTokens || s.total_tokens || 0)) +
    " · cost " + (s.cost || 0) + " " + (s.currencySymbol || s.currency_symbol || "") +
    " · " + (s.durationSeconds || s.duration_seconds || 0) + " s";
}

// ---- actions -------------------------------------------------------------------

async function submitTask(e) {
  e.preventDefault();
  $("#submit-error").textContent = "";
  const body = { instruction: $("#instruction").value };
  if ($("#planner").value.trim()) body.planner = $("#planner").value.trim();
  try {
    const r = await api("POST", "/api/tasks", body);
    showTask(r.task_id);
    loadTasks();
  } catch (err) {
    $("#submit-error").textContent = err.message;
  }
}

async function cancelTask() {
  try {
    const r = await api("POST", "/api/tasks/" + encodeURIComponent(view.taskId) + "/cancel", {});
    $("#task-msg").textContent = r.message || "";
  } catch (err) {
    $("#task-msg").textContent = err.message;
  }
}

async function sendReply() {
  const text = $("#reply-text").value;
  if (!text.trim()) return;
  try {
    await api("POST", "/api/tasks/" + encodeURIComponent(view.taskId) + "/interject", { text });
    $("#reply-text").value = "";
  } catch (err) {
    $("#reply-question").textContent = err.message;
  }
}

async function resolveHold(callId, verb) {
  try {
    await api("POST", "/api/tasks/" + encodeURIComponent(view.taskId) + "/tool-calls/" + encodeURIComponent(callId) + "/" + verb, {});
  } catch (err) {
    $("#task-msg").textContent = err.message;
  }
}

let listGen = 0;
async function loadTasks() {
  const gen = ++listGen;
  try {
    const r = await api("GET", "/api/tasks?page_size=100");
    if (gen !== listGen) return; // a newer refresh is on its way
    const body = $("#tasks tbody");
    body.textContent = "";
    for (const t of r.tasks || []) {
      const st = statusName(t.status);
      const s = t.statistics || {};
      const tr = el("tr");
      tr.dataset.task = t.task_id;
      // An admin's listing names each task's tenant (others get none).
      const owner = t.tenant ? "[" + t.tenant + "] " : "";
      tr.append(el("td", "status " + st, st), el("td", "instr", owner + t.instruction),
        el("td", "", s.steps || 0), el("td", "", Number(s.totalTokens || s.total_tokens || 0)),
        el("td", "", s.cost ? s.cost.toFixed(4) : "0"), el("td", "", (s.durationSeconds || s.duration_seconds || 0) + " s"));
      tr.title = t.task_id + (t.message ? " — " + t.message : "");
      tr.addEventListener("click", () => showTask(t.task_id));
      body.append(tr);
    }
  } catch (err) {
    $("#submit-error").textContent = err.message;
  }
}

// ---- start -----------------------------------------------------------------------

function init() {
  $("#token").value = token();
  $("#token").addEventListener("change", () => { setToken($("#token").value); loadTasks(); });
  $("#submit-form").addEventListener("submit", submitTask);
  $("#cancel").addEventListener("click", cancelTask);
  $("#reply-send").addEventListener("click", sendReply);
  $("#reply-text").addEventListener("keydown", (e) => { if (e.key === "Enter") sendReply(); });
  $("#refresh").addEventListener("click", loadTasks);
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(VIEW_KEY) || "null"); } catch (_) {}
  if (saved && saved.taskId) showTask(saved.taskId, saved);
  loadTasks();
  // The list shows other clients' tasks too: refresh it now and then.
  setInterval(() => { if (!document.hidden) loadTasks(); }, 5000);
}

init();
