/* attnflow viewer: plain JavaScript, no dependencies, works from file:// and from a plain
 * web server (Jupyter's /files/ included: the page sets no referrer policy).
 *
 * index.html carries the metadata as JSON in <script id="attnflow-data">. Attention
 * weights live in shards (shards/<id>.js) that call window.attnflowShard(header,
 * data, scales) when a <script src> for them is added; a Jupyter inline view puts
 * the same triples in meta.inline instead. Each shard holds, for its heads and its
 * query rows r0..r1, the row prefixes (keys 0..width-1) one after another, as uint8
 * codes (or float16) of weight / row max, plus one float32 scale (the row max) per
 * head and row, both as base85 text (b85bytes). thumbs/<id>.js hold the layer x head thumbnails (uint8 [layer, head,
 * tq, tk]) of one example.
 *
 * One token pane shows one of three rows for the focused token, said in words above it:
 *   Observer  hover position p: attention row p, what p attended to;
 *   Observed  hover position p: column p, who attended to p;
 *   Flow      hover token p: composed row p-1, the row whose output produced token p.
 * A minimap beside the pane shows the whole text with the current weights; the side
 * column follows the focused token: span bars, query -> key lines, the attention
 * matrix of the current head (canvas) and a layer x head grid of thumbnails (canvas).
 *
 * Token text is only ever inserted with textContent / createTextNode / canvas fillText.
 * performance marks: attnflow:ready (first weights painted), attnflow:hover (a hover's
 * paint, measured), attnflow:thumbs (the head grid drawn).
 */
(function () {
  "use strict";

  const meta = JSON.parse(document.getElementById("attnflow-data").textContent);
  const app = document.getElementById("app");
  const H = meta.num_heads;
  const L = meta.layers.length;
  const AT = meta.attributions || null; // columns of the attributions table (span sources only)
  const METHODS = meta.flow_methods.concat(AT ? Array.from(new Set(AT.method)).filter((m) => meta.flow_methods.indexOf(m) < 0) : []);
  const MODES = METHODS.length ? ["observer", "observed", "flow"] : ["observer", "observed"];
  const MEMORY_LIMIT = 768 * 2 ** 20; // bytes of decoded shards kept before older layers are dropped
  const PARTIAL = meta.partial_marker || "\u25cc";
  const FEW = 40; // up to this many tokens the lines view shows every token

  const anySinks = meta.examples.some((ex) => ex.sinks && ex.sinks.length);
  const state = {
    example: 0,
    layer: 0, // index into meta.layers
    heads: [0], // selected heads, overlaid in distinct colours when several
    mean: false, // mean over every head of the layer
    gamma: 1,
    threshold: 0,
    normalize: true,
    dropSinks: anySinks, // leave sink keys out of the colour scale (on when any were detected)
    method: METHODS[0] || null,
    mode: "observer",
    focus: { observer: null, observed: null, flow: null },
    frozen: { observer: false, observed: false, flow: false },
  };

  // ---------------------------------------------------------------- shard store
  const store = new Map(); // "kind|example|what|head" -> [{r0, r1, codes, scales, starts}]
  const loaded = new Map(); // shard id -> promise
  let storedBytes = 0;

  // base85 text (html.py's b85: RFC 1924 digits with &<>` swapped for .,:]) -> bytes
  const B85 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%.()*+-;,=:?@^_]{|}~";
  const DIGIT = new Uint8Array(128);
  for (let i = 0; i < 85; i++) DIGIT[B85.charCodeAt(i)] = i;
  function b85bytes(s) {
    const n = s.length;
    const full = n - (n % 5);
    const out = new Uint8Array(Math.ceil(n / 5) * 4);
    const put = (o, v) => {
      out[o] = v >>> 24;
      out[o + 1] = v >>> 16;
      out[o + 2] = v >>> 8;
      out[o + 3] = v;
    };
    const d = (i) => DIGIT[s.charCodeAt(i)];
    let o = 0;
    for (let i = 0; i < full; i += 5, o += 4) put(o, (((d(i) * 85 + d(i + 1)) * 85 + d(i + 2)) * 85 + d(i + 3)) * 85 + d(i + 4));
    if (n > full) {
      let v = 0;
      for (let i = full; i < full + 5; i++) v = v * 85 + (i < n ? d(i) : 84); // the last group: padded with the top digit
      put(o, v);
    }
    return out.subarray(0, (full / 5) * 4 + (n > full ? n - full - 1 : 0));
  }

  function widthsOf(kind, example, what) {
    const ex = meta.examples[example];
    const info = kind === "flow" ? ex.flow[what] : { rows: ex.rows, causal: meta.causal };
    return info.rows.map((q) => (info.causal ? q + 1 : ex.length));
  }

  const thumbs = new Map(); // example -> [{l0, l1, tq, tk, bytes}]

  function register(header, data, scales) {
    if (header.kind === "thumb") {
      if (!thumbs.has(header.example)) thumbs.set(header.example, []);
      thumbs.get(header.example).push({ l0: header.l0, l1: header.l1, tq: header.tq, tk: header.tk, bytes: b85bytes(data) });
      return;
    }
    const what = header.kind === "flow" ? header.method : header.layer;
    const widths = widthsOf(header.kind, header.example, what).slice(header.r0, header.r1);
    const starts = new Int32Array(widths.length + 1);
    for (let i = 0; i < widths.length; i++) starts[i + 1] = starts[i] + widths[i];
    const per = starts[widths.length];
    const bytes = b85bytes(data);
    const codes = header.enc === "float16" ? new Uint16Array(bytes.buffer, 0, bytes.length / 2) : bytes;
    const sc = b85bytes(scales);
    const rowScales = new Float32Array(sc.buffer, 0, sc.length / 4);
    const R = header.r1 - header.r0;
    header.heads.forEach((h, i) => {
      const key = [header.kind, header.example, what, h].join("|");
      if (!store.has(key)) store.set(key, []);
      store.get(key).push({
        r0: header.r0,
        r1: header.r1,
        codes: codes.subarray(i * per, (i + 1) * per),
        scales: rowScales.subarray(i * R, (i + 1) * R),
        starts: starts,
        f16: header.enc === "float16",
      });
    });
    storedBytes += bytes.length + sc.length;
    if (header.enc === "float16") fillHalf();
  }
  window.attnflowShard = register;

  function loadShard(entry) {
    if (loaded.has(entry.id)) return loaded.get(entry.id);
    let p;
    const thumb = entry.kind === "thumb";
    if (meta.inline) {
      p = Promise.resolve().then(() => register.apply(null, (thumb ? meta.inline_thumbs : meta.inline)[entry.id]));
    } else {
      p = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = (thumb ? "thumbs/" : "shards/") + entry.id + ".js";
        s.onload = () => {
          s.remove();
          resolve();
        };
        s.onerror = () => {
          loaded.delete(entry.id);
          reject(new Error("attnflow: cannot load " + s.src + "; keep the shards/ and thumbs/ folders next to index.html"));
        };
        document.head.appendChild(s);
      });
    }
    loaded.set(entry.id, p);
    return p;
  }

  function evict() {
    if (storedBytes <= MEMORY_LIMIT) return;
    const keep = (k) => {
      const [kind, ex, what] = k.split("|");
      return kind === "flow" || (+ex === state.example && +what === state.layer);
    };
    for (const k of Array.from(store.keys())) if (!keep(k)) store.delete(k);
    for (const e of meta.shards) if (!keep([e.kind, e.example, e.kind === "flow" ? e.method : e.layer].join("|"))) loaded.delete(e.id);
    storedBytes = 0;
    for (const chunks of store.values()) for (const c of chunks) storedBytes += c.codes.byteLength + c.scales.byteLength;
  }

  function ensure(kind, example, what, heads) {
    const want = meta.shards.filter(
      (e) =>
        e.kind === kind &&
        e.example === example &&
        (kind === "flow" ? e.method === what : e.layer === what) &&
        e.heads.some((h) => heads.indexOf(h) >= 0)
    );
    return Promise.all(want.map(loadShard));
  }

  const HALF = new Float32Array(65536); // float16 bits -> value, filled when a float16 shard arrives
  let halfReady = false;
  function fillHalf() {
    if (halfReady) return;
    halfReady = true;
    for (let h = 0; h < 65536; h++) {
      const s = h & 0x8000 ? -1 : 1;
      const e = (h >> 10) & 0x1f;
      const f = h & 0x3ff;
      HALF[h] = e === 0 ? s * f * 2 ** -24 : e === 31 ? (f ? NaN : s * Infinity) : s * (1 + f / 1024) * 2 ** (e - 15);
    }
  }

  function chunkFor(kind, example, what, head, row) {
    const chunks = store.get([kind, example, what, head].join("|")) || [];
    for (const c of chunks) if (row >= c.r0 && row < c.r1) return c;
    return null;
  }

  function value(c, row, key) {
    const i = row - c.r0;
    const off = c.starts[i] + key;
    if (off >= c.starts[i + 1]) return 0;
    const unit = c.f16 ? HALF[c.codes[off]] : c.codes[off] / 255;
    return unit * c.scales[i];
  }

  // weights of one head (or the mean over all) for the tokens of a panel, given the focus token
  function series(kind, what, head, pos, direction) {
    const ex = meta.examples[state.example];
    const n = ex.length;
    const out = new Float64Array(n).fill(NaN);
    const heads = head === "mean" ? range(H) : [head];
    const rows = kind === "flow" ? ex.flow[what].rows : ex.rows;
    if (direction === "row") {
      const r = rows.indexOf(pos);
      if (r < 0) return out;
      const width = widthsOf(kind, state.example, what)[r];
      for (let k = 0; k < width; k++) out[k] = 0;
      for (const h of heads) {
        const c = chunkFor(kind, state.example, what, h, r);
        if (!c) return out.fill(NaN);
        for (let k = 0; k < width; k++) out[k] += value(c, r, k) / heads.length;
      }
    } else {
      const widths = widthsOf(kind, state.example, what);
      rows.forEach((q, r) => {
        if (widths[r] <= pos) return;
        let sum = 0;
        for (const h of heads) {
          const c = chunkFor(kind, state.example, what, h, r);
          if (!c) return;
          sum += value(c, r, pos);
        }
        out[q] = sum / heads.length;
      });
    }
    return out;
  }

  // ---------------------------------------------------------------- text
  const BYTE_LEVEL = { "\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u010d": "", "\u2581": " " };

  // raw vocabulary string -> what to show, for traces without display strings (trace.text)
  function cleanToken(tok) {
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(tok);
    if (byte) {
      const b = parseInt(byte[1], 16);
      if (b === 10 || b === 9 || (b >= 32 && b < 127)) return String.fromCharCode(b);
      return tok;
    }
    let s = "";
    for (const ch of tok) s += ch in BYTE_LEVEL ? BYTE_LEVEL[ch] : ch;
    return s;
  }

  function isSpecial(tok) {
    return /^(<\|[^|]*\|>|<\/?s>|<unk>|<pad>|\[[A-Z]+\])$/.test(tok);
  }

  // the display strings of an example (trace.text when given), one per token
  function displayStrings(ex) {
    if (ex.text) return ex.text;
    // Word-level tokenizers carry no space markers (no Ġ, ▁ or whitespace): set their tokens apart with spaces.
    const wordLevel = !ex.tokens.some((tok) => /[\u0120\u2581\s]/.test(tok) || /^<0x/.test(tok));
    return ex.tokens.map((tok, p) => cleanToken(tok) + (wordLevel && p < ex.length - 1 ? "\u0000" : ""));
  }

  function short(s, n) {
    s = s.replace(/\u0000/g, "").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
    return s.length > n ? s.slice(0, n - 1) + "\u2026" : s;
  }

  function range(n) {
    return Array.from({ length: n }, (_, i) => i);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function hue(i) {
    return (i * 137.508 + 10) % 360;
  }

  function colour(s, alpha) {
    if (s === "mean") return "hsl(215 80% 45% / " + alpha + ")";
    if (s === "flow") return "hsl(25 90% 50% / " + alpha + ")";
    return "hsl(" + hue(s).toFixed(1) + " 75% 45% / " + alpha + ")";
  }

  function spanColour(s) {
    return "hsl(" + hue(s + 3).toFixed(1) + " 45% 50%)";
  }

  function ex0() {
    return meta.examples[state.example];
  }

  function tokenLabel(p) {
    return p + " \u2018" + short(shown[p] || "", 24) + "\u2019";
  }

  // ---------------------------------------------------------------- layout
  const ui = {};
  let shown = []; // display strings of the current example

  function build() {
    app.textContent = "";
    app.dataset.state = "loading";
    const head = el("header");
    head.appendChild(el("h1", {}, "attnflow \u00b7 " + (meta.title || "attention")));
    const rows = meta.examples.map((ex) => ex.rows.length).reduce((a, b) => a + b, 0);
    const tokens = meta.examples.map((ex) => ex.length).reduce((a, b) => a + b, 0);
    const summary = [
      L + " layers",
      meta.heads === "all" ? H + " heads" : "heads: " + meta.heads,
      meta.examples.length + (meta.examples.length > 1 ? " examples" : " example"),
      rows === tokens ? "every query row" : rows + " of " + tokens + " query rows",
      meta.dtype + " recorded, " + meta.precision + " shown",
    ];
    head.appendChild(el("span", { id: "summary", class: "hint" }, summary.join(" \u00b7 ")));
    head.appendChild(infoBlock());
    app.appendChild(head);
    app.appendChild(controls());
    ui.exinfo = el("div", { id: "example-info", class: "hint" });
    app.appendChild(ui.exinfo);
    ui.status = el("div", { id: "status", role: "status" }, "");
    app.appendChild(ui.status);

    const main = el("main", { id: "layout" });
    const pane = el("section", { id: "pane" });
    const tabs = el("div", { class: "tabs", role: "tablist" });
    const names = { observer: "Observer", observed: "Observed", flow: "Flow" };
    ui.tabs = {};
    for (const m of MODES) {
      const b = el("button", { id: m, class: "tab", role: "tab", "data-frozen": "false", "data-focus": "" }, names[m]);
      b.addEventListener("click", () => setMode(m));
      tabs.appendChild(b);
      ui.tabs[m] = b;
    }
    tabs.appendChild(el("span", { class: "hint" }, " hover a token; double-click freezes it (per view); Esc unfreezes"));
    pane.appendChild(tabs);
    ui.caption = el("p", { id: "caption" });
    pane.appendChild(ui.caption);
    ui.note = el("p", { id: "scale-note", class: "hint" });
    pane.appendChild(ui.note);
    const body = el("div", { class: "pane-body" });
    ui.tokens = el("div", { id: "tokens", class: "tokens" });
    ui.minimap = el("canvas", { id: "minimap", width: 48, height: 400, title: "the whole text: click or drag to scroll" });
    body.appendChild(ui.tokens);
    body.appendChild(ui.minimap);
    pane.appendChild(body);
    ui.legend = el("p", { id: "legend", class: "hint" });
    pane.appendChild(ui.legend);
    main.appendChild(pane);

    const side = el("aside", { id: "side" });
    ui.barsBox = box(side, "bars-box", "Per span");
    ui.bars = el("div", { id: "bars" });
    ui.barsBox.appendChild(ui.bars);
    const lb = box(side, "lines-box", "Query \u2192 key lines");
    ui.linesCaption = el("p", { class: "hint" });
    lb.appendChild(ui.linesCaption);
    ui.lines = el("canvas", { id: "lines", width: 400, height: 60 });
    lb.appendChild(ui.lines);
    const mb = box(side, "matrix-box", "Attention matrix");
    ui.matrixCaption = el("p", { class: "hint" });
    mb.appendChild(ui.matrixCaption);
    const zoom = el("div", { class: "group" });
    for (const [t, f] of [["+", 1.6], ["\u2212", 1 / 1.6], ["reset", 0]]) {
      const b = el("button", { class: "zoom", title: "zoom (or the mouse wheel over the matrix; drag to pan)" }, t);
      b.addEventListener("click", () => zoomMatrix(f));
      zoom.appendChild(b);
    }
    ui.matrixInfo = el("span", { id: "matrix-info", class: "hint" });
    zoom.appendChild(ui.matrixInfo);
    mb.appendChild(zoom);
    ui.matrix = el("canvas", { id: "matrix", width: 400, height: 400 });
    mb.appendChild(ui.matrix);
    const gb = box(side, "grid-box", "Every head");
    gb.appendChild(el("p", { class: "hint" }, "rows: layers, columns: heads; each thumbnail is query \u00d7 key (block means, square root, scaled to its max); click one to open it"));
    ui.grid = el("canvas", { id: "headgrid", width: 10, height: 10 });
    gb.appendChild(ui.grid);
    main.appendChild(side);
    app.appendChild(main);
    app.appendChild(
      el(
        "footer",
        {},
        "Keys: j/\u2193 next layer, k/\u2191 previous layer, l/\u2192 next head, h/\u2190 previous head, " +
          "m mean of heads, 1/2/3 views, / search, Esc unfreeze. Shift-click heads to overlay them."
      )
    );
    wirePane();
    wireMinimap();
    wireMatrix();
    wireGrid();
    wireLines();
  }

  function box(parent, id, title) {
    const s = el("section", { id: id, class: "box" });
    s.appendChild(el("h3", {}, title));
    parent.appendChild(s);
    return s;
  }

  function infoBlock() {
    const d = el("details", { id: "info" });
    d.appendChild(el("summary", {}, "model, recording and flow settings"));
    const t = el("table");
    const rows = [];
    for (const k in meta.model_info) rows.push(["model." + k, meta.model_info[k]]);
    for (const k in meta.settings) rows.push(["settings." + k, meta.settings[k]]);
    rows.push(["layers", meta.layers.join(", ")], ["heads", meta.heads + " (" + H + " stored)"]);
    rows.push(["dtype", meta.dtype], ["viewer precision", meta.precision], ["causal", meta.causal]);
    for (const m of METHODS) {
      const info = (meta.flow_info || {})[m];
      const kind = meta.flow_methods.indexOf(m) >= 0 ? "flow rows" : "attributions table only";
      rows.push(["flow." + m, kind + (info ? "; " + Object.keys(info).map((k) => k + " = " + JSON.stringify(info[k])).join(", ") : "; settings not recorded (to_html(flow_info=...))")]);
    }
    meta.examples.forEach((ex, b) => {
      const s = (ex.sinks || []).map((p) => p + " " + JSON.stringify(ex.tokens[p]));
      rows.push(["sinks, example " + b, s.length ? s.join(", ") : "none detected"]);
      if (ex.info) rows.push(["example " + b, ex.info]);
    });
    rows.push(["sink rule", "a key taking more than " + meta.sink_share + " of the (layer, head)-mean attention in most rows, or a special token at position 0"]);
    rows.push(["attnflow", meta.attnflow_version]);
    for (const [k, v] of rows) {
      const tr = el("tr");
      tr.appendChild(el("th", {}, k));
      tr.appendChild(el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
      t.appendChild(tr);
    }
    d.appendChild(t);
    return d;
  }

  function exampleLabel(ex, i) {
    const info = ex.info || {};
    let s = "example " + i;
    if (info.question) s += ": " + short(String(info.question), 60);
    if (info.answer !== undefined) s += " \u2192 " + short(String(info.answer), 30);
    if (info.correct === true) s += " \u2713 correct";
    if (info.correct === false) s += " \u2717 incorrect";
    return s + " (" + ex.length + " tokens" + (ex.gold && ex.gold.length ? ", " + ex.gold.length + " gold" : "") + ")";
  }

  function controls() {
    const bar = el("nav", { id: "controls" });
    if (meta.examples.length > 1) {
      const sel = el("select", { id: "example", "aria-label": "example" });
      meta.examples.forEach((ex, i) => sel.appendChild(el("option", { value: i }, exampleLabel(ex, i))));
      sel.addEventListener("change", () => setExample(+sel.value));
      bar.appendChild(label("example", sel));
      ui.example = sel;
    }
    const layer = el("select", { id: "layer", "aria-label": "layer" });
    meta.layers.forEach((l, i) => layer.appendChild(el("option", { value: i }, "layer " + l)));
    layer.addEventListener("change", () => setLayer(+layer.value));
    const prev = el("button", { id: "layer-prev", title: "previous layer (k)" }, "\u25b2");
    const next = el("button", { id: "layer-next", title: "next layer (j)" }, "\u25bc");
    prev.addEventListener("click", () => setLayer(state.layer - 1));
    next.addEventListener("click", () => setLayer(state.layer + 1));
    const lg = label("layer", layer);
    lg.appendChild(prev);
    lg.appendChild(next);
    bar.appendChild(lg);
    ui.layer = layer;

    const heads = el("span", { id: "heads", class: "group" });
    heads.appendChild(el("span", { class: "label" }, meta.heads === "all" ? "heads" : "heads (" + meta.heads + ")"));
    ui.headButtons = range(H).map((h) => {
      const b = el("button", { class: "head", "data-head": h, title: "click: this head; shift-click: overlay" },
        meta.heads === "all" ? String(h) : meta.heads);
      b.style.setProperty("--c", colour(h, 1));
      b.addEventListener("click", (ev) => pickHead(h, ev.shiftKey || ev.ctrlKey || ev.metaKey));
      heads.appendChild(b);
      return b;
    });
    if (H > 1) {
      ui.mean = el("button", { id: "mean", class: "head", title: "mean over all heads (m)" }, "mean");
      ui.mean.style.setProperty("--c", colour("mean", 1));
      ui.mean.addEventListener("click", () => setMean(!state.mean));
      heads.appendChild(ui.mean);
    }
    bar.appendChild(heads);

    ui.gamma = slider("gamma", 0.1, 3, 0.05, state.gamma, (v) => (state.gamma = v));
    ui.threshold = slider("threshold", 0, 0.5, 0.005, state.threshold, (v) => (state.threshold = v));
    bar.appendChild(ui.gamma.wrap);
    bar.appendChild(ui.threshold.wrap);
    const norm = el("input", { type: "checkbox", id: "normalize", checked: "" });
    norm.addEventListener("change", () => {
      state.normalize = norm.checked;
      paint();
    });
    bar.appendChild(label("scale to max", norm));
    const sinks = el("input", { type: "checkbox", id: "sinks" });
    sinks.checked = state.dropSinks;
    sinks.addEventListener("change", () => {
      state.dropSinks = sinks.checked;
      matrixKey = "";
      paint();
    });
    const sl = label("leave sinks out of the scale", sinks);
    sl.title = "sink keys (see the settings block) are coloured at most full strength and do not set the maximum";
    bar.appendChild(sl);
    if (METHODS.length) {
      const m = el("select", { id: "method", "aria-label": "flow method" });
      // flow_info's "what" says, e.g., that maxflow is Abnar & Zuidema's attention flow and flow the residual recurrence
      METHODS.forEach((name) => m.appendChild(el("option", { value: name, title: ((meta.flow_info || {})[name] || {}).what || name }, name)));
      m.addEventListener("change", () => {
        state.method = m.value;
        fillTokens();
        refresh();
      });
      bar.appendChild(label("flow", m));
    }
    const search = el("input", { type: "search", id: "search", placeholder: "find a token or span", "aria-label": "search" });
    ui.searchCount = el("span", { id: "search-count", class: "hint" });
    search.addEventListener("input", () => runSearch(search.value));
    search.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        nextMatch(ev.shiftKey ? -1 : 1);
      } else if (ev.key === "Escape") search.blur();
    });
    const sg = label("search", search);
    sg.appendChild(ui.searchCount);
    bar.appendChild(sg);
    ui.search = search;
    return bar;
  }

  function label(text, input) {
    const w = el("label", { class: "group" });
    w.appendChild(el("span", { class: "label" }, text));
    w.appendChild(input);
    return w;
  }

  function slider(name, min, max, step, val, set) {
    const input = el("input", { type: "range", id: name, min: min, max: max, step: step, value: val });
    const out = el("output", { id: name + "-value" }, String(val));
    input.addEventListener("input", () => {
      set(+input.value);
      out.textContent = input.value;
      matrixKey = "";
      paint();
    });
    const wrap = label(name, input);
    wrap.appendChild(out);
    return { wrap: wrap, input: input };
  }

  // The text of one example, built once into the pane.
  let toks = [];
  let sinkSet = new Set();
  function fillTokens() {
    const ex = ex0();
    shown = displayStrings(ex);
    sinkSet = new Set(ex.sinks || []);
    const gold = new Set(ex.gold || []);
    const owner = new Int32Array(ex.length).fill(-1); // first span listed wins, as in the tokens table
    for (let s = ex.spans.length - 1; s >= 0; s--)
      for (let p = ex.spans[s].start; p < Math.min(ex.spans[s].end, ex.length); p++) owner[p] = s;
    const text = document.createDocumentFragment();
    let box = text;
    let boxSpan = -1;
    for (let p = 0; p < ex.length; p++) {
      if (owner[p] !== boxSpan) {
        boxSpan = owner[p];
        if (boxSpan < 0) box = text;
        else {
          const sp = ex.spans[boxSpan];
          box = el("span", { class: "span-box kind-" + sp.kind + (gold.has(boxSpan) ? " gold" : ""), "data-span": boxSpan });
          box.style.setProperty("--c", spanColour(boxSpan));
          box.appendChild(el("span", { class: "span-name" }, (gold.has(boxSpan) ? "\u2605 " : "") + sp.name));
          text.appendChild(box);
        }
      }
      if (p === ex.prompt_length && p > 0) box.appendChild(el("span", { class: "completion-mark", title: "completion starts" }, "\u25b8"));
      const tok = ex.tokens[p];
      let s = shown[p];
      const sep = s.endsWith("\u0000");
      if (sep) s = s.slice(0, -1);
      const t = el("span", { class: p >= ex.prompt_length ? "tok completion" : "tok", "data-pos": p, title: p + ": " + tok });
      if (isSpecial(tok)) t.classList.add("special");
      if (sinkSet.has(p)) t.classList.add("sink");
      if (s === PARTIAL) t.classList.add("partial");
      if (s === "") {
        s = "\u2205";
        t.classList.add("empty");
      }
      t.textContent = s.indexOf("\n") >= 0 ? s.replace(/\n/g, "\u21b5\n") : s;
      box.appendChild(t);
      if (sep) box.appendChild(document.createTextNode(" "));
    }
    ui.tokens.textContent = "";
    ui.tokens.appendChild(text);
    toks = Array.from(ui.tokens.querySelectorAll(".tok"));
    geometry = null;
    markRows();
    legend();
    exampleInfo();
    if (ui.search.value) runSearch(ui.search.value);
  }

  function markRows() {
    const rows = state.mode === "flow" ? explained() : state.mode === "observer" ? new Set(ex0().rows) : null;
    for (let p = 0; p < toks.length; p++) toks[p].classList.toggle("has-row", rows ? rows.has(p) : false);
  }

  function legend() {
    const ex = ex0();
    ui.legend.textContent = "";
    if (ex.gold && ex.gold.length) {
      ui.legend.appendChild(el("span", { class: "legend-gold" }, "\u2605 gold"));
      ui.legend.appendChild(document.createTextNode(" supporting span (thick double outline): " + ex.gold.map((s) => ex.spans[s].name).join(", ") + ". "));
    }
    if (ex.spans.length) ui.legend.appendChild(document.createTextNode("Outlined: spans. "));
    ui.legend.appendChild(el("span", { class: "legend-completion" }, "\u25b8 completion"));
    ui.legend.appendChild(document.createTextNode(" tokens are purple. "));
    if (sinkSet.size) {
      ui.legend.appendChild(el("span", { class: "legend-sink" }, "dashed"));
      ui.legend.appendChild(document.createTextNode(": sink keys. "));
    }
    if (shown.indexOf(PARTIAL) >= 0) ui.legend.appendChild(document.createTextNode(PARTIAL + ": a token holding only part of a character. "));
  }

  function exampleInfo() {
    const ex = ex0();
    const info = ex.info || {};
    const parts = [];
    if (info.question !== undefined) parts.push("question: " + info.question);
    if (info.answer !== undefined) parts.push("answer: " + info.answer);
    if (info.correct === true) parts.push("\u2713 correct");
    if (info.correct === false) parts.push("\u2717 incorrect");
    ui.exinfo.textContent = parts.join(" \u00b7 ");
  }

  // ---------------------------------------------------------------- search
  let matches = [];
  let matchAt = -1;
  function runSearch(q) {
    for (const p of matches) if (toks[p]) toks[p].classList.remove("match");
    matches = [];
    matchAt = -1;
    q = q.toLowerCase();
    if (!q) {
      ui.searchCount.textContent = "";
      return;
    }
    const starts = [];
    let all = "";
    for (let p = 0; p < shown.length; p++) {
      starts.push(all.length);
      all += shown[p].replace(/\u0000/g, " ").toLowerCase();
    }
    const hit = new Set();
    for (let i = all.indexOf(q); i >= 0 && hit.size < 5000; i = all.indexOf(q, i + 1)) {
      let p = upper(starts, i);
      for (; p < shown.length && starts[p] < i + q.length; p++) hit.add(p);
    }
    ex0().spans.forEach((sp, s) => {
      if (sp.name.toLowerCase().indexOf(q) >= 0) for (let p = sp.start; p < Math.min(sp.end, shown.length); p++) hit.add(p);
    });
    matches = Array.from(hit).sort((a, b) => a - b);
    for (const p of matches) toks[p].classList.add("match");
    ui.searchCount.textContent = matches.length ? matches.length + " tokens (Enter: next)" : "no match";
    drawMinimap();
  }

  function upper(starts, i) {
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= i) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  function nextMatch(d) {
    if (!matches.length) return;
    matchAt = (matchAt + d + matches.length) % matches.length;
    reveal(matches[matchAt]);
  }

  function reveal(p) {
    const t = toks[p];
    if (!t) return;
    const box = ui.tokens;
    const top = t.offsetTop - box.offsetTop;
    if (top < box.scrollTop || top > box.scrollTop + box.clientHeight - 20) box.scrollTop = top - box.clientHeight / 3;
    t.classList.remove("flash");
    void t.offsetWidth;
    t.classList.add("flash");
  }

  // ---------------------------------------------------------------- interaction
  function wirePane() {
    const body = ui.tokens;
    body.addEventListener("mouseover", (ev) => {
      const t = ev.target.closest ? ev.target.closest(".tok") : null;
      if (!t) return;
      const m = state.mode;
      if (state.frozen[m]) return;
      const t0 = performance.now();
      state.focus[m] = +t.dataset.pos;
      paint();
      performance.measure("attnflow:hover", { start: t0 }); // read by bench/export.py and the tests
    });
    body.addEventListener("mouseleave", () => {
      const m = state.mode;
      if (state.frozen[m] || state.focus[m] === null) return;
      state.focus[m] = null;
      paint();
    });
    body.addEventListener("dblclick", (ev) => {
      const t = ev.target.closest ? ev.target.closest(".tok") : null;
      freeze(state.mode, t ? +t.dataset.pos : null);
    });
    body.addEventListener("scroll", () => scheduleMinimap());
    window.addEventListener("resize", () => {
      geometry = null;
      scheduleMinimap();
      drawGrid();
      matrixKey = "";
      drawMatrix();
    });
  }

  function freeze(m, pos) {
    if (state.frozen[m]) {
      state.frozen[m] = false;
      if (pos !== null) state.focus[m] = pos;
    } else if (pos !== null) {
      state.frozen[m] = true;
      state.focus[m] = pos;
    }
    ui.tabs[m].dataset.frozen = String(state.frozen[m]);
    paint();
  }

  function setMode(m) {
    if (MODES.indexOf(m) < 0 || m === state.mode) return;
    const old = state.mode;
    if (!state.frozen[old]) state.focus[old] = null; // the mouse left that view
    state.mode = m;
    markRows();
    paint();
    const p = state.focus[m];
    if (p !== null) reveal(p); // the pinned target of this view stays in sight
  }

  function pickHead(h, add) {
    if (add) {
      const i = state.heads.indexOf(h);
      if (i >= 0 && state.heads.length > 1) state.heads.splice(i, 1);
      else if (i < 0) state.heads.push(h);
    } else state.heads = [h];
    state.mean = false;
    refresh();
  }

  function setMean(on) {
    state.mean = on && H > 1;
    refresh();
  }

  function setLayer(i) {
    state.layer = Math.max(0, Math.min(L - 1, i));
    refresh();
  }

  function setExample(i) {
    state.example = i;
    for (const m of MODES) {
      state.focus[m] = null;
      state.frozen[m] = false;
      ui.tabs[m].dataset.frozen = "false";
    }
    if (ui.example) ui.example.value = String(i);
    fillTokens();
    refresh();
    loadThumbs();
  }

  function stepHead(d) {
    const cur = state.mean ? 0 : state.heads[state.heads.length - 1];
    pickHead((cur + d + H) % H, false);
  }

  document.addEventListener("keydown", (ev) => {
    const tag = ev.target && ev.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const act = {
      j: () => setLayer(state.layer + 1),
      ArrowDown: () => setLayer(state.layer + 1),
      k: () => setLayer(state.layer - 1),
      ArrowUp: () => setLayer(state.layer - 1),
      l: () => stepHead(1),
      ArrowRight: () => stepHead(1),
      h: () => stepHead(-1),
      ArrowLeft: () => stepHead(-1),
      m: () => setMean(!state.mean),
      1: () => setMode("observer"),
      2: () => setMode("observed"),
      3: () => setMode("flow"),
      "/": () => ui.search.focus(),
      Escape: () => {
        for (const m of MODES) {
          state.frozen[m] = false;
          ui.tabs[m].dataset.frozen = "false";
        }
        paint();
      },
    }[ev.key];
    if (act) {
      ev.preventDefault();
      act();
    }
  });

  // ---------------------------------------------------------------- painting
  let generation = 0;
  let firstReady = true;

  function selectedSeries() {
    return state.mean ? ["mean"] : state.heads.slice();
  }

  function refresh() {
    const gen = ++generation;
    ui.layer.value = String(state.layer);
    ui.headButtons.forEach((b, h) => b.setAttribute("aria-pressed", String(!state.mean && state.heads.indexOf(h) >= 0)));
    if (ui.mean) ui.mean.setAttribute("aria-pressed", String(state.mean));
    app.dataset.layer = String(meta.layers[state.layer]);
    app.dataset.heads = selectedSeries().join(" ");
    app.dataset.example = String(state.example);
    app.dataset.state = "loading";
    ui.status.textContent = "loading\u2026";
    evict();
    const heads = state.mean ? range(H) : state.heads;
    const jobs = [ensure("attn", state.example, state.layer, heads)];
    if (hasFlow()) jobs.push(ensure("flow", state.example, state.method, [0]));
    Promise.all(jobs).then(
      () => {
        if (gen !== generation) return;
        app.dataset.state = "ready";
        ui.status.textContent = "";
        matrixKey = "";
        paint();
        drawGrid();
        if (firstReady) {
          firstReady = false;
          performance.mark("attnflow:ready");
          loadThumbs(); // after the first weights, which the first paint waits for
        }
        requestAnimationFrame(() => drawMatrix());
      },
      (err) => {
        ui.status.textContent = err.message;
        app.dataset.state = "error";
        console.error(err.message);
      }
    );
  }

  // the weights the pane shows for the focused token: one array per series, NaN where nothing
  function current() {
    const m = state.mode;
    const pos = state.focus[m];
    const list = m === "flow" ? ["flow"] : selectedSeries();
    if (pos === null || app.dataset.state === "loading") return { list: list, pos: pos, ws: [] };
    if (m === "flow") return { list: list, pos: pos, ws: [hasFlow() ? series("flow", state.method, 0, pos - 1, "row") : spanShading(pos)] };
    return { list: list, pos: pos, ws: list.map((s) => series("attn", state.layer, s, pos, m === "observer" ? "row" : "column")) };
  }

  let cur = { list: [], pos: null, ws: [] };
  function paint() {
    const m = state.mode;
    cur = current();
    const { list, pos, ws } = cur;
    const rowView = m !== "observed" && !(m === "flow" && !hasFlow());
    const drop = state.dropSinks && rowView && sinkSet.size > 0;
    const scales = ws.map((w) => {
      if (!state.normalize && m !== "flow") return 1;
      let top = 0;
      for (let k = 0; k < w.length; k++) if (w[k] > top && !(drop && sinkSet.has(k))) top = w[k];
      return top || 1;
    });
    app.dataset.excluded = drop ? Array.from(sinkSet).sort((a, b) => a - b).join(" ") : "";
    for (const mm of MODES) {
      ui.tabs[mm].setAttribute("aria-selected", String(mm === m));
      ui.tabs[mm].dataset.focus = state.focus[mm] === null ? "" : String(state.focus[mm]);
    }
    ui.tabs[m].dataset.series = list.join(" ");
    app.dataset.mode = m;
    for (let k = 0; k < toks.length; k++) {
      const t = toks[k];
      t.classList.toggle("focus", k === pos);
      t.classList.toggle("frozen", k === pos && state.frozen[m]);
      if (!ws.length || isNaN(ws[0][k])) {
        if (t.dataset.w !== undefined) {
          delete t.dataset.w;
          delete t.dataset.i;
          t.style.background = "";
        }
        continue;
      }
      const wk = ws.map((w) => w[k]);
      const ik = wk.map((w, i) => (w < state.threshold || w <= 0 ? 0 : Math.min(1, Math.pow(w / scales[i], state.gamma))));
      t.dataset.w = wk.map((w) => w.toPrecision(6)).join(" ");
      t.dataset.i = ik.map((v) => v.toFixed(4)).join(" ");
      t.style.background = background(list, ik);
    }
    caption(pos, ws, drop);
    bars(m === "flow" ? pos : null, m === "flow" ? ws[0] : null);
    drawLines();
    scheduleMinimap();
    drawMatrixOverlay();
  }

  function headWords() {
    if (state.mean) return "mean of " + H + " heads";
    if (meta.heads !== "all") return "heads reduced by " + meta.heads;
    return (state.heads.length > 1 ? "heads " : "head ") + state.heads.join(", ");
  }

  function caption(pos, ws, drop) {
    const m = state.mode;
    const where = "layer " + meta.layers[state.layer] + ", " + headWords();
    let text;
    if (pos === null) {
      text = {
        observer: "Observer \u2014 hover position p to see attention row p: what p attended to (" + where + ").",
        observed: "Observed \u2014 hover position p to see column p: who attended to p (" + where + ").",
        flow: "Flow \u2014 hover a token to see what it was produced from: the composed row of the position before it (" + (state.method || "") + ").",
      }[m];
    } else if (m === "observer") {
      text = "What position " + tokenLabel(pos) + " attended to \u2014 attention row " + pos + ", " + where + ".";
      if (ws.length && isNaN(ws[0][0])) text += " This row was not recorded.";
    } else if (m === "observed") {
      text = "Who attended to position " + tokenLabel(pos) + " \u2014 column " + pos + " of every recorded row, " + where + ".";
    } else if (hasFlow()) {
      text = "What token " + tokenLabel(pos) + " was produced from \u2014 " + state.method + " row " + (pos - 1) + " (the position before it).";
      if (pos === 0) text = "Token 0 was not produced by the model: nothing before it.";
      else if (ws.length && isNaN(ws[0][0])) text += " No " + state.method + " row was stored for position " + (pos - 1) + "; rows with one are underlined.";
    } else {
      const targets = Array.from(explained()).sort((a, b) => a - b);
      text = "Attributions (" + state.method + ") of token " + tokenLabel(pos) + ": each token shaded by its span's score.";
      if (attributed(pos) === null) text = "The " + state.method + " attributions table has no row for token " + pos + "; it scores target" + (targets.length === 1 ? " " : "s ") + (targets.join(", ") || "none") + " (underlined).";
    }
    ui.caption.textContent = text;
    ui.caption.title = text;
    let note = "";
    if (drop) {
      let share = 0;
      let total = 0;
      if (ws.length) for (let k = 0; k < ws[0].length; k++) if (!isNaN(ws[0][k])) {
        total += ws[0][k];
        if (sinkSet.has(k)) share += ws[0][k];
      }
      note = "Colour scale leaves out sink key" + (sinkSet.size > 1 ? "s " : " ") + Array.from(sinkSet).slice(0, 6).map(tokenLabel).join(", ") +
        (total > 0 ? " (" + ((100 * share) / total).toFixed(1) + "% of this row)" : "") + "; untick \u201cleave sinks out\u201d to include them.";
    } else if (sinkSet.size && m !== "observed") note = "Sink keys " + Array.from(sinkSet).slice(0, 6).map(tokenLabel).join(", ") + " are in the colour scale.";
    if (m !== "flow" && !state.normalize) note += " Colours: absolute weight (1 = full).";
    else note += " Colours: weight / the row's largest" + (drop ? " non-sink" : "") + " weight" + (state.gamma !== 1 ? ", to the power " + state.gamma : "") + ".";
    ui.note.textContent = note;
    ui.note.title = note;
  }

  function hasFlow() {
    const ex = ex0();
    return !!(state.method && ex.flow && ex.flow[state.method]);
  }

  // positions whose token the current method explains: produced by a flow row, or an attribution target
  function explained() {
    const ex = ex0();
    if (hasFlow()) return new Set(ex.flow[state.method].rows.map((q) => q + 1));
    const out = new Set();
    if (AT) for (let i = 0; i < AT.example.length; i++) if (AT.example[i] === state.example && AT.method[i] === state.method) out.add(AT.target[i]);
    return out;
  }

  // {span: score} of the attributions table for one target (-1: the target rows reduced together)
  function attributed(target) {
    const found = {};
    let any = false;
    if (AT)
      for (let i = 0; i < AT.example.length; i++)
        if (AT.example[i] === state.example && AT.target[i] === target && AT.method[i] === state.method) {
          found[AT.source_span[i]] = AT.score[i];
          any = true;
        }
    return any ? found : null;
  }

  // without a flow row: each token shaded by its span's attribution score
  function spanShading(pos) {
    const ex = ex0();
    const out = new Float64Array(ex.length).fill(NaN);
    const found = attributed(pos);
    if (!found) return out;
    ex.spans.forEach((sp, s) => {
      for (let p = sp.start; p < Math.min(sp.end, ex.length); p++) if (isNaN(out[p]) && s in found) out[p] = found[s];
    });
    return out;
  }

  function background(list, ik) {
    if (list.length === 1) return colour(list[0], ik[0].toFixed(3));
    const n = list.length;
    const stops = list.map((s, i) => {
      const c = colour(s, ik[i].toFixed(3));
      return c + " " + ((i * 100) / n).toFixed(2) + "% " + (((i + 1) * 100) / n).toFixed(2) + "%";
    });
    return "linear-gradient(to bottom, " + stops.join(", ") + ")";
  }

  // span bars on an absolute 0..1 axis: a span's share of the row; sink keys and the rest as their own bars
  function bars(pos, w) {
    ui.bars.textContent = "";
    const ex = ex0();
    if (!METHODS.length) {
      ui.bars.appendChild(el("p", { class: "hint" }, "no flow or attributions were exported (to_html(flow=..., attributions=...))"));
      return;
    }
    if (!ex.spans.length) {
      ui.bars.appendChild(el("p", { class: "hint" }, "this example has no spans"));
      return;
    }
    let scores = null;
    let extra = [];
    let source = "";
    const found = attributed(pos === null ? -1 : pos);
    if (found) {
      scores = ex.spans.map((_, s) => (s in found ? found[s] : null));
      source = "attributions table (" + state.method + (pos === null ? ", all targets together" : ", token " + pos) + "); axis 0 to 1";
    } else if (pos === null || !w || !hasFlow()) {
      const targets = Array.from(explained()).sort((a, b) => a - b);
      ui.bars.appendChild(el("p", { class: "hint" }, state.mode !== "flow" ? "open the Flow view and hover an output token" :
        hasFlow() ? "hover an output token (underlined)" : "the " + state.method + " attributions score target" + (targets.length === 1 ? " " : "s ") + (targets.join(", ") || "none") + "; hover one"));
      return;
    } else {
      let total = 0;
      for (const v of w) if (!isNaN(v)) total += v;
      if (!total) {
        ui.bars.appendChild(el("p", { class: "hint" }, "no " + state.method + " row was stored for position " + (pos - 1)));
        return;
      }
      const inSpan = new Uint8Array(w.length);
      scores = ex.spans.map((sp) => {
        let s = 0;
        for (let p = sp.start; p < Math.min(sp.end, w.length); p++) if (!isNaN(w[p])) {
          s += w[p];
          inSpan[p] = 1;
        }
        return s / total;
      });
      let sink = 0;
      let rest = 0;
      for (let p = 0; p < w.length; p++) if (!isNaN(w[p]) && !inSpan[p]) {
        if (sinkSet.has(p)) sink += w[p];
        else rest += w[p];
      }
      if (sinkSet.size) extra.push(["sink keys (outside spans)", sink / total, "sink"]);
      extra.push(["outside spans", rest / total, "rest"]);
      source = state.method + " row " + (pos - 1) + " summed over each span's tokens, as a share of the row; axis 0 to 1";
    }
    ui.bars.appendChild(el("p", { class: "hint" }, source));
    const gold = new Set(ex.gold || []);
    ex.spans.forEach((sp, s) => {
      const v = scores[s];
      const attrs = { class: "bar-row" + (gold.has(s) ? " gold" : ""), "data-span": s };
      if (v !== null) attrs["data-score"] = v.toPrecision(6);
      const row = el("div", attrs);
      row.appendChild(el("span", { class: "bar-label", title: sp.kind + (gold.has(s) ? ", gold (supporting)" : "") }, (gold.has(s) ? "\u2605 " : "") + sp.name));
      row.appendChild(track(v, spanColour(s)));
      row.appendChild(el("span", { class: "bar-value" }, v === null ? "unscored" : v.toFixed(3)));
      ui.bars.appendChild(row);
    });
    for (const [name, v, kind] of extra) {
      const row = el("div", { class: "bar-extra " + kind, "data-score": v.toPrecision(6) });
      row.appendChild(el("span", { class: "bar-label" }, name));
      row.appendChild(track(v, kind === "sink" ? "#9aa0aa" : "#c9cdd4"));
      row.appendChild(el("span", { class: "bar-value" }, v.toFixed(3)));
      ui.bars.appendChild(row);
    }
  }

  function track(v, c) {
    const t = el("span", { class: "bar-track" });
    if (v !== null) {
      const fill = el("span", { class: "bar-fill" + (v < 0 ? " negative" : "") });
      fill.style.width = (100 * Math.min(1, Math.abs(v))).toFixed(1) + "%";
      fill.style.setProperty("--c", c);
      t.appendChild(fill);
    }
    return t;
  }

  // ---------------------------------------------------------------- minimap
  let geometry = null; // per token [x, y, w, h] in the pane's content box
  let minimapQueued = false;

  function scheduleMinimap() {
    if (minimapQueued) return;
    minimapQueued = true;
    requestAnimationFrame(() => {
      minimapQueued = false;
      drawMinimap();
    });
  }

  function measure() {
    const box = ui.tokens;
    const x0 = box.offsetLeft;
    const y0 = box.offsetTop;
    geometry = toks.map((t) => [t.offsetLeft - x0, t.offsetTop - y0, t.offsetWidth, t.offsetHeight]);
  }

  function drawMinimap() {
    const c = ui.minimap;
    const box = ui.tokens;
    const Hc = Math.max(60, box.clientHeight);
    if (c.height !== Hc) c.height = Hc;
    if (!geometry) measure();
    const ctx = c.getContext("2d");
    const W = c.width;
    ctx.fillStyle = "#f3f4f7";
    ctx.fillRect(0, 0, W, Hc);
    const total = Math.max(box.scrollHeight, 1);
    const sy = Hc / total;
    const sx = W / Math.max(box.clientWidth, 1);
    const ws = cur.ws;
    const list = cur.list;
    for (let k = 0; k < geometry.length; k++) {
      const [x, y, w, h] = geometry[k];
      const i = toks[k].dataset.i;
      let fill = "#dfe2e8";
      if (i !== undefined) {
        const v = +i.split(" ")[0];
        if (v > 0.02) fill = colour(list[0], Math.max(0.25, v).toFixed(2));
      }
      ctx.fillStyle = fill;
      ctx.fillRect(x * sx, y * sy, Math.max(1, w * sx), Math.max(1, h * sy * 0.7));
    }
    ctx.fillStyle = "#f59e0b";
    for (const p of matches) if (geometry[p]) ctx.fillRect(0, geometry[p][1] * sy, 3, Math.max(2, geometry[p][3] * sy));
    const pos = cur.pos;
    if (pos !== null && geometry[pos]) {
      ctx.fillStyle = "#111";
      ctx.fillRect(0, geometry[pos][1] * sy - 1, W, 3);
    }
    ctx.strokeStyle = "#2563eb";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(0.75, box.scrollTop * sy + 0.75, W - 1.5, Math.max(4, box.clientHeight * sy - 1.5));
  }

  function wireMinimap() {
    const c = ui.minimap;
    let drag = false;
    const go = (ev) => {
      const r = c.getBoundingClientRect();
      const f = (ev.clientY - r.top) / r.height;
      const box = ui.tokens;
      box.scrollTop = f * box.scrollHeight - box.clientHeight / 2;
    };
    c.addEventListener("mousedown", (ev) => {
      drag = true;
      go(ev);
    });
    window.addEventListener("mousemove", (ev) => drag && go(ev));
    window.addEventListener("mouseup", () => (drag = false));
  }

  // ---------------------------------------------------------------- query -> key lines (bertviz head_view style)
  let lineItems = [];
  function drawLines() {
    const c = ui.lines;
    const ctx = c.getContext("2d");
    const { pos, ws, list } = cur;
    const m = state.mode;
    const W = (c.width = Math.max(240, Math.floor(c.parentNode.clientWidth - 4)));
    lineItems = [];
    if (pos === null || !ws.length || !ws[0].some((v) => !isNaN(v))) {
      c.height = 24;
      ctx.fillStyle = "#6b7280";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText("hover a token to draw its lines", 4, 16);
      ui.linesCaption.textContent = "";
      return;
    }
    const w = ws[0];
    let idx = [];
    for (let k = 0; k < w.length; k++) if (!isNaN(w[k])) idx.push(k);
    const few = ex0().length <= FEW;
    if (!few) idx = idx.sort((a, b) => w[b] - w[a]).slice(0, 16).sort((a, b) => a - b);
    const left = m === "observed" ? "key " + tokenLabel(pos) : (m === "flow" ? "token " : "query ") + tokenLabel(pos);
    ui.linesCaption.textContent = (m === "observed" ? "Queries that attended to " : "Keys that ") + (m === "observed" ? tokenLabel(pos) : (m === "flow" ? "token " + tokenLabel(pos) + " was produced from" : tokenLabel(pos) + " attended to")) +
      (few ? " (every token)" : " (the 16 strongest, in text order)") + "; line opacity = weight / the largest shown" + (list.length > 1 ? "; first selected head" : "") + ".";
    const rowH = 16;
    const Hc = (c.height = Math.max(rowH * idx.length + 8, 30));
    ctx.clearRect(0, 0, W, Hc);
    ctx.font = "12px ui-monospace, Menlo, monospace";
    const drop = state.dropSinks && m !== "observed";
    let top = 0;
    for (const k of idx) if (w[k] > top && !(drop && sinkSet.has(k))) top = w[k];
    top = top || 1;
    const xl = Math.floor(W * 0.36);
    const xr = Math.floor(W * 0.58);
    const yq = Hc / 2;
    ctx.fillStyle = "#111";
    ctx.textAlign = "right";
    ctx.fillText(short(left, 22), xl - 6, yq + 4);
    ctx.textAlign = "left";
    idx.forEach((k, j) => {
      const y = 4 + j * rowH + rowH / 2;
      const a = Math.min(1, w[k] / top);
      ctx.strokeStyle = colour(list[0] === "flow" ? "flow" : list[0], Math.max(0.04, a).toFixed(3));
      ctx.lineWidth = 1 + 3 * a;
      ctx.setLineDash(sinkSet.has(k) && drop ? [3, 3] : []);
      ctx.beginPath();
      ctx.moveTo(xl, yq);
      ctx.lineTo(xr, y);
      ctx.stroke();
      ctx.fillStyle = k === pos ? "#111" : "#1d1f24";
      ctx.fillText(short(k + " " + (shown[k] || ""), 22), xr + 6, y + 4);
      ctx.fillStyle = "#6b7280";
      ctx.textAlign = "right";
      ctx.fillText(w[k].toFixed(3), W - 2, y + 4);
      ctx.textAlign = "left";
      lineItems.push([y, k]);
    });
    ctx.setLineDash([]);
  }

  function wireLines() {
    ui.lines.addEventListener("click", (ev) => {
      const r = ui.lines.getBoundingClientRect();
      const y = ((ev.clientY - r.top) * ui.lines.height) / r.height;
      for (const [yy, k] of lineItems) if (Math.abs(yy - y) <= 8) reveal(k);
    });
  }

  // ---------------------------------------------------------------- attention matrix (canvas, zoomable)
  let matrixKey = "";
  const matrixImg = document.createElement("canvas");
  const view = { zoom: 1, fx: 0, fy: 0 }; // zoom and the top-left corner, as fractions of the matrix
  function matrixHead() {
    return state.mean ? "mean" : state.heads[0];
  }

  function buildMatrix() {
    const ex = ex0();
    const key = [state.example, state.layer, matrixHead(), state.dropSinks, state.gamma].join("|");
    if (key === matrixKey) return true;
    const rows = ex.rows;
    const n = ex.length;
    const heads = state.mean ? range(H) : [matrixHead()];
    const widths = widthsOf("attn", state.example, state.layer);
    matrixImg.width = n;
    matrixImg.height = rows.length;
    const ctx = matrixImg.getContext("2d");
    const img = ctx.createImageData(n, rows.length);
    const px = img.data;
    const row = new Float64Array(n);
    for (let r = 0; r < rows.length; r++) {
      row.fill(0);
      const wd = widths[r];
      for (const h of heads) {
        const c = chunkFor("attn", state.example, state.layer, h, r);
        if (!c) return false;
        const off = c.starts[r - c.r0];
        const s = c.scales[r - c.r0] / heads.length;
        for (let k = 0; k < wd; k++) row[k] += (c.f16 ? HALF[c.codes[off + k]] : c.codes[off + k] / 255) * s;
      }
      let top = 0;
      for (let k = 0; k < wd; k++) if (row[k] > top && !(state.dropSinks && sinkSet.has(k))) top = row[k];
      top = top || 1;
      const base = r * n * 4;
      for (let k = 0; k < n; k++) {
        const i = base + k * 4;
        if (k >= wd) {
          px[i] = px[i + 1] = px[i + 2] = 246;
        } else {
          const v = Math.min(1, Math.pow(row[k] / top, state.gamma));
          px[i] = 255 - v * 225;
          px[i + 1] = 255 - v * 180;
          px[i + 2] = 255 - v * 80;
        }
        px[i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    matrixKey = key;
    return true;
  }

  function drawMatrix() {
    if (app.dataset.state !== "ready") return;
    const t0 = performance.now();
    if (!buildMatrix()) return;
    const c = ui.matrix;
    const side = Math.max(200, Math.floor(c.parentNode.clientWidth - 4));
    if (c.width !== side) {
      c.width = side;
      c.height = side;
    }
    drawMatrixOverlay();
    performance.measure("attnflow:matrix", { start: t0 });
  }

  // source (key k, row r) -> canvas ((k / n - fx) * zoom * S, (r / R - fy) * zoom * S): rows stretched to the square
  function drawMatrixOverlay() {
    const c = ui.matrix;
    if (!matrixKey) return;
    const ctx = c.getContext("2d");
    const ex = ex0();
    const n = matrixImg.width;
    const R = matrixImg.height;
    const S = c.width;
    const zx = (view.zoom * S) / n;
    const zy = (view.zoom * S) / R;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, S, c.height);
    ctx.imageSmoothingEnabled = false;
    ctx.setTransform(zx, 0, 0, zy, -view.fx * view.zoom * S, -view.fy * view.zoom * S);
    ctx.drawImage(matrixImg, 0, 0);
    const rows = ex.rows;
    const first = rows.findIndex((q) => q >= ex.prompt_length);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    const X = (k) => (k / n - view.fx) * view.zoom * S;
    const Y = (r) => (r / R - view.fy) * view.zoom * S;
    if (first >= 0) {
      ctx.strokeStyle = "#7a2e9b";
      ctx.lineWidth = 2;
      ctx.strokeRect(X(0) + 1, Y(first), X(n) - X(0) - 2, Y(R) - Y(first) - 1);
    }
    const pos = cur.pos;
    if (pos !== null && state.mode !== "flow") {
      ctx.fillStyle = "rgba(220, 38, 38, 0.7)";
      if (state.mode === "observer") {
        const r = rows.indexOf(pos);
        if (r >= 0) ctx.fillRect(0, Y(r + 0.5) - 1, S, 2);
      } else ctx.fillRect(X(pos + 0.5) - 1, 0, 2, S);
    }
    ui.matrixCaption.textContent = "Layer " + meta.layers[state.layer] + ", " + (state.mean ? "mean of heads" : "head " + matrixHead()) +
      ": rows are queries (" + R + " recorded), columns keys; each row scaled to its own largest" + (state.dropSinks && sinkSet.size ? " non-sink" : "") +
      " weight; purple box: the completion's rows; red line: the focused row (or column)" + (view.zoom > 1 ? "; zoom " + view.zoom.toFixed(1) + "\u00d7" : "") + ".";
  }

  function zoomMatrix(f, cx, cy) {
    const n = Math.max(matrixImg.width, 1);
    if (!f) {
      view.zoom = 1;
      view.fx = view.fy = 0;
    } else {
      const old = view.zoom;
      view.zoom = Math.max(1, Math.min(Math.max(1, n / 4), old * f));
      const ax = view.fx + (cx === undefined ? 0.5 : cx) / old; // the point under the cursor stays put
      const ay = view.fy + (cy === undefined ? 0.5 : cy) / old;
      view.fx = clampView(ax - (cx === undefined ? 0.5 : cx) / view.zoom);
      view.fy = clampView(ay - (cy === undefined ? 0.5 : cy) / view.zoom);
    }
    drawMatrixOverlay();
  }

  function clampView(v) {
    return Math.max(0, Math.min(1 - 1 / view.zoom, v));
  }

  function matrixCell(ev) {
    const r = ui.matrix.getBoundingClientRect();
    const fx = (ev.clientX - r.left) / r.width;
    const fy = (ev.clientY - r.top) / r.height;
    return {
      fx: fx, fy: fy,
      key: Math.floor((view.fx + fx / view.zoom) * matrixImg.width),
      row: Math.floor((view.fy + fy / view.zoom) * matrixImg.height),
    };
  }

  function wireMatrix() {
    const c = ui.matrix;
    c.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const p = matrixCell(ev);
      zoomMatrix(ev.deltaY < 0 ? 1.25 : 0.8, p.fx, p.fy);
    }, { passive: false });
    let drag = null;
    c.addEventListener("mousedown", (ev) => (drag = { x: ev.clientX, y: ev.clientY, vx: view.fx, vy: view.fy, moved: false }));
    window.addEventListener("mouseup", () => setTimeout(() => (drag = null), 0));
    c.addEventListener("mousemove", (ev) => {
      const ex = ex0();
      if (drag && (ev.buttons & 1)) {
        const r = c.getBoundingClientRect();
        view.fx = clampView(drag.vx - (ev.clientX - drag.x) / r.width / view.zoom);
        view.fy = clampView(drag.vy - (ev.clientY - drag.y) / r.height / view.zoom);
        drag.moved = drag.moved || Math.abs(ev.clientX - drag.x) + Math.abs(ev.clientY - drag.y) > 3;
        drawMatrixOverlay();
        return;
      }
      const p = matrixCell(ev);
      const q = ex.rows[p.row];
      if (q === undefined || p.key < 0 || p.key >= ex.length) {
        ui.matrixInfo.textContent = "";
        return;
      }
      const s = series("attn", state.layer, matrixHead(), q, "row");
      ui.matrixInfo.textContent = "query " + tokenLabel(q) + " \u2192 key " + tokenLabel(p.key) + ": " + (isNaN(s[p.key]) ? "\u2014" : s[p.key].toFixed(4));
    });
    c.addEventListener("click", (ev) => {
      if (drag && drag.moved) return;
      const p = matrixCell(ev);
      const q = ex0().rows[p.row];
      if (q === undefined) return;
      if (state.mode !== "observer") setMode("observer");
      state.frozen.observer = false;
      freeze("observer", q);
      reveal(q);
    });
  }

  // ---------------------------------------------------------------- every head: thumbnails
  const GRID = { pad: 22, gap: 3 };
  let gridCell = 0;
  function loadThumbs() {
    const want = (meta.thumbs || []).filter((e) => e.example === state.example);
    return Promise.all(want.map(loadShard)).then(() => drawGrid());
  }

  function drawGrid() {
    const parts = thumbs.get(state.example);
    const want = (meta.thumbs || []).filter((e) => e.example === state.example).length;
    if (!parts || parts.length < want || !want) return;
    const t0 = performance.now();
    const { tq, tk } = parts[0];
    const c = ui.grid;
    const avail = Math.max(160, c.parentNode.clientWidth - 4);
    const cell = Math.max(8, Math.min(64, Math.floor((avail - GRID.pad) / H) - GRID.gap));
    gridCell = cell;
    const W = GRID.pad + H * (cell + GRID.gap);
    const Hc = GRID.pad + L * (cell + GRID.gap);
    if (c.width !== W || c.height !== Hc) {
      c.width = W;
      c.height = Hc;
    }
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, W, Hc);
    const tile = document.createElement("canvas");
    tile.width = tk;
    tile.height = tq;
    const tctx = tile.getContext("2d");
    const img = tctx.createImageData(tk, tq);
    ctx.imageSmoothingEnabled = false;
    for (const part of parts) {
      for (let l = part.l0; l < part.l1; l++) {
        for (let h = 0; h < H; h++) {
          const off = ((l - part.l0) * H + h) * tq * tk;
          for (let i = 0; i < tq * tk; i++) {
            const v = part.bytes[off + i] / 255;
            img.data[i * 4] = 255 - v * 225;
            img.data[i * 4 + 1] = 255 - v * 180;
            img.data[i * 4 + 2] = 255 - v * 80;
            img.data[i * 4 + 3] = 255;
          }
          tctx.putImageData(img, 0, 0);
          ctx.drawImage(tile, GRID.pad + h * (cell + GRID.gap), GRID.pad + l * (cell + GRID.gap), cell, cell);
        }
      }
    }
    ctx.fillStyle = "#6b7280";
    ctx.font = "10px system-ui, sans-serif";
    ctx.textAlign = "center";
    for (let h = 0; h < H; h++) ctx.fillText(String(h), GRID.pad + h * (cell + GRID.gap) + cell / 2, 14);
    ctx.textAlign = "right";
    for (let l = 0; l < L; l++) ctx.fillText(String(meta.layers[l]), GRID.pad - 4, GRID.pad + l * (cell + GRID.gap) + cell / 2 + 3);
    ctx.strokeStyle = "#dc2626";
    ctx.lineWidth = 2;
    const hs = state.mean ? range(H) : state.heads;
    for (const h of hs) ctx.strokeRect(GRID.pad + h * (cell + GRID.gap) - 1, GRID.pad + state.layer * (cell + GRID.gap) - 1, cell + 2, cell + 2);
    if (!gridDrawn) {
      gridDrawn = true;
      performance.mark("attnflow:thumbs");
      performance.measure("attnflow:thumbs-draw", { start: t0 });
    }
    ui.grid.dataset.drawn = "true";
  }
  let gridDrawn = false;

  function wireGrid() {
    ui.grid.addEventListener("click", (ev) => {
      if (!gridCell) return;
      const r = ui.grid.getBoundingClientRect();
      const x = ((ev.clientX - r.left) * ui.grid.width) / r.width - GRID.pad;
      const y = ((ev.clientY - r.top) * ui.grid.height) / r.height - GRID.pad;
      const h = Math.floor(x / (gridCell + GRID.gap));
      const l = Math.floor(y / (gridCell + GRID.gap));
      if (h < 0 || h >= H || l < 0 || l >= L) return;
      state.layer = l;
      state.heads = [h];
      state.mean = false;
      refresh();
    });
  }

  build();
  refresh(); // adds the first shards' <script> tags before the text is laid out
  fillTokens();
  paint();
})();
