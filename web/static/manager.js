// Refreshes the manager's status fields and charts every 5 seconds from /manager/status.
// A static file (the Content-Security-Policy forbids inline scripts); the page works without it.
"use strict";
(function () {
  const summary = document.getElementById("summary");
  if (!summary) return;
  const url = summary.dataset.statusUrl;
  const fields = {
    "node-count": "nodeCount",
    "mode-current": "mode",
    "policy-current": "policy",
    "capacity-current": "capacity",
    "phase-current": "phase",
  };
  let timer = null;
  async function refresh() {
    let status;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { clearInterval(timer); return; }
      if (!response.ok) return;
      status = await response.json();
    } catch (e) {
      return;
    }
    for (const [id, key] of Object.entries(fields)) {
      const el = document.getElementById(id);
      if (el && typeof status[key] === "string") el.textContent = status[key];
    }
    for (const chart of status.charts || []) {
      const el = document.getElementById(chart.id);
      if (!el) continue;
      el.dataset.latest = chart.latest;
      // The SVG is drawn by the server from numbers only (no visitor text).
      if (chart.svg) el.innerHTML = chart.svg;
      const label = document.querySelector('[data-latest-label-for="' + chart.id + '"]');
      if (label) label.textContent = chart.latestLabel;
    }
  }
  timer = setInterval(refresh, 5000);
})();
