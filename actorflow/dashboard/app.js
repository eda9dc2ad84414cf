// The actorflow dashboard: plain JavaScript, no build step, no network access
// beyond this server's own API. Every value from the API is inserted as text.
"use strict";

const POLL_MS = 1000;
const STATUSES = ["queued", "running", "waiting", "waitingForPause", "paused", "complete",
  "errored", "terminated"];
const TOKEN_KEY = "actorflow-token";
let view = null;        // {kind, refresh()} of the page on screen

// -- DOM helpers ---------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(status, extra) {
  return h("span", {class: `badge s-${status} ${extra || ""}`, dataset: {status}}, status);
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, {hour12: false}) + "." +
    String(d.getMilliseconds()).padStart(3, "0");
}

function fmtDuration(ms) {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  if (ms < 3600000) return `${(ms / 60000).toFixed(1)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function notice(text, bad) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = bad ? "notice bad" : "notice";
  el.hidden = false;
  clearTimeout(notice.t);
  notice.t = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3000);
}

// -- API -----------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, name, message) {
    super(message);
    this.status = status;
    this.errorName = name;
  }
}

async function api(path, method, body) {
  const headers = {"Accept": "application/json"};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const init = {method: method || "GET", headers};
  if (method && method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) {
    askToken();
    throw new ApiFailure(401, "Unauthorized", "a valid token is required");
  }
  if (!data || !data.success) {
    const err = (data && data.errors && data.errors[0]) || {};
    throw new ApiFailure(resp.status, err.name || "HTTPError", err.message || resp.statusText);
  }
  return data;
}

function askToken() {
  const overlay = document.getElementById("token-overlay");
  if (!overlay.hidden) return;
  overlay.hidden = false;
  document.getElementById("token-input").focus();
}

function setupToken() {
  const form = document.getElementById("token-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token-input");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    document.getElementById("token-overlay").hidden = true;
    showTokenButton();
    refresh();
  });
  const forget = document.getElementById("forget-token");
  forget.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenButton();
  });
  showTokenButton();
}

function showTokenButton() {
  document.getElementById("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

const enc = encodeURIComponent;
const instPath = (wf, id) => `api/workflows/${enc(wf)}/instances/${enc(id)}`;

// -- routing -------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "i" && parts.length === 3) return {kind: "instance", wf: parts[1], id: parts[2]};
  return {kind: "overview", wf: params.get("wf") || "", status: params.get("status") || ""};
}

function route() {
  const r = parseHash();
  const main = document.getElementById("main");
  main.replaceChildren();
  if (view && view.close) view.close();
  view = r.kind === "instance" ? instancePage(main, r) : overviewPage(main, r);
  refresh();
}

async function refresh() {
  if (!view) return;
  if (refresh.busy) { refresh.again = true; return; }  // one more after this one
  refresh.busy = true;
  refresh.again = false;
  const live = document.getElementById("live");
  try {
    await view.refresh();
    live.textContent = `live · ${new Date().toLocaleTimeString(undefined, {hour12: false})}`;
    live.classList.remove("stale");
  } catch (e) {
    live.textContent = `not updating: ${e.errorName || "error"}`;
    live.classList.add("stale");
  } finally {
    refresh.busy = false;
    if (refresh.again) setTimeout(refresh, 0);
  }
}

// The timer's refresh: skipped while the page follows its own event stream.
function poll() {
  if (view && view.streaming && view.streaming()) return;
  refresh();
}

// Follows a Server-Sent Events stream with fetch (EventSource cannot send the
// token); calls onMessage({id, event, data}) per message. Returns its AbortController.
function followStream(path, lastId, onMessage, onEnd) {
  const ctrl = new AbortController();
  const headers = {"Accept": "text/event-stream"};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  if (lastId) headers["Last-Event-ID"] = lastId;
  (async () => {
    let ok = false;
    try {
      const resp = await fetch(path, {headers, signal: ctrl.signal});
      if (!resp.ok || !resp.body) throw new Error(`stream: HTTP ${resp.status}`);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const msg = {};
          for (const line of buf.slice(0, cut).split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const name = i < 0 ? line : line.slice(0, i);
            msg[name] = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          }
          buf = buf.slice(cut + 2);
          if (msg.id !== undefined) onMessage(msg);
        }
      }
      ok = true;
    } catch (e) {
      ok = false;
    }
    onEnd(ok && !ctrl.signal.aborted);
  })();
  return ctrl;
}

// -- overview: workflows and instances -----------------------------------------------

function overviewPage(main, r) {
  document.getElementById("crumbs").replaceChildren();
  const wfBody = h("tbody");
  const wfSelect = h("select", {id: "filter-workflow", onchange: () => setFilter()},
    h("option", {value: ""}, "all workflows"));
  const stSelect = h("select", {id: "filter-status", onchange: () => setFilter()},
    h("option", {value: ""}, "all statuses"),
    STATUSES.map((s) => h("option", {value: s}, s)));
  stSelect.value = r.status;
  const instBody = h("tbody", {id: "instances"});
  const more = h("button", {class: "secondary", type: "button", hidden: true,
    onclick: () => { page += 1; refreshInstances(); }}, "More");
  let page = 1;

  function setFilter() {
    const q = new URLSearchParams();
    if (wfSelect.value) q.set("wf", wfSelect.value);
    if (stSelect.value) q.set("status", stSelect.value);
    location.hash = `#/?${q}`;
  }

  main.append(
    h("div", {class: "card"}, h("h1", {}, "Workflows"),
      h("table", {id: "workflows"},
        h("thead", {}, h("tr", {}, h("th", {}, "workflow"), h("th", {}, "instances by status"),
          h("th", {}, "total"))),
        wfBody)),
    h("div", {class: "card"}, h("h1", {}, "Instances"),
      h("div", {class: "filters"}, wfSelect, stSelect),
      h("table", {},
        h("thead", {}, h("tr", {}, ["workflow", "id", "status", "created", "started", "error"]
          .map((t) => h("th", {}, t)))),
        instBody),
      more));

  async function refreshWorkflows() {
    const {result} = await api("api/workflows");
    const names = result.map((w) => w.name);
    const have = [...wfSelect.options].map((o) => o.value).slice(1);
    if (json(have) !== json(names)) {
      wfSelect.replaceChildren(h("option", {value: ""}, "all workflows"),
        ...names.map((n) => h("option", {value: n}, n)));
    }
    wfSelect.value = r.wf;
    wfBody.replaceChildren(...result.map((w) => h("tr", {dataset: {workflow: w.name}},
      h("td", {class: "mono"}, w.name, w.registered === false ? h("span", {
        class: "muted tag", title: "Its class is not registered in this process: its " +
          "instances are shown and can be controlled, but do not run here"},
      " not registered here") : ""),
      h("td", {}, STATUSES.filter((s) => w.counts[s]).map((s) => {
        const b = badge(s, "count");
        b.textContent = `${s} ${w.counts[s]}`;
        b.addEventListener("click", () => {
          location.hash = `#/?wf=${enc(w.name)}&status=${enc(s)}`;
        });
        return b;
      })),
      h("td", {}, w.total))));
    return names;
  }

  async function refreshInstances(names) {
    names = names || [...wfSelect.options].map((o) => o.value).slice(1);
    const wanted = r.wf ? [r.wf] : names;
    const limit = 50 * page;
    const q = `limit=${limit}` + (r.status ? `&status=${enc(r.status)}` : "");
    const pages = await Promise.all(wanted.map((wf) =>
      api(`api/workflows/${enc(wf)}/instances?${q}`)));
    let rows = pages.flatMap((p) => p.result);
    rows.sort((a, b) => (b.created_on || "").localeCompare(a.created_on || ""));
    more.hidden = !pages.some((p) => p.result_info && p.result_info.cursor);
    rows = rows.slice(0, limit);
    instBody.replaceChildren(...rows.map((i) => h("tr", {
      class: "clickable", dataset: {instance: i.id, workflow: i.workflow},
      onclick: () => { location.hash = `#/i/${enc(i.workflow)}/${enc(i.id)}`; },
    },
    h("td", {class: "mono"}, i.workflow),
    h("td", {class: "mono"}, h("a", {href: `#/i/${enc(i.workflow)}/${enc(i.id)}`}, i.id)),
    h("td", {}, badge(i.status)),
    h("td", {}, fmtTime(i.created_on)),
    h("td", {}, fmtTime(i.started_on)),
    h("td", {class: "muted"}, i.error ? `${i.error.name}: ${i.error.message}` : ""))));
    if (!rows.length) {
      instBody.append(h("tr", {}, h("td", {colspan: 6, class: "muted"}, "no instances")));
    }
  }

  return {
    kind: "overview",
    async refresh() { await refreshInstances(await refreshWorkflows()); },
  };
}

// -- instance page -------------------------------------------------------------------

function instancePage(main, r) {
  document.getElementById("crumbs").replaceChildren(
    h("span", {}, "/"), h("a", {href: `#/?wf=${enc(r.wf)}`}, r.wf),
    h("span", {}, "/"), h("span", {class: "mono"}, r.id));
  const title = h("h1", {}, h("span", {class: "mono"}, r.id), " ", h("span", {id: "status"}));
  const summary = h("div", {class: "muted", id: "times"});
  const errorBox = h("div", {id: "error", class: "error-box", hidden: true});
  const fromStep = h("select", {id: "from-step"}, h("option", {value: ""}, "from the start"));
  const evType = h("input", {id: "event-type", placeholder: "event type", size: 14});
  const evPayload = h("textarea", {id: "event-payload", rows: 1, cols: 28,
    placeholder: '{"payload": "as JSON"}'});
  const forkStep = h("select", {id: "fork-step", title: "The step the fork runs from"});
  const forkId = h("input", {id: "fork-id", placeholder: "new id (optional)", size: 16});
  const buttons = {};
  const armed = {};

  function actionButton(action, label, cls, confirmText) {
    const b = h("button", {type: "button", class: cls || "", dataset: {action},
      onclick: () => onAction(action, label, confirmText)}, label);
    buttons[action] = b;
    return b;
  }

  async function onAction(action, label, confirmText) {
    const b = buttons[action];
    if (confirmText && !armed[action]) {
      armed[action] = setTimeout(() => { armed[action] = null; b.textContent = label; }, 4000);
      b.textContent = confirmText;
      return;
    }
    clearTimeout(armed[action]);
    armed[action] = null;
    b.textContent = label;
    const body = {status: action};
    if (action === "restart" && fromStep.value) body.from_step = fromStep.value;
    try {
      const {result} = await api(`${instPath(r.wf, r.id)}/status`, "PATCH", body);
      notice(`${action}: now ${result.status}`);
    } catch (e) {
      notice(`${action} failed: ${e.errorName}: ${e.message}`, true);
    }
    refresh();
  }

  // Fork: a new instance that keeps this one's steps before the chosen one
  // and runs the rest; on success the page moves to it.
  async function onFork() {
    const b = buttons.fork;
    if (!forkStep.value) {
      notice("fork: choose the step to run from", true);
      return;
    }
    if (!armed.fork) {
      armed.fork = setTimeout(() => { armed.fork = null; b.textContent = "Fork"; }, 4000);
      b.textContent = "Confirm fork";
      return;
    }
    clearTimeout(armed.fork);
    armed.fork = null;
    b.textContent = "Fork";
    const body = {at_step: JSON.parse(forkStep.value)};
    if (forkId.value.trim()) body.id = forkId.value.trim();
    try {
      const {result} = await api(`${instPath(r.wf, r.id)}/fork`, "POST", body);
      notice(`forked: ${result.workflow}/${result.id}`);
      forkId.value = "";
      location.hash = `#/i/${enc(result.workflow)}/${enc(result.id)}`;
    } catch (e) {
      notice(`fork failed: ${e.errorName}: ${e.message}`, true);
      refresh();
    }
  }

  async function sendEvent(ev) {
    ev.preventDefault();
    let payload = null;
    if (evPayload.value.trim()) {
      try { payload = JSON.parse(evPayload.value); } catch (e) {
        notice(`the payload is not JSON: ${e.message}`, true);
        return;
      }
    }
    try {
      await api(`${instPath(r.wf, r.id)}/events/${enc(evType.value.trim())}`, "POST", payload);
      notice(`event ${evType.value.trim()} sent`);
      evPayload.value = "";
    } catch (e) {
      notice(`send-event failed: ${e.errorName}: ${e.message}`, true);
    }
    refresh();
  }

  const gantt = h("div", {class: "gantt", id: "timeline"});
  const stepsBody = h("tbody", {id: "steps"});
  const params = h("pre", {id: "params"});
  const output = h("pre", {id: "output"});
  const historyBody = h("tbody", {id: "history"});
  main.append(
    h("div", {class: "card"}, title, summary),
    h("div", {class: "card"},
      h("div", {class: "actions"},
        actionButton("pause", "Pause", "secondary"),
        actionButton("resume", "Resume", "secondary"),
        actionButton("terminate", "Terminate", "danger", "Confirm terminate"),
        actionButton("restart", "Restart", "secondary", "Confirm restart"), fromStep,
        h("span", {class: "sep"}),
        forkStep, forkId,
        (buttons.fork = h("button", {type: "button", class: "secondary", dataset: {action: "fork"},
          onclick: onFork}, "Fork")),
        h("span", {class: "sep"}),
        h("form", {class: "actions", id: "event-form", onsubmit: sendEvent},
          evType, evPayload, h("button", {type: "submit", id: "send-event"}, "Send event")))),
    errorBox,
    h("div", {class: "card"}, h("h2", {}, "Timeline"), gantt,
      h("div", {class: "legend"},
        [["ok", "attempt succeeded"], ["failed", "attempt failed"], ["running", "running"],
          ["retry-wait", "retry delay"], ["sleep", "sleep"], ["wait", "waiting for event"]]
          .map(([c, t]) => h("span", {}, h("i", {class: `bar ${c}`}), t)))),
    h("div", {class: "card"}, h("h2", {}, "Steps"),
      h("table", {}, h("thead", {}, h("tr", {}, ["step", "type", "status", "attempts",
        "output / error"].map((t) => h("th", {}, t)))), stepsBody)),
    h("div", {class: "grid2"},
      h("div", {class: "card"}, h("h2", {}, "Input (params)"), params),
      h("div", {class: "card"}, h("h2", {}, "Output"), output)),
    h("div", {class: "card"}, h("details", {}, h("summary", {}, "History"),
      h("table", {}, h("thead", {}, h("tr", {}, ["time", "event", "step", "attempt", "data"]
        .map((t) => h("th", {}, t)))), historyBody))));

  // While the instance is not final, the page follows its event stream and
  // re-reads the instance on each event (not on a timer); the stream ends
  // with the instance, and the timer takes over again.
  let stream = null;
  let lastId = null;
  let closed = false;
  let retryAt = 0;  // after a failed stream: the timer polls until then

  function startStream() {
    if (stream || closed || Date.now() < retryAt) return;
    const ctrl = followStream(`${instPath(r.wf, r.id)}/history/stream`, lastId, (msg) => {
      lastId = msg.id;
      refresh();
    }, (ok) => {
      if (stream === ctrl) stream = null;
      if (!ok) retryAt = Date.now() + 5000;
      if (!closed) refresh();
    });
    stream = ctrl;
  }

  async function refreshPage() {
    const [{result: inst}, {result: hist}] = await Promise.all([
      api(instPath(r.wf, r.id)), api(`${instPath(r.wf, r.id)}/history`)]);
    if (!["complete", "errored", "terminated"].includes(inst.status)) startStream();
    document.getElementById("status").replaceChildren(badge(inst.status));
    summary.textContent = `workflow ${inst.workflow} · queued ${fmtTime(inst.queued)}` +
      (inst.start ? ` · started ${fmtTime(inst.start)}` : "") +
      (inst.end ? ` · ended ${fmtTime(inst.end)}` : "");
    const origin = inst.description && inst.description.forked_from;
    if (origin) {
      summary.append(" · forked from ", h("a", {id: "forked-from",
        href: `#/i/${enc(origin.workflow)}/${enc(origin.instance)}`}, origin.instance),
      ` at ${stepLabel(origin.at_step)}`);
    }
    const s = inst.status;
    const finished = ["complete", "errored", "terminated"].includes(s);
    buttons.pause.disabled = !["queued", "running", "waiting"].includes(s);
    buttons.resume.disabled = !["paused", "waitingForPause"].includes(s);
    buttons.terminate.disabled = finished;
    errorBox.hidden = !inst.error;
    errorBox.textContent = inst.error ? `${inst.error.name}: ${inst.error.message}` : "";
    params.textContent = json(inst.params);
    output.textContent = inst.output === null ? (finished ? "null" : "(not finished)") :
      json(inst.output);
    const names = inst.steps.filter((st) => st.type === "step").map((st) => st.name);
    const have = [...fromStep.options].map((o) => o.value).slice(1);
    const uniq = [...new Set(names)];
    if (json(have) !== json(uniq)) {
      const keep = fromStep.value;
      fromStep.replaceChildren(h("option", {value: ""}, "from the start"),
        ...uniq.map((n) => h("option", {value: n}, `from ${n}`)));
      fromStep.value = uniq.includes(keep) ? keep : "";
    }
    const forkable = inst.steps.filter((st) => st.type !== "rollback")
      .map((st) => ({name: st.name, count: st.count}));
    const haveFork = [...forkStep.options].map((o) => o.value).slice(1);
    const wantFork = forkable.map((x) => JSON.stringify(x));
    if (json(haveFork) !== json(wantFork)) {
      const keep = forkStep.value;
      forkStep.replaceChildren(h("option", {value: ""}, "fork at step…"),
        ...forkable.map((x, i) => h("option", {value: wantFork[i]}, `fork at ${stepLabel(x)}`)));
      forkStep.value = wantFork.includes(keep) ? keep : "";
    }
    buttons.fork.disabled = forkable.length === 0;
    renderGantt(gantt, inst);
    stepsBody.replaceChildren(...inst.steps.map(stepRow));
    historyBody.replaceChildren(...hist.map((e) => h("tr", {},
      h("td", {}, fmtTime(e.timestamp)), h("td", {class: "mono"}, e.type),
      h("td", {class: "mono"}, e.step || ""), h("td", {}, e.attempt || ""),
      h("td", {class: "mono"}, Object.keys(e.data || {}).length ? JSON.stringify(e.data) : ""))));
  }

  return {
    kind: "instance",
    refresh: refreshPage,
    streaming: () => stream !== null,
    close() {
      closed = true;
      if (stream) stream.abort();
      stream = null;
    },
  };
}

function stepLabel(st) {
  return st.count > 1 ? `${st.name} #${st.count}` : st.name;
}

function stepRow(st) {
  const attempts = h("ol", {class: "attempts"}, st.attempts.map((a) => h("li", {
    dataset: {attempt: a.attempt, outcome: a.success === null ? "running" : (a.success ? "ok" : "failed")},
  }, a.success === null ? "running" : (a.success ? "ok" : `failed: ${a.error ? `${a.error.name}: ${a.error.message}` : ""}`),
  a.end && a.start ? ` (${fmtDuration(new Date(a.end) - new Date(a.start))})` : "",
  a.retry_delay_ms !== null && a.retry_delay_ms !== undefined ?
    ` · retry in ${fmtDuration(a.retry_delay_ms)}` : "")));
  let result = "";
  if (st.error) result = h("span", {class: "error-text"}, `${st.error.name}: ${st.error.message}`);
  else if (st.output !== null && st.output !== undefined) result = h("pre", {}, json(st.output));
  else if (st.type === "sleep" && st.deadline) result = `until ${fmtTime(st.deadline)}`;
  const dv = st.divergence;
  const ref = (r) => (r === null || r === undefined ? "nothing" : Array.isArray(r) ?
    `{${r.map(ref).join(", ")}}` : `${r.kind} ${r.name} (${r.count})`);
  const diverged = dv ? h("div", {class: "error-text", dataset: {divergence: dv.position}},
    `replay diverged at position ${dv.position}: expected ${ref(dv.expected)}, found ${ref(dv.found)}`) : "";
  return h("tr", {dataset: {step: st.name, count: st.count}},
    h("td", {class: "mono"}, stepLabel(st)), h("td", {}, st.type),
    h("td", {}, badge(st.status)),
    h("td", {}, st.type === "step" ? attempts : ""), h("td", {}, result, diverged));
}

// The Gantt chart: one row per step, one bar per attempt, hatched retry delays,
// sleeps and event waits as their own bars.
function renderGantt(el, inst) {
  const ms = (iso) => (iso ? new Date(iso).getTime() : null);
  const now = ms(inst.now) || Date.now();
  const times = [ms(inst.queued), ms(inst.start)];
  for (const st of inst.steps) {
    times.push(ms(st.start), ms(st.end), st.type === "sleep" ? ms(st.deadline) : null);
    for (const a of st.attempts) {
      times.push(ms(a.start), ms(a.end));
      if (a.end && a.retry_delay_ms) times.push(ms(a.end) + a.retry_delay_ms);
    }
  }
  const known = times.filter((t) => t !== null);
  const t0 = known.length ? Math.min(...known) : now;
  const finished = ["complete", "errored", "terminated"].includes(inst.status);
  let t1 = Math.max(...known, finished ? ms(inst.end) || 0 : now);
  if (t1 - t0 < 50) t1 = t0 + 50;
  if (!finished) t1 += (t1 - t0) * 0.1;  // room on the right for what is still going on
  const pct = (t) => `${((t - t0) / (t1 - t0)) * 100}%`;
  const width = (a, b) => `${(Math.max(0, b - a) / (t1 - t0)) * 100}%`;
  const openEnd = finished ? ms(inst.end) || t1 : t1;

  function bar(cls, start, end, text, tip, data) {
    const b = h("div", {class: `bar ${cls}`, title: tip, dataset: data || {}}, text || "");
    b.style.left = pct(start);
    b.style.width = width(start, end);
    return b;
  }

  // A patch is the answer of step.patched, not a step: it has no bar.
  const rows = inst.steps.filter((st) => st.type !== "patch").map((st) => {
    const track = h("div", {class: "g-track"});
    const label = stepLabel(st);
    if (st.type === "step") {
      st.attempts.forEach((a, i) => {
        const start = ms(a.start);
        const end = ms(a.end) || openEnd;
        const cls = a.success === null ? "running open" : (a.success ? "ok" : "failed");
        const tip = `${label}, attempt ${a.attempt}: ` + (a.success === null ? "running" :
          a.success ? `ok in ${fmtDuration(end - start)}` :
            `failed: ${a.error ? `${a.error.name}: ${a.error.message}` : ""}`);
        track.append(bar(cls, start, end, `#${a.attempt}`, tip,
          {attempt: a.attempt, outcome: cls.split(" ")[0]}));
        if (a.success === false && a.retry_delay_ms !== null && a.retry_delay_ms !== undefined) {
          const next = st.attempts[i + 1];
          const wEnd = next ? ms(next.start) : end + a.retry_delay_ms;
          track.append(bar("retry-wait", end, wEnd, "retry", `${label}: retry delay ${fmtDuration(a.retry_delay_ms)}`,
            {retryAfter: a.attempt}));
        }
      });
    } else {
      const start = ms(st.start) || t0;
      const end = ms(st.end) || (st.type === "sleep" && ms(st.deadline) ? Math.min(ms(st.deadline), openEnd) : openEnd);
      const cls = st.type === "sleep" ? "sleep" : "wait";
      const tip = st.type === "sleep" ?
        `${label}: sleep until ${fmtTime(st.deadline || st.end)}` :
        `${label}: waiting for an event` + (st.status === "complete" ? " (received)" : "");
      track.append(bar(`${cls}${st.end ? "" : " open"}`, start, end,
        st.type === "sleep" ? "sleep" : "wait", tip, {kind: cls}));
    }
    return h("div", {class: "g-row", dataset: {step: st.name}},
      h("div", {class: "g-label mono", title: label}, label), track);
  });
  const ticks = h("div", {class: "g-ticks"});
  for (let i = 0; i <= 4; i++) {
    const t = h("span", {}, fmtDuration(((t1 - t0) * i) / 4));
    t.style.left = `${i * 25}%`;
    if (i === 4) t.style.transform = "translateX(-100%)";
    ticks.append(t);
  }
  el.replaceChildren(...(rows.length ? rows : [h("div", {class: "muted"}, "no steps yet")]),
    h("div", {class: "g-axis"}, h("span", {}, ""), ticks));
}

// -- start ---------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  route();
  setInterval(poll, POLL_MS);
});
