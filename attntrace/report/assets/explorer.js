/* attntrace explorer: reads the JSON embedded in the page (#attntrace-data) and draws everything
   with canvas and SVG. No library, no network: the page works from file://. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("attntrace-data").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var state = { run: 0, a: 0, b: -1, tab: "heat", word: 0, alpha: 0.5, from: 0, to: 1e9, group: -1,
                head: -1, metric: 0, grouping: "site", hidden: {}, tokGroup: 0, tokHead: -1, hm: 0, am: 0,
                rowWord: {} };  // rowWord["item:row"]: a word chosen on one image of an edit group

  // -- decoding -------------------------------------------------------------------------------
  var cache = new Map();
  function bytes(b64) {
    if (cache.has(b64)) return cache.get(b64);
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    cache.set(b64, out);
    return out;
  }
  function floats(b64) { var u = bytes(b64); return new Float32Array(u.buffer, u.byteOffset, u.byteLength / 4); }
  // value of map m (flat index) at cell c, from 8 bits and the map's [lo, hi]
  function packedMap(p, m) {
    var q = bytes(p.data), lo = floats(p.lo)[m], hi = floats(p.hi)[m];
    var shp = p.shape, n = shp[shp.length - 1] * shp[shp.length - 2], out = new Float32Array(n);
    var s = (hi - lo) / 255, off = m * n;
    for (var i = 0; i < n; i++) out[i] = lo + q[off + i] * s;
    return out;
  }

  // -- colour: a jet-like ramp from its piecewise-linear definition -------------------------------
  function ramp(x) {
    var c = function (v) { return Math.max(0, Math.min(1, v)); };
    return [c(1.5 - Math.abs(4 * x - 3)), c(1.5 - Math.abs(4 * x - 2)), c(1.5 - Math.abs(4 * x - 1))];
  }
  function colorbar(el) {
    var cv = document.createElement("canvas"); cv.width = 200; cv.height = 10; cv.className = "colorbar";
    var g = cv.getContext("2d");
    for (var i = 0; i < 200; i++) { var r = ramp(i / 199); g.fillStyle = rgb(r); g.fillRect(i, 0, 1, 10); }
    el.appendChild(cv);
  }
  function rgb(r) { return "rgb(" + Math.round(r[0] * 255) + "," + Math.round(r[1] * 255) + "," + Math.round(r[2] * 255) + ")"; }
  function hue(i, n) { return "hsl(" + Math.round((i * 360) / Math.max(n, 1)) + ",70%,45%)"; }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function option(sel, value, text) { sel.appendChild(el("option", { value: value }, text)); }

  // -- images with a map drawn over them ------------------------------------------------------------
  var imgCache = new Map();
  function image(uri, done) {
    if (!uri) { done(null); return; }
    var img = imgCache.get(uri);
    if (img && img.complete) { done(img); return; }
    if (!img) { img = new Image(); img.src = uri; imgCache.set(uri, img); }
    img.decode().then(function () { done(img); }, function () { console.error("image failed to decode"); done(null); });
  }
  function overlay(fig, uri, map, side, caption) {
    var cv = el("canvas", { width: 384, height: 384, "data-role": "view" });
    fig.appendChild(cv);
    fig.appendChild(el("figcaption", {}, caption));
    var g = cv.getContext("2d");
    image(uri, function (img) {
      g.clearRect(0, 0, cv.width, cv.height);
      if (img) g.drawImage(img, 0, 0, cv.width, cv.height);
      if (!map) return;
      var lo = Infinity, hi = -Infinity, i;
      for (i = 0; i < map.length; i++) { if (map[i] < lo) lo = map[i]; if (map[i] > hi) hi = map[i]; }
      var small = document.createElement("canvas"); small.width = side; small.height = side;
      var sg = small.getContext("2d"), px = sg.createImageData(side, side);
      for (i = 0; i < map.length; i++) {
        var r = ramp(hi > lo ? (map[i] - lo) / (hi - lo) : 0);
        px.data[4 * i] = r[0] * 255; px.data[4 * i + 1] = r[1] * 255; px.data[4 * i + 2] = r[2] * 255; px.data[4 * i + 3] = 255;
      }
      sg.putImageData(px, 0, 0);
      g.globalAlpha = img ? state.alpha : 1; g.imageSmoothingEnabled = true;
      g.drawImage(small, 0, 0, cv.width, cv.height); g.globalAlpha = 1;
    });
  }

  function run() { return DATA.runs[state.run]; }
  function item(which) { var i = which === "b" ? state.b : state.a; return i >= 0 ? run().items[i] : null; }
  function items() { return [item("a"), item("b")].filter(function (x) { return x; }); }
  function title(it) { return it.id + (it.seed !== null && it.seed !== undefined ? " (seed " + it.seed + ")" : ""); }
  function rowLabel(it, r, rows) {  // "image 1 · “a dog on a mat” · " when an item has several images
    if (rows < 2) return "";
    var p = it.prompts && it.prompts[r] ? " \u201c" + it.prompts[r] + "\u201d" : "";
    return "image " + r + p + " \u00b7 ";
  }

  // -- words: the union of the selected items' words (by position in their own list) ------------------
  function wordList() {
    var it = item("a"); if (!it) return [];
    var src = state.tab === "steps" ? (it.attnmaps[state.am] || {}).words : (it.heatmaps[state.hm] || {}).words;
    return src || [];
  }
  function drawWords() {
    var box = $("words"); box.innerHTML = "";
    var words = wordList();
    if (state.word >= words.length) state.word = 0;
    words.forEach(function (w, i) {
      var b = el("button", { "data-word": i, type: "button" }, w);
      if (i === state.word) b.className = "active";
      b.onclick = function () { state.word = i; state.rowWord = {}; render(); };
      box.appendChild(b);
    });
    if (!words.length) box.appendChild(el("span", { "class": "muted" }, "no words"));
  }
  // Each image of an edit group has its own prompt's words (p.row_words[r]). The word shown on image r:
  // the one chosen with its own buttons, else the word bar's word by name, else the word at its position
  // (a swapped word: "red" on the source is "blue" on the edited image).
  function rowWords(p, r) { return (p.row_words && p.row_words[r]) || p.words; }
  function rowWord(it, p, r) {
    var words = rowWords(p, r), mine = state.rowWord[it.id + ":" + r], name = wordList()[state.word];
    if (mine !== undefined && words.indexOf(mine) >= 0) return { w: words.indexOf(mine), note: "" };
    if (words.indexOf(name) >= 0) return { w: words.indexOf(name), note: "" };
    var w = Math.max(0, Math.min(state.word, words.length - 1));
    return { w: w, note: name === undefined ? "" : " (no \u201c" + name + "\u201d here: the word at its position)" };
  }
  function rowWordBar(fig, it, p, r, chosen) {  // an edit group's image: buttons of its own prompt's words
    if (!it.prompts || it.prompts.length < 2 || !p.row_words) return;
    var bar = el("div", { "class": "words row-words", "data-row": r });
    rowWords(p, r).forEach(function (w, i) {
      var b = el("button", { "data-word": i, type: "button" }, w);
      if (i === chosen) b.className = "active";
      b.onclick = function () { state.rowWord[it.id + ":" + r] = w; render(); };
      bar.appendChild(b);
    });
    fig.appendChild(bar);
  }

  // -- tab: heat maps (heatmap observer) ----------------------------------------------------------
  function renderHeat() {
    var box = $("heat-views"); box.innerHTML = "";
    items().forEach(function (it) {
      var col = el("div", { "class": "col" });
      col.appendChild(el("h3", {}, title(it) + ": " + (it.prompt || "")));
      var hm = it.heatmaps[state.hm] || it.heatmaps[0];
      if (!hm) { col.appendChild(el("p", { "class": "muted" }, "no heatmap results in this item")); box.appendChild(col); return; }
      var rows = hm.shape[0], W = hm.shape[1], side = hm.shape[3];
      for (var r = 0; r < rows; r++) {
        var fig = el("figure"), pick = rowWord(it, hm, r);
        overlay(fig, it.images[r] || it.images[0], packedMap(hm, r * W + pick.w), side,
          rowLabel(it, r, rows) + "word \u201c" + rowWords(hm, r)[pick.w] + "\u201d" + pick.note + " · mean over " +
          "every traced step and layer (" + hm.label + ")");
        rowWordBar(fig, it, hm, r, pick.w);
        col.appendChild(fig);
      }
      box.appendChild(col);
    });
  }

  // -- tab: per step and layer (attnmaps observer) -----------------------------------------------------
  function stepMaps(am, row, word) {
    // mean over the selected steps and groups (and head), of maps present in the run
    var S = am.shape[0], G = am.shape[1], B = am.shape[2], H = am.shape[3], W = am.shape[4];
    var side = am.shape[5], n = side * side, acc = new Float32Array(n), used = 0;
    for (var s = 0; s < S; s++) {
      if (s < state.from || s > state.to) continue;
      for (var g = 0; g < G; g++) {
        if (state.group >= 0 && g !== state.group) continue;
        if (!am.present[s * G + g]) continue;
        for (var h = 0; h < H; h++) {
          if (state.head >= 0 && h !== state.head) continue;
          var m = packedMap(am, (((s * G + g) * B + row) * H + h) * W + word);
          for (var i = 0; i < n; i++) acc[i] += m[i];
          used++;
        }
      }
    }
    return used ? acc : null;
  }
  function renderSteps() {
    var box = $("steps-views"); box.innerHTML = "";
    items().forEach(function (it) {
      var col = el("div", { "class": "col" });
      col.appendChild(el("h3", {}, title(it) + ": " + (it.prompt || "")));
      var am = it.attnmaps.filter(function (a) { return a.kind === "image"; })[0];
      if (!am) { col.appendChild(el("p", { "class": "muted" }, "no per-step maps: add the attnmaps observer to the trace")); box.appendChild(col); return; }
      var where = (state.group >= 0 ? am.groups[state.group] : "all layers") + (state.head >= 0 ? ", head " + state.head : "");
      var span = "steps " + am.steps[Math.min(state.from, am.steps.length - 1)] + "\u2013" + am.steps[Math.min(state.to, am.steps.length - 1)];
      for (var r = 0; r < am.shape[2]; r++) {
        var pick = rowWord(it, am, r), fig = el("figure"), map = stepMaps(am, r, pick.w);
        overlay(fig, it.images[r] || it.images[0], map, am.shape[5],
          rowLabel(it, r, am.shape[2]) + "word \u201c" + rowWords(am, r)[pick.w] + "\u201d" + pick.note + " · " + span + " · " + where + (map ? "" : " (nothing recorded there)"));
        rowWordBar(fig, it, am, r, pick.w);
        col.appendChild(fig);
      }
      if (am.dropped && am.dropped.length) col.appendChild(el("p", { "class": "muted" }, "left out to fit the page: " + am.dropped.join(", ")));
      box.appendChild(col);
    });
  }
  function setupStepControls() {
    var it = item("a"), am = it && it.attnmaps.filter(function (a) { return a.kind === "image"; })[0];
    var has = !!am;
    ["stepFrom", "stepTo", "group", "head"].forEach(function (id) { $(id).disabled = !has; });
    if (!has) return;
    var last = am.steps.length - 1;
    $("stepFrom").max = last; $("stepTo").max = last;
    if (state.to > last || state.to < state.from) state.to = last;
    $("stepFrom").value = state.from; $("stepTo").value = state.to;
    $("stepLabel").textContent = am.steps[state.from] + "\u2013" + am.steps[state.to];
    fillSelect($("group"), ["all layers"].concat(am.groups), state.group + 1);
    var heads = [];
    for (var h = 0; h < am.shape[3]; h++) heads.push("head " + h);
    fillSelect($("head"), [am.heads ? "mean of heads" : "mean of heads (heads not kept)"].concat(am.heads ? heads : []), state.head + 1);
  }
  function fillSelect(sel, labels, selected) {
    sel.innerHTML = "";
    labels.forEach(function (l, i) { option(sel, i - 1, l); });
    sel.selectedIndex = Math.min(selected, labels.length - 1);
  }

  // -- tab: statistics ------------------------------------------------------------------------------
  function series(st, metric, grouping, headFilter) {
    var M = st.metrics.length, N = st.series.length, T = st.steps.length, vals = floats(st.values);
    var get = function (s, t) { return vals[(metric * N + s) * T + t]; };
    if (headFilter >= 0 && st.heads) {
      var hv = floats(st.head_values), H = st.heads;
      get = function (s, t) { return hv[((metric * N + s) * T + t) * H + headFilter]; };
    }
    var out = [];
    if (grouping === "block") {
      var order = [], by = {};
      st.blocks.forEach(function (b, s) { if (!(b in by)) { by[b] = []; order.push(b); } by[b].push(s); });
      order.forEach(function (b) {
        var ys = [];
        for (var t = 0; t < T; t++) {
          var sum = 0, n = 0;
          by[b].forEach(function (s) { var v = get(s, t); if (!isNaN(v)) { sum += v; n++; } });
          ys.push(n ? sum / n : NaN);
        }
        out.push({ name: b + " (" + by[b].length + " site" + (by[b].length > 1 ? "s" : "") + ")", ys: ys });
      });
    } else {
      for (var s = 0; s < N; s++) {
        var ys2 = [];
        for (var t2 = 0; t2 < T; t2++) ys2.push(get(s, t2));
        out.push({ name: st.series[s], ys: ys2 });
      }
    }
    return out;
  }
  var SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) { var e = document.createElementNS(SVGNS, tag); for (var k in attrs) e.setAttribute(k, attrs[k]); return e; }
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n))), err = (hi - lo) / n / step;
    if (err >= 5) step *= 5; else if (err >= 2) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(6));
    return out;
  }
  function plotStats(container, it, st) {
    var metric = Math.min(state.metric, st.metrics.length - 1);
    var lines = series(st, metric, state.grouping, state.head);
    var W = 820, H = 360, L = 60, R = 16, T = 16, Bm = 44;
    var root = svg("svg", { width: W, height: H, "data-role": "stats-plot", role: "img" });
    var ys = []; lines.forEach(function (l, i) { if (!state.hidden[l.name]) l.ys.forEach(function (y) { if (!isNaN(y)) ys.push(y); }); });
    var lo = ys.length ? Math.min.apply(null, ys) : 0, hi = ys.length ? Math.max.apply(null, ys) : 1;
    var single = st.steps.length === 1;  // text models: one forward, so plot over layers, not steps
    if (single) { lo = Math.min(0, lo); hi = Math.max(0, hi); }  // bars start at zero
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    var pad = (hi - lo) * 0.05; hi += pad; if (!single || lo < 0) lo -= pad;
    var xs = st.steps, x0 = xs[0], x1 = xs[xs.length - 1]; if (x1 === x0) { x1 = x0 + 1; }
    var px = single
      ? function (i) { return L + ((i + 0.5) / lines.length) * (W - L - R); }  // one band per layer
      : function (x) { return L + ((x - x0) / (x1 - x0)) * (W - L - R); };
    var py = function (y) { return T + (1 - (y - lo) / (hi - lo)) * (H - T - Bm); };
    niceTicks(lo, hi, 5).forEach(function (v) {
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: py(v), y2: py(v), stroke: "#eee" }));
      var t = svg("text", { x: L - 6, y: py(v) + 4, "text-anchor": "end", "font-size": 11 }); t.textContent = v; root.appendChild(t);
    });
    (single ? lines.map(function (_, i) { return i; }) : niceTicks(x0, x1, Math.min(10, xs.length))).forEach(function (v) {
      if (Math.round(v) !== v || (single && lines.length > 24 && v % 5)) return;
      var t = svg("text", { x: px(v), y: H - Bm + 16, "text-anchor": "middle", "font-size": 11 }); t.textContent = v; root.appendChild(t);
    });
    var xl = svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", "font-size": 12 });
    xl.textContent = single ? "layer (" + (state.grouping === "block" ? "block" : "site") + ", in model order; one forward)" : "denoising step";
    root.appendChild(xl);
    var yl = svg("text", { x: 14, y: H / 2, transform: "rotate(-90 14 " + H / 2 + ")", "text-anchor": "middle", "font-size": 12 });
    yl.textContent = st.metrics[metric] + (state.head >= 0 ? " (head " + state.head + ")" : " (mean of heads)");
    root.appendChild(yl);
    root.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - Bm, stroke: "#888" }));
    root.appendChild(svg("line", { x1: L, x2: W - R, y1: H - Bm, y2: H - Bm, stroke: "#888" }));
    var shapes = [];
    lines.forEach(function (l, i) {
      if (state.hidden[l.name]) return;
      var color = hue(i, lines.length), shape;
      if (single) {
        var v = l.ys[0], bw = Math.max(2, (W - L - R) / lines.length * 0.7), base = py(Math.max(lo, 0));
        shape = svg("rect", { x: px(i) - bw / 2, y: Math.min(py(v), base), width: bw, height: Math.abs(base - py(v)), fill: color });
      } else {
        var pts = [];
        l.ys.forEach(function (y, t) { if (!isNaN(y)) pts.push(px(st.steps[t]).toFixed(1) + "," + py(y).toFixed(1)); });
        shape = svg("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.5 });
      }
      shape.setAttribute("data-series", l.name);
      var tip = svg("title", {}); tip.textContent = l.name; shape.appendChild(tip);
      root.appendChild(shape); shapes.push({ line: l, shape: shape, i: i });
    });
    // hover: the nearest point of any visible line, with its label
    root.addEventListener("mousemove", function (ev) {
      var box = root.getBoundingClientRect(), mx = ev.clientX - box.left, my = ev.clientY - box.top, best = null;
      shapes.forEach(function (s) {
        s.line.ys.forEach(function (y, t) {
          if (isNaN(y)) return;
          var x = single ? px(s.i) : px(st.steps[t]), d = Math.pow(x - mx, 2) + Math.pow(py(y) - my, 2);
          if (!best || d < best.d) best = { d: d, s: s, t: t, y: y };
        });
      });
      shapes.forEach(function (s) { s.shape.setAttribute(single ? "opacity" : "stroke-width", best && s === best.s ? (single ? 1 : 3.5) : (single ? 0.75 : 1.5)); });
      if (best) tooltip(ev, best.s.line.name + "\n" + (single ? "" : "step " + st.steps[best.t] + " · ") + st.metrics[metric] + " = " + best.y.toPrecision(4));
    });
    root.addEventListener("mouseleave", function () { $("tooltip").style.display = "none"; });
    var wrap = el("div", { "class": "plot" });
    wrap.appendChild(root);
    var legend = el("div", { "class": "legend", "data-role": "legend" });
    lines.forEach(function (l, i) {
      var row = el("div", { "data-series": l.name });
      if (state.hidden[l.name]) row.className = "off";
      var sw = el("span", { "class": "sw" }); sw.style.background = hue(i, lines.length);
      row.appendChild(sw); row.appendChild(el("span", {}, l.name));
      row.onclick = function () { state.hidden[l.name] = !state.hidden[l.name]; renderStats(); };
      row.onmouseenter = function () { shapes.forEach(function (s) { s.shape.setAttribute("opacity", s.line === l ? 1 : 0.15); }); };
      row.onmouseleave = function () { shapes.forEach(function (s) { s.shape.setAttribute("opacity", 1); }); };
      legend.appendChild(row);
    });
    wrap.appendChild(legend);
    container.appendChild(el("h3", {}, title(it) + ": " + (it.prompt || "") + " — " + st.label));
    container.appendChild(wrap);
  }
  function tooltip(ev, text) {
    var t = $("tooltip"); t.textContent = text; t.style.display = "block";
    t.style.left = ev.clientX + 14 + "px"; t.style.top = ev.clientY + 10 + "px";
  }
  function renderStats() {
    var box = $("stats-views"); box.innerHTML = "";
    var first = null;
    items().forEach(function (it) {
      var st = it.stats[0];
      if (!st) { box.appendChild(el("p", { "class": "muted" }, title(it) + ": no stats results")); return; }
      if (!first) first = st;
      plotStats(box, it, st);
    });
    if (first) {
      var sel = $("metric"), prev = state.metric;
      fillSelect(sel, first.metrics, prev + 1); sel.selectedIndex = Math.min(prev, first.metrics.length - 1);
      var hs = ["mean of heads"]; for (var h = 0; h < first.heads; h++) hs.push("head " + h);
      fillSelect($("statHead"), hs, state.head + 1);
    }
  }

  // -- tab: token x token (text models) ---------------------------------------------------------------
  function renderTokens() {
    var box = $("tokens-views"); box.innerHTML = "";
    items().forEach(function (it) {
      var am = it.attnmaps.filter(function (a) { return a.kind === "tokens"; })[0];
      var col = el("div", { "class": "col" });
      col.appendChild(el("h3", {}, title(it) + ": " + (it.prompt || "")));
      if (!am) { col.appendChild(el("p", { "class": "muted" }, "no token maps: trace a text model with the attnmaps observer")); box.appendChild(col); return; }
      var G = am.shape[1], B = am.shape[2], H = am.shape[3], Lq = am.shape[4], Lk = am.shape[5];
      if (it === item("a")) {
        fillSelect($("tokGroup"), am.groups.slice(0), state.tokGroup + 1);
        $("tokGroup").selectedIndex = Math.min(state.tokGroup, G - 1);
        var hs = ["mean of heads"]; if (am.heads) for (var h = 0; h < H; h++) hs.push("head " + h);
        fillSelect($("tokHead"), hs, state.tokHead + 1);
      }
      var g = Math.min(state.tokGroup, G - 1), acc = new Float32Array(Lq * Lk), n = 0;
      for (var hh = 0; hh < H; hh++) {
        if (state.tokHead >= 0 && hh !== state.tokHead) continue;
        var m = packedMap(am, ((0 * G + g) * B + 0) * H + hh);
        for (var i = 0; i < m.length; i++) acc[i] += m[i];
        n++;
      }
      var cell = Math.max(8, Math.min(24, Math.floor(560 / Lk))), lab = 110;
      var cv = el("canvas", { width: lab + cell * Lk, height: lab + cell * Lq, "data-role": "tokens" });
      var c = cv.getContext("2d"), hi = 0;
      for (i = 0; i < acc.length; i++) { acc[i] /= Math.max(n, 1); if (acc[i] > hi) hi = acc[i]; }
      for (var q = 0; q < Lq; q++) for (var k = 0; k < Lk; k++) {
        c.fillStyle = rgb(ramp(hi > 0 ? acc[q * Lk + k] / hi : 0)); c.fillRect(lab + k * cell, lab + q * cell, cell, cell);
      }
      c.fillStyle = "#222"; c.font = "11px sans-serif"; c.textAlign = "right";
      for (q = 0; q < Lq; q++) c.fillText(am.labels[q], lab - 4, lab + q * cell + cell * 0.7);
      for (k = 0; k < Lk; k++) { c.save(); c.translate(lab + k * cell + cell * 0.7, lab - 4); c.rotate(-Math.PI / 2); c.textAlign = "left"; c.fillText(am.labels[k], 0, 0); c.restore(); }
      cv.addEventListener("mousemove", function (ev) {
        var r = cv.getBoundingClientRect(), x = (ev.clientX - r.left) * cv.width / r.width - lab, y = (ev.clientY - r.top) * cv.height / r.height - lab;
        var kk = Math.floor(x / cell), qq = Math.floor(y / cell);
        if (kk < 0 || qq < 0 || kk >= Lk || qq >= Lq) { $("tooltip").style.display = "none"; return; }
        tooltip(ev, "query \u201c" + am.labels[qq] + "\u201d \u2192 key \u201c" + am.labels[kk] + "\u201d: " + acc[qq * Lk + kk].toPrecision(3));
      });
      cv.addEventListener("mouseleave", function () { $("tooltip").style.display = "none"; });
      var fig = el("figure"); fig.appendChild(cv);
      fig.appendChild(el("figcaption", {}, am.groups[g] + (state.tokHead >= 0 ? ", head " + state.tokHead : ", mean of heads") + " · rows: queries, columns: keys"));
      col.appendChild(fig);
      box.appendChild(col);
    });
  }

  // -- tab: shapes, items --------------------------------------------------------------------------------
  function table(rows, cols) {
    var t = el("table"), tr = el("tr");
    cols.forEach(function (c) { tr.appendChild(el("th", {}, c)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr");
      cols.forEach(function (c) { var v = r[c]; row.appendChild(el("td", {}, Array.isArray(v) ? v.join("\u00d7") : v === null || v === undefined ? "" : String(v))); });
      t.appendChild(row);
    });
    return t;
  }
  function renderShapes() {
    var box = $("shapes-views"); box.innerHTML = "";
    items().forEach(function (it) {
      box.appendChild(el("h3", {}, title(it) + ": " + (it.prompt || "")));
      if (!it.shapes.length) { box.appendChild(el("p", { "class": "muted" }, "no shapes results")); return; }
      it.shapes.forEach(function (s) {
        box.appendChild(el("p", { "class": "muted" }, s.label + ": " + s.rows.length + " site(s)"));
        box.appendChild(table(s.rows, ["site", "kind", "index", "query", "key", "value", "probs", "output", "dtype", "calls"]));
      });
    });
  }
  function renderItems() {
    var box = $("items-views"); box.innerHTML = "";
    var rows = run().items.map(function (it) { return { item: it.id, prompt: it.prompt, "negative prompt": it.negative_prompt, seed: it.seed, status: it.status, seconds: it.seconds, error: it.error }; });
    box.appendChild(table(rows, ["item", "prompt", "negative prompt", "seed", "status", "seconds", "error"]));
    items().forEach(function (it) {
      box.appendChild(el("h3", {}, "files of " + it.id));
      var ul = el("ul");
      it.files.forEach(function (f) { var li = el("li"), a = el("a", { href: (run().dir ? run().dir + "/" : "") + f.path }, f.path); li.appendChild(a); li.appendChild(document.createTextNode(" (" + f.bytes + " bytes)")); ul.appendChild(li); });
      box.appendChild(ul);
    });
    var det = el("details"); det.appendChild(el("summary", {}, "configuration and versions"));
    det.appendChild(el("pre", {}, JSON.stringify({ config: run().config, versions: run().versions }, null, 1)));
    box.appendChild(det);
  }

  // -- wiring -------------------------------------------------------------------------------------
  function hasAny(key, kind) {
    return run().items.some(function (it) { return it[key].some(function (x) { return !kind || x.kind === kind; }); });
  }
  function setupRun() {
    var r = run();
    fillSelect($("itemA"), r.items.map(function (it) { return it.id + ": " + (it.prompt || ""); }), state.a + 1);
    fillSelect($("itemB"), ["(none)"].concat(r.items.map(function (it) { return it.id + ": " + (it.prompt || ""); })), state.b + 1);
    $("itemA").selectedIndex = state.a;
    var tabs = { heat: hasAny("heatmaps"), steps: hasAny("attnmaps", "image"), stats: hasAny("stats"),
                 tokens: hasAny("attnmaps", "tokens"), shapes: hasAny("shapes"), items: true };
    Object.keys(tabs).forEach(function (t) { document.querySelector("nav.tabs button[data-tab=" + t + "]").disabled = !tabs[t]; });
    if (!tabs[state.tab]) state.tab = Object.keys(tabs).filter(function (t) { return tabs[t]; })[0];
    var w = $("warnings"); w.innerHTML = "";
    r.warnings.concat(DATA.notes).forEach(function (x) { w.appendChild(el("div", { "class": "warn" }, x)); });
  }
  function render() {
    document.querySelectorAll("nav.tabs button").forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-tab") === state.tab); });
    document.querySelectorAll("section.tab").forEach(function (s) { s.classList.toggle("active", s.id === "tab-" + state.tab); });
    $("wordbar").style.display = state.tab === "heat" || state.tab === "steps" ? "" : "none";
    drawWords();
    if (state.tab === "heat") renderHeat();
    if (state.tab === "steps") { setupStepControls(); renderSteps(); }
    if (state.tab === "stats") renderStats();
    if (state.tab === "tokens") renderTokens();
    if (state.tab === "shapes") renderShapes();
    if (state.tab === "items") renderItems();
    document.body.setAttribute("data-tab", state.tab);
  }

  function init() {
    fillSelect($("run"), DATA.runs.map(function (r) { return r.name + (r.dir ? " (" + r.dir + ")" : ""); }), 1);
    $("run").selectedIndex = 0;
    $("run").onchange = function () { state.run = +this.value + 1; state.a = 0; state.b = -1; setupRun(); render(); };
    $("itemA").onchange = function () { state.a = this.selectedIndex; render(); };
    $("itemB").onchange = function () { state.b = this.selectedIndex - 1; render(); };
    $("alpha").oninput = function () { state.alpha = +this.value; $("alphaLabel").textContent = this.value; render(); };
    $("stepFrom").oninput = function () { state.from = Math.min(+this.value, state.to); render(); };
    $("stepTo").oninput = function () { state.to = Math.max(+this.value, state.from); render(); };
    $("group").onchange = function () { state.group = +this.value; render(); };
    $("head").onchange = function () { state.head = +this.value; render(); };
    $("metric").onchange = function () { state.metric = this.selectedIndex; render(); };
    $("grouping").onchange = function () { state.grouping = this.value; render(); };
    $("statHead").onchange = function () { state.head = +this.value; render(); };
    $("tokGroup").onchange = function () { state.tokGroup = this.selectedIndex; render(); };
    $("tokHead").onchange = function () { state.tokHead = +this.value; render(); };
    document.querySelectorAll("nav.tabs button").forEach(function (b) {
      b.onclick = function () { state.tab = b.getAttribute("data-tab"); state.head = -1; render(); };
    });
    colorbar($("cbar"));
    setupRun();
    render();
    document.body.setAttribute("data-ready", "1");
  }
  init();
})();
