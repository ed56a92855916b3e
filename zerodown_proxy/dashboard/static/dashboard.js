// zerodown dashboard: polls the admin API (no build step, no library). Read-only until the
// admin token is entered; it is kept in sessionStorage and sent as the admin API's
// Authorization header on the switch/rollback POSTs only. The charts: charts.js.
"use strict";

const POLL_MS = 1000;
const HISTORY_MS = 5000;
const WINDOW_S = 300;
const REFETCH_S = 3; // seconds of samples asked for again (and replaced) on every poll
const TOKEN_KEY = "zerodown.admin-token";

const state = {
  status: null,
  points: {},        // app -> version -> [[t, rps, err, p50, p99], ...]
  lastT: 0,
  history: {},       // app -> {records, generation, fetched}
  proxies: null,     // Consul provider: the registered proxies ({proxies} or {error})
  proxiesAt: 0,
  busy: false,
};

// -- small DOM helpers (text only: nothing from the API is parsed as HTML) -------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "css") Object.assign(el.style, v); // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function pill(kind, text) { return h("span", { class: `pill ${kind}` }, text); }

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 90) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function when(t) {
  const d = new Date(t * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(t)}`;
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false });
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function say(kind, text) {
  const box = document.getElementById("messages");
  box.replaceChildren(h("div", { class: `msg ${kind}`, id: "message", "data-kind": kind }, text));
}

// -- polling ---------------------------------------------------------------------------------

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  const body = await r.json();
  if (!r.ok && r.status !== 503) throw new Error(body.error || `${path}: HTTP ${r.status}`);
  return body;
}

async function pollStatus() {
  const link = document.getElementById("link");
  try {
    const [status, series] = await Promise.all([
      getJSON("/v1/status"),
      // The last seconds again: a supervisor merges workers that tick a few ms apart.
      getJSON(`/v1/dashboard/series?since=${Math.max(0, state.lastT - REFETCH_S)}`),
    ]);
    state.status = status;
    addSeries(series);
    link.className = "link ok";
    link.textContent = `live · ${clock(Date.now() / 1000)}`;
    render();
  } catch (err) {
    link.className = "link bad";
    link.textContent = `admin API unreachable: ${err.message}`;
  }
}

function addSeries(series) {
  const cutoff = Date.now() / 1000 - WINDOW_S;
  for (const [app, versions] of Object.entries(series.apps || {})) {
    const byVersion = (state.points[app] ||= {});
    for (const [version, pts] of Object.entries(versions)) {
      const from = pts.length ? pts[0][0] : Infinity;
      // Points of seconds asked for again are replaced by their newer (complete) values.
      byVersion[version] = (byVersion[version] || []).filter((p) => p[0] < from).concat(pts);
    }
  }
  for (const versions of Object.values(series.apps || {})) {
    for (const pts of Object.values(versions)) {
      for (const p of pts) state.lastT = Math.max(state.lastT, p[0]);
    }
  }
  for (const byVersion of Object.values(state.points)) {
    for (const [v, list] of Object.entries(byVersion)) {
      byVersion[v] = list.filter((p) => p[0] >= cutoff);
    }
  }
}

async function pollHistory(force) {
  const st = state.status;
  if (!st) return;
  if (force || Date.now() - state.proxiesAt >= HISTORY_MS / 2) {
    state.proxiesAt = Date.now();
    try {
      state.proxies = await getJSON("/v1/dashboard/proxies");
    } catch (err) {
      state.proxies = { error: err.message };
    }
  }
  for (const app of Object.keys(st.apps || {})) {
    const have = state.history[app];
    const fresh = have && have.generation === st.generation && Date.now() - have.fetched < HISTORY_MS;
    if (fresh && !force) continue;
    try {
      const body = await getJSON(`/v1/dashboard/history?app=${encodeURIComponent(app)}&generation=${st.generation}`);
      state.history[app] = { records: body.records || [], error: body.error, generation: st.generation, fetched: Date.now() };
    } catch (err) {
      state.history[app] = { records: [], error: err.message, generation: st.generation, fetched: Date.now() };
    }
  }
  render();
}

// -- actions ---------------------------------------------------------------------------------

async function act(action, app, question) {
  if (state.busy) return;
  if (!window.confirm(question)) return;
  state.busy = true;
  say("ok", `${action} ${app}: running…`);
  render();
  try {
    const r = await fetch(`/v1/dashboard/${action}`, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
      body: JSON.stringify({ app }),
    });
    const body = await r.json();
    if (r.ok && body.ok) say("ok", body.message);
    else say("bad", `${action} refused: ${body.error || `HTTP ${r.status}`}`);
  } catch (err) {
    say("bad", `${action} failed: ${err.message}`);
  } finally {
    state.busy = false;
    await pollStatus();
    await pollHistory(true);
  }
}

function lastSwitch(app) {
  const recs = (state.history[app] || {}).records || [];
  for (let i = recs.length - 1; i >= 0; i--) {
    const r = recs[i];
    if ((r.action === "switch" || r.action === "rollback") && r.result === "ok") return r;
  }
  return null;
}

// -- rendering -------------------------------------------------------------------------------

function groupHealth(g) {
  const n = g.instances.length;
  const up = g.instances.filter(instanceUp).length;
  return { n, up };
}

function instanceUp(i) {
  return i.healthy && !i.ejected && (!i.check || i.check.status !== "down");
}

function checkPill(i) {
  if (!i.check) return pill("off", "not checked");
  const st = i.check.status;
  const kind = st === "up" ? "ok" : st === "down" ? "bad" : "warn";
  return pill(kind, st);
}

function renderGroup(app, role, g, provider) {
  const { n, up } = groupHealth(g);
  const countKind = n === 0 ? "bad" : up === n ? "ok" : up === 0 ? "bad" : "warn";
  const cls = role === "active" ? `group active${up === 0 ? " down" : up < n ? " degraded" : ""}` : "group standby";
  const rows = g.instances.map((i) =>
    h("tr", {},
      h("td", {}, i.id),
      h("td", {}, `${i.address}:${i.http_port}`),
      h("td", {}, i.version),
      h("td", {}, pill(i.healthy ? "ok" : "bad", i.healthy ? "passing" : "critical")),
      h("td", {}, checkPill(i), i.check && i.check.last ? h("span", { class: "muted" }, ` ${i.check.last}`) : null),
      h("td", {}, i.ejected ? pill("bad", `ejected ${i.ejection ? i.ejection.reason || "" : ""}`) : pill("ok", "in")),
    ));
  return h("div", { class: cls, "data-role": role },
    h("div", { class: "role" }, role === "active" ? "Active" : "Standby"),
    h("div", {},
      h("span", { class: "version", id: `${role}-version-${app}` }, g.version || "-"),
      h("span", { class: "gname", id: `${role}-group-${app}` }, g.group ? `${g.group} group` : "no group")),
    h("div", { class: `count ${countKind}` }, `${up}/${n} instances healthy`),
    h("table", {},
      h("thead", {}, h("tr", {}, ["instance", "address", "version", provider === "consul" ? "Consul" : "registry", "proxy check", "outlier"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 6, class: "empty" }, "no instances")))));
}

function renderActions(app, a) {
  if (!token()) return null;
  const buttons = [];
  const active = a.active, standby = a.standby;
  if (standby.group) {
    const q = `switch ${app} from ${active.version} (${active.group}) to ${standby.version} (${standby.group})?`;
    buttons.push(h("button", { class: "act switch", id: `switch-${app}`, type: "button", disabled: state.busy,
      onclick: () => act("switch", app, q) }, `Switch to ${standby.version} (${standby.group})`));
  }
  const last = lastSwitch(app);
  const back = last ? last.from : standby.group;
  const backVersion = back === standby.group ? standby.version : last && last.from_version;
  const q = `roll back ${app} from ${active.version} (${active.group}) to ${backVersion || "?"} (${back || "?"})?`;
  buttons.push(h("button", { class: "act rollback", id: `rollback-${app}`, type: "button", disabled: state.busy,
    onclick: () => act("rollback", app, q) }, "Roll back"));
  return h("div", { class: "actions" }, buttons);
}

function renderHistory(app) {
  const hist = state.history[app];
  if (!hist) return h("div", { class: "empty" }, "loading history…");
  if (hist.error) return h("div", { class: "res-bad" }, hist.error);
  const recs = hist.records.slice(-8).reverse();
  if (!recs.length) return h("div", { class: "empty" }, "no release action recorded yet");
  const res = (r) => h("span", { class: r === "ok" ? "res-ok" : r === "refused" ? "res-warn" : "res-bad" }, r);
  const what = (r) => {
    if (r.action === "deploy") return `deploy ${r.version || "?"}${r.group ? ` to ${r.group}` : ""}`;
    const versions = r.from_version || r.to_version ? ` (${r.from_version || "?"} → ${r.to_version || "?"})` : "";
    return `${r.action} ${r.from || "?"} → ${r.to || "?"}${versions}`;
  };
  return h("table", { class: "history" },
    h("thead", {}, h("tr", {}, ["time", "who", "action", "result", "reason"].map((t) => h("th", {}, t)))),
    h("tbody", {}, recs.map((r) => h("tr", {},
      h("td", {}, when((r.time_ns || 0) / 1e9)),
      h("td", {}, `${r.user || "?"}@${r.host || "?"}`, r.via ? h("div", { class: "muted" }, r.via) : null),
      h("td", {}, what(r)),
      h("td", {}, res(r.result)),
      h("td", {}, r.reason || "")))));
}

function renderApp(name, a, provider) {
  const marks = ((state.history[name] || {}).records || [])
    .filter((r) => (r.action === "switch" || r.action === "rollback") && r.result === "ok")
    .map((r) => ({ t: (r.time_ns || 0) / 1e9, label: `${r.action} ${r.from} → ${r.to} at ${clock((r.time_ns || 0) / 1e9)}` }));
  const byVersion = state.points[name] || {};
  const versions = Object.keys(byVersion).filter((v) => byVersion[v].length);
  return h("section", { class: "panel app", "data-app": name },
    h("div", { class: "app-head" },
      h("span", { class: "app-name" }, name),
      h("span", { class: "muted" }, [a.hosts.length ? `hosts ${a.hosts.join(", ")}` : "", a.path_prefix ? ` path ${a.path_prefix}` : ""].join("")),
      renderActions(name, a)),
    h("div", { class: "groups" }, renderGroup(name, "active", a.active, provider), renderGroup(name, "standby", a.standby, provider)),
    h("h3", {}, "Traffic by version (last 5 min; dashed: switches)"),
    h("div", { class: "charts" }, CHARTS.map((c) => renderChart(name, c, byVersion, marks))),
    h("div", { class: "legend" }, versions.length
      ? versions.map((v) => h("span", {}, h("span", { class: "swatch", css: { background: colorOf(v) } }), v === a.active.version ? `${v} (Active)` : v))
      : h("span", { class: "empty" }, "no requests yet")),
    h("h3", {}, "Release history"),
    renderHistory(name));
}

function renderProxies(st) {
  const rows = [];
  const registered = state.proxies && (state.proxies.proxies || state.proxies.error) ? state.proxies : null;
  if (registered && registered.error) {
    rows.push([registered.error, "-", "?", false]);
  } else if (registered) {
    // Consul: every proxy registered as a service; applied = it has the newest generation.
    const top = Math.max(st.generation, ...registered.proxies.map((p) => p.generation ?? 0));
    for (const p of registered.proxies) {
      const notes = [p.check !== "passing" ? `Consul check ${p.check}` : "", p.error || ""].filter(Boolean);
      rows.push([notes.length ? `${p.name} (${notes.join("; ")})` : p.name, p.admin || "-", p.generation, p.generation === top]);
    }
  } else if (st.workers) {
    const gens = st.workers.map((w) => w.generation).filter((g) => g !== null);
    const top = Math.max(0, ...gens);
    rows.push([st.name, "supervisor", st.generation, st.generation === top && gens.length === st.workers.length]);
    for (const w of st.workers) rows.push([`worker ${w.index} (pid ${w.pid ?? "-"})`, w.admin || "-", w.generation, w.generation === top]);
  } else {
    rows.push([st.name, location.host, st.generation, !st.switch_pending]);
  }
  const tbody = document.querySelector("#proxies tbody");
  tbody.replaceChildren(...rows.map(([name, admin, gen, ok]) => h("tr", {},
    h("td", {}, name), h("td", {}, admin), h("td", {}, gen ?? "?"),
    h("td", {}, pill(ok ? "ok" : "bad", ok ? "applied" : "behind")))));
}

function renderHsms(st) {
  const hs = st.hsms;
  const tbody = document.querySelector("#hsms tbody");
  document.getElementById("hsms-count").textContent = hs ? `(${hs.tool_sessions})` : "(HSMS off)";
  const sessions = (hs && hs.sessions) || [];
  if (!sessions.length) {
    tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, hs ? "no tool connected" : "HSMS is not enabled on this proxy")));
    return;
  }
  const now = Date.now() / 1000;
  tbody.replaceChildren(...sessions.map((t) => {
    const b = t.backend || {};
    const st = String(t.state).toLowerCase();
    const kind = st === "selected" ? "ok" : st.startsWith("not") ? "bad" : "warn";
    return h("tr", {},
      h("td", {}, t.tool), h("td", {}, t.device_id ?? "-"), h("td", {}, pill(kind, t.state)),
      h("td", {}, b.instance || "-", b.state ? h("span", { class: "muted" }, ` ${b.state}`) : null),
      h("td", {}, b.version || "-"),
      h("td", {}, String(t.in_flight ?? 0), (t.draining || []).length ? h("span", { class: "muted" }, ` (+${t.draining.length} draining)`) : null),
      h("td", {}, `${clock(t.connected_at)} (${ago(now - t.connected_at)})`));
  }));
}

function render() {
  const st = state.status;
  if (!st) return;
  document.getElementById("proxy-name").textContent = st.name || "";
  const routing = document.getElementById("routing");
  routing.replaceChildren(
    "generation ", h("b", { id: "generation" }, st.generation),
    " · snapshot age ", h("b", {}, ago(st.snapshot_age_s)),
    st.last_error ? h("span", { class: "res-bad" }, ` · ${st.last_error}`) : "");
  const apps = document.getElementById("apps");
  apps.replaceChildren(...Object.entries(st.apps || {}).map(([n, a]) => renderApp(n, a, (st.discovery || {}).provider)));
  renderProxies(st);
  renderHsms(st);
  const unlocked = Boolean(token());
  document.getElementById("mode").textContent = unlocked ? "actions unlocked" : "read-only";
  document.getElementById("mode").className = unlocked ? "mode on" : "mode";
  document.getElementById("token").hidden = unlocked;
  document.getElementById("unlock").hidden = unlocked;
  document.getElementById("lock").hidden = !unlocked;
}

function init() {
  document.getElementById("auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    render();
  });
  document.getElementById("lock").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    render();
  });
  // Two independent loops: the history (a CLI run on the proxy, up to a second on a busy
  // host) must never delay the status that shows a switch.
  const statusLoop = async () => {
    await pollStatus();
    setTimeout(statusLoop, POLL_MS);
  };
  const historyLoop = async () => {
    await pollHistory(false);
    setTimeout(historyLoop, POLL_MS);
  };
  statusLoop().then(historyLoop);
}

document.addEventListener("DOMContentLoaded", init);
