// The Standby dashboard: polls the JSON API (the documents `status --json` and
// `points --json` print), draws the RPO chart and the points timeline as inline SVG, and
// starts test failovers and their cleanup with POSTs that carry this server's CSRF token.
// Every value is put into the page as text, never as markup.
"use strict";

const CSRF = document.querySelector('meta[name="standby-csrf"]').content;
const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const KINDS = ["initial", "crash-consistent", "app-consistent"];
let selected = null;
let lastPointsKey = "";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

function bytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, x = n;
  while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
  return (i === 0 ? x : x.toFixed(1)) + " " + u[i];
}

function seconds(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.error) || (r.status + " " + r.statusText));
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Standby-CSRF": CSRF },
    body: JSON.stringify(body || {}),
  });
}

function renderVms(vms) {
  const tbody = $("vm-table").tBodies[0];
  tbody.replaceChildren();
  $("no-vms").hidden = vms.length > 0;
  if (selected === null && vms.length > 0) selected = vms[0].vm;
  for (const v of vms) {
    if (v.error) {
      tbody.append(el("tr", { "data-vm": v.vm, class: "unknown" }, el("td", {}, v.vm),
        el("td", { class: "error wrap", colspan: "6" }, v.error)));
      continue;
    }
    const tr = el("tr", { "data-vm": v.vm, class: v.vm === selected ? "selected" : "" },
      el("td", {}, v.vm),
      el("td", { class: "state" }, v.state),
      el("td", {}, el("span", { class: "badge " + v.health }, v.health)),
      el("td", { class: "rpo" }, seconds(v.rpo_seconds)),
      el("td", {}, v.backlog_records + " records, " + bytes(v.backlog_bytes)),
      el("td", { class: "points" }, v.points),
      el("td", {}, v.last_point ? v.last_point.time + " (" + v.last_point.kind + ")" : "none"));
    tr.addEventListener("click", () => { selected = v.vm; lastPointsKey = ""; refresh(); });
    tbody.append(tr);
  }
}

function renderDetail(v) {
  $("vm-detail").hidden = false;
  $("vm-detail").dataset.vm = v.vm;
  $("vm-title").textContent = v.vm + " — " + v.state + ", " + v.health +
    ", target " + v.target.resource_group + " / " + v.target.network;
  $("vm-reasons").textContent = (v.reasons || []).join("; ");
  const tbody = $("disk-table").tBodies[0];
  tbody.replaceChildren();
  for (const d of v.disks) {
    tbody.append(el("tr", { "data-disk": d.name },
      el("td", {}, d.name), el("td", {}, bytes(d.size_bytes)),
      el("td", {}, bytes(d.replicated_bytes)), el("td", { class: "wrap" }, d.source)));
  }
}

function renderRpo(history, threshold, current) {
  const W = 600, H = 180, L = 48, B = 22, T = 8, R = 8;
  const box = $("rpo-chart");
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "RPO over the last hour" });
  const now = Date.now() * 1000, t0 = now - 3600e6;
  const pts = history.samples.filter((p) => p.rpo_seconds != null);
  const maxRpo = Math.max(threshold || 0, ...pts.map((p) => p.rpo_seconds), 1);
  const x = (t) => L + (W - L - R) * Math.max(0, (t - t0)) / 3600e6;
  const y = (r) => H - B - (H - B - T) * r / maxRpo;
  s.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  s.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  s.append(svg("text", { x: 2, y: T + 10 }, seconds(maxRpo)));
  s.append(svg("text", { x: 2, y: H - B }, "0"));
  s.append(svg("text", { x: L, y: H - 6 }, "−60 min"));
  s.append(svg("text", { x: W - R - 30, y: H - 6 }, "now"));
  s.append(svg("text", { x: W - R, y: T + 24, "text-anchor": "end" }, "RPO now " + seconds(current) +
    (threshold ? " · alert at " + seconds(threshold) : "")));
  if (threshold) {
    s.append(svg("line", { class: "threshold", x1: L, x2: W - R, y1: y(threshold), y2: y(threshold) }));
  }
  if (pts.length > 0) {
    const d = pts.map((p) => `${x(p.time_us).toFixed(1)},${y(p.rpo_seconds).toFixed(1)}`).join(" ");
    s.append(svg("polyline", { class: "rpo", points: d }));
    const last = pts[pts.length - 1];
    s.append(svg("circle", { class: "rpo-now", cx: x(last.time_us), cy: y(last.rpo_seconds), r: 3 }));
  }
  s.dataset.samples = String(history.samples.length);
  box.replaceChildren(s);
}

function renderPoints(vm, doc) {
  const points = doc.points;
  const W = 1200, H = 34 + 26 * KINDS.length, L = 130, R = 12;
  const box = $("points-timeline");
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "recovery points by kind" });
  const times = points.map((p) => Date.parse(p.time));
  const t0 = Math.min(...times, Date.now() - 60e3), t1 = Math.max(Date.now(), ...times);
  const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1, t1 - t0);
  KINDS.forEach((k, i) => {
    const yy = 18 + 26 * i;
    s.append(svg("text", { x: 4, y: yy + 4 }, k));
    s.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: yy, y2: yy }));
  });
  points.forEach((p, i) => {
    const row = Math.max(0, KINDS.indexOf(p.kind));
    const c = svg("circle", { class: p.kind, cx: x(times[i]), cy: 18 + 26 * row, r: 5, "data-point-id": p.id });
    c.append(svg("title", {}, `point ${p.id} · ${p.kind} · ${p.time}` + (p.name ? ` · ${p.name}` : "")));
    s.append(c);
  });
  s.append(svg("text", { x: L, y: H - 4 }, new Date(t0).toISOString().replace(".000", "")));
  s.append(svg("text", { x: W - R - 130, y: H - 4 }, new Date(t1).toISOString().replace(/\.\d+/, "")));
  box.replaceChildren(s);

  const tbody = $("points-table").tBodies[0];
  tbody.replaceChildren();
  for (const p of points.slice().reverse()) {
    tbody.append(el("tr", { "data-point-id": p.id },
      el("td", {}, p.id), el("td", {}, p.time), el("td", {}, p.kind), el("td", {}, p.seq),
      el("td", {}, bytes(p.bytes)),
      el("td", {}, (p.name || "") + (p.readable === false ? " [unreadable: " + p.damage + "]" : ""))));
  }

  // The point choices change only when the points do: keep what the user picked.
  const key = vm + ":" + points.map((p) => p.id).join(",");
  if (key !== lastPointsKey) {
    lastPointsKey = key;
    const sel = $("tf-point");
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "latest-processed" }, "latest processed"),
      el("option", { value: "latest" }, "latest (process pending first)"));
    for (const p of points.slice().reverse()) {
      sel.append(el("option", { value: String(p.id) }, `point ${p.id} · ${p.kind} · ${p.time}` + (p.name ? ` · ${p.name}` : "")));
    }
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }
}

// `up` is the status document's test failover (the one the table shows), the job the
// newest action's.
function renderTestFailover(tf, up) {
  const job = tf.job;
  const running = job && job.state === "running";
  const cur = $("tf-current");
  if (up) {
    cur.textContent = `Test failover up: ${up.point != null ? "point " + up.point : "seq " + up.seq}` +
      ` in ${up.dir}, network ${up.network}`;
    cur.dataset.point = up.point == null ? "" : String(up.point);
    cur.dataset.up = "true";
  } else {
    cur.textContent = "No test failover is up.";
    cur.dataset.point = "";
    cur.dataset.up = "false";
  }
  $("tf-start").disabled = Boolean(running || up);
  $("tf-cleanup").disabled = Boolean(running || !up);
  const st = $("tf-status");
  if (!job) {
    st.textContent = "";
    st.dataset.state = "";
    return;
  }
  st.dataset.state = job.state;
  st.dataset.action = job.action;
  let text = `${job.action}${job.point ? " to " + job.point : ""}: ${job.state}`;
  if (running && job.progress.total_bytes > 0) {
    text += ` — ${job.progress.label} ${bytes(job.progress.done_bytes)} of ${bytes(job.progress.total_bytes)}`;
  }
  if (job.error) text += ` — ${job.error}`;
  if (job.result && job.result.domain_xml) text += ` — libvirt domain ${job.result.domain_xml}`;
  st.textContent = text;
  st.className = job.state === "failed" ? "error" : "muted";
}

function renderEvents(events) {
  const ol = $("events");
  ol.replaceChildren();
  for (const e of events.slice().reverse().slice(0, 100)) {
    ol.append(el("li", { class: e.kind, "data-kind": e.kind },
      el("span", { class: "kind" }, e.kind), " ", el("span", { class: "muted" }, e.time), " ", e.message));
  }
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const all = await api("/api/vms");
    renderVms(all.vms);
    const v = all.vms.find((x) => x.vm === selected && !x.error);
    if (v) {
      const enc = encodeURIComponent(v.vm);
      const [points, rpo, tf] = await Promise.all([
        api(`/api/vms/${enc}/points`), api(`/api/vms/${enc}/rpo`), api(`/api/vms/${enc}/test-failover`)]);
      renderDetail(v);
      renderRpo(rpo, v.rpo_threshold_seconds, v.rpo_seconds);
      renderPoints(v.vm, points);
      renderTestFailover(tf, v.test_failover);
    } else {
      $("vm-detail").hidden = true;
    }
    renderEvents((await api("/api/events")).events);
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
    $("load-error").hidden = true;
  } catch (e) {
    $("load-error").textContent = String(e.message || e);
    $("load-error").hidden = false;
  } finally {
    refreshing = false;
  }
}

async function act(run) {
  $("tf-start").disabled = true;
  $("tf-cleanup").disabled = true;
  try {
    await run();
  } catch (e) {
    $("tf-status").textContent = String(e.message || e);
    $("tf-status").className = "error";
    $("tf-status").dataset.state = "refused";
  }
  refresh();
}

$("tf-start").addEventListener("click", () => act(() =>
  post(`/api/vms/${encodeURIComponent(selected)}/test-failover`, { point: $("tf-point").value })));
$("tf-cleanup").addEventListener("click", () => act(() =>
  post(`/api/vms/${encodeURIComponent(selected)}/test-failover-cleanup`, {})));

refresh();
setInterval(refresh, POLL_MS);
