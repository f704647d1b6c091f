"""The interactive part of ``index.html``: sortable tables and an SVG rank chart.

No plotting library and no server: the page carries its data as inline JSON and a
small script that draws the chart as SVG (hover a point for its values; buttons pick
the mode, a menu the energy level) and sorts tables by a click on a header. It opens
offline from the file system in any current browser. With ``#selftest`` in the URL the
script checks its own sorting and records the result on ``<body data-selftest>``
(used by the headless-browser test).
"""

from __future__ import annotations

import json

from .schema import MODE_NAMES, TENSORS

COLORS = ("#0077BB", "#CC3311", "#009988", "#EE7733")


def chart_data(analyses: list[dict], names: list[str]) -> dict:
    """The numbers the chart draws: per model and mode, ranks by layer and the ceiling."""
    models = []
    for a, name, color in zip(analyses, names, COLORS):
        modes = {}
        for key in TENSORS:
            for mode in MODE_NAMES[key]:
                ms = [layer[key]["modes"][mode] for layer in a["layers"]]
                levels = [f"{e:g}" for e in a["settings"]["energy"]]
                modes[f"{key}.{mode}"] = {
                    "energy": {t: [m["energy_ranks"].get(t) for m in ms] for t in levels},
                    "numerical": [m["numerical_rank"] for m in ms],
                    "ceiling": max(m["ceiling"] for m in ms), "size": ms[0]["size"]}
        models.append({"name": name, "color": color, "layers": [layer["index"] for layer in a["layers"]],
                       "modes": modes})
    energies = list(dict.fromkeys(f"{e:g}" for a in analyses for e in a["settings"]["energy"]))
    return {"models": models, "energies": energies,
            "modes": [f"{key}.{mode}" for key in TENSORS for mode in MODE_NAMES[key]]}


def data_script(data: dict) -> str:
    """Inline JSON, safe inside <script> (no '</' can close the element early)."""
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="tuckerctl-data">{text}</script>'


CSS = """
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; font-size: 0.8em; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; font-size: 0.8em; }
#chart { margin: 0.8em 0 1.6em; }
#chart .controls button { margin: 0 0.3em 0.3em 0; padding: 0.2em 0.6em; border: 1px solid #bbb;
  background: #f7f7f7; border-radius: 3px; cursor: pointer; font: inherit; font-size: 0.88em; }
#chart .controls button[aria-pressed="true"] { background: #333; color: #fff; border-color: #333; }
#chart svg { max-width: 100%; height: auto; display: block; }
#chart .readout { min-height: 1.4em; color: #333; font-size: 0.9em; }
"""

SCRIPT = r"""
(function () {
  'use strict';
  window.addEventListener('error', function (ev) { document.body.dataset.error = String(ev.message); });

  function sortKey(td) {
    var v = td.getAttribute('data-sort');
    if (v === null) { v = td.textContent.replace(/,/g, ''); }
    var x = parseFloat(v);
    return isNaN(x) ? v.toLowerCase() : x;
  }
  function sortTable(table, col, ascending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var a = sortKey(r1.cells[col]), b = sortKey(r2.cells[col]);
      if (a < b) { return ascending ? -1 : 1; }
      if (a > b) { return ascending ? 1 : -1; }
      return 0;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) { th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending'); }
      else { th.removeAttribute('aria-sort'); }
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.tabIndex = 0;
      th.title = 'sort by this column';
      function go() { sortTable(table, i, th.getAttribute('aria-sort') !== 'ascending'); }
      th.addEventListener('click', go);
      th.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') { go(); } });
    });
  });

  var holder = document.getElementById('chart');
  var source = document.getElementById('tuckerctl-data');
  if (holder && source) {
    var data = JSON.parse(source.textContent);
    var state = { mode: 'pre.key', energy: data.energies.indexOf('0.99') >= 0 ? '0.99' : data.energies[0] };
    var NS = 'http://www.w3.org/2000/svg';
    var W = 760, H = 340, L = 56, R = 150, T = 16, B = 44;
    var controls = document.createElement('div');
    controls.className = 'controls';
    var readout = document.createElement('div');
    readout.className = 'readout';
    readout.textContent = 'Hover a point for its values.';
    var svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    svg.setAttribute('role', 'img');
    holder.appendChild(controls);
    holder.appendChild(svg);
    holder.appendChild(readout);

    function el(name, attrs, parent, text) {
      var e = document.createElementNS(NS, name);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      if (text !== undefined) { e.textContent = text; }
      parent.appendChild(e);
      return e;
    }
    data.modes.forEach(function (m) {
      var b = document.createElement('button');
      b.type = 'button';
      b.textContent = (m.indexOf('pre.') === 0 ? 'W ' : 'W̃ ') + m.split('.')[1];
      b.dataset.mode = m;
      b.addEventListener('click', function () { state.mode = m; draw(); });
      controls.appendChild(b);
    });
    var select = document.createElement('select');
    data.energies.forEach(function (e) {
      var o = document.createElement('option');
      o.value = e; o.textContent = 'energy rank r(' + e + ')';
      select.appendChild(o);
    });
    select.value = state.energy;
    select.addEventListener('change', function () { state.energy = select.value; draw(); });
    controls.appendChild(select);

    function draw() {
      Array.prototype.forEach.call(controls.querySelectorAll('button'), function (b) {
        b.setAttribute('aria-pressed', String(b.dataset.mode === state.mode));
      });
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      var xs = [], ymax = 1;
      data.models.forEach(function (m) {
        var d = m.modes[state.mode];
        xs = xs.concat(m.layers);
        ymax = Math.max(ymax, d.size);
      });
      var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
      if (x1 === x0) { x1 = x0 + 1; }
      function X(v) { return L + (v - x0) / (x1 - x0) * (W - L - R); }
      function Y(v) { return H - B - v / (ymax * 1.05) * (H - T - B); }
      el('rect', { x: L, y: T, width: W - L - R, height: H - T - B, fill: '#fff', stroke: '#ccc' }, svg);
      for (var k = 0; k <= 4; k++) {
        var v = Math.round(ymax * k / 4);
        el('line', { x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: '#eee' }, svg);
        el('text', { x: L - 6, y: Y(v) + 4, 'text-anchor': 'end', 'font-size': 11 }, svg, String(v));
      }
      var step = Math.max(1, Math.ceil((x1 - x0) / 12));
      for (var t = x0; t <= x1; t += step) {
        el('text', { x: X(t), y: H - B + 16, 'text-anchor': 'middle', 'font-size': 11 }, svg, String(t));
      }
      el('text', { x: (L + W - R) / 2, y: H - 6, 'text-anchor': 'middle', 'font-size': 12 }, svg, 'layer');
      el('text', { x: 14, y: (T + H - B) / 2, 'text-anchor': 'middle', 'font-size': 12,
                   transform: 'rotate(-90 14 ' + (T + H - B) / 2 + ')' }, svg, 'rank');
      data.models.forEach(function (m, mi) {
        var d = m.modes[state.mode];
        var ys = d.energy[state.energy] || [];
        el('line', { x1: L, x2: W - R, y1: Y(d.ceiling), y2: Y(d.ceiling), stroke: m.color,
                     'stroke-dasharray': '6 4', 'stroke-width': 1.4 }, svg);
        el('text', { x: W - R + 6, y: Y(d.ceiling) + 4 + 13 * mi, 'font-size': 11, fill: m.color }, svg,
           'ceiling ' + d.ceiling + (data.models.length > 1 ? ' (' + 'ABCD'[mi] + ')' : ''));
        var pts = m.layers.map(function (x, i) { return X(x) + ',' + Y(ys[i]); }).join(' ');
        el('polyline', { points: pts, fill: 'none', stroke: m.color, 'stroke-width': 1.8 }, svg);
        m.layers.forEach(function (x, i) {
          var text = m.name + ' · layer ' + x + ' · r(' + state.energy + ') = ' + ys[i] + ' · numerical rank ' +
            d.numerical[i] + ' / ceiling ' + d.ceiling + ' · mode size ' + d.size;
          var c = el('circle', { cx: X(x), cy: Y(ys[i]), r: 4.5, fill: m.color, 'class': 'point',
                                 tabindex: 0 }, svg);
          el('title', {}, c, text);
          c.addEventListener('mouseenter', function () { readout.textContent = text; c.setAttribute('r', 7); });
          c.addEventListener('mouseleave', function () { c.setAttribute('r', 4.5); });
          c.addEventListener('focus', function () { readout.textContent = text; });
          el('path', { d: 'M' + (X(x) - 4) + ',' + (Y(d.numerical[i]) - 4) + 'l8,8m0,-8l-8,8', stroke: '#222',
                       'stroke-width': 1.2 }, svg);
        });
        if (data.models.length > 1) {
          el('text', { x: W - R + 6, y: T + 12 + 14 * mi, 'font-size': 11, fill: m.color }, svg,
             'ABCD'[mi] + ': ' + m.name.slice(0, 22));
        }
      });
      el('text', { x: W - R + 6, y: H - B, 'font-size': 11, fill: '#222' }, svg, '× numerical rank');
      svg.setAttribute('aria-label', 'ranks by layer, ' + state.mode + ' mode, energy ' + state.energy);
    }
    draw();
  }

  if (location.hash === '#selftest') {
    var result = 'ok';
    var table = document.querySelector('table.sortable');
    if (!table) { result = 'no sortable table'; }
    else {
      var n = table.tHead.rows[0].cells.length;
      sortTable(table, 0, false);
      var first = sortKey(table.tBodies[0].rows[0].cells[0]);
      var last = sortKey(table.tBodies[0].rows[table.tBodies[0].rows.length - 1].cells[0]);
      if (table.tBodies[0].rows.length > 1 && !(first > last)) { result = 'descending sort failed'; }
      sortTable(table, n - 1, true);
      sortTable(table, 0, true);
      if (!document.querySelector('#chart svg circle.point')) { result = 'chart not drawn'; }
    }
    document.body.dataset.selftest = result;
  }
  document.body.dataset.ready = '1';
})();
"""
