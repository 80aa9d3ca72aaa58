"""The live dashboard page of ``batchctl serve`` (``GET /``): one self-contained HTML file.

It loads nothing from anywhere (no CDN, no font, no image): the style and the script are
inline, and the server sends a Content-Security-Policy that allows exactly this script (by
its hash) and requests to the server itself, so the page works offline and cannot be made
to load anything else. The script polls ``/dashboard/data`` and redraws in place, without
a reload. Everything shown that comes from a run (ids, messages, error examples, which
come from manifests and videos nobody here wrote) is set as text, never as HTML.

With a key (a server bound to a non-loopback address), the page asks for it once and
sends it in the ``x-functions-key`` header, as every other client does; it is kept in the
tab's sessionStorage only.
"""

from __future__ import annotations

import base64
import hashlib

DATA_PATH = "/dashboard/data"
REFRESH_MS = 1000

_SCRIPT = r"""
"use strict";
const DATA_PATH = "__DATA_PATH__";
const REFRESH_MS = __REFRESH_MS__;
const KEY_NAME = "batchctl-function-key";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  const s = Math.round(value);
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function rate(perSecond) {
  if (!perSecond) return "-";
  if (perSecond >= 1) return perSecond.toFixed(1) + " items/s";
  return (perSecond * 60).toFixed(1) + " items/min";
}

function chart(samples, total) {
  // Items done over time: succeeded (green) and failed (red), against the run's total.
  const width = 480, height = 120, pad = 4;
  const svg = svgEl("svg", {class: "chart", viewBox: `0 0 ${width} ${height}`, width, height,
                            role: "img", "aria-label": "items completed over time"});
  svg.append(svgEl("rect", {x: 0, y: 0, width, height, class: "chart-bg"}));
  if (!samples.length) return svg;
  const tMax = Math.max(samples[samples.length - 1][0], 1);
  const yMax = Math.max(total, 1);
  const x = (t) => pad + (width - 2 * pad) * t / tMax;
  const y = (n) => height - pad - (height - 2 * pad) * n / yMax;
  const line = (index, cls) => {
    const points = samples.map((s) => `${x(s[0]).toFixed(1)},${y(s[index]).toFixed(1)}`);
    svg.append(svgEl("polyline", {points: points.join(" "), class: cls}));
  };
  line(1, "line-ok");
  line(2, "line-failed");
  return svg;
}

function table(headers, rows, cls) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  const body = rows.map((row) => el("tr", {}, ...row.map((cell) => el("td", {}, cell))));
  return el("table", {class: cls}, el("thead", {}, head), el("tbody", {}, ...body));
}

function runCard(run) {
  const s = run.status;
  const done = s.succeeded + s.failed + s.not_run;
  const card = el("section", {class: "run", "data-run-id": s.run_id, "data-phase": s.phase,
                              "data-done": done, "data-total": s.total});
  const title = el("h2", {}, el("span", {class: "run-id"}, s.run_id), " ",
                   el("span", {class: "phase phase-" + s.phase}, s.phase),
                   el("span", {class: "runtime"}, s.runtime_status));
  card.append(title);
  const bar = el("div", {class: "bar"});
  const fill = el("div", {class: "bar-fill"});
  fill.style.width = Math.min(s.percent, 100) + "%";
  bar.append(fill);
  card.append(bar);
  card.append(el("p", {class: "progress"},
    `${done}/${s.total} done (${s.percent}%): ${s.succeeded} succeeded, ${s.failed} failed`
    + (s.not_run ? `, ${s.not_run} not run` : "")
    + (s.invalid ? `; ${s.invalid} invalid rows` : "")));
  card.append(el("p", {class: "rate"}, `rate ${rate(run.rate_per_s)}, ETA ${seconds(run.eta_s)}, `
    + `elapsed ${seconds(run.elapsed_s)}`));
  if (s.message) card.append(el("p", {class: "message"}, s.message));
  card.append(chart(run.samples, s.total));
  if (run.nodes.length) {
    card.append(el("h3", {}, "Per node"));
    const perHour = (n) => n.items_per_hour === null ? "-" : n.items_per_hour.toFixed(0);
    card.append(table(["node", "succeeded", "failed", "items/hour"],
      run.nodes.map((n) => [n.node, n.succeeded, n.failed, perHour(n)]), "nodes"));
  }
  if (run.failures.length) {
    card.append(el("h3", {}, "Failures by class"));
    const list = el("ul", {class: "failures"});
    for (const f of run.failures) {
      const examples = el("ul", {});
      for (const e of f.examples) examples.append(el("li", {}, `${e.item_id}: ${e.message}`));
      list.append(el("li", {}, el("strong", {}, f.error_class), ` ${f.count} items`, examples));
    }
    card.append(list);
  }
  if (run.report_html) {
    card.append(el("p", {}, el("a", {href: run.report_html, class: "report"}, "report"),
                   " ", el("a", {href: run.report_json}, "report.json")));
  }
  return card;
}

async function refresh() {
  const headers = {"Accept": "application/json"};
  const key = sessionStorage.getItem(KEY_NAME);
  if (key) headers["x-functions-key"] = key;
  const state = document.getElementById("state");
  try {
    const answer = await fetch(DATA_PATH, {headers, cache: "no-store"});
    if (answer.status === 401 || answer.status === 403) {
      document.getElementById("key-form").hidden = false;
      state.textContent = "this server needs its function key";
      return;
    }
    const data = await answer.json();
    const runs = document.getElementById("runs");
    runs.replaceChildren(...data.runs.map(runCard));
    if (!data.runs.length) runs.append(el("p", {class: "empty"},
      "No runs yet: upload a manifest to the manifests container, or POST /api/runs."));
    state.textContent = `${data.runs.length} runs; updated ${new Date().toLocaleTimeString()}`;
    const updates = Number(document.body.dataset.updates || 0) + 1;
    document.body.setAttribute("data-updates", String(updates));
  } catch (error) {
    state.textContent = "server unreachable: " + error;
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_NAME, document.getElementById("key").value);
  document.getElementById("key-form").hidden = true;
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
"""

SCRIPT = _SCRIPT.replace("__DATA_PATH__", DATA_PATH).replace("__REFRESH_MS__", str(REFRESH_MS))

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; background: #fafbfc; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
#state { color: #5b6575; margin: 0 0 1em; }
.run { background: #fff; border: 1px solid #d8dde5; border-radius: 6px; padding: .8em 1em;
       margin: 0 0 1em; max-width: 52em; }
.run h2 { font-size: 1.1em; margin: 0 0 .4em; }
.run-id { font-family: ui-monospace, monospace; }
.phase { padding: .1em .5em; border-radius: 4px; background: #e7ecf3; margin-left: .3em; }
.phase-completed { background: #d6f2dc; } .phase-failed { background: #f8d7da; }
.phase-cancelled { background: #fbe8c8; } .phase-running { background: #d8e8fb; }
.runtime { color: #5b6575; font-weight: normal; margin-left: .6em; font-size: .9em; }
.bar { height: 12px; background: #e7ecf3; border-radius: 6px; overflow: hidden; }
.bar-fill { height: 100%; background: #2f80ed; }
.chart-bg { fill: #f3f5f8; } .chart { display: block; margin: .5em 0; }
.line-ok { fill: none; stroke: #1e9e4a; stroke-width: 2; }
.line-failed { fill: none; stroke: #d0343f; stroke-width: 2; }
table { border-collapse: collapse; } th, td { padding: .15em .8em .15em 0; text-align: left; }
.message { color: #5b6575; } .failures li { margin: .2em 0; }
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchctl serve</title>
<style>{_STYLE}</style>
</head>
<body data-updates="0">
<h1>batchctl runs</h1>
<p id="state">loading</p>
<form id="key-form" hidden>
<label>function key <input id="key" type="password" autocomplete="off"></label>
<button type="submit">use</button>
</form>
<div id="runs"></div>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


# Only this page's own script and style run, and it may talk only to this server.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
