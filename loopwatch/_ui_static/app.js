// loopwatch live page: polls api/state, draws the blocks, routes, charts and flame graph.
// Plain browser JavaScript, no library and no build step; every value from the server is
// put into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    epoch: "",
    since: -1,
    sincePoint: -1,
    events: [],          // newest first
    rows: new Map(),     // seq -> {row, detail}
    open: new Set(),     // seqs whose stack is shown
    points: [],          // [seq, time, lagMax, utilization, blocks]
    data: null,
    flameCount: -1,
    flame: null,
    view: "user",
    zoom: [],            // labels from the root to the zoomed node
    failures: 0,
    lastOk: 0,
    timer: 0,
  };

  // -- small helpers ------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  function ms(seconds) {
    const v = seconds * 1000;
    if (v >= 10000) return (v / 1000).toFixed(1) + " s";
    if (v >= 1000) return (v / 1000).toFixed(2) + " s";
    if (v >= 10) return Math.round(v) + " ms";
    if (v >= 1) return v.toFixed(1) + " ms";
    return v.toFixed(2) + " ms";
  }

  function split(text) {  // "153 ms" -> ["153", " ms"] for the tiles' small unit
    const i = text.lastIndexOf(" ");
    return i < 0 ? [text, ""] : [text.slice(0, i), text.slice(i)];
  }

  function count(n) { return Math.round(n).toLocaleString("en-US"); }
  function pct(x) { return (x * 100 >= 10 ? Math.round(x * 100) : (x * 100).toFixed(1)) + " %"; }

  function clock(t) {
    const d = new Date(t * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
  }

  function ago(t, now) {
    const s = Math.max(0, now - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  function severity(duration, threshold) {
    if (duration >= threshold * 5) return 3;
    if (duration >= threshold * 2) return 2;
    return 1;
  }

  function method(m) {
    return el("span", { class: m ? "method" : "method none", text: m || "—" });
  }

  function setTile(id, value, sub, level) {
    const tile = $(id);
    const [number, unit] = split(value);
    const v = tile.querySelector(".value");
    v.textContent = number;
    if (unit) v.append(el("small", { text: unit.trim() }));
    tile.querySelector(".sub").textContent = sub || "";
    tile.classList.toggle("alert", level === "alert");
    tile.classList.toggle("warn", level === "warn");
  }

  function pathParts(where) {
    const short = where.short || where.file;
    const cut = short.lastIndexOf("/") + 1;
    return el("span", { class: "path", title: `${where.file}:${where.line}` },
      el("span", { class: "dir", text: short.slice(0, cut) }),
      el("span", { class: "file", text: `${short.slice(cut)}:${where.line}` }));
  }

  // -- polling ------------------------------------------------------------------------------

  function schedule(seconds) {
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, seconds * 1000);
  }

  async function poll() {
    if (document.hidden) {  // nobody looks: ask for nothing until the tab is shown again
      setStatus("paused", "paused while the tab is hidden");
      return;
    }
    const interval = state.data ? state.data.poll_interval : 1;
    try {
      const query = new URLSearchParams({
        epoch: state.epoch, since: String(state.since), since_point: String(state.sincePoint),
      });
      const response = await fetch("api/state?" + query, { cache: "no-store", credentials: "same-origin" });
      if (response.status === 503) { schedule(interval); return; }  // the server is busy: later
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      state.failures = 0;
      state.lastOk = Date.now();
      apply(data);
      setStatus("live");
      if (data.monitoring !== false && data.block_count !== state.flameCount) loadFlame(data.block_count);
      schedule(data.poll_interval || interval);
    } catch (error) {
      state.failures += 1;
      setStatus("offline", `no answer (${error.message}); retrying`);
      schedule(Math.min(interval * 2 ** state.failures, 15));
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });

  function setStatus(kind, text) {
    const status = $("status");
    status.dataset.state = kind;
    if (kind === "live") {
      $("status-text").textContent = "live";
    } else {
      $("status-text").textContent = text;
    }
  }

  setInterval(() => {  // the "updated … ago" text and the ages of the blocks
    if (state.lastOk && $("status").dataset.state === "live") {
      const s = (Date.now() - state.lastOk) / 1000;
      $("status-text").textContent = `live · updated ${s < 1.5 ? "just now" : Math.round(s) + " s ago"}`;
    }
  }, 1000);

  // -- applying one answer ------------------------------------------------------------------

  function apply(data) {
    if (data.monitoring === false && !data.epoch) {
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = data.detail || "loopwatch is not watching this event loop.";
      renderMeta(data);
      return;
    }
    if (data.epoch !== state.epoch) {  // a new monitor (or the first answer): start afresh
      state.epoch = data.epoch;
      state.events = [];
      state.points = [];
      state.open.clear();
      state.rows.clear();
      $("blocks").tBodies[0].replaceChildren();
      state.since = -1;
      state.sincePoint = -1;
      state.flameCount = -1;
    }
    const firstLoad = state.since < 0;
    state.data = data;
    $("banner").hidden = data.monitoring !== false;
    if (data.monitoring === false) $("banner").textContent = "The loop monitor has stopped: what is shown is what it saw.";
    if (data.events.length) {
      state.events = data.events.concat(state.events).slice(0, data.config.max_events);
      state.since = Math.max(state.since, data.events[0].seq);
    }
    if (data.points.length) {
      state.points = state.points.concat(data.points).slice(-data.history_seconds);
      state.sincePoint = state.points[state.points.length - 1][0];
    }
    renderMeta(data);
    renderTiles(data);
    renderBlocks(data, firstLoad ? new Set() : new Set(data.events.map((e) => e.seq)));
    renderRoutes(data);
    renderCharts(data);
    renderFooter(data);
  }

  function renderMeta(data) {
    const meta = $("meta");
    const pill = (label, value, title) => el("span", { class: "pill", title }, label, el("b", { text: value }));
    const parts = [pill("pid ", String(data.pid), "the process that served this page")];
    if (data.loop) parts.push(pill("", data.loop, "the event loop"));
    if (data.config) {
      parts.push(pill("threshold ", ms(data.config.block_threshold), "a step at least this long is a block"));
      parts.push(pill("hot path ", data.hot_path === "c" ? "C" : "Python", "loopwatch's per-step code"));
    }
    meta.replaceChildren(...parts);
  }

  function renderTiles(data) {
    const now = state.points.length ? state.points[state.points.length - 1][1] : Date.now() / 1000;
    const recent = (seconds) => state.points.filter((p) => p[1] > now - seconds);
    const lastMinute = recent(60);
    const blocksMinute = lastMinute.reduce((sum, p) => sum + p[4], 0);
    setTile("tile-blocks", count(data.block_count),
      `${count(blocksMinute)} in the last minute`, blocksMinute ? "alert" : null);

    let worst = null;
    for (const e of state.events) if (!worst || e.duration > worst.duration) worst = e;
    if (worst) {
      setTile("tile-worst", ms(worst.duration),
        worst.route ? `${worst.method ? worst.method + " " : ""}${worst.route}` : "outside any request",
        severity(worst.duration, data.config.block_threshold) >= 2 ? "alert" : "warn");
    } else {
      setTile("tile-worst", "none", "no block in memory yet");
    }

    const lag = lastMinute.reduce((m, p) => Math.max(m, p[2]), 0);
    setTile("tile-lag", lastMinute.length ? ms(lag) : "–",
      `block threshold ${ms(data.config.block_threshold)}`,
      lag >= data.config.block_threshold ? "alert" : null);

    const last10 = recent(10);
    const util = last10.length ? last10.reduce((s, p) => s + p[3], 0) / last10.length : 0;
    const utilMinute = lastMinute.length ? lastMinute.reduce((s, p) => s + p[3], 0) / lastMinute.length : 0;
    setTile("tile-util", last10.length ? pct(util) : "–",
      lastMinute.length ? `last minute ${pct(utilMinute)}` : "gathering…", util >= 0.8 ? "warn" : null);

    const rows = data.routes.rows;
    const requests = rows.reduce((s, r) => s + r.requests, 0);
    const who = data.routes.all_workers ? "all workers" : "this process";
    setTile("tile-requests", count(requests), `${rows.length} route${rows.length === 1 ? "" : "s"} · ${who}`);
  }

  // -- recent blocks ------------------------------------------------------------------------

  function renderBlocks(data, fresh) {
    const body = $("blocks").tBodies[0];
    const threshold = data.config.block_threshold;
    $("threshold-text").textContent = ms(threshold);
    $("blocks-empty").hidden = state.events.length > 0;
    $("blocks-aside").textContent =
      `newest first · ${state.events.length} of ${count(data.block_count)} since start · click one for its stack`;
    const longest = state.events.reduce((m, e) => Math.max(m, e.duration), threshold);
    const now = state.points.length ? state.points[state.points.length - 1][1] : Date.now() / 1000;
    const wanted = new Set(state.events.map((e) => e.seq));
    for (const [seq, entry] of state.rows) {  // fell off the list
      if (!wanted.has(seq)) {
        entry.row.remove();
        entry.detail.remove();
        state.rows.delete(seq);
        state.open.delete(seq);
      }
    }
    let previous = null;
    for (const event of state.events) {
      let entry = state.rows.get(event.seq);
      if (!entry) {
        entry = blockRow(event, threshold);
        state.rows.set(event.seq, entry);
        if (fresh.has(event.seq)) entry.row.classList.add("fresh");
        if (previous) previous.detail.after(entry.row, entry.detail);
        else body.prepend(entry.row, entry.detail);
      }
      entry.ago.textContent = ago(event.time, now);
      entry.bar.style.width = Math.max(3, (event.duration / longest) * 100) + "%";
      previous = entry;
    }
  }

  function blockRow(event, threshold) {
    const sev = severity(event.duration, threshold);
    const agoText = el("span", { class: "ago" });
    const bar = el("i");
    const where = el("td", { class: "where" });
    if (event.where) {
      where.append(pathParts(event.where), " in ", el("span", { class: "fn", text: event.where.function }));
    } else {
      where.append(el("span", { class: "nostack", text: event.route === "<gc>" ? "the garbage collector" : `no stack: ${event.stack_status}` }));
    }
    if (event.hint) where.append(el("div", { class: "hint", text: event.hint }));
    const row = el("tr", { class: "row", "data-seq": event.seq, tabindex: "0", "aria-expanded": "false" },
      el("td", { class: "time" }, el("span", { class: "chev", text: "▸" }), " ",
        el("span", { class: "clock", text: clock(event.time) }), agoText),
      el("td", { class: "num" }, el("span", { class: `dur sev-${sev}` },
        el("b", { text: ms(event.duration) }), el("span", { class: "track" }, bar))),
      el("td", { class: "req" }, method(event.method), el("span", { class: "route", text: event.route || "no request" })),
      where,
      el("td", { class: "task", text: event.task || "—" }));
    const detail = el("tr", { class: "detail", hidden: true }, el("td", { colspan: "5" }));
    const toggle = () => toggleStack(event, row, detail);
    row.addEventListener("click", toggle);
    row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } });
    return { row, detail, ago: agoText, bar };
  }

  async function toggleStack(event, row, detail) {
    const cell = detail.firstChild;
    if (state.open.has(event.seq)) {
      state.open.delete(event.seq);
      detail.hidden = true;
      row.classList.remove("open");
      row.setAttribute("aria-expanded", "false");
      return;
    }
    state.open.add(event.seq);
    row.classList.add("open");
    row.setAttribute("aria-expanded", "true");
    detail.hidden = false;
    if (cell.dataset.loaded) return;
    cell.replaceChildren(el("div", { class: "stack-meta", text: "loading the stack…" }));
    try {
      const query = new URLSearchParams({ seq: String(event.seq), epoch: state.epoch });
      const response = await fetch("api/event?" + query, { cache: "no-store", credentials: "same-origin" });
      if (response.status === 404) {
        cell.replaceChildren(el("div", { class: "stack-meta", text: "This block is no longer in the monitor's memory (ring_size)." }));
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      cell.replaceChildren(...stackView(await response.json()));
      cell.dataset.loaded = "1";
    } catch (error) {
      cell.replaceChildren(el("div", { class: "stack-meta", text: `Could not load the stack: ${error.message}` }));
    }
  }

  function stackView(event) {
    const facts = [
      `${ms(event.duration)} ${event.timed ? "measured around the step" : "seen by the lag probe (a lower bound: this code was not timed)"}`,
      `stack: ${event.stack_status}`,
    ];
    if (event.gc_seconds) facts.push(`garbage collector: ${ms(event.gc_seconds)}`);
    if (event.task) facts.push(`task ${event.task}`);
    const out = [el("div", { class: "stack-meta", text: facts.join(" · ") })];
    if (!event.frames.length) {
      out.push(el("div", { class: "stack-meta", text: "No stack was sampled for this block." }));
      return out;
    }
    const list = el("ol", { class: "stack", start: "1" });
    let blockingMarked = false;
    for (const frame of event.frames) {
      const blocking = !blockingMarked && event.where && frame.file === event.where.file && frame.line === event.where.line;
      if (blocking) blockingMarked = true;
      list.append(el("li", { class: `${frame.lib ? "lib" : "user"}${blocking ? " blocking" : ""}`, title: `${frame.file}:${frame.line}` },
        el("span", { text: `${frame.short}:${frame.line}` }), " in ", el("span", { class: "fn", text: frame.function })));
    }
    out.push(el("div", { class: "stack-meta", text: "innermost frame first; library and server frames in grey" }), list);
    return out;
  }

  // -- routes -------------------------------------------------------------------------------

  function renderRoutes(data) {
    const table = data.routes;
    const body = $("routes").tBodies[0];
    $("routes-empty").hidden = table.rows.length > 0;
    const who = table.all_workers ? `all workers (${data.workers.length} live)` : "this process";
    $("routes-aside").textContent =
      `${who} · loop time held: each request's own task steps · most loop time first` +
      (table.more ? ` · ${table.more} more not shown` : "");
    const top = table.rows.reduce((m, r) => Math.max(m, r.share), 0) || 1;
    body.replaceChildren(...table.rows.map((r) => {
      const worst = r.worst !== null ? el("span", { text: ms(r.worst) })
        : r.worst_range ? el("span", { class: "approx", title: "the worst block was in another worker: its histogram bucket",
          text: r.worst_range[1] === null ? `> ${ms(r.worst_range[0])}` : `${ms(r.worst_range[0])}–${ms(r.worst_range[1])}` })
        : el("span", { class: "approx", text: "—" });
      const track = el("span", { class: "track" }, el("i"));
      track.firstChild.style.width = Math.min(100, (r.share / top) * 100) + "%";
      return el("tr", { class: r.blocks || r.share >= 0.01 ? "" : "quiet", "data-route": r.route, "data-method": r.method },
        el("td", {}, method(r.method === "<none>" ? "" : r.method),
          el("span", { class: "route", text: r.route === "<none>" ? "outside any request" : r.route })),
        el("td", { class: "num", text: count(r.requests) }),
        el("td", { class: "num", text: count(r.blocks) }),
        el("td", { class: "num", text: ms(r.blocking_seconds) }),
        el("td", { class: "num" }, worst),
        el("td", { class: "share" }, el("span", { class: "share-cell" }, track, el("span", { text: pct(Math.min(r.share, 1)) }))));
    }));
  }

  // -- charts -------------------------------------------------------------------------------

  function niceStep(max, ticks) {
    const raw = max / ticks;
    const power = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * power) return m * power;
    return 10 * power;
  }

  function drawChart(container, opts) {
    const width = container.clientWidth;
    const height = container.clientHeight;
    if (!width || !height) return;
    const pad = { left: 46, right: 10, top: 10, bottom: 20 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    const points = state.points;
    const end = points.length ? points[points.length - 1][1] : Date.now() / 1000;
    // The window grows with the history, from 2 minutes up to all that is kept.
    const age = points.length ? end - points[0][1] : 0;
    const span = Math.min(state.data.history_seconds, Math.max(120, Math.ceil(age / 60) * 60));
    const start = end - span;
    const x = (t) => pad.left + ((t - start) / (end - start)) * w;
    const top = opts.top;
    const y = (v) => pad.top + h - (Math.min(v, top) / top) * h;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label });
    const step = niceStep(top, 3);
    for (let v = 0; v <= top + 1e-9; v += step) {
      root.append(svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v) }));
      const label = svg("text", { class: "axis", x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = opts.format(v);
      root.append(label);
    }
    const minutes = span / 60;
    const every = minutes <= 5 ? 1 : minutes <= 15 ? 2 : minutes <= 30 ? 5 : 10;
    for (let m = 0; m <= minutes; m += every) {
      const label = svg("text", { class: "axis", x: x(end - m * 60), y: height - 4, "text-anchor": m === 0 ? "end" : "middle" });
      label.textContent = m === 0 ? "now" : `−${m} min`;
      root.append(label);
    }
    if (opts.threshold !== undefined) {
      root.append(svg("line", { class: "threshold", x1: pad.left, x2: width - pad.right, y1: y(opts.threshold), y2: y(opts.threshold) }));
      const label = svg("text", { class: "threshold-label", x: pad.left + 4, y: y(opts.threshold) - 4 });
      label.textContent = "block threshold";
      root.append(label);
    }
    const visible = points.filter((p) => p[1] >= start);
    if (visible.length) {
      let line = "";
      for (const p of visible) line += `${line ? "L" : "M"}${x(p[1]).toFixed(1)},${y(opts.value(p)).toFixed(1)}`;
      const first = x(visible[0][1]).toFixed(1);
      const last = x(visible[visible.length - 1][1]).toFixed(1);
      root.append(svg("path", { class: "area", d: `${line}L${last},${y(0)}L${first},${y(0)}Z` }));
      root.append(svg("path", { class: "line", d: line }));
      if (opts.marks) {
        for (const p of visible) {
          if (p[4] > 0) root.append(svg("rect", { class: "mark", x: x(p[1]) - 1.5, y: pad.top + h + 1, width: 3, height: 5 }));
        }
      }
    }
    const cursor = svg("line", { class: "cursor", y1: pad.top, y2: pad.top + h, visibility: "hidden" });
    root.append(cursor);
    const tip = el("div", { class: "tip", hidden: true });
    root.addEventListener("mousemove", (e) => {
      if (!visible.length) return;
      const box = root.getBoundingClientRect();
      const t = start + ((e.clientX - box.left - pad.left) / w) * (end - start);
      let best = visible[0];
      for (const p of visible) if (Math.abs(p[1] - t) < Math.abs(best[1] - t)) best = p;
      cursor.setAttribute("x1", x(best[1]));
      cursor.setAttribute("x2", x(best[1]));
      cursor.setAttribute("visibility", "visible");
      tip.hidden = false;
      tip.textContent = `${clock(best[1]).slice(0, 8)} · ${opts.describe(best)}`;
      tip.style.left = x(best[1]) + "px";
    });
    root.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; });
    container.replaceChildren(root, tip);
  }

  function renderCharts(data) {
    const threshold = data.config.block_threshold;
    const lagMax = state.points.reduce((m, p) => Math.max(m, p[2]), 0);
    const top = niceStep(Math.max(lagMax, threshold * 1.2) * 1.1, 4) * 4;
    drawChart($("chart-lag"), {
      label: "loop lag per second", top, threshold, marks: true,
      value: (p) => p[2], format: (v) => (v === 0 ? "0" : ms(v)),
      describe: (p) => `max lag ${ms(p[2])}${p[4] ? ` · ${p[4]} block${p[4] > 1 ? "s" : ""}` : ""}`,
    });
    drawChart($("chart-util"), {
      label: "loop utilization per second", top: 1, marks: false,
      value: (p) => p[3], format: (v) => Math.round(v * 100) + " %",
      describe: (p) => `utilization ${pct(p[3])}`,
    });
  }

  // -- flame graph --------------------------------------------------------------------------

  async function loadFlame(blockCount) {
    try {
      const response = await fetch("api/flame", { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) return;  // the next poll asks again
      const data = await response.json();
      state.flame = {
        events: data.events,
        user: buildTree(data.nodes.slice(0, data.user_nodes)),
        all: buildTree(data.nodes.slice(data.user_nodes)),
      };
      state.flameCount = blockCount;
      renderFlame();
    } catch (error) {
      // the next poll asks again
    }
  }

  // The server sends each tree flat, in preorder: [depth, label, ms, library].
  function buildTree(nodes) {
    if (!nodes.length) return null;
    const make = ([, n, v, l]) => ({ n, v, l: l === 1, c: [] });
    const root = make(nodes[0]);
    const path = [root];
    for (let i = 1; i < nodes.length; i++) {
      const node = make(nodes[i]);
      path.length = nodes[i][0];
      path[path.length - 1].c.push(node);
      path.push(node);
    }
    return root;
  }

  function flameColor(name) {
    let hash = 0;
    for (let i = 0; i < name.length; i++) hash = (hash * 31 + name.charCodeAt(i)) | 0;
    const hue = 12 + (Math.abs(hash) % 34);
    const light = 62 + (Math.abs(hash >> 8) % 12);
    return `hsl(${hue} 88% ${light}%)`;
  }

  function selfTime(node) {
    return node.v - node.c.reduce((s, c) => s + c.v, 0);
  }

  function hottestOf(root) {  // the frame with the most blocked time of its own
    let best = null;
    const walk = (node, depth) => {
      if (depth >= 2 && (!best || selfTime(node) > selfTime(best.node))) best = { node, depth };
      for (const child of node.c) walk(child, depth + 1);
    };
    walk(root, 0);
    return best && selfTime(best.node) > 0 ? best.node : null;
  }

  function renderFlame() {
    const container = $("flame");
    const info = $("flame-info");
    const data = state.flame;
    const root = data && (state.view === "user" ? data.user : data.all);
    if (!root || !root.v) {
      container.replaceChildren(el("p", { class: "empty", text: "No blocks in memory yet: the flame graph fills in as they happen." }));
      $("hottest").replaceChildren();
      container.style.height = "";
      return;
    }
    $("flame-aside").textContent =
      `the sampled stacks of the ${data.events} block${data.events === 1 ? "" : "s"} in memory, weighted by blocked time (${ms(root.v / 1000)})`;
    const hot = hottestOf(root);
    const hottest = $("hottest");
    if (hot) {
      hottest.replaceChildren(el("span", { class: "label", text: "Hottest blocking call" }),
        el("code", { text: hot.n }), ` — ${ms(selfTime(hot) / 1000)}, ${pct(selfTime(hot) / root.v)} of the blocked time`);
    } else {
      hottest.replaceChildren();
    }
    // Follow the zoom path as far as it still exists in the new tree.
    const chain = [root];
    for (const name of state.zoom) {
      const next = chain[chain.length - 1].c.find((c) => c.n === name);
      if (!next) break;
      chain.push(next);
    }
    state.zoom = chain.slice(1).map((n) => n.n);
    const focus = chain[chain.length - 1];
    const width = container.clientWidth || 1000;
    const rowHeight = 22;
    const nodes = [];
    chain.forEach((node, depth) => nodes.push({ node, depth, x: 0, w: 1, ancestor: chain.length > 1 }));
    const place = (node, depth, x, w) => {
      let offset = x;
      for (const child of node.c) {
        const cw = (child.v / node.v) * w;
        if (cw * width >= 2) {
          nodes.push({ node: child, depth, x: offset, w: cw, ancestor: false });
          place(child, depth + 1, offset, cw);
        }
        offset += cw;
      }
    };
    place(focus, chain.length, 0, 1);
    const depth = nodes.reduce((m, n) => Math.max(m, n.depth), 0) + 1;
    const elements = [];
    for (const item of nodes) {
      const n = item.node;
      if (item.depth === 0) continue;  // "all": the card is the root
      const kind = item.depth === 1 ? "request" : n.n.startsWith("<no stack") ? "nostack" : n.l ? "lib" : "user";
      const div = el("div", {
        class: `node ${kind}${item.ancestor ? " ancestor" : ""}${n === hot ? " hot" : ""}`,
        "data-name": n.n, "data-ms": String(n.v), text: n.n,
      });
      div.style.left = (item.x * 100) + "%";
      div.style.width = (item.w * 100) + "%";
      div.style.top = (item.depth - 1) * rowHeight + "px";
      if (kind === "user") div.style.background = flameColor(n.n);
      div.addEventListener("mouseenter", () => {
        info.replaceChildren(el("code", { text: n.n }),
          ` — ${ms(n.v / 1000)} blocked (${pct(n.v / root.v)} of all), ${ms(selfTime(n) / 1000)} in this frame itself`);
      });
      div.addEventListener("click", () => {
        // A frame of the zoomed path: back out to it (the focused one: one level up).
        if (item.ancestor) state.zoom = state.zoom.slice(0, item.depth === chain.length - 1 ? item.depth - 1 : item.depth);
        else state.zoom = pathTo(root, n);
        renderFlame();
      });
      elements.push(div);
    }
    container.style.height = (depth - 1) * rowHeight + "px";
    container.replaceChildren(...elements);
  }

  function pathTo(root, target) {
    const walk = (node, path) => {
      if (node === target) return path;
      for (const child of node.c) {
        const found = walk(child, path.concat(child.n));
        if (found) return found;
      }
      return null;
    };
    return walk(root, []) || [];
  }

  for (const [id, view] of [["view-user", "user"], ["view-all", "all"]]) {
    $(id).addEventListener("click", () => {
      state.view = view;
      state.zoom = [];
      $("view-user").setAttribute("aria-pressed", String(view === "user"));
      $("view-all").setAttribute("aria-pressed", String(view === "all"));
      renderFlame();
    });
  }

  // -- footer -------------------------------------------------------------------------------

  function renderFooter(data) {
    const footer = $("footer");
    const parts = [];
    if (data.routes && data.routes.all_workers) {
      parts.push(`Served by worker pid ${data.pid}, one of ${data.workers.length} live workers (pids ${data.workers.join(", ")}). `,
        "The blocks, charts and flame graph are this worker's; the route table adds up all workers (",
        el("code", { text: "PROMETHEUS_MULTIPROC_DIR" }), ", as ", el("code", { text: "/metrics" }), " does).");
    } else {
      parts.push(`Served by process pid ${data.pid}: everything on this page is this process's. `,
        "Under several workers (gunicorn, uvicorn --workers) each one serves its own page; set ",
        el("code", { text: "PROMETHEUS_MULTIPROC_DIR" }),
        " to add every worker's requests and blocks to the route table and to the metrics.");
    }
    parts.push(` Updated every ${data.poll_interval} s while this tab is visible; ${data.config.ring_size} blocks and ${Math.round(data.history_seconds / 60)} minutes of history are kept in memory.`);
    footer.replaceChildren(...parts);
  }

  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (state.data && state.data.config) renderCharts(state.data);
      renderFlame();
    }, 150);
  });

  poll();
})();
