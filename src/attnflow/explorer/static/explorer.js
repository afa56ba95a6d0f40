/* attnflow serve: the flow explorer page (plain JavaScript, no build step, no network but this server).
 *
 * The session token comes from the URL fragment (#token=...) and goes in the X-Attnflow-Token header of
 * every API call.  Server-sent events are read with fetch() so that the token never sits in a URL.
 * Token text, document names and every other string from the server are inserted with textContent
 * (or createTextNode) only, never as markup.
 */
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const TAUS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5];
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const $ = (id) => document.getElementById(id);
  const state = { run: null, info: null, graph: null, selected: null, heads: {}, hidden: new Set(), seq: 0 };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function status(text) { $("status").textContent = text; }
  function shown(tok) {
    const t = String(tok).replace(/^\u0120|^\u2581/, "\u00b7").replace(/\u010a/g, "\u21b5");
    return t.replace(/\n/g, "\u21b5");
  }
  async function api(path, opts) {
    const o = Object.assign({}, opts || {});
    o.headers = Object.assign({ "X-Attnflow-Token": token }, o.headers || {});
    const r = await fetch(path, o);
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return r;
  }
  function b64bytes(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // ------------------------------------------------------------------ input
  function addDocument(name, text) {
    const row = el("div", { class: "doc" });
    const n = el("input", { type: "text", class: "doc-name", placeholder: "name" });
    n.value = name || "doc" + ($("documents").children.length + 1);
    const t = el("textarea", { class: "doc-text", rows: "1", spellcheck: "false" });
    t.value = text || "";
    const x = el("button", { type: "button", class: "doc-remove", title: "remove" }, "\u00d7");
    x.addEventListener("click", () => row.remove());
    row.append(n, t, x);
    $("documents").append(row);
  }
  function requestBody() {
    const documents = Array.from(document.querySelectorAll("#documents .doc"))
      .map((d) => ({ name: d.querySelector(".doc-name").value, text: d.querySelector(".doc-text").value }))
      .filter((d) => d.text.trim());
    return { model: $("model").value, prompt: $("prompt").value, documents,
             max_new_tokens: parseInt($("max-new").value, 10) || 1 };
  }

  async function run() {
    $("run").disabled = true;
    $("completion").textContent = "";
    $("attribution").textContent = "";
    state.heads = {};
    state.selected = null;
    const t0 = performance.now();
    try {
      const r = await (await api("/api/runs", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(requestBody()) })).json();
      state.run = r.id;
      status("queued (" + r.prompt_tokens + " prompt tokens)");
      await readEvents(r.id, t0);
    } catch (err) {
      status(err.message);
    } finally {
      $("run").disabled = false;
    }
  }

  async function readEvents(id, t0) {
    const r = await api("/api/runs/" + id + "/events");
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        await onEvent(name, JSON.parse(data || "{}"), t0);
      }
    }
  }

  async function onEvent(name, d, t0) {
    if (name === "token") {
      $("completion").append(el("span", { class: "tok" }, shown(d.token)));
    } else if (name === "progress") {
      status(d.stage + "\u2026");
    } else if (name === "recorded") {
      state.info = d;
      setupControls(d);
      await refresh();
      const ms = Math.round(performance.now() - t0);
      document.body.dataset.firstGraphMs = String(ms);
      status("recorded " + d.tokens.length + " tokens, " + d.layers + " layers; first graph after " + ms + " ms");
    } else if (name === "error") {
      status("error: " + d.message);
    }
  }

  // ------------------------------------------------------------------ controls
  function option(select, value, text) {
    const o = el("option", { value: String(value) }, text);
    select.append(o);
    return o;
  }
  function setupControls(info) {
    $("controls").hidden = false;
    const target = $("target");
    target.textContent = "";
    for (let t = 1; t <= info.tokens.length; t++) {
      const tok = t < info.tokens.length ? shown(info.tokens[t]) : "(next)";
      const o = option(target, t, t + ": " + tok + (t >= info.prompt_length ? "" : "  (prompt)"));
      if (t === Math.min(info.prompt_length, info.tokens.length - 1)) o.selected = true;
    }
    const layers = $("layers"), ol = $("overlay-layer"), oh = $("overlay-head");
    layers.textContent = ""; ol.textContent = ""; oh.textContent = "";
    state.hidden = new Set();
    option(ol, "", "none");
    for (let l = 0; l < info.layers; l++) {
      const box = el("input", { type: "checkbox", "data-layer": String(l) });
      box.checked = true;
      box.addEventListener("change", () => { box.checked ? state.hidden.delete(l) : state.hidden.add(l); draw(); });
      const lab = el("label", {}, "");
      lab.append(box, document.createTextNode("L" + l));
      layers.append(lab);
      option(ol, l, "L" + l);
    }
    option(oh, "", "\u2013");
    for (let h = 0; h < (info.heads || 0); h++) option(oh, h, "H" + h);
  }
  function tau() { return TAUS[parseInt($("tau").value, 10)]; }

  async function refresh() {
    if (!state.run) return;
    $("tau-value").textContent = String(tau());
    $("alpha-value").textContent = $("alpha").value;
    const q = new URLSearchParams({ target: $("target").value, alpha: $("alpha").value,
                                    sinks: $("sinks").checked ? "1" : "0" });
    const k = parseInt($("topk").value, 10);
    if (k > 0) q.set("top_k", String(k)); else q.set("tau", String(tau()));
    const seq = ++state.seq;
    const g = await (await api("/api/runs/" + state.run + "/graph?" + q)).json();
    if (seq !== state.seq) return;  // a newer request is on its way
    state.graph = g;
    state.selected = null;
    $("sink-share").textContent = $("sinks").checked ? "(sink share " + (100 * g.sink_share).toFixed(1) + "%)" : "";
    draw();
    attribution();
  }

  // ------------------------------------------------------------------ the graph
  function layout(g) {
    const x = {}, cols = [];
    let at = 60;
    for (const c of g.columns) {
      if (c.pos !== undefined) { x[c.pos] = at + 14; cols.push({ pos: c.pos, x: at + 14 }); at += 28; }
      else { cols.push({ gap: c.gap, x: at, w: 16 }); at += 20; }
    }
    const rowH = Math.max(50, Math.min(110, 560 / g.layers));
    const y = (level) => 40 + (g.layers - level) * rowH;
    return { x, y, cols, width: at + 40, height: y(0) + 110 };
  }

  function kept() {
    // edges on a path through the selected node: its ancestors above and descendants below
    const g = state.graph, sel = state.selected;
    if (!sel) return null;
    const keep = new Set();
    let frontier = new Set([sel.pos]);
    for (let l = sel.level; l < g.layers; l++) {  // upward: layer l joins level l+1 (source) to level l
      const next = new Set();
      g.edges[l].forEach((e, i) => { if (frontier.has(e[1])) { keep.add(l + ":" + i); next.add(e[0]); } });
      frontier = next;
    }
    frontier = new Set([sel.pos]);
    for (let l = sel.level - 1; l >= 0; l--) {
      const next = new Set();
      g.edges[l].forEach((e, i) => { if (frontier.has(e[0])) { keep.add(l + ":" + i); next.add(e[1]); } });
      frontier = next;
    }
    return keep;
  }

  function draw() {
    const g = state.graph, info = state.info;
    if (!g) return;
    const L = layout(g), wrap = $("graph-wrap");
    wrap.textContent = "";
    const root = svg("svg", { id: "graph", width: L.width, height: L.height, viewBox: "0 0 " + L.width + " " + L.height });
    const keep = kept();
    let visible = 0;
    for (let level = 0; level <= g.layers; level++) {
      root.append(svg("text", { class: "level-label", x: 4, y: L.y(level) + 4 }, level === 0 ? "input" : "L" + (level - 1)));
    }
    for (const c of L.cols) {
      if (c.gap) {
        root.append(svg("rect", { class: "gap", x: c.x, y: L.y(g.layers) - 10, width: c.w, height: L.y(0) - L.y(g.layers) + 20 }));
        const n = c.gap[1] - c.gap[0];
        root.append(svg("text", { class: "gap-label", x: c.x + 2, y: L.y(0) + 28,
                                  transform: "rotate(60 " + (c.x + 2) + " " + (L.y(0) + 28) + ")" }, "\u2026" + n + "\u2026"));
      }
    }
    if ($("spans").checked) {
      info.spans.forEach((s, i) => {
        const xs = L.cols.filter((c) => c.pos !== undefined && c.pos >= s.start && c.pos < s.end).map((c) => c.x);
        if (!xs.length) return;
        const hue = (i * 137) % 360;
        const x0 = Math.min(...xs) - 12, x1 = Math.max(...xs) + 12;
        root.append(svg("rect", { class: "span-band", x: x0, y: L.y(0) + 8, width: x1 - x0, height: 6,
                                  fill: "hsl(" + hue + ",70%,50%)" }));
        root.append(svg("text", { class: "span-label", x: x0, y: L.y(0) + 100 }, s.name));
      });
    }
    for (let l = 0; l < g.layers; l++) {
      if (state.hidden.has(l)) continue;
      g.edges[l].forEach((e, i) => {
        const [src, dst, w] = e;
        const line = svg("line", { class: "edge" + (src === dst ? " residual" : ""), x1: L.x[src], y1: L.y(l + 1),
                                   x2: L.x[dst], y2: L.y(l), "stroke-width": (0.6 + 10 * w).toFixed(2),
                                   "data-layer": l, "data-src": src, "data-dst": dst, "data-w": w });
        if (keep && !keep.has(l + ":" + i)) line.classList.add("dim"); else visible++;
        line.addEventListener("mouseenter", (ev) => hoverEdge(ev, l, src, dst, w));
        line.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
        root.append(line);
      });
    }
    drawHeadOverlay(root, L);
    g.nodes.forEach((nodes, level) => {
      for (const [pos, mass] of nodes) {
        const c = svg("circle", { class: "node", cx: L.x[pos], cy: L.y(level), r: (2 + 7 * Math.sqrt(mass)).toFixed(2),
                                  "data-level": level, "data-pos": pos });
        if (state.selected && state.selected.level === level && state.selected.pos === pos) c.classList.add("selected");
        c.append(svg("title", {}, "level " + level + ", token " + pos + " " + shown(info.tokens[pos]) +
                                  ", mass " + mass.toFixed(4)));
        c.addEventListener("click", () => {
          const same = state.selected && state.selected.level === level && state.selected.pos === pos;
          state.selected = same ? null : { level, pos };
          draw();
        });
        root.append(c);
      }
    });
    for (const c of L.cols) {
      if (c.pos === undefined) continue;
      const yb = L.y(0) + 22;
      root.append(svg("text", { class: "tok-label", x: c.x, y: yb, transform: "rotate(60 " + c.x + " " + yb + ")" },
                      shown(info.tokens[c.pos])));
    }
    const top = g.target_row, outTok = g.target < info.tokens.length ? info.tokens[g.target] : "(next)";
    root.append(svg("text", { class: "out-label", x: L.x[top] - 10, y: L.y(g.layers) - 16 }, "\u2192 " + shown(outTok)));
    wrap.append(root);
    const total = g.edge_counts.reduce((a, b) => a + b, 0);
    $("edge-count").textContent = visible + " of " + total + " edges";
    $("edge-count").dataset.visible = String(visible);
  }

  // ------------------------------------------------------------------ heads (the viewer's shard encoding)
  async function headsOf(layer) {
    if (state.heads[layer]) return state.heads[layer];
    const rows = Array.from(new Set(state.graph.edges[layer].map((e) => e[0]))).sort((a, b) => a - b);
    if (!rows.length) return null;
    const r = await (await api("/api/runs/" + state.run + "/heads?layer=" + layer + "&rows=" + rows.join(","))).json();
    const codes = b64bytes(r.data), sc = new Float32Array(b64bytes(r.scales).buffer);
    const byRow = {};  // row -> [head] -> Float32Array of keys 0..row
    let at = 0;
    for (let h = 0; h < r.num_heads; h++) {
      r.rows.forEach((q, i) => {
        const v = new Float32Array(q + 1);
        for (let k = 0; k <= q; k++) v[k] = codes[at + k] / 255 * sc[h * r.rows.length + i];
        at += q + 1;
        (byRow[q] = byRow[q] || [])[h] = v;
      });
    }
    state.heads[layer] = { numHeads: r.num_heads, byRow };
    return state.heads[layer];
  }

  function topHeads(layer, src, dst) {
    const H = state.heads[layer];
    if (!H || !H.byRow[src]) return "";
    const w = H.byRow[src].map((v, h) => [h, v[dst] || 0]).sort((a, b) => b[1] - a[1]).slice(0, 3);
    return "\ntop heads: " + w.map(([h, v]) => "H" + h + " " + v.toFixed(3)).join(", ");
  }

  async function hoverEdge(ev, layer, src, dst, w) {
    const tip = $("tooltip"), info = state.info;
    const text = () => "layer " + layer + ": " + src + " " + shown(info.tokens[src]) + " \u2192 " + dst + " " +
      shown(info.tokens[dst]) + "\nweight " + w.toFixed(4) + (src === dst ? " (incl. residual)" : "") + topHeads(layer, src, dst);
    tip.textContent = text();
    tip.style.left = ev.clientX + 12 + "px";
    tip.style.top = ev.clientY + 12 + "px";
    tip.hidden = false;
    if (!state.heads[layer]) {
      try { await headsOf(layer); if (!tip.hidden) tip.textContent = text(); } catch (e) { /* shown on next hover */ }
    }
  }

  function drawHeadOverlay(root, L) {
    const layer = $("overlay-layer").value, head = $("overlay-head").value;
    if (layer === "" || head === "") return;
    const l = parseInt(layer, 10), h = parseInt(head, 10), H = state.heads[l], g = state.graph;
    if (!H) { headsOf(l).then(draw, (e) => status(e.message)); return; }
    const mass = Object.fromEntries(g.nodes[l + 1]);
    let n = 0;
    for (const src in H.byRow) {
      const v = H.byRow[src][h];
      for (let k = 0; k < v.length; k++) {
        const w = (mass[src] || 0) * v[k];
        if (w < tau() / 2 || L.x[k] === undefined) continue;
        root.append(svg("line", { class: "head-edge", x1: L.x[src], y1: L.y(l + 1), x2: L.x[k], y2: L.y(l),
                                  "stroke-width": (0.8 + 8 * w).toFixed(2), "data-head": h, "data-w": w.toFixed(4) }));
        n++;
      }
    }
    root.dataset.headEdges = String(n);
  }

  // ------------------------------------------------------------------ attribution, export
  async function attribution() {
    const box = $("attribution");
    const q = new URLSearchParams({ target: $("target").value, alpha: $("alpha").value, sinks: $("sinks").checked ? "1" : "0" });
    const a = await (await api("/api/runs/" + state.run + "/attribution?" + q)).json();
    box.textContent = "";
    const rows = a.documents.map((d) => [d.name, d.score]).concat(
      [["(other prompt)", a.other_prompt], ["(completion)", a.completion], ["(excluded sink)", a.excluded]]);
    for (const [name, score] of rows) {
      const bar = el("div", { class: "bar" });
      bar.append(el("span", { class: "name" }, name), el("span", { class: "fill" }),
                 el("span", { class: "score" }, (100 * score).toFixed(1) + "%"));
      bar.children[1].style.width = Math.round(300 * score) + "px";
      box.append(bar);
    }
  }

  async function exportRun() {
    try {
      const blob = await (await api("/api/runs/" + state.run + "/export")).blob();
      const a = el("a", { download: "attnflow-run-" + state.run + ".zip" });
      a.href = URL.createObjectURL(blob);
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) { status(err.message); }
  }

  // ------------------------------------------------------------------ start
  async function start() {
    if (!token) { status("no session token: open the URL `attnflow serve` printed"); return; }
    try {
      const m = await (await api("/api/models")).json();
      for (const name of m.models) option($("model"), name, name);
    } catch (err) { status(err.message); return; }
    addDocument("doc1", "bob owns a cat .");
    addDocument("doc2", "alice lives in paris .");
    $("prompt").value = "question : what is the city of alice ?\nanswer :";
    $("add-doc").addEventListener("click", () => addDocument());
    $("run").addEventListener("click", run);
    for (const id of ["target", "tau", "alpha", "sinks", "topk"]) $(id).addEventListener("change", () => refresh().catch((e) => status(e.message)));
    $("tau").addEventListener("input", () => { $("tau-value").textContent = String(tau()); });
    $("spans").addEventListener("change", draw);
    $("overlay-layer").addEventListener("change", draw);
    $("overlay-head").addEventListener("change", draw);
    $("export").addEventListener("click", exportRun);
    $("tau-value").textContent = String(tau());
    status("ready");
  }
  start();
})();
