// The status page: polls status.json every 3 s and redraws; charts are hand-drawn SVG (no library, no CDN).
"use strict";
(function () {
  const POLL_MS = 3000;
  const token = new URLSearchParams(location.search).get("token");
  const curves = {};  // project -> {job, points: [{epoch, loss, map50}]}, filled from the polls of a running training

  function withToken(url) {
    return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const num = (v, d = 3) => (v === null || v === undefined || Number.isNaN(Number(v)) ? "–" : Number(v).toFixed(d));
  const usd = (v) => (v === null || v === undefined ? "not measured yet" : "$" + Number(v).toFixed(4));
  const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "–");
  const secs = (s) => (s === null || s === undefined ? "–" : s >= 60 ? Math.floor(s / 60) + " min " + Math.round(s % 60) + " s" : Math.round(s) + " s");

  function table(headers, rows, id) {
    return el("div", { class: "scroll" }, el("table", { id },
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))))));
  }

  // A line chart of one or more series [{name, points: [[x, y]]}] as SVG.
  function lineChart(series, label, id) {
    const W = 480, H = 160, P = 30;
    const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && p[1] !== undefined);
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    if (id) svg.setAttribute("id", id);
    const add = (tag, attrs, text) => {
      const n = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
      if (text !== undefined) n.textContent = text;
      svg.append(n);
      return n;
    };
    add("line", { class: "axis", x1: P, y1: H - P, x2: W - 5, y2: H - P });
    add("line", { class: "axis", x1: P, y1: 5, x2: P, y2: H - P });
    if (!pts.length) {
      add("text", { x: P + 10, y: H / 2 }, "no data yet");
      return svg;
    }
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(...ys, y0 + 1e-9);
    const sx = (x) => P + (x1 === x0 ? (W - P - 5) / 2 : ((x - x0) / (x1 - x0)) * (W - P - 5));
    const sy = (y) => H - P - ((y - y0) / (y1 - y0)) * (H - P - 10);
    add("text", { x: 2, y: 12 }, num(y1, 2));
    add("text", { x: 2, y: H - P }, num(y0, 2));
    series.forEach((s, i) => {
      const good = s.points.filter((p) => p[1] !== null && p[1] !== undefined);
      if (!good.length) return;
      add("polyline", { class: "l" + i, points: good.map((p) => sx(p[0]) + "," + sy(p[1])).join(" ") });
      good.forEach((p) => add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: "l" + i }));
      add("text", { x: P + 8 + i * 110, y: H - 8 }, "— " + s.name);
    });
    return svg;
  }

  async function rollback(project, version, button) {
    button.disabled = true;
    const response = await fetch(withToken("models/rollback"), {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ project, version }),
    });
    const answer = await response.json().catch(() => ({}));
    button.textContent = response.ok ? "now current" : "failed: " + (answer.message || response.status);
    poll();
  }

  function versionsCard(p) {
    const rows = p.versions.slice().reverse().map((v) => {
      const c = v.counts || {};
      const action = v.state === "current" ? el("b", {}, "current")
        : el("button", { type: "button", class: "rollback", "data-version": v.version }, "roll back to " + v.version);
      if (action.tagName === "BUTTON") action.addEventListener("click", () => rollback(p.project, v.version, action));
      return [v.version, when(v.created_at), c.human_tasks ?? c.tasks ?? "–", c.draft_tasks ?? 0,
        el("td", { class: "num" }, num(v.map50)), el("td", { class: "num" }, num(v.map50_95)),
        v.promotion_reason || (v.gate && v.gate.reason) || v.state, action];
    });
    const chart = lineChart([
      { name: "mAP50", points: p.versions.map((v, i) => [i + 1, v.map50]) },
      { name: "mAP50-95", points: p.versions.map((v, i) => [i + 1, v.map50_95]) },
    ], "held-out mAP per version", "map-chart-" + p.project);
    return el("section", { class: "card versions" }, el("h3", {}, "Versions (current: ",
      el("span", { class: "current-version" }, p.current_version || "none"), ")"), chart,
    table(["version", "created", "human tasks", "draft tasks", "mAP50", "mAP50-95", "gate / why", ""], rows, "versions-" + p.project));
  }

  function trainingsCard(p) {
    const rows = (p.trainings || []).map((t) => [when(t.finished_at),
      el("span", { class: t.status === "promoted" ? "good" : t.status === "failed" || t.status === "rejected" ? "bad" : "" }, t.status),
      t.candidate_version || t.version || "–", el("td", { class: "num" }, num(t.map50)), secs(t.seconds), t.reason || ""]);
    return el("section", { class: "card" }, el("h3", {}, "Training history (rejected ones too)"),
      rows.length ? table(["finished", "status", "version", "mAP50", "took", "reason"], rows, "trainings-" + p.project)
        : el("p", { class: "muted" }, "no training yet"));
  }

  function liveCard(p) {
    const live = p.live || {}, pr = live.progress || null;
    const state = curves[p.project] || (curves[p.project] = { job: null, points: [] });
    const job = live.running && live.running.job_id;
    if (job && state.job !== job) { state.job = job; state.points = []; }
    if (pr && pr.epoch && !state.points.some((q) => q.epoch === pr.epoch)) {
      const losses = Object.values(pr.losses || {});
      state.points.push({ epoch: pr.epoch, loss: losses.length ? losses.reduce((a, b) => a + b, 0) : null,
        map50: (pr.metrics || {})["metrics/mAP50(B)"] ?? null });
    }
    const share = pr && pr.epochs ? Math.round((100 * (pr.epoch || 0)) / pr.epochs) : 0;
    const body = job || live.queued ? [
      el("div", { class: "kv" },
        el("div", {}, "stage", el("b", { class: "live-stage" }, (pr && pr.stage) || (job ? "starting" : "queued"))),
        el("div", {}, "epoch", el("b", { class: "live-epoch" }, pr && pr.epoch ? pr.epoch + " / " + pr.epochs : "–")),
        el("div", {}, "elapsed", el("b", {}, secs(pr && pr.elapsed_s))),
        el("div", {}, "remaining", el("b", {}, secs(live.remaining_s))),
        el("div", {}, "queue position", el("b", {}, live.queue_position ?? (live.queued ? "queued" : "–")))),
      el("div", { class: "bar", title: share + "%" }, el("span", { style: "width:" + share + "%" })),
      lineChart([{ name: "train loss", points: state.points.map((q) => [q.epoch, q.loss]) },
        { name: "val mAP50", points: state.points.map((q) => [q.epoch, q.map50]) }], "training curves", "live-chart-" + p.project),
    ] : [el("p", { class: "muted live-stage" }, "no training running")];
    return el("section", { class: "card live", id: "live-" + p.project }, el("h3", {}, "Training now"), body);
  }

  function qualityCard(p) {
    const q = p.quality, r = p.routing || {};
    const parts = [el("p", { class: "routing" }, "ROUTING=" + r.mode + ": drafts come from ", el("b", {}, r.first), " first (" + r.why + ")")];
    if (!q) {
      parts.push(el("p", { class: "muted" }, "Draft quality: not measured yet (the next training measures it)"));
    } else {
      const rows = Object.entries(q.sources || {}).map(([src, f]) => [src, el("td", { class: "num" }, num(f.precision)),
        el("td", { class: "num" }, num(f.recall)), el("td", { class: "num" }, num(f.map50)), f.n ?? "–"]);
      parts.push(table(["source", "precision", "recall", "mAP50", "tasks"], rows, "quality-" + p.project));
    }
    return el("section", { class: "card" }, el("h3", {}, "Draft quality"), parts);
  }

  const SOURCE_ORDER = ["yolo", "gemini"];
  const bySource = (a, b) => (SOURCE_ORDER.indexOf(a) + 1 || 99) - (SOURCE_ORDER.indexOf(b) + 1 || 99) || a.localeCompare(b);
  const FIGURES = [["map50", "mAP50"], ["map50_95", "mAP50-95"], ["precision", "P"], ["recall", "R"]];

  // Gemini vs YOLO on the same held-out tasks: one row per source, the better figure of each column marked.
  function sideBySide(p, ev) {
    const sbs = ev.side_by_side || {}, sources = Object.keys(sbs).sort(bySource);
    if (!sources.length) return [];
    const best = {};
    for (const [k] of FIGURES) {
      const values = sources.map((s) => sbs[s][k]).filter((v) => v !== null && v !== undefined);
      if (sources.length > 1 && values.length > 1) best[k] = Math.max(...values);
    }
    const rows = sources.map((s) => {
      const f = sbs[s];
      return [el("td", { "data-source": s }, s), ...FIGURES.map(([k]) => el("td",
        { class: "num" + (best[k] !== undefined && f[k] === best[k] ? " best" : ""), "data-figure": k }, num(f[k]))),
      el("td", { class: "num" }, f.n_images ?? "–"), el("td", { class: "num" }, f.n_gt ?? "–")];
    });
    const note = sources.length > 1 ? "on the same " + (ev.compared_tasks ?? "–") + " held-out tasks (best of each column in bold)"
      : "only " + sources[0] + " on the " + (ev.compared_tasks ?? "–") + " held-out tasks (no Gemini draft among them)";
    return [el("h3", {}, "Gemini vs YOLO"), el("p", { class: "muted" }, note),
      table(["source", ...FIGURES.map(([, h]) => h), "tasks", "GT boxes"], rows, "side-by-side-" + p.project)];
  }

  function perClass(p, ev) {
    const rows = [];
    for (const [cls, sources] of Object.entries(ev.per_class || {})) {
      const names = Object.keys(sources || {}).sort(bySource);
      names.forEach((src, i) => {
        const f = sources[src] || {};
        rows.push([i === 0 ? el("td", { rowspan: names.length, class: "cls" }, cls) : null, src,
          ...["ap50", "ap50_95", "precision", "recall"].map((k) => el("td", { class: "num" }, num(f[k]))),
          el("td", { class: "num" }, f.n_gt ?? "–")].filter((c) => c !== null));
      });
    }
    return rows.length ? [el("h3", {}, "Per class"), table(["class", "source", "AP50", "AP50-95", "P", "R", "GT"], rows, "per-class-" + p.project)] : [];
  }

  // rows: true class (then "background": predictions matching nothing); columns: predicted class (then "missed").
  function confusion(p, cm) {
    if (!cm || !cm.rows || !cm.matrix) return [];
    const rows = cm.matrix.map((line, i) => [el("th", { scope: "row" }, cm.rows[i]),
      ...line.map((n, j) => el("td", { class: "num" + (i === j && i < cm.classes.length ? " diag" : n ? " off" : " zero") }, n))]);
    const head = el("tr", {}, el("th", {}, "true \\ predicted"), cm.columns.map((c) => el("th", { class: "num" }, c)));
    return [el("h3", {}, "Confusion (YOLO, IoU ≥ " + cm.iou_threshold + ", " + cm.n_images + " tasks)"),
      el("div", { class: "scroll" }, el("table", { id: "confusion-" + p.project, class: "confusion" },
        el("thead", {}, head), el("tbody", {}, rows.map((r) => el("tr", {}, r))))),
      el("p", { class: "muted" }, "row background: predictions that match no true box; column missed: true boxes nothing found")];
  }

  function evaluationCard(p) {
    const ev = p.evaluation;
    if (!ev) {
      return el("section", { class: "card" }, el("h3", {}, "Evaluation"),
        el("p", { class: "muted" }, "Per-class AP, Gemini vs YOLO, confusion and label-error candidates: not measured yet"));
    }
    const errors = (ev.label_errors || []).map((e) => [
      e.link || p.links.task ? el("a", { href: e.link || p.links.task + e.task_id, target: "_blank", rel: "noopener" }, "task " + e.task_id)
        : "task " + e.task_id,
      e.label, e.kind, el("td", { class: "num" }, num(e.score, 2))]);
    return el("section", { class: "card evaluation" },
      el("h3", {}, "Evaluation of " + (ev.version || "the served model") + " (" + when(ev.measured_at) + ")"),
      sideBySide(p, ev), perClass(p, ev), confusion(p, ev.confusion),
      errors.length ? [el("h3", {}, "Label-error candidates"), table(["task", "label", "kind", "score"], errors, "label-errors-" + p.project)]
        : el("p", { class: "muted" }, "no label-error candidates"));
  }

  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");

  function moneyCard(p) {
    const m = p.money;
    if (!m) return el("section", { class: "card" }, el("h3", {}, "Money"), el("p", { class: "muted" }, "not readable"));
    const id = (k) => "money-" + p.project + "-" + k;
    const tiers = Object.entries(m.spend_by_tier_usd || {}).sort().map(([t, v]) => [t, el("td", { class: "num" }, usd(v))]);
    const sources = Object.entries(m.tasks_by_source || {}).sort().map(([s, n]) => [s, el("td", { class: "num" }, n),
      el("td", { class: "num" }, pct(m.drafted_tasks ? n / m.drafted_tasks : null))]);
    const share = Object.entries(m.share_by_source || {}).sort().map(([s, v]) => s + " " + pct(v)).join(" · ") || "–";
    return el("section", { class: "card money", id: "money-" + p.project }, el("h3", {}, "Money (this project)"),
      el("div", { class: "kv" },
        el("div", {}, "Gemini spend", el("b", { id: id("total") }, usd(m.total_usd))),
        el("div", {}, "drafted tasks", el("b", { id: id("drafted") }, m.drafted_tasks ?? 0)),
        el("div", {}, "share of drafts", el("b", { id: id("share") }, share)),
        el("div", {}, "cost per 1,000 drafts", el("b", { id: id("per1000") }, usd(m.cost_per_1000_tasks_usd))),
        el("div", {}, "YOLO saved", el("b", { id: id("saved") }, usd(m.yolo_savings_usd)),
          m.cost_per_task_measured || m.gemini_cost_per_task_usd === null ? "" : el("small", { class: "muted" }, "at the service-wide cost per task"))),
      tiers.length ? table(["tier", "spend"], tiers, "money-tiers-" + p.project) : el("p", { class: "muted" }, "no Gemini spend yet"),
      sources.length ? table(["drafted by", "tasks", "share"], sources, "money-sources-" + p.project) : el("p", { class: "muted" }, "no drafted task yet"));
  }

  function failuresCard(p) {
    const f = p.failures || {};
    const reasons = Object.entries(f.predictions || {}).filter(([, n]) => n > 0).map(([r, n]) => [r, el("td", { class: "num" }, n)]);
    const jobs = (f.jobs || []).map((j) => [when(j.ended_at), j.queue, j.job_id, j.message]);
    return el("section", { class: "card" }, el("h3", {}, "Failures"),
      reasons.length ? table(["prediction failure (all projects)", "tasks"], reasons) : el("p", { class: "muted" }, "no prediction failures"),
      jobs.length ? table(["when", "queue", "job", "message"], jobs, "failed-jobs-" + p.project) : el("p", { class: "muted" }, "no failed jobs"));
  }

  function renderMoney(data) {
    const m = data.money || {}, t = data.totals || {};
    const tok = m.tokens || {}, cache = m.cache || {}, pred = t.predictions || {};
    document.querySelector("#money .body").replaceChildren(el("div", { class: "kv" },
      el("div", {}, "Gemini today", el("b", { id: "money-today" }, usd(m.today_usd))),
      el("div", {}, "Gemini total", el("b", { id: "money-total" }, usd(m.total_usd))),
      el("div", {}, "tokens in / out", el("b", { id: "money-tokens" }, (tok.input || 0) + " / " + ((tok.output || 0) + (tok.thinking || 0)))),
      el("div", {}, "cache hits", el("b", { id: "money-cache" }, cache.hit || 0)),
      el("div", {}, "drafts Gemini / YOLO", el("b", { id: "predictions" }, (pred.gemini || 0) + " / " + (pred.yolo || 0))),
      el("div", {}, "Gemini cost per task", el("b", {}, usd(m.gemini_cost_per_task_usd))),
      el("div", {}, "cost per 1,000 drafts", el("b", { id: "money-per1000" }, usd(m.cost_per_1000_tasks_usd))),
      el("div", {}, "spend by tier", el("b", { id: "money-tiers", class: "list" },
        Object.entries(m.spend_by_tier_usd || {}).sort().map(([k, v]) => el("span", {}, k + " " + usd(v))))),
      el("div", {}, "YOLO saved", el("b", { id: "money-saved" }, usd(m.yolo_savings_usd)))));
  }

  function render(data) {
    document.getElementById("summary").textContent = data.projects.length + " project(s) · ROUTING=" + data.routing +
      " · Gemini " + (data.gemini_enabled ? "on" : "off");
    renderMoney(data);
    document.getElementById("projects").replaceChildren(...data.projects.map((p) => el("section", { class: "project", id: "project-" + p.project },
      el("h2", {}, "Project " + p.project + " ", p.links.project ? el("a", { href: p.links.project, target: "_blank", rel: "noopener" }, "open in Label Studio") : ""),
      liveCard(p), versionsCard(p), moneyCard(p), evaluationCard(p), qualityCard(p), trainingsCard(p), failuresCard(p))));
    document.getElementById("updated").textContent = "updated " + when(data.generated_at);
    document.body.dataset.generatedAt = data.generated_at;
  }

  async function poll() {
    try {
      const response = await fetch(withToken("status.json"), { credentials: "same-origin", cache: "no-store" });
      if (response.ok) render(await response.json());
      else document.getElementById("summary").textContent = "status.json answered " + response.status;
    } catch (err) {
      document.getElementById("summary").textContent = "status.json unreachable: " + err;
    }
  }
  poll();
  setInterval(poll, POLL_MS);
})();
