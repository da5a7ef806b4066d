// fedtier trace explorer: draws the JSON views of /api/* for the page the path names.
// Plain JS, no build step, no network beyond this server. Every view marks
// #view[data-ready=1] when drawn (the browser test waits for it).
"use strict";

const view = document.getElementById("view");

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}
const short = (id) => (id && id.length > 12 ? id.slice(0, 12) + "…" : id ?? "");
const link = (kind, id, text, cls) =>
  id === null || id === undefined || id === ""
    ? "—"
    : `<a class="${cls || "id"}" data-kind="${kind}" data-id="${esc(id)}" href="/${kind}/${encodeURIComponent(id)}">${esc(text ?? id)}</a>`;
const vlink = (v) => (v === null || v === undefined ? "—" : link("version", v, "v" + v, "vlink"));
const ms = (x) => (x === null || x === undefined ? "—" : x < 1000 ? `${x.toFixed(1)} ms` : `${(x / 1000).toFixed(2)} s`);
const when = (ns) => (ns ? new Date(ns / 1e6).toISOString().replace("T", " ").replace("Z", "") : "—");
const num = (x) => (x === null || x === undefined ? "—" : esc(x));

function table(headers, rows, id) {
  const head = headers.map((h) => `<th>${esc(h)}</th>`).join("");
  const body = rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("");
  return `<table${id ? ` id="${id}"` : ""}><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function facts(pairs) {
  return `<div class="facts">${pairs
    .map(([k, v, id]) => `<div${id ? ` id="${id}"` : ""}><span>${esc(k)}</span>${v}</div>`)
    .join("")}</div>`;
}

async function api(path) {
  const reply = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}

function done(kind, html) {
  view.innerHTML = html;
  view.dataset.view = kind;
  view.dataset.ready = "1";
}

function refusalRows(rows) {
  return rows.map((r) => [
    esc(when(r.start_unix_ns)),
    esc(r.tier),
    link("instance", r.instance, r.instance),
    r.outcome === "rejected" ? `<span class="bad">${esc(r.outcome)}</span>` : esc(r.outcome),
    esc(r.reason),
    r.quarantined ? '<span class="warn">quarantined</span>' : "",
    r.kind === "update" ? link("update", r.id, short(r.id)) : `<span class="id">${esc(short(r.id))}</span>`,
    link("device", r.device, short(r.device)),
  ]);
}

async function overviewPage() {
  const o = await api("/api/overview");
  let html = `<h1>Overview</h1>` + facts([["spans", num(o.spans)], ["versions", num(o.versions.length)]]);
  html += "<h2>Newest model versions</h2>" + table(
    ["version", "published", "partials", "updates", "flush"],
    o.versions.map((v) => [vlink(v.version), esc(when(v.published_unix_ns)), num(v.input_count), num(v.leaf_count), num(v.flush_reason)]),
    "versions",
  );
  html += "<h2>Daemons</h2>" + table(
    ["service", "instance", "spans"],
    o.instances.map((i) => [esc(i.service), link("instance", i.instance, i.instance), num(i.spans)]),
  );
  html += `<h2>Refused inputs</h2><p><a href="/refusals">over time →</a></p>` + table(
    ["tier", "outcome", "reason", "", "count"],
    o.refused.map((r) => [esc(r.tier), esc(r.outcome), esc(r.reason), r.quarantined ? "quarantined" : "", num(r.count)]),
  );
  html += "<h2>Spans per name</h2>" + table(["span", "count"], Object.entries(o.spans_per_name).map(([k, n]) => [esc(k), num(n)]));
  done("overview", html);
}

function waterfall(rows) {
  const end = Math.max(1, ...rows.map((r) => r.end_ms));
  return `<div class="waterfall" id="waterfall">${rows
    .map((r) => {
      const left = (100 * r.start_ms) / end;
      const width = Math.max(0.3, (100 * (r.end_ms - r.start_ms)) / end);
      return `<div class="wf-row" data-stage="${esc(r.stage)}"><div class="wf-label">${esc(r.stage)} <span class="muted">×${r.count}</span></div>` +
        `<div class="wf-track"><div class="wf-bar" style="left:${left}%;width:${width}%"></div></div>` +
        `<div class="wf-time">${ms(r.start_ms)} → ${ms(r.end_ms)}</div></div>`;
    })
    .join("")}</div>`;
}

function partialTree(partials, updatesById) {
  const upd = (uid) => {
    const u = updatesById[uid] || {};
    const extra = [
      u.device ? `device ${link("device", u.device, short(u.device))}` : "",
      u.staleness !== null && u.staleness !== undefined ? `<span class="tag">τ ${esc(u.staleness)}</span>` : "",
      u.weight !== null && u.weight !== undefined ? `<span class="tag">w ${esc(u.weight)}</span>` : "",
      u.clip_scale !== null && u.clip_scale !== undefined ? `<span class="tag">clip ${esc(u.clip_scale)}</span>` : "",
    ].join(" ");
    return `<li class="update">update ${link("update", uid, short(uid))} ${extra}</li>`;
  };
  const node = (p) => {
    const tags = [
      p.staleness !== null && p.staleness !== undefined ? `<span class="tag">τ ${esc(p.staleness)}</span>` : "",
      p.late ? '<span class="tag late">late</span>' : "",
      p.flush_reason ? `<span class="tag">flush ${esc(p.flush_reason)}</span>` : "",
    ].join("");
    const kids = p.children.map(node).join("") + p.updates.map(upd).join("");
    return `<li class="partial">${esc(p.tier)} partial <span class="id">${esc(short(p.partial_id))}</span> from ` +
      `${link("instance", p.instance, p.instance)} (${num(p.leaf_count)} updates) ${tags}<ul>${kids}</ul></li>`;
  };
  return `<div class="tree" id="tree"><ul>${partials.map(node).join("")}</ul></div>`;
}

async function versionPage(version) {
  const v = await api(`/api/version/${encodeURIComponent(version)}`);
  const byId = Object.fromEntries(v.updates.map((u) => [u.update_id, u]));
  let html = `<h1 id="title" data-version="${v.version}">Model v${esc(v.version)}</h1>`;
  html += `<p>${v.previous !== null ? link("version", v.previous, "← v" + v.previous) : ""} ${v.next !== null ? link("version", v.next, "v" + v.next + " →") : ""}</p>`;
  html += facts([
    ["published", esc(when(v.published_unix_ns))],
    ["updates", `<b id="update-count">${v.updates.length}</b>`],
    ["devices", num(v.devices.length)],
    ["edges", num(v.edges.length)],
    ["flush", num(v.flush_reason)],
    ["first device send → publish", ms(v.time_to_publish_ms)],
    ["staleness", esc(Object.entries(v.staleness_histogram).map(([k, n]) => `τ${k}: ${n}`).join(", ") || "—")],
    ...Object.entries(v.metrics).map(([k, x]) => [k, esc(typeof x === "number" ? x.toFixed(4) : x)]),
  ]);
  html += "<h2>Latency per tier</h2>" + waterfall(v.waterfall);
  html += "<h2>Partials and updates</h2>" + partialTree(v.partials, byId);
  html += "<h2>Updates</h2>" + table(
    ["update", "device", "edge", "base", "staleness", "weight", "clip", "sent", "received"],
    v.updates.map((u) => [
      link("update", u.update_id, short(u.update_id)), link("device", u.device, short(u.device)),
      link("instance", u.edge, u.edge), vlink(u.base_version), num(u.staleness), num(u.weight),
      num(u.clip_scale), ms(u.sent_offset_ms), ms(u.received_offset_ms),
    ]),
    "updates",
  );
  html += `<h2>Late partials</h2>` + (v.late.length
    ? table(["tier", "partial", "at"], v.late.map((l) => [esc(l.tier), `<span class="id">${esc(short(l.id))}</span>`, esc(l.at)]), "late")
    : '<p class="muted" id="late">none</p>');
  html += "<h2>Refused while this version was made</h2>" + (v.refused.counts.length ? "" : '<p class="muted">nothing</p>');
  if (v.refused.counts.length) html += table(
    ["tier", "outcome", "reason", "", "count"],
    v.refused.counts.map((r) => [esc(r.tier), esc(r.outcome), esc(r.reason), r.quarantined ? '<span class="warn">quarantined</span>' : "", num(r.count)]),
    "refused",
  );
  if (v.refused.recent.length) {
    html += table(["when", "tier", "daemon", "outcome", "reason", "", "input", "device"], refusalRows(v.refused.recent.slice(0, 50)));
  }
  done("version", html);
}

async function updatePage(id) {
  const u = await api(`/api/update/${encodeURIComponent(id)}`);
  let html = `<h1 id="title" data-update-id="${esc(u.update_id)}">Update <span class="id">${esc(u.update_id)}</span></h1>`;
  html += facts([
    ["device", link("device", u.device, short(u.device))],
    ["edge", link("instance", u.edge, u.edge)],
    ["model version", u.included ? `<span class="ok" id="included-version">${vlink(u.model_version)}</span>` : '<span class="warn" id="included-version">not in a model</span>'],
    ["device send → last hop", ms(u.total_ms)],
  ]);
  html += `<p id="ends" class="${u.included ? "ok" : "warn"}">${esc(u.ends)}</p>`;
  html += "<h2>Path</h2>" + table(
    ["#", "span", "daemon", "at", "took", "attributes"],
    u.hops.map((h, i) => [
      String(i + 1), esc(h.name), h.tier === "device" ? esc(h.instance) : link("instance", h.instance, h.instance),
      ms(h.offset_ms), ms(h.duration_ms),
      Object.entries(h.attributes).map(([k, x]) => `<code>${esc(k.replace("fedtier.", ""))}=${k === "fedtier.model_version" && h.name.endsWith("publish model") ? vlink(x) : esc(Array.isArray(x) ? x.length + " ids" : x)}</code>`).join(" "),
    ]),
    "hops",
  );
  html += "<h2>Deliveries at the edge</h2>" + table(
    ["when", "tier", "daemon", "outcome", "reason", "", "input", "device"], refusalRows(u.deliveries), "deliveries",
  );
  done("update", html);
}

async function devicePage(id) {
  const d = await api(`/api/device/${encodeURIComponent(id)}`);
  let html = `<h1 id="title" data-device="${esc(d.device)}">Device <span class="id">${esc(d.device)}</span></h1>`;
  html += facts([
    ["updates", num(d.count)],
    ["in a model", num(d.included)],
    ["outcomes", esc(Object.entries(d.outcomes).map(([k, n]) => `${k}: ${n}`).join(", "))],
    ["edges", d.edges.map((e) => link("instance", e, e)).join(", ")],
  ]);
  html += "<h2>Updates over time</h2>" + table(
    ["sent", "update", "base", "edge", "outcome", "staleness", "model version", "where it ends"],
    d.updates.map((u) => [
      esc(when(u.start_unix_ns)), link("update", u.update_id, short(u.update_id)), vlink(u.base_version),
      link("instance", u.edge, u.edge),
      u.outcome === "rejected" ? `<span class="bad">rejected: ${esc(u.reason)}</span>` : esc(u.outcome ?? "—"),
      num(u.staleness), vlink(u.model_version), esc(u.ends),
    ]),
    "device-updates",
  );
  done("device", html);
}

async function instancePage(id) {
  const d = await api(`/api/instance/${encodeURIComponent(id)}`);
  let html = `<h1 id="title">${esc(d.service)} <span class="id">${esc(d.instance)}</span></h1>`;
  html += "<h2>Spans by outcome</h2>" + table(["span", "outcome", "reason", "count"], d.counts.map((c) => [esc(c.name), esc(c.outcome), esc(c.reason), num(c.count)]));
  html += "<h2>Recent partials</h2>" + table(
    ["cut", "partial", "inputs", "updates", "flush", "at version", "took"],
    d.aggregates.map((a) => [esc(when(a.start_unix_ns)), `<span class="id">${esc(short(a.partial_id))}</span>`, num(a.input_count), num(a.leaf_count), num(a.flush_reason), vlink(a.model_version), ms(a.duration_ms)]),
  );
  done("instance", html);
}

async function refusalsPage() {
  const r = await api("/api/refusals");
  const width = r.bucket_ns / 1e9;
  let html = `<h1 id="title">Rejections, duplicates, quarantine and late partials</h1>`;
  html += `<p class="muted">${r.buckets} buckets of ${width < 120 ? width.toFixed(1) + " s" : (width / 60).toFixed(1) + " min"} from ${esc(when(r.start_unix_ns))}</p>`;
  html += table(
    ["tier", "outcome", "reason", "", "total", "over time"],
    r.series.map((s) => {
      const top = Math.max(1, ...s.counts);
      const bars = s.counts.map((n) => `<i title="${n}" style="height:${(100 * n) / top}%"></i>`).join("");
      return [esc(s.tier), esc(s.outcome), esc(s.reason), s.quarantined ? '<span class="warn">quarantined</span>' : "", num(s.total), `<span class="spark">${bars}</span>`];
    }),
    "series",
  );
  html += "<h2>Most recent</h2>" + table(["when", "tier", "daemon", "outcome", "reason", "", "input", "device"], refusalRows(r.recent), "recent");
  done("refusals", html);
}

async function searchPage(q) {
  document.getElementById("search-q").value = q;
  const r = await api(`/api/search?q=${encodeURIComponent(q)}`);
  let html = `<h1 id="title">Search: <code>${esc(q)}</code></h1>`;
  if (!r.hits.length) html += '<p class="muted" id="no-hits">no version, update, partial, device or daemon matches</p>';
  html += `<ul id="hits">${r.hits
    .map((h) => {
      if (h.kind === "version") return `<li>model ${vlink(h.id)}</li>`;
      if (h.kind === "partial") return `<li>${esc(h.tier)} partial <span class="id">${esc(h.id)}</span>: ${h.model_version !== null && h.model_version !== undefined ? "in model " + vlink(h.model_version) : esc(h.ends || "")}</li>`;
      if (h.kind === "instance") return `<li>${esc(h.service)} ${link("instance", h.id, h.id)}</li>`;
      return `<li>${esc(h.kind)} ${link(h.kind, h.id, h.id)}</li>`;
    })
    .join("")}</ul>`;
  done("search", html);
}

async function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  const [page, arg] = parts;
  try {
    if (!page) await overviewPage();
    else if (page === "version") await versionPage(arg);
    else if (page === "update") await updatePage(arg);
    else if (page === "device") await devicePage(arg);
    else if (page === "instance") await instancePage(arg);
    else if (page === "refusals") await refusalsPage();
    else if (page === "search") await searchPage(new URLSearchParams(location.search).get("q") || "");
    else throw new Error(`no page ${location.pathname}`);
    document.title = `${view.querySelector("h1")?.textContent || "overview"} · fedtier`;
  } catch (err) {
    done("error", `<h1>Not found</h1><p class="err" id="error">${esc(err.message)}</p>`);
  }
}

route();
