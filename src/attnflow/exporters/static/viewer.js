/* attnflow viewer: plain JavaScript, no dependencies, works from file://.
 *
 * index.html carries the metadata as JSON in <script id="attnflow-data">. Attention
 * weights live in shards (shards/<id>.js) that call window.attnflowShard(header,
 * data, scales) when a <script src> for them is added; a Jupyter inline view puts
 * the same triples in meta.inline instead. Each shard holds, for its heads and its
 * query rows r0..r1, the row prefixes (keys 0..width-1) one after another, as uint8
 * codes (or float16) of weight / row max, plus one float32 scale (the row max) per
 * head and row.
 *
 * Token text is only ever inserted with textContent / createTextNode.
 */
(function () {
  "use strict";

  const meta = JSON.parse(document.getElementById("attnflow-data").textContent);
  const app = document.getElementById("app");
  const H = meta.num_heads;
  const AT = meta.attributions || null; // columns of the attributions table (span sources only)
  const METHODS = meta.flow_methods.concat(AT ? Array.from(new Set(AT.method)).filter((m) => meta.flow_methods.indexOf(m) < 0) : []);
  const PANELS = METHODS.length ? ["observer", "observed", "flow"] : ["observer", "observed"];
  const MEMORY_LIMIT = 768 * 2 ** 20; // bytes of decoded shards kept before older layers are dropped

  const state = {
    example: 0,
    layer: 0, // index into meta.layers
    heads: [0], // selected heads, overlaid in distinct colours when several
    mean: false, // mean over every head of the layer
    gamma: 1,
    threshold: 0,
    normalize: true,
    method: METHODS[0] || null,
    focus: { observer: null, observed: null, flow: null },
    frozen: { observer: false, observed: false, flow: false },
  };

  // ---------------------------------------------------------------- shard store
  const store = new Map(); // "kind|example|what|head" -> [{r0, r1, codes, scales, starts}]
  const loaded = new Map(); // shard id -> promise
  let storedBytes = 0;

  function b64bytes(s) {
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(s);
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function widthsOf(kind, example, what) {
    const ex = meta.examples[example];
    const info = kind === "flow" ? ex.flow[what] : { rows: ex.rows, causal: meta.causal };
    return info.rows.map((q) => (info.causal ? q + 1 : ex.length));
  }

  function register(header, data, scales) {
    const what = header.kind === "flow" ? header.method : header.layer;
    const widths = widthsOf(header.kind, header.example, what).slice(header.r0, header.r1);
    const starts = new Int32Array(widths.length + 1);
    for (let i = 0; i < widths.length; i++) starts[i + 1] = starts[i] + widths[i];
    const per = starts[widths.length];
    const bytes = b64bytes(data);
    const codes = header.enc === "float16" ? new Uint16Array(bytes.buffer, 0, bytes.length / 2) : bytes;
    const sc = b64bytes(scales);
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
    if (meta.inline) {
      p = Promise.resolve().then(() => register.apply(null, meta.inline[entry.id]));
    } else {
      p = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = "shards/" + entry.id + ".js";
        s.onload = () => {
          s.remove();
          resolve();
        };
        s.onerror = () => {
          loaded.delete(entry.id);
          reject(new Error("attnflow: cannot load " + s.src + "; keep the shards/ folder next to index.html"));
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

  function displayText(tok) {
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

  // ---------------------------------------------------------------- layout
  const ui = {};

  function build() {
    app.textContent = "";
    app.dataset.state = "loading";
    const head = el("header");
    const name = meta.model_info.name || "attention";
    head.appendChild(el("h1", {}, "attnflow \u00b7 " + name));
    const rows = meta.examples.map((ex) => ex.rows.length).reduce((a, b) => a + b, 0);
    const tokens = meta.examples.map((ex) => ex.length).reduce((a, b) => a + b, 0);
    const summary = [
      meta.layers.length + " layers",
      meta.heads === "all" ? H + " heads" : "heads: " + meta.heads,
      meta.examples.length + (meta.examples.length > 1 ? " examples" : " example"),
      rows === tokens ? "every query row" : rows + " of " + tokens + " query rows",
      meta.dtype + " recorded, " + meta.precision + " shown",
    ];
    head.appendChild(el("span", { id: "summary", class: "hint" }, summary.join(" \u00b7 ")));
    head.appendChild(infoBlock());
    app.appendChild(head);
    app.appendChild(controls());
    ui.status = el("div", { id: "status", role: "status" }, "");
    app.appendChild(ui.status);
    ui.panels = {};
    const grid = el("main", { id: "panels" });
    const titles = {
      observer: ["Observer", "hover a token: what it attended to"],
      observed: ["Observed", "hover a token: who attended to it"],
      flow: ["Flow", "hover an output token: where its information came from"],
    };
    for (const p of PANELS) {
      const sec = el("section", { class: "panel", id: p, "data-frozen": "false" });
      const h2 = el("h2", {}, titles[p][0]);
      h2.appendChild(el("span", { class: "hint" }, " \u2014 " + titles[p][1] + "; double-click to freeze"));
      sec.appendChild(h2);
      const body = el("div", { class: "tokens" });
      sec.appendChild(body);
      if (p === "flow") {
        sec.appendChild(el("h3", {}, "Per span"));
        ui.bars = el("div", { id: "bars" });
        sec.appendChild(ui.bars);
      }
      grid.appendChild(sec);
      ui.panels[p] = { section: sec, body: body, toks: [] };
      wirePanel(p);
    }
    app.appendChild(grid);
    app.appendChild(
      el(
        "footer",
        {},
        "Keys: j/\u2193 next layer, k/\u2191 previous layer, l/\u2192 next head, h/\u2190 previous head, " +
          "m mean of heads, Esc unfreeze. Shift-click heads to overlay them."
      )
    );
  }

  function infoBlock() {
    const d = el("details", { id: "info" });
    d.appendChild(el("summary", {}, "model and recording settings"));
    const t = el("table");
    const rows = [];
    for (const k in meta.model_info) rows.push(["model." + k, meta.model_info[k]]);
    for (const k in meta.settings) rows.push(["settings." + k, meta.settings[k]]);
    rows.push(["layers", meta.layers.join(", ")], ["heads", meta.heads + " (" + H + " stored)"]);
    rows.push(["dtype", meta.dtype], ["viewer precision", meta.precision], ["causal", meta.causal]);
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

  function controls() {
    const bar = el("nav", { id: "controls" });
    if (meta.examples.length > 1) {
      const sel = el("select", { id: "example", "aria-label": "example" });
      meta.examples.forEach((ex, i) => sel.appendChild(el("option", { value: i }, "example " + i + " (" + ex.length + " tokens)")));
      sel.addEventListener("change", () => setExample(+sel.value));
      bar.appendChild(label("example", sel));
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
      paintAll();
    });
    bar.appendChild(label("scale to max", norm));
    if (METHODS.length) {
      const m = el("select", { id: "method", "aria-label": "flow method" });
      METHODS.forEach((name) => m.appendChild(el("option", { value: name }, name)));
      m.addEventListener("change", () => {
        state.method = m.value;
        fillTokens();
        refresh();
      });
      bar.appendChild(label("flow", m));
    }
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
      paintAll();
    });
    const wrap = label(name, input);
    wrap.appendChild(out);
    return { wrap: wrap, input: input };
  }

  // The text is built once into a fragment and cloned into each panel (fast for long traces).
  function fillTokens() {
    const ex = meta.examples[state.example];
    const owner = new Int32Array(ex.length).fill(-1); // first span listed wins, as in the tokens table
    for (let s = ex.spans.length - 1; s >= 0; s--)
      for (let p = ex.spans[s].start; p < Math.min(ex.spans[s].end, ex.length); p++) owner[p] = s;
    const text = document.createDocumentFragment();
    let box = text;
    let boxSpan = -1;
    // Word-level tokenizers carry no space markers (no Ġ, ▁ or whitespace): set their tokens apart with spaces.
    const wordLevel = !ex.tokens.some((tok) => /[\u0120\u2581\s]/.test(tok) || /^<0x/.test(tok));
    for (let p = 0; p < ex.length; p++) {
      if (owner[p] !== boxSpan) {
        boxSpan = owner[p];
        if (boxSpan < 0) box = text;
        else {
          const sp = ex.spans[boxSpan];
          box = el("span", { class: "span-box kind-" + sp.kind, "data-span": boxSpan });
          box.style.setProperty("--c", "hsl(" + hue(boxSpan + 3) + " 45% 50%)");
          box.appendChild(el("span", { class: "span-name" }, sp.name));
          text.appendChild(box);
        }
      }
      if (p === ex.prompt_length && p > 0) box.appendChild(el("span", { class: "completion-mark", title: "completion starts" }, "\u25b8"));
      const tok = ex.tokens[p];
      let shown = displayText(tok);
      const t = el("span", { class: p >= ex.prompt_length ? "tok completion" : "tok", "data-pos": p });
      if (isSpecial(tok)) t.classList.add("special");
      if (shown === "") {
        shown = "\u2205";
        t.classList.add("empty");
      }
      t.textContent = shown.indexOf("\n") >= 0 ? shown.replace(/\n/g, "\u21b5\n") : shown;
      box.appendChild(t);
      if (wordLevel && p < ex.length - 1) box.appendChild(document.createTextNode(" "));
    }
    PANELS.forEach((name, i) => {
      const panel = ui.panels[name];
      panel.body.textContent = "";
      panel.body.appendChild(i === PANELS.length - 1 ? text : text.cloneNode(true));
      panel.toks = Array.from(panel.body.querySelectorAll(".tok"));
      const rows = name === "flow" ? explained() : new Set(ex.rows);
      for (const p of rows) if (panel.toks[p]) panel.toks[p].classList.add("has-row");
    });
  }

  // ---------------------------------------------------------------- interaction
  function wirePanel(name) {
    const panel = () => ui.panels[name];
    const sec = () => panel().section;
    sec().addEventListener("mouseover", (ev) => {
      const t = ev.target.closest ? ev.target.closest(".tok") : null;
      if (!t) return;
      if (!t.title) t.title = t.dataset.pos + ": " + meta.examples[state.example].tokens[+t.dataset.pos]; // the raw token
      if (state.frozen[name]) return;
      const t0 = performance.now();
      state.focus[name] = +t.dataset.pos;
      paint(name);
      performance.measure("attnflow:hover", { start: t0 }); // read by bench/export.py
    });
    sec().addEventListener("mouseleave", () => {
      if (state.frozen[name]) return;
      state.focus[name] = null;
      paint(name);
    });
    sec().addEventListener("dblclick", (ev) => {
      const t = ev.target.closest ? ev.target.closest(".tok") : null;
      if (state.frozen[name]) {
        state.frozen[name] = false;
        if (t) state.focus[name] = +t.dataset.pos;
      } else if (t) {
        state.frozen[name] = true;
        state.focus[name] = +t.dataset.pos;
      }
      sec().dataset.frozen = String(state.frozen[name]);
      paint(name);
    });
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
    state.layer = Math.max(0, Math.min(meta.layers.length - 1, i));
    refresh();
  }

  function setExample(i) {
    state.example = i;
    for (const p of PANELS) {
      state.focus[p] = null;
      state.frozen[p] = false;
      ui.panels[p].section.dataset.frozen = "false";
    }
    fillTokens();
    refresh();
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
      Escape: () => {
        for (const p of PANELS) {
          state.frozen[p] = false;
          ui.panels[p].section.dataset.frozen = "false";
        }
        paintAll();
      },
    }[ev.key];
    if (act) {
      ev.preventDefault();
      act();
    }
  });

  // ---------------------------------------------------------------- painting
  let generation = 0;

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
        paintAll();
        performance.mark("attnflow:ready");
      },
      (err) => {
        ui.status.textContent = err.message;
        app.dataset.state = "error";
        console.error(err.message);
      }
    );
  }

  function paintAll() {
    for (const p of PANELS) paint(p);
  }

  function paint(name) {
    const panel = ui.panels[name];
    const pos = state.focus[name];
    const list = name === "flow" ? ["flow"] : selectedSeries();
    let ws = [];
    if (pos !== null && app.dataset.state !== "loading") {
      if (name === "flow") ws = [hasFlow() ? series("flow", state.method, 0, pos - 1, "row") : spanShading(pos)];
      else ws = list.map((s) => series("attn", state.layer, s, pos, name === "observer" ? "row" : "column"));
    }
    const scales = ws.map((w) => {
      if (!state.normalize && name !== "flow") return 1;
      let m = 0;
      for (const v of w) if (v > m) m = v;
      return m || 1;
    });
    panel.section.dataset.series = list.join(" ");
    panel.section.dataset.focus = pos === null ? "" : String(pos);
    for (let k = 0; k < panel.toks.length; k++) {
      const t = panel.toks[k];
      t.classList.toggle("focus", k === pos);
      t.classList.toggle("frozen", k === pos && state.frozen[name]);
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
    if (name === "flow") bars(pos, ws[0]);
  }

  function hasFlow() {
    const ex = meta.examples[state.example];
    return !!(state.method && ex.flow && ex.flow[state.method]);
  }

  // positions whose token the current method explains: produced by a flow row, or an attribution target
  function explained() {
    const ex = meta.examples[state.example];
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
    const ex = meta.examples[state.example];
    const out = new Float64Array(ex.length).fill(NaN);
    const found = attributed(pos);
    if (!found) return out;
    ex.spans.forEach((sp, s) => {
      for (let p = sp.start; p < Math.min(sp.end, ex.length); p++) if (isNaN(out[p])) out[p] = found[s] || 0;
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

  function bars(pos, w) {
    ui.bars.textContent = "";
    const ex = meta.examples[state.example];
    if (!ex.spans.length) {
      ui.bars.appendChild(el("p", { class: "hint" }, "this example has no spans"));
      return;
    }
    let scores = null;
    let source = "flow row summed over each span's tokens, as a share of the row";
    const found = attributed(pos === null ? -1 : pos);
    if (found) {
      scores = ex.spans.map((_, s) => found[s] || 0);
      source = "attributions table (" + state.method + (pos === null ? ", all targets together)" : ", token " + pos + ")");
    } else if (pos === null || !w) {
      ui.bars.appendChild(el("p", { class: "hint" }, "hover an output token"));
      return;
    } else {
      let total = 0;
      for (const v of w) if (!isNaN(v)) total += v;
      if (!total || !hasFlow()) {
        ui.bars.appendChild(el("p", { class: "hint" }, "nothing explains this token"));
        return;
      }
      scores = ex.spans.map((sp) => {
        let s = 0;
        for (let p = sp.start; p < Math.min(sp.end, w.length); p++) if (!isNaN(w[p])) s += w[p];
        return s / total;
      });
    }
    const top = Math.max.apply(null, scores.map(Math.abs).concat([1e-12]));
    ui.bars.appendChild(el("p", { class: "hint" }, source));
    ex.spans.forEach((sp, s) => {
      const row = el("div", { class: "bar-row", "data-span": s, "data-score": scores[s].toPrecision(6) });
      row.appendChild(el("span", { class: "bar-label", title: sp.kind }, sp.name));
      const track = el("span", { class: "bar-track" });
      const fill = el("span", { class: "bar-fill" });
      fill.style.width = ((100 * Math.abs(scores[s])) / top).toFixed(1) + "%";
      fill.style.setProperty("--c", "hsl(" + hue(s + 3) + " 45% 50%)");
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(el("span", { class: "bar-value" }, scores[s].toFixed(3)));
      ui.bars.appendChild(row);
    });
  }

  build();
  refresh(); // adds the first shards' <script> tags before the text is laid out
  fillTokens();
})();
