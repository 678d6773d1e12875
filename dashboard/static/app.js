// gpuheal dashboard: one page, fed by /api/stream (server-sent events), charts by uPlot.
// Everything from the wire goes into the page as text (textContent), never as HTML.
"use strict";
(() => {
  const HOUR_S = 3600;
  const MAX_POINTS = 4000;
  const MAX_LOG = 100;
  const SEVERE = new Set(["critical", "emergency"]);

  const gpus = new Map();        // "host/index" -> State (+ stale)
  const hostInfo = new Map();    // host -> {components: {name: {value, reason}}, healer}
  const needsPerson = new Set(); // event ids the healer handed to a person
  const actions = new Map();     // action_id -> {latest message, why, first_ts}
  const cards = new Map();       // "host/index" -> card DOM refs and chart data
  const hostBoxes = new Map();   // host -> host DOM refs
  let token = sessionStorage.getItem("gpuheal-token");
  let bannerKey = "";
  let logDirty = false;

  const $ = (sel) => document.querySelector(sel);
  const keyOf = (host, index) => `${host}/${index}`;
  const fmt = (v, unit, digits = 0) => (v == null ? "–" : `${Number(v).toFixed(digits)}${unit}`);
  const clock = (ts) => new Date(ts * 1000).toLocaleTimeString();
  const pct = (mb, total) => (mb == null || !total ? null : (100 * mb) / total);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }

  let noticeTimer = null;
  function notify(text, error = false) {
    const box = $("#notice");
    box.textContent = text;
    box.className = error ? "notice error" : "notice";
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.textContent = ""; }, error ? 15000 : 4000);
  }

  // --- writes --------------------------------------------------------------------------
  async function post(path, body) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = `Bearer ${token}`;
      let r;
      try {
        r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
      } catch (e) {
        notify(`not sent: ${e}`, true);
        return false;
      }
      if (r.ok) {
        notify("sent to the healer");
        return true;
      }
      if (r.status === 401) {
        token = null;
        sessionStorage.removeItem("gpuheal-token");
        const given = attempt === 0 &&
          window.prompt("This dashboard needs its token for changes (GPUHEAL_DASHBOARD_TOKEN):");
        if (given) {
          token = given;
          sessionStorage.setItem("gpuheal-token", given);
          continue;
        }
      }
      const err = await r.json().catch(() => ({}));
      notify(`not sent: ${err.error || r.statusText}`, true);
      return false;
    }
    return false;
  }

  // --- GPU cards -------------------------------------------------------------------------
  function card(host, index) {
    const key = keyOf(host, index);
    let c = cards.get(key);
    if (c) return c;
    const root = el("article", "card");
    root.dataset.key = key;
    const head = el("header");
    const name = el("h3", "name");
    const badge = el("span", "badge");
    head.append(name, badge);
    const where = el("div", "where");
    const readings = el("dl", "readings");
    const cell = (label) => {
      const box = el("div");
      const dd = el("dd");
      const sub = el("small");
      box.append(el("dt", null, label), dd, sub);
      readings.append(box);
      return { dd, sub };
    };
    const temp = cell("Temperature");
    const util = cell("Utilization");
    const mem = cell("Memory");
    const power = cell("Power");
    const conds = el("ul", "conditions");
    const chartBox = el("div", "chart");
    const note = el("div", "note");
    chartBox.append(note);
    root.append(head, where, readings, conds, chartBox);
    c = { root, name, badge, where, temp, util, mem, power, conds, chartBox, note,
          plot: null, data: [[], [], [], [], []], dirty: false, memTotal: null };
    cards.set(key, c);
    const main = $("#gpus");
    const after = [...cards.keys()].filter((k) => k !== key && cardOrder(k) > cardOrder(key))
      .sort((a, b) => (cardOrder(a) < cardOrder(b) ? -1 : 1))[0];
    main.insertBefore(root, after ? cards.get(after).root : null);
    $("#no-gpus").hidden = true;
    loadHistory(host, index, c);
    return c;
  }

  function cardOrder(key) {
    const [host, index] = key.split("/");
    return `${host}\u0000${index.padStart(6, "0")}`;
  }

  function renderGpu(s) {
    const c = card(s.host, s.index);
    c.memTotal = s.memory.total_mb;
    c.root.className = `card health-${s.health}${s.stale ? " stale" : ""}`;
    c.name.textContent = s.name || `GPU ${s.index}`;
    c.badge.textContent = s.stale ? `${s.health} · stale` : s.health;
    c.badge.className = `badge health-${s.health}${s.stale ? " stale" : ""}`;
    c.where.textContent = `${s.host} · GPU ${s.index}${s.uuid ? ` · ${s.uuid}` : ""}` +
      ` · ${new Date(s.ts * 1000).toLocaleString()}`;
    const gib = (mb) => (mb == null ? null : mb / 1024);
    c.temp.dd.textContent = fmt(s.temperature, " °C");
    c.temp.sub.textContent = s.fan_speed != null ? `fan ${fmt(s.fan_speed, " %")}` : "";
    c.util.dd.textContent = fmt(s.utilization, " %");
    c.util.sub.textContent = s.clocks.graphics_mhz != null ? fmt(s.clocks.graphics_mhz, " MHz") : "";
    c.mem.dd.textContent = s.memory.percent != null ? fmt(s.memory.percent, " %")
      : fmt(gib(s.memory.used_mb), " GiB", 1);
    c.mem.sub.textContent = s.memory.total_mb != null
      ? `${fmt(gib(s.memory.used_mb), "", 1)} / ${fmt(gib(s.memory.total_mb), " GiB", 1)}` : "";
    c.power.dd.textContent = fmt(s.power.draw_w, " W");
    c.power.sub.textContent = s.power.limit_w != null ? `limit ${fmt(s.power.limit_w, " W")}` : "";
    c.conds.replaceChildren(...s.active.map((a) =>
      el("li", `sev-${a.severity}`, `${a.kind} (${a.severity}): ${a.message || ""}`)));
    livePoint(c, s);
  }

  function removeGpu(key) {
    gpus.delete(key);
    const c = cards.get(key);
    if (c) {
      if (c.plot) c.plot.destroy();
      c.root.remove();
      cards.delete(key);
    }
    $("#no-gpus").hidden = cards.size > 0;
  }

  // --- charts ----------------------------------------------------------------------------
  function livePoint(c, s) {
    const d = c.data;
    const last = d[0].length ? d[0][d[0].length - 1] : -Infinity;
    if (s.ts <= last) return;
    d[0].push(s.ts);
    d[1].push(s.temperature);
    d[2].push(s.utilization);
    d[3].push(s.memory.percent);
    d[4].push(s.power.draw_w);
    let drop = 0;
    while (drop < d[0].length && d[0][drop] < s.ts - HOUR_S) drop++;
    drop = Math.max(drop, d[0].length - MAX_POINTS);
    if (drop > 0) d.forEach((col) => col.splice(0, drop));
    c.dirty = true;
  }

  async function loadHistory(host, index, c) {
    let body;
    try {
      const r = await fetch(`/api/history/${encodeURIComponent(host)}/${index}?since=1h`);
      body = await r.json();
      if (!r.ok) {
        c.note.textContent = `No history (${body.error}); live readings only.`;
        return;
      }
    } catch (e) {
      c.note.textContent = `No history (${e}); live readings only.`;
      return;
    }
    const s = body.series;
    const live = c.data;
    const firstLive = live[0].length ? live[0][0] : Infinity;
    const keep = s.ts.findIndex((t) => t >= firstLive);
    const n = keep < 0 ? s.ts.length : keep;
    c.data = [
      s.ts.slice(0, n).concat(live[0]),
      s.temperature_c.slice(0, n).concat(live[1]),
      s.utilization_pct.slice(0, n).concat(live[2]),
      s.memory_used_mb.slice(0, n).map((mb) => pct(mb, c.memTotal)).concat(live[3]),
      s.power_draw_w.slice(0, n).concat(live[4]),
    ];
    c.dirty = true;
  }

  function timeLabels(u, splits) {
    const span = u.scales.x.max - u.scales.x.min;
    const opts = span < 600 ? { hour: "2-digit", minute: "2-digit", second: "2-digit" }
      : { hour: "2-digit", minute: "2-digit" };
    return splits.map((t) => new Date(t * 1000).toLocaleTimeString([], opts));
  }

  function makePlot(c) {
    c.note.textContent = "";
    const atLeast = (floor) => (_u, _min, max) => [0, Math.max(floor, (max || 0) * 1.05)];
    c.plot = new uPlot({
      width: Math.max(240, c.chartBox.clientWidth),
      height: 150,
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, pct: { range: atLeast(100) }, W: { range: atLeast(10) } },
      series: [
        {},
        { label: "°C", stroke: "#d64545", scale: "pct", width: 1.5 },
        { label: "util %", stroke: "#2f6fdf", scale: "pct", width: 1.5 },
        { label: "mem %", stroke: "#8e44ad", scale: "pct", width: 1.5 },
        { label: "W", stroke: "#d98a00", scale: "W", width: 1.5 },
      ],
      axes: [{ space: 70, values: timeLabels }, { scale: "pct", size: 40 },
        { scale: "W", side: 1, size: 44, grid: { show: false } }],
    }, c.data, c.chartBox);
  }

  function drawCharts() {
    if (typeof uPlot === "undefined") return;
    for (const c of cards.values()) {
      if (!c.dirty || !c.data[0].length) continue;
      c.dirty = false;
      if (c.plot) c.plot.setData(c.data);
      else makePlot(c);
    }
  }

  window.addEventListener("resize", () => {
    for (const c of cards.values()) {
      if (c.plot) c.plot.setSize({ width: Math.max(240, c.chartBox.clientWidth), height: 150 });
    }
  });

  // --- banners: every active critical condition, and every one that needs a person ------------
  function renderBanners() {
    const items = [];
    for (const key of [...gpus.keys()].sort((a, b) => (cardOrder(a) < cardOrder(b) ? -1 : 1))) {
      const s = gpus.get(key);
      for (const a of s.active) {
        if (SEVERE.has(a.severity) || needsPerson.has(a.event_id)) items.push([s, a]);
      }
    }
    const signature = items.map(([s, a]) =>
      `${s.host}/${s.index}/${a.event_id}/${a.severity}/${needsPerson.has(a.event_id)}`).join("|");
    if (signature === bannerKey) return;
    bannerKey = signature;
    $("#banners").replaceChildren(...items.map(([s, a]) => {
      const box = el("div", `banner sev-${a.severity}`);
      box.dataset.event = a.event_id;
      const what = el("div", "what");
      what.append(el("strong", null, `${s.host} · GPU ${s.index}${s.name ? ` (${s.name})` : ""}: `),
        document.createTextNode(a.message || a.kind));
      const since = el("span", "since", `${a.kind}, ${a.severity}, since ${clock(a.started_ts)}`);
      box.append(what, since);
      if (needsPerson.has(a.event_id)) {
        const ack = el("button", "ack", "Acknowledge");
        ack.title = "The healer cannot heal this: take it over, and the alarm ends";
        ack.addEventListener("click", async () => {
          ack.disabled = true;
          const sent = await post(`/api/healer/${encodeURIComponent(s.host)}/ack`,
            { event_id: a.event_id });
          ack.textContent = sent ? "acknowledged, waiting for the healer…" : "Acknowledge";
          ack.disabled = sent;
        });
        box.append(ack);
      }
      return box;
    }));
  }

  // --- hosts: the healer's switch, its breaker, the components ------------------------------
  function info(host) {
    if (!hostInfo.has(host)) hostInfo.set(host, { components: {}, healer: null });
    return hostInfo.get(host);
  }

  function hostBox(host) {
    let h = hostBoxes.get(host);
    if (h) return h;
    const root = el("div", "host");
    root.dataset.host = host;
    const label = el("label", "switch");
    const toggle = el("input", "healing");
    toggle.type = "checkbox";
    label.append(toggle, document.createTextNode("Self-healing"));
    const mode = el("span", "mode");
    const breaker = el("span", "breaker");
    const reset = el("button", "reset-breaker", "Reset breaker");
    const budget = el("span", "budget");
    const comps = el("span", "components");
    root.append(el("h2", null, host), label, mode, breaker, reset, budget, comps);
    toggle.addEventListener("change", async () => {
      const want = toggle.checked;
      toggle.disabled = true;
      const sent = await post(`/api/healer/${encodeURIComponent(host)}/enabled`, { enabled: want });
      if (!sent) toggle.checked = !want;
      toggle.disabled = false;
    });
    reset.addEventListener("click", async () => {
      reset.disabled = true;
      await post(`/api/healer/${encodeURIComponent(host)}/reset-breaker`, {});
    });
    h = { root, toggle, mode, breaker, reset, budget, comps };
    hostBoxes.set(host, h);
    const boxes = $("#hosts");
    const after = [...hostBoxes.keys()].filter((k) => k > host).sort()[0];
    boxes.insertBefore(root, after ? hostBoxes.get(after).root : null);
    return h;
  }

  function renderHost(host) {
    const h = hostBox(host);
    const { components, healer } = info(host);
    h.toggle.disabled = !healer;
    if (healer) h.toggle.checked = healer.enabled;
    const mode = !healer ? "no healer" : !healer.enabled ? "paused"
      : healer.dry_run ? "dry-run" : "healing";
    h.mode.textContent = mode;
    h.mode.className = `mode ${mode === "paused" ? "paused" : ""}`;
    const open = healer && healer.breaker_open;
    h.breaker.textContent = !healer ? "" : open
      ? `breaker OPEN${healer.breaker_reason ? ` (${healer.breaker_reason})` : ""}` : "breaker closed";
    h.breaker.className = `breaker${open ? " open" : ""}`;
    h.reset.disabled = !open;
    h.budget.textContent = healer ? `budget ${healer.budget_left}/${healer.budget_per_hour} per hour` : "";
    h.comps.replaceChildren(...Object.entries(components).sort().map(([name, st]) => {
      const text = st.value === "offline" && st.reason === "lost" ? "lost" : st.value;
      return el("span", st.value === "online" ? "" : "off", `${name} ${text} `);
    }));
  }

  // --- the action log: one row per action (its latest message) ------------------------------
  function whyOf(a) {
    const d = a.detail || {};
    return d.kind ? `${d.kind} (${d.severity || "?"})` : "";
  }

  function addAction(a) {
    const prev = actions.get(a.action_id);
    if (prev && prev.msg.ts > a.ts) {
      if (!prev.why) prev.why = whyOf(a);
      return;
    }
    actions.set(a.action_id, { msg: a, why: (prev && prev.why) || whyOf(a) });
    logDirty = true;
  }

  function renderLog() {
    if (!logDirty) return;
    logDirty = false;
    const rows = [...actions.values()].sort((x, y) => y.msg.ts - x.msg.ts).slice(0, MAX_LOG);
    $("#actions tbody").replaceChildren(...rows.map(({ msg, why }) => {
      const tr = el("tr");
      const outcome = `${msg.status}${msg.reason ? ` (${msg.reason})` : ""}` +
        (msg.duration_s != null ? `, ${msg.duration_s.toFixed(1)} s` : "");
      tr.append(el("td", null, clock(msg.ts)), el("td", null, `${msg.host} · ${msg.index}`),
        el("td", null, `${msg.action}${msg.attempt > 1 ? ` #${msg.attempt}` : ""}`),
        el("td", null, why || "–"), el("td", `out-${msg.status}`, outcome));
      return tr;
    }));
    // keep memory bounded: forget the oldest actions beyond what is shown
    if (actions.size > 4 * MAX_LOG) {
      const keep = new Set(rows.map((r) => r.msg.action_id));
      for (const id of actions.keys()) if (!keep.has(id)) actions.delete(id);
    }
  }

  async function loadRecordedActions() {
    try {
      const r = await fetch("/api/actions?limit=300");
      const body = await r.json();
      if (!r.ok) {
        $("#log-source").textContent = `Since the dashboard started (${body.error}).`;
        return;
      }
      body.items.slice().reverse().forEach(addAction);
      $("#log-source").textContent = "From the recording, then live.";
    } catch (e) {
      $("#log-source").textContent = `Since the dashboard started (${e}).`;
    }
  }

  // --- the stream ----------------------------------------------------------------------------
  function applyHealth(h) {
    $("#broker").hidden = h.broker_connected;
    $("#broker").className = "pill bad";
    const stale = new Set(h.stale.map((g) => keyOf(g.host, g.index)));
    for (const [key, s] of gpus) {
      const now = stale.has(key);
      if (s.stale !== now) {
        s.stale = now;
        renderGpu(s);
      }
    }
  }

  function applyOverview(o) {
    for (const key of [...cards.keys()]) {
      if (!o.gpus.some((s) => keyOf(s.host, s.index) === key)) removeGpu(key);
    }
    gpus.clear();
    needsPerson.clear();
    o.needs_person.forEach((id) => needsPerson.add(id));
    for (const s of o.gpus) {
      gpus.set(keyOf(s.host, s.index), s);
      renderGpu(s);
    }
    hostInfo.clear();
    for (const h of o.hosts) {
      hostInfo.set(h.host, { components: h.components, healer: h.healer });
      renderHost(h.host);
    }
    o.recent_actions.forEach(addAction);
    applyHealth({ broker_connected: o.broker_connected,
                  stale: o.gpus.filter((s) => s.stale).map((s) => ({ host: s.host, index: s.index })) });
    bannerKey = null;
    renderBanners();
  }

  function setLink(live) {
    const link = $("#link");
    link.textContent = live ? "live" : "reconnecting…";
    link.className = live ? "pill live" : "pill bad";
  }

  function connect() {
    const es = new EventSource("/api/stream");
    const on = (kind, fn) => es.addEventListener(kind, (e) => fn(JSON.parse(e.data)));
    es.onopen = () => setLink(true);
    es.onerror = () => setLink(false);
    on("overview", applyOverview);
    on("state", (s) => {
      gpus.set(keyOf(s.host, s.index), s);
      renderGpu(s);
      renderBanners();
    });
    on("event", (ev) => {
      if (ev.phase === "cleared") needsPerson.delete(ev.event_id);
    });
    on("action", (a) => {
      if (a.action === "notify" && a.event_id) {
        if (a.status === "acknowledged") needsPerson.delete(a.event_id);
        else needsPerson.add(a.event_id);
        renderBanners();
      }
      addAction(a);
    });
    on("healer", (h) => {
      info(h.host).healer = h;
      renderHost(h.host);
    });
    on("status", (st) => {
      info(st.host).components[st.component] = { value: st.value, reason: st.reason };
      renderHost(st.host);
    });
    on("cleared", (c) => {
      if (c.kind === "state") {
        removeGpu(keyOf(c.host, c.index));
        renderBanners();
      } else if (c.kind === "status" && hostInfo.has(c.host)) {
        delete info(c.host).components[c.component];
        renderHost(c.host);
      } else if (c.kind === "healer_state" && hostInfo.has(c.host)) {
        info(c.host).healer = null;
        renderHost(c.host);
      }
    });
    on("health", applyHealth);
    on("dropped", () => notify("the page fell behind the stream; reconnecting", true));
  }

  setInterval(drawCharts, 1000);
  setInterval(renderLog, 500);
  loadRecordedActions();
  connect();
})();
