"use strict";
const $ = (id) => document.getElementById(id);
const opts = () => ({stratum: $("stratum").value, site: $("site").value, metric: $("metric").value, by: $("by").value});

async function api(path, params = {}) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined));
  const r = await fetch(path + (q.toString() ? "?" + q : ""));
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Math.abs(v) >= 1e4 || (v && Math.abs(v) < 1e-3) ? v.toExponential(3) : (+v.toFixed(4)).toString();
  return String(v);
}

// Every stored string (labels, notes, errors) enters the page as text, never as markup.
function node(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function table(el, rows, cols, onclick) {
  if (!rows.length) { el.replaceChildren(node("span", "no rows", "note")); return; }
  cols = cols || Object.keys(rows[0]);
  const t = node("table"), head = node("tr");
  cols.forEach((c) => head.appendChild(node("th", c)));
  t.appendChild(head);
  rows.forEach((r) => {
    const tr = node("tr");
    cols.forEach((c, j) => {
      const td = node("td", fmt(r[c]), onclick && j === 0 ? "link" : undefined);
      if (onclick && j === 0) td.addEventListener("click", () => onclick(r));
      tr.appendChild(td);
    });
    t.appendChild(tr);
  });
  el.replaceChildren(t);
}

function notes(el, list) { el.appendChild(node("div", list.join(" · "), "note")); }

function fail(el, e) { el.replaceChildren(node("span", e.message, "err")); }

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    const counts = Object.entries(s.runs).map(([k, v]) => `${v} ${k}`).join(", ") || "no runs yet";
    const parts = [node("div", counts)];
    s.in_flight.forEach((r) => {
      const line = node("div", `${r.label} `), bar = node("progress");
      line.appendChild(node("code", r.run_id.slice(0, 8)));
      bar.max = r.steps; bar.value = r.step;
      line.append(" ", bar, ` step ${r.step}/${r.steps}`);
      parts.push(line);
    });
    if (!s.in_flight.length) parts.push(node("div", "no runs in flight", "note"));
    (s.notes || []).forEach((n) => parts.push(node("div", n, "note")));
    $("status").replaceChildren(...parts);
  } catch (e) { fail($("status"), e); }
}

async function drawScaling() {
  const o = opts();
  try {
    const data = await api("/api/scaling", {stratum: o.stratum, site: o.site, by: o.by});
    const traces = [];
    data.series[o.metric].forEach((s, i) => {
      const label = s.beta === null ? `${s.name}: no fit` : `${s.name}: β=${s.beta.toFixed(2)} [${fmt(s.beta_low)}, ${fmt(s.beta_high)}]`;
      traces.push({x: s.widths, y: s.values, mode: "markers", name: label, legendgroup: s.name, meta: "points",
                   marker: {size: 8, color: `hsl(${(i * 67) % 360},60%,45%)`}});
      if (s.line) {
        const c = `hsl(${(i * 67) % 360},60%,45%)`;
        traces.push({x: s.line.x, y: s.line.hi, mode: "lines", line: {width: 0}, showlegend: false, legendgroup: s.name, hoverinfo: "skip", meta: "band"});
        traces.push({x: s.line.x, y: s.line.lo, mode: "lines", line: {width: 0}, fill: "tonexty", fillcolor: `hsla(${(i * 67) % 360},60%,45%,0.15)`,
                     showlegend: false, legendgroup: s.name, hoverinfo: "skip", meta: "band"});
        traces.push({x: s.line.x, y: s.line.y, mode: "lines", line: {color: c}, showlegend: false, legendgroup: s.name, meta: "fit"});
      }
    });
    await Plotly.react("scaling", traces, {
      margin: {t: 30}, title: {text: `${o.metric} rank vs width — ${o.stratum} tokens, ${o.site}`, font: {size: 13}},
      xaxis: {type: "log", title: "FFN width D"}, yaxis: {type: "log", title: `${o.metric} rank`}, legend: {font: {size: 11}}});
    $("scaling-notes").textContent = data.notes.join(" · ");
  } catch (e) { fail($("scaling-notes"), e); }
}

async function drawTables() {
  const o = opts();
  try {
    const b = await api("/api/beta", {stratum: o.stratum, site: o.site, by: o.by});
    table($("betas"), b.rows);
  } catch (e) { fail($("betas"), e); }
  try {
    const m = await api("/api/matched", {stratum: o.stratum, site: o.site, metric: o.metric});
    table($("matched"), m.rows, ["group_a", "group_b", "beta_a", "beta_b", "dbeta", "ppl_a", "ppl_b", "ppl_gap"]);
    notes($("matched"), m.notes);
  } catch (e) { fail($("matched"), e); }
  try {
    const d = await api("/api/delta", {arch: $("arch").value, site: o.site});
    table($("delta"), d.rows, ["stratum", "metric", "optimizer", "reference", "variant", "arch_shift", "optimizer_gain", "passes"]);
    notes($("delta"), d.notes);
  } catch (e) { fail($("delta"), e); }
}

async function drawDynamics() {
  const o = opts();
  try {
    const d = await api("/api/dynamics", {stratum: o.stratum, site: o.site});
    const by = {};
    d.rows.forEach((r) => { (by[r.optimizer] = by[r.optimizer] || []).push(r); });
    const traces = Object.entries(by).map(([name, rows]) => ({
      x: rows.map((r) => r.step), y: rows.map((r) => r[`beta_${o.metric}`]), mode: "lines+markers", name}));
    await Plotly.react("dynamics", traces, {margin: {t: 20}, xaxis: {title: "step"}, yaxis: {title: `β_${o.metric}`}});
  } catch (e) { fail($("dynamics"), e); }
}

async function drawRuns() {
  try {
    const r = await api("/api/runs", {limit: 200});
    table($("runs"), r.rows, ["run_id", "optimizer", "ffn_mult", "ffn_width", "seed", "steps", "status", "val_ppl", "protocol"], showRun);
  } catch (e) { fail($("runs"), e); }
}

async function showRun(row) {
  $("run").style.display = "";
  $("run-title").textContent = `Run ${row.run_id} — ${row.optimizer}, ffn_mult ${row.ffn_mult}, seed ${row.seed}`;
  const r = await api(`/api/runs/${encodeURIComponent(row.run_id)}`);
  await Plotly.react("run-loss", [
    {x: r.evals.map((e) => e.step), y: r.evals.map((e) => e.train_loss), name: "train loss", mode: "lines+markers"},
    {x: r.evals.map((e) => e.step), y: r.evals.map((e) => e.val_loss), name: "val loss", mode: "lines+markers"}],
    {margin: {t: 30}, title: {text: "loss", font: {size: 13}}, xaxis: {title: "step"}});
  const o = opts(), series = {};
  r.ranks.filter((k) => k.site === o.site && k.stratum === o.stratum)
    .forEach((k) => { (series[`layer ${k.layer}`] = series[`layer ${k.layer}`] || []).push(k); });
  await Plotly.react("run-rank", Object.entries(series).map(([name, ks]) => ({
    x: ks.map((k) => k.step), y: ks.map((k) => k[`${o.metric}_rank`]), name, mode: "lines+markers"})),
    {margin: {t: 30}, title: {text: `${o.metric} rank over steps (${o.stratum}, ${o.site})`, font: {size: 13}}, xaxis: {title: "step"}});
  try {
    const s = await api(`/api/runs/${encodeURIComponent(row.run_id)}/spectrum`, {site: o.site, stratum: o.stratum, layer: 0});
    await Plotly.react("run-spectrum", [{y: s.eigenvalues, x: s.eigenvalues.map((_, i) => i + 1), mode: "lines", name: "eigenvalues"}],
      {margin: {t: 30}, title: {text: `eigenvalue spectrum, layer 0, step ${s.step}`, font: {size: 13}},
       xaxis: {type: "log", title: "index"}, yaxis: {type: "log", title: "eigenvalue"}});
  } catch (e) { fail($("run-spectrum"), e); }
}

async function redraw() { await Promise.all([drawScaling(), drawTables(), drawDynamics()]); }

["stratum", "site", "metric", "by"].forEach((id) => $(id).addEventListener("change", redraw));
$("arch").addEventListener("change", drawTables);
window.specdbReady = (async () => { await refreshStatus(); await redraw(); await drawRuns(); return true; })();
setInterval(refreshStatus, 2000);
