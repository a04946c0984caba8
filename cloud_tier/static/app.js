// splitinfer fleet dashboard: polls the JSON API and redraws without reloading.
// Device-supplied text is only ever written with textContent (never innerHTML).
"use strict";

const POLL_MS = 1000;
const STAGES = [
  ["head_ms", "head", "#2563eb"],
  ["encode_ms", "encode", "#7c3aed"],
  ["network_ms", "network", "#f59e0b"],
  ["queue_ms", "queue", "#10b981"],
  ["tail_ms", "tail", "#ef4444"],
];
const COLUMNS = ["device", "label", "status", "mode", "cut", "bandwidth_mbps", "req_per_s",
                 "p50_ms", "p95_ms", "p99_ms", "edge_share", "last_seen", "cloud_requests", "cloud_mean_ms"];
const TEXT_COLUMNS = new Set(["device", "label", "status", "mode", "cut"]);

// A row's value for a column: the cloud tier's own view of the device (dev.cloud) is nested.
function cellValue(dev, key) {
  if (key === "cloud_requests") return dev.cloud ? dev.cloud : null;
  if (key === "cloud_mean_ms") return dev.cloud ? dev.cloud.mean_ms : null;
  return dev[key];
}

// Split mode on the edge-only cut: not a contradiction, the plan says the device alone is fastest for now.
const SPLIT_EDGE_NOTE = "split mode with the edge-only cut: the planner finds the device alone fastest at this " +
  "uplink; it keeps measuring and switches when the link allows";

function cutNote(dev) {
  return dev.mode === "split" && dev.cut === "edge-only" ? SPLIT_EDGE_NOTE : "";
}

// The row of `id` in a table body (made with one cell per column, class col-KEY, numbers right-aligned).
function tableRow(rows, body, dataKey, id, columns, textColumns, onCreate) {
  let tr = rows.get(id);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset[dataKey] = id;
    for (const key of columns) {
      const td = document.createElement("td");
      td.className = "col-" + key;
      if (!textColumns.has(key)) td.classList.add("num");
      tr.appendChild(td);
    }
    if (onCreate) onCreate(tr);
    rows.set(id, tr);
    body.appendChild(tr);
  }
  return tr;
}

// The tails' Ray Serve deployments (split-cloud serve --backend ray); the section stays hidden without them.
const DEPLOYMENT_COLUMNS = ["model", "model_sha256", "cut", "status", "replicas", "ongoing", "batches",
                            "recent_batch_mean", "recent_batch_max"];
const DEPLOYMENT_TEXT = new Set(["model", "model_sha256", "cut", "status"]);
const rowsByDeployment = new Map();

function deploymentCell(dep, key) {
  switch (key) {
    case "model_sha256": return dep.model_sha256 ? dep.model_sha256.slice(0, 12) : "—";
    case "replicas": {
      const target = dep.replicas_target === null || dep.replicas_target === undefined ? "—" : dep.replicas_target;
      const other = Object.entries(dep.replicas_other || {}).map(([s, n]) => n + " " + s.toLowerCase());
      return dep.replicas_running + " / " + target + (other.length ? " (" + other.join(", ") + ")" : "");
    }
    case "recent_batch_mean": return dep[key] === null ? "—" : dep[key].toFixed(1);
    case "recent_batch_max": return dep[key] === null ? "—" : String(dep[key]);
    default: return dep[key] === null || dep[key] === undefined || dep[key] === "" ? "—" : String(dep[key]);
  }
}

function renderDeployments(data) {
  const list = data.deployments || [];
  const body = document.getElementById("deployment-rows");
  const seen = new Set();
  for (const dep of list) {
    seen.add(dep.deployment);
    const tr = tableRow(rowsByDeployment, body, "deployment", dep.deployment, DEPLOYMENT_COLUMNS, DEPLOYMENT_TEXT);
    DEPLOYMENT_COLUMNS.forEach((key, i) => { tr.children[i].textContent = deploymentCell(dep, key); });
    tr.title = dep.deployment;
    tr.classList.toggle("stale", Boolean(dep.status_error));
  }
  for (const [name, tr] of rowsByDeployment) {
    if (!seen.has(name)) { tr.remove(); rowsByDeployment.delete(name); }
  }
  const errors = list.filter(d => d.status_error).map(d => d.status_error);
  const age = list.length ? list[0].status_age_s : null;
  document.getElementById("deployments-note").textContent = errors.length
    ? "Ray Serve's state could not be read: " + errors[0] + (age === null ? "" : " (last read " +
      age.toFixed(0) + " s ago)")
    : "Replicas and status as Ray Serve reported them" + (age === null ? "" : " " + age.toFixed(0) + " s ago") +
      "; ongoing and batches as this node saw them.";
  document.getElementById("deployments").hidden = list.length === 0;
}

let selected = null;
const rowsByDevice = new Map();

function fmt(key, value, now) {
  if (value === null || value === undefined) return "—";
  switch (key) {
    case "bandwidth_mbps": return value.toFixed(2);
    case "req_per_s": return value.toFixed(1);
    case "p50_ms": case "p95_ms": case "p99_ms": return value.toFixed(2);
    case "edge_share": return (100 * value).toFixed(0) + " %";
    case "last_seen": return Math.max(0, now - value).toFixed(0) + " s ago";
    case "cloud_mean_ms": return value.toFixed(2);
    case "cloud_requests":
      return String(value.requests) + (value.errors ? " (" + String(value.errors) + " failed)" : "");
    default: return String(value);
  }
}

function renderFleet(data) {
  const body = document.getElementById("fleet-rows");
  const seen = new Set();
  for (const dev of data.devices) {
    seen.add(dev.device);
    const tr = tableRow(rowsByDevice, body, "device", dev.device, COLUMNS, TEXT_COLUMNS,
                        row => row.addEventListener("click", () => select(dev.device)));
    COLUMNS.forEach((key, i) => {
      const td = tr.children[i];
      td.textContent = fmt(key, cellValue(dev, key), data.now);  // textContent: a hostile label stays text
      if (key === "status") td.classList.toggle("online", dev.status === "online");
      if (key === "status") td.classList.toggle("offline", dev.status !== "online");
      if (key === "cut") {
        const note = cutNote(dev);
        td.classList.toggle("split-edge", note !== "");
        td.title = note;
      }
    });
    tr.classList.toggle("selected", dev.device === selected);
  }
  for (const [device, tr] of rowsByDevice) {
    if (!seen.has(device)) { tr.remove(); rowsByDevice.delete(device); }
  }
  document.getElementById("empty").hidden = data.devices.length > 0;
  const warnings = document.getElementById("warnings");
  warnings.textContent = (data.warnings || []).join(" · ");  // e.g. the node runs --insecure
  warnings.hidden = !warnings.textContent;
  if ((selected === null || !rowsByDevice.has(selected)) && data.devices.length > 0) {
    select(data.devices[0].device);
  }
}

function select(device) {
  selected = device;
  for (const [d, tr] of rowsByDevice) tr.classList.toggle("selected", d === device);
  document.getElementById("chart-device").textContent = device;
  pollSeries();
}

// 1, 2 or 5 times a power of ten: axis ticks a person can read.
function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

function drawChart(series) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  const pad = {l: 56, r: 12, t: 10, b: 28};
  ctx.clearRect(0, 0, W, H);
  const t = series.t;
  const n = t.length;
  // Stack the per-stage p50s: the top edge approximates the p50 of the whole request.
  const stacks = [];
  let acc = new Array(n).fill(0);
  for (const [key] of STAGES) {
    const vals = series.p50[key];
    const next = acc.map((a, i) => a + (vals[i] || 0));
    stacks.push([acc, next]);
    acc = next;
  }
  const top = Math.max(1e-6, ...acc, ...series.p50.total_ms.map(v => v || 0));
  const step = niceStep(top / 4);
  const ymax = Math.ceil(top * 1.05 / step) * step;
  const t0 = n ? t[0] : 0, t1 = n ? Math.max(t[n - 1], t0 + series.bucket_s) : 1;
  const x = v => pad.l + (W - pad.l - pad.r) * (v - t0) / (t1 - t0);
  const y = v => H - pad.b - (H - pad.t - pad.b) * v / ymax;

  ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#6b7280"; ctx.font = "12px system-ui, sans-serif";
  ctx.lineWidth = 1;
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  for (let v = 0; v <= ymax + step / 2; v += step) {
    ctx.beginPath(); ctx.moveTo(pad.l, y(v)); ctx.lineTo(W - pad.r, y(v)); ctx.stroke();
    ctx.fillText(v.toFixed(digits) + " ms", 4, y(v) + 4);
  }
  if (n) {
    const span = t1 - t0;
    ctx.fillText("-" + span.toFixed(0) + " s", pad.l, H - 8);
    ctx.fillText("now", W - pad.r - 24, H - 8);
  } else {
    ctx.fillText("no requests in the window", pad.l + 10, pad.t + 20);
  }
  stacks.forEach(([lo, hi], s) => {
    if (!n) return;
    ctx.beginPath();
    ctx.moveTo(x(t[0]), y(hi[0]));
    for (let i = 1; i < n; i++) ctx.lineTo(x(t[i]), y(hi[i]));
    for (let i = n - 1; i >= 0; i--) ctx.lineTo(x(t[i]), y(lo[i]));
    ctx.closePath();
    ctx.globalAlpha = 0.75; ctx.fillStyle = STAGES[s][2]; ctx.fill(); ctx.globalAlpha = 1;
  });
  if (n) {  // the measured total, as a line over the stack
    ctx.beginPath(); ctx.strokeStyle = "#111827"; ctx.lineWidth = 1.5;
    series.p50.total_ms.forEach((v, i) => (i ? ctx.lineTo(x(t[i]), y(v)) : ctx.moveTo(x(t[i]), y(v))));
    ctx.stroke();
  }
  // Machine-readable summary of what is drawn (tests and assistive tech read it).
  canvas.dataset.device = series.device_id;
  canvas.dataset.points = String(n);
  canvas.dataset.lastT = n ? String(t[n - 1]) : "";
  canvas.dataset.requests = String(series.count.reduce((a, b) => a + b, 0));
  canvas.setAttribute("aria-label", "latency by stage for " + series.device_id + ": " + n + " points");
}

function buildLegend() {
  const legend = document.getElementById("legend");
  for (const [, name, color] of STAGES) {
    const span = document.createElement("span");
    span.textContent = name;
    span.style.setProperty("--c", color);
    legend.appendChild(span);
  }
  const total = document.createElement("span");
  total.textContent = "total (measured)";
  total.style.setProperty("--c", "#111827");
  legend.appendChild(total);
}

async function getJSON(url) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 5000);  // every request has a deadline
  try {
    const resp = await fetch(url, {signal: ctl.signal, cache: "no-store"});
    if (!resp.ok) throw new Error(url + ": HTTP " + resp.status);
    return await resp.json();
  } finally {
    clearTimeout(timer);
  }
}

async function pollFleet() {
  try {
    renderFleet(await getJSON("/api/fleet"));
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "update failed: " + err.message;
  }
}

async function pollDeployments() {
  try {
    renderDeployments(await getJSON("/api/deployments"));
  } catch (err) {
    document.getElementById("status").textContent = "deployments update failed: " + err.message;
  }
}

async function pollSeries() {
  if (selected === null) return;
  const device = selected;
  try {
    const series = await getJSON("/api/devices/" + encodeURIComponent(device) + "/series");
    if (device === selected) drawChart(series);
  } catch (err) {
    document.getElementById("status").textContent = "chart update failed: " + err.message;
  }
}

function tick() {
  pollFleet().then(pollSeries).then(pollDeployments).finally(() => setTimeout(tick, POLL_MS));
}

document.addEventListener("DOMContentLoaded", () => { buildLegend(); tick(); });
