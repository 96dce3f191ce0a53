/* TARS Distributed dashboard: polls /status every 2 s and draws what it finds.
 *
 * Plain JavaScript, no framework and no network access beyond this node: home LANs
 * may have no internet. Everything the node sends is inserted as text (never as
 * HTML), so a model id cannot inject markup. The /status shape is documented in
 * docs/ARCHITECTURE.md; fields that are missing are shown as "–" rather than
 * breaking the page, so an older or newer peer still renders.
 */
"use strict";

(function () {
  var BASE = window.TARS_BASE || "/";
  var POLL_MS = 2000;
  var WINDOW_S = 300;
  var KEY_STORE = "tars.apiKey";
  var THEME_STORE = "tars.theme";

  var history = [];          // [{t, tps, eps, queue}] for the charts, last WINDOW_S seconds
  var prevTokens = null;     // for tokens/s when the node sends no total
  var lastData = null;
  var keyFormForced = false; // the user opened the key form themselves

  // ------------------------------------------------------------------ helpers
  function $(sel) { return document.querySelector(sel); }

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") el.textContent = v;
        else if (k === "class") el.className = v;
        else el.setAttribute(k, v === true ? "" : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      (Array.isArray(c) ? c : [c]).forEach(function (x) {
        if (x === null || x === undefined || x === false) return;
        el.appendChild(typeof x === "string" || typeof x === "number" ? document.createTextNode(String(x)) : x);
      });
    }
    return el;
  }

  function store(key, value) {
    try {
      if (value === null) localStorage.removeItem(key); else localStorage.setItem(key, value);
    } catch (e) { /* private mode: keep working without persistence */ }
  }
  function load(key) { try { return localStorage.getItem(key); } catch (e) { return null; } }

  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function fmt(x, digits) {
    if (!isNum(x)) return "–";
    return x.toLocaleString(undefined, { minimumFractionDigits: digits || 0, maximumFractionDigits: digits || 0 });
  }
  function fmtMB(mb) {
    if (!isNum(mb)) return "–";
    return mb >= 1024 ? fmt(mb / 1024, 1) + " GB" : fmt(mb) + " MB";
  }
  function fmtDuration(s) {
    if (!isNum(s)) return "–";
    s = Math.max(0, Math.round(s));
    var d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + " d " + hr + " h";
    if (hr) return hr + " h " + m + " min";
    if (m) return m + " min " + (s % 60) + " s";
    return s + " s";
  }
  function stateClass(state) { return "pill state-" + String(state || "unknown").toLowerCase(); }
  // "pulling 42%" while the host that serves a model downloads it (deploy/pull.py)
  function stateText(m) {
    var s = m.state || "unknown";
    if (s === "pulling" && m.progress && m.progress.percent != null) s += " " + Math.round(m.progress.percent) + "%";
    return s;
  }

  // ------------------------------------------------------------------ theme
  function darkNow() {
    var t = document.documentElement.dataset.theme;
    if (t === "dark") return true;
    if (t === "light") return false;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  }
  function syncThemeButton() {
    var b = $("#theme-toggle");
    var dark = darkNow();
    b.textContent = dark ? "Light" : "Dark";
    b.setAttribute("aria-pressed", dark ? "true" : "false");
    b.title = dark ? "Switch to the light theme" : "Switch to the dark theme";
  }
  function toggleTheme() {
    var next = darkNow() ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    store(THEME_STORE, next);
    syncThemeButton();
    drawCharts();
  }

  // ------------------------------------------------------------------ API key
  function showKeyForm(message) {
    var form = $("#key-form");
    form.hidden = false;
    if (message) showBanner(message);
    var input = $("#key-input");
    if (document.activeElement !== input) input.focus();
  }
  function hideKeyForm() { if (!keyFormForced) $("#key-form").hidden = true; }

  // ------------------------------------------------------------------ banner
  function showBanner(text) { var b = $("#banner"); b.textContent = text; b.hidden = false; }
  function hideBanner() { $("#banner").hidden = true; }

  function setHealth(text, cls) {
    var el = $("#health");
    el.textContent = text;
    el.className = "pill " + cls;
  }

  // ------------------------------------------------------------------ polling
  function poll() {
    var headers = { Accept: "application/json" };
    var key = load(KEY_STORE);
    if (key) headers.Authorization = "Bearer " + key;
    var ctrl = window.AbortController ? new AbortController() : null;
    var timeout = setTimeout(function () { if (ctrl) ctrl.abort(); }, 5000);
    fetch(BASE + "status", { headers: headers, cache: "no-store", signal: ctrl ? ctrl.signal : undefined })
      .then(function (resp) {
        if (resp.status === 401) {
          setHealth("API key needed", "pill-warn");
          showKeyForm(key ? "The saved API key was rejected by this node: paste the right one."
                          : "This node requires an API key (TARS_API_KEY): paste it below.");
          return null;
        }
        if (!resp.ok) {
          return resp.text().then(function (t) { throw new Error("HTTP " + resp.status + " " + t.slice(0, 200)); });
        }
        return resp.json();
      })
      .then(function (data) {
        if (!data) return;
        hideBanner();
        hideKeyForm();
        render(data);
      })
      .catch(function (err) {
        setHealth("unreachable", "pill-bad");
        var why = err && err.name === "AbortError" ? "no answer within 5 s" : (err && err.message) || String(err);
        showBanner("Cannot reach the node at " + location.host + BASE + "status (" + why + "). Retrying every 2 s; the figures below are the last ones received.");
      })
      .then(function () {
        clearTimeout(timeout);
        setTimeout(poll, POLL_MS);
      });
  }

  // ------------------------------------------------------------------ render
  function render(d) {
    lastData = d;
    $("#node-name").textContent = d.node || "?";
    var role = $("#node-role");
    role.textContent = d.role || "";
    role.hidden = !d.role;
    $("#node-version").textContent = d.version ? "v" + d.version : "";
    document.title = "TARS · " + (d.node || "node");

    var models = Array.isArray(d.models) ? d.models : [];
    if (d.healthy) setHealth("healthy", "pill-ok");
    else if (models.some(function (m) { return m.state === "failed"; })) setHealth("degraded", "pill-bad");
    else setHealth("loading", "pill-warn");
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();

    renderStats(d, models);
    renderHosts(d, models);
    renderModels(models);
    renderPlan(d.plan || {});
  }

  function renderStats(d, models) {
    var totals = d.totals || {};
    var now = Date.now() / 1000;
    var tps = totals.tokens_per_s;
    if (!isNum(tps)) {
      // Older node: derive it from the token counters.
      var tokens = models.reduce(function (a, m) { return a + (m.tokens_generated || 0); }, 0);
      tps = prevTokens ? Math.max(0, (tokens - prevTokens.n) / Math.max(0.001, now - prevTokens.t)) : 0;
      prevTokens = { n: tokens, t: now };
    }
    var eps = isNum(totals.embeddings_per_s) ? totals.embeddings_per_s : 0;
    var queue = isNum(totals.queue_depth) ? totals.queue_depth
      : models.reduce(function (a, m) { return a + (m.queue_depth || 0); }, 0);
    var requests = isNum(totals.requests) ? totals.requests : 0;
    // Peers that report their own totals (in their heartbeats) add to the cluster's figures.
    var counted = 0;
    (Array.isArray(d.peers) ? d.peers : []).forEach(function (p) {
      var t = p && p.totals;
      if (!t || (p.state !== "alive" && p.state !== "suspect")) return;
      counted++;
      tps += isNum(t.tokens_per_s) ? t.tokens_per_s : 0;
      eps += isNum(t.embeddings_per_s) ? t.embeddings_per_s : 0;
      queue += isNum(t.queue_depth) ? t.queue_depth : 0;
      requests += isNum(t.requests) ? t.requests : 0;
    });
    $("#scope").textContent = counted ? "whole cluster (" + (counted + 1) + " hosts)" : "this node";

    history.push({ t: now, tps: tps, eps: eps, queue: queue });
    while (history.length && history[0].t < now - WINDOW_S) history.shift();

    $("#stat-tps [data-value]").textContent = fmt(tps, 1);
    $("#stat-eps [data-value]").textContent = fmt(eps, 1);
    $("#stat-queue [data-value]").textContent = fmt(queue);
    $("#stat-misc [data-value]").textContent = fmt(requests);
    $("#uptime").textContent = fmtDuration(d.uptime_s);
    drawCharts();
  }

  function gpuList(x) {
    if (!x) return [];
    if (Array.isArray(x)) return x.filter(Boolean).map(function (g) { return typeof g === "string" ? { name: g } : g; });
    if (typeof x === "string") return [{ name: x }];
    return [x];
  }

  function bar(used, total, label) {
    var pct = isNum(used) && isNum(total) && total > 0 ? Math.min(100, (used / total) * 100) : 0;
    var cls = "bar" + (pct >= 95 ? " full" : pct >= 80 ? " high" : "");
    return [
      h("div", { class: "bar-label" },
        h("span", { text: label }),
        h("span", { text: fmtMB(used) + " / " + fmtMB(total) + (isNum(used) && isNum(total) ? " (" + fmt(pct) + "%)" : "") })),
      h("div", { class: cls, role: "meter", "aria-label": label, "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(pct) },
        h("span", { style: "width:" + pct.toFixed(1) + "%" })),
    ];
  }

  function gpuBlock(g) {
    var total = g.vram_total_mb;
    var used = isNum(g.vram_used_mb) ? g.vram_used_mb
      : (isNum(total) && isNum(g.vram_free_mb) ? total - g.vram_free_mb : null);
    var power = isNum(g.power_w)
      ? fmt(g.power_w) + (isNum(g.power_limit_w) ? " / " + fmt(g.power_limit_w) : "") + " W" : "–";
    var live = isNum(used) || isNum(g.temperature_c) || isNum(g.power_w);
    return h("div", { class: "gpu" },
      h("div", { class: "gpu-name", text: (isNum(g.index) ? "GPU " + g.index + " · " : "") + (g.name || "GPU") }),
      bar(used, total, "VRAM"),
      live ? null : h("div", { class: "figures", text: "this host does not report live GPU figures to its peers" }),
      !live ? null : h("div", { class: "figures" },
        h("span", null, "temp ", h("b", { class: "temp", text: isNum(g.temperature_c) ? fmt(g.temperature_c) + " °C" : "–" })),
        h("span", null, "power ", h("b", { class: "power", text: power })),
        h("span", null, "util ", h("b", { text: isNum(g.utilization_pct) ? fmt(g.utilization_pct) + " %" : "–" }))));
  }

  function hostCard(host) {
    var tags = [h("span", { class: "badge", text: host.role || "?" })];
    if (host.self) tags.push(h("span", { class: "badge", text: "this node" }));
    if (host.simulated) tags.push(h("span", { class: "badge", text: "simulated" }));
    tags.push(h("span", { class: stateClass(host.state), text: host.state || "unknown" }));

    var meta = [];
    if (host.url) meta.push(host.url);
    if (isNum(host.rtt_ms)) meta.push("rtt " + fmt(host.rtt_ms, 1) + " ms");
    if (isNum(host.last_heartbeat_s)) meta.push("heartbeat " + fmt(host.last_heartbeat_s, 1) + " s ago");
    if (host.cpu) meta.push(host.cpu);

    var gpus = host.gpus.length ? host.gpus.map(gpuBlock)
      : [h("div", { class: "gpu" }, h("div", { class: "gpu-name", text: "No GPU: CPU mode" }))];
    var ram = host.ram && isNum(host.ram.total_mb)
      ? h("div", { class: "ram" }, bar(host.ram.total_mb - (host.ram.free_mb || 0), host.ram.total_mb, "RAM")) : null;
    var chips = host.models.length
      ? h("div", { class: "chips" }, host.models.map(function (m) { return h("span", { class: "chip", text: m }); }))
      : h("div", { class: "chips muted", text: "no models here" });

    return h("article", { class: "host", "data-host": host.name },
      h("header", null, h("h3", { text: host.name }), h("div", { class: "tags" }, tags)),
      meta.length ? h("div", { class: "meta muted", text: meta.join(" · ") }) : null,
      gpus, ram, chips);
  }

  function renderHosts(d, models) {
    var profile = d.profile || {};
    var live = gpuList(d.gpus);
    var self = {
      name: d.node || "this node",
      self: true,
      role: d.role,
      state: d.healthy ? "ready" : "loading",
      simulated: !!profile.simulated,
      url: d.url || location.origin + BASE,
      gpus: live.length ? live : gpuList(profile.gpus),
      cpu: profile.cpu_model ? profile.cpu_model + (profile.cpu_cores ? " · " + profile.cpu_cores + " cores" : "") : "",
      ram: d.ram || (isNum(profile.ram_total_mb) ? { total_mb: profile.ram_total_mb, free_mb: profile.ram_free_mb } : null),
      models: models.filter(function (m) { return m.node === d.node; }).map(function (m) { return m.id; }),
    };
    var hosts = [self];
    (Array.isArray(d.peers) ? d.peers : []).forEach(function (p) {
      if (!p || p.name === self.name) return;
      var prof = p.profile || {};
      var peerModels = (Array.isArray(p.models) ? p.models : []).map(function (m) { return typeof m === "string" ? m : m.id; });
      if (!peerModels.length) {
        peerModels = models.filter(function (m) { return m.node === p.name; }).map(function (m) { return m.id; });
      }
      hosts.push({
        name: p.name || p.url || "peer",
        role: p.role,
        state: p.state,
        url: p.url,
        rtt_ms: p.rtt_ms,
        last_heartbeat_s: p.last_heartbeat_s,
        simulated: !!(prof.simulated || p.simulated),
        gpus: gpuList(p.gpus || p.gpu || prof.gpus),
        cpu: prof.cpu_model || "",
        ram: p.ram || null,
        models: peerModels,
      });
    });
    var box = $("#hosts");
    box.replaceChildren.apply(box, hosts.map(hostCard));
  }

  function renderModels(models) {
    var body = $("#models tbody");
    if (!models.length) {
      body.replaceChildren(h("tr", null, h("td", { class: "empty", colspan: 10, text: "no models yet" })));
      return;
    }
    body.replaceChildren.apply(body, models.map(function (m) {
      var row = h("tr", { "data-model": m.id, "data-state": m.state },
        h("td", null, h("code", { text: m.id }), m.fallback ? " (fallback)" : null),
        h("td", { text: (m.kind || "–") + (m.vision ? " +vision" : ""), title: m.vision ? "sees images (a vision projector)" : null }),
        // a model on several hosts (replicas) lists them all
        h("td", { text: m.replicas ? m.replicas.map(function (r) { return r.node; }).join(", ") : (m.node || "–") }),
        h("td", null, h("span", { class: stateClass(m.state), text: stateText(m), title: m.error || null })),
        h("td", { text: (m.backend || "–") + (m.engine && m.engine.name ? " · " + m.engine.name : "") }),
        h("td", { text: m.quant || "–" }),
        // engine slots busy/total beside the queue: "3 · 2/4 slots"
        h("td", { class: "num", "data-slots": m.slots ? m.slots.busy + "/" + m.slots.total : null,
                  text: fmt(m.queue_depth) + (m.slots ? " · " + m.slots.busy + "/" + m.slots.total + " slots" : "") }),
        h("td", { class: "num", text: fmt(m.requests) }),
        h("td", { class: "num", text: fmt(m.tokens_generated) }),
        h("td", { class: "num", text: fmt(m.last_tokens_per_s, 1) }));
      return m.error
        ? [row, h("tr", { class: "error-row" }, h("td", { class: "error", colspan: 10, text: m.id + ": " + m.error }))]
        : row;
    }).reduce(function (a, r) { return a.concat(r); }, []));
  }

  function renderPlan(plan) {
    var body = $("#plan tbody");
    var rows = (plan.assignments || []).map(function (a) {
      return h("tr", { "data-model": a.model },
        h("td", null, h("code", { text: a.model })),
        h("td", { text: a.node || "–" }),
        h("td", { text: a.device || "–" }),
        h("td", { text: a.quant || "–" }),
        h("td", { class: "num", text: a.split ? a.split.map(function (s) { return s.layers + " " + s.node; }).join(" + ")
          : a.device === "cpu" ? "CPU" : a.n_gpu_layers === -1 ? "all" : fmt(a.n_gpu_layers) }),
        h("td", { class: "num", text: a.split ? a.split.map(function (s) { return fmtMB(s.vram_mb); }).join(" + ")
          : a.device === "cpu" ? "–" : fmtMB(a.vram_mb) }),
        h("td", { class: "reason", text: a.reason || "" }));
    }).concat((plan.unplaced || []).map(function (u) {
      return h("tr", { class: "unplaced", "data-model": u.model },
        h("td", null, h("code", { text: u.model })),
        h("td", { colspan: 5, text: "not placed" }),
        h("td", { class: "reason", text: u.reason || "" }));
    }));
    if (!rows.length) rows = [h("tr", null, h("td", { class: "empty", colspan: 7, text: "no plan yet" }))];
    body.replaceChildren.apply(body, rows);
  }

  // ------------------------------------------------------------------ charts
  var SERIES = { tps: "--accent", eps: "--accent-2", queue: "--accent-3" };

  function niceMax(v) {
    if (v <= 1) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  // The x axis grows with the history, from one minute up to WINDOW_S.
  function chartSpan(now) {
    var have = history.length ? now - history[0].t : 0;
    return Math.min(WINDOW_S, Math.max(60, have));
  }

  function drawCharts() {
    var span = chartSpan(Date.now() / 1000);
    $("#window").textContent = span >= 90 ? Math.round(span / 60) + " min" : Math.round(span) + " s";
    document.querySelectorAll("canvas.chart").forEach(function (c) {
      drawChart(c, c.getAttribute("data-series"));
    });
  }

  // A theme colour as the canvas takes it (rgb): the stylesheet writes each one as
  // light-dark(...), which only an element's style resolves, so a hidden probe does.
  var probe = null;
  function themeColor(name, fallback) {
    if (!probe) {
      probe = document.createElement("span");
      probe.hidden = true;
      document.body.appendChild(probe);
    }
    probe.style.color = "var(" + name + ", " + fallback + ")";
    return getComputedStyle(probe).color || fallback;
  }

  function drawChart(canvas, key) {
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth, ht = canvas.clientHeight;
    if (!w || !ht) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(ht * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(ht * dpr);
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, ht);
    var color = themeColor(SERIES[key], "#2563eb");
    var grid = themeColor("--chart-grid", "#ddd");
    var muted = themeColor("--muted", "#888");

    var now = Date.now() / 1000;
    var span = chartSpan(now);
    var max = niceMax(history.reduce(function (a, p) { return Math.max(a, p[key] || 0); }, 0));
    var top = 12, bottom = ht - 2;
    function x(t) { return ((t - (now - span)) / span) * w; }
    function y(v) { return bottom - (v / max) * (bottom - top); }

    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    [0, 0.5, 1].forEach(function (f) {
      var yy = Math.round(y(max * f)) + 0.5;
      ctx.beginPath(); ctx.moveTo(0, yy); ctx.lineTo(w, yy); ctx.stroke();
    });
    ctx.fillStyle = muted;
    ctx.font = "10px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.fillText(fmt(max, max < 10 ? 1 : 0), 2, 0);

    if (history.length < 2) return;
    ctx.beginPath();
    history.forEach(function (p, i) {
      var px = x(p.t), py = y(p[key] || 0);
      if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
    });
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.8;
    ctx.lineJoin = "round";
    ctx.stroke();
    ctx.lineTo(x(history[history.length - 1].t), bottom);
    ctx.lineTo(x(history[0].t), bottom);
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
  }

  // ------------------------------------------------------------------ start
  function start() {
    syncThemeButton();
    $("#theme-toggle").addEventListener("click", toggleTheme);
    if (window.matchMedia) {
      var mq = window.matchMedia("(prefers-color-scheme: dark)");
      var onChange = function () { syncThemeButton(); drawCharts(); };
      if (mq.addEventListener) mq.addEventListener("change", onChange); else if (mq.addListener) mq.addListener(onChange);
    }
    $("#key-button").addEventListener("click", function () {
      var form = $("#key-form");
      keyFormForced = form.hidden;
      form.hidden = !form.hidden;
      if (!form.hidden) $("#key-input").focus();
    });
    $("#key-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var v = $("#key-input").value.trim();
      store(KEY_STORE, v || null);
      $("#key-input").value = "";
      keyFormForced = false;
      $("#key-form").hidden = true;
      hideBanner();
    });
    $("#key-forget").addEventListener("click", function () {
      store(KEY_STORE, null);
      $("#key-input").value = "";
    });
    $("#metrics-link").setAttribute("href", BASE + "metrics");
    window.addEventListener("resize", drawCharts);
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
