// Measurement tools of the image viewer: length, angle and elliptical ROI,
// drawn in an SVG layer over the image (attributes, never style strings:
// the page's Content-Security-Policy refuses inline styles).
//
// Points are kept in the frame's own pixel grid, as a presentation state's
// PIXEL units are (PS3.3 C.10.5.1.2: (0, 0) the top left corner of the first
// pixel, (Columns, Rows) the bottom right corner of the last): they stay on
// their anatomy through zoom, pan and window changes, and each frame keeps
// its own (a slice scrolled away and back shows them again). Distances use
// the frame's calibration from the server (.../frames/{n}/calibration: Pixel
// Spacing, Imager Pixel Spacing at the detector, ultrasound regions); ROI
// statistics come from the server too (.../frames/{n}/roi), computed on the
// stored values after the Modality LUT (HU for CT), never on the 8-bit
// rendering.
//
// A radiologist's (or an administrator's) measurements are saved with the
// study as their presentation state (PUT /api/studies/{uid}/annotations: a
// DICOM GSPS), a second after the last change and when the study is left,
// and drawn again when anyone opens it: one's own editable, a colleague's
// and those other systems sent (GET .../annotations) read-only, in another
// colour, with who made them on hover. Other roles' measurements stay in
// the page.

import { api, getToken } from "./api.js";
import { onLangChange, t } from "./i18n.js";
import { h } from "./util.js";

const SVG_NS = "http://www.w3.org/2000/svg";
export const TOOLS = [
  { name: "pointer", key: "tool_pointer", shortcut: "v" },
  { name: "length", key: "tool_length", shortcut: "l" },
  { name: "angle", key: "tool_angle", shortcut: "a" },
  { name: "roi", key: "tool_roi", shortcut: "r" },
];
const MIN_DRAG = 3; // screen pixels: a shorter drag is a click
const HANDLE_RADIUS = 3;
const SAVE_DELAY_MS = 1000; // a save a second after the last change: one PUT for a burst of edits
const EDITOR_ROLES = new Set(["radiologist", "admin"]);

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

/** A measured number as labels show it: `digits` decimals, no "-0.0". */
export function fixed(value, digits = 1) {
  const text = Number(value).toFixed(digits);
  return /^-0\.?0*$/.test(text) ? text.slice(1) : text;
}

/** Millimetres per row and per column for a measurement spanning `points`
 * (grid coordinates): the ultrasound region holding all of them, else the
 * frame's own spacing; null when uncalibrated (or across regions without one). */
export function spacingFor(calibration, points) {
  if (!calibration) return null;
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  for (const r of calibration.regions || []) {
    if (r.x0 <= x0 && x1 <= r.x1 + 1 && r.y0 <= y0 && y1 <= r.y1 + 1) return r;
  }
  return calibration.spacing || null;
}

/** How long a pixel step is along x and y: mm with a spacing, else the
 * pixel's proportions (Pixel Aspect Ratio, vertical : horizontal) in pixels. */
function scales(calibration, points) {
  const spacing = spacingFor(calibration, points);
  if (spacing) return { x: spacing.column, y: spacing.row, spacing };
  const [v, hz] = (calibration && calibration.aspect) || [1, 1];
  return { x: 1, y: v / hz, spacing: null };
}

/** The distance from a to b: {value, unit: "mm" | "px", basis}. */
export function lengthOf(calibration, a, b) {
  const s = scales(calibration, [a, b]);
  const value = Math.hypot((b.x - a.x) * s.x, (b.y - a.y) * s.y);
  return { value, unit: s.spacing ? "mm" : "px", basis: s.spacing ? s.spacing.basis : null };
}

/** The angle at b between b→a and b→c, in degrees (true proportions:
 * rows and columns scaled by their spacing, or by the aspect ratio). */
export function angleOf(calibration, a, b, c) {
  const s = scales(calibration, [a, b, c]);
  const u = { x: (a.x - b.x) * s.x, y: (a.y - b.y) * s.y };
  const v = { x: (c.x - b.x) * s.x, y: (c.y - b.y) * s.y };
  const norm = Math.hypot(u.x, u.y) * Math.hypot(v.x, v.y);
  if (!norm) return 0;
  const cos = Math.max(-1, Math.min(1, (u.x * v.x + u.y * v.y) / norm));
  return (Math.acos(cos) * 180) / Math.PI;
}

/** What a length's unit is said with: where the distance is measured. */
function basisNote(basis, unit) {
  if (unit === "px") return ` ${t("measure_uncalibrated")}`;
  if (basis === "detector") return ` ${t("measure_detector")}`;
  if (basis === "magnification") return ` ${t("measure_magnification")}`;
  if (basis === "calibrated") return ` ${t("measure_calibrated")}`;
  if (basis === "unknown") return ` ${t("measure_unknown")}`;
  return "";
}

function valueText(value) {
  if (value === null || value === undefined) return "–";
  return Number.isInteger(value) ? String(value) : fixed(value);
}

export class MeasureTools {
  /** `viewer`: the Viewer whose image, slices and series are measured. */
  constructor(viewer) {
    this.viewer = viewer;
    this.tool = "pointer";
    this.items = new Map(); // frame key -> [{kind, points, stats, error}]
    this.calibrations = new Map(); // frame key -> {promise, value, failed}
    this.drawing = null; // {kind, key, points, pointerId, down} while a measurement is drawn
    this.foreign = new Map(); // frame key ("sop/frame", "sop/*": every frame) -> [{author, graphics, texts}]
    this.canSave = false; // the user's measurements are saved (a radiologist, an administrator)
    this.loaded = false; // the saved measurements were read: a save before would replace them with fewer
    this.dirty = false; // changed since the last save
    this.saveTimer = 0;
    this.saving = null; // the PUT in flight
    this.said = null; // what the state says: {key, n, kind, detail}
    this.state = h("span#measure-state.key-state", { role: "status" });
    this.layer = svg("svg", { id: "measure-layer", class: "measure-layer", "aria-hidden": "true" });
    this.toolButtons = TOOLS.map((tool) => h("button.btn.small.tool", {
      type: "button",
      id: `tool-${tool.name}`,
      dataset: { tool: tool.name },
      "data-i18n": tool.key,
      "data-i18n-title": `${tool.key}_help`,
      onclick: () => this.setTool(tool.name),
    }));
    this.clearButton = h("button#measure-clear.btn.small", {
      type: "button", "data-i18n": "tool_clear", "data-i18n-title": "tool_clear_help", onclick: () => this.clear(),
    });
    this.element = h("div.tools", { role: "group", "data-i18n-aria": "measure_tools" },
      this.toolButtons, this.clearButton);
    this.markTool();
  }

  // -- state -----------------------------------------------------------------------
  /** The key of the frame shown: its instance and frame number (1 for a single frame). */
  currentKey() {
    const slice = this.viewer.slices[this.viewer.index];
    return slice ? `${slice.sop}/${slice.frame || 1}` : "";
  }

  setTool(name) {
    if (!TOOLS.some((tool) => tool.name === name)) return;
    this.cancel();
    this.tool = name;
    this.markTool();
  }

  markTool() {
    for (const button of this.toolButtons) {
      const active = button.dataset.tool === this.tool;
      button.classList.toggle("active", active);
      button.setAttribute("aria-pressed", String(active));
    }
    const viewport = this.viewer.viewport;
    if (!viewport) return;
    for (const tool of TOOLS) viewport.classList.toggle(`tool-${tool.name}`, tool.name === this.tool);
  }

  /** Whether a left-button press on the image belongs to a measuring tool. */
  wants(event) {
    return this.tool !== "pointer" && event.button === 0 && !event.shiftKey && this.currentKey() !== "";
  }

  /** Drop the measurement being drawn (Escape, another tool, another slice). */
  cancel() {
    if (!this.drawing) return false;
    const { pointerId } = this.drawing;
    this.drawing = null;
    const viewport = this.viewer.viewport;
    if (pointerId !== undefined && viewport.hasPointerCapture(pointerId)) viewport.releasePointerCapture(pointerId);
    this.redraw();
    return true;
  }

  /** Remove the measurements of the frame shown. */
  clear() {
    this.cancel();
    if (this.items.delete(this.currentKey())) this.changed();
    this.redraw();
  }

  /** Remove the last measurement drawn on the frame shown. */
  undo() {
    const list = this.items.get(this.currentKey());
    if (list && list.length) {
      list.pop();
      this.changed();
    }
    this.redraw();
  }

  // -- saved measurements (GSPS) ------------------------------------------------------
  /** Read the study's saved measurements; *user* decides whether this page saves its own. */
  async load(user) {
    this.user = user;
    this.canSave = Boolean(user && EDITOR_ROLES.has(user.role));
    if (!this.offLang) this.offLang = onLangChange(() => this.sayAgain());
    if (!this.onPageHide) {
      this.onPageHide = () => this.flush(true);
      window.addEventListener("pagehide", this.onPageHide);
    }
    const studyUid = this.viewer.studyUid;
    let data;
    this.loading = true;
    try {
      data = await api("GET", `/api/studies/${encodeURIComponent(studyUid)}/annotations`);
    } catch (exc) {
      if (this.canSave) this.say("measure_not_loaded", "error", 0, exc.message);
      return;
    } finally {
      this.loading = false;
    }
    if (this.destroyed) return;
    for (const m of (data && data.mine) || []) {
      const key = `${m.sop_uid}/${m.frame || 1}`;
      if (!this.items.has(key)) this.items.set(key, []);
      // The saved ones first, those drawn while they loaded after them.
      const list = this.items.get(key);
      const at = list.findIndex((item) => !item.saved);
      const item = { kind: m.kind, points: m.points.map(([x, y]) => ({ x, y })), stats: null, error: "",
        saved: true, savedLabel: m.label || "", window: m.window || null };
      list.splice(at < 0 ? list.length : at, 0, item);
    }
    this.remember(data);
    this.foreign.clear();
    for (const image of (data && data.images) || []) {
      if (image.own && this.canSave) continue; // in data.mine, editable
      const key = `${image.sop_uid}/${image.frame || "*"}`;
      if (!this.foreign.has(key)) this.foreign.set(key, []);
      this.foreign.get(key).push(image);
    }
    this.loaded = true;
    this.state.dataset.loaded = "true";
    if (this.dirty) this.scheduleSave(); // drawn while loading
    this.redraw();
  }

  /** What the study's presentation states draw on, by state series (a PR series' entry opens its first image). */
  remember(data) {
    const seriesOf = new Map(((data && data.states) || []).map((s) => [s.sop_uid, s.series_uid]));
    this.drawnBySeries = new Map();
    for (const image of (data && data.images) || []) {
      const series = seriesOf.get(image.state);
      if (series && !this.drawnBySeries.has(series)) this.drawnBySeries.set(series, image);
    }
  }

  /** The first image (series_uid, sop_uid, frame) the presentation states of series *seriesUid* draw on. */
  firstImageOf(seriesUid) {
    return (this.drawnBySeries && this.drawnBySeries.get(seriesUid)) || null;
  }

  /** A measurement was added or removed: saved a moment later (the user's own, when they may). */
  changed() {
    this.dirty = true;
    // Not read yet (the GET failed): read now; the save follows it, never replaces what it did not see.
    if (this.canSave && !this.loaded && !this.loading && this.user) this.load(this.user);
    this.scheduleSave();
  }

  scheduleSave() {
    if (!this.canSave || !this.loaded) return;
    clearTimeout(this.saveTimer);
    this.saveTimer = setTimeout(() => this.save(), SAVE_DELAY_MS);
  }

  /** The user's measurements as the API takes them: every frame's, the ROIs' figures once known. */
  payload() {
    const out = [];
    const round = (v) => Math.round(v * 100) / 100;
    for (const [key, list] of this.items) {
      const cut = key.lastIndexOf("/");
      const sop = key.slice(0, cut);
      const frame = Number(key.slice(cut + 1)) || 1;
      for (const item of list) {
        const points = item.points.map((p) => [round(p.x), round(p.y)]);
        if (item.kind === "roi" && (points[0][0] === points[1][0] || points[0][1] === points[1][1])) continue;
        if (points.length !== (item.kind === "angle" ? 3 : 2)) continue;
        const label = item.label && !(item.kind === "roi" && !item.stats) ? item.label : item.savedLabel || "";
        out.push({ sop_uid: sop, frame, kind: item.kind, points, label, window: item.window || null });
      }
    }
    return out;
  }

  /** PUT the user's measurements; a change made meanwhile goes in one more PUT after it. */
  async save() {
    clearTimeout(this.saveTimer);
    this.saveTimer = 0;
    if (!this.canSave || !this.loaded || !this.dirty) return;
    if (this.saving) {
      this.again = true;
      return;
    }
    this.dirty = false;
    const measurements = this.payload();
    this.say("measure_saving", "");
    this.saving = api("PUT", `/api/studies/${encodeURIComponent(this.viewer.studyUid)}/annotations`,
      { json: { measurements } });
    try {
      const answer = await this.saving;
      this.say("measure_saved", "saved", measurements.length);
      this.remember(answer);
      // A new presentation state series, the previous one gone: the study's series list shows them.
      if (answer && (answer.stored || (answer.removed || []).length) && this.onSaved) this.onSaved(answer);
    } catch (exc) {
      this.dirty = true; // tried again with the next change, or when the study is left
      this.say("measure_error", "error", 0, exc.message);
    } finally {
      this.saving = null;
    }
    if (this.again) {
      this.again = false;
      this.save();
    }
  }

  /** Save at once what waits for its moment (the study left); *leaving*: the page goes (a keepalive request). */
  flush(leaving = false) {
    if (!this.saveTimer && !this.dirty) return;
    clearTimeout(this.saveTimer);
    this.saveTimer = 0;
    if (!leaving) {
      this.save();
      return;
    }
    if (!this.canSave || !this.loaded || !this.dirty) return;
    this.dirty = false;
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    // keepalive: the request outlives the page that sends it (a reload, the tab closed).
    fetch(`/api/studies/${encodeURIComponent(this.viewer.studyUid)}/annotations`, {
      method: "PUT", headers, body: JSON.stringify({ measurements: this.payload() }), keepalive: true,
      credentials: "same-origin", referrerPolicy: "same-origin",
    }).catch(() => {});
  }

  /** The study is closed: what waits is saved now. */
  destroy() {
    this.flush();
    this.destroyed = true;
    if (this.offLang) this.offLang();
    if (this.onPageHide) window.removeEventListener("pagehide", this.onPageHide);
  }

  /** The save state by the frame counter: *kind* "" (saving), "saved" or "error". */
  say(key, kind, n = 0, detail = "") {
    this.said = { key, n, detail };
    this.state.className = `key-state ${kind}`.trim();
    if (kind === "saved") this.state.dataset.saved = String(n);
    else delete this.state.dataset.saved;
    this.sayAgain();
  }

  sayAgain() {
    if (!this.said) return;
    const { key, n, detail } = this.said;
    const text = key === "measure_saved" && !n ? t("measure_removed") : t(key, { n });
    this.state.textContent = text + (detail ? `: ${detail}` : "");
  }

  /** Forget everything (another study). */
  reset() {
    this.drawing = null;
    this.items.clear();
    this.foreign.clear();
    this.calibrations.clear();
    this.redraw();
  }

  /** The calibration of a frame, asked of the server once (cached). */
  calibration(key) {
    let entry = this.calibrations.get(key);
    if (!entry) {
      entry = { value: null, failed: false, promise: null };
      const [sop, frame] = key.split("/");
      entry.promise = api("GET", `${this.frameUrl(sop, frame)}/calibration`).then(
        (value) => {
          entry.value = value;
          this.redraw();
        },
        () => {
          entry.failed = true; // measured in pixels, and said so
          this.redraw();
        },
      );
      this.calibrations.set(key, entry);
    }
    return entry;
  }

  frameUrl(sop, frame) {
    const s = encodeURIComponent;
    const v = this.viewer;
    return `/api/studies/${s(v.studyUid)}/series/${s(v.series.series_uid)}/instances/${s(sop)}/frames/${s(frame)}`;
  }

  // -- geometry -------------------------------------------------------------------
  /** The frame's grid size (Columns x Rows) of the slice shown. */
  grid() {
    const slice = this.viewer.slices[this.viewer.index];
    return slice ? this.viewer.gridOf(slice.sop) : null;
  }

  /** Where the image is on screen, relative to the viewport: its box after zoom and pan;
   * null until the frame shown is the one measured (a slice scrolled to still loading
   * leaves the previous one on screen: a line drawn on it was the next slice's). */
  imageBox() {
    const img = this.viewer.image;
    if (!img || img.hidden || !img.naturalWidth) return null;
    if (this.viewer.shownKey !== this.currentKey()) return null;
    const rect = img.getBoundingClientRect();
    const frame = this.viewer.viewport.getBoundingClientRect();
    if (!rect.width || !rect.height) return null;
    return { left: rect.left - frame.left, top: rect.top - frame.top, width: rect.width, height: rect.height, frame };
  }

  toGrid(event) {
    const box = this.imageBox();
    const grid = this.grid();
    if (!box || !grid) return null;
    const x = ((event.clientX - box.frame.left - box.left) / box.width) * grid.columns;
    const y = ((event.clientY - box.frame.top - box.top) / box.height) * grid.rows;
    // A point is on the image: drawing may start or end just off its edge.
    return { x: Math.max(0, Math.min(grid.columns, x)), y: Math.max(0, Math.min(grid.rows, y)) };
  }

  toScreen(point, box, grid) {
    return { x: box.left + (point.x / grid.columns) * box.width, y: box.top + (point.y / grid.rows) * box.height };
  }

  // -- pointer -----------------------------------------------------------------------
  pointerDown(event) {
    const point = this.toGrid(event);
    if (!point) return false;
    const viewport = this.viewer.viewport;
    const d = this.drawing;
    if (d && d.kind === "angle") {
      // The second and the third click of an angle.
      d.points[d.points.length - 1] = point;
      if (d.points.length === 3) this.finish();
      else d.points.push({ ...point });
      this.redraw();
      return true;
    }
    this.cancel();
    const key = this.currentKey();
    this.calibration(key);
    this.drawing = {
      kind: this.tool, key, points: [point, { ...point }], pointerId: event.pointerId,
      down: { x: event.clientX, y: event.clientY },
    };
    viewport.setPointerCapture(event.pointerId);
    this.redraw();
    return true;
  }

  pointerMove(event) {
    const d = this.drawing;
    if (!d) return false;
    const point = this.toGrid(event);
    if (point) {
      d.points[d.points.length - 1] = point;
      this.redraw();
    }
    return true;
  }

  pointerUp(event) {
    const d = this.drawing;
    if (!d) return false;
    const viewport = this.viewer.viewport;
    if (viewport.hasPointerCapture(event.pointerId)) viewport.releasePointerCapture(event.pointerId);
    const dragged = Math.hypot(event.clientX - d.down.x, event.clientY - d.down.y) >= MIN_DRAG;
    if (d.kind === "angle") {
      // Dragged out, the first arm ends here; clicked, the next click ends it.
      if (dragged && d.points.length === 2) {
        d.points.push({ ...d.points[1] });
        this.redraw();
      }
      d.down = { x: -1e9, y: -1e9 };
      return true;
    }
    if (!dragged) this.cancel();
    else this.finish();
    return true;
  }

  finish() {
    const d = this.drawing;
    this.drawing = null;
    if (!d) return;
    // The window it was measured in: the saved state's (another viewer shows the image so); null: the image's own.
    const shown = this.viewer.window;
    const item = { kind: d.kind, points: d.points, stats: null, error: "", window: shown ? [shown.c, shown.w] : null };
    if (!this.items.has(d.key)) this.items.set(d.key, []);
    this.items.get(d.key).push(item);
    if (item.kind === "roi") this.loadStats(d.key, item);
    this.redraw();
    this.changed();
  }

  async loadStats(key, item) {
    item.loading = true;
    const [sop, frame] = key.split("/");
    const [a, b] = item.points;
    const round = (v) => Math.round(v * 100) / 100;
    try {
      item.stats = await api("GET", `${this.frameUrl(sop, frame)}/roi`, {
        query: { shape: "ellipse", x0: round(a.x), y0: round(a.y), x1: round(b.x), y1: round(b.y) },
      });
    } catch (exc) {
      item.error = exc.message || String(exc);
    }
    this.redraw();
    if (!item.saved && this.dirty) this.scheduleSave(); // its figures are its label
  }

  handleKey(event) {
    if (event.key === "Escape") return this.cancel();
    if (event.ctrlKey || event.metaKey) return false;
    if (event.key === "Delete" || event.key === "Backspace") {
      if (!this.cancel()) this.undo();
      return true;
    }
    const key = event.key.toLowerCase();
    const tool = TOOLS.find((candidate) => candidate.shortcut === key);
    if (tool) {
      this.setTool(tool.name);
      return true;
    }
    if (key === "c") {
      this.clear();
      return true;
    }
    return false;
  }

  // -- drawing ------------------------------------------------------------------------
  redraw() {
    const layer = this.layer;
    const box = this.imageBox();
    const grid = this.grid();
    const key = this.currentKey();
    if (this.drawing && this.drawing.key !== key) this.drawing = null; // another slice now
    layer.replaceChildren();
    if (!box || !grid) return;
    const list = [...(this.items.get(key) || [])];
    if (this.drawing) list.push({ ...this.drawing, drawing: true });
    // Saved ones shown again: their frame's calibration, an ROI's figures, asked of the server.
    if (list.length && !this.calibrations.has(key)) this.calibration(key);
    for (const item of list) if (item.kind === "roi" && item.saved && !item.stats && !item.loading) this.loadStats(key, item);
    const entry = this.calibrations.get(key);
    const calibration = entry && entry.value;
    const pending = Boolean(entry && !entry.value && !entry.failed);
    const slash = key.lastIndexOf("/");
    const others = [...(this.foreign.get(key) || []), ...(this.foreign.get(`${key.slice(0, slash)}/*`) || [])];
    others.forEach((image) => layer.append(this.foreignShape(image, box, grid)));
    list.forEach((item, n) => layer.append(this.shape(item, n, box, grid, calibration, pending)));
    for (const text of layer.querySelectorAll("text")) this.keepInside(text, box.frame);
  }

  /** A label past the viewport's right or bottom edge goes to the other side of its point. */
  keepInside(text, frame) {
    const bounds = text.getBBox();
    if (bounds.x + bounds.width > frame.width) {
      text.setAttribute("text-anchor", "end");
      const x = String(Number(text.getAttribute("x")) - 16);
      text.setAttribute("x", x);
      text.setAttribute("y", String(Number(text.getAttribute("y")) - 12)); // above the line it ends
      for (const span of text.querySelectorAll("tspan")) span.setAttribute("x", x);
    }
    if (bounds.y + bounds.height > frame.height) {
      text.setAttribute("y", String(Number(text.getAttribute("y")) - bounds.height - 8));
    }
  }

  shape(item, n, box, grid, calibration, pending) {
    const pts = item.points.map((p) => this.toScreen(p, box, grid));
    const group = svg("g", {
      class: `measurement ${item.kind}${item.drawing ? " drawing" : ""}`, "data-kind": item.kind, "data-index": n,
    });
    let lines = [];
    let at = pts[pts.length - 1];
    if (item.kind === "length") {
      group.append(svg("line", { x1: pts[0].x, y1: pts[0].y, x2: pts[1].x, y2: pts[1].y }));
      if (!pending) {
        const length = lengthOf(calibration, item.points[0], item.points[1]);
        group.setAttribute("data-value", fixed(length.value, 2));
        group.setAttribute("data-unit", length.unit);
        lines = [`${fixed(length.value)} ${length.unit}${basisNote(length.basis, length.unit)}`];
      }
    } else if (item.kind === "angle") {
      group.append(svg("polyline", { points: pts.map((p) => `${p.x},${p.y}`).join(" ") }));
      at = pts[1];
      if (item.points.length === 3 && !pending) {
        const angle = angleOf(calibration, ...item.points);
        group.setAttribute("data-value", fixed(angle, 2));
        lines = [`${fixed(angle)}°`];
      }
    } else if (item.kind === "roi") {
      const [a, b] = pts;
      group.append(svg("ellipse", {
        cx: (a.x + b.x) / 2, cy: (a.y + b.y) / 2, rx: Math.abs(b.x - a.x) / 2, ry: Math.abs(b.y - a.y) / 2,
      }));
      at = { x: Math.max(a.x, b.x), y: Math.max(a.y, b.y) };
      if (!item.drawing) lines = this.roiLines(item);
      if (item.stats) {
        for (const name of ["pixels", "padding", "mean", "sd", "min", "max", "area"]) {
          const value = item.stats[name];
          if (value !== null && value !== undefined) group.setAttribute(`data-${name}`, value);
        }
      }
    }
    for (const p of pts) group.append(svg("circle", { class: "handle", cx: p.x, cy: p.y, r: HANDLE_RADIUS }));
    if (!item.drawing && !pending) item.label = lines.join("\n"); // what a save writes as its text
    if (lines.length) {
      const text = svg("text", { class: "measure-label", x: at.x + 8, y: at.y + 4 });
      lines.forEach((line, i) => text.append(svg("tspan", { x: at.x + 8, dy: i ? "1.2em" : 0 }, line)));
      group.append(text);
    }
    return group;
  }

  /** A colleague's or another system's presentation state on this frame: read-only, its author on hover. */
  foreignShape(image, box, grid) {
    const screen = (p) => this.toScreen({ x: p[0], y: p[1] }, box, grid);
    const group = svg("g", { class: "measurement foreign", "data-state": image.state, "data-author": image.author });
    group.append(svg("title", {}, t("measure_by", { name: image.author || t("measure_unknown_author") })));
    for (const g of image.graphics || []) {
      const pts = g.points.map(screen);
      const filled = g.filled ? "filled" : "";
      if (g.type === "POINT") {
        for (const p of pts) group.append(svg("circle", { class: "point", cx: p.x, cy: p.y, r: HANDLE_RADIUS }));
      } else if (g.type === "CIRCLE" && pts.length >= 2) {
        // A radius in pixels: drawn on screen as an ellipse, the pixel grid may be stretched.
        const r = Math.hypot(g.points[1][0] - g.points[0][0], g.points[1][1] - g.points[0][1]);
        group.append(svg("ellipse", { class: filled, cx: pts[0].x, cy: pts[0].y, rx: (r / grid.columns) * box.width,
          ry: (r / grid.rows) * box.height }));
      } else if (g.type === "ELLIPSE" && pts.length >= 4) {
        const [a, b, c, d] = pts;
        const cx = (a.x + b.x) / 2;
        const cy = (a.y + b.y) / 2;
        const degrees = (Math.atan2(b.y - a.y, b.x - a.x) * 180) / Math.PI;
        group.append(svg("ellipse", { class: filled, cx, cy, rx: Math.hypot(b.x - a.x, b.y - a.y) / 2,
          ry: Math.hypot(d.x - c.x, d.y - c.y) / 2, transform: `rotate(${degrees} ${cx} ${cy})` }));
      } else {
        // POLYLINE, and INTERPOLATED drawn through its points.
        group.append(svg(g.filled ? "polygon" : "polyline", { class: filled, points: pts.map((p) => `${p.x},${p.y}`).join(" ") }));
      }
    }
    for (const text of image.texts || []) {
      const at = text.box ? screen(text.box[0]) : screen(text.anchor);
      const label = svg("text", { class: "measure-label", x: at.x, y: at.y + 12 });
      text.text.split("\n").forEach((line, i) => label.append(svg("tspan", { x: at.x, dy: i ? "1.2em" : 0 }, line)));
      group.append(label);
    }
    return group;
  }

  roiLines(item) {
    if (item.error) return [item.error];
    const s = item.stats;
    if (!s) return ["…"];
    const area = `${t("roi_area")} ${fixed(s.area)} ${s.area_unit === "mm2" ? "mm²" : "px²"}`
      + (s.area_unit === "px2" ? ` ${t("measure_uncalibrated")}` : basisNote(s.basis, "mm"));
    // Outside the scan field (Pixel Padding Value): not in the figures, and said so.
    const padding = s.padding ? [t("roi_padding").replace("{n}", String(s.padding))] : [];
    if (!s.pixels) return [t("roi_empty"), area, ...padding];
    if (s.channels) {
      const channel = (c) => `${c.name} ${t("roi_mean")} ${valueText(c.mean)} ${t("roi_sd")} ${valueText(c.sd)}`;
      return [...s.channels.map(channel), area];
    }
    const unit = s.units ? ` ${s.units}` : "";
    return [
      `${t("roi_mean")} ${valueText(s.mean)}${unit} ${t("roi_sd")} ${valueText(s.sd)}`,
      `${t("roi_min")} ${valueText(s.min)} ${t("roi_max")} ${valueText(s.max)}`,
      area,
      ...padding,
    ];
  }
}
