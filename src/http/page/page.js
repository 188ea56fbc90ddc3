// The lease page. Plain JavaScript, no build step, no third-party code.
//
// It reads /api/session (may I read? may I revoke?), then /api/feed, a
// server-sent event stream read with fetch() so the admin token can travel
// in an Authorization header (EventSource cannot send one). The feed sends
// a snapshot of the leases, then batches of changes and the figures every
// second; the page never reloads. Time-left bars run down on the browser's
// clock from the server's "expires in" and the server time of each event,
// so the two clocks need not agree. Every value from the server is put in
// the page with textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "leasehold-admin-token";
const MAX_EVENTS = 100;
const SPARK_POINTS = 120;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  canRevoke: false,
  leases: new Map(), // resource -> lease, with `deadline` in local ms
  rows: new Map(), // resource -> <tr>
  prefix: "",
  feed: null, // AbortController of the running feed
  lastStats: null, // {grants, at}
  rates: [],
  retry: 0,
};

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

function setConn(s, text) {
  const c = $("#conn");
  c.dataset.state = s;
  c.textContent = text;
}

// "1m30s", "4.2s", "850ms", like the CLI.
function human(ms) {
  if (ms < 1000) return Math.max(0, Math.round(ms)) + "ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + "s";
  const s = Math.floor(ms / 1000);
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function time(unixMs) {
  return unixMs ? new Date(unixMs).toISOString().replace("T", " ").replace("Z", "") : "–";
}

// Tokens arrive as decimal strings (u64); compare them without Number.
function tokenCmp(a, b) {
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

// ---- session and token --------------------------------------------------

async function start() {
  stopFeed();
  let s;
  try {
    const r = await fetch("api/session", { headers: headers(), cache: "no-store" });
    s = await r.json();
  } catch (e) {
    setConn("error", "server unreachable");
    return retryLater();
  }
  $("#version").textContent = "v" + s.version;
  state.canRevoke = s.can_revoke;
  document.body.classList.toggle("can-revoke", s.can_revoke);
  const auth = $("#auth");
  if (!s.can_read) {
    auth.hidden = false;
    $("#auth-message").textContent = s.message || "This server needs its admin token.";
    setConn("error", "not signed in");
    return;
  }
  if (s.auth === "token" && !state.token) auth.hidden = false;
  else if (state.token && s.can_revoke) auth.hidden = true;
  if (s.auth === "open") {
    $("#auth-message").textContent =
      "This server has no admin token: the page is read-only. Start it with --admin-token-file to revoke from here.";
  } else {
    $("#auth-message").textContent = s.can_revoke ? "Signed in: Revoke is available." : "Enter the admin token to see leases and revoke.";
  }
  openFeed();
}

function retryLater() {
  const wait = Math.min(5000, 500 * 2 ** state.retry++);
  setTimeout(start, wait);
}

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("#token").value.trim();
  $("#token").value = "";
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  start();
});
$("#token-forget").addEventListener("click", () => {
  state.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  start();
});
$("#token-show").addEventListener("click", () => {
  const a = $("#auth");
  a.hidden = !a.hidden;
  if (!a.hidden) $("#token").focus();
});

let prefixTimer = null;
$("#prefix").addEventListener("input", () => {
  clearTimeout(prefixTimer);
  prefixTimer = setTimeout(() => {
    state.prefix = $("#prefix").value;
    openFeed();
  }, 300);
});

// ---- the feed -------------------------------------------------------------

function stopFeed() {
  if (state.feed) state.feed.abort();
  state.feed = null;
}

async function openFeed() {
  stopFeed();
  const ctl = new AbortController();
  state.feed = ctl;
  setConn("connecting", "connecting…");
  const url = "api/feed?prefix=" + encodeURIComponent(state.prefix);
  try {
    const r = await fetch(url, { headers: headers(), signal: ctl.signal, cache: "no-store" });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      setConn("error", "refused (" + r.status + ")");
      toast(body.error || "the server refused the feed");
      if (r.status === 401) { $("#auth").hidden = false; return; }
      return retryLater();
    }
    setConn("live", "live");
    state.retry = 0;
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        dispatch(block);
      }
    }
  } catch (e) {
    if (ctl.signal.aborted) return;
  }
  if (state.feed === ctl) {
    setConn("error", "reconnecting…");
    retryLater();
  }
}

function dispatch(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return; // keep-alive comments
  const msg = JSON.parse(data.join("\n"));
  if (name === "snapshot") onSnapshot(msg);
  else if (name === "events") onEvents(msg);
  else if (name === "stats") onStats(msg);
  else if (name === "skipped") addEventLine({ kind: "skipped", text: msg.events + " events too fast to list (the table was refreshed instead)" });
}

function onSnapshot(msg) {
  const now = performance.now();
  const seen = new Set();
  for (const l of msg.leases) {
    l.deadline = now + l.expires_in_ms;
    state.leases.set(l.resource, l);
    seen.add(l.resource);
  }
  for (const r of [...state.leases.keys()]) if (!seen.has(r)) state.leases.delete(r);
  $("#truncated").hidden = !msg.truncated;
  onStats(msg);
  renderTable();
}

function onEvents(msg) {
  const now = performance.now();
  for (const ev of msg.events) {
    // How long ago, on the server's clock, this happened.
    const age = Math.max(0, msg.server_unix_ms - ev.at_unix_ms);
    const cur = state.leases.get(ev.resource);
    if (ev.kind === "acquired" || ev.kind === "renewed") {
      if (!cur || tokenCmp(ev.token, cur.token) >= 0) {
        const handoff = cur && ev.kind === "acquired" && cur.token !== ev.token;
        state.leases.set(ev.resource, {
          resource: ev.resource, holder: ev.holder, token: ev.token, ttl_ms: ev.ttl_ms,
          deadline: now - age + ev.expires_in_ms,
          waiters: cur ? (handoff ? Math.max(0, cur.waiters - 1) : cur.waiters) : 0,
          fresh: ev.kind === "acquired",
        });
      }
    } else if (cur && cur.token === ev.token) {
      state.leases.delete(ev.resource);
    }
    if (ev.kind !== "renewed") addEventLine(ev);
  }
  renderTable();
}

function onStats(msg) {
  const s = msg.stats;
  $("#t-live").textContent = s.live_leases.toLocaleString();
  $("#t-waiters").textContent = s.waiters.toLocaleString();
  $("#t-token").textContent = s.token_high_water;
  const at = performance.now();
  if (state.lastStats && at > state.lastStats.at + 200) {
    const rate = Math.max(0, (s.grants - state.lastStats.grants) / ((at - state.lastStats.at) / 1000));
    state.rates.push(rate);
    if (state.rates.length > SPARK_POINTS) state.rates.shift();
    $("#t-rate").textContent = rate >= 100 ? Math.round(rate).toLocaleString() : rate.toFixed(1);
    drawSpark();
  }
  if (!state.lastStats || at > state.lastStats.at + 200) state.lastStats = { grants: s.grants, at };
  renderCluster(msg.cluster);
}

function drawSpark() {
  const max = Math.max(1, ...state.rates);
  const n = state.rates.length;
  // The newest point at the right edge; at least 30 s across, so a young
  // page's few points make a line, not a sliver.
  const span = Math.max(30, n) - 1;
  const pts = state.rates.map((r, i) => {
    const x = 120 - ((n - 1 - i) * 120) / span;
    return x.toFixed(2) + "," + (29 - (r / max) * 27).toFixed(2);
  });
  $("#spark-line").setAttribute("points", pts.join(" "));
  $("#spark").setAttribute("aria-label", "grants per second; latest " + Math.round(state.rates[n - 1]) + ", peak " + Math.round(max));
  $("#spark-peak").textContent = "(peak " + Math.round(max).toLocaleString() + ")";
}

function renderCluster(c) {
  const box = $("#cluster");
  if (!c) { box.hidden = true; return; }
  box.hidden = false;
  $("#cluster-summary").textContent =
    "this node " + c.node_id + " is " + c.role + " in term " + c.term + "; leader: " + (c.leader || "none") +
    "; committed " + c.commit_index + ", applied " + c.applied_index;
  const ul = $("#members");
  ul.replaceChildren(...c.members.map((m) => {
    const li = document.createElement("li");
    li.textContent = m.id + " (" + m.addr + ") " + (m.role || "?") +
      (m.id === c.leader ? " — leader" : "") + (m.replication_lag != null ? ", " + m.replication_lag + " behind" : "");
    return li;
  }));
}

// ---- the table ------------------------------------------------------------

function renderTable() {
  const tbody = $("#leases tbody");
  const sorted = [...state.leases.values()].sort((a, b) => (a.resource < b.resource ? -1 : 1));
  for (const [r, tr] of state.rows) {
    if (!state.leases.has(r)) { tr.remove(); state.rows.delete(r); }
  }
  let prev = null;
  for (const l of sorted) {
    let tr = state.rows.get(l.resource);
    if (!tr) {
      tr = makeRow(l.resource);
      state.rows.set(l.resource, tr);
    }
    fillRow(tr, l);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
  }
  $("#empty").hidden = state.leases.size > 0;
  $("#lease-count").textContent = state.leases.size ? "(" + state.leases.size.toLocaleString() + ")" : "";
  tick();
}

function cell(cls) {
  const td = document.createElement("td");
  td.className = cls;
  return td;
}

function makeRow(resource) {
  const tr = document.createElement("tr");
  tr.dataset.resource = resource;
  const res = cell("resource");
  const a = document.createElement("a");
  a.textContent = resource;
  a.title = "grant history";
  a.addEventListener("click", () => showHistory(resource));
  res.append(a);
  const left = cell("left");
  left.innerHTML = '<div class="left-bar"><div class="left-fill"></div></div><div class="left-text"></div>';
  const rev = cell("revoke-cell");
  const b = document.createElement("button");
  b.className = "revoke";
  b.type = "button";
  b.textContent = "Revoke";
  b.addEventListener("click", () => confirmRevoke(resource));
  rev.append(b);
  tr.append(res, cell("holder"), cell("token"), left, cell("waiters"), rev);
  return tr;
}

function fillRow(tr, l) {
  tr.querySelector(".holder").textContent = l.holder;
  tr.querySelector(".token").textContent = l.token;
  tr.querySelector(".waiters").textContent = l.waiters;
  tr.dataset.token = l.token;
  if (l.fresh) {
    l.fresh = false;
    tr.classList.remove("fresh");
    void tr.offsetWidth; // restart the highlight
    tr.classList.add("fresh");
  }
}

// Runs the bars down, ten times a second.
function tick() {
  const now = performance.now();
  for (const [r, tr] of state.rows) {
    const l = state.leases.get(r);
    if (!l) continue;
    const left = Math.max(0, l.deadline - now);
    const frac = l.ttl_ms ? Math.min(1, left / l.ttl_ms) : 0;
    const fill = tr.querySelector(".left-fill");
    fill.style.width = (frac * 100).toFixed(1) + "%";
    fill.classList.toggle("low", frac < 0.34 && left > 0);
    fill.classList.toggle("out", left === 0);
    tr.querySelector(".left-text").textContent = left > 0 ? human(left) + " of " + human(l.ttl_ms) : "expiring…";
  }
}
setInterval(tick, 100);

// ---- events, history, revoke -------------------------------------------------

function addEventLine(ev) {
  const ol = $("#events");
  const li = document.createElement("li");
  const k = document.createElement("span");
  k.className = "kind " + ev.kind;
  k.textContent = ev.kind;
  li.append(k);
  const at = ev.at_unix_ms ? time(ev.at_unix_ms).slice(11) + "  " : "";
  li.append(document.createTextNode(ev.text || at + ev.resource + "  holder=" + ev.holder + " token=" + ev.token));
  ol.prepend(li);
  while (ol.children.length > MAX_EVENTS) ol.lastChild.remove();
}

async function showHistory(resource) {
  const box = $("#history");
  $("#history-resource").textContent = resource;
  const tbody = $("#history-table tbody");
  tbody.replaceChildren();
  box.hidden = false;
  const r = await fetch("api/history?limit=50&resource=" + encodeURIComponent(resource), { headers: headers() });
  const body = await r.json();
  if (!r.ok) { toast(body.error); return; }
  for (const g of body.grants) {
    const tr = document.createElement("tr");
    const end = g.ended_at_unix_ms;
    const held = (end || Date.now()) - g.acquired_at_unix_ms;
    for (const text of [g.token, g.holder, time(g.acquired_at_unix_ms), end ? time(end) : "–", g.ended, human(held) + (end ? "" : " so far")]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    tbody.append(tr);
  }
  box.scrollIntoView({ behavior: "smooth", block: "nearest" });
}
$("#history-close").addEventListener("click", () => { $("#history").hidden = true; });

let pending = null;
function confirmRevoke(resource) {
  const l = state.leases.get(resource);
  if (!l) return;
  pending = { resource, token: l.token };
  $("#confirm-text").textContent =
    "Revoke the lease on " + resource + " held by " + l.holder + " (token " + l.token + ")? " +
    "Its holder's next renewal fails; writes it fences with this token are refused once a newer holder has written.";
  $("#confirm").showModal();
}

$("#confirm").addEventListener("close", async () => {
  const p = pending;
  pending = null;
  if ($("#confirm").returnValue !== "yes" || !p) return;
  const r = await fetch("api/revoke", {
    method: "POST",
    headers: Object.assign({ "Content-Type": "application/json" }, headers()),
    body: JSON.stringify(p),
  });
  const body = await r.json().catch(() => ({}));
  toast(r.ok ? "revoked " + p.resource + " (token " + p.token + ")" : body.error || "revoke failed");
});

start();
