// Manifest browser front end: plain JS, hash-routed, every page drawn from the JSON API.
// Routes: #/  #/models  #/v/{kind}/{name}/{version}?filters  #/diff?a=&b=&category=  #/work
"use strict";

const main = document.getElementById("main");
const KIND_COLORS = { dataset: "#2f6fdb", model: "#d35400", evaluation: "#16a085", missing: "#999" };
const SERIES_COLORS = { "web kept": "#2f6fdb", "web dropped": "#9db8ea", "synthetic kept": "#8e44ad",
                        "synthetic dropped": "#d2b0e0" };

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function fmt(n) {
  if (typeof n !== "number") return esc(n);
  if (n !== 0 && Math.abs(n) < 1e-3) return n.toExponential(2);  // a learning rate of 1e-5 is not "0"
  return Number.isInteger(n) ? n.toLocaleString("en") : n.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function versionHref(kind, name, version) { return `#/v/${kind}/${encodeURIComponent(name)}/${encodeURIComponent(version)}`; }
function refHref(row) { return versionHref(row.kind, row.name, row.version); }
function badge(text, cls) { return `<span class="badge ${esc(cls || text)}">${esc(text)}</span>`; }

// A long filter, histogram or diff answers 202 {pending, done, total, message} while it runs on the server;
// ask again until the answer is there, telling `onPending` how far it is. Each request waits about a second
// server-side, so polling at once is a poll every second or so. Leaving the page stops the polling (and the
// server stops a computation nobody asks about).
let routeSerial = 0;
class NavigatedAway extends Error {}
async function getJSON(url, onPending) {
  const serial = routeSerial;
  for (;;) {
    const response = await fetch(url);
    let body;
    try { body = await response.json(); } catch (e) { body = { error: `${response.status} ${response.statusText}` }; }
    if (serial !== routeSerial) throw new NavigatedAway(url);  // the page asked for this is gone: draw nothing
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    if (response.status !== 202 || !body.pending) return body;
    if (onPending) onPending(body);
    await new Promise(resolve => setTimeout(resolve, 250));
  }
}
function pendingNote(body) {
  const share = body.total ? ` ${Math.floor(100 * body.done / body.total)}%` : "";
  return `<p class="muted" data-testid="pending">${esc(body.what)}:${share} <progress max="${body.total || 1}" value="${body.done}"></progress>
    <span style="font-size:12px">${fmt(body.done)}${body.total ? ` of ${fmt(body.total)}` : ""} rows</span></p>`;
}
function errorBox(error) { return `<div class="error" data-testid="error">${esc(error.message || error)}</div>`; }

// Nested stats become rows with dotted keys ("throughput.images_per_s"); a nested value with many rows folds
// into a <details> section, so a pipeline's stats stay a short table instead of a tall block of raw JSON.
const FOLD_AFTER = 6;
const MAX_LIST = 12;
function flatEntries(value, prefix) {
  if (Array.isArray(value) && value.every(v => v === null || typeof v !== "object")) {
    const shown = value.slice(0, MAX_LIST).map(v => typeof v === "number" ? fmt(v) : esc(v)).join(", ");
    return [[prefix, `[${shown}${value.length > MAX_LIST ? `, … ${value.length} items` : ""}]`, false]];
  }
  if (value !== null && typeof value === "object") {
    const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
    if (!entries.length) return [[prefix, `<span class="muted">empty</span>`, false]];
    return entries.flatMap(([k, v]) => flatEntries(v, prefix ? `${prefix}.${k}` : k));
  }
  return [[prefix, typeof value === "number" ? fmt(value) : esc(value), typeof value === "number"]];
}
function kvRows(entries, strip) {
  return entries.map(([k, html, numeric]) =>
    `<tr><td class="mono">${esc(k.slice(strip))}</td><td class="${numeric ? "num" : "val"}">${html}</td></tr>`).join("");
}
function kvTable(obj) {
  const top = Object.entries(obj || {});
  if (!top.length) return `<p class="muted">none</p>`;
  const body = top.map(([k, v]) => {
    const entries = flatEntries(v, k);
    if (entries.length <= FOLD_AFTER) return kvRows(entries, 0);
    return `<tr><td colspan="2"><details data-testid="kv-section"><summary><span class="mono">${esc(k)}</span>
      <span class="muted">${entries.length} values</span></summary>
      <table class="kv">${kvRows(entries, k.length + 1)}</table></details></td></tr>`;
  }).join("");
  return `<table class="kv" data-testid="kv">${body}</table>`;
}

// ---------------------------------------------------------------- router
function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
}
async function route() {
  routeSerial++;
  const { parts, params } = parseHash();
  main.innerHTML = `<p class="muted">Loading…</p>`;
  try {
    if (parts[0] === "v" && parts.length === 4) await versionPage(parts[1], parts[2], parts[3], params);
    else if (parts[0] === "diff") await diffPage(params);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "work") await workPage();
    else await homePage();
  } catch (error) { if (!(error instanceof NavigatedAway)) main.innerHTML = errorBox(error); }
}
window.addEventListener("hashchange", route);
route();

// ---------------------------------------------------------------- work
// What stage runs left in their work dirs (`blip data work`): shown here, removed from the command line.
async function workPage() {
  const data = await getJSON("/api/work");
  document.getElementById("registry").textContent = data.registry;
  const when = s => s ? new Date(s * 1000).toISOString().slice(0, 16).replace("T", " ") : "–";
  const rows = data.entries.map(e => `<tr><td class="mono">${esc(e.key)}</td><td>${esc(e.what)}</td>
      <td>${badge(e.state)}</td><td class="num">${bytes(e.bytes)}</td><td class="num">${fmt(e.files)}</td>
      <td class="muted">${when(e.modified)}</td><td>${esc(e.detail)}</td></tr>`).join("");
  main.innerHTML = `<h1>Work left by stage runs</h1>
    <p class="muted" data-testid="work-total">${data.entries.length} in all, ${bytes(data.bytes)};
      ${bytes(data.spare_bytes)} of it no rerun needs. Remove with
      <span class="mono">blip data --registry ${esc(data.registry)} work --remove-leftovers</span> or
      <span class="mono">--remove KEY</span>.</p>
    <div class="card"><table data-testid="work"><tr><th>work</th><th>what</th><th>state</th><th class="num">size</th>
      <th class="num">files</th><th>last write</th><th>detail</th></tr>
      ${rows || `<tr><td colspan="7" class="muted">no work left</td></tr>`}</table></div>`;
}

// ---------------------------------------------------------------- home
async function homePage() {
  const [data, models] = await Promise.all([getJSON("/api/versions"), getJSON("/api/models")]);
  document.getElementById("registry").textContent = data.registry;
  const groups = { dataset: [], model: [], evaluation: [] };
  data.versions.forEach(v => (groups[v.kind] || (groups[v.kind] = [])).push(v));
  const datasetRows = groups.dataset.map(v => `<tr>
      <td><a href="${refHref(v)}">${esc(v.name)}</a></td><td>${esc(v.version)}${(v.tags || []).map(t => ` ${badge(t, "tag")}`).join("")}</td><td>${esc(v.stage)}</td>
      <td class="num">${fmt(v.num_samples)}</td><td class="mono">${esc(Object.entries(v.counts).map(([k, n]) => `${k}=${n}`).join(" "))}</td>
      <td>${v.parents.map(esc).join(", ")}</td><td class="num">${v.data_removed ? `<span class="muted" title="blip data rm --data-only">data removed</span>` : bytes(v.bytes)}</td><td class="mono">${esc(v.short_id)}</td>
      <td class="muted">${esc(v.finished_at)}</td></tr>`).join("");
  const evalRows = groups.evaluation.map(v => `<tr><td><a href="${refHref(v)}">${esc(v.ref)}</a></td>
      <td>${v.parents.map(esc).join(", ")}</td><td class="mono">${esc(Object.entries(v.metrics).map(([k, n]) => `${k}=${fmt(n)}`).join(" "))}</td></tr>`).join("");
  main.innerHTML = `
    <h1>Datasets</h1>
    <div class="card"><table data-testid="datasets"><tr><th>name</th><th>version</th><th>stage</th><th class="num">samples</th>
      <th>counts</th><th>parents</th><th class="num">size</th><th>id</th><th>published</th></tr>${datasetRows || `<tr><td colspan="9" class="muted">no datasets</td></tr>`}</table></div>
    <h1 style="margin-top:18px">Models and their evaluations</h1>
    <div class="card">${modelTable(models)}</div>
    <h1 style="margin-top:18px">Evaluations</h1>
    <div class="card"><table><tr><th>evaluation</th><th>parents</th><th>metrics</th></tr>${evalRows || `<tr><td colspan="3" class="muted">none</td></tr>`}</table></div>
    <h1 style="margin-top:18px">Compare two dataset versions</h1>
    <div class="card">${diffForm(groups.dataset, "", "")}</div>`;
}

function modelTable(models) {
  if (!models.models.length) return `<p class="muted">no model versions</p>`;
  const head = models.columns.map(c => `<th class="num">${esc(c)}</th>`).join("");
  const rows = models.models.map(m => `<tr><td><a href="${refHref(m)}">${esc(m.ref)}</a></td>
      <td>${m.datasets.map(esc).join(", ")}</td>
      ${models.columns.map(c => `<td class="num">${c in m.metrics ? fmt(m.metrics[c]) : "–"}</td>`).join("")}</tr>`).join("");
  return `<table data-testid="models"><tr><th>model</th><th>trained on</th>${head}</tr>${rows}</table>`;
}
async function modelsPage() {
  const models = await getJSON("/api/models");
  main.innerHTML = `<h1>Model versions, metrics side by side</h1><div class="card">${modelTable(models)}</div>`;
}

function diffForm(datasets, a, b) {
  const options = selected => datasets.map(v => `<option ${v.ref === selected ? "selected" : ""}>${esc(v.ref)}</option>`).join("");
  return `<form class="filters" id="diff-form"><label>A (old)<select name="a">${options(a)}</select></label>
    <label>B (new)<select name="b">${options(b || (datasets[1] || datasets[0] || {}).ref)}</select></label>
    <button type="submit">Diff</button></form>`;
}
document.addEventListener("submit", event => {
  if (event.target.id !== "diff-form") return;
  event.preventDefault();
  const form = new FormData(event.target);
  location.hash = `#/diff?a=${encodeURIComponent(form.get("a"))}&b=${encodeURIComponent(form.get("b"))}`;
});

// ---------------------------------------------------------------- one version
async function versionPage(kind, name, version, params) {
  const base = `/api/versions/${kind}/${encodeURIComponent(name)}/${encodeURIComponent(version)}`;
  const [info, graph] = await Promise.all([getJSON(base), getJSON(`${base}/lineage`)]);
  const m = info.manifest;
  const files = m.files.map(f => `<tr><td class="mono">${esc(f.path)}</td><td>${esc(f.role)}</td><td>${esc(f.split || "")}</td>
      <td class="num">${f.num_samples == null ? "" : fmt(f.num_samples)}</td><td class="num">${bytes(f.bytes)}</td>
      <td class="mono" title="${esc(f.sha256)}">${esc(f.sha256.slice(0, 16))}…</td></tr>`).join("");
  const evals = info.evaluations.length ? `<div class="card"><h2>Evaluations</h2><table>
      <tr><th>evaluation</th><th>metrics</th></tr>${info.evaluations.map(e => `<tr><td><a href="${refHref(e)}">${esc(e.ref)}</a></td>
      <td>${kvTable(e.metrics)}</td></tr>`).join("")}</table></div>` : "";
  const parquet = info.parquet ? Object.entries(info.parquet).filter(([, v]) => v).map(([label, v]) =>
      `<div>${esc(label)}: ${v.error ? `<span class="error">${esc(v.error)}</span>` : `${fmt(v.rows)} rows, ${v.row_groups} row groups`}</div>`).join("") : "";
  main.innerHTML = `
    <h1>${badge(kind)} ${esc(m.ref)} <span class="mono muted">${esc(m.id.slice(0, 12))}</span>${Object.entries(info.tags || {}).map(([t, r]) => ` <span class="badge tag" data-testid="tag" title="since ${esc(r.tagged_at)} by ${esc(r.by)}">${esc(m.name)}@${esc(t)}</span>`).join("")}</h1>
    <div class="muted">stage <b>${esc(m.producer.stage)}</b> · config ${esc(m.producer.config_hash)} · code ${esc(m.producer.code_version)}
      · published ${esc(m.producer.finished_at)} · ${fmt(info.summary.num_samples)} samples in shards</div>
    ${info.data_removed ? `<div class="error">data files removed on ${esc(info.data_removed.removed_at)} by <span class="mono">blip data rm</span> (${fmt(info.data_removed.files.length)} files): the record, index and stats remain; images cannot be shown</div>` : ""}
    <div class="cards">
      <div class="card"><h2>Counts</h2>${kvTable(m.counts)}<h2 style="margin-top:8px">Splits</h2>${kvTable(m.splits)}${parquet}</div>
      <div class="card"><h2>Drop reasons</h2>${dropBars(m.drop_reasons)}</div>
      <div class="card"><h2>Stats</h2>${kvTable(m.stats)}${Object.keys(m.metadata).length ? `<h2 style="margin-top:8px">Metadata</h2>${kvTable(m.metadata)}` : ""}</div>
      <div class="card wide"><h2>Lineage</h2>${lineageSvg(graph)}</div>
      <div class="card wide" id="histograms"><h2>Histograms</h2><p class="muted">${kind === "dataset" ? "Loading…" : "only for datasets"}</p></div>
      ${evals}
      <div class="card wide"><h2>Files</h2><table data-testid="files"><tr><th>path</th><th>role</th><th>split</th>
        <th class="num">samples</th><th class="num">size</th><th>sha256</th></tr>${files}</table></div>
      <div class="card wide"><h2>Producer config</h2><pre class="mono">${esc(JSON.stringify(m.producer.config, null, 2))}</pre></div>
    </div>
    ${info.parquet && info.parquet.index ? `<h1>Samples</h1><div id="samples"></div>` : ""}`;
  if (kind === "dataset") {
    const card = document.getElementById("histograms");
    getJSON(`${base}/histograms`, body => { card.innerHTML = `<h2>Histograms</h2>${pendingNote(body)}`; })
      .then(data => drawHistograms(data, m.stats)).catch(error => {
        if (!(error instanceof NavigatedAway)) card.innerHTML = `<h2>Histograms</h2>${errorBox(error)}`;
      });
  }
  if (info.parquet && info.parquet.index) await samplesSection(base, info, params);
}

function dropBars(reasons) {
  const entries = Object.entries(reasons || {}).sort((a, b) => b[1] - a[1]);
  if (!entries.length) return `<p class="muted">nothing dropped</p>`;
  const top = entries[0][1] || 1;
  return `<table>${entries.map(([reason, n]) => `<tr><td>${esc(reason)}</td><td class="num">${fmt(n)}</td>
    <td style="width:45%"><div class="bar"><span style="width:${(100 * n / top).toFixed(1)}%;background:var(--dropped)"></span></div></td></tr>`).join("")}</table>`;
}

// ---------------------------------------------------------------- plots (inline SVG)
function histogramSvg(title, edges, series) {
  const width = 460, height = 170, left = 36, bottom = 26, top = 18;
  const bins = edges.length - 1;
  if (bins <= 0) return `<p class="muted">${esc(title)}: no data</p>`;
  const stacked = Array.from({ length: bins }, (_, i) => series.reduce((s, x) => s + x.counts[i], 0));
  const max = Math.max(1, ...stacked);
  const barWidth = (width - left - 8) / bins;
  let bars = "";
  for (let i = 0; i < bins; i++) {
    let y = height - bottom;
    for (const s of series) {
      const h = (s.counts[i] / max) * (height - bottom - top);
      if (h > 0) bars += `<rect x="${left + i * barWidth + 1}" y="${y - h}" width="${barWidth - 2}" height="${h}" fill="${s.color}"><title>${esc(s.label)}: ${s.counts[i]} in [${edges[i]}, ${edges[i + 1]})</title></rect>`;
      y -= h;
    }
  }
  const anchors = ["start", "middle", "end"];
  const ticks = [0, Math.floor(bins / 2), bins].map((i, n) =>
    `<text x="${left + i * barWidth}" y="${height - 10}" text-anchor="${anchors[n]}">${fmt(edges[i])}</text>`).join("");
  const legend = series.length > 1 ? `<div class="legend">${series.map(s => `<span><i style="background:${s.color}"></i>${esc(s.label)}</span>`).join("")}</div>` : "";
  return `<div><b>${esc(title)}</b>${legend}<svg class="svgplot" data-testid="histogram" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
    <line x1="${left}" y1="${height - bottom}" x2="${width - 4}" y2="${height - bottom}" stroke="#999"/>
    <line x1="${left}" y1="${top}" x2="${left}" y2="${height - bottom}" stroke="#999"/>
    <text x="${left - 4}" y="${top + 4}" text-anchor="end">${fmt(max)}</text><text x="${left - 4}" y="${height - bottom}" text-anchor="end">0</text>
    ${bars}${ticks}</svg></div>`;
}
function drawHistograms(data, stats) {
  const parts = [];
  if (data.itm_score) parts.push(histogramSvg(`ITM score (${fmt(data.itm_score.total)} captions)`, data.itm_score.edges,
    data.itm_score.series.map(s => ({ ...s, color: SERIES_COLORS[s.label] || "#888" }))));
  if (data.megapixels) parts.push(histogramSvg("image size (megapixels)", data.megapixels.edges, [{ label: "images", counts: data.megapixels.counts, color: "#5b7db1" }]));
  if (data.caption_words) parts.push(histogramSvg("web caption length (words)", data.caption_words.edges, [{ label: "captions", counts: data.caption_words.counts, color: "#5b7db1" }]));
  // CapFilt's stats: its web-text decisions along each numeric column of the source list (a CLIP score), in bins of
  // about a tenth of the samples each: where the ITM filter and the list's score agree.
  for (const [name, b] of Object.entries(((stats || {}).capfilt || {}).by_source_column || {})) {
    const samples = b.samples.reduce((s, n) => s + n, 0);
    const bins = b.bins === "deciles" ? "deciles" : "equal bins";  // a version made before the deciles
    parts.push(histogramSvg(`CapFilt's web texts by the list's ${name} (${bins} of ${fmt(samples)} samples)`, b.edges, [
      { label: "web text kept", counts: b.web_text_kept, color: SERIES_COLORS["web kept"] },
      { label: "web text dropped", counts: b.samples.map((n, i) => n - b.web_text_kept[i]), color: SERIES_COLORS["web dropped"] }]));
  }
  document.getElementById("histograms").innerHTML = `<h2>Histograms</h2><div style="display:flex;flex-wrap:wrap;gap:24px">${parts.join("") || `<p class="muted">no per-sample index</p>`}</div>`;
}

function lineageSvg(graph) {
  const levels = {};
  graph.nodes.forEach(n => (levels[n.level] || (levels[n.level] = [])).push(n));
  const keys = Object.keys(levels).map(Number).sort((a, b) => a - b);
  const colWidth = 230, rowHeight = 44, nodeWidth = 200, nodeHeight = 30;
  const tallest = Math.max(...keys.map(k => levels[k].length));
  const width = keys.length * colWidth + 20, height = tallest * rowHeight + 20;
  const pos = {};
  keys.forEach((level, column) => levels[level].forEach((n, row) => {
    pos[n.id] = { x: 10 + column * colWidth, y: 10 + row * rowHeight + (tallest - levels[level].length) * rowHeight / 2 };
  }));
  const edges = graph.edges.map(e => {
    const a = pos[e.source], b = pos[e.target];
    if (!a || !b) return "";
    const x1 = a.x + nodeWidth, y1 = a.y + nodeHeight / 2, x2 = b.x, y2 = b.y + nodeHeight / 2;
    return `<path d="M${x1},${y1} C${x1 + 20},${y1} ${x2 - 20},${y2} ${x2},${y2}" fill="none" stroke="#8a94a6" marker-end="url(#arrow)"/>`;
  }).join("");
  const nodes = graph.nodes.map(n => {
    const p = pos[n.id];
    const label = n.ref.length > 30 ? n.ref.slice(0, 29) + "…" : n.ref;
    const rect = `<rect x="${p.x}" y="${p.y}" rx="6" width="${nodeWidth}" height="${nodeHeight}" fill="${KIND_COLORS[n.kind] || "#888"}"
      stroke="${n.id === graph.root ? "#111" : "none"}" stroke-width="3"><title>${esc(n.kind)} ${esc(n.ref)} (${esc(n.stage || "")})</title></rect>
      <text x="${p.x + 8}" y="${p.y + 19}">${esc(label)}</text>`;
    return n.kind === "missing" ? rect : `<a href="${versionHref(n.kind, n.name, n.version)}">${rect}</a>`;
  }).join("");
  return `<div class="legend">${Object.entries(KIND_COLORS).map(([k, c]) => `<span><i style="background:${c}"></i>${k}</span>`).join("")}
      <span class="muted">sources on the left, what was made from this version on the right</span></div>
    <svg class="lineage" data-testid="lineage" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">
    <path d="M0,0 L10,5 L0,10 z" fill="#8a94a6"/></marker></defs>${edges}${nodes}</svg>`;
}

// ---------------------------------------------------------------- samples
async function samplesSection(base, info, params) {
  const box = document.getElementById("samples");
  const hasTexts = info.parquet.texts != null;
  const splits = Object.keys(info.manifest.splits || {});
  const value = k => esc(params.get(k) || "");
  const sel = (k, options) => options.map(([v, label]) => `<option value="${esc(v)}" ${params.get(k) === v ? "selected" : ""}>${esc(label)}</option>`).join("");
  // A range on a numeric column of the source list (LAION's similarity): where the list's score and CapFilt agree.
  const ranged = (info.source_columns || []).filter(c => c.numeric);
  box.innerHTML = `<form class="filters" id="sample-filters">
      <label>search text / key<input name="q" value="${value("q")}" placeholder="e.g. circle"></label>
      <label>caption source<select name="source">${sel("source", [["", "any"], ["web", "web"], ["synthetic", "synthetic"]])}</select></label>
      ${hasTexts ? `<label>min ITM score<input type="number" step="0.01" min="0" max="1" name="min_score" value="${value("min_score")}"></label>
      <label>max ITM score<input type="number" step="0.01" min="0" max="1" name="max_score" value="${value("max_score")}"></label>` : ""}
      <label>decision<select name="decision">${sel("decision", [["", "any"], ["kept", "kept"], ["dropped", "dropped"]])}</select></label>
      <label>split<select name="split">${sel("split", [["", "any"], ...splits.map(s => [s, s])])}</select></label>
      ${ranged.length ? `<label>source column<select name="column">${sel("column", ranged.map(c => [c.name, c.name]))}</select></label>
      <label>from<input type="number" step="any" name="column_min" value="${value("column_min")}"></label>
      <label>to<input type="number" step="any" name="column_max" value="${value("column_max")}"></label>` : ""}
      <button type="submit">Apply</button><button type="button" class="secondary" id="clear-filters">Clear</button>
    </form><div id="sample-results"><p class="muted">Loading samples…</p></div>`;
  const form = document.getElementById("sample-filters");
  const go = offset => {
    const query = new URLSearchParams();
    for (const [k, v] of new FormData(form).entries()) if (String(v).trim()) query.set(k, String(v).trim());
    if (!query.has("column_min") && !query.has("column_max")) query.delete("column");  // a column with no range
    if (offset) query.set("offset", offset);
    const [path] = location.hash.split("?");
    location.hash = `${path}?${query}`;
  };
  form.addEventListener("submit", e => { e.preventDefault(); go(0); });
  document.getElementById("clear-filters").addEventListener("click", () => { location.hash = location.hash.split("?")[0]; });
  const query = new URLSearchParams(params);
  query.set("limit", "24");
  const results = document.getElementById("sample-results");
  let page;
  try {
    page = await getJSON(`${base}/samples?${query}`, body => { results.innerHTML = pendingNote(body); });
  } catch (error) { if (!(error instanceof NavigatedAway)) results.innerHTML = errorBox(error); return; }
  const offset = page.offset, end = offset + page.samples.length;
  results.innerHTML = `<div class="pager"><span data-testid="sample-total">${fmt(page.total)} matching samples</span>
      <span class="muted">showing ${page.total ? offset + 1 : 0}–${end}</span>
      <button type="button" class="secondary" id="prev" ${offset <= 0 ? "disabled" : ""}>◀ previous</button>
      <button type="button" class="secondary" id="next" ${end >= page.total ? "disabled" : ""}>next ▶</button></div>
    <div class="grid" data-testid="sample-grid">${page.samples.map(sampleCard).join("")}</div>`;
  document.getElementById("prev").onclick = () => go(Math.max(0, offset - page.limit));
  document.getElementById("next").onclick = () => go(offset + page.limit);
  results.querySelectorAll("img.thumb").forEach(img => img.addEventListener("error", () => showImageError(img)));
}

function sampleCard(s) {
  const dropped = s.status === "dropped";
  const texts = s.texts.length ? s.texts : [{ text: s.caption, source: s.caption_source || "web", itm_score: null, kept: !dropped, drop_reason: s.drop_reason }];
  const captions = texts.map(t => `<div class="caption ${t.kept ? "kept" : "dropped"}" data-testid="caption">
      ${badge(t.source, t.source)} ${badge(t.kept ? "kept" : "dropped", t.kept ? "kept" : "dropped")}
      ${t.itm_score == null ? "" : `<span class="score" title="ITM score">${t.itm_score.toFixed(3)}</span>`}
      <div class="text">${esc(t.text)}</div>
      ${t.itm_score == null ? "" : `<div class="bar"><span style="width:${(100 * Math.max(0, Math.min(1, t.itm_score))).toFixed(1)}%"></span></div>`}
      ${t.kept || !t.drop_reason ? "" : `<div class="muted" style="font-size:11px">why: ${esc(t.drop_reason)}</div>`}</div>`).join("");
  return `<div class="sample ${dropped ? "is-dropped" : ""}" data-key="${esc(s.key)}">
    <img class="thumb" loading="lazy" src="${esc(s.thumb)}?size=256" alt="sample ${esc(s.key)}">
    <div class="body"><div><span class="mono">${esc(s.key)}</span> ${badge(dropped ? "dropped" : "kept", dropped ? "dropped" : "kept")}
      ${dropped && s.drop_reason ? `<span class="muted">why: ${esc(s.drop_reason)}</span>` : ""}
      <span class="muted" style="float:right">${s.width}×${s.height} · ${esc(s.split)}</span></div>
      ${s.raw_caption && s.raw_caption !== s.caption ? `<div class="muted" style="font-size:12px" title="raw web alt-text">raw: ${esc(s.raw_caption)}</div>` : ""}
      ${sourceColumns(s.source_columns)}
      ${captions}
      <a class="muted" style="font-size:11px" href="${esc(s.url)}" rel="noreferrer noopener" target="_blank">${esc(s.url)}</a></div></div>`;
}

// The source list's own columns the version carries (a CLIP score, an id), as the list had them.
function sourceColumns(columns) {
  const entries = Object.entries(columns || {});
  if (!entries.length) return "";
  const shown = v => v == null ? "–" : typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : String(v);
  return `<div class="muted mono" style="font-size:11px" title="the source list's columns" data-testid="source-columns">
    ${entries.map(([name, value]) => `${esc(name)} ${esc(shown(value))}`).join(" · ")}</div>`;
}

async function showImageError(img) {
  // The thumbnail endpoint answers failures with JSON {error}; show it in place of the image.
  let message = "image unavailable";
  try { const r = await fetch(img.src); const body = await r.json(); message = body.error || message; } catch (e) { /* keep default */ }
  const panel = document.createElement("div");
  panel.className = "error-panel";
  panel.setAttribute("data-testid", "image-error");
  panel.textContent = message;
  img.replaceWith(panel);
}

// ---------------------------------------------------------------- diff
async function diffPage(params) {
  const versions = await getJSON("/api/versions");
  const datasets = versions.versions.filter(v => v.kind === "dataset");
  const a = params.get("a"), b = params.get("b");
  if (!a || !b) { main.innerHTML = `<h1>Diff two dataset versions</h1><div class="card">${diffForm(datasets, a, b)}</div>`; return; }
  const category = params.get("category") || "";
  const offset = Number(params.get("offset") || 0);
  const data = await getJSON(`/api/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}&category=${category}&offset=${offset}&limit=50`,
    body => { main.innerHTML = `<h1>Diff ${esc(a)} → ${esc(b)}</h1><div class="card">${pendingNote(body)}</div>`; });
  const link = (cat, label) => `<a href="#/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}${cat ? `&category=${cat}` : ""}"
      class="${cat === category ? "active" : ""}" data-testid="diff-${cat || "all"}">${label}</a>`;
  const chips = [link("", "all changes")].concat(Object.entries(data.counts).map(([k, n]) => link(k, `${k}: ${fmt(n)}`))).join("");
  const side = row => {
    if (!row) return "<span class='muted'>—</span>";
    const texts = row.kept_texts && row.kept_texts.length ? `<div class="muted" style="font-size:12px">kept: ${row.kept_texts.map(esc).join(" · ")}</div>` : "";
    return `${badge(row.caption_source || "web", row.caption_source || "web")} ${esc(row.caption)} ${badge(row.status === "ok" ? "kept" : "dropped", row.status === "ok" ? "kept" : "dropped")}
      ${row.drop_reason ? `<span class="muted">why: ${esc(row.drop_reason)}</span>` : ""}${texts}`;
  };
  const cls = { added: "kept", restored: "kept", removed: "dropped", newly_dropped: "dropped" };
  const rows = data.rows.map(r => `<tr class="diffrow" data-key="${esc(r.key)}"><td><img loading="lazy" src="${esc(r.thumb)}?size=128" alt=""></td>
      <td class="mono">${esc(r.key)}</td><td>${badge(r.category, cls[r.category] || "")}</td><td>${side(r.a)}</td><td>${side(r.b)}</td></tr>`).join("");
  main.innerHTML = `<h1>Diff <a href="${refHref(data.a)}">${esc(data.a.ref)}</a> → <a href="${refHref(data.b)}">${esc(data.b.ref)}</a></h1>
    <div class="card">${diffForm(datasets, a, b)}</div>
    <div class="chips" style="margin:12px 0">${chips}</div>
    <div class="card"><div class="muted" data-testid="diff-total">${fmt(data.total)} keys in this view · the caption shown is the training caption; CapFilt versions also list their kept texts</div>
    <table data-testid="diff-table"><tr><th></th><th>key</th><th>change</th><th>A: captions</th><th>B: captions</th></tr>${rows || `<tr><td colspan="5" class="muted">no keys</td></tr>`}</table>
    <div class="pager">${offset > 0 ? `<a href="#/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}&category=${category}&offset=${Math.max(0, offset - 50)}">◀ previous</a>` : ""}
    ${offset + data.rows.length < data.total ? `<a href="#/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}&category=${category}&offset=${offset + 50}">next ▶</a>` : ""}</div></div>`;
  main.querySelectorAll("tr.diffrow img").forEach(img => img.addEventListener("error", () => showImageError(img)));
}
