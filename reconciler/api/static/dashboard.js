// The reconciler dashboard: GET v1/status on load, then live from the SSE stream v1/events.
//
// Every value from the server reaches the page as text (textContent, text nodes, setAttribute
// on fixed attribute names); nothing is ever parsed as HTML. Links are made only for http(s) URLs.
//
// A server with a token (--token-file) answers every read but this page with 401 until the
// request carries "Authorization: Bearer <token>". The page then shows a form that asks for the
// token, or takes it from the URL's fragment (#token=…, which never reaches the server or its
// logs) and removes it from the address bar. The token is kept in sessionStorage: this tab only,
// gone when it closes. Every request sends it. The event stream is therefore read with fetch()
// and parsed here (EventSource cannot send a header); on a break it reconnects with
// Last-Event-ID, and the server replays what was missed.
"use strict";

(function () {
  const LOG_LINES = 50;             // log lines a service's "log" link shows
  const EVENTS_MAX = 200;          // event log entries kept (newest first)
  const REFRESH_GAP_MS = 100;      // at most one status fetch per 100 ms: a burst of events costs two
  const FALLBACK_POLL_MS = 15000;  // re-fetch now and then even when the stream is quiet
  const CLUSTER_POLL_MS = 2000;    // the cluster card (other nodes' changes are not on this node's stream)
  const TICK_MS = 250;             // countdowns (lease TTL, uptime)
  const RETRY_MS = [1000, 2000, 5000, 10000]; // reconnecting the stream: waits, then the last one again
  const TOKEN_KEY = "reconciler.token";

  // Every kind the server declares (reconciler/core/events.py; a test keeps this list in sync).
  // The stream brings every kind whatever this list says; one missing here (a newer server) is
  // still logged, marked as a kind this page does not know.
  const KINDS = [
    "action.started", "action.finished", "api.started", "backoff", "cluster.joined", "cluster.disconnected",
    "demand.added", "demand.withdrawn", "gateway.started", "gateway.cold", "gateway.refused", "ollama.pull",
    "instance.adopted", "instance.failed", "instance.forgotten", "instance.gone", "instance.healthy",
    "instance.launched", "instance.recovered", "instance.released", "instance.stopped", "instance.stray",
    "instance.unloaded", "intent.recovered", "intent.unresolved", "operator.request", "lease.granted", "lease.renewed", "lease.released",
    "lease.expired", "pass", "store.failed", "store.recovered", "store.restored",
    "pass.started", "pass.finished", "pass.failed", "profile.held", "profile.reloaded", "profile.rejected", "watch.started",
    "watch.degraded", "watch.stopped", "message",
  ];
  const KNOWN = new Set(KINDS);
  // Announced around every pass, then summed up by pass.finished: neither logged nor fetched for.
  const SILENT = new Set(["pass.started", "pass"]);
  const SYMBOL_OF = { done: "✓", failed: "✗", skipped: "-", deferred: "…" };

  const state = {
    status: null,
    fetchedAt: 0,      // performance.now() when `status` arrived
    renders: 0,        // how many times the page was rendered from a status (tests read it)
    renderedAt: 0,     // Date.now() of the last render
    eventAt: {},       // Date.now() when an event of each kind last arrived
    events: 0,         // events received on the stream
    fetching: false,
    lastFetch: -Infinity, // performance.now() when the last status fetch began
    again: false,
    timer: null,
    streaming: false,  // a fetch of v1/events is open (or being opened)
    stream: null,      // its AbortController
    lastId: "",        // the last event id seen: sent as Last-Event-ID when reconnecting
    retries: 0,
    needToken: false,  // the server answered 401: waiting for the form
    clusterFetching: false, // a fetch of v1/cluster is under way
    clusterRenders: 0, // how many times the cluster card was rendered (tests read it)
  };
  window.reconcilerDashboard = state;

  // ---- DOM helpers (text only) ------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  // el("td", {class: "x", title: "…"}, "text", otherNode, …): strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) { $(id).textContent = value === null || value === undefined ? "—" : String(value); }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function show(id, visible) { $(id).hidden = !visible; }

  function list(value) { return Array.isArray(value) ? value : []; }

  function dash(value) { return value === null || value === undefined || value === "" ? "—" : String(value); }

  // ---- formatting -------------------------------------------------------------------------

  const number = new Intl.NumberFormat("en-US");
  function mb(value) { return number.format(Math.round(Number(value) || 0)) + " MB"; }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    let s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
    return `${s}s`;
  }

  function clock(ts) {
    const date = ts ? new Date(ts) : new Date();
    if (isNaN(date.getTime())) return String(ts);
    return date.toLocaleTimeString("en-GB", { hour12: false });
  }

  // seconds since the status arrived, for values that count on between fetches
  function elapsed() { return (performance.now() - state.fetchedAt) / 1000; }

  function safeUrl(url) {
    if (typeof url !== "string") return null;
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  // ---- rendering --------------------------------------------------------------------------

  function render(status) {
    setText("node", status.node);
    setText("profile", status.profile);
    setText("updated", clock());
    renderConditions(status.conditions);
    renderGpus(list(status.gpus), list(status.instances));
    renderInstances(list(status.instances), list(status.services));
    renderLeases(list(status.leases));
    renderPending(list(status.demands), list(status.pending));
    renderPlan(status.plan);
    renderModels(list(status.models));
    state.renders += 1;
    state.renderedAt = Date.now();
    document.body.dataset.renders = String(state.renders);
  }

  // conditions: [{type, ok, service, message}] (reconciler/api/README.md); pending ones are in "Pending"
  function renderConditions(conditions) {
    const ul = $("conditions");
    clear(ul);
    let shown = 0;
    for (const c of list(conditions)) {
      if (!c || typeof c !== "object" || c.type === "pending") continue;
      const name = c.ok ? dash(c.type) : ({ converged: "not converged", observed: "not observed yet",
        profile: "profile rejected", over_committed: "over-committed" })[c.type] || dash(c.type);
      // "converged: nothing to do" under "converged" says it twice (and "profile rejected: …" under its name)
      const message = String(c.message || "").replace(/^profile rejected:\s*/, "")
        .replace(new RegExp(`^${String(c.type).replace(/\W/g, "")}:\\s*`), "");
      ul.append(el("li", { class: c.ok ? "cond cond-ok" : "cond cond-bad", dataset: { type: String(c.type) } },
        el("strong", {}, name), c.service ? ` ${c.service}` : "", message ? ` · ${message}` : ""));
      shown += 1;
    }
    ul.hidden = shown === 0;
  }

  function renderGpus(gpus, instances) {
    const box = $("gpus");
    clear(box);
    if (!gpus.length) {
      box.append(el("p", { class: "empty" }, "No GPUs reported."));
      return;
    }
    for (const gpu of gpus) {
      const total = Math.max(0, Number(gpu.total_mb) || 0);
      const parts = [
        ["started", "reserved by started services", Number(gpu.reserved_started_mb) || 0],
        ["adopted", "adopted", Number(gpu.adopted_mb) || 0],
        ["leased", "VRAM leases", Number(gpu.leased_mb) || 0],
        ["foreign", "foreign", Number(gpu.foreign_mb) || 0],
        ["free", "free", Number(gpu.free_mb) || 0],
      ];
      // an instance spanning several GPUs (gpus: [0, 1]) is named on the bar of each of them
      const onGpu = instances.filter((i) => (Array.isArray(i.gpus) ? i.gpus : [i.gpu]).includes(gpu.index));
      const names = (origin) => onGpu.filter((i) => i.origin === origin).map((i) => i.service);
      const bar = el("div", { class: "bar", role: "img", "aria-label": `GPU ${gpu.index} memory` });
      const scale = Math.max(total, parts.reduce((sum, p) => sum + p[2], 0)) || 1;
      // started and adopted memory split per service (services_mb), and what the last plan holds for a start
      // not observed yet ("1024 MB held for start:tts") apart; whatever is left of a part stays one segment
      const perService = gpu.services_mb && typeof gpu.services_mb === "object" ? gpu.services_mb : {};
      const pieces = (key, value) => {
        if (key !== "started" && key !== "adopted") return [[null, value, null]];
        const out = [];
        let left = value;
        for (const name of names(key)) {
          const own = Number(perService[name]) || 0;
          if (own <= 0 || own > left) continue;
          out.push([name, own, null]);
          left -= own;
        }
        if (key === "started") {
          for (const note of list(gpu.held_for)) {
            const held = Number(String(note).split(" ")[0]) || 0;
            if (held <= 0 || held > left) continue;
            out.push([String(note).replace(/^.* held for /, ""), held, String(note)]);
            left -= held;
          }
        }
        if (left > 0) out.push([null, left, null]);
        return out;
      };
      for (const [key, label, value] of parts) {
        if (value <= 0) continue;
        for (const [who, part, note] of pieces(key, value)) {
          const pct = (100 * part) / scale;
          const seg = el("div", {
            class: `seg seg-${key}${note ? " seg-planned" : ""}`,
            title: note ? note : `${label}: ${mb(part)}${who ? " (" + who + ")" : ""}`,
            dataset: { part: key, mb: String(part), service: who || "" },
          });
          seg.style.width = `${pct.toFixed(3)}%`; // CSSOM, not a style attribute: allowed by a strict CSP
          if (pct >= 9) seg.append(el("span", { class: "seg-label" }, who && pct >= 16 ? `${who} ${mb(part)}` : mb(part)));
          bar.append(seg);
        }
      }
      const numbers = el("ul", { class: "gpu-numbers" });
      for (const [key, label, value] of parts) {
        const who = key === "started" || key === "adopted" ? names(key) : [];
        numbers.append(el("li", { dataset: { part: key } }, el("span", { class: `swatch seg-${key}` }),
          `${label} `, el("b", {}, mb(value)), who.length ? ` · ${who.join(", ")}` : ""));
      }
      for (const note of list(gpu.held_for)) {
        numbers.append(el("li", { dataset: { part: "held" } }, el("span", { class: "swatch seg-started seg-planned" }), String(note)));
      }
      box.append(el("div", { class: "gpu", dataset: { gpu: String(gpu.index) } },
        el("div", { class: "gpu-head" },
          el("span", { class: "gpu-name" }, `GPU ${dash(gpu.index)}`, gpu.name ? el("span", { class: "muted" }, ` · ${gpu.name}`) : null),
          el("span", { class: "gpu-total" }, `${mb(gpu.free_mb)} free of ${mb(total)}`)),
        // booked beyond its total (a crash mid-eviction, foreign growth): never converged, said on the GPU too
        Number(gpu.over_committed_mb) > 0
          ? el("p", { class: "gpu-over", role: "alert" }, `over-committed: ${mb(gpu.over_committed_mb)} booked beyond its total`)
          : null,
        bar, numbers));
    }
  }

  function stateBadge(value) {
    const text = dash(value);
    return el("span", { class: `badge state-${text.replace(/[^a-z0-9_-]/gi, "")}` }, text);
  }

  // one row per instance, then the profile's services that have none (greyed)
  function renderInstances(instances, services) {
    const tbody = $("instances").querySelector("tbody");
    clear(tbody);
    const sorted = instances.slice().sort((a, b) => String(a.service).localeCompare(String(b.service)));
    const running = new Set(sorted.map((i) => i.service));
    const idle = services.filter((s) => !running.has(s.service))
      .sort((a, b) => String(a.service).localeCompare(String(b.service)));
    for (const inst of sorted) {
      const href = safeUrl(inst.url);
      const url = href ? el("a", { href, target: "_blank", rel: "noopener noreferrer" }, inst.url) : dash(inst.url);
      const leases = Array.isArray(inst.leases) ? inst.leases.length : inst.leases;
      const uptime = el("td", { class: "num uptime" }, duration(inst.uptime_s));
      if (typeof inst.uptime_s === "number") uptime.dataset.base = String(inst.uptime_s);
      const error = inst.last_error ? el("td", { class: "error", title: inst.last_error }, inst.last_error)
        : el("td", { class: "error muted" }, "—");
      const svc = services.find((x) => x.service === inst.service) || {};
      const badges = [stateBadge(inst.state)];
      if (inst.healthy === false && inst.state === "running") badges.push(" ", el("span", { class: "badge state-failed" }, "unhealthy"));
      if (inst.stalled) badges.push(" ", el("span", { class: "badge state-stalled" }, "stalled"));
      tbody.append(el("tr", { dataset: { service: String(inst.service) } },
        serviceCell(inst.service, svc.description),
        el("td", { class: "state" }, ...badges),
        el("td", { class: "url" }, url),
        el("td", { class: "num pid" }, dash(inst.pid)),
        el("td", { class: "num priority" }, dash(inst.priority)),
        el("td", { class: "num mb" }, typeof inst.mb === "number" ? number.format(inst.mb) : "—"),
        el("td", { class: "num gpu" }, Array.isArray(inst.gpus) ? inst.gpus.join(",") : dash(inst.gpu)),
        el("td", { class: "origin" }, el("span", { class: `tag origin-${inst.origin === "adopted" ? "adopted" : "started"}` }, dash(inst.origin))),
        el("td", { class: "model" }, dash(inst.model)),
        el("td", { class: "num leases" }, typeof inst.max_concurrent === "number" ? `${dash(leases)}/${inst.max_concurrent}` : dash(leases)),
        uptime,
        error));
    }
    for (const svc of idle) {
      const failing = svc.backoff && !svc.backoff.recovered ? svc.backoff : null;
      const badges = [el("span", { class: "badge" }, "not running")];
      if (svc.held) badges.push(" ", el("span", { class: "badge state-held", title: String(svc.held) }, "stopped by operator"));
      if (failing) {
        badges.push(" ", el("span", { class: `badge ${failing.stalled ? "state-stalled" : "state-failed"}` },
          failing.stalled ? "stalled" : "backing off"));
      }
      const error = failing ? el("td", { class: "error", title: String(failing.last_error || "") },
        `${failing.failures} failure${failing.failures === 1 ? "" : "s"}` +
        (failing.last_error ? `, last: ${failing.last_error}` : "") +
        (failing.next_try_at ? ` · next try ${clock(failing.next_try_at)}` : " · tried now"))
        : svc.held ? el("td", { class: "error muted" }, String(svc.held)) : el("td", { class: "error muted" }, "—");
      tbody.append(el("tr", { class: "idle", dataset: { service: String(svc.service) } },
        serviceCell(svc.service, svc.description),
        el("td", { class: "state" }, ...badges),
        el("td", { class: "url" }, dash(svc.url)),
        el("td", { class: "num pid" }, "—"),
        el("td", { class: "num priority" }, dash(svc.priority)),
        el("td", { class: "num mb" }, "—"),
        el("td", { class: "num gpu" }, "—"),
        el("td", { class: "origin muted" }, svc.managed === "unmanaged" ? "unmanaged slot" : "—"),
        el("td", { class: "model" }, "—"),
        el("td", { class: "num leases" }, `0/${dash(svc.max_concurrent)}`),
        el("td", { class: "num uptime" }, "—"),
        error));
    }
    const byState = {};
    for (const inst of instances) byState[inst.state] = (byState[inst.state] || 0) + 1;
    const counts = Object.entries(byState).map(([st, n]) => `${n} ${st}`);
    setText("instances-count", [...counts, `${instances.length + idle.length} services`].join(" · "));
    show("instances-empty", !instances.length && !idle.length);
  }

  // the service's name, its profile description, and a link to its recent log lines
  function serviceCell(name, description) {
    const link = el("a", { href: "#log", class: "log-link", title: `the last lines of ${name}'s log` }, "log");
    link.addEventListener("click", (event) => { event.preventDefault(); showLog(String(name)); });
    return el("td", { class: "service" }, dash(name), " ", link,
      description ? el("div", { class: "muted desc" }, String(description)) : null);
  }

  async function showLog(name) {
    const card = $("log-card");
    card.hidden = false;
    setText("log-service", name);
    const pre = $("log-lines");
    pre.textContent = "loading…";
    try {
      const response = await fetch(`v1/services/${encodeURIComponent(name)}/logs?tail=${LOG_LINES}`,
        { headers: authorized({ Accept: "application/json" }), cache: "no-store" });
      if (response.status === 401) { needToken(); return; }
      const body = await response.json();
      if (!response.ok) { pre.textContent = String(body && body.detail ? body.detail : response.status); return; }
      setText("log-file", body.file);
      pre.textContent = list(body.lines).join("\n") || "(empty)";
    } catch (err) {
      pre.textContent = `failed: ${err && err.message ? err.message : err}`;
    }
    card.scrollIntoView({ block: "nearest" });
  }

  function ms(value) { return typeof value === "number" ? `${value < 10 ? value.toFixed(1) : Math.round(value)} ms` : "—"; }

  // the model gateway's traffic per model (serve --gateway); the card stays hidden without it
  function renderModels(models) {
    const tbody = $("models").querySelector("tbody");
    clear(tbody);
    for (const m of models) {
      const caused = Object.entries(m.caused || {}).filter(([, n]) => Number(n) > 0)
        .map(([what, n]) => `${n} ${what}${Number(n) === 1 ? "" : what === "switch" ? "es" : "s"}`);
      tbody.append(el("tr", { dataset: { model: String(m.model) } },
        el("td", { class: "model" }, dash(m.model)),
        el("td", { class: "service" }, dash(m.service)),
        el("td", { class: "num requests" }, dash(m.requests)),
        el("td", { class: "num in-flight" }, dash(m.in_flight)),
        el("td", { class: "num queued" }, dash(m.queued)),
        el("td", { class: "num ttfb" }, `${ms(m.ttfb_p50_ms)} / ${ms(m.ttfb_p99_ms)}`),
        el("td", { class: "num total" }, `${ms(m.total_p50_ms)} / ${ms(m.total_p99_ms)}`),
        el("td", { class: "caused" }, caused.length ? caused.join(", ") : "—"),
        el("td", { class: "num errors" }, dash(m.errors))));
    }
    setText("models-count", models.length ? String(models.length) : "");
    show("models-card", models.length > 0);
  }

  // a UUID's first block is enough to tell leases apart on one screen (the full id is the tooltip)
  function shortId(id) {
    const text = dash(id);
    return /^[0-9a-f]{8}-[0-9a-f-]{27}$/i.test(text) ? text.slice(0, 8) : text;
  }

  function remainingOf(lease) {
    if (typeof lease.remaining_s === "number") return lease.remaining_s;
    if (lease.expires_at) return (Date.parse(lease.expires_at) - Date.now()) / 1000;
    return null;
  }

  function renderLeases(leases) {
    const tbody = $("leases").querySelector("tbody");
    clear(tbody);
    for (const lease of leases) {
      const remaining = remainingOf(lease);
      const cell = el("td", { class: "num remaining", title: lease.expires_at ? `expires ${lease.expires_at}` : null },
        remaining === null ? "no expiry" : duration(remaining));
      if (remaining !== null) cell.dataset.base = String(remaining);
      tbody.append(el("tr", { dataset: { lease: String(lease.id) } },
        el("td", { class: "id mono", title: String(lease.id) }, shortId(lease.id)),
        el("td", { class: "service" }, dash(lease.service)),
        el("td", { class: "holder" }, dash(lease.holder)),
        el("td", { class: "num gpu" }, dash(lease.gpu)),
        el("td", { class: "model" }, dash(lease.model)),
        cell));
    }
    setText("leases-count", leases.length ? String(leases.length) : "");
    show("leases-empty", !leases.length);
  }

  // waiting demands (with holder and reason), then the plan's other pending items (a service
  // whose port a squatter holds, one that does not fit, …)
  function renderPending(demands, pending) {
    const items = demands.map((d) => ({ id: d.id, service: d.service, holder: d.holder, reason: d.reason, waited: d.waited_s }));
    const ids = new Set(items.map((d) => d.id));
    for (const p of pending) {
      if (!(p.demand && ids.has(p.demand))) items.push({ id: p.demand, service: p.service, holder: null, reason: p.reason });
    }
    const ul = $("pending");
    clear(ul);
    for (const item of items) {
      ul.append(el("li", { dataset: { service: String(item.service) } },
        el("div", { class: "pending-head" },
          el("strong", {}, dash(item.service)),
          item.holder ? el("span", { class: "muted" }, ` for ${item.holder}`) : null,
          typeof item.waited === "number" ? el("span", { class: "muted" }, ` · waiting ${duration(item.waited)}`) : null),
        el("div", { class: "reason" }, dash(item.reason))));
    }
    setText("pending-count", items.length ? String(items.length) : "");
    show("pending-empty", !items.length);
  }

  const SYMBOLS = { adopt: "⇐", start: "+", restart: "↻", stop: "−", evict: "✕", lease: "→", release: "←" };

  function renderPlan(plan) {
    const ol = $("plan");
    clear(ol);
    const actions = list(plan && plan.actions);
    for (const action of actions) {
      const kind = String(action.kind || "");
      const bits = [];
      if (Array.isArray(action.gpus)) bits.push(`GPU ${action.gpus.join(",")}`);
      else if (action.gpu !== undefined && action.gpu !== null) bits.push(`GPU ${action.gpu}`);
      if (action.mb) bits.push(Array.isArray(action.gpus) ? `${action.gpus.length}×${mb(action.mb)}` : mb(action.mb));
      if (list(action.requires).length) bits.push(`after ${action.requires.join(", ")}`);
      ol.append(el("li", { class: `action kind-${kind.replace(/[^a-z]/g, "")}`, dataset: { action: String(action.id || kind) } },
        el("span", { class: "symbol", "aria-hidden": "true" }, SYMBOLS[kind] || "•"),
        el("div", {},
          el("div", {}, el("strong", {}, kind), " ", dash(action.service),
            bits.length ? el("span", { class: "muted" }, ` · ${bits.join(" · ")}`) : null),
          el("div", { class: "reason" }, dash(action.reason)))));
    }
    const summary = plan && plan.summary && typeof plan.summary === "object"
      ? Object.entries(plan.summary).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", ") : "";
    setText("plan-summary", summary);
    const pending = list(plan && plan.pending).length;
    $("plan-empty").textContent = !plan ? "No plan yet: no pass has finished."
      : pending ? `No actions; ${pending} pending (see Pending).` : "No changes: the host matches the profile.";
    show("plan-empty", !actions.length);
  }

  // countdowns between fetches: lease TTLs go down, uptimes go up
  function tick() {
    if (!state.status) return;
    const dt = elapsed();
    for (const cell of document.querySelectorAll("#leases td.remaining[data-base]")) {
      const left = Number(cell.dataset.base) - dt;
      cell.textContent = left > 0 ? duration(left) : "expired";
      cell.classList.toggle("soon", left > 0 && left < 30);
      cell.classList.toggle("expired", left <= 0);
    }
    for (const cell of document.querySelectorAll("#instances td.uptime[data-base]")) {
      cell.textContent = duration(Number(cell.dataset.base) + dt);
    }
  }

  // ---- events -----------------------------------------------------------------------------

  // one line per event, as `reconciler watch` prints it
  function summarize(kind, data) {
    if (data === null || data === undefined) return "";
    if (typeof data !== "object") return String(data);
    const message = data.message ? String(data.message) : "";
    if (kind === "pass.finished") {
      const outcomes = Object.entries(data.outcomes || {}).map(([k, n]) => `${n} ${k}`).join(", ");
      const bits = [outcomes || "nothing to do"];
      for (const p of list(data.pending)) bits.push(`pending ${p.service}: ${p.reason}`);
      for (const [name, why] of Object.entries(data.stalled || {})) bits.push(`stalled ${name}: ${why}`);
      return `pass ${dash(data.pass)} (${dash(data.reason)})` +
        (typeof data.duration_s === "number" ? ` in ${data.duration_s} s` : "") + `: ${bits.join("; ")}`;
    }
    if (kind === "action.started") return `→ ${dash(data.action)}${message ? ": " + message : ""}`;
    if (kind === "action.finished") {
      return `${SYMBOL_OF[data.status] || "?"} ${dash(data.action)} ${dash(data.status)}` +
        (typeof data.duration_s === "number" ? ` in ${data.duration_s} s` : "") + (message ? `: ${message}` : "");
    }
    if (kind === "profile.rejected") {
      const where = list(data.diagnostics).map((d) => `${d.file}:${d.line}:${d.col}: ${d.message}`);
      return [message, ...where].filter(Boolean).join(" · ");
    }
    if (message) return message;
    const skip = new Set(["id", "ts", "kind", "service", "message"]);
    const parts = [];
    for (const [key, value] of Object.entries(data)) {
      if (skip.has(key) || value === null || value === undefined || value === "") continue;
      if (Array.isArray(value) && !value.length) continue;
      parts.push(`${key}=${typeof value === "object" ? JSON.stringify(value) : value}`);
    }
    const text = parts.join(" ");
    return text.length > 240 ? text.slice(0, 239) + "…" : text;
  }

  // a reconnecting stream sends Last-Event-ID and the server replays what came after it:
  // skip what we already logged
  const seenIds = new Set();
  function fresh(id) {
    if (!id) return true;
    if (seenIds.has(id)) return false;
    seenIds.add(id);
    if (seenIds.size > 4 * EVENTS_MAX) seenIds.delete(seenIds.values().next().value);
    return true;
  }

  function logEvent(kind, raw, id) {
    if (!fresh(id)) return;
    let data = raw;
    try { data = JSON.parse(raw); } catch (e) { /* plain text data */ }
    const obj = data && typeof data === "object" ? data : {};
    kind = kind && kind !== "message" ? kind : (obj.kind || "message");
    state.events += 1;
    state.eventAt[kind] = Date.now();
    if (SILENT.has(kind)) return;
    scheduleRefresh();
    if (kind === "pass.finished" && obj.quiet) return; // a pass that found nothing to do
    // a gateway request's implicit lease (two per request): the Models card counts them
    if ((kind === "lease.granted" || kind === "lease.released") && String(obj.holder || "").startsWith("gateway ")) return;
    const ol = $("events");
    const failed = kind === "action.finished" && obj.status === "failed";
    const severity = failed || /fail|reject|degrad|backoff|gone/.test(kind) ? "bad"
      : /granted|healthy|adopted|reloaded/.test(kind) ? "good" : "";
    const known = KNOWN.has(kind);
    ol.prepend(el("li", { class: severity ? `ev ev-${severity}` : "ev", dataset: known ? { kind } : { kind, unknown: "1" } },
      el("time", { class: "mono muted" }, clock(obj.ts)),
      el("span", { class: "ev-kind mono", title: known ? null : "a kind this page does not know (a newer server?)" }, kind),
      el("span", { class: "ev-service", title: obj.service ? String(obj.service) : null }, obj.service ? String(obj.service) : ""),
      el("span", { class: "ev-text" }, summarize(kind, data))));
    while (ol.children.length > EVENTS_MAX) ol.removeChild(ol.lastChild);
    show("events-empty", false);
  }

  // ---- the token ----------------------------------------------------------------------------

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function setToken(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage disabled: the form asks again on the next load */ }
  }

  // #token=… in the URL: keep it for this tab, and take it out of the address bar and history
  function takeTokenFromUrl() {
    const match = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
    if (!match) return;
    try { setToken(decodeURIComponent(match[1]).trim()); } catch (e) { /* malformed escape: ignored */ }
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function authorized(headers) {
    const value = token();
    return value ? Object.assign({ Authorization: `Bearer ${value}` }, headers) : headers;
  }

  // a 401: show the form (saying so when the token we sent was refused), stop the stream
  function needToken() {
    const refused = Boolean(token());
    setToken("");
    state.needToken = true;
    if (state.stream) state.stream.abort();
    $("auth-error").textContent = refused ? "That token was not accepted (401). Check the server's --token-file." : "";
    $("auth").hidden = false;
    setConn("bad", "token needed");
  }

  function onTokenSubmit(event) {
    event.preventDefault();
    const value = String($("auth").elements.token.value || "").trim();
    if (!value) return;
    setToken(value);
    $("auth").elements.token.value = "";
    $("auth").hidden = true;
    $("auth-error").textContent = "";
    state.needToken = false;
    setConn("wait", "connecting…");
    refresh();
    stream();
  }

  // ---- the event stream: fetch() + a server-sent events parser --------------------------------

  // feeds text as it arrives; calls onEvent(kind, data, id) for each complete event (the SSE format:
  // "field: value" lines, a blank line ends an event, ":" starts a comment)
  function sseParser(onEvent) {
    let buffer = "";
    let kind = "";
    let data = [];
    let id = "";
    return function feed(text) {
      buffer += text;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) onEvent(kind || "message", data.join("\n"), id);
          kind = ""; data = []; id = "";
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") kind = value;
        else if (field === "data") data.push(value);
        else if (field === "id" && !value.includes("\0")) id = value;
      }
    };
  }

  async function stream() {
    if (state.streaming || state.needToken) return;
    if (!window.fetch || !window.ReadableStream || !window.TextDecoder) {
      setConn("bad", "no live updates (polling)");
      return;
    }
    state.streaming = true;
    const controller = new AbortController();
    state.stream = controller;
    try {
      const headers = authorized({ Accept: "text/event-stream" });
      if (state.lastId) headers["Last-Event-ID"] = state.lastId;
      // on load, the stored history first (the last EVENTS_MAX events); a reconnect replays after Last-Event-ID
      const url = state.lastId ? "v1/events" : `v1/events?tail=${EVENTS_MAX}`;
      const response = await fetch(url, { headers, cache: "no-store", signal: controller.signal });
      if (response.status === 401) { needToken(); return; }
      if (!response.ok || !response.body) throw new Error(`GET /v1/events: ${response.status}`);
      setConn("ok", "live");
      state.retries = 0;
      scheduleRefresh(); // whatever happened while we were not listening
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      const feed = sseParser((kind, data, id) => {
        if (id) state.lastId = id;
        logEvent(kind, data, id);
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(decoder.decode(value, { stream: true }));
      }
      throw new Error("the server ended the stream");
    } catch (err) {
      if (controller.signal.aborted || state.needToken) return;
      const wait = RETRY_MS[Math.min(state.retries, RETRY_MS.length - 1)];
      state.retries += 1;
      setConn("wait", "reconnecting…");
      setTimeout(stream, wait);
    } finally {
      state.streaming = false;
      if (state.stream === controller) state.stream = null;
    }
  }

  function setConn(kind, text) {
    const node = $("conn");
    node.className = `conn conn-${kind}`;
    node.textContent = text;
  }

  // ---- the cluster (serve --etcd): every node, from GET v1/cluster --------------------------

  // One row per node: alive, each GPU's reserved/total MB (with a small bar), what runs there, its
  // lease count and API; then every lease of the cluster by node. Other nodes' changes do not come
  // through this node's event stream, so the card is fetched every CLUSTER_POLL_MS while shown.
  function renderCluster(doc) {
    setText("cluster-name", doc.cluster);
    setText("cluster-updated", `seen from ${dash(doc.node)} · ${clock()}`);
    const tbody = $("cluster").querySelector("tbody");
    clear(tbody);
    for (const node of list(doc.nodes)) {
      const gpus = el("td", { class: "gpus" });
      for (const gpu of list(node.gpus)) {
        const total = Math.max(0, Number(gpu.total_mb) || 0);
        const reserved = Math.max(0, Number(gpu.reserved_mb) || 0);
        const share = total ? Math.min(100, (100 * reserved) / total) : 0;
        const fill = el("span", { class: "mini-fill" });
        fill.style.width = `${share.toFixed(1)}%`; // CSSOM, not a style attribute (a strict CSP allows it)
        gpus.append(el("div", { class: "cluster-gpu", dataset: { gpu: String(gpu.index) } },
          el("span", { class: "mono" }, `GPU ${dash(gpu.index)}: ${mb(reserved)} / ${mb(total)}`),
          el("span", { class: "mini-bar", "aria-hidden": "true" }, fill)));
      }
      if (!list(node.gpus).length) gpus.append("—");
      const url = safeUrl(node.url);
      tbody.append(el("tr", { dataset: { node: String(node.node) }, class: node.alive ? null : "down" },
        el("td", { class: "node" }, dash(node.node), node.node === doc.node ? el("span", { class: "muted" }, " (this)") : null),
        el("td", { class: "alive" }, node.alive ? "yes" : "no"),
        gpus,
        el("td", { class: "running" }, list(node.running).join(", ") || "—"),
        el("td", { class: "num leases" }, String(Number(node.leases) || 0)),
        el("td", { class: "url mono" }, url ? el("a", { href: url, rel: "noopener noreferrer" }, node.url) : dash(node.url))));
    }
    const leases = $("cluster-leases").querySelector("tbody");
    clear(leases);
    let count = 0;
    const byNode = doc.leases && typeof doc.leases === "object" ? doc.leases : {};
    for (const node of Object.keys(byNode).sort()) {
      for (const lease of list(byNode[node])) {
        count += 1;
        leases.append(el("tr", { dataset: { lease: String(lease.id), node } },
          el("td", { class: "node" }, node),
          el("td", { class: "id mono", title: String(lease.id) }, shortId(lease.id)),
          el("td", { class: "service" }, dash(lease.service)),
          el("td", { class: "holder" }, dash(lease.holder)),
          el("td", { class: "num gpu" }, dash(lease.gpu)),
          el("td", { class: "model" }, dash(lease.model))));
      }
    }
    show("cluster-leases-empty", count === 0);
    show("cluster-card", true);
    state.clusterRenders += 1;
    document.body.dataset.clusterRenders = String(state.clusterRenders);
  }

  async function refreshCluster() {
    if (state.needToken || !state.status || !state.status.cluster || state.clusterFetching) return;
    state.clusterFetching = true;
    try {
      const response = await fetch("v1/cluster", { headers: authorized({ Accept: "application/json" }), cache: "no-store" });
      if (response.status === 401) { needToken(); return; }
      if (!response.ok) {
        let detail = `${response.status}`;
        try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
        throw new Error(detail);
      }
      renderCluster(await response.json());
      $("cluster-card").classList.remove("stale");
    } catch (err) {
      $("cluster-card").classList.add("stale");
      setText("cluster-updated", `cluster view failed: ${err && err.message ? err.message : err}`);
    } finally {
      state.clusterFetching = false;
    }
  }

  // ---- status fetching --------------------------------------------------------------------

  // The first event after a quiet spell fetches at once (a lease shows up in a few ms); the
  // events that follow within REFRESH_GAP_MS share one more fetch after them, so the page
  // always ends on a status fetched after the last event.
  function scheduleRefresh() {
    if (state.timer !== null) return;
    const wait = Math.max(0, state.lastFetch + REFRESH_GAP_MS - performance.now());
    state.timer = setTimeout(() => { state.timer = null; refresh(); }, wait);
  }

  async function refresh() {
    if (state.needToken) return;
    if (state.fetching) { state.again = true; return; }
    state.fetching = true;
    state.lastFetch = performance.now();
    try {
      const response = await fetch("v1/status", { headers: authorized({ Accept: "application/json" }), cache: "no-store" });
      if (response.status === 401) { needToken(); return; }
      if (!response.ok) throw new Error(`GET /v1/status: ${response.status}`);
      const status = await response.json();
      state.status = status;
      state.fetchedAt = performance.now();
      render(status);
      if (status.cluster) refreshCluster(); else show("cluster-card", false);
      tick();
      document.body.classList.remove("stale");
    } catch (err) {
      document.body.classList.add("stale");
      setText("updated", `failed: ${err && err.message ? err.message : err}`);
    } finally {
      state.fetching = false;
      if (state.again) { state.again = false; scheduleRefresh(); }
    }
  }

  function init() {
    setText("events-max", String(EVENTS_MAX));
    takeTokenFromUrl();
    $("auth").addEventListener("submit", onTokenSubmit);
    refresh();
    stream();
    setInterval(tick, TICK_MS);
    setInterval(refresh, FALLBACK_POLL_MS);
    setInterval(refreshCluster, CLUSTER_POLL_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
