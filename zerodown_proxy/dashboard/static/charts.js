// zerodown dashboard: the small time-series charts (plain SVG), one line per version, the
// switches as dashed vertical lines. Loaded before dashboard.js, which calls renderChart.
"use strict";

const PALETTE = ["#4ea1ff", "#f5a623", "#c77dff", "#2ec4b6", "#ff6b9a", "#b5e48c"];
const COLORS = {}; // version -> colour, in the order versions are first seen

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function colorOf(version) {
  if (!(version in COLORS)) {
    COLORS[version] = PALETTE[Object.keys(COLORS).length % PALETTE.length];
  }
  return COLORS[version];
}

const CHARTS = [
  { title: "requests/s", field: 1, fmt: (v) => v.toFixed(v < 10 ? 1 : 0) },
  { title: "errors (5xx)", field: 2, fmt: (v) => `${(v * 100).toFixed(v < 0.1 ? 1 : 0)} %` },
  { title: "latency p50", field: 3, fmt: ms },
  { title: "latency p99", field: 4, fmt: ms },
];

function ms(v) { return v === null ? "-" : `${(v * 1000).toFixed(v < 0.01 ? 2 : 1)} ms`; }

function renderChart(app, spec, byVersion, marks) {
  const W = 300, H = 110, pad = 4;
  const now = Math.floor(Date.now() / 1000);
  // The last WINDOW_S seconds; while the proxy has less than that, the span it has (>= 60 s).
  let first = now;
  for (const pts of Object.values(byVersion)) if (pts.length) first = Math.min(first, pts[0][0]);
  const t0 = Math.max(now - WINDOW_S, Math.min(first - 1, now - 60));
  const span = now - t0;
  const x = (t) => pad + ((t - t0) / span) * (W - 2 * pad);
  let max = 0;
  for (const pts of Object.values(byVersion)) for (const p of pts) if (p[spec.field] !== null) max = Math.max(max, p[spec.field]);
  if (spec.field === 2) max = Math.max(max, 0.05);
  max = max > 0 ? max * 1.15 : 1;
  const y = (v) => H - pad - (v / max) * (H - 2 * pad);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": `${spec.title} for ${app}` });
  svg.append(s("line", { x1: 0, y1: H - pad, x2: W, y2: H - pad, stroke: "#2c333d" }));
  for (const m of marks) {
    if (m.t < t0) continue;
    const mark = s("line", { x1: x(m.t), y1: 0, x2: x(m.t), y2: H, stroke: "#f5a623", "stroke-dasharray": "4 3", "stroke-width": 1.5, "vector-effect": "non-scaling-stroke", class: "switch-mark" });
    const tip = s("title", {});
    tip.textContent = m.label;
    mark.append(tip);
    svg.append(mark);
  }
  const latest = [];
  let drawn = false;
  for (const [version, pts] of Object.entries(byVersion)) {
    const seen = pts.filter((p) => p[0] >= t0 && p[spec.field] !== null);
    if (!seen.length) continue;
    // A second without responses is 0 requests/s and 0 errors; latency has no point then.
    const path = [];
    let prev = null;
    for (const p of seen) {
      const gap = prev !== null && p[0] - prev > 1;
      if (gap && spec.field <= 2) path.push(`L${x(prev + 1)},${y(0)}`, `L${x(p[0] - 1)},${y(0)}`);
      path.push(`${path.length && !(gap && spec.field > 2) ? "L" : "M"}${x(p[0])},${y(p[spec.field])}`);
      prev = p[0];
    }
    if (spec.field <= 2 && now - prev > 2) path.push(`L${x(prev + 1)},${y(0)}`, `L${x(now)},${y(0)}`);
    drawn = true;
    svg.append(s("path", { d: path.join(" "), fill: "none", stroke: colorOf(version), "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
    const last = seen[seen.length - 1];
    if (now - last[0] <= 3) latest.push(h("span", { css: { color: colorOf(version) } }, spec.fmt(last[spec.field]), " "));
  }
  const top = max / 1.15;
  return h("div", { class: "chart", "data-chart": spec.title },
    h("div", { class: "title" }, h("span", {}, spec.title), h("span", { class: "now" }, latest.length ? latest : "-")),
    svg,
    h("div", { class: "axis" }, h("span", {}, `${Math.round(span / 60) || 1} min`), h("span", {}, drawn ? `max ${spec.fmt(top)}` : "")));
}

