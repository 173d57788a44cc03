// linkup live status page.
//
// One WebSocket to /status/live on this bridge; the bridge pushes a whole
// "view" (a snapshot, see docs) whenever something changed, and the page
// redraws from it. Nothing is polled.
//
// Filenames, worker and session ids come from plugins, so they are untrusted:
// everything is written with textContent / setAttribute, never as HTML.
"use strict";

(() => {
  // ---- Strings -----------------------------------------------------------

  // One dictionary per language; "{name}" is filled in by t().
  const STRINGS = {
    en: {
      title: "linkup status",
      subtitle: "Live status of this upload pool",
      langSwitch: "中文",
      langSwitchTitle: "切换到中文",
      connectionLive: "Live",
      connectionConnecting: "Connecting…",
      connectionOffline: "Offline · retrying",
      coreUp: "Core link up",
      coreDown: "Core link down",
      coreUnknown: "Core link unknown",
      queue: "Queue",
      pending: "Waiting",
      active: "Uploading",
      totals: "Totals",
      submitted: "Submitted",
      completed: "Completed",
      failed: "Failed",
      retried: "Retried",
      cancelled: "Cancelled",
      throughput: "Throughput · last 5 minutes",
      tasksPerSecond: "tasks/s",
      lastMinute: "average over the last minute",
      megabytesPerSecond: "MB/s",
      time: "time",
      now: "now",
      minutesAgo: "−{n} min",
      secondsAgo: "−{n} s",
      links: "Links",
      thisBridge: "This bridge",
      bridges: "Bridges and their clients",
      bridgeClients: "{n} clients",
      heardAgo: "heard {n} s ago",
      noBridges: "No bridge linked.",
      sessions: "Sessions",
      sessionsSummary: "{running} running",
      noSessions: "No sessions yet.",
      sessionsOmitted: "+{n} more sessions not shown",
      sessionMeta:
        "{pending} waiting · {active} uploading · {failed} failed · {cancelled} cancelled",
      state_open: "open",
      state_paused: "paused",
      state_completed: "completed",
      state_cancelled: "cancelled",
      workers: "Workers",
      workersSummary: "{busy} busy · {idle} idle · {resting} resting",
      noWorkers: "No workers connected.",
      workersOmitted: "+{n} more workers not shown",
      colWorker: "Worker",
      colState: "State",
      colCompleted: "Done",
      colFailed: "Failed",
      colBytes: "Uploaded",
      colFile: "Current file",
      state_idle: "idle",
      state_busy: "busy",
      state_resting: "resting",
      version: "linkup {v}",
      updatedAgo: "updated {n} s ago",
      waiting: "Waiting for the first update…",
    },
    zh: {
      title: "linkup 运行状态",
      subtitle: "上传池实时状态",
      langSwitch: "English",
      langSwitchTitle: "Switch to English",
      connectionLive: "实时",
      connectionConnecting: "连接中…",
      connectionOffline: "已断开 · 正在重连",
      coreUp: "核心连接正常",
      coreDown: "核心连接中断",
      coreUnknown: "核心连接未知",
      queue: "队列",
      pending: "排队中",
      active: "上传中",
      totals: "累计",
      submitted: "已提交",
      completed: "已完成",
      failed: "失败",
      retried: "重试",
      cancelled: "已取消",
      throughput: "吞吐量 · 最近 5 分钟",
      tasksPerSecond: "任务/秒",
      lastMinute: "最近一分钟平均",
      megabytesPerSecond: "MB/秒",
      time: "时间",
      now: "现在",
      minutesAgo: "−{n} 分",
      secondsAgo: "−{n} 秒",
      links: "连接",
      thisBridge: "本桥接",
      bridges: "桥接及其客户端",
      bridgeClients: "{n} 个客户端",
      heardAgo: "{n} 秒前有消息",
      noBridges: "没有已连接的桥接。",
      sessions: "会话",
      sessionsSummary: "{running} 个进行中",
      noSessions: "暂无会话。",
      sessionsOmitted: "另有 {n} 个会话未显示",
      sessionMeta: "排队 {pending} · 上传中 {active} · 失败 {failed} · 取消 {cancelled}",
      state_open: "进行中",
      state_paused: "已暂停",
      state_completed: "已完成",
      state_cancelled: "已取消",
      workers: "工作者",
      workersSummary: "上传中 {busy} · 空闲 {idle} · 休息 {resting}",
      noWorkers: "暂无工作者连接。",
      workersOmitted: "另有 {n} 个工作者未显示",
      colWorker: "工作者",
      colState: "状态",
      colCompleted: "完成",
      colFailed: "失败",
      colBytes: "已上传",
      colFile: "当前文件",
      state_idle: "空闲",
      state_busy: "上传中",
      state_resting: "休息中",
      version: "linkup {v}",
      updatedAgo: "{n} 秒前更新",
      waiting: "等待首次更新…",
    },
  };
  const HTML_LANG = { en: "en", zh: "zh-CN" };
  const LANG_KEY = "linkup.lang";

  // ---- State -------------------------------------------------------------

  const RECONNECT_MIN_MS = 500;
  const RECONNECT_MAX_MS = 5000;
  // The core sends a view at least every 5 s; much longer means trouble.
  const STALE_AFTER_S = 12;
  const CHART_HEIGHT = 200;

  let lang = chooseLanguage();
  let lastView = null;
  let lastViewAt = 0; // Date.now() when lastView arrived
  let connection = "connecting"; // "connecting" | "live" | "offline"
  let reconnectDelay = RECONNECT_MIN_MS;
  let chart = null;

  const $ = (id) => document.getElementById(id);

  // ---- Language ----------------------------------------------------------

  function storedLanguage() {
    // localStorage throws in some private modes; the page works without it.
    try {
      return localStorage.getItem(LANG_KEY);
    } catch {
      return null;
    }
  }

  function chooseLanguage() {
    const stored = storedLanguage();
    if (stored && stored in STRINGS) return stored;
    for (const tag of navigator.languages || [navigator.language || ""]) {
      const lower = String(tag).toLowerCase();
      if (lower.startsWith("zh")) return "zh";
      if (lower.startsWith("en")) return "en";
    }
    return "en";
  }

  function t(key, params = {}) {
    const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
    return text.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""));
  }

  function switchLanguage() {
    lang = lang === "zh" ? "en" : "zh";
    try {
      localStorage.setItem(LANG_KEY, lang);
    } catch {
      // Not stored: the switch still holds until the page is reloaded.
    }
    applyLanguage();
  }

  // Fill every static label, then redraw what came from the last view.
  function applyLanguage() {
    document.documentElement.lang = HTML_LANG[lang];
    document.title = t("title");
    for (const node of document.querySelectorAll("[data-i18n]")) {
      node.textContent = t(node.dataset.i18n);
    }
    const button = document.querySelector('[data-testid="lang-switch"]');
    button.textContent = t("langSwitch");
    button.title = t("langSwitchTitle");
    button.lang = lang === "zh" ? "en" : "zh-CN";
    renderConnection();
    rebuildChart(); // series labels are translated
    render(lastView);
  }

  // ---- Formatting --------------------------------------------------------

  function formatNumber(n) {
    return Number(n ?? 0).toLocaleString(HTML_LANG[lang]);
  }

  // Decimal units, like the chart's MB/s.
  function formatBytes(n) {
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = Number(n) || 0;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    const digits = unit === 0 || value >= 100 ? 0 : 1;
    return `${value.toFixed(digits)} ${units[unit]}`;
  }

  function formatRate(value) {
    if (value == null) return "–";
    if (value === 0) return "0";
    if (value < 0.01) return "<0.01"; // some, but not "0.00"
    return value >= 10 ? value.toFixed(0) : value.toFixed(2);
  }

  function formatRelativeTime(seconds) {
    if (Math.abs(seconds) < 1) return t("now");
    if (Math.abs(seconds) < 60) return t("secondsAgo", { n: Math.round(-seconds) });
    return t("minutesAgo", { n: Math.round(-seconds / 60) });
  }

  // A small helper so that every node is built the same, safe way.
  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // ---- Connection --------------------------------------------------------

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/status/live`);
    let gotView = false;

    socket.addEventListener("message", (event) => {
      let view;
      try {
        view = JSON.parse(event.data);
      } catch {
        return; // not ours to show
      }
      if (!view || view.type !== "view") return;
      gotView = true;
      reconnectDelay = RECONNECT_MIN_MS;
      lastView = view;
      lastViewAt = Date.now();
      setConnection("live");
      render(view);
    });

    socket.addEventListener("close", () => {
      setConnection("offline");
      // A socket that opened and delivered a view starts the backoff over.
      const delay = gotView ? RECONNECT_MIN_MS : reconnectDelay;
      reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
      setTimeout(connect, delay);
    });
    // "error" is always followed by "close", which does the work.
  }

  function setConnection(state) {
    connection = state;
    renderConnection();
    // Without a live feed the link state is unknown and the numbers are old.
    if (state !== "live") renderCoreLink(null);
    renderFooter();
  }

  function renderConnection() {
    const pill = document.querySelector('[data-testid="connection"]');
    pill.dataset.state = connection === "live" ? "live" : "offline";
    const key = {
      live: "connectionLive",
      connecting: "connectionConnecting",
      offline: "connectionOffline",
    }[connection];
    $("connection-text").textContent = t(key);
  }

  // up: true, false, or null for "not known right now".
  function renderCoreLink(up) {
    const pill = document.querySelector('[data-testid="core-link"]');
    pill.dataset.state = up ? "up" : "down";
    pill.dataset.known = String(up !== null);
    const key = up === null ? "coreUnknown" : up ? "coreUp" : "coreDown";
    $("core-link-text").textContent = t(key);
  }

  // ---- Rendering a view --------------------------------------------------

  function render(view) {
    if (!view) {
      renderEmpty();
      return;
    }
    const links = view.links || {};
    const thisBridge = links.thisBridge || {};
    if (connection === "live") renderCoreLink(Boolean(thisBridge.coreLink));
    renderQueue(view.queue || {});
    renderTotals(view.totals || {});
    renderLinks(thisBridge, links.bridges || []);
    renderSessions(view.sessions || [], view.sessionsOmitted || 0, view.sessionStates);
    renderWorkers(view.workers || [], view.workersOmitted || 0, view.workerStates);
    renderChart(view.throughput);
    renderFooter();
  }

  function renderEmpty() {
    renderCoreLink(null);
    $("sessions").replaceChildren(element("li", "empty", t("waiting")));
    $("workers").replaceChildren(emptyRow(t("waiting")));
    $("bridges").replaceChildren(element("li", "empty", t("waiting")));
    renderFooter();
  }

  function renderQueue(queue) {
    $("queue-pending").textContent = formatNumber(queue.pending);
    $("queue-active").textContent = formatNumber(queue.active);
  }

  function renderTotals(totals) {
    // Plain integers: these are read back by tests, and are never large
    // enough to need grouping to be legible at this size.
    for (const key of ["submitted", "completed", "failed", "retried", "cancelled"]) {
      $(`totals-${key}`).textContent = String(totals[key] ?? 0);
    }
  }

  function renderLinks(thisBridge, bridges) {
    $("this-bridge-name").textContent = thisBridge.name || "–";
    const list = $("bridges");
    if (!bridges.length) {
      list.replaceChildren(element("li", "empty", t("noBridges")));
      return;
    }
    list.replaceChildren(
      ...bridges.map((bridge) => {
        const item = element("li");
        const meta = element("span", "meta");
        meta.append(
          element("span", "", t("bridgeClients", { n: formatNumber(bridge.clients) })),
          element("br"),
          element("span", "", t("heardAgo", { n: Math.round(bridge.lastHeard || 0) })),
        );
        item.append(element("span", "name", bridge.name), meta);
        return item;
      }),
    );
  }

  // states: counts of all sessions by state, listed or not.
  function renderSessions(sessions, omitted, states) {
    const running = states
      ? (states.open || 0) + (states.paused || 0)
      : sessions.filter((s) => s.state === "open" || s.state === "paused").length;
    $("sessions-summary").textContent = sessions.length
      ? t("sessionsSummary", { running: formatNumber(running) })
      : "";
    const list = $("sessions");
    if (!sessions.length) {
      list.replaceChildren(element("li", "empty", t("noSessions")));
    } else {
      list.replaceChildren(...sessions.map(sessionRow));
    }
    showOmitted($("sessions-omitted"), omitted, "sessionsOmitted");
  }

  function sessionRow(session) {
    const total = session.total || 0;
    const completed = session.completed || 0;
    const failed = session.failed || 0;
    const cancelled = session.cancelled || 0;
    const active = session.active || 0;
    const ended = completed + failed + cancelled;

    const row = element("li", "session");
    row.dataset.testid = "session";
    row.dataset.sessionId = session.id;
    row.dataset.state = session.state;

    const head = element("div", "session-head");
    const id = element("span", "session-id", session.id);
    id.title = session.id;
    const count = element("span", "session-count", `${ended} / ${total}`);
    count.dataset.testid = "session-count";
    head.append(id, element("span", `badge ${session.state}`, t(`state_${session.state}`)), count);

    // One bar, split by outcome: done, failed, cancelled, then in flight.
    const bar = element("div", "bar");
    bar.dataset.testid = "session-progress";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(total));
    bar.setAttribute("aria-valuenow", String(ended));
    bar.setAttribute("aria-valuetext", `${ended} / ${total}`);
    bar.setAttribute("aria-label", session.id);
    for (const [name, n] of [
      ["completed", completed],
      ["failed", failed],
      ["cancelled", cancelled],
      ["active", active],
    ]) {
      if (!n || !total) continue;
      const segment = element("span", `seg ${name}`);
      segment.style.width = `${(100 * n) / total}%`;
      bar.append(segment);
    }

    const meta = element(
      "div",
      "session-meta",
      t("sessionMeta", { pending: session.pending || 0, active, failed, cancelled }),
    );
    row.append(head, bar, meta);
    return row;
  }

  // states: counts of all workers by state, listed or not.
  function renderWorkers(workers, omitted, states) {
    const counts = { busy: 0, idle: 0, resting: 0 };
    if (states) {
      for (const state of Object.keys(counts)) counts[state] = states[state] || 0;
    } else {
      for (const worker of workers) {
        if (worker.state in counts) counts[worker.state] += 1;
      }
    }
    for (const state of Object.keys(counts)) counts[state] = formatNumber(counts[state]);
    $("workers-summary").textContent = workers.length ? t("workersSummary", counts) : "";
    const body = $("workers");
    if (!workers.length) {
      body.replaceChildren(emptyRow(t("noWorkers")));
    } else {
      body.replaceChildren(...workers.map(workerRow));
    }
    showOmitted($("workers-omitted"), omitted, "workersOmitted");
  }

  function workerRow(worker) {
    const row = element("tr");
    row.dataset.testid = "worker";
    row.dataset.workerId = worker.id;
    row.dataset.state = worker.state;

    const state = element("td", "state-cell");
    state.append(element("span", `badge ${worker.state}`, t(`state_${worker.state}`)));

    const fileCell = cell("file-cell", undefined, "colFile");
    const file = element("div", "file");
    if (worker.file != null) {
      const shown = withoutDirectionControls(worker.file);
      const name = element("span", "file-name", shown);
      name.dataset.testid = "worker-file";
      name.title = shown;
      file.append(name);
      if (worker.fileSize != null) {
        file.append(element("span", "file-size", formatBytes(worker.fileSize)));
      }
    } else {
      file.append(element("span", "no-file", "–"));
    }
    fileCell.append(file);

    row.append(
      cell("id", worker.id),
      state,
      cell("num", worker.completed ?? 0, "colCompleted"),
      cell("num", worker.failed ?? 0, "colFailed"),
      cell("num", formatBytes(worker.totalBytes), "colBytes"),
      fileCell,
    );
    return row;
  }

  // A filename may hold Unicode direction controls (U+202E turns
  // "gpj.exe" into what reads as "exe.jpg"): show each as a visible mark.
  function withoutDirectionControls(text) {
    return text.replace(/[\u200E\u200F\u202A-\u202E\u2066-\u2069]/g, "\uFFFD");
  }

  // A table cell; labelKey labels it on a phone, where the header is hidden.
  function cell(className, text, labelKey) {
    const td = element("td", className, text);
    if (labelKey) td.dataset.label = t(labelKey);
    return td;
  }

  function emptyRow(text) {
    const row = element("tr");
    const td = element("td", "empty", text);
    td.colSpan = 6;
    row.append(td);
    return row;
  }

  function showOmitted(node, omitted, key) {
    node.hidden = !omitted;
    node.textContent = omitted ? t(key, { n: formatNumber(omitted) }) : "";
  }

  function renderFooter() {
    $("version").textContent = lastView?.version ? t("version", { v: lastView.version }) : "";
    $("updated").textContent = lastView
      ? t("updatedAgo", { n: Math.max(0, Math.round((Date.now() - lastViewAt) / 1000)) })
      : "";
    // Open but silent for too long: show the numbers as old, as when offline.
    const silent = lastView && (Date.now() - lastViewAt) / 1000 > STALE_AFTER_S;
    // Without its core, the bridge only repeats the last view it had.
    const coreLost = lastView?.links?.thisBridge?.coreLink === false;
    $("main").classList.toggle(
      "stale",
      connection !== "live" || Boolean(silent) || coreLost,
    );
  }

  // ---- Throughput chart --------------------------------------------------

  // x: seconds relative to the view's time (the newest interval at 0);
  // y: per-second rates from per-interval counts.
  function chartData(throughput) {
    const interval = throughput?.interval || 5;
    const completed = throughput?.completed || [];
    const bytes = throughput?.bytes || [];
    const n = Math.max(completed.length, bytes.length);
    const x = [];
    const tasks = [];
    const megabytes = [];
    for (let i = 0; i < n; i++) {
      x.push(-(n - 1 - i) * interval);
      tasks.push((completed[i] || 0) / interval);
      megabytes.push((bytes[i] || 0) / interval / 1e6);
    }
    return [x, tasks, megabytes];
  }

  function cssColor(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // Built anew when the language or colour scheme changes: uPlot takes
  // labels and colours only at creation.
  function rebuildChart() {
    const container = $("chart");
    if (chart) {
      chart.destroy();
      chart = null;
    }
    if (typeof uPlot === "undefined") return; // vendored script missing
    const muted = cssColor("--muted");
    const grid = cssColor("--line");
    const tasksColor = cssColor("--chart-tasks");
    const bytesColor = cssColor("--chart-bytes");
    const axisFont = "12px system-ui, sans-serif";
    // Rates never go below zero, and an idle minute should not look busy.
    const fromZero = (minimum) => (_, __, max) => [0, Math.max(minimum, max * 1.15)];

    const options = {
      width: Math.max(200, container.clientWidth),
      height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false } },
      // Labels only: the recent rates are written above the chart.
      legend: { live: false },
      scales: {
        x: { time: false },
        tasks: { range: fromZero(1) },
        mb: { range: fromZero(0.1) },
      },
      series: [
        { label: t("time"), value: (_, v) => (v == null ? "–" : formatRelativeTime(v)) },
        {
          label: t("tasksPerSecond"),
          scale: "tasks",
          stroke: tasksColor,
          fill: `${tasksColor}22`,
          width: 2,
          points: { show: false },
          value: (_, v) => formatRate(v),
        },
        {
          label: t("megabytesPerSecond"),
          scale: "mb",
          stroke: bytesColor,
          width: 2,
          dash: [6, 4],
          points: { show: false },
          value: (_, v) => formatRate(v),
        },
      ],
      axes: [
        {
          stroke: muted,
          font: axisFont,
          grid: { stroke: grid, width: 1 },
          ticks: { stroke: grid, width: 1 },
          // Whole minutes: finer steps would round to the same label.
          incrs: [60, 120, 300],
          values: (_, splits) => splits.map(formatRelativeTime),
        },
        {
          scale: "tasks",
          stroke: tasksColor,
          font: axisFont,
          size: 44,
          grid: { stroke: grid, width: 1 },
          ticks: { show: false },
        },
        {
          scale: "mb",
          side: 1,
          stroke: bytesColor,
          font: axisFont,
          size: 44,
          grid: { show: false },
          ticks: { show: false },
        },
      ],
    };
    chart = new uPlot(options, chartData(lastView?.throughput), container);
  }

  function renderChart(throughput) {
    if (chart) chart.setData(chartData(throughput));
    renderRecentRates(throughput);
  }

  // The average over the last minute: the newest interval alone is still
  // filling up, and would read low.
  function renderRecentRates(throughput) {
    const interval = throughput?.interval || 5;
    const intervals = Math.round(60 / interval);
    const sum = (values) => (values || []).slice(-intervals).reduce((a, b) => a + b, 0);
    const seconds = intervals * interval;
    $("rate-tasks").textContent = formatRate(sum(throughput?.completed) / seconds);
    $("rate-bytes").textContent = formatRate(sum(throughput?.bytes) / seconds / 1e6);
  }

  function watchChartSize() {
    const container = $("chart");
    new ResizeObserver(() => {
      if (chart && container.clientWidth) {
        chart.setSize({ width: container.clientWidth, height: CHART_HEIGHT });
      }
    }).observe(container);
    window
      .matchMedia("(prefers-color-scheme: dark)")
      .addEventListener("change", rebuildChart);
  }

  // ---- Start -------------------------------------------------------------

  document
    .querySelector('[data-testid="lang-switch"]')
    .addEventListener("click", switchLanguage);
  applyLanguage();
  watchChartSize();
  // Only "updated N s ago" and staleness change with time alone.
  setInterval(renderFooter, 1000);
  connect();
})();
