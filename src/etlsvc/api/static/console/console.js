// The etlsvc operator console: one page and this module, no build step, nothing fetched
// from elsewhere. Every view reads the JSON API that scripts use. The API key is kept in
// this tab's sessionStorage and sent in the Authorization header: no cookie, so no request
// can be forged from another site. Untrusted text (records, errors) only ever becomes
// text nodes, never HTML.

const KEY = "etlsvc.key";
const main = document.getElementById("main");
const flashBox = document.getElementById("flash");
const SVG = "http://www.w3.org/2000/svg";

// -- DOM ------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  return fill(el, attrs, children);
}

function s(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG, tag), attrs, children);
}

function fill(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k === "className" ? "class" : k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function link(hash, text) {
  return h("a", { href: hash }, text);
}

// -- formatting -----------------------------------------------------------------------------

const numbers = new Intl.NumberFormat("en");
const num = (n) => (n == null ? "—" : numbers.format(n));
const ms = (x) => (x == null ? "—" : `${x < 10 ? x.toFixed(1) : Math.round(x)} ms`);
const pct = (x) => (x == null ? "—" : `${(100 * x).toFixed(x < 0.001 && x > 0 ? 3 : 1)} %`);

function time(ts) {
  if (!ts) return "—";
  return new Date(ts).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function ago(ts) {
  if (!ts) return "never";
  const s = (Date.now() - new Date(ts).getTime()) / 1000;
  const [value, unit] = s < 0 ? [-s, "in "] : [s, ""];
  const span = value < 90 ? `${Math.round(value)} s` : value < 5400 ? `${Math.round(value / 60)} min`
    : value < 172800 ? `${Math.round(value / 3600)} h` : `${Math.round(value / 86400)} d`;
  return unit ? `${unit}${span}` : `${span} ago`;
}

function seconds(run) {
  if (!run.started_at) return null;
  const end = run.finished_at ? new Date(run.finished_at) : new Date();
  return Math.max(0, (end - new Date(run.started_at)) / 1000);
}

function duration(s) {
  if (s == null) return "—";
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function badge(status) {
  return h("span", { class: `badge ${status || "none"}` }, status || "no runs");
}

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// -- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const doc = await res.json().catch(() => null);
  // /health answers 503 with its full body when a source is stale: still an answer.
  if (!res.ok && !(res.status === 503 && doc?.data)) {
    throw new ApiError(res.status, doc?.error?.code ?? "error",
      doc?.error?.message ?? `${res.status} ${res.statusText}`);
  }
  return doc;
}

// A server-sent event stream read with fetch (EventSource cannot send the key).
async function events(path, signal, onData) {
  const res = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!res.ok) {
    const doc = await res.json().catch(() => null);
    throw new ApiError(res.status, doc?.error?.code, doc?.error?.message ?? res.statusText);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buffer = buffer.slice(end + 2);
      if (data) onData(data);
    }
  }
}

// A write: its outcome is flashed; 401/403 open the key dialog.
async function act(what, path, body) {
  try {
    const doc = await api(path, { method: "POST", body });
    return doc.data;
  } catch (e) {
    flash(`${what}: ${e.message}`, true);
    if (e.status === 401 || e.status === 403) askKey();
    return null;
  }
}

function flash(message, bad = false) {
  flashBox.textContent = message;
  flashBox.className = bad ? "bad" : "good";
  flashBox.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { flashBox.hidden = true; }, 8000);
}

// -- the key --------------------------------------------------------------------------------

const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
const keyButton = document.getElementById("key-button");

function showKey() {
  keyButton.textContent = sessionStorage.getItem(KEY) ? "API key: set" : "API key: none";
  whoAmI();
}

// Whom the key acts for: its tenant in the header, and the admin views for an admin key.
const who = document.getElementById("who");
async function whoAmI() {
  let me = null;
  try {
    me = (await api("/me")).data;
  } catch (e) {
    me = null;
  }
  who.textContent = me ? `tenant ${me.tenant}${me.key ? ` · ${me.key} (${me.scope})` : ""}` : "";
  who.dataset.tenant = me?.tenant ?? "";
  for (const a of document.querySelectorAll("nav a.admin")) a.hidden = me?.scope !== "admin";
}

function askKey() {
  keyInput.value = "";
  dialog.showModal();
}

keyButton.addEventListener("click", askKey);
dialog.addEventListener("close", () => {
  if (dialog.returnValue === "save" && keyInput.value.trim()) {
    sessionStorage.setItem(KEY, keyInput.value.trim());
  } else if (dialog.returnValue === "forget") {
    sessionStorage.removeItem(KEY);
  } else {
    return;
  }
  keyInput.value = "";
  showKey();
  route();
});

// -- charts ---------------------------------------------------------------------------------

// Bars of ``points`` ({value, label, status}), oldest left; hover shows each label.
// Room is kept for ``slots`` bars, the newest at the right.
function bars(points, { width = 280, height = 48, title = "", slots = 20 } = {}) {
  const max = Math.max(...points.map((p) => p.value), 0) || 1;
  const step = width / Math.max(points.length, slots);
  const left = width - step * points.length;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": title, preserveAspectRatio: "none" });
  points.forEach((p, i) => {
    const barHeight = Math.max(1, (p.value / max) * (height - 2));
    svg.append(s("rect", { x: (left + i * step + 1).toFixed(1), y: (height - barHeight).toFixed(1),
      width: Math.max(1, step - 2).toFixed(1), height: barHeight.toFixed(1),
      class: p.status || "bar" }, s("title", {}, p.label)));
  });
  if (!points.length) {
    svg.append(s("text", { x: 4, y: height / 2 + 4, class: "empty" }, "no runs yet"));
  }
  return svg;
}

// -- routing --------------------------------------------------------------------------------

let current = { stop() {} };

// What a view gets: whether it is still shown, and loops and streams stopped when it is not.
function context() {
  const controller = new AbortController();
  const timers = new Set();
  const ctx = {
    signal: controller.signal,
    alive: () => current === ctx,
    every(ms, fn) {
      const tick = async () => {
        timers.delete(timer);
        if (!ctx.alive()) return;
        try { await fn(); } catch (e) { flash(e.message, true); }
        if (ctx.alive()) timers.add(timer = setTimeout(tick, ms));
      };
      let timer = setTimeout(tick, ms);
      timers.add(timer);
    },
    stop() {
      controller.abort();
      for (const t of timers) clearTimeout(t);
    },
  };
  return ctx;
}

const VIEWS = [
  [/^\/?$/, overview],
  [/^\/runs$/, runsView],
  [/^\/runs\/(\d+)$/, runView],
  [/^\/rejects$/, rejectsView],
  [/^\/data$/, dataView],
  [/^\/data\/(\d+)$/, recordView],
  [/^\/catalog$/, catalogView],
  [/^\/audit$/, auditView],
  [/^\/keys$/, keysView],
];

async function route() {
  current.stop();
  const ctx = (current = context());
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);
  const section = path.split("/")[1] ?? "";
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    a.classList.toggle("active", a.dataset.view === section);
  }
  const found = VIEWS.find(([re]) => re.test(path || "/"));
  if (!found) {
    main.replaceChildren(h("h1", {}, "Not found"), link("#/", "Overview"));
    return;
  }
  try {
    await found[1](ctx, params, ...found[0].exec(path || "/").slice(1));
  } catch (e) {
    if (ctx.alive()) main.replaceChildren(problem(e));
  }
}

function problem(e) {
  const box = h("div", { class: "problem" }, h("h1", {}, e.status ? `${e.status}` : "Error"),
    h("p", {}, e.message));
  if (e.status === 401 || e.status === 403) {
    box.append(h("p", {}, "Enter an API key with the read scope (or turn on ",
      h("code", {}, "server.public_read"), ")."),
    h("button", { type: "button", class: "primary", onclick: askKey }, "Enter API key"));
  }
  return box;
}

// Replace what ``el`` shows (null children are left out).
function put(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c != null && c !== false));
}

function show(ctx, ...children) {
  if (ctx.alive()) put(main, ...children);
}

function hashWith(base, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== "") q.set(k, v);
  const text = q.toString();
  return text ? `${base}?${text}` : base;
}

function select(name, value, options, onchange) {
  return h("label", {}, name, h("select", { name, onchange },
    options.map(([v, text]) => h("option", { value: v, selected: v === (value ?? "") }, text))));
}

async function sourceNames() {
  return Object.keys((await api("/stats")).data.sources);
}

// -- Overview -------------------------------------------------------------------------------

// The throughput charts ask one request per source: they are refreshed every 30 s only,
// so that a console on many sources stays far below the API's rate limit.
const CHARTS_EVERY = 30000;

async function overview(ctx) {
  let recent = {};
  let recentAt = 0;
  async function load() {
    const [health, stats] = await Promise.all([api("/health"), api("/stats")]);
    const names = Object.keys(stats.data.sources);
    if (Date.now() - recentAt > CHARTS_EVERY || names.some((n) => !(n in recent))) {
      const pages = await Promise.all(
        names.map((n) => api(`/etl/runs?source=${encodeURIComponent(n)}&limit=20`)));
      recent = Object.fromEntries(names.map((n, i) => [n, pages[i].data]));
      recentAt = Date.now();
    }
    const cards = names.map((name) =>
      card(name, stats.data.sources[name], health.data.sources[name] ?? {}, recent[name]));
    // /health stays 200 with failing sources (unless told otherwise): the summary does not
    // call the service ok beside them.
    const failingNow = health.data.failing_sources.length;
    const status = health.data.status === "ok" && !failingNow ? "ok" : "degraded";
    show(ctx, h("h1", {}, "Overview"),
      h("p", { class: "summary" }, "Service ", badge(status),
        ` · database ${health.data.checks.database ? "up" : "down"}`,
        ` · ${health.data.running.length} running`,
        ` · ${health.data.failing_sources.length} failing`,
        ` · p99 read latency ${ms(stats.data.api_latency?.p99_ms)}`),
      h("div", { class: "cards" }, cards));
  }
  await load();
  ctx.every(5000, load);
}

const LOADS = new Set(["manual", "schedule", "startup", "stream"]);

function card(name, stat, health, runs) {
  // A stream reports its consumer lag; a change source (pg_cdc) its replication slot.
  const continuous = "lag" in health || "slot" in health;
  const running = health.running_run ?? null;      // a load, a retry or a replay
  // Loads only: a retry or a replay reads a handful of rows.
  const done = runs.filter((r) => r.status === "succeeded" && r.rows_read > 0
    && LOADS.has(r.trigger)).reverse();
  const state = running ? "running" : health.stale ? "stale" : health.status;
  const rows = [
    ["Last success", h("span", { title: time(health.last_success) }, ago(health.last_success))],
    ["Freshness", health.stale ? h("span", { class: "bad" }, "stale")
      : health.last_success ? "fresh"
        : continuous && running ? "streaming"
        : health.status ? h("span", { class: "bad" }, "never loaded") : "no runs yet"],
    ["Rows", num(stat.rows)],
    ["Reject rate", pct(stat.error_rate)],
    "slot" in health ? ["Slot lag", slotLag(health.slot)]
      : continuous ? ["Consumer lag", `${num(health.lag)} messages`]
      : ["Next run", stat.next_run_at ? h("span", { title: time(stat.next_run_at) },
        ago(stat.next_run_at)) : "not scheduled"],
  ];
  const body = h("article", { class: "card", "data-source": name },
    h("header", {}, h("h2", {}, name), h("span", { class: "kind" }, stat.kind), badge(state)),
    h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("div", { class: "chart-box" }, h("span", { class: "muted" }, "rows/s of recent runs"),
      bars(done.map((r) => ({ value: r.rows_read / Math.max(seconds(r), 0.001),
        label: `run ${r.id}: ${num(Math.round(r.rows_read / Math.max(seconds(r), 0.001)))} rows/s`,
      })), { title: `throughput of ${name}` })));
  if (health.degraded) body.append(h("p", { class: "warn" }, "last load was unusual: ",
    JSON.stringify(health.anomaly)));
  if (health.failing && health.error) body.append(h("p", { class: "error" }, health.error));
  const actions = h("p", { class: "actions" },
    link(hashWith("#/runs", { source: name }), "Runs"),
    link(hashWith("#/rejects", { source: name }), "Rejects"),
    link(hashWith("#/data", { source: name }), "Data"));
  if (running) actions.append(link(`#/runs/${running}`, `Run ${running} …`));
  if (!continuous) actions.append(runButton([name], "Run now"));
  body.append(actions);
  return body;
}

function slotLag(slot) {
  if (!slot) return "not read yet";
  const retained = `WAL retained ${bytes(slot.retained_wal_bytes)} of ${bytes(slot.max_retained_wal_bytes)}`;
  return h("span", { class: slot.over_max_retained_wal ? "bad" : "" },
    `${bytes(slot.lag_bytes)} · ${slot.lag_seconds} s · ${retained}`);
}

function runButton(sources, text) {
  return h("button", { type: "button", disabled: !sources.length, onclick: async () => {
    const started = await act(text, "/etl/run", { sources });
    if (!started) return;
    flash(`started ${started.runs.map((r) => `run ${r.run_id} (${r.source})`).join(", ")}`);
    location.hash = started.runs.length === 1 ? `#/runs/${started.runs[0].run_id}` : "#/runs";
  } }, text);
}

// -- Runs -----------------------------------------------------------------------------------

async function runsView(ctx, params) {
  const filter = { source: params.get("source"), status: params.get("status"),
    cursor: params.get("cursor") };
  const go = (change) => { location.hash = hashWith("#/runs", { ...filter, cursor: null, ...change }); };
  const names = await sourceNames();
  const list = h("div");
  show(ctx, h("h1", {}, "Runs"),
    h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
      select("source", filter.source, [["", "all sources"], ...names.map((n) => [n, n])],
        (e) => go({ source: e.target.value })),
      select("status", filter.status, [["", "any status"], ...["running", "succeeded",
        "failed", "interrupted"].map((v) => [v, v])], (e) => go({ status: e.target.value }))),
    list);

  async function load() {
    const [page, health] = await Promise.all([
      api(hashWith("/etl/runs", { limit: 50, ...filter })), api("/health")]);
    const runs = page.data;
    const failing = health.data.failing_sources.filter(
      (n) => !filter.source || n === filter.source);
    put(list,
      h("div", { class: "chart-box wide" },
        h("span", { class: "muted" }, "duration of these runs, oldest left"),
        bars([...runs].reverse().map((r) => ({ value: seconds(r) ?? 0, status: r.status,
          label: `run ${r.id} (${r.source}): ${duration(seconds(r))}, ${r.status}` })),
        { width: 600, height: 60, title: "duration trend", slots: 50 })),
      h("p", { class: "actions" }, runButton(failing,
        `Re-run all failed (${failing.length})`)),
      h("div", { class: "scroll" }, h("table", { class: "runs" },
        h("thead", {}, h("tr", {}, ["Run", "Source", "Trigger", "Status", "Started",
          "Duration", "Read", "Valid", "Rejected", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, runs.map(runRow)))),
      runs.length ? null : h("p", { class: "muted" }, "No runs match."),
      h("p", { class: "pager" },
        filter.cursor ? link(hashWith("#/runs", { ...filter, cursor: null }), "← Newest") : null,
        page.metadata.pagination.has_more ? link(hashWith("#/runs",
          { ...filter, cursor: page.metadata.pagination.next_cursor }), "Older →") : null));
  }
  await load();
  if (!filter.cursor) ctx.every(3000, load);
}

function runRow(r) {
  const row = h("tr", { class: r.status },
    h("td", {}, link(`#/runs/${r.id}`, `#${r.id}`)), h("td", {}, r.source),
    h("td", {}, r.trigger), h("td", {}, badge(r.status),
      r.status === "running" && r.percent != null ? ` ${r.percent} %` : null),
    h("td", { title: time(r.started_at) }, ago(r.started_at)),
    h("td", {}, duration(seconds(r))), h("td", { class: "n" }, num(r.rows_read)),
    h("td", { class: "n" }, num(r.rows_valid)), h("td", { class: "n" }, num(r.rows_rejected)),
    h("td", {}, ["failed", "interrupted"].includes(r.status) ? runButton([r.source], "Re-run")
      : null));
  if (!r.error) return row;
  return [row, h("tr", { class: "error-row" }, h("td", { colspan: 10, class: "error" }, r.error))];
}

// -- Run detail -----------------------------------------------------------------------------

async function runView(ctx, params, id) {
  const top = h("div");
  const logBox = h("pre", { class: "log", "aria-live": "polite" });
  show(ctx, top, h("h2", {}, "Log"),
    h("p", { class: "muted" }, "This replica's log lines of the run, live."), logBox);

  async function load() {
    const run = (await api(`/etl/runs/${id}`)).data;
    put(top, runDetail(run));
    return run.status === "running";
  }
  if (await load()) {
    const poll = async () => {
      if (ctx.alive() && await load()) setTimeout(poll, 1000);
    };
    setTimeout(poll, 1000);
  }
  events(`/etl/runs/${id}/log`, ctx.signal, (data) => {
    const at = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 24;
    logBox.append(logLine(JSON.parse(data)), "\n");
    if (at) logBox.scrollTop = logBox.scrollHeight;
  }).catch((e) => {
    if (ctx.alive() && e.name !== "AbortError") logBox.append(`(log unavailable: ${e.message})`);
  });
}

const QUIET = new Set(["timestamp", "level", "event", "run_id", "source", "request_id",
  "logger", "key_name"]);

function logLine(e) {
  const rest = Object.entries(e).filter(([k]) => !QUIET.has(k))
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
  return h("span", { class: `level-${e.level}` },
    `${(e.timestamp ?? "").slice(11, 23)} ${(e.level ?? "").padEnd(7)} ${e.event} ${rest}`);
}

const PAGED = new Set(["api", "rss"]);
const LINED = new Set(["csv", "jsonl"]);

function runDetail(run) {
  const done = run.status !== "running";
  const s = seconds(run);
  const notes = run.notes ?? {};
  const counters = [
    ["Read", num(run.rows_read)], ["Valid", num(run.rows_valid)],
    ["Rejected", num(run.rows_rejected)], ["Inserted", num(run.rows_inserted)],
    ["Updated", num(run.rows_updated)], ["Unchanged", num(run.rows_unchanged)],
    ["Bytes", `${bytes(run.bytes_read)}${run.bytes_total ? ` of ${bytes(run.bytes_total)}` : ""}`],
    // pages of APIs and feeds, lines of files: a figure a kind cannot have is left out
    ...(PAGED.has(run.kind) ? [["Pages", num(run.pages_read)]] : []),
    ...(LINED.has(run.kind) ? [["Lines", num(run.lines_read)]] : []),
    ["Duration", duration(s)],
    ["Rows/s", s ? num(Math.round(run.rows_read / Math.max(s, 0.001))) : "—"],
    ["Trigger", run.trigger], ["Started", time(run.started_at)],
    ["Finished", time(run.finished_at)], ["Host", `${run.host ?? "?"} pid ${run.pid ?? "?"}`],
  ];
  const percent = run.percent;
  const out = [
    h("h1", {}, `Run #${run.id} `, h("span", { class: "muted" }, run.source), " ",
      badge(run.status)),
    h("div", { class: "progress" },
      h("progress", { max: 100, value: percent ?? undefined, "aria-label": "progress" }),
      h("span", { class: "percent" }, percent == null ? "size unknown" : `${percent} %`)),
    h("dl", { class: "counters" }, counters.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
  ];
  if (run.error) out.push(h("p", { class: "error" }, run.error));
  if (run.anomaly) out.push(h("p", { class: "warn" }, "Unusual load: ", JSON.stringify(run.anomaly)));
  const actions = h("p", { class: "actions" },
    link(hashWith("#/rejects", { source: run.source, run_id: run.id, status: "all" }),
      `Rejects of this run (${num(run.rows_rejected)})`),
    link(hashWith("#/runs", { source: run.source }), `Runs of ${run.source}`));
  if (done && run.status !== "succeeded") actions.append(runButton([run.source], "Re-run"));
  if (done && run.finished_as_of) actions.append(rollbackButton(run));
  out.push(actions);
  for (const w of notes.warnings ?? []) out.push(h("p", { class: "warn" }, w));
  out.push(...outcomes(notes));
  return out;
}

// Roll the source back to its state right after this run: the counts first (a dry run),
// then a confirmation that shows them, then the rollback (an admin key).
function rollbackButton(run) {
  return h("button", { type: "button", class: "danger", onclick: async () => {
    const body = { source: run.source, to_run: run.id };
    const counts = await act("Roll back", "/etl/rollback", { ...body, dry_run: true });
    if (!counts) return;
    const changes = `${num(counts.deleted)} row(s) deleted, ${num(counts.updated)} updated, ` +
      `${num(counts.inserted)} inserted again`;
    if (!confirm(`Roll ${run.source} back to its state right after run #${run.id}?\n\n` +
      `${changes}, in one transaction; the next run reads again what is rolled back.`)) return;
    const done = await act("Roll back", "/etl/rollback", body);
    if (!done) return;
    flash(`rolled back as run ${done.run.id}: ${changes}`);
    location.hash = `#/runs/${done.run.id}`;
  } }, "Roll back to this run…");
}

function outcomes(notes) {
  const out = [];
  const parts = Object.entries(notes.parts ?? {});
  if (parts.length) {
    out.push(h("h2", {}, "Outcome per file, page or feed"), h("div", { class: "scroll" },
      h("table", { class: "parts" },
        h("thead", {}, h("tr", {}, ["Read from", "Batches", "Read", "Valid", "Rejected",
          "Inserted", "Updated"].map((t) => h("th", {}, t)))),
        h("tbody", {}, parts.map(([part, c]) => h("tr", {}, h("td", { class: "part" }, part),
          ["batches", "rows_read", "rows_valid", "rows_rejected", "rows_inserted",
            "rows_updated"].map((k) => h("td", { class: "n" }, num(c[k])))))))));
    if (notes.other_batches) {
      out.push(h("p", { class: "muted" }, `and ${num(notes.other_batches)} batches of more parts`));
    }
  }
  const feeds = Object.entries(notes.feeds ?? {});
  if (feeds.length) {
    out.push(h("h2", {}, "Feeds"), h("div", { class: "scroll" }, h("table", { class: "feeds" },
      h("thead", {}, h("tr", {}, ["Feed", "Outcome", "Entries", "Problem"].map((t) => h("th", {}, t)))),
      h("tbody", {}, feeds.map(([url, f]) => h("tr", {}, h("td", { class: "part" }, url),
        h("td", {}, badge(f.status)), h("td", { class: "n" }, num(f.entries)),
        h("td", {}, f.problem ?? "")))))));
  }
  if (notes.drift?.length) out.push(h("h2", {}, "Schema drift"), json(notes.drift));
  return out;
}

// -- Rejects --------------------------------------------------------------------------------

async function rejectsView(ctx, params) {
  const filter = { source: params.get("source"), run_id: params.get("run_id"),
    status: params.get("status") || "open", cursor: params.get("cursor") };
  const go = (change) => { location.hash = hashWith("#/rejects", { ...filter, cursor: null, ...change }); };
  const names = await sourceNames();
  const page = await api(hashWith("/etl/rejects", { limit: 50, ...filter,
    status: filter.status === "all" ? null : filter.status }));
  const scope = filter.source ? { source: filter.source,
    ...(filter.run_id ? { run_id: Number(filter.run_id) } : {}) } : null;
  const whose = filter.run_id ? `of run ${filter.run_id}` : `of ${filter.source}`;
  const bulk = async (what) => {
    const done = await act(`${what} rejects`, `/etl/rejects/${what}`, scope);
    if (done) { await route(); flash(outcome(what, done)); }
  };
  show(ctx, h("h1", {}, "Rejects"),
    h("form", { class: "filters", onsubmit: (e) => {
      e.preventDefault();
      go({ run_id: new FormData(e.target).get("run_id") });
    } },
    select("source", filter.source, [["", "all sources"], ...names.map((n) => [n, n])],
      (e) => go({ source: e.target.value })),
    h("label", {}, "run", h("input", { name: "run_id", value: filter.run_id ?? "",
      inputmode: "numeric", size: 6 })),
    select("status", filter.status, [["all", "any status"], ["open", "open"],
      ["resolved", "resolved"], ["ignored", "ignored"]], (e) => go({ status: e.target.value }))),
    h("p", { class: "actions" },
      h("button", { type: "button", disabled: !scope, onclick: () => bulk("retry") },
        scope ? `Retry open rejects ${whose}` : "Retry (choose a source)"),
      h("button", { type: "button", disabled: !scope, onclick: () => bulk("ignore") },
        scope ? `Ignore open rejects ${whose}` : "Ignore (choose a source)")),
    h("div", { class: "scroll" }, h("table", { class: "rejects" },
      h("thead", {}, h("tr", {}, ["#", "Run", "Source", "Where", "Rule", "Reason", "Status"]
        .map((t) => h("th", {}, t)))),
      page.data.map(rejectRows))),
    page.data.length ? null : h("p", { class: "muted" }, "No rejects match."),
    h("p", { class: "pager" },
      filter.cursor ? link(hashWith("#/rejects", { ...filter, cursor: null }), "← First") : null,
      page.metadata.pagination.has_more ? link(hashWith("#/rejects",
        { ...filter, cursor: page.metadata.pagination.next_cursor }), "Next →") : null));
}

function outcome(what, done) {
  return what === "retry"
    ? `retry run ${done.id}: ${num(done.rows_valid)} loaded, ${num(done.rows_rejected)} still open`
    : `rejects ignored: ${num(done.ignored)}`;
}

function where(r) {
  const position = Object.entries(r.position ?? {}).map(([k, v]) => `${k} ${v}`).join(", ");
  return `${r.stream.split("/").pop()}${position ? ` · ${position}` : ""}`;
}

// Each reject is a row, and a row below it with its record, opened by a click.
function rejectRows(r) {
  const detail = h("tr", { class: "detail", hidden: true }, h("td", { colspan: 7 },
    h("p", {}, h("strong", {}, "Stream "), r.stream),
    r.field ? h("p", {}, h("strong", {}, "Field "), `${r.field} (from ${r.source_field}): `,
      h("code", {}, JSON.stringify(r.value))) : null,
    h("p", {}, h("strong", {}, "Original record")), json(r.record),
    r.status === "open" ? h("p", { class: "actions" },
      ...["retry", "ignore"].map((what) => h("button", { type: "button", onclick: async () => {
        const done = await act(`${what} reject ${r.id}`, `/etl/rejects/${what}`,
          { source: r.source, ids: [r.id] });
        if (done) { await route(); flash(outcome(what, done)); }
      } }, what === "retry" ? "Retry this record" : "Ignore this record"))) : null));
  const row = h("tr", { class: "reject", tabindex: 0, "data-id": r.id, onclick: () => {
    detail.hidden = !detail.hidden;
  }, onkeydown: (e) => { if (e.key === "Enter") detail.hidden = !detail.hidden; } },
  h("td", {}, r.id), h("td", {}, link(`#/runs/${r.run_id}`, `#${r.run_id}`)),
  h("td", {}, r.source), h("td", { class: "part" }, where(r)),
  h("td", {}, r.rule ? `${r.rule}${r.field ? ` · ${r.field}` : ""}` : "—"),
  h("td", { class: "reason" }, r.reason), h("td", {}, badge(r.status)));
  return h("tbody", {}, row, detail);
}

// -- Data -----------------------------------------------------------------------------------

const DATA_FILTERS = ["source", "kind", "category", "event_from", "event_to", "updated_since"];

async function dataView(ctx, params) {
  const filter = Object.fromEntries(DATA_FILTERS.map((k) => [k, params.get(k)]));
  const cursor = params.get("cursor");
  // The cursors of the pages before this one, in the address itself: Previous works on a
  // page opened from a link, where the browser's history has nothing before it.
  const trail = (params.get("trail") || "").split(",").filter((c, i, all) => c || i < all.length - 1);
  const page = await api(hashWith("/data", { limit: 50, ...filter, cursor }));
  const form = h("form", { class: "filters", onsubmit: (e) => {
    e.preventDefault();
    location.hash = hashWith("#/data", Object.fromEntries(new FormData(e.target)));
  } }, DATA_FILTERS.map((k) => h("label", {}, k.replace("_", " "), h("input", {
    name: k, value: filter[k] ?? "", size: k.includes("_") ? 20 : 12,
    placeholder: k.includes("_") ? "2026-01-31T00:00:00Z" : "" }))),
  h("button", { type: "submit", class: "primary" }, "Filter"));
  const { has_more: more, next_cursor: next } = page.metadata.pagination;
  show(ctx, h("h1", {}, "Data"), form,
    h("div", { class: "scroll" }, h("table", { class: "data" },
      h("thead", {}, h("tr", {}, ["#", "Source", "Source id", "Title", "Category", "Amount",
        "Event time", "Updated"].map((t) => h("th", {}, t)))),
      h("tbody", {}, page.data.map((r) => h("tr", {},
        h("td", {}, link(`#/data/${r.id}`, r.id)), h("td", {}, r.source),
        h("td", { class: "part" }, r.source_id), h("td", { class: "title" }, r.title ?? ""),
        h("td", {}, r.category ?? ""), h("td", { class: "n" }, r.amount ?? ""),
        h("td", { class: "time" }, time(r.event_time)),
        h("td", { class: "time" }, time(r.updated_at))))))),
    page.data.length ? null : h("p", { class: "muted" }, "No records match."),
    h("p", { class: "pager" },
      cursor ? link(hashWith("#/data", { ...filter, cursor: trail.at(-1) || null,
        trail: trail.slice(0, -1).join(",") || null }), "← Previous") : null,
      cursor ? link(hashWith("#/data", filter), "First page") : null,
      more ? link(hashWith("#/data", { ...filter, cursor: next,
        trail: cursor ? [...trail, cursor].slice(-100).join(",") : "," }), "Next →") : null));
}

async function recordView(ctx, params, id) {
  const record = (await api(`/data/${id}`)).data;
  const { lineage, ...fields } = record;
  const raw = lineage.raw;
  const run = lineage.run;
  show(ctx, h("h1", {}, `Record #${record.id} `, h("span", { class: "muted" }, record.source)),
    h("ol", { class: "lineage" },
      h("li", {}, h("strong", {}, "Normalized row"), ` normalized_data #${record.id}`),
      h("li", {}, h("strong", {}, "Raw record"), ` ${lineage.raw_table} #${raw?.id ?? "gone"}`),
      h("li", {}, h("strong", {}, "Run"), " ", run ? link(`#/runs/${run.id}`, `#${run.id}`) : "gone",
        run ? [" ", badge(run.status), ` ${run.trigger}, ${time(run.started_at)}`] : null)),
    h("h2", {}, "Normalized row"),
    h("dl", { class: "fields" }, Object.entries(fields).map(([k, v]) =>
      [h("dt", {}, k), h("dd", {}, v == null ? "—" : typeof v === "object"
        ? JSON.stringify(v) : String(v))])),
    h("h2", {}, `Raw record (${lineage.raw_table})`),
    raw ? json(raw.record) : h("p", { class: "muted" }, "The raw row was purged."),
    raw ? h("dl", { class: "fields" }, Object.entries(raw).filter(([k]) => k !== "record")
      .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v == null ? "—" : String(v))])) : null);
}

// -- Catalog, audit, keys --------------------------------------------------------------------

async function catalogView(ctx) {
  const datasets = (await api("/catalog")).data;
  show(ctx, h("h1", {}, "Catalog"),
    datasets.length ? null : h("p", { class: "muted" }, "No dataset this key may read."),
    datasets.map((d) => h("article", { class: "dataset", "data-dataset": d.name },
      h("h2", {}, d.name, " ", h("span", { class: "muted" }, d.shared
        ? `shared by ${d.owner}` : `owned by ${d.owner}`)),
      d.description ? h("p", {}, d.description) : null,
      d.tags.length ? h("p", { class: "muted" }, d.tags.join(" · ")) : null,
      h("p", { class: "summary" }, `${num(d.rows)} rows · last write ${ago(d.freshness)}`,
        ` · last success ${ago(d.last_success)} · rejects (7 d) ${pct(d.reject_rate_7d)}`,
        ` · ${d.schema_changes.length} schema change(s) · `,
        link(`#/data?source=${encodeURIComponent(d.name)}`, "sample")),
      h("div", { class: "scroll" }, h("table", { class: "fields" },
        h("thead", {}, h("tr", {}, ["Field", "Type", "From", "Rules"].map((t) => h("th", {}, t)))),
        h("tbody", {}, d.fields.map((f) => h("tr", {}, h("td", {}, f.name), h("td", {}, f.type),
          h("td", {}, f.from), h("td", {}, Object.entries(f.rules)
            .map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ") || "—")))))))));
}

async function auditView(ctx, params) {
  const page = await api(hashWith("/admin/audit", { limit: 100, cursor: params.get("cursor") }));
  const { next_cursor: next } = page.metadata.pagination;
  show(ctx, h("h1", {}, "Audit log ", h("span", { class: "muted" }, page.metadata.pagination.tenant)),
    h("div", { class: "scroll" }, h("table", { class: "audit" },
      h("thead", {}, h("tr", {}, ["When", "Who", "Action", "Target", "Outcome", "From", "Request"]
        .map((t) => h("th", {}, t)))),
      h("tbody", {}, page.data.map((e) => h("tr", { class: e.outcome },
        h("td", { class: "time" }, time(e.at)), h("td", {}, e.actor), h("td", {}, e.action),
        h("td", {}, e.target ?? ""), h("td", {}, badge(e.outcome), e.status ? ` ${e.status}` : ""),
        h("td", {}, e.client ?? ""), h("td", { class: "part" }, e.request_id ?? "")))))),
    page.data.length ? null : h("p", { class: "muted" }, "Nothing recorded yet."),
    next ? h("p", { class: "pager" }, link(hashWith("#/audit", { cursor: next }), "Older →")) : null);
}

async function keysView(ctx) {
  const keys = (await api("/admin/keys")).data;
  const secretBox = h("div", { id: "new-secret" });
  const form = h("form", { class: "filters", onsubmit: async (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(e.target));
    const made = await act("Make key", "/admin/keys", {
      name: data.name, scope: data.scope,
      sources: data.sources ? data.sources.split(",").map((x) => x.trim()).filter(Boolean) : [] });
    if (made) shownOnce(secretBox, made);
  } }, h("label", {}, "name", h("input", { name: "name", required: true, size: 16 })),
  select("scope", "read", [["read", "read"], ["run", "run"], ["admin", "admin"]]),
  h("label", {}, "sources", h("input", { name: "sources", size: 16, placeholder: "all (or globs, comma-separated)" })),
  h("button", { type: "submit", class: "primary" }, "Make key"));
  show(ctx, h("h1", {}, "API keys"), form, secretBox,
    h("div", { class: "scroll" }, h("table", { class: "keys" },
      h("thead", {}, h("tr", {}, ["#", "Name", "Scope", "Sources", "Status", "Expires",
        "Last used", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, keys.map((k) => h("tr", { "data-key": k.name },
        h("td", {}, k.id), h("td", {}, k.name), h("td", {}, k.scope),
        h("td", {}, k.sources.join(", ") || "all"), h("td", {}, badge(k.status)),
        h("td", { class: "time" }, time(k.expires_at)), h("td", {}, ago(k.last_used_at)),
        h("td", {}, k.status === "active" ? [
          h("button", { type: "button", onclick: async () => {
            const done = await act("Rotate", `/admin/keys/${k.id}/rotate`, { grace_s: 3600 });
            if (done) shownOnce(secretBox, done);
          } }, "Rotate"), " ",
          h("button", { type: "button", onclick: async () => {
            if (!confirm(`Revoke key ${k.name}? Every replica refuses it within seconds.`)) return;
            if (await act("Revoke", `/admin/keys/${k.id}/revoke`)) route();
          } }, "Revoke")] : null)))))),
    keys.length ? null : h("p", { class: "muted" }, "No key made at run time yet."));
}

// A new secret, shown this once.
function shownOnce(box, key) {
  put(box, h("p", { class: "good" }, `Key ${key.name}: copy its secret now, it is not shown again: `,
    h("code", { class: "secret" }, key.secret)));
}

// -- start ----------------------------------------------------------------------------------

showKey();
window.addEventListener("hashchange", route);
route();
